"""Our eBPF fixtures checked against their policies (issue 8 goals: every fixture in under 5 s;
every violating fixture's counterexamples confirmed by kernel replay where the kernel allows).

Each program of the tour's cases (``datahall.ebpf.demo.CASES``) is checked against its shipped
policy, best of three. The baseline in the same run is the kernel verifier loading the same
program through ``bpf(BPF_PROG_LOAD)`` (root only): the safety check every program passes anyway,
and the load-time cost KrakenGuard adds to.
"""

from __future__ import annotations

import time

from datahall.ebpf import fixtures, kernel
from datahall.ebpf.checker import check
from datahall.ebpf.demo import CASES
from datahall.ebpf.loader import load
from datahall.ebpf.policy import resolve_policy
from datahall.ebpf.replay import replay_report

from ..goals import Goal, best_time, report

GOAL_S = 5.0


def _verifier_s(obj, sections: list[str]) -> float | None:
    if kernel.available() is not None:
        return None
    try:
        start = time.perf_counter()
        for sec in sections:
            kernel.load(obj, sec).close()
        return time.perf_counter() - start
    except kernel.KernelError:
        return None


def main() -> None:
    built = fixtures.build()
    goals, rows = [], []
    replays: dict[str, list[dict]] = {}
    for name, policy_name, expected in CASES:
        obj, policy = load(built[name]), resolve_policy(policy_name)
        seconds, rep = best_time(lambda obj=obj, policy=policy: check(obj, policy))
        sections = [p.section for p in rep.programs]
        verifier = _verifier_s(obj, sections)
        goals.append(
            Goal(
                f"check {name} against {policy_name} ({rep.verdict})",
                f"< {GOAL_S:g} s",
                seconds,
                "s",
                seconds < GOAL_S and rep.verdict == expected,
                baseline=verifier,
                extra={"paths": sum(p.paths for p in rep.programs), "expected": expected},
            )
        )
        rows.append({"program": name, "policy": policy_name, "verdict": rep.verdict,
                     "seconds": seconds, "kernel_verifier_s": verifier})  # fmt: skip
        if rep.violations:
            replays[name] = [r.to_json() for r in replay_report(obj, rep)]
    confirmed = {n: sum(r["status"] == "confirmed" for r in rs) for n, rs in replays.items()}
    replayable = {n: sum(r["status"] != "not_replayable" for r in rs) for n, rs in replays.items()}
    why = kernel.available()
    goals.append(
        Goal(
            "violating fixtures with a counterexample confirmed by kernel replay",
            "every one the kernel can run",
            sum(1 for n in replays if confirmed[n]),
            "fixtures",
            all(confirmed[n] or not replayable[n] for n in replays) and why is None,
            extra={
                "confirmed": confirmed,
                "replayable": replayable,
                "kernel": why or "bpf() available",
            },
        )
    )
    report("ebpf", "fixtures", goals, {"programs": rows, "replays": replays})


if __name__ == "__main__":
    main()
