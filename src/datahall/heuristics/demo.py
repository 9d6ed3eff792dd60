"""The tour's heuristics demo: demand pinning on Abilene, the worst case MetaEase finds beside
random search given the same time, and the adversarial demands drawn as a matrix.

Demand pinning (MetaOpt, NSDI '24) routes every demand at or below 5% of a link's capacity on
its shortest path and optimises the rest; the optimum routes everything jointly. The gap is
normalised by the total capacity, as MetaOpt reports it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.progress import Progress

from ..core.report import DemoResult, new_figure, save_figure, write_json
from .analyze import analyze
from .baselines import random_search
from .builtins import build

BUDGET_S = 15.0


def draw_demands(problem, x: np.ndarray, path: Path) -> Path:
    """The adversarial demand matrix: colour is the demand, dots mark the pinned ones."""
    inst = problem.heuristic.instance
    nodes = sorted({n for pair in inst.pairs for n in pair})
    index = {n: i for i, n in enumerate(nodes)}
    M = np.zeros((len(nodes), len(nodes)))
    pinned = []
    T = problem.info["threshold"]
    for (s, t), d in zip(inst.pairs, x, strict=True):
        M[index[s], index[t]] = d
        if 0 < d <= T:
            pinned.append((index[t], index[s]))
    fig, ax = new_figure(6.4, 5.2)
    im = ax.imshow(M, cmap="viridis")
    if pinned:
        cols, rows = zip(*pinned, strict=True)
        ax.scatter(cols, rows, s=14, c="white", marker="o", label=f"pinned (≤ {T:g})")
        ax.legend(loc="upper right", fontsize=7, framealpha=0.6)
    ax.set_xticks(range(len(nodes)), nodes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(nodes)), nodes, fontsize=7)
    ax.set_xlabel("destination")
    ax.set_ylabel("source")
    ax.set_title("adversarial demands for demand pinning, Abilene")
    fig.colorbar(im, ax=ax, label="demand (capacity units)")
    return save_figure(fig, path)


def run(out_dir: Path, progress: Progress) -> DemoResult:
    problem = build("dp", topology="abilene")
    task = progress.add_task("heuristics: demand pinning on Abilene", total=3)
    found = analyze(problem, BUDGET_S, workers=2, seed=0)
    progress.advance(task)
    rnd = random_search(problem, BUDGET_S, seed=0)
    progress.advance(task)
    figure = draw_demands(problem, found.best.x, out_dir / "adversarial-demands.png")
    progress.advance(task)
    scale = problem.scale
    details = {
        "problem": found.to_json(),
        "random_search": {
            "gap": rnd.gap,
            "normalized_gap": rnd.gap / scale,
            "evaluations": rnd.evaluations,
            "seconds": rnd.seconds,
        },
        "budget_s": BUDGET_S,
    }
    write_json(out_dir / "results.json", details)
    d = problem.describe(found.best.x)
    return DemoResult(
        system="heuristics",
        what=(
            f"demand pinning on Abilene ({problem.dim} demands, threshold {d['threshold']:g}), "
            f"{BUDGET_S:g} s each: {len(found.exploration.paths)} code paths explored; the worst "
            f"input pins {d['pinned']} demands and loses {found.gap:g} units that the optimum "
            "carries"
        ),
        headline="gap found, % of total capacity",
        value=100 * found.normalized,
        baseline="random search, same time",
        baseline_value=100 * rnd.gap / scale,
        unit="%",
        figures=[figure],
        details=details,
    )
