"""MetaEase (Karimi et al., NSDI '26): find the inputs where a heuristic is far from optimal,
straight from its Python source.

A :class:`Problem` pairs a heuristic with the optimum it approximates over a box of inputs;
:func:`analyze` explores the heuristic's code paths by concolic execution (:mod:`.concolic`),
climbs the gap from one seed per path (:mod:`.search`) and returns the worst input found. The
built-in problems (:mod:`.builtins`) are demand pinning and POP on WAN topologies
(:mod:`.te`), bin packing, knapsack and matching; :mod:`.oracle` computes exact worst cases
(MetaOpt's MILP, NSDI '24) on small instances and :mod:`.baselines` the black-box searches
MetaEase is compared with. See docs/heuristics.md.
"""

from .analyze import Analysis, analyze, check_problem
from .builtins import BUILTINS, build
from .concolic import explore_paths, trace
from .problem import Optimum, Problem, ProblemError, SearchResult, problem
from .search import guided_search

__all__ = [
    "Analysis",
    "BUILTINS",
    "Optimum",
    "Problem",
    "ProblemError",
    "SearchResult",
    "analyze",
    "build",
    "check_problem",
    "explore_paths",
    "guided_search",
    "problem",
    "trace",
]
