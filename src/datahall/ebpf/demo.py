"""The tour's eBPF demo: tenants' programs checked against the operator's policies before load.

Seven programs we wrote (``datahall.ebpf.programs``) meet the policies that ship with datahall:
four keep their policy, three do not (a tenant rewriting a header byte it may only read, a load
balancer that rewrites and redirects on a read-only tenant slot, and a kprobe writing user
memory). The baseline is the access model KrakenGuard replaces: a process holding CAP_BPF may
load any program the kernel verifier accepts, and all seven are memory-safe, so it admits them
all. Where the kernel allows (root), each program also goes through the real verifier and each
counterexample is replayed with BPF_PROG_TEST_RUN.
"""

from __future__ import annotations

from pathlib import Path

from rich.progress import Progress

from ..core.report import DemoResult, new_figure, save_figure, write_json
from . import fixtures
from .checker import Report, Violation, check, describe_packet, interfere
from .loader import load
from .policy import Policy, resolve_policy
from .replay import replay_report

CASES = [  # (program, policy, what the operator expects)
    ("rewriter", "ttl-rewriter", "COMPLIANT"),
    ("firewall", "tenant-xdp", "COMPLIANT"),
    ("interfere_b", "tenant-xdp", "COMPLIANT"),
    ("retina_observer", "no-kernel-writes", "COMPLIANT"),
    ("interfere_a", "tenant-xdp", "VIOLATION"),
    ("l4lb", "tenant-xdp", "VIOLATION"),
    ("malicious", "no-kernel-writes", "VIOLATION"),
]
SHOWN = "interfere_a"  # the violation whose counterexample the figure draws


def draw_counterexample(v: Violation, policy: Policy, path: Path) -> Path:
    """The counterexample packet byte by byte: the bytes the policy lets the tenant read and
    write on that path, and the byte the program writes against the policy."""
    pkt = v.counterexample.packet
    n = len(pkt)
    fig, ax = new_figure(8, 2.6)
    for i in range(n):
        read = policy.packet_allowed("read", i, i)
        write = policy.packet_allowed("write", i, i)
        colour = "#4caf50" if write else ("#90caf9" if read else "#eeeeee")
        ax.bar(i, 1, width=0.9, color=colour, edgecolor="white")
        ax.text(i, 0.5, f"{pkt[i]:02x}", ha="center", va="center", fontsize=6, rotation=90)
    lo, hi = v.expect.get("packet_write") or (0, -1)
    for i in range(lo, hi + 1):
        ax.bar(i, 1, width=0.9, color="none", edgecolor="#d32f2f", linewidth=2)
    ax.bar(0, 0, color="#90caf9", label="policy: may read")
    ax.bar(0, 0, color="#4caf50", label="policy: may write")
    ax.bar(0, 0, color="none", edgecolor="#d32f2f", label="written by the program")
    ax.set_yticks([])
    ax.set_ylim(0, 1.45)
    ax.set_xlim(-1, n)
    ax.set_xlabel("packet byte offset")
    ax.set_title(f"counterexample: {describe_packet(pkt)} — {v.source}", fontsize=8)
    ax.legend(loc="upper right", fontsize=7, ncols=3, framealpha=0.8)
    return save_figure(fig, path)


def _kernel_accepts(obj, report: Report) -> bool | None:
    """Whether the kernel verifier loads every program of the object; None without bpf()."""
    from . import kernel

    if kernel.available() is not None:
        return None
    for prog in report.programs:
        try:
            kernel.load(obj, prog.section).close()
        except kernel.KernelError:
            return False
    return True


def run(out_dir: Path, progress: Progress) -> DemoResult:
    built = fixtures.build()
    task = progress.add_task("ebpf: checking tenants' programs", total=len(CASES) + 1)
    rows, correct, shown = [], 0, None
    for name, policy_name, expected in CASES:
        obj = load(built[name])
        policy = resolve_policy(policy_name)
        report = check(obj, policy, time_budget_s=30)
        correct += report.verdict == expected
        row = {
            "program": name,
            "policy": policy_name,
            "expected": expected,
            "verdict": report.verdict,
            "paths": sum(p.paths for p in report.programs),
            "seconds": round(sum(p.seconds for p in report.programs), 3),
            "violations": [v.to_json() for v in report.violations],
            "kernel_verifier_accepts": _kernel_accepts(obj, report),
        }
        if report.violations:
            row["replay"] = _replay(obj, report)
        rows.append(row)
        if name == SHOWN and report.violations and report.violations[0].counterexample:
            shown = (report.violations[0], policy, row)
        progress.advance(task)
    chained = interfere(load(built["interfere_a"]), load(built["interfere_b"]))
    progress.advance(task)
    figures = []
    what_shown = ""
    if shown is not None:
        v, policy, row = shown
        figures.append(draw_counterexample(v, policy, out_dir / "counterexample.png"))
        replay = row.get("replay", [{}])[0] if row.get("replay") else {}
        what_shown = (
            f"; e.g. tenant A: {v.message} at {v.source} on {describe_packet(v.counterexample.packet)}"
            + (f" (kernel replay: {replay['status']})" if replay else "")
        )
    compliant = sum(expected == "COMPLIANT" for _, _, expected in CASES)
    details = {
        "programs": rows,
        "interference": chained.to_json(),
        "baseline": "CAP_BPF: every program the verifier accepts loads",
    }
    write_json(out_dir / "results.json", details)
    return DemoResult(
        system="ebpf",
        what=(
            f"{len(CASES)} tenant eBPF programs checked path by path against shipped policies "
            f"({sum(r['paths'] for r in rows)} paths, {sum(r['seconds'] for r in rows):.1f} s): "
            + ", ".join(f"{r['program']} {r['verdict']}" for r in rows)
            + what_shown
            + f"; tenant A before tenant B: {chained.verdict} ({len(chained.conflicts)} conflicts)"
        ),
        headline="admission decisions the operator intended, %",
        value=100 * correct / len(CASES),
        baseline="CAP_BPF alone (admits every verified program)",
        baseline_value=100 * compliant / len(CASES),
        unit="%",
        figures=figures,
        details=details,
    )


def _replay(obj, report: Report) -> list[dict]:
    """Kernel replays of the report's counterexamples (each says why where it cannot run)."""
    return [r.to_json() for r in replay_report(obj, report)]
