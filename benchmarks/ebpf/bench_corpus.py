"""The real-world XDP objects Debian's libxdp1 ships, as a corpus no one here wrote (issue 8
goals: every object loads, decodes as llvm-objdump does, and is analysed to a verdict with no
crash; UNKNOWN rate, time and paths per program reported; the largest in under 60 s).

Each program is checked with no policy (only what every policy demands: packet accesses proved
in bounds, helpers with a model) under a 55 s budget and no path limit, so a program that does not finish still
gets its UNKNOWN verdict inside the 60 s goal. The baseline in the same run is the kernel
verifier loading the program (root only).
"""

from __future__ import annotations

import time

from datahall.ebpf import fixtures, isa, kernel
from datahall.ebpf.checker import check
from datahall.ebpf.loader import load

from ..goals import Goal, report

BUDGET_S = 55.0
GOAL_S = 60.0


def _decoder_agreement(path) -> tuple[int, int]:
    """(instructions our disassembler prints as llvm-objdump does, instructions)."""
    ref = fixtures.llvm_objdump(path)
    obj = load(path)
    agree = total = 0
    for sec, prog in obj.programs.items():
        insns = isa.decode(prog.insns)
        assert isa.encode(insns) == prog.insns
        for pc, ins in zip(isa.program_counters(insns), insns, strict=True):
            total += 1
            agree += fixtures.normalise(isa.disassemble(ins)) == ref[sec][pc]
    return agree, total


def _verifier_s(obj, sec: str) -> float | None:
    if kernel.available() is not None:
        return None
    start = time.perf_counter()
    try:
        kernel.load(obj, sec).close()
    except kernel.KernelError:
        return None
    return time.perf_counter() - start


def main() -> None:
    paths = fixtures.libxdp_objects()
    rows, crashes = [], []
    agree = total = 0
    for path in paths:
        a, t = _decoder_agreement(path)
        agree, total = agree + a, total + t
        obj = load(path)
        for sec, prog in obj.programs.items():
            if prog.type == "subprog":
                continue
            start = time.perf_counter()
            try:
                p = check(obj, section=sec, time_budget_s=BUDGET_S, max_paths=10**6).programs[0]
            except Exception as e:  # noqa: BLE001 - a crash is what this benchmark counts
                crashes.append(f"{path.name}:{sec}: {type(e).__name__}: {e}")
                continue
            seconds = time.perf_counter() - start
            rows.append({
                "object": path.name, "section": sec, "insns": prog.n_insns,
                "verdict": p.verdict, "paths": p.paths, "complete_paths": p.complete_paths,
                "seconds": round(seconds, 3), "unknown": p.unknown[:1],
                "violations": [v.message for v in p.violations],
                "kernel_verifier_s": _verifier_s(obj, sec),
            })  # fmt: skip
            print(f"   {path.name}:{sec}: {p.verdict} ({p.paths} paths, {seconds:.1f} s)")
    unknown = [r for r in rows if r["verdict"] == "UNKNOWN"]
    largest = max(rows, key=lambda r: r["insns"])
    goals = [
        Goal(
            f"libxdp1 objects loaded and analysed to a verdict ({len(paths)} objects)",
            "every program, no crash",
            len(rows),
            "programs",
            not crashes and len(rows) > 0,
            extra={"crashes": crashes},
        ),
        Goal(
            "UNKNOWN rate (budget ran out; fail-closed)",
            "(reported)",
            100 * len(unknown) / len(rows),
            "%",
            True,
            extra={"unknown": [f"{r['object']}:{r['section']}" for r in unknown]},
        ),
        Goal(
            f"largest program ({largest['object']}, {largest['insns']} insns) to a verdict",
            f"< {GOAL_S:g} s",
            largest["seconds"],
            "s",
            largest["seconds"] < GOAL_S,
            baseline=largest["kernel_verifier_s"],
            extra={"verdict": largest["verdict"], "paths": largest["paths"]},
        ),
        Goal(
            "decoder agrees with llvm-objdump on every corpus instruction",
            f"{total} of {total}",
            agree,
            "insns",
            agree == total,
        ),
    ]
    report("ebpf", "corpus", goals, {"programs": rows})


if __name__ == "__main__":
    main()
