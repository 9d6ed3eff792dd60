"""``datahall ebpf``: KrakenGuard's load-time policy checks for eBPF objects.

- ``disasm PROG.o``: the bytecode in llvm-objdump's syntax, with source lines and relocations.
- ``check PROG.o --policy P.yaml``: every path of every program against the policy; exit code
  0 COMPLIANT, 1 VIOLATION (with counterexamples), 3 UNKNOWN (fail-closed), 2 bad input.
  ``--replay`` runs each counterexample in the kernel with BPF_PROG_TEST_RUN where allowed.
- ``interfere A.o B.o``: whether A, run before B on one hook, changes what B sees or does.
- ``policy P.yaml``: validate a policy (ours or KrakenGuard's JSON) and print it in our form.
- ``serve --socket PATH --policy P.yaml``: the admission broker on a Unix socket.

``--policy`` takes a file or the name of a shipped policy (``tenant-xdp``, ``ttl-rewriter``,
``no-kernel-writes``). ``--json`` prints the result as JSON; ``--out FILE`` also writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from ..core.cli import emit_json
from ..core.report import console, err_console, print_table, progress_bar, write_json
from ..core.units import parse_budget
from . import isa
from .checker import Report, check, describe_packet, entry_sections, interfere
from .loader import BpfObject, load
from .policy import Policy, resolve_policy

app = typer.Typer(
    help="KrakenGuard: check eBPF programs against an operator's policy before they load.",
    no_args_is_help=True,
)

ObjectArg = Annotated[Path, typer.Argument(help="an eBPF ELF object (.o)")]
SectionOpt = Annotated[
    str | None, typer.Option("--section", "-s", help="only this program section")
]
PolicyOpt = Annotated[
    str | None,
    typer.Option("--policy", "-p", help="policy file (YAML/JSON) or a shipped policy's name"),
]
BudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--budget",
        help="time budget per program, e.g. 60s (UNKNOWN past it); default: the "
        "policy's budget.time_s, else 60s",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON")]
OutOpt = Annotated[
    Path | None, typer.Option("--out", help="also write the result to this JSON file")
]


def _object(path: Path) -> BpfObject:
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    return load(path)


@app.command()
def disasm(obj_path: ObjectArg, section: SectionOpt = None, as_json: JsonOpt = False) -> None:
    """Print the bytecode of each program section, with source lines and relocations."""
    obj = _object(obj_path)
    sections = [section] if section else list(obj.programs)
    if section and section not in obj.programs:
        raise ValueError(f"{obj_path}: no section {section!r}; it has {', '.join(obj.programs)}")
    out: list[dict[str, Any]] = []
    for sec in sections:
        prog = obj.programs[sec]
        rows = []
        pc, last_line = 0, None
        for ins in isa.decode(prog.insns):
            rec = prog.line_at(pc * 8)
            line = f"{Path(rec.file).name}:{rec.line}: {rec.text.strip()}" if rec else None
            reloc = prog.relocation_at(pc * 8)
            rows.append(
                {
                    "pc": pc,
                    "text": isa.disassemble(ins, pc),
                    "reloc": f"{reloc.kind} {reloc.target}" if reloc else None,
                    "line": line if line != last_line else None,
                }
            )
            last_line = line or last_line
            pc += ins.size
        out.append({"section": sec, "name": prog.name, "type": prog.type, "insns": rows})
    if as_json:
        emit_json(out)
        return
    for entry in out:
        console.print(f"[bold]{entry['section']}[/] <{entry['name']}> ({entry['type']})")
        for r in entry["insns"]:
            if r["line"]:
                console.print(f"  [dim]; {r['line']}[/]", highlight=False)
            reloc = f"  [cyan]# {r['reloc']}[/]" if r["reloc"] else ""
            console.print(f"  {r['pc']:5d}: {r['text']}{reloc}", highlight=False)


def _print_report(report: Report, replays: dict[int, Any]) -> None:
    print_table(
        f"{report.object}",
        ["section", "program", "type", "verdict", "paths", "insns", "time (s)"],
        [
            [p.section, p.name, p.type, p.verdict, f"{p.complete_paths}/{p.paths}", p.insns,
             round(p.seconds, 3)]
            for p in report.programs
        ],
    )  # fmt: skip
    for prog in report.programs:
        for reason in prog.unknown:
            console.print(f"[yellow]UNKNOWN[/] {prog.section}: {reason}", highlight=False)
        for v in prog.violations:
            where = f"{v.section} insn {v.insn}" if v.insn is not None else v.section
            console.print(
                f"[red]VIOLATION[/] \\[{v.rule}] {where}: {escape(v.message)}",
                highlight=False,
                soft_wrap=True,
            )
            if v.source:
                console.print(f"  at {escape(v.source)}", highlight=False, soft_wrap=True)
            if v.paths > 1:
                console.print(f"  on {v.paths} paths", highlight=False)
            cex = v.counterexample
            if cex is not None:
                if cex.packet:
                    console.print(f"  packet: {describe_packet(cex.packet)}", highlight=False)
                    console.print(f"    {cex.packet.hex()}", highlight=False, soft_wrap=True)
                shown = {**{f"ctx.{k}": v for k, v in cex.ctx.items()}, **cex.helpers}
                if shown:
                    text = ", ".join(f"{k}={v}" for k, v in shown.items())
                    console.print(f"  with: {text}", highlight=False)
                for m, entries in cex.maps.items():
                    for k, val in entries.items():
                        console.print(
                            escape(f"  map {m}[{k.hex()}] = {val.hex()}"), highlight=False
                        )
            if id(v) in replays:
                r = replays[id(v)]
                console.print(f"  kernel replay: {r.status}: {r.reason}", highlight=False)
    colour = {"COMPLIANT": "green", "VIOLATION": "red", "UNKNOWN": "yellow"}[report.verdict]
    console.print(f"verdict: [{colour}]{report.verdict}[/] (exit {report.exit_code})")


@app.command("check")
def check_cmd(
    obj_path: ObjectArg,
    policy: PolicyOpt = None,
    section: SectionOpt = None,
    budget: BudgetOpt = None,
    replay: Annotated[
        bool, typer.Option("--replay", help="replay counterexamples in the kernel (root)")
    ] = False,
    as_json: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """Check every path of every program against a policy (exit 0 / 1 / 3)."""
    obj = _object(obj_path)
    pol = resolve_policy(policy) if policy else Policy()
    seconds = parse_budget(budget) if budget else pol.budget.time_s or 60.0
    sections = entry_sections(obj, pol, section)
    programs = []
    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"checking {obj_path.name}", total=len(sections))
        for sec in sections:
            bar.update(task, description=f"checking {obj_path.name} {sec}")
            programs += check(obj, pol, section=sec, time_budget_s=seconds).programs
            bar.advance(task)
    report = Report(str(obj_path), programs)
    replays: dict[int, Any] = {}
    if replay and report.violations:
        from .replay import replay_report

        for r in replay_report(obj, report):
            replays[id(r.violation)] = r
    data = report.to_json()
    if replays:
        for prog_json, prog in zip(data["programs"], report.programs, strict=True):
            for v_json, v in zip(prog_json["violations"], prog.violations, strict=True):
                if id(v) in replays:
                    v_json["replay"] = replays[id(v)].to_json()
    if out:
        write_json(out, data)
    if as_json:
        emit_json(data)
    else:
        _print_report(report, replays)
    raise typer.Exit(report.exit_code)


@app.command("interfere")
def interfere_cmd(
    first: Annotated[Path, typer.Argument(help="the program that runs first (.o)")],
    second: Annotated[Path, typer.Argument(help="the program that runs after it (.o)")],
    first_section: Annotated[
        str | None, typer.Option("--first-section", help="program section of FIRST")
    ] = None,
    second_section: Annotated[
        str | None, typer.Option("--second-section", help="program section of SECOND")
    ] = None,
    budget: BudgetOpt = None,
    as_json: JsonOpt = False,
    out: OutOpt = None,
) -> None:
    """Whether FIRST, chained before SECOND on one hook, interferes with it (exit 0 / 1 / 3)."""
    a, b = _object(first), _object(second)
    with progress_bar(transient=True) as bar:
        bar.add_task(f"comparing {first.name} and {second.name}", total=None)
        result = interfere(
            a,
            b,
            first_section=first_section,
            second_section=second_section,
            time_budget_s=parse_budget(budget) if budget else 60.0,
        )
    data = result.to_json()
    if out:
        write_json(out, data)
    if as_json:
        emit_json(data)
    else:
        for c in result.conflicts:
            console.print(f"[red]{c.kind}[/]: {c.message}", highlight=False)
        for u in result.unknown:
            console.print(f"[yellow]UNKNOWN[/] {u}", highlight=False)
        colour = {"INDEPENDENT": "green", "INTERFERE": "red", "UNKNOWN": "yellow"}[result.verdict]
        console.print(f"verdict: [{colour}]{result.verdict}[/] (exit {result.exit_code})")
    raise typer.Exit(result.exit_code)


@app.command("policy")
def policy_cmd(
    spec: Annotated[str, typer.Argument(help="policy file (ours or KrakenGuard's JSON) or name")],
    as_json: JsonOpt = False,
) -> None:
    """Validate a policy and print it in our YAML form (an imported one converted)."""
    pol = resolve_policy(spec)
    if as_json:
        emit_json(pol.model_dump(mode="json", by_alias=True, exclude_defaults=True))
    else:
        console.print(pol.to_yaml(), end="", highlight=False)
        err_console.print(f"{spec}: valid")


@app.command("serve")
def serve_cmd(
    socket_path: Annotated[Path, typer.Option("--socket", help="Unix socket to listen on")],
    policy: Annotated[
        str, typer.Option("--policy", "-p", help="the operator's policy (file or shipped name)")
    ],
    audit_log: Annotated[
        Path, typer.Option("--audit-log", help="JSON Lines audit file, one line per request")
    ] = Path("kguard-audit.jsonl"),
    allow_load: Annotated[
        bool, typer.Option("--allow-load", help="load COMPLIANT objects on request (needs bpf())")
    ] = False,
    pin_dir: Annotated[
        Path | None, typer.Option("--pin-dir", help="pin loaded programs under this bpffs folder")
    ] = None,
    budget: BudgetOpt = None,
    client_policies: Annotated[
        bool, typer.Option("--client-policies", help="let clients send their own policy")
    ] = False,
) -> None:
    """Run the admission broker: verify (and load) objects sent over a Unix socket."""
    from .broker import Broker

    broker = Broker(
        socket_path,
        resolve_policy(policy),
        audit_log,
        allow_load=allow_load,
        pin_dir=pin_dir,
        time_budget_s=parse_budget(budget) if budget else 60.0,
        client_policies=client_policies,
    )
    broker.start()
    loads = "loads COMPLIANT objects" if allow_load else "verification only"
    err_console.print(f"kguard broker on {socket_path} ({loads}); audit log {audit_log}")
    try:
        broker.serve_forever()
    except KeyboardInterrupt:
        broker.stop()
