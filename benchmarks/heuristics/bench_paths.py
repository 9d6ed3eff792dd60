"""Code-path exploration of demand pinning on Abilene (issue 7 goal: under 30 s on 2 cores).

Abilene has 132 demand pairs, so demand pinning has 2^132 code paths (each demand pinned or
not): no exploration is complete. What the search needs from this stage is MetaEase's seed set,
one input per path: here the first generation of the generational search from the all-min and
all-max inputs (every path one branch away from either: 2 + 2 × 132 = 266 paths), timed, and
then how many paths 30 s reach. The hand instance of the brief (§3) is explored completely.
"""

from __future__ import annotations

import time

from datahall.heuristics.builtins import build
from datahall.heuristics.concolic import explore_paths
from datahall.heuristics.te import demand_pinning_problem, pinning_example

from ..goals import Goal, report

GOAL_S = 30.0


def main() -> None:
    p = build("dp", topology="abilene")
    n = p.dim
    first_generation = 2 + 2 * n
    start = time.perf_counter()
    gen = explore_paths(
        p.heuristic,
        p.lower,
        p.upper,
        seeds=[p.lower, p.upper],
        max_paths=first_generation,
        budget_s=120,
    )
    first_s = time.perf_counter() - start
    wide = explore_paths(
        p.heuristic, p.lower, p.upper, seeds=[p.lower, p.upper], budget_s=GOAL_S, max_paths=10**6
    )
    hand = demand_pinning_problem(pinning_example())
    small = explore_paths(hand.heuristic, hand.lower, hand.upper)
    goals = [
        Goal(
            f"first generation of DP paths on Abilene ({first_generation} paths)",
            f"< {GOAL_S:g} s on 2 cores",
            first_s,
            "s",
            first_s < GOAL_S and len(gen.paths) == first_generation,
            extra={"paths": len(gen.paths), "runs": gen.runs, "z3_queries": gen.solver_calls},
        ),
        Goal(
            "DP paths on Abilene explored in 30 s",
            "(reported)",
            len(wide.paths),
            "paths",
            True,
            extra={"runs": wide.runs, "z3_queries": wide.solver_calls, "unknown": wide.unknown},
        ),
        Goal(
            "hand instance (brief §3): every path found, exploration complete",
            "4 paths, complete",
            len(small.paths),
            "paths",
            len(small.paths) == 4 and small.complete,
            extra={"seconds": small.seconds},
        ),
    ]
    report(
        "heuristics",
        "paths",
        goals,
        {
            "first_generation_s": first_s,
            "paths_in_30s": len(wide.paths),
            "paths_per_s": len(wide.paths) / wide.seconds,
            "max_branches": wide.max_branches,
            "z3_queries_per_s": wide.solver_calls / wide.seconds,
        },
    )


if __name__ == "__main__":
    main()
