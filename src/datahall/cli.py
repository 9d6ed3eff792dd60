"""The ``datahall`` command: the system table, the tour, topologies, and each ready system's CLI.

Bad input anywhere ends with one line on stderr saying what is wrong and how to fix it, and exit
code 2; ``--debug`` (first on the command line) shows the traceback instead.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from . import systems
from .core.cli import app as topology_app
from .core.cli import emit_json
from .core.report import (
    SUMMARY_COLUMNS,
    console,
    err_console,
    print_table,
    progress_bar,
    summary_rows,
    write_report,
)

app = typer.Typer(
    help="datahall: open implementations of the systems that run an AI datacenter.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(topology_app, name="topology")
for _system in systems.ready():
    app.add_typer(_system.load_cli(), name=_system.name, help=f"{_system.title}: {_system.summary}")


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks on errors")] = False,
) -> None:
    """datahall: open implementations of the systems that run an AI datacenter."""


@app.command("systems")
def systems_cmd(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List every system with its paper, status and command."""
    rows = [[s.title, s.package, s.paper, s.status, s.command] for s in systems.SYSTEMS]
    if as_json:
        emit_json(
            [
                dict(zip(["title", "package", "paper", "status", "command"], r, strict=True))
                for r in rows
            ]
        )
        return
    print_table("datahall systems", ["system", "package", "paper", "status", "command"], rows)


@app.command()
def tour(
    only: Annotated[
        list[str] | None, typer.Option("--only", help="run only this system (repeatable)")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="report folder")] = Path("report"),
    as_json: Annotated[bool, typer.Option("--json", help="print results as JSON")] = False,
) -> None:
    """Run the demo of every ready system on built-in data; write OUT/index.html and results.json."""
    chosen = [systems.get(n) for n in only] if only else systems.ready()
    for s in chosen:
        if s.status != "ready":
            raise ValueError(
                f"{s.name} is {s.status}, not ready; `datahall systems` lists the ready ones"
            )
    results = []
    with progress_bar(transient=as_json) as progress:
        for s in chosen:
            start = time.perf_counter()
            result = s.run_demo(out / s.name, progress)
            result.details.setdefault("seconds", round(time.perf_counter() - start, 2))
            results.append(result)
    index = write_report(out, results)
    if as_json:
        emit_json({"results": results, "report": index})
        return
    if not results:
        console.print("No system is ready yet: `datahall systems` shows what is planned.")
    else:
        print_table("datahall tour", SUMMARY_COLUMNS, summary_rows(results))
    console.print(f"report: {index} (results: {out / 'results.json'})")


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning bad input into one line and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        # Outside standalone mode click returns the code of a `typer.Exit` instead of exiting.
        code = app(args=args, prog_name="datahall", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted")
    except (ValueError, LookupError, OSError) as e:
        if debug:
            raise
        _fail(str(e) or f"{type(e).__name__} (run with --debug for the traceback)")
    except Exception as e:
        # Typer's usage errors (unknown command, bad option) carry format_message(); they are
        # bad input too. Anything else is a bug and keeps its traceback.
        if debug or not hasattr(e, "format_message"):
            raise
        ctx = getattr(e, "ctx", None)
        hint = f"; see `{ctx.command_path} --help`" if ctx else ""
        _fail(f"{e.format_message().rstrip('.')}{hint}")
