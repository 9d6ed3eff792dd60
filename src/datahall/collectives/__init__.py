"""ForestColl: throughput-optimal collective schedules for any GPU fabric (NSDI '26)."""

from .bound import Bound, binary_search_bound, fixed_k_bound, lp_bound, optimal_bound, recover_U_k
from .plan import achieved_algbw, check_schedule, degrade, map_paths, phase_loads, plan
from .schedule import COLLECTIVES, Collective, Phase, Schedule, Tree, TreeArc
from .split import Split, SplitError, edge_split, expand
from .trees import Branching, PackingError, Symmetry, automorphisms, pack_trees

__all__ = [
    "COLLECTIVES",
    "Collective",
    "Phase",
    "Schedule",
    "Tree",
    "TreeArc",
    "Bound",
    "optimal_bound",
    "fixed_k_bound",
    "binary_search_bound",
    "lp_bound",
    "recover_U_k",
    "Split",
    "SplitError",
    "edge_split",
    "expand",
    "Branching",
    "PackingError",
    "Symmetry",
    "automorphisms",
    "pack_trees",
    "plan",
    "degrade",
    "achieved_algbw",
    "check_schedule",
    "map_paths",
    "phase_loads",
]
