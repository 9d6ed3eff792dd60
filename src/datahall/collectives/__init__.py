"""ForestColl: throughput-optimal collective schedules for any GPU fabric (NSDI '26)."""

from .schedule import COLLECTIVES, Collective, Phase, Schedule, Tree, TreeArc

__all__ = ["COLLECTIVES", "Collective", "Phase", "Schedule", "Tree", "TreeArc"]
