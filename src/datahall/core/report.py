"""Reporting shared by every system: rich tables, matplotlib figures, JSON results, the HTML report.

A system's demo returns a :class:`DemoResult` (what it ran, its headline figure beside the
baseline's, figures and details); ``datahall tour`` turns a list of them into one summary table,
``results.json`` and a self-contained ``index.html`` with every figure embedded.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from enum import Enum
from fractions import Fraction
from pathlib import Path
from typing import Any

import matplotlib
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

matplotlib.use("Agg")  # headless: figures go to files, never to a window

import jinja2  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

__all__ = [
    "console",
    "err_console",
    "table",
    "print_table",
    "jsonable",
    "write_json",
    "new_figure",
    "save_figure",
    "DemoResult",
    "write_report",
]

console = Console()
err_console = Console(stderr=True)  # notes and errors, so that --json stdout stays parseable


def progress_bar(transient: bool = False) -> Progress:
    """The progress display every long command uses (spinner, text, bar, elapsed), on stderr so
    ``--json`` output on stdout stays clean."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=transient,
    )


def table(
    title: str | None,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    show_header: bool = True,
) -> Table:
    """A rich table; cells are formatted with :func:`cell`."""
    t = Table(title=title, title_justify="left", header_style="bold", show_header=show_header)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*(cell(x) for x in r))
    return t


def print_table(
    title: str | None,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    show_header: bool = True,
) -> None:
    console.print(table(title, columns, rows, show_header))


def cell(x: Any) -> str:
    """Format a value for a table: Fractions and floats with 4 significant digits after the
    point where useful, everything else by ``str``."""
    if isinstance(x, Fraction):
        x = float(x)
    if isinstance(x, float):
        if math.isfinite(x) and x == int(x) and abs(x) < 1e15:
            return str(int(x))
        return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return "" if x is None else str(x)


def jsonable(obj: Any) -> Any:
    """Convert results to JSON types: Fractions to floats, dataclasses to dicts, sets to sorted
    lists, paths to strings, numpy scalars and arrays to Python numbers and lists."""
    if isinstance(obj, Fraction):
        return float(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, set | frozenset):
        return sorted((jsonable(v) for v in obj), key=str)
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Enum):
        return obj.value
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    return obj


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` (made :func:`jsonable`) to `path`, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=2) + "\n")
    return path


def new_figure(width: float = 7, height: float = 4):
    """A matplotlib (figure, axes) pair on the Agg backend."""
    return plt.subplots(figsize=(width, height), layout="constrained")


def save_figure(fig, path: str | Path) -> Path:
    """Save `fig` as PNG at `path` (folder created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclasses.dataclass
class DemoResult:
    """What one system's demo ran and measured, for the tour's summary and report."""

    system: str
    what: str
    headline: str
    value: float
    baseline: str
    baseline_value: float
    unit: str
    higher_is_better: bool = True
    figures: list[Path] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """How many times better than the baseline (>1 is better, whatever the direction)."""
        if self.higher_is_better:
            return self.value / self.baseline_value if self.baseline_value else math.inf
        return self.baseline_value / self.value if self.value else math.inf


SUMMARY_COLUMNS = ("system", "what was run", "headline", "baseline", "ratio")


def summary_rows(results: Sequence[DemoResult]) -> list[list[str]]:
    return [
        [
            r.system,
            r.what,
            f"{r.headline}: {cell(r.value)} {r.unit}",
            f"{r.baseline}: {cell(r.baseline_value)} {r.unit}",
            f"{r.ratio:.2f}x",
        ]
        for r in results
    ]


_TEMPLATE = jinja2.Environment(
    loader=jinja2.PackageLoader("datahall.core", "templates"),
    autoescape=jinja2.select_autoescape(["html", "j2"]),
)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def write_report(
    out_dir: str | Path, results: Sequence[DemoResult], title: str = "datahall tour"
) -> Path:
    """Write ``results.json`` and a self-contained ``index.html`` (figures embedded) to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    write_json(
        out / "results.json",
        {
            "generated": stamp,
            "results": [{**jsonable(r), "ratio": r.ratio} for r in results],
        },
    )
    sections = [
        {
            "result": r,
            "figures": [{"name": f.name, "src": _data_uri(Path(f))} for f in r.figures],
            "details": json.dumps(jsonable(r.details), indent=2),
        }
        for r in results
    ]
    html = _TEMPLATE.get_template("report.html.j2").render(
        title=title,
        generated=stamp,
        columns=SUMMARY_COLUMNS,
        rows=summary_rows(results),
        sections=sections,
    )
    index = out / "index.html"
    index.write_text(html)
    return index
