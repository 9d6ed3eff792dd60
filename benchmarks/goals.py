"""Goal reporting shared by the benchmarks: print each goal beside the measured figure and the
ratio to the baseline measured in the same run, and write results/<system>/<name>.json."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datahall.core.report import print_table, write_json

RESULTS = Path("results")


@dataclass
class Goal:
    """One goal of an issue: a measured figure against a target (and a baseline if any)."""

    name: str
    target: str
    measured: float
    unit: str
    met: bool
    baseline: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.measured:
            return None
        return self.baseline / self.measured if self.unit == "s" else self.measured / self.baseline


def best_time(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """The best wall time of `repeat` calls of `fn`, and its last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def report(system: str, name: str, goals: list[Goal], data: dict[str, Any] | None = None) -> Path:
    """Print the goals table and write the JSON results; returns the JSON path."""
    print_table(
        f"{system}: {name}",
        ["goal", "target", "measured", "baseline (same run)", "ratio", "met"],
        [
            [
                g.name,
                g.target,
                f"{g.measured:.4g} {g.unit}",
                "" if g.baseline is None else f"{g.baseline:.4g} {g.unit}",
                "" if g.ratio is None else f"{g.ratio:.3g}x",
                "yes" if g.met else "NO",
            ]
            for g in goals
        ],
    )
    return write_json(RESULTS / system / f"{name}.json", {"goals": goals, "data": data or {}})
