"""Load-time policy verdicts for eBPF objects, and interference between chained programs.

KrakenGuard (NSDI '26; brief §2.4 items 5-6) admits an untrusted eBPF object only when *every*
path of every program obeys the operator's policy. :func:`check` explores each program with
:func:`datahall.ebpf.engine.explore` and checks each path's records against a
:class:`~datahall.ebpf.policy.Policy`:

- every helper call against ``helpers`` and the ``rules`` fired earlier on the path; a helper
  the engine has no model of is denied unless ``helpers.allow`` names it (default deny);
- every map use against ``maps`` (lookups and value loads read, updates, value stores and ring
  buffer / perf output write, deletes delete);
- every packet load and store: it must be proved in bounds by the path's ``data_end`` checks,
  and its bytes must lie in a window of a ``packet`` entry whose ``when`` the path proves;
- every ctx field load and store against ``ctx``;
- every return value against ``returns`` and the fired ``rules`` (symbolic values by z3);
- every explicit data flow into a sink (map, ring buffer, perf buffer, packet, user memory, the
  return value) against ``flow.deny`` (our extension; implicit flows through branches are not
  tracked).

The verdict is VIOLATION when a path breaks a rule, with a concrete counterexample from the z3
model; UNKNOWN when no rule is broken but some path was cut short (a budget ran out, or the
engine met something it does not model), which is *fail-closed*: it must not be loaded; and
COMPLIANT only when every path was explored and obeys the policy.

:func:`interfere` compares two programs chained on one hook (the first runs first, as in a
libxdp dispatcher): the first's packet or ctx writes that the second reads, verdicts of the
first that pre-empt the second, and maps both use where one writes.

``when`` conditions read the packet as Ethernet, then IPv4 (ports at 14 + 4·IHL) or IPv6 (no
extension headers); a condition the path does not prove does not apply.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import z3

from datahall.ebpf.engine import Exploration, PacketAccess, PathResult, explore, link
from datahall.ebpf.isa import DecodeError
from datahall.ebpf.loader import BpfObject, load
from datahall.ebpf.policy import RETURN_CODES, PacketWhen, Policy

__all__ = [
    "check",
    "interfere",
    "Report",
    "ProgramReport",
    "Violation",
    "Counterexample",
    "Interference",
    "Conflict",
    "CheckError",
    "EXIT_CODES",
    "describe_packet",
    "verdict_value",
    "entry_sections",
]

EXIT_CODES = {"COMPLIANT": 0, "VIOLATION": 1, "UNKNOWN": 3, "INDEPENDENT": 0, "INTERFERE": 1}
"""Process exit code per verdict (2 is bad input)."""

_MAP_KIND = {
    "read": "read",
    "value_read": "read",
    "write": "write",
    "value_write": "write",
    "output": "write",
    "delete": "delete",
}
_UNNAMED = 0x7EADBEEF  # a return value no policy names
_MODEL_TIMEOUT_MS = 5000  # per attempt at a counterexample
_LAYOUT_HELPERS = {"xdp_adjust_head", "xdp_adjust_meta", "xdp_adjust_tail", "skb_pull_data",
                   "skb_change_head", "skb_change_tail", "skb_adjust_room"}  # fmt: skip
_PREEMPTING = {
    "xdp": {0: "XDP_ABORTED", 1: "XDP_DROP", 3: "XDP_TX", 4: "XDP_REDIRECT"},
    "sched_cls": {2: "TC_ACT_SHOT", 4: "TC_ACT_STOLEN", 7: "TC_ACT_REDIRECT", 8: "TC_ACT_TRAP"},
}
_PREEMPTING["sched_act"] = _PREEMPTING["sched_cls"]


def verdict_value(v: int) -> int:
    """A program's return register as the ``int`` the kernel reads (its low 32 bits, signed):
    ``0xffffffff`` is TC_ACT_UNSPEC (-1).

    >>> verdict_value(0xFFFFFFFF), verdict_value(2), verdict_value(0x1_0000_0003)
    (-1, 2, 3)
    """
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


class CheckError(ValueError):
    """The request cannot be checked (no such section, no entry function); exit code 2."""


# --- results -------------------------------------------------------------------------------------


@dataclass
class Counterexample:
    """Concrete inputs that drive the program down the violating path: the ``packet``, the ctx
    fields, helper results in call order, initial ``.data``/``.bss`` bytes and map entries."""

    packet: bytes
    ctx: dict[str, int]
    helpers: dict[str, Any]
    globals: dict[str, int]
    maps: dict[str, dict[bytes, bytes]]

    def to_json(self) -> dict[str, Any]:
        return {
            "packet": self.packet.hex(),
            "packet_len": len(self.packet),
            "packet_summary": describe_packet(self.packet),
            "ctx": self.ctx,
            "helpers": self.helpers,
            "globals": self.globals,
            "maps": {m: {k.hex(): v.hex() for k, v in e.items()} for m, e in self.maps.items()},
        }


@dataclass
class Violation:
    """A rule broken on some path: which ``rule`` (policy section), a one-line ``message``, the
    instruction (``section`` and its index ``insn`` there), the ``source`` line when the object
    has line info, the first violating ``path`` (index into the exploration) with its ``trace``
    of linked slots, how many paths break it, a ``counterexample`` and ``expect``: what a
    concrete run of the counterexample shows (for replay)."""

    rule: str
    message: str
    section: str
    insn: int | None
    source: str | None
    path: int
    trace: list[int]
    counterexample: Counterexample | None
    expect: dict[str, Any] = field(default_factory=dict)
    paths: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "message": self.message,
            "section": self.section,
            "insn": self.insn,
            "source": self.source,
            "path": self.path,
            "paths": self.paths,
            "trace_len": len(self.trace),
            "expect": self.expect,
            "counterexample": self.counterexample.to_json() if self.counterexample else None,
        }


@dataclass
class ProgramReport:
    """The verdict on one program (section) of an object."""

    section: str
    name: str
    type: str
    verdict: str
    violations: list[Violation]
    unknown: list[str]
    paths: int
    complete_paths: int
    insns: int
    seconds: float
    helpers: list[str]
    maps: dict[str, list[str]]
    returns: list[int]

    def to_json(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "type": self.type,
            "verdict": self.verdict,
            "exit_code": EXIT_CODES[self.verdict],
            "paths": self.paths,
            "complete_paths": self.complete_paths,
            "insns_executed": self.insns,
            "seconds": round(self.seconds, 4),
            "helpers": self.helpers,
            "maps": self.maps,
            "returns": self.returns,
            "unknown": self.unknown,
            "violations": [v.to_json() for v in self.violations],
        }


@dataclass
class Report:
    """The verdict on an object: VIOLATION if any program breaks the policy, else UNKNOWN if
    any program was not fully explored (fail-closed), else COMPLIANT."""

    object: str
    programs: list[ProgramReport]

    @property
    def verdict(self) -> str:
        verdicts = {p.verdict for p in self.programs}
        for v in ("VIOLATION", "UNKNOWN"):
            if v in verdicts:
                return v
        return "COMPLIANT"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    @property
    def violations(self) -> list[Violation]:
        return [v for p in self.programs for v in p.violations]

    def to_json(self) -> dict[str, Any]:
        return {
            "object": self.object,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "programs": [p.to_json() for p in self.programs],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


# --- packets -------------------------------------------------------------------------------------


def describe_packet(pkt: bytes) -> str:
    """A one-line reading of an Ethernet frame, for counterexamples.

    >>> ip = bytes.fromhex("4500001c0000000040110000") + bytes([10, 0, 0, 1, 10, 0, 0, 2])
    >>> describe_packet(bytes(12) + b"\\x08\\x00" + ip + bytes.fromhex("04d20035"))
    'IPv4 10.0.0.1 -> 10.0.0.2 udp 1234 -> 53, 38 bytes'
    >>> describe_packet(b"\\x01\\x02")
    '2 bytes (shorter than an Ethernet header)'
    """
    n = len(pkt)
    if n < 14:
        return f"{n} bytes (shorter than an Ethernet header)"
    eth = int.from_bytes(pkt[12:14], "big")
    if eth == 0x0800 and n >= 34:
        ihl = (pkt[14] & 0xF) * 4
        proto = pkt[23]
        text = f"IPv4 {ipaddress.IPv4Address(pkt[26:30])} -> {ipaddress.IPv4Address(pkt[30:34])}"
        l4 = 14 + ihl
    elif eth == 0x86DD and n >= 54:
        proto = pkt[20]
        text = f"IPv6 {ipaddress.IPv6Address(pkt[22:38])} -> {ipaddress.IPv6Address(pkt[38:54])}"
        l4 = 54
    else:
        return f"ethertype 0x{eth:04x}, {n} bytes"
    names = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
    text += f" {names.get(proto, f'proto {proto}')}"
    if proto in (6, 17, 132) and n >= l4 + 4:
        sport, dport = (
            int.from_bytes(pkt[l4 : l4 + 2], "big"),
            int.from_bytes(pkt[l4 + 2 : l4 + 4], "big"),
        )
        text += f" {sport} -> {dport}"
    return f"{text}, {n} bytes"


def _u(arr: Any, i: Any, n: int) -> Any:
    """Big-endian ``n``-byte field at index ``i`` of packet array ``arr``, as a 64-bit value."""
    v = z3.BitVecVal(0, 64)
    for k in range(n):
        v = (v << 8) | z3.ZeroExt(56, z3.Select(arr, i + k))
    return v


def when_condition(when: PacketWhen, packet: Any, pkt_len: Any) -> Any:
    """The z3 condition that the input packet satisfies `when` (brief §2.2's 5-tuple)."""
    c = lambda v: z3.BitVecVal(v, 64)  # noqa: E731
    eth = _u(packet, c(12), 2)
    v4 = z3.And(eth == 0x0800, z3.UGE(pkt_len, 34))
    v6 = z3.And(eth == 0x86DD, z3.UGE(pkt_len, 54))
    conds = [z3.UGE(pkt_len, 14)]
    if when.eth_type is not None:
        conds.append(eth == when.eth_type)
    proto = z3.If(v6, _u(packet, c(20), 1), _u(packet, c(23), 1))
    if when.ip_proto is not None:
        conds += [z3.Or(v4, v6), proto == when.ip_proto]
    for name, at4, at6 in (("saddr", 26, 22), ("daddr", 30, 38)):
        want = getattr(when, name)
        if want is None:
            continue
        net = ipaddress.ip_network(want)
        start, width = (at4, 4) if net.version == 4 else (at6, 16)
        bits = net.prefixlen
        field_ = z3.Concat(*[z3.Select(packet, c(start + k)) for k in range(width)])
        hi = 8 * width - 1
        match = (
            z3.BoolVal(True)
            if bits == 0
            else z3.Extract(hi, hi - bits + 1, field_)
            == (int(net.network_address) >> (8 * width - bits))
        )
        conds += [v4 if net.version == 4 else v6, match]
    if when.sport is not None or when.dport is not None:
        ihl = z3.ZeroExt(56, z3.Select(packet, c(14)) & 0xF) * 4
        l4 = z3.If(v6, c(54), 14 + ihl)
        conds += [z3.Or(v4, v6), z3.Or(proto == 6, proto == 17, proto == 132)]
        conds.append(z3.UGE(pkt_len, l4 + 4))
        if when.sport is not None:
            conds.append(_u(packet, l4, 2) == when.sport)
        if when.dport is not None:
            conds.append(_u(packet, l4 + 2, 2) == when.dport)
    return z3.And(*conds)


# --- information flow ----------------------------------------------------------------------------

_SOURCE_PREFIXES = (
    ("packet", "packet"),
    ("pkt_len", "packet"),
    ("skb_load_bytes@", "packet"),
    ("xdp_load_bytes@", "packet"),
    ("ctx.", "ctx"),
    ("probe_read_user", "user"),
    ("probe_read", "kernel"),
    ("kernel@", "kernel"),
    ("get_current_comm@", "kernel"),
    ("get_current_task", "kernel"),
    ("leaked_pointer", "kernel"),
)


def _label(name: str) -> str | None:
    if name.startswith("mapval:"):
        return "map:" + name[len("mapval:") :].split("@")[0]
    for prefix, label in _SOURCE_PREFIXES:
        if name.startswith(prefix):
            return label
    return None


class _Labels:
    """Source labels of z3 terms (by their free symbols), memoised over one exploration."""

    def __init__(self) -> None:
        self.memo: dict[int, frozenset[str]] = {}

    def of(self, e: Any) -> frozenset[str]:
        if isinstance(e, list | tuple):
            out: frozenset[str] = frozenset()
            for x in e:
                out |= self.of(x)
            return out
        if not z3.is_expr(e):
            return frozenset()
        stack, order = [e], []
        while stack:
            x = stack.pop()
            k = x.get_id()
            if k in self.memo:
                continue
            self.memo[k] = frozenset()  # placeholder; a DAG has no cycles
            order.append(x)
            stack.extend(x.children())
        for x in reversed(order):
            if z3.is_const(x) and x.decl().kind() == z3.Z3_OP_UNINTERPRETED:
                label = _label(x.decl().name())
                self.memo[x.get_id()] = frozenset([label]) if label else frozenset()
            else:
                acc: frozenset[str] = frozenset()
                for ch in x.children():
                    acc |= self.memo[ch.get_id()]
                self.memo[x.get_id()] = acc
        return self.memo[e.get_id()]


# --- checking one program ------------------------------------------------------------------------


class _Checker:
    def __init__(self, obj: BpfObject, section: str, policy: Policy, ex: Exploration):
        self.obj, self.section, self.policy, self.ex = obj, section, policy, ex
        self.ptype = obj.programs[section].type
        self.found: dict[tuple, Violation] = {}
        self.labels = _Labels()
        self.solver: z3.Solver | None = None
        self.current: int | None = None
        self.undecided: list[str] = []  # questions z3 gave up on: UNKNOWN
        self.base: dict[int, Any] = {}  # path -> a model of it, for counterexamples
        self.value_sizes = {m.name: m.value_size for m in obj.maps.values()}
        self.applies: dict[tuple[int, int], bool] = {}  # (path, packet entry) -> when proved

    # where and what

    def source(self, slot: int) -> tuple[str, int | None, str | None]:
        if not self.ex.bases:
            return self.section, slot, None
        sec, off = self.ex.where(slot)
        rec = self.obj.programs[sec].line_at(off)
        text = None
        if rec is not None and rec.line:
            text = f"{Path(rec.file).name}:{rec.line}: {rec.text.strip()}"
        return sec, off // 8, text

    def report(
        self, key: tuple, rule: str, msg: str, i: int, path: PathResult, slot: int | None,
        *extra: Any, expect: dict[str, Any] | None = None, prefer: Any = None,
    ) -> None:  # fmt: skip
        if key in self.found:
            self.found[key].paths += 1
            return
        sec, insn, text = self.source(slot) if slot is not None else (self.section, None, None)
        # The violation stands even when the solver gives no model in time (then no witness).
        cex = self.counterexample(i, path, extra, prefer)
        self.found[key] = Violation(
            rule, msg, sec, insn, text, i, list(path.trace), cex, expect or {}
        )

    # solver: one incremental solver per path, holding its condition, so that the questions
    # asked about one path (windows, returns, counterexamples) reuse what z3 learnt

    def on(self, i: int, path: PathResult) -> z3.Solver:
        if self.current != i:
            self.solver = z3.Solver()
            self.solver.set("timeout", _MODEL_TIMEOUT_MS)
            self.solver.add(*path.path_condition)
            self.current = i
        return self.solver

    def ask(self, i: int, path: PathResult, *conds: Any) -> Any:
        """A model of the path and `conds`, None if unsat, or "unknown" if z3 gives up."""
        s = self.on(i, path)
        s.push()
        s.add(*conds)
        r = s.check()
        m = s.model() if r == z3.sat else (None if r == z3.unsat else "unknown")
        s.pop()
        return m

    def provable(self, i: int, path: PathResult, cond: Any) -> bool:
        return self.ask(i, path, z3.Not(cond)) is None

    def possible(self, i: int, path: PathResult, cond: Any) -> bool:
        return self.ask(i, path, cond) is not None  # unknown counts as possible: fail closed

    def counterexample(self, i: int, path: PathResult, extra: tuple, prefer: Any):
        """A model of the path and `extra`, preferring `prefer` (e.g. that a write changes a
        byte, so a test run shows it) and a well-formed IPv4 header (version 4, IHL 5) where
        the path allows them, so that the packet reads as what a sender would send."""
        sym = path._symbols
        pkt = sym.packet
        at = lambda k: z3.Select(pkt, z3.BitVecVal(k, 64))  # noqa: E731
        v4 = z3.And(z3.UGE(sym.pkt_len, 34), at(12) == 0x08, at(13) == 0x00)
        tidy = z3.Implies(v4, at(14) == 0x45)
        real = [h.wish for h in path.helpers if h.wish is not None]  # e.g. array indices in range
        if i not in self.base:
            # One model for the whole path, where every write changes its bytes: most of the
            # path's violations can show on it, and solving is paid once per path.
            writes = [a.changes for a in path.packet_accesses if a.changes is not None]
            self.base[i] = next(
                (m for w in ([tidy, *real, *writes], [tidy, *real], [*real], [tidy])
                 if (m := self.ask(i, path, *w)) not in (None, "unknown")),
                None,
            )  # fmt: skip
        m = self.base[i]
        wanted = [*extra] + ([prefer] if prefer is not None else [])
        if m is None or not all(z3.is_true(m.eval(c, model_completion=True)) for c in wanted):
            m = None
            for wish in ([prefer, tidy, *real], [prefer, tidy], [prefer], [tidy], []):
                m = self.ask(i, path, *extra, *[w for w in wish if w is not None])
                if m not in (None, "unknown"):
                    break
            else:
                return None
        got = path.inputs(m, self.value_sizes)
        return Counterexample(
            got["packet"], got["ctx"], got["helpers"], got["globals"], got["maps"]
        )

    # rules

    def check_path(self, i: int, path: PathResult) -> None:
        p = self.policy
        events = sorted(
            [(h.step, 0, h) for h in path.helpers] + [(a.step, 1, a) for a in path.map_accesses],
            key=lambda e: (e[0], e[1]),
        )
        called: list[str] = []
        written: list[str] = []
        for _, kind, e in events:
            if kind == 0:
                self.check_helper(i, path, e, called, written)
                called.append(e.name)
            else:
                self.check_map(i, path, e)
                if _MAP_KIND[e.kind] == "write":
                    written.append(e.map)
        for a in path.packet_accesses:
            self.check_packet(i, path, a)
        for c in path.ctx_accesses:
            if not p.ctx_allowed(c.field, c.kind):
                self.report(("ctx", c.field, c.kind, c.pc), "ctx",
                            f"{c.kind} of ctx field {c.field} is not allowed by ctx.{c.kind}",
                            i, path, c.pc)  # fmt: skip
        if p.flow is not None and p.flow.deny:
            for sink, value, pc in path.flows:
                for label in sorted(self.labels.of(value)):
                    if p.flow_denied(label, sink):
                        self.report(("flow", label, sink, pc), "flow",
                                    f"data from {label} flows into {sink}, which flow.deny forbids",
                                    i, path, pc)  # fmt: skip
        if path.complete:
            self.check_return(i, path, called, written)
            self.check_return_rules(i, path)

    def check_helper(self, i, path, h, called, written) -> None:
        p = self.policy
        allowed = p.helper_allowed(
            h.name, called=called, maps_written=written, program_type=self.ptype
        )
        if not allowed:
            why = (
                "helpers" if p.helper_allowed(h.name, program_type=self.ptype) is False else "rules"
            )
            if why == "rules":
                msg = f"call to helper {h.name} after an earlier action; a rule denies it"
            else:
                msg = f"call to helper {h.name} (id {h.id}) is not allowed by the policy"
            self.report(("helper", h.name, h.pc), why, msg, i, path, h.pc,
                        expect={"helper": h.name})  # fmt: skip
        elif not h.modelled and not (p.helpers and p.helpers.allow and h.name in p.helpers.allow):
            self.report(("unmodelled", h.name, h.pc), "helpers",
                        f"helper {h.name} (id {h.id}) has no model here and is denied by default;"
                        " name it in helpers.allow to accept any result from it",
                        i, path, h.pc)  # fmt: skip

    def check_map(self, i, path, a) -> None:
        kind = _MAP_KIND[a.kind]
        if not self.policy.map_allowed(a.map, kind):
            what = {"value_read": "load from a value of", "value_write": "store into a value of",
                    "output": "output record to"}.get(a.kind, a.kind)  # fmt: skip
            self.report(("map", a.map, kind, a.pc), "maps",
                        f"{what} map {a.map} needs {kind} access, which maps does not grant",
                        i, path, a.pc, expect={"map": a.map, "access": kind})  # fmt: skip

    def check_packet(self, i, path, a: PacketAccess) -> None:
        if not a.bounded:
            self.report(("bounds", a.kind, a.pc), "packet",
                        f"{self.what(a)} is not proved within data_end by the path's checks",
                        i, path, a.pc, z3.Not(z3.ULE(a.end, path._symbols.pkt_len)))  # fmt: skip
            return
        entries = self.policy.packet_entries(a.kind)
        if entries is None:
            return
        windows: list[tuple[int, int]] = []
        for k, (when, ws) in enumerate(entries):
            if when is not None:
                if (i, k) not in self.applies:
                    cond = when_condition(when, path._symbols.packet, path._symbols.pkt_len)
                    self.applies[(i, k)] = self.provable(i, path, cond)
                if not self.applies[(i, k)]:
                    continue
            windows += ws
        windows = _merged(windows)
        extra: tuple = ()
        if a.range is not None:  # on a feasible path: inside a window or not, no solver needed
            lo, hi = a.range[0], a.range[1] - 1
            if any(w0 <= lo and hi <= w1 for w0, w1 in windows):
                return
        else:
            inside = z3.Or(
                *[z3.And(z3.UGE(a.start, w0), z3.ULE(a.end, w1 + 1)) for w0, w1 in windows]
            ) if windows else z3.BoolVal(False)  # fmt: skip
            if not self.possible(i, path, z3.Not(inside)):
                return
            extra = (z3.Not(inside),)
        allowed = ", ".join(f"{w0}..{w1}" for w0, w1 in windows) or "none here"
        self.report(("packet", a.kind, a.pc), "packet",
                    f"{self.what(a)} is outside the {a.kind} windows that apply on this path"
                    f" ({allowed})",
                    i, path, a.pc, *extra, prefer=a.changes,
                    expect={f"packet_{a.kind}": [a.range[0], a.range[1] - 1] if a.range else None})  # fmt: skip

    def what(self, a: PacketAccess) -> str:
        if a.range is not None:
            return f"packet {a.kind} of bytes {a.range[0]}..{a.range[1] - 1}"
        n = z3.simplify(a.end - a.start)
        size = f"{n.as_long()} byte(s)" if z3.is_bv_value(n) else "bytes"
        return f"packet {a.kind} of {size} at an offset that depends on the input"

    def check_return(self, i, path, called, written) -> None:
        p = self.policy
        if p.returns is None and not any(r.then.returns is not None for r in p.rules):
            return

        def ok(v: int) -> bool:
            return p.return_allowed(v, self.ptype, called=called, maps_written=written)

        def name(v: int) -> str:
            names = [k for k, c in RETURN_CODES.items() if c == v and self._family(k)]
            return f"{v} ({names[0]})" if names else str(v)

        if path.ret_value is not None:
            v = verdict_value(path.ret_value)
            if not ok(v):
                self.report(("return", v, path.trace[-1]), "returns",
                            f"returns {name(v)}, which returns does not allow",
                            i, path, path.trace[-1], expect={"return": v})  # fmt: skip
            return
        # A symbolic return value: every value the policy does not name is treated alike, so
        # checking the named ones and one unnamed stand-in decides the question exactly.
        named = {verdict_value(c) for c in RETURN_CODES.values()}
        lists = [p.returns or []] + [r.then.returns or [] for r in p.rules]
        for codes in lists + [r.if_.returns or [] for r in p.rules]:
            named |= {verdict_value(c) for c in codes if isinstance(c, int)}
        low = z3.Extract(31, 0, path.ret)
        if ok(_UNNAMED):
            bad = z3.Or(*[low == (v & 0xFFFFFFFF) for v in sorted(named) if not ok(v)])
        else:
            bad = z3.And(*[low != (v & 0xFFFFFFFF) for v in sorted(named) if ok(v)])
        m = self.ask(i, path, bad)
        if m == "unknown":  # z3 gave up: fail closed
            self.undecided.append(f"z3 could not decide the return values of path {i}")
            return
        v = verdict_value(m.eval(low, model_completion=True).as_long()) if m else None
        if v is not None:
            self.report(("return", "symbolic", path.trace[-1]), "returns",
                        f"can return {name(v)}, which returns does not allow",
                        i, path, path.trace[-1], low == (v & 0xFFFFFFFF),
                        expect={"return": v})  # fmt: skip

    def check_return_rules(self, i: int, path: PathResult) -> None:
        """Rules ``if: {returns: [...]}, then: {helpers: {deny: [...]}}``: a helper called on a
        path that can end with one of those verdicts breaks the rule."""
        for rule in self.policy.rules:
            if rule.if_.returns is None or rule.then.helpers is None:
                continue
            denied = [h for h in path.helpers if h.name in rule.then.helpers.deny]
            if not denied:
                continue
            codes = sorted({verdict_value(c) if isinstance(c, int) else RETURN_CODES[c]
                            for c in rule.if_.returns})  # fmt: skip
            low = z3.Extract(31, 0, path.ret)
            ends = z3.Or(*[low == (c & 0xFFFFFFFF) for c in codes])
            if path.ret_value is not None:
                if verdict_value(path.ret_value) not in codes:
                    continue
                extra: tuple = ()
            elif self.possible(i, path, ends):
                extra = (ends,)
            else:
                continue
            for h in denied:
                self.report(("rule-return", h.name, h.pc), "rules",
                            f"call to helper {h.name} on a path that returns one of {codes};"
                            " a rule denies it", i, path, h.pc, *extra,
                            expect={"helper": h.name})  # fmt: skip

    def _family(self, code_name: str) -> bool:
        fam = {"xdp": "XDP_", "sched_cls": "TC_ACT_", "sched_act": "TC_ACT_"}.get(self.ptype)
        return fam is None or code_name.startswith(fam)


def _counterexample(path: PathResult, *extra: Any) -> Counterexample | None:
    """A model of the path (and `extra`), with an IPv4 header of version 4 and IHL 5 where
    it allows one."""
    sym = path._symbols
    at = lambda k: z3.Select(sym.packet, z3.BitVecVal(k, 64))  # noqa: E731
    v4 = z3.And(z3.UGE(sym.pkt_len, 34), at(12) == 0x08, at(13) == 0x00)
    for wish in ([z3.Implies(v4, at(14) == 0x45)], []):
        try:
            m = path.model(*extra, *wish, timeout_ms=_MODEL_TIMEOUT_MS)
        except (ValueError, z3.Z3Exception):
            continue
        return Counterexample(m["packet"], m["ctx"], m["helpers"], m["globals"], m["maps"])
    return None


def entry_sections(obj: BpfObject, policy: Policy, section: str | None = None) -> list[str]:
    """The program sections :func:`check` checks: `section`, else the program the policy's
    ``entry_function`` names, else every program (``.text`` subprograms go with their callers).
    """
    entries = [s for s, p in obj.programs.items() if p.type != "subprog"]
    if section is not None:
        if section not in obj.programs:
            raise CheckError(
                f"{obj.path}: no program section {section!r}; it has {', '.join(entries) or 'none'}"
            )
        return [section]
    if policy.entry_function:
        hits = [s for s in entries if policy.entry_function in (s, obj.programs[s].name)]
        if not hits:
            names = ", ".join(f"{obj.programs[s].name} ({s})" for s in entries)
            raise CheckError(
                f"{obj.path}: no program named {policy.entry_function!r} (entry_function); "
                f"it has {names or 'none'}"
            )
        return hits
    if not entries:
        raise CheckError(f"{obj.path}: the object has no program sections")
    return entries


def _budgets(policy: Policy, overrides: dict[str, Any]) -> dict[str, Any]:
    b = policy.budget
    out: dict[str, Any] = {}
    if b.max_paths is not None:
        out["max_paths"] = b.max_paths
    if b.max_insns_per_path is not None:
        out["max_insns_per_path"] = b.max_insns_per_path
    if b.time_s is not None:
        out["time_budget_s"] = b.time_s
    out.update({k: v for k, v in overrides.items() if v is not None})
    return out


def _as_object(obj_or_path: BpfObject | str | Path) -> BpfObject:
    return obj_or_path if isinstance(obj_or_path, BpfObject) else load(obj_or_path)


def check(
    obj_or_path: BpfObject | str | Path,
    policy: Policy | None = None,
    *,
    section: str | None = None,
    max_paths: int | None = None,
    max_insns_per_path: int | None = None,
    time_budget_s: float | None = None,
    loop_bound: int | None = None,
) -> Report:
    """Check every path of every program of an eBPF object against `policy` (KrakenGuard §2.4).

    Parameters
    ----------
    obj_or_path : BpfObject or path
        An object from :func:`datahall.ebpf.loader.load`, or the path of an ELF ``.o``.
    policy : Policy, optional
        From :func:`datahall.ebpf.policy.load_policy`; ``None`` checks only what every policy
        demands (packet accesses proved in bounds, helpers with a model).
    section : str, optional
        Check only this program section; by default the policy's ``entry_function`` or every
        program (``.text`` subprograms are checked through their callers).
    max_paths, max_insns_per_path, time_budget_s, loop_bound : optional
        Override the policy's ``budget`` (and the engine's defaults); the time budget is per
        program. Running out makes the verdict UNKNOWN.

    Returns
    -------
    Report
        The verdict (``COMPLIANT``, ``VIOLATION`` or ``UNKNOWN``), per program its violations
        with counterexamples, the reasons for UNKNOWN, and what was explored.

    Raises
    ------
    CheckError
        No such section, or no program named like the policy's ``entry_function``.
    datahall.ebpf.loader.LoadError
        The file is not a well-formed eBPF object.

    References
    ----------
    Patel, Buhl-Nielsen, Ghosn, Kogias, "KRAKENGUARD: Towards Fine-Grained eBPF Isolation",
    NSDI '26 (brief §2.4 items 5-6, §2.5).

    Examples
    --------
    >>> from datahall.ebpf.engine import program_object
    >>> from datahall.ebpf.isa import insn
    >>> prog = program_object([insn(0xB7, dst=0, imm=3), insn(0x95)])  # return XDP_TX
    >>> report = check(prog, Policy.model_validate({"returns": ["XDP_PASS", "XDP_DROP"]}))
    >>> report.verdict, report.exit_code, report.violations[0].message
    ('VIOLATION', 1, 'returns 3 (XDP_TX), which returns does not allow')
    >>> check(prog, Policy.model_validate({"returns": ["XDP_TX"]})).verdict
    'COMPLIANT'
    """
    obj = _as_object(obj_or_path)
    policy = policy or Policy()
    budgets = _budgets(
        policy,
        {
            "max_paths": max_paths,
            "max_insns_per_path": max_insns_per_path,
            "time_budget_s": time_budget_s,
            "loop_bound": loop_bound,
        },
    )
    sections = entry_sections(obj, policy, section)
    for sec in sections:  # an undecodable instruction or a missing callee is bad input
        try:
            link(obj, sec)
        except (DecodeError, KeyError) as e:
            raise CheckError(f"{obj.path}: section {sec}: {str(e).strip(chr(39))}") from None
    return Report(str(obj.path), [_check_program(obj, s, policy, budgets) for s in sections])


def _check_program(
    obj: BpfObject, section: str, policy: Policy, budgets: dict[str, Any]
) -> ProgramReport:
    t0 = time.monotonic()
    prog = obj.programs[section]
    ex = explore(obj, section, **budgets)
    ck = _Checker(obj, section, policy, ex)
    if policy.program_types and prog.type not in policy.program_types:
        ck.found[("type",)] = Violation(
            "program_types",
            f"a {prog.type} program; program_types allows {', '.join(policy.program_types)}",
            section, None, None, -1, [], None,
        )  # fmt: skip
    deadline = time.monotonic() + budgets.get("time_budget_s", 60.0)
    unknown = []
    for i, path in enumerate(ex.paths):
        if time.monotonic() > deadline:
            unknown.append(f"time budget exhausted while checking ({i} of {len(ex.paths)} paths)")
            break
        ck.check_path(i, path)
    if not ex.complete:
        unknown += list(dict.fromkeys([ex.reason] + [p.reason for p in ex.paths if p.reason]))
    unknown += ck.undecided
    violations = list(ck.found.values())
    verdict = "VIOLATION" if violations else ("UNKNOWN" if unknown else "COMPLIANT")
    maps: dict[str, set[str]] = {}
    for p in ex.paths:
        for a in p.map_accesses:
            maps.setdefault(a.map, set()).add(_MAP_KIND[a.kind])
    return ProgramReport(
        section,
        prog.name,
        prog.type,
        verdict,
        violations,
        [u for u in unknown if u],
        len(ex.paths),
        sum(p.complete for p in ex.paths),
        ex.insns_executed,
        time.monotonic() - t0,
        sorted({h.name for p in ex.paths for h in p.helpers}),
        {m: sorted(k) for m, k in sorted(maps.items())},
        sorted(
            {verdict_value(p.ret_value) for p in ex.paths if p.complete and p.ret_value is not None}
        ),
    )


# --- interference --------------------------------------------------------------------------------


@dataclass
class Conflict:
    """One way the first program can change what the second sees or does."""

    kind: str  # packet, ctx, verdict, map
    message: str
    first: int | None = None  # instruction (linked slot) in the first program
    second: int | None = None  # in the second
    counterexample: Counterexample | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "first_insn": self.first,
            "second_insn": self.second,
            "counterexample": self.counterexample.to_json() if self.counterexample else None,
        }


@dataclass
class Interference:
    """The verdict on two programs chained on one hook: INTERFERE when a conflict exists,
    else UNKNOWN when either was not fully explored (fail-closed), else INDEPENDENT."""

    first: str
    second: str
    conflicts: list[Conflict]
    unknown: list[str]

    @property
    def verdict(self) -> str:
        return "INTERFERE" if self.conflicts else ("UNKNOWN" if self.unknown else "INDEPENDENT")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_json(self) -> dict[str, Any]:
        return {
            "first": self.first,
            "second": self.second,
            "verdict": self.verdict,
            "exit_code": self.exit_code,
            "unknown": self.unknown,
            "conflicts": [c.to_json() for c in self.conflicts],
        }


@dataclass
class _Effects:
    """What one program can do to the packet, ctx and maps, and its verdicts."""

    ptype: str
    pkt: dict[str, list[tuple[int, int, int]]]  # kind -> (lo, hi inclusive, slot)
    ctx: dict[str, dict[str, int]]  # kind -> field -> slot
    maps: dict[str, dict[str, int]]  # map -> kind -> slot
    verdicts: dict[int, tuple[int, PathResult, tuple]]  # value -> (slot, a path, its condition)
    unknown: list[str]


def _effects(obj: BpfObject, section: str, budgets: dict[str, Any]) -> _Effects:
    ex = explore(obj, section, **budgets)
    ptype = obj.programs[section].type
    eff = _Effects(ptype, {"read": [], "write": []}, {"read": {}, "write": {}}, {}, {}, [])
    if not ex.complete:
        eff.unknown.append(f"{section}: {ex.reason}")
    for p in ex.paths:
        for a in p.packet_accesses:
            lo, hi = a.range if a.range else (0, 1 << 16)
            eff.pkt[a.kind].append((lo, hi - 1, a.pc))
        for c in p.ctx_accesses:
            eff.ctx[c.kind].setdefault(c.field, c.pc)
        for m in p.map_accesses:
            eff.maps.setdefault(m.map, {}).setdefault(_MAP_KIND[m.kind], m.pc)
        if any(h.name in _LAYOUT_HELPERS for h in p.helpers):  # moves every byte it sees
            pc = next(h.pc for h in p.helpers if h.name in _LAYOUT_HELPERS)
            eff.pkt["write"].append((0, (1 << 16) - 1, pc))
        if p.complete and p.ret_value is not None:
            eff.verdicts.setdefault(verdict_value(p.ret_value), (p.trace[-1], p, ()))
        elif p.complete:  # a verdict the input decides: ask which pre-empting ones it can be
            low = z3.Extract(31, 0, p.ret)
            for code in _PREEMPTING.get(ptype, {}):
                if code not in eff.verdicts:
                    s = z3.Solver()
                    s.set("timeout", _MODEL_TIMEOUT_MS)
                    s.add(*p.path_condition, low == (code & 0xFFFFFFFF))
                    if s.check() != z3.unsat:
                        eff.verdicts[code] = (p.trace[-1], p, (low == (code & 0xFFFFFFFF),))
    return eff


def _merged(windows: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive windows with overlapping or adjacent ones joined: 0..13 and 14..33 -> 0..33."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(windows):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _spans(accesses: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    merged: list[tuple[int, int, int]] = []
    for lo, hi, pc in sorted(accesses):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi), merged[-1][2])
        else:
            merged.append((lo, hi, pc))
    return merged


def interfere(
    first: BpfObject | str | Path,
    second: BpfObject | str | Path,
    *,
    first_section: str | None = None,
    second_section: str | None = None,
    time_budget_s: float | None = None,
    max_paths: int | None = None,
) -> Interference:
    """Whether `first`, run before `second` on the same hook, can change what `second` sees or
    does (KrakenGuard's cross-program check, brief §2.4 item 6).

    Conflicts: packet bytes (or ctx fields) the first may write and the second may read or
    write; a pre-empting verdict of the first (XDP_DROP, XDP_TX, XDP_REDIRECT, XDP_ABORTED; for
    tc TC_ACT_SHOT, STOLEN, REDIRECT, TRAP) that keeps the second from seeing the packet, with a
    counterexample packet; and a map of the same name that both use and at least one writes (a
    pinned map is shared between objects by name).

    Returns
    -------
    Interference
        ``verdict`` is INTERFERE, INDEPENDENT, or UNKNOWN when either program was not fully
        explored (fail-closed).
    """
    objs = [_as_object(first), _as_object(second)]
    sections = []
    for obj, sec in zip(objs, (first_section, second_section), strict=True):
        secs = entry_sections(obj, Policy(), sec)
        if len(secs) != 1:
            raise CheckError(
                f"{obj.path} has {len(secs)} programs ({', '.join(secs)}); name one with a section"
            )
        sections.append(secs[0])
    types = [o.programs[sec].type for o, sec in zip(objs, sections, strict=True)]
    if types[0] != types[1]:
        raise CheckError(
            f"{objs[0].path.name} is a {types[0]} program and {objs[1].path.name} a {types[1]} "
            "one: programs chained on one hook have the same type"
        )
    budgets = {
        k: v for k, v in {"time_budget_s": time_budget_s, "max_paths": max_paths}.items() if v
    }
    a, b = (_effects(o, s, budgets) for o, s in zip(objs, sections, strict=True))
    names = [f"{o.path.name}:{s}" for o, s in zip(objs, sections, strict=True)]
    out: list[Conflict] = []
    reads = _spans(b.pkt["read"] + b.pkt["write"])
    for lo, hi, pc in _spans(a.pkt["write"]):
        for lo2, hi2, pc2 in reads:
            if lo <= hi2 and lo2 <= hi:
                o_lo, o_hi = max(lo, lo2), min(hi, hi2)
                out.append(Conflict(
                    "packet",
                    f"{names[0]} may write packet bytes {lo}..{hi}; {names[1]} accesses "
                    f"{lo2}..{hi2} (overlap {o_lo}..{o_hi})",
                    pc, pc2,
                ))  # fmt: skip
    for fld, pc in a.ctx["write"].items():
        seen = b.ctx["read"].get(fld, b.ctx["write"].get(fld))
        if seen is not None:
            out.append(Conflict("ctx", f"{names[0]} may write ctx field {fld}; {names[1]} uses it",
                                pc, seen))  # fmt: skip
    for value, (pc, path, cond) in sorted(a.verdicts.items()):
        label = _PREEMPTING.get(a.ptype, {}).get(value)
        if label is None:
            continue
        cex = _counterexample(path, *cond)
        example = f" (e.g. {describe_packet(cex.packet)})" if cex else ""
        out.append(Conflict(
            "verdict",
            f"{names[0]} can return {label}, so {names[1]} never sees the packet{example}",
            pc, None, cex,
        ))  # fmt: skip
    for name in sorted(set(a.maps) & set(b.maps)):
        ka, kb = a.maps[name], b.maps[name]
        if "write" in ka or "delete" in ka or "write" in kb or "delete" in kb:
            who = [n for n, k in zip(names, (ka, kb), strict=True) if {"write", "delete"} & set(k)]
            out.append(Conflict(
                "map",
                f"both use map {name} and {' and '.join(who)} write(s) it",
                next(iter(ka.values())), next(iter(kb.values())),
            ))  # fmt: skip
    return Interference(names[0], names[1], out, a.unknown + b.unknown)
