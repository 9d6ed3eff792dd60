"""The tour's ForestColl demo: 2x DGX A100 — bound, plan, simulated algbw against NCCL's rings."""

from __future__ import annotations

from pathlib import Path

from rich.progress import Progress

from ..core.report import DemoResult, write_json
from ..core.topologies import dgx_a100
from .baselines import nccl_ring
from .compare import compare, draw_compare
from .draw import draw_trees
from .plan import achieved_algbw, plan
from .simulate import simulate

SIZE = 2**30  # 1 GiB, the size of the goal
CURVE_SIZES = tuple(2**i for i in range(10, 34, 2))  # 1 KiB .. 8 GiB


def run(out_dir: Path, progress: Progress) -> DemoResult:
    task = progress.add_task("collectives: 2x DGX A100", total=5)
    G = dgx_a100(boxes=2)
    schedule = plan(G, "allgather")
    progress.advance(task)
    ring = nccl_ring(G, "allgather")
    ours = simulate(schedule, G, SIZE)
    progress.advance(task)
    theirs = simulate(ring, G, SIZE)
    progress.advance(task)
    curve = compare(G, "allgather", CURVE_SIZES)
    figures = [draw_compare(curve, out_dir / "allgather-algbw.png")]
    progress.advance(task)
    figures.append(draw_trees(schedule, out_dir / "trees-box0-gpu0.png", root="box0/gpu0"))
    progress.advance(task)
    details = {
        "topology": schedule.topology,
        "x_star": str(schedule.x_star),
        "k": schedule.k,
        "U": str(schedule.U),
        "optimal_algbw_GBps": float(schedule.algbw),
        "achieved_algbw_GBps_analytic": float(achieved_algbw(G, schedule)),
        "simulated_1GiB_GBps": {"forestcoll": ours.algbw, "nccl-ring": theirs.algbw},
        "fraction_of_bound_at_1GiB": ours.algbw / float(schedule.algbw),
        "plan_seconds": schedule.meta["timings_s"]["total"],
        "trees": sum(len(p.trees) for p in schedule.phases),
        "curve": curve,
    }
    write_json(out_dir / "results.json", details)
    return DemoResult(
        system="collectives",
        what="ForestColl allgather on 2x DGX A100 (16 GPUs): bound, plan, chunk simulation at 1 GiB",
        headline="ForestColl simulated algbw",
        value=ours.algbw,
        baseline="NCCL ring (8 rings) simulated",
        baseline_value=theirs.algbw,
        unit="GB/s",
        figures=figures,
        details=details,
    )
