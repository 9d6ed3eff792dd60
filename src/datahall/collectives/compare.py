"""ForestColl against the baselines across message sizes, on one fabric (issue: `compare`).

Each algorithm's schedule is built once; its algbw at every size comes from the analytic
evaluator (:func:`.evaluate.evaluate`, fast) or the chunk simulator (:func:`.simulate.simulate`).
Baselines that do not apply to a collective (NCCL's tree is an allreduce algorithm) are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx

from ..core.report import new_figure, save_figure
from ..core.units import format_bytes
from .baselines import BASELINES
from .bound import optimal_bound
from .evaluate import asymptotic_algbw, evaluate
from .plan import plan
from .schedule import Schedule
from .simulate import simulate

__all__ = ["DEFAULT_SIZES", "schedules", "compare", "draw_compare"]

DEFAULT_SIZES: tuple[int, ...] = tuple(2**i for i in range(10, 34))  # 1 KiB .. 8 GiB


def schedules(G: nx.DiGraph, collective: str, root: str | None = None) -> dict[str, Schedule]:
    """ForestColl's plan and every baseline that supports `collective` on `G`."""
    out = {"forestcoll": plan(G, collective, root=root)}
    for name, build in BASELINES.items():
        if name == "nccl-tree" and collective != "allreduce":
            continue  # NCCL uses its trees for allreduce only
        try:
            out[name] = build(G, collective, **({"root": root} if root else {}))
        except ValueError:
            continue  # the baseline does not do this collective
    return out


def compare(
    G: nx.DiGraph,
    collective: str = "allgather",
    sizes: Sequence[int] = DEFAULT_SIZES,
    *,
    simulated: bool = False,
    root: str | None = None,
) -> dict[str, Any]:
    """algbw (GB/s) of ForestColl and the baselines at each size in `sizes` (bytes)."""
    plans = schedules(G, collective, root)
    measure = simulate if simulated else evaluate
    return {
        "topology": G.graph.get("name"),
        "collective": collective,
        "method": "simulated" if simulated else "analytic",
        "sizes": list(sizes),
        "optimal_algbw_GBps": float(optimal_bound(G, collective, root).algbw),
        "asymptotic_algbw_GBps": {n: float(asymptotic_algbw(s, G)) for n, s in plans.items()},
        "algbw_GBps": {n: [measure(s, G, M).algbw for M in sizes] for n, s in plans.items()},
    }


def draw_compare(result: dict[str, Any], path: str | Path) -> Path:
    """Plot algbw against message size for every algorithm of a :func:`compare` result."""
    fig, ax = new_figure(7, 4.2)
    sizes = result["sizes"]
    for name, values in result["algbw_GBps"].items():
        ax.plot(
            sizes,
            values,
            marker="o",
            markersize=3,
            label=name,
            linewidth=2.2 if name == "forestcoll" else 1.2,
        )
    ax.axhline(
        result["optimal_algbw_GBps"],
        color="grey",
        linestyle="--",
        linewidth=1,
        label=f"optimum {result['optimal_algbw_GBps']:.1f} GB/s",
    )
    ax.set_xscale("log", base=2)
    ticks = sizes[:: max(1, len(sizes) // 8)]
    ax.set_xticks(ticks, [format_bytes(s, 3) for s in ticks], rotation=30)
    ax.set_xlabel("message size (output bytes)")
    ax.set_ylabel("algbw (GB/s)")
    ax.set_title(f"{result['collective']} on {result['topology']} ({result['method']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
