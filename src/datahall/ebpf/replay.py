"""Replay of checker counterexamples with ``BPF_PROG_TEST_RUN`` (KrakenGuard brief §2.4 item 7).

The brief's §2.5 asks that "every VIOLATION carries a counterexample that, replayed with
BPF_PROG_TEST_RUN where available, exhibits the violation (return code, written bytes, helper
called)". :func:`replay` loads the violating program with the counterexample's map entries and
global bytes, runs it once on the counterexample's packet and says whether the run shows what
the violation's ``expect`` predicts. A violation is only ever marked ``confirmed`` on an
observation: the return value, a changed packet byte, or a changed map entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from datahall.ebpf import kernel
from datahall.ebpf.checker import Report, Violation
from datahall.ebpf.loader import BpfObject

#: Program types whose test run takes a packet (brief: xdp, sched_cls/sched_act, socket_filter).
RUNNABLE_TYPES = ("xdp", "sched_cls", "sched_act", "socket_filter")

#: The kernel refuses packet test runs shorter than an Ethernet header (``ETH_HLEN``).
ETH_HLEN = 14

#: Helpers whose results a test run cannot set (the kernel decides them).
_UNCONTROLLED = ("ktime_get", "get_prandom", "jiffies", "get_current_", "get_smp_processor")


@dataclass
class Replay:
    """The outcome of replaying one violation's counterexample.

    Attributes
    ----------
    violation : Violation
        The violation replayed.
    status : str
        ``"confirmed"`` (the run showed the violation), ``"not_confirmed"`` (it ran and did not)
        or ``"not_replayable"`` (no run, or nothing a run can observe).
    reason : str
        One line: what was observed, or why the counterexample cannot be replayed.
    retval : int or None
        The program's return value, when it ran.
    data_out : bytes or None
        The packet as the program left it, when it ran.
    changed : list of int
        Packet byte offsets whose value the run changed.
    """

    violation: Violation
    status: str
    reason: str
    retval: int | None = None
    data_out: bytes | None = None
    changed: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: the violation's rule, section, insn and expectation, and the result."""
        v = self.violation
        return {
            "rule": v.rule,
            "section": v.section,
            "insn": v.insn,
            "expect": v.expect,
            "status": self.status,
            "reason": self.reason,
            "retval": self.retval,
            "data_out": self.data_out.hex() if self.data_out is not None else None,
            "changed": self.changed,
        }


def _kind(expect: dict[str, Any]) -> str:
    """The violation's kind from its ``expect`` (``return``, ``packet_write``, ``map``, ...)."""
    return next(iter(expect), "flow/ctx")


def _data_sections(obj: BpfObject, globals_: dict[str, int]) -> dict[str, bytes]:
    """Global data section bytes with the counterexample's ``'.data+off' -> byte`` patched in."""
    patched: dict[str, bytearray] = {}
    for name, byte in globals_.items():
        sec, _, off = name.rpartition("+")
        if sec not in obj.data:
            continue
        buf = patched.setdefault(sec, bytearray(obj.data[sec]))
        if 0 <= int(off) < len(buf):
            buf[int(off)] = int(byte) & 0xFF
    return {sec: bytes(buf) for sec, buf in patched.items()}


def _uncontrolled(helpers: dict[str, Any]) -> list[str]:
    """Helper calls (``name@pc``) of the counterexample whose results the kernel decides."""
    return [h for h in helpers if any(h.startswith(p) for p in _UNCONTROLLED)]


def replay(obj: BpfObject, violation: Violation, *, section: str | None = None) -> Replay:
    """Replay ``violation``'s counterexample on the kernel and check its expectation.

    Parameters
    ----------
    obj : BpfObject
        The object the checker checked.
    violation : Violation
        A violation from :func:`datahall.ebpf.checker.check` on ``obj``.
    section : str, optional
        The program section to run; defaults to ``violation.section``.

    Returns
    -------
    Replay
        ``confirmed`` only when the run showed the expectation: ``return`` (retval equal),
        ``packet_write [lo, hi]`` (a byte in lo..hi changed) or a map ``write`` (the map's
        contents changed). ``packet_read``, ``helper``, flow and ctx violations leave no trace
        a test run can observe and are ``not_replayable``, as are program types without test
        runs, missing counterexamples, packets shorter than ``ETH_HLEN`` and kernel refusals.

    Notes
    -----
    Brief §2.4 item 7 (optional ``BPF_PROG_TEST_RUN`` replay) and §2.5 (counterexamples that,
    replayed, exhibit the violation).
    """
    section = section or violation.section
    expect = violation.expect
    kind = _kind(expect)

    def no(reason: str) -> Replay:
        return Replay(violation, "not_replayable", reason)

    why = kernel.available()
    if why is not None:
        return no(why)
    prog = obj.programs.get(section)
    if prog is None:
        return no(f"the object has no program section {section!r}")
    if prog.type not in RUNNABLE_TYPES:
        return no(
            f"{prog.type} programs have no BPF_PROG_TEST_RUN "
            f"(only {', '.join(RUNNABLE_TYPES)} are run)"
        )
    cex = violation.counterexample
    if cex is None:
        return no("the violation has no counterexample")
    if kind not in ("return", "packet_write", "map") or (
        kind == "map" and expect.get("access") != "write"
    ):
        return no(f"a {kind} violation leaves no trace a test run can observe")
    if len(cex.packet) < ETH_HLEN:
        return no(
            f"the counterexample packet has {len(cex.packet)} bytes; the kernel refuses "
            f"{prog.type} test runs shorter than ETH_HLEN={ETH_HLEN}"
        )
    try:
        with kernel.load(
            obj, section, maps=cex.maps, data=_data_sections(obj, cex.globals), log_level=0
        ) as loaded:
            map_name = expect.get("map") if kind == "map" else None
            before = loaded.map_items(map_name) if map_name else {}
            run = kernel.test_run(loaded, cex.packet)
            after = loaded.map_items(map_name) if map_name else {}
    except kernel.KernelError as exc:
        return no(f"the kernel refused: {str(exc).splitlines()[0] if str(exc) else exc!r}")
    except KeyError as exc:
        return no(f"cannot observe the map: {exc}")

    out = run.data_out
    changed = [i for i in range(min(len(out), len(cex.packet))) if out[i] != cex.packet[i]]
    result = Replay(violation, "not_confirmed", "", run.retval, out, changed)
    if kind == "return":
        want = int(expect["return"])
        if (run.retval - want) % (1 << 32) == 0:
            result.status, result.reason = "confirmed", f"returned {run.retval}"
        else:
            result.reason = f"returned {run.retval}, not {want}"
    elif kind == "packet_write":
        lo, hi = expect["packet_write"]
        hits = [i for i in changed if lo <= i <= hi]
        if hits:
            shown = ", ".join(f"{i}: {cex.packet[i]:#04x}->{out[i]:#04x}" for i in hits)
            result.status, result.reason = "confirmed", f"packet bytes changed ({shown})"
        else:
            result.reason = f"no byte in {lo}..{hi} changed (changed: {changed})"
    else:
        diff = sorted(k.hex() for k in set(before) | set(after) if before.get(k) != after.get(k))
        if diff:
            result.status = "confirmed"
            result.reason = f"map {map_name} changed at key(s) {', '.join(diff)}"
        else:
            result.reason = f"map {map_name} unchanged"
    if result.status == "not_confirmed":
        hidden = _uncontrolled(cex.helpers)
        if hidden:
            result.status = "not_replayable"
            result.reason += (
                f"; the path depends on helper results the kernel decides ({', '.join(hidden)})"
            )
    return result


def replay_report(obj: BpfObject, report: Report) -> list[Replay]:
    """Replay every violation of ``report`` that has a counterexample (brief §2.5).

    Parameters
    ----------
    obj : BpfObject
        The object ``report`` is about.
    report : Report
        From :func:`datahall.ebpf.checker.check`.

    Returns
    -------
    list of Replay
        One per violation with a counterexample, in report order.
    """
    return [replay(obj, v) for v in report.violations if v.counterexample is not None]
