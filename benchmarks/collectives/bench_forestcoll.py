"""ForestColl goals (issue 3), each printed beside the measured figure.

1. Simulated algbw of the generated allgather on 2x DGX A100 at 1 GiB: >= 99% of the bound and
   >= 1.6x NCCL's rings on the same simulator (same chunking, same links).
2. Whole pipeline (bound + split + trees) for 2x DGX A100 (k = 13) < 5 s and 4x DGX A100 < 10 s;
   the brief's measured times of the public Python reference are 19.1 s and 92 s (not re-run
   here: that code is not part of datahall).
3. Bound for 1,024 GPUs (128 DGX boxes on a leaf-spine) < 60 s; the same-run baseline is the
   reference method, a binary search over 1/x with N max-flows per probe.
4. Trees for 256 GPUs < 10 minutes using symmetry; generation time against GPU count (figure).
"""

from __future__ import annotations

import time

from datahall.collectives.baselines import nccl_ring
from datahall.collectives.bound import binary_search_bound, optimal_bound
from datahall.collectives.plan import plan
from datahall.collectives.simulate import simulate
from datahall.core.report import new_figure, print_table, save_figure
from datahall.core.topologies import dgx_a100, leaf_spine

from ..goals import RESULTS, Goal, best_time, report

GiB = 2**30


def simulated_goal() -> tuple[list[Goal], dict]:
    """The goal at the simulator's defaults (EDF links, 128 KiB chunks); the other link
    models are measured too and printed beside it, for context."""
    G = dgx_a100(boxes=2)
    ours, ring = plan(G, "allgather"), nccl_ring(G, "allgather")
    bound = float(ours.algbw)
    models = {}
    for link in ("edf", "fifo", "ps"):
        a, b = simulate(ours, G, GiB, link=link), simulate(ring, G, GiB, link=link)
        models[link] = {"forestcoll": a.algbw, "nccl_ring": b.algbw, "bound": bound}
    print_table(
        "collectives: simulated 2xA100 allgather at 1 GiB by link model",
        ["links", "ForestColl GB/s", "% of bound", "NCCL ring GB/s", "ratio"],
        [
            [
                k,
                f"{v['forestcoll']:.2f}",
                f"{100 * v['forestcoll'] / bound:.2f}%",
                f"{v['nccl_ring']:.2f}",
                f"{v['forestcoll'] / v['nccl_ring']:.3f}x",
            ]
            for k, v in models.items()
        ],
    )
    a, b = models["edf"]["forestcoll"], models["edf"]["nccl_ring"]
    goals = [
        Goal(
            "sim algbw / bound, 2xA100 AG 1 GiB", ">= 99%", 100 * a / bound, "%", a >= 0.99 * bound
        ),
        Goal(
            "sim algbw vs NCCL ring, same simulator", ">= 1.6x", a, "GB/s", a >= 1.6 * b, baseline=b
        ),
    ]
    return goals, models


def pipeline_goals() -> list[Goal]:
    goals = []
    for boxes, limit, reference in [(2, 5.0, 19.1), (4, 10.0, 92.0)]:
        G = dgx_a100(boxes=boxes)
        t, s = best_time(lambda G=G: plan(G, "allgather"), repeat=2)
        goals.append(
            Goal(
                f"pipeline {boxes}x DGX A100 (k = {s.k}, {len(s.trees())} trees)",
                f"< {limit:g} s (reference: {reference:g} s, brief)",
                t,
                "s",
                t < limit,
                baseline=reference,
            )
        )
    return goals


def bound_goal() -> tuple[list[Goal], dict]:
    """Our Dinkelbach bound at 1,024 GPUs; the reference binary search as the same-run baseline
    at 256 GPUs (at 1,024 its probes overflow int32 and fall back to networkx: hours)."""
    goals, data = [], {}
    for boxes, with_baseline in [(128, False), (32, True)]:
        G = leaf_spine(boxes=boxes, boxes_per_leaf=4, spines=8)
        ours, b = best_time(lambda G=G: optimal_bound(G, "allgather"), repeat=1)
        theirs = None
        if with_baseline:
            theirs, x = best_time(lambda G=G: binary_search_bound(G, "allgather"), repeat=1)
            assert x == b.x_star, "Dinkelbach and binary search disagree"
        goals.append(
            Goal(
                f"bound, {8 * boxes} GPUs on a leaf-spine",
                "< 60 s",
                ours,
                "s",
                ours < 60,
                baseline=theirs,
            )
        )
        data[8 * boxes] = {"x_star": str(b.x_star), "algbw_GBps": float(b.algbw)}
    return goals, data


def scaling() -> tuple[Goal, dict]:
    rows = {"gpus": [], "bound_s": [], "plan_s": []}
    for boxes in (1, 2, 4, 8, 16, 32, 64, 128):
        G = leaf_spine(boxes=boxes, boxes_per_leaf=4, spines=4)
        start = time.perf_counter()
        optimal_bound(G, "allgather")
        rows["bound_s"].append(time.perf_counter() - start)
        if boxes <= 32:
            start = time.perf_counter()
            plan(G, "allgather")
            rows["plan_s"].append(time.perf_counter() - start)
        rows["gpus"].append(8 * boxes)
        print(
            f"   {8 * boxes:5d} GPUs: bound {rows['bound_s'][-1]:.2f} s"
            + (f", plan {rows['plan_s'][-1]:.2f} s" if boxes <= 32 else ""),
            flush=True,
        )
    fig, ax = new_figure(6, 4)
    ax.loglog(rows["gpus"], rows["bound_s"], marker="o", label="bound (x*, Dinkelbach)")
    ax.loglog(
        rows["gpus"][: len(rows["plan_s"])],
        rows["plan_s"],
        marker="s",
        label="whole plan (bound + split + trees)",
    )
    ax.set_xlabel("GPUs (8 per box, leaf-spine)")
    ax.set_ylabel("seconds (2 cores)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_figure(fig, RESULTS / "collectives" / "generation-time.png")
    t256 = rows["plan_s"][-1]
    return Goal("trees for 256 GPUs (symmetry)", "< 600 s", t256, "s", t256 < 600), rows


def main() -> None:
    goals, links = simulated_goal()
    goals += pipeline_goals()
    gs, bound_data = bound_goal()
    goals += gs
    g, rows = scaling()
    goals.append(g)
    data = {"simulated_links": links, "bound_1024": bound_data, "scaling": rows}
    report("collectives", "forestcoll", goals, data)


if __name__ == "__main__":
    main()
