"""``datahall heuristics``: find the worst-case inputs of a heuristic from its Python source.

- ``analyze MODULE:HEURISTIC --opt MODULE:OPT --bounds 0:200 --dim 12 --budget 60s``: any Python
  heuristic beside its optimum (or ``MODULE:PROBLEM`` for an object made with ``@problem``).
- ``builtin dp|pop|ff|ffd|knapsack|matching [--topology abilene] [-p KEY=VALUE]``: the built-in
  problems.
- ``list``: the built-in problems and their parameters.

Both analysis commands print the gap (absolute and normalised), the adversarial input, the code
paths explored and the time; ``--json`` prints the same as JSON, ``--out FILE`` writes it, and
``--compare random,annealing`` runs black-box baselines with the same budget beside it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from ..core.cli import emit_json
from ..core.report import console, print_table, progress_bar, write_json
from ..core.units import UnitError, parse_budget
from .problem import AsOptimum, Problem, ProblemError

app = typer.Typer(
    help="MetaEase: find inputs where a heuristic is far from optimal, from its source code.",
    no_args_is_help=True,
)

BudgetOpt = Annotated[str, typer.Option("--budget", help="wall-clock budget, e.g. 60s or 2min")]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", "-w", help="processes for the search (default: cores)")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="seed of every random choice")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON")]
OutOpt = Annotated[
    Path | None, typer.Option("--out", help="also write the result to this JSON file")
]
CompareOpt = Annotated[
    str | None,
    typer.Option(
        "--compare",
        help="black-box baselines to run with the same budget, comma-separated: "
        "random, hill-climbing, annealing, nevergrad, optuna",
    ),
]
ParamOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--param", "-p", help="problem parameter KEY=VALUE (repeatable), e.g. -p items=10"
    ),
]
SurrogateOpt = Annotated[
    bool, typer.Option("--surrogate", help="estimate ∇H with a Gaussian process (MetaEase's GP)")
]


def budget_seconds(text: str) -> float:
    """``"60s"``, ``"2min"`` or a bare number of seconds, as seconds."""
    try:
        return parse_budget(text)
    except UnitError as e:
        raise ProblemError(str(e)) from None


def load_object(spec: str, what: str) -> Any:
    """Import ``module:attr`` or ``path/to/file.py:attr``."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ProblemError(f"bad {what} {spec!r}: write MODULE:NAME or FILE.py:NAME")
    try:
        if target.endswith(".py"):
            path = Path(target).resolve()
            if not path.is_file():
                raise ProblemError(f"bad {what} {spec!r}: no file {target}")
            # Importable by name (its folder on sys.path) so worker processes can unpickle it.
            sys.path.insert(0, str(path.parent))
            module = importlib.import_module(path.stem)
            found = getattr(module, "__file__", None)
            if found is None or Path(found).resolve() != path:
                raise ProblemError(
                    f"bad {what} {spec!r}: the name {path.stem!r} is already the module "
                    f"{found or path.stem}, so {target} cannot be imported by it; rename the file"
                )
        else:
            module = importlib.import_module(target)
    except ProblemError:
        raise
    except Exception as e:
        raise ProblemError(
            f"cannot import {target!r} for {what} {spec!r}: {type(e).__name__}: {e}"
        ) from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ProblemError(f"{target!r} has no attribute {attr!r} (from {what} {spec!r})") from None
    if not callable(obj) and not isinstance(obj, Problem):
        raise ProblemError(f"{what} {spec!r} is a {type(obj).__name__}, not a function")
    return obj


def parse_bounds(text: str, dim: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``"0:200"`` (with `dim`) or ``"0:10,0:10,0:5"``: one LO:HI per input."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    pairs = []
    for p in parts:
        lo, sep, hi = p.partition(":")
        try:
            pairs.append((float(lo), float(hi)))
        except ValueError:
            raise ProblemError(f"bad --bounds item {p!r}: write LO:HI, e.g. 0:200") from None
        if not sep:
            raise ProblemError(f"bad --bounds item {p!r}: write LO:HI, e.g. 0:200")
    if dim is not None and dim < 1:
        raise ProblemError(f"--dim must be at least 1, not {dim}")
    if len(pairs) == 1 and dim is None:
        raise ProblemError("one --bounds range needs --dim N (the number of inputs)")
    if len(pairs) == 1:
        pairs *= dim
    elif dim is not None and dim != len(pairs):
        raise ProblemError(f"--dim {dim} but --bounds gives {len(pairs)} ranges")
    lo, hi = np.array(pairs, dtype=float).T
    return lo, hi


def parse_params(items: list[str] | None, known: dict[str, Any], name: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ProblemError(f"bad --param {item!r}: write KEY=VALUE, e.g. -p items=10")
        if key not in known:
            raise ProblemError(f"{name!r} has no parameter {key!r}; it takes {', '.join(known)}")
        try:
            params[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            params[key] = raw
    return params


def run_analysis(
    problem: Problem,
    budget: str,
    workers: int | None,
    seed: int,
    compare: str | None,
    surrogate: bool,
    as_json: bool,
    out: Path | None,
) -> dict[str, Any]:
    """Analyse `problem` (and the baselines in `compare`), print and return the result."""
    from .analyze import analyze
    from .baselines import BASELINES

    seconds = budget_seconds(budget)
    names = [c.strip() for c in (compare or "").split(",") if c.strip()]
    for n in names:
        if n not in BASELINES:
            raise ProblemError(f"unknown baseline {n!r}; choose from {', '.join(BASELINES)}")
        # nevergrad and optuna are optional: say so now, not after the whole analysis
        if n in ("nevergrad", "optuna") and importlib.util.find_spec(n) is None:
            raise ProblemError(
                f"baseline {n!r} needs the {n} package: pip install {n} "
                "(or use random, hill-climbing, annealing)"
            )
    with progress_bar(transient=True) as bar:
        tasks: dict[str, Any] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                label = "exploring code paths" if stage == "paths" else "climbing from seeds"
                tasks[stage] = bar.add_task(label, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        a = analyze(
            problem,
            seconds,
            workers=workers,
            seed=seed,
            surrogate=surrogate,
            on_progress=on_progress,
        )
        baselines = []
        for n in names:
            t = bar.add_task(f"baseline {n}", total=None)
            baselines.append(BASELINES[n](problem, seconds, seed=seed))
            bar.update(t, total=1, completed=1)
    result = a.to_json()
    result["baselines"] = [
        {
            "method": b.method,
            "gap": b.gap,
            "normalized_gap": b.gap / problem.scale,
            "evaluations": b.evaluations,
            "seconds": b.seconds,
        }
        for b in baselines
    ]
    if out is not None:
        write_json(out, result)
    if as_json:
        emit_json(result)
        return result
    _print(a, result)
    if out is not None:
        console.print(f"result: {out}")
    return result


def _print(a: Any, r: dict[str, Any]) -> None:
    p = a.problem
    unit = f" {p.scale_label}" if p.scale != 1 else ""
    rows = [
        ["gap", f"{r['gap']:.6g}"],
        ["normalised gap", f"{100 * r['normalized_gap']:.2f}%{unit}" if p.scale != 1 else "—"],
        ["heuristic / optimum", f"{r['heuristic']:.6g} / {r['optimum']:.6g}"],
        ["found by", r["found_by"]],
        [
            "code paths explored",
            f"{r['paths']['explored']}"
            + (" (all)" if r["paths"]["complete"] else "")
            + f" in {r['paths']['seconds']:.1f} s, {r['paths']['solver_calls']} z3 queries",
        ],
        [
            "seeds climbed",
            f"{sum(1 for s in r['seeds'] if s['gap'] is not None)} of {len(r['seeds'])}",
        ],
        ["evaluations", f"{r['evaluations']}"],
        ["time", f"{r['seconds']:.1f} s of {r['budget_s']:.0f} s, {r['workers']} process(es)"],
    ]
    print_table(f"{p.name}: worst case found", ["", ""], rows, show_header=False)
    top = sorted(r["input"].items(), key=lambda kv: -abs(kv[1]))
    shown = top[:12]
    # A line of its own: as a table title it would wrap to the width of the narrow table.
    more = f" (largest {len(shown)})" if len(top) > len(shown) else ""
    console.print(f"adversarial input: {len(top)} non-zero of {p.dim}{more}", highlight=False)
    print_table(None, ["input", "value"], [[k, f"{v:g}"] for k, v in shown])
    if r["description"]:
        rows = [[k, str(v)] for k, v in r["description"].items()]
        print_table("what it is", ["", ""], rows, show_header=False)
    if r["baselines"]:
        rows = [["metaease", f"{r['gap']:.6g}", f"{r['evaluations']}"]] + [
            [b["method"], f"{b['gap']:.6g}", f"{b['evaluations']}"] for b in r["baselines"]
        ]
        print_table("same budget", ["method", "gap", "evaluations"], rows)
    for n in r["notes"]:
        console.print(f"note: {n}", highlight=False)


@app.command()
def analyze(
    heuristic: Annotated[
        str, typer.Argument(help="MODULE:FUNCTION or FILE.py:FUNCTION (or a @problem object)")
    ],
    opt: Annotated[
        str | None, typer.Option("--opt", help="MODULE:FUNCTION computing the optimum")
    ] = None,
    bounds: Annotated[
        str | None,
        typer.Option(
            "--bounds", help="LO:HI for every input (with --dim) or one per input, comma-separated"
        ),
    ] = None,
    dim: Annotated[int | None, typer.Option("--dim", help="number of inputs")] = None,
    real: Annotated[bool, typer.Option("--real", help="real inputs (default: integers)")] = False,
    sense: Annotated[
        str, typer.Option("--sense", help="max: gap = OPT − H; min: gap = H − OPT")
    ] = "max",
    max_nonzero: Annotated[
        int | None, typer.Option("--max-nonzero", help="at most this many non-zero inputs")
    ] = None,
    scale: Annotated[float, typer.Option("--scale", help="normalise the gap by this")] = 1.0,
    budget: BudgetOpt = "60s",
    workers: WorkersOpt = None,
    seed: SeedOpt = 0,
    compare: CompareOpt = None,
    surrogate: SurrogateOpt = False,
    as_json: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """Find inputs that maximise the gap between HEURISTIC and its optimum."""
    obj = load_object(heuristic, "heuristic")
    if isinstance(obj, Problem):
        given = [
            flag
            for flag, used in [
                ("--opt", opt is not None),
                ("--bounds", bounds is not None),
                ("--dim", dim is not None),
                ("--real", real),
                ("--sense", sense != "max"),
                ("--max-nonzero", max_nonzero is not None),
                ("--scale", scale != 1.0),
            ]
            if used
        ]
        if given:  # the problem object has its own; silently ignoring them would mislead
            raise ProblemError(
                f"{heuristic} is already a problem with its optimum, bounds and options; "
                f"drop {', '.join(given)}"
            )
        problem = obj
    else:
        if opt is None or bounds is None:
            raise ProblemError(
                "a heuristic function needs --opt MODULE:FUNCTION and --bounds LO:HI"
            )
        lo, hi = parse_bounds(bounds, dim)
        problem = Problem(
            heuristic.rpartition(":")[2],
            obj,
            AsOptimum(load_object(opt, "--opt")),
            lo,
            hi,
            integer=not real,
            sense=sense,  # type: ignore[arg-type]
            max_nonzero=max_nonzero,
            scale=scale,
        )
    run_analysis(problem, budget, workers, seed, compare, surrogate, as_json, out)


@app.command()
def builtin(
    name: Annotated[str, typer.Argument(help="dp, pop, ff, ffd, knapsack or matching")],
    topology: Annotated[
        str | None,
        typer.Option(
            "--topology",
            "-t",
            help="WAN for dp/pop: abilene, geant, germany50, uninett2010, tatanld or a topohub key",
        ),
    ] = None,
    param: ParamOpt = None,
    budget: BudgetOpt = "60s",
    workers: WorkersOpt = None,
    seed: SeedOpt = 0,
    compare: CompareOpt = None,
    surrogate: SurrogateOpt = False,
    as_json: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """Analyse a built-in heuristic (see `datahall heuristics list`)."""
    from .builtins import build, parameters

    known = parameters(name)
    params = parse_params(param, known, name)
    if topology is not None:
        if "topology" not in known:
            raise ProblemError(f"{name!r} takes no --topology; only dp and pop do")
        params["topology"] = topology
    run_analysis(build(name, **params), budget, workers, seed, compare, surrogate, as_json, out)


@app.command("list")
def list_cmd(as_json: JsonOpt = False) -> None:
    """The built-in problems and their parameters."""
    from .builtins import BUILTINS, parameters

    rows = [[n, ", ".join(f"{k}={v!r}" for k, v in parameters(n).items())] for n in BUILTINS]
    if as_json:
        emit_json({n: parameters(n) for n in BUILTINS})
        return
    print_table("built-in problems", ["name", "parameters"], rows)


__all__ = ["app", "run_analysis", "load_object", "parse_bounds", "budget_seconds"]
