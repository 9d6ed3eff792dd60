"""Symbolic execution of an eBPF program over all its paths, for load-time policy checking.

KrakenGuard (NSDI '26; brief §2.4 item 3-4) checks a program against a policy before it is loaded
by exploring every path of the program symbolically, as eBPF-SE/PIX (NSDI '22) did for network
functions. :func:`explore` links a program with its bpf-to-bpf callees and runs it depth-first with
one incremental z3 solver (push/pop at forks): registers are 64-bit z3 scalars or pointers (a
region and a z3 offset); the packet is a z3 array of bytes with a symbolic length ``pkt_len`` (at
most ``max_packet``); the stack has concrete offsets; each map lookup gives a fresh map-value
region. Arithmetic, jumps, byte swaps and atomics reuse :mod:`datahall.ebpf.semantics` on its
SYMBOLIC domain, so the engine and the concrete interpreter share one meaning of each instruction.

Each finished path is a :class:`PathResult`: its return value, its path condition, the helpers it
called, its map, packet and ctx accesses (every packet access says whether the path condition
bounds it, i.e. implies ``offset + size <= pkt_len``), its sinks and redirect verdict, its trace,
and :meth:`PathResult.model` for a concrete packet, ctx and helper results that drive a concrete
run down that path. A construct the engine cannot model ends its path as *incomplete* with a
reason, and an exhausted budget makes the whole :class:`Exploration` incomplete; a policy checker
must treat both as UNKNOWN (fail-closed).

Examples
--------
>>> from datahall.ebpf.isa import insn
>>> prog = [  # r2 = data; r3 = data_end; return data + 14 > data_end ? XDP_DROP : XDP_PASS
...     insn(0x61, dst=2, src=1, off=0), insn(0x61, dst=3, src=1, off=4),
...     insn(0xBF, dst=4, src=2), insn(0x07, dst=4, imm=14),
...     insn(0xB7, dst=0, imm=1), insn(0x2D, dst=4, src=3, off=1),
...     insn(0xB7, dst=0, imm=2), insn(0x95)]
>>> ex = explore(program_object(prog), "xdp")
>>> ex.complete, sorted(p.ret_value for p in ex.paths)
(True, [1, 2])
>>> [len(p.model()["packet"]) >= 14 for p in sorted(ex.paths, key=lambda p: p.ret_value)]
[False, True]
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import z3

from datahall.ebpf import isa
from datahall.ebpf.helpers import HELPERS
from datahall.ebpf.isa import Instruction
from datahall.ebpf.loader import BpfObject, BpfProgram
from datahall.ebpf.semantics import SYMBOLIC as S
from datahall.ebpf.semantics import alu, atomic, compose, condition, end, end_swaps, split

__all__ = [
    "explore",
    "program_object",
    "link",
    "Exploration",
    "PathResult",
    "PacketAccess",
    "MapAccess",
    "CtxAccess",
    "HelperCall",
    "Ptr",
    "MODELLED_HELPERS",
    "XDP_FIELDS",
    "SKB_FIELDS",
]

STACK_SIZE = 512
MAX_PACKET = 1514
MAX_DEPTH = 8

XDP_FIELDS = {
    0: "data",
    4: "data_end",
    8: "data_meta",
    12: "ingress_ifindex",
    16: "rx_queue_index",
    20: "egress_ifindex",
}
"""``struct xdp_md`` field offsets."""

SKB_FIELDS = {
    0: "len", 4: "pkt_type", 8: "mark", 12: "queue_mapping", 16: "protocol",
    20: "vlan_present", 24: "vlan_tci", 28: "vlan_proto", 32: "priority",
    36: "ingress_ifindex", 40: "ifindex", 44: "tc_index", 48: "cb0", 52: "cb1", 56: "cb2",
    60: "cb3", 64: "cb4", 68: "hash", 72: "tc_classid", 76: "data", 80: "data_end",
    84: "napi_id", 140: "data_meta",
}  # fmt: skip
"""``struct __sk_buff`` field offsets (TC / sched_cls programs)."""


class _Incomplete(Exception):
    """Raised inside a path for a construct the engine does not model."""


@dataclass(frozen=True)
class Ptr:
    """A pointer: a memory ``region`` name and a 64-bit z3 ``off`` within it."""

    region: str
    off: Any

    def add(self, v: Any) -> Ptr:
        return Ptr(self.region, z3.simplify(self.off + v))


@dataclass(frozen=True)
class HelperCall:
    """A helper call on a path: its ``id``, ``name``, ``pc`` and its result (z3, or a label).

    ``modelled`` is False for a helper the engine knows no model of (its r0 was havocked).
    ``step`` orders it among the path's other records. For map helpers ``key`` holds the key's
    bytes (z3) and, for a lookup that found a value, ``region`` names the value's region.
    """

    id: int
    name: str
    pc: int
    ret: Any = None
    modelled: bool = True
    step: int = 0
    key: tuple = ()
    region: str | None = None
    wish: Any = None  # a condition that makes the result real, left out of the path (see _hard)


@dataclass(frozen=True)
class MapAccess:
    """A map use at ``pc``: ``kind`` is read/write/delete (lookup, update, delete helpers),
    value_read/value_write (loads/stores through a looked-up value) or output (ring buffer /
    perf event output)."""

    map: str
    kind: str
    pc: int
    step: int = 0


@dataclass(frozen=True)
class PacketAccess:
    """A packet load/store of bytes ``[start, end)``; ``range`` when both are constants. For a
    store, ``changes`` is the z3 condition that it changes at least one byte (what a test run
    can observe)."""

    kind: str
    start: Any
    end: Any
    range: tuple[int, int] | None
    bounded: bool
    pc: int
    changes: Any = None


@dataclass(frozen=True)
class CtxAccess:
    """A load (``read``) or store (``write``) of the program's context at ``offset``."""

    kind: str
    offset: int
    size: int
    field: str
    pc: int


@dataclass
class _Symbols:
    """The free symbols of an exploration, for turning z3 models into concrete inputs."""

    packet: Any
    pkt_len: Any
    ctx: dict[str, Any] = field(default_factory=dict)
    globals: dict[str, Any] = field(default_factory=dict)
    initial: dict[str, dict[int, Any]] = field(default_factory=dict)  # map value bytes


@dataclass
class PathResult:
    """One explored path: how it ended, its condition, and what it did."""

    status: str  # "exit" or "incomplete"
    reason: str | None
    ret: Any
    ret_value: int | None
    path_condition: list
    trace: list[int]
    helpers: list[HelperCall]
    map_accesses: list[MapAccess]
    packet_accesses: list[PacketAccess]
    ctx_accesses: list[CtxAccess]
    sinks: list[tuple[str, str, int]]
    verdict: tuple[str, Any, int] | None
    memory_reads: list[tuple[str, int]]
    flows: list[tuple[str, Any, int]] = field(default_factory=list)
    _symbols: _Symbols = field(repr=False, default=None)

    @property
    def complete(self) -> bool:
        return self.status == "exit"

    def model(
        self, *extra: Any, maps: dict[str, int] | None = None, timeout_ms: int | None = None
    ) -> dict[str, Any]:
        """Concrete inputs for this path (and the ``extra`` z3 conditions): ``packet`` (bytes),
        ``ctx``, ``helpers``, ``globals`` and ``maps``.

        ``globals`` maps ``".data+off"`` to the initial byte a symbolic ``.data``/``.bss`` needs.
        ``helpers`` maps ``"name@pc"`` to the value the helper returned (in call order; a map
        lookup gives ``"NULL"`` or ``"value"``). ``maps`` holds, per map, the entries
        (key bytes -> value bytes) that the path's successful lookups found; give the maps'
        value sizes in `maps` to get whole values (else only the bytes the path read).
        Raises ValueError if the condition is unsat (or no model is found in `timeout_ms`).
        """
        s = z3.Solver()
        if timeout_ms is not None:
            s.set("timeout", timeout_ms)
        s.add(*self.path_condition, *extra)
        if s.check() != z3.sat:
            raise ValueError("the path condition has no model")
        return self.inputs(s.model(), maps)

    def inputs(self, m: Any, maps: dict[str, int] | None = None) -> dict[str, Any]:
        """The concrete inputs that z3 model `m` (of this path's condition) gives; see
        :meth:`model`."""
        sym = self._symbols
        n = m.eval(sym.pkt_len, model_completion=True).as_long()
        pkt = bytes(
            m.eval(z3.Select(sym.packet, z3.BitVecVal(i, 64)), model_completion=True).as_long()
            for i in range(n)
        )
        ctx = {k: m.eval(v, model_completion=True).as_long() for k, v in sym.ctx.items()}
        data = {k: m.eval(v, model_completion=True).as_long() for k, v in sym.globals.items()}
        helpers: dict[str, Any] = {}
        entries: dict[str, dict[bytes, bytes]] = {}

        def concrete(bs) -> bytes:
            return bytes(m.eval(b, model_completion=True).as_long() for b in bs)

        for h in self.helpers:
            key = f"{h.name}@{h.pc}"
            if isinstance(h.ret, str) or h.ret is None:
                helpers[key] = h.ret
            else:
                helpers[key] = m.eval(h.ret, model_completion=True).as_long()
            if h.region is not None and h.key:
                known = sym.initial.get(h.region, {})
                size = (maps or {}).get(h.region.split(":", 1)[1].split("@")[0])
                size = size if size is not None else max(known, default=-1) + 1
                value = concrete(known.get(i, z3.BitVecVal(0, 8)) for i in range(size))
                entries.setdefault(h.region.split(":", 1)[1].split("@")[0], {})[concrete(h.key)] = (
                    value
                )
        return {"packet": pkt, "ctx": ctx, "helpers": helpers, "globals": data, "maps": entries}


@dataclass
class Exploration:
    """All paths of a program; ``complete`` is False (with ``reason``) if any was cut short."""

    paths: list[PathResult]
    complete: bool
    reason: str | None
    insns_executed: int
    seconds: float
    bases: dict[str, int] = field(default_factory=dict)

    def where(self, slot: int) -> tuple[str, int]:
        """The section and byte offset there of linked ``slot`` (traces use linked slots)."""
        sec, base = max(((s, b) for s, b in self.bases.items() if b <= slot), key=lambda sb: sb[1])
        return sec, (slot - base) * 8

    @property
    def returns(self) -> set[int | None]:
        """The concrete return values of the finished paths (None where not fixed)."""
        return {p.ret_value for p in self.paths if p.complete}


def program_object(insns: list[Instruction], section: str = "xdp", ptype: str = "xdp") -> BpfObject:
    """A :class:`BpfObject` holding one hand-assembled program in ``section`` (for tests).

    >>> program_object([isa.insn(0x95)]).programs["xdp"].n_insns
    1
    """
    prog = BpfProgram(section, "asm", ptype, "", isa.encode(insns))
    return BpfObject(Path("<asm>"), "GPL", {section: prog}, {}, {}, {})


# ---------------------------------------------------------------------------------------------
# Linking


def _link(
    obj: BpfObject, section: str
) -> tuple[dict[int, Instruction], dict[int, tuple], dict[str, int]]:
    """Slot -> instruction of the section and its callees, slot -> relocation info, and
    section -> its first slot."""
    if section not in obj.programs:
        raise KeyError(f"no program section {section!r}; this object has {sorted(obj.programs)}")
    bases: dict[str, int] = {}
    code: dict[int, Instruction] = {}
    info: dict[int, tuple] = {}
    todo = [section]
    nxt = 0
    while todo:
        sec = todo.pop()
        if sec in bases:
            continue
        if sec not in obj.programs:
            raise KeyError(f"call target section {sec!r} is not in the object")
        bases[sec] = nxt
        prog = obj.programs[sec]
        slot = nxt
        for ins in isa.decode(prog.insns):
            code[slot] = ins
            slot += ins.size
        nxt = slot
        for r in prog.relocations:
            if r.kind in ("call", "func"):
                todo.append(r.target)
    for sec, base in bases.items():
        for r in obj.programs[sec].relocations:
            s = base + r.insn
            if r.kind in ("call", "func"):
                info[s] = ("call", bases[r.target] + r.addend // 8)
            elif r.kind == "map":
                info[s] = ("map", r.target)
            elif r.kind == "global":
                info[s] = ("global", r.target, r.addend)
            else:
                info[s] = (r.kind, r.target)
    return code, info, bases


def link(obj: BpfObject, section: str) -> tuple[list[Instruction], dict[int, tuple]]:
    """The program ``section`` with its bpf-to-bpf callees appended, as one instruction list.

    Call instructions get the immediate that reaches their callee in the linked list, so the
    concrete interpreter can run it; the second result maps a slot to its relocation:
    ``("map", name)``, ``("global", section, addend)`` or ``("call", target slot)``.

    >>> insns, relocs = link(program_object([isa.insn(0x95)]), "xdp")
    >>> len(insns), relocs
    (1, {})
    """
    code, info, _ = _link(obj, section)
    out = []
    for slot, ins in sorted(code.items()):
        rel = info.get(slot)
        if rel and rel[0] == "call" and ins.opcode == isa.JMP | isa.CALL:
            ins = isa.insn(ins.opcode, ins.dst, ins.src, ins.off, rel[1] - slot - 1)
        out.append(ins)
    return out, info


# ---------------------------------------------------------------------------------------------
# Path state


@dataclass
class _State:
    pc: int
    regs: list
    mem: dict  # region -> {offset: BV8}
    spills: dict  # (region, offset) -> Ptr
    packet: Any
    pkt_len: Any
    frames: list
    depth: int
    pc_conds: list
    visits: dict
    trace: list
    helpers: list
    maps: list
    pkt: list
    ctx: list
    sinks: list
    verdict: Any
    reads: list
    flows: list
    steps: int = 0
    model: Any = None  # a z3 model of pc_conds, when one is known

    def fork(self) -> _State:
        return _State(
            self.pc, list(self.regs), {k: dict(v) for k, v in self.mem.items()}, dict(self.spills),
            self.packet, self.pkt_len, list(self.frames), self.depth, list(self.pc_conds),
            dict(self.visits), list(self.trace), list(self.helpers), list(self.maps),
            list(self.pkt), list(self.ctx), list(self.sinks), self.verdict, list(self.reads),
            list(self.flows), self.steps, self.model,
        )  # fmt: skip


_HARD_OPS = {z3.Z3_OP_BUDIV, z3.Z3_OP_BUREM, z3.Z3_OP_BSDIV, z3.Z3_OP_BSREM, z3.Z3_OP_BSMOD,
             z3.Z3_OP_BUDIV_I, z3.Z3_OP_BUREM_I, z3.Z3_OP_BSDIV_I, z3.Z3_OP_BSREM_I,
             z3.Z3_OP_BSMOD_I}  # fmt: skip


def _hard(e: Any) -> bool:
    """Whether `e` divides by, or multiplies, values that are not constants (a hash bucket
    such as ``h % count``): constraints on such terms make z3 slow (brief §7), so an array
    lookup by such an index forks without its range condition."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x.get_id() in seen:
            continue
        seen.add(x.get_id())
        if z3.is_app(x):
            kind = x.decl().kind()
            args = x.children()
            if kind in _HARD_OPS and not z3.is_bv_value(args[1]):
                return True
            if kind == z3.Z3_OP_BMUL and sum(not z3.is_bv_value(a) for a in args) > 1:
                return True
            todo.extend(args)
    return False


_FRESH = {
    "ktime_get_ns",
    "ktime_get_boot_ns",
    "ktime_get_coarse_ns",
    "ktime_get_tai_ns",
    "get_prandom_u32",
    "get_smp_processor_id",
    "get_current_pid_tgid",
    "get_current_uid_gid",
    "get_current_task",
    "get_current_task_btf",
    "get_numa_node_id",
    "csum_diff",
    "get_cgroup_classid",
    "get_route_realm",
    "get_hash_recalc",
    "get_socket_cookie",
    "get_socket_uid",
    "jiffies64",
    "get_current_cgroup_id",
    "get_current_ancestor_cgroup_id",
    "csum_update",
    "l3_csum_replace",
    "l4_csum_replace",
    "fib_lookup",
    "skb_store_bytes",
    "skb_change_proto",
    "skb_vlan_push",
    "skb_vlan_pop",
    "get_func_ip",
    "get_attach_cookie",
    "spin_lock",
    "spin_unlock",
    "check_mtu",
    "send_signal",
    "send_signal_thread",
    "override_return",
    "skb_change_type",
    "set_hash",
    "set_hash_invalid",
    "skb_ecn_set_ce",
}
_RECORD_ONLY = {"probe_write_user", "trace_printk", "override_return", "send_signal", "snprintf"}
_PROBE_READ = {"probe_read", "probe_read_str", "probe_read_user", "probe_read_kernel",
               "probe_read_user_str", "probe_read_kernel_str", "get_current_comm",
               "skb_load_bytes", "xdp_load_bytes"}  # fmt: skip
_BTF_TYPES = {"tracing", "lsm", "struct_ops"}
_ARRAY_MAPS = {2, 6}  # BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY
_ADJUST = {"xdp_adjust_head", "xdp_adjust_tail", "xdp_adjust_meta", "skb_pull_data",
           "skb_change_tail", "skb_change_head", "skb_adjust_room"}  # fmt: skip
_SPECIAL = {"map_lookup_elem", "map_lookup_percpu_elem", "ringbuf_reserve", "map_update_elem",
            "map_push_elem", "map_delete_elem", "map_pop_elem", "map_peek_elem", "ringbuf_submit",
            "ringbuf_discard", "ringbuf_output", "perf_event_output", "skb_output", "xdp_output",
            "redirect", "redirect_map", "redirect_peer", "redirect_neigh", "clone_redirect",
            "loop", "tail_call", "for_each_map_elem"}  # fmt: skip
MODELLED_HELPERS = frozenset(_FRESH | _RECORD_ONLY | _PROBE_READ | _ADJUST | _SPECIAL)
"""Helper names with a model here; any other helper is recorded with ``modelled=False``."""


class _Explorer:
    def __init__(
        self, obj, section, max_paths, max_insns, budget, loop_bound, max_packet, concrete_data
    ):
        self.concrete_data = concrete_data
        self.obj = obj
        self.ptype = obj.programs[section].type
        self.code, self.info, self.bases = _link(obj, section)
        self.max_paths, self.max_insns, self.loop_bound = max_paths, max_insns, loop_bound
        self.deadline = time.monotonic() + budget
        self.solver = z3.Solver()
        self.solver.set("timeout", max(1, int(budget * 1000)))
        self.asserted: list = []
        self.uid = itertools.count()
        self.regions: dict[str, tuple] = {}  # region -> (kind, map name or section)
        pkt = z3.Array("packet", z3.BitVecSort(64), z3.BitVecSort(8))
        pkt_len = z3.BitVec("pkt_len", 64)
        self.sym = _Symbols(pkt, pkt_len)
        self.base_conds = [z3.ULE(pkt_len, z3.BitVecVal(max_packet, 64))]
        self.max_packet = max_packet
        self.paths: list[PathResult] = []
        self.insns = 0
        self.stop: str | None = None

    # -- solver ------------------------------------------------------------------------------

    def _sync(self, conds: list) -> None:
        k = 0
        while k < len(self.asserted) and k < len(conds) and self.asserted[k] is conds[k]:
            k += 1
        if len(self.asserted) > k:
            self.solver.pop(len(self.asserted) - k)
            del self.asserted[k:]
        for c in conds[k:]:
            self.solver.push()
            self.solver.add(c)
            self.asserted.append(c)

    def _model(self, extra) -> Any:
        """A model of the asserted path condition and ``extra``; None when the solver gives
        up (counted as satisfiable), False when unsatisfiable."""
        e = z3.simplify(extra)
        if z3.is_false(e):
            return False
        self.solver.push()
        self.solver.add(e)
        left = max(1, int((self.deadline - time.monotonic()) * 1000))
        self.solver.set("timeout", left)
        r = self.solver.check()
        m = self.solver.model() if r == z3.sat else None
        self.solver.pop()
        return False if r == z3.unsat else m

    def _valid(self, cond) -> bool:
        """Whether the asserted path condition implies ``cond`` (proved, not just unknown)."""
        e = z3.simplify(cond)
        if z3.is_true(e):
            return True
        self.solver.push()
        self.solver.add(z3.Not(e))
        r = self.solver.check()
        self.solver.pop()
        return r == z3.unsat

    def _const(self, v) -> int | None:
        """The value ``v`` must take under the path condition, or None."""
        v = z3.simplify(v)
        if z3.is_bv_value(v):
            return v.as_long()
        self.solver.push()
        r = self.solver.check()
        if r != z3.sat:
            self.solver.pop()
            return None
        c = self.solver.model().eval(v, model_completion=True)
        self.solver.pop()
        return c.as_long() if self._valid(v == c) else None

    # -- values ------------------------------------------------------------------------------

    def fresh(self, name: str, bits: int = 64):
        v = z3.BitVec(f"{name}#{next(self.uid)}", bits)
        return v if bits == 64 else z3.ZeroExt(64 - bits, v)

    def new_region(self, kind: str, label: str) -> str:
        name = f"{kind}:{label}#{next(self.uid)}"
        self.regions[name] = (kind, label)
        return name

    # -- main loop ---------------------------------------------------------------------------

    def run(self) -> None:
        regs: list = [S.const(0)] * 11
        regs[1] = Ptr("ctx", S.const(0))
        regs[10] = Ptr("stack0", S.const(STACK_SIZE))
        for i in (2, 3, 4, 5):
            regs[i] = self.fresh(f"r{i}")
        init = _State(0, regs, {"stack0": {}}, {}, self.sym.packet, self.sym.pkt_len, [], 0,
                      list(self.base_conds), {}, [], [], [], [], [], [], None, [], [])  # fmt: skip
        work = [init]
        while work:
            if time.monotonic() > self.deadline:
                self.stop = "time budget exhausted"
                break
            if len(self.paths) >= self.max_paths:
                self.stop = f"max_paths ({self.max_paths}) reached"
                break
            st = work.pop()
            self._sync(st.pc_conds)
            try:
                children = self.step_path(st)
            except _Incomplete as e:
                self.finish(st, "incomplete", str(e))
                continue
            except Exception as e:  # noqa: BLE001 - any failure ends the path, fail-closed
                self.finish(st, "incomplete", f"engine cannot model this: {e}")
                continue
            work.extend(reversed(children))

    def finish(self, st: _State, status: str, reason: str | None, ret=None) -> None:
        self._sync(st.pc_conds)
        value = self._const(ret) if ret is not None else None
        self.paths.append(
            PathResult(
                status,
                reason,
                ret,
                value,
                st.pc_conds,
                st.trace,
                st.helpers,
                st.maps,
                st.pkt,
                st.ctx,
                st.sinks,
                st.verdict,
                st.reads,
                st.flows,
                self.sym,
            )  # fmt: skip
        )

    def branch(self, st: _State, cond) -> list[tuple[_State, bool]]:
        """Fork ``st`` on ``cond``: the satisfiable successors as ``(state, cond holds)``."""
        c = z3.simplify(cond)
        if z3.is_true(c) or z3.is_false(c):
            return [(st, z3.is_true(c))]
        out = []
        for x, b in ((c, True), (z3.simplify(z3.Not(c)), False)):
            # The state's model decides one side for free (a counterexample cache, as KLEE's).
            if st.model is not None and z3.is_true(st.model.eval(x, model_completion=True)):
                out.append((x, b, st.model))
                continue
            m = self._model(x)
            if m is not False:
                out.append((x, b, m))
        if len(out) == 1:
            st.pc_conds.append(out[0][0])
            st.model = out[0][2]
            self._sync(st.pc_conds)
            return [(st, out[0][1])]
        if not out:
            raise _Incomplete("neither side of a branch is satisfiable (solver gave up?)")
        taken = st.fork()
        taken.pc_conds.append(out[0][0])
        taken.model = out[0][2]
        st.pc_conds.append(out[1][0])
        st.model = out[1][2]
        return [(taken, True), (st, False)]

    def step_path(self, st: _State) -> list[_State]:
        """Run ``st`` until it ends (returns []) or forks (returns the successors)."""
        while True:
            self.insns += 1
            st.steps += 1
            if st.steps > self.max_insns:
                raise _Incomplete(f"per-path instruction budget ({self.max_insns}) exhausted")
            if st.steps % 256 == 0 and time.monotonic() > self.deadline:
                raise _Incomplete("time budget exhausted")
            ins = self.code.get(st.pc)
            if ins is None:
                raise _Incomplete(f"jump to slot {st.pc}, which holds no instruction")
            st.trace.append(st.pc)
            res = self.execute(st, ins)
            if res is not None:
                return res

    # -- instructions ------------------------------------------------------------------------

    def jump(self, st: _State, target: int) -> None:
        if target <= st.pc:
            n = st.visits.get(target, 0) + 1
            st.visits[target] = n
            if n > self.loop_bound:
                raise _Incomplete(f"loop at slot {target} runs past loop_bound={self.loop_bound}")
        st.pc = target

    def execute(self, st: _State, ins: Instruction):
        pc, cls, op, regs = st.pc, ins.cls, ins.op, st.regs
        nxt = pc + ins.size
        if cls in (isa.ALU, isa.ALU64):
            if ins.dst == 10:
                raise _Incomplete(f"pc {pc}: write to r10")
            self.alu(st, ins)
        elif cls in (isa.JMP, isa.JMP32):
            if op == isa.EXIT:
                if not st.frames:
                    r0 = regs[0]
                    if isinstance(r0, Ptr):
                        raise _Incomplete(f"pc {pc}: returns a pointer into {r0.region}")
                    st.flows.append(("return", r0, pc))
                    self.finish(st, "exit", None, r0)
                    return []
                nxt, saved = st.frames.pop()
                regs[6:11] = saved
                st.mem.pop(f"stack{st.depth}", None)
                st.depth -= 1
            elif op == isa.CALL:
                if ins.source == isa.X:
                    raise _Incomplete(f"pc {pc}: callx is not modelled")
                if ins.src == 1:
                    info = self.info.get(pc)
                    target = info[1] if info and info[0] == "call" else nxt + ins.imm
                    if st.depth + 1 >= MAX_DEPTH:
                        raise _Incomplete(f"pc {pc}: call depth exceeds {MAX_DEPTH}")
                    st.frames.append((nxt, list(regs[6:11])))
                    st.depth += 1
                    st.mem[f"stack{st.depth}"] = {}
                    regs[10] = Ptr(f"stack{st.depth}", S.const(STACK_SIZE))
                    nxt = target
                elif ins.src == 2:
                    raise _Incomplete(f"pc {pc}: kfunc call (BTF id {ins.imm}) is not modelled")
                else:
                    res = self.helper(st, ins.imm)
                    if res is not None:
                        for s in res:
                            s.pc = nxt
                        return res
            elif op == isa.JA:
                self.jump(st, nxt + ins.jump_offset)
                return None
            else:
                a = regs[ins.dst]
                b = regs[ins.src] if ins.source == isa.X else S.const(ins.imm)
                cond = self.compare(pc, op, cls == isa.JMP, a, b)
                kids = self.branch(st, cond)
                for k, taken in kids:
                    if taken:
                        self.jump(k, nxt + ins.off)
                    else:
                        k.pc = nxt
                return None if len(kids) == 1 else [k for k, _ in kids]
        elif ins.opcode == isa.LDDW:
            info = self.info.get(pc)
            if ins.src == 0 and info is None:
                regs[ins.dst] = S.const(ins.imm64)
            elif info and info[0] == "map":
                regs[ins.dst] = Ptr(f"mapref:{info[1]}", S.const(0))
            elif info and info[0] == "global":
                regs[ins.dst] = Ptr(f"global:{info[1]}", S.const(info[2]))
            else:
                raise _Incomplete(f"pc {pc}: lddw of pseudo kind {isa.PSEUDO.get(ins.src)}")
        elif cls == isa.LD:
            off = S.const(ins.imm)
            if ins.mode == isa.IND:
                if isinstance(regs[ins.src], Ptr):
                    raise _Incomplete(f"pc {pc}: legacy packet load indexed by a pointer")
                off = S.zext(regs[ins.src] + off, 32)
            inb = z3.ULE(off + ins.width, st.pkt_len)
            out = []
            for k, ok in self.branch(st, inb):
                if ok:
                    bs = [z3.Select(k.packet, off + i) for i in range(ins.width)]
                    k.regs[0] = S.from_bytes(list(reversed(bs)))
                    k.pkt.append(self.pkt_access(k, "read", off, ins.width, pc, True))
                    k.pc = nxt
                    out.append(k)
                else:
                    self.finish(k, "exit", None, S.const(0))
            return out
        elif cls == isa.LDX:
            base = regs[ins.src]
            if not isinstance(base, Ptr) and self.ptype in _BTF_TYPES:
                # A BTF-typed kernel pointer (fentry/fexit/lsm args): an opaque kernel read.
                st.reads.append(("kernel", pc))
                v = self.fresh(f"kernel@{pc}", 8 * ins.width)
                regs[ins.dst] = S.sext(v, 8 * ins.width) if ins.mode == isa.MEMSX else v
                st.pc = nxt
                return None
            if not isinstance(base, Ptr):
                raise _Incomplete(f"pc {pc}: load through a scalar (r{ins.src} is not a pointer)")
            regs[ins.dst] = self.load(st, base.add(S.const(ins.off)), ins.width, pc,
                                      ins.mode == isa.MEMSX)  # fmt: skip
        elif cls in (isa.ST, isa.STX):
            base = regs[ins.dst]
            if not isinstance(base, Ptr):
                raise _Incomplete(f"pc {pc}: store through a scalar (r{ins.dst} is not a pointer)")
            addr = base.add(S.const(ins.off))
            if ins.mode == isa.ATOMIC:
                old = self.load(st, addr, ins.width, pc, False)
                src = regs[ins.src]
                if isinstance(src, Ptr) or (ins.imm == isa.CMPXCHG and isinstance(regs[0], Ptr)):
                    raise _Incomplete(f"pc {pc}: atomic operation on a pointer value")
                new, ret = atomic(S, ins.imm, ins.width, old, src, regs[0])
                self.store(st, addr, z3.simplify(new), ins.width, pc)
                if ins.imm == isa.CMPXCHG:
                    regs[0] = z3.simplify(ret)
                elif ret is not None:
                    regs[ins.src] = z3.simplify(ret)
            else:
                value = regs[ins.src] if cls == isa.STX else S.const(ins.imm)
                self.store(st, addr, value, ins.width, pc)
        else:
            raise _Incomplete(f"pc {pc}: opcode 0x{ins.opcode:02x} is not modelled")
        st.pc = nxt
        return None

    def alu(self, st: _State, ins: Instruction) -> None:
        regs, op, is64 = st.regs, ins.op, ins.cls == isa.ALU64
        d = regs[ins.dst]
        s = regs[ins.src] if ins.source == isa.X else S.const(ins.imm)
        if op == isa.MOV and is64 and ins.off == 0:
            regs[ins.dst] = s
            return
        if isinstance(d, Ptr) or isinstance(s, Ptr):
            if is64 and op == isa.ADD and isinstance(d, Ptr) and not isinstance(s, Ptr):
                regs[ins.dst] = d.add(s)
            elif is64 and op == isa.ADD and isinstance(s, Ptr) and not isinstance(d, Ptr):
                regs[ins.dst] = s.add(d)
            elif is64 and op == isa.SUB and isinstance(d, Ptr) and not isinstance(s, Ptr):
                regs[ins.dst] = Ptr(d.region, z3.simplify(d.off - s))
            elif is64 and op == isa.SUB and isinstance(s, Ptr) and d.region == s.region:
                regs[ins.dst] = z3.simplify(d.off - s.off)
            else:
                what = isa.ALU_OPS.get(op, hex(op))
                raise _Incomplete(f"pc {st.pc}: {what} on a pointer is not modelled")
            return
        if op == isa.END:
            regs[ins.dst] = z3.simplify(end(S, d, ins.imm, swap=end_swaps(ins)))
        else:
            regs[ins.dst] = z3.simplify(alu(S, op, is64, d, s, ins.off))

    def compare(self, pc: int, op: int, is64: bool, a, b):
        if isinstance(a, Ptr) and isinstance(b, Ptr):
            if a.region != b.region or not is64:
                raise _Incomplete(f"pc {pc}: comparison of pointers into {a.region}/{b.region}")
            return condition(S, op, True, a.off, b.off)
        if isinstance(a, Ptr) or isinstance(b, Ptr):
            other = b if isinstance(a, Ptr) else a
            o = z3.simplify(other)
            if op in (isa.JEQ, isa.JNE) and z3.is_bv_value(o) and o.as_long() == 0:
                return z3.BoolVal(op == isa.JNE)  # a valid pointer is never NULL
            raise _Incomplete(f"pc {pc}: comparison of a pointer with a scalar")
        return condition(S, op, is64, a, b)

    # -- memory ------------------------------------------------------------------------------

    def pkt_access(self, st, kind, off, n, pc, bounded=None, new=None) -> PacketAccess:
        start, stop = z3.simplify(off), z3.simplify(off + n)
        if bounded is None:
            bounded = self._valid(z3.And(z3.ULE(stop, st.pkt_len), z3.ULE(start, stop)))
        lo = self._const(start)
        rng = (lo, lo + n) if lo is not None else None
        changes = None
        if new is not None:  # the bytes written, against those there before
            changes = z3.Or(*[b != z3.Select(st.packet, off + i) for i, b in enumerate(new)])
        return PacketAccess(kind, start, stop, rng, bounded, pc, changes)

    def _offset(self, p: Ptr, n: int, size: int | None, pc: int) -> int:
        off = self._const(p.off)
        if off is None:
            raise _Incomplete(f"pc {pc}: symbolic offset into {p.region}")
        off = off if off < 1 << 63 else off - (1 << 64)
        if off < 0 or (size is not None and off + n > size):
            raise _Incomplete(
                f"pc {pc}: access of {n} bytes at {p.region}{off:+d} is out of bounds"
            )
        return off

    def ctx_field(self, off: int, n: int, pc: int) -> tuple[str, Any]:
        table = XDP_FIELDS if self.ptype == "xdp" else (
            SKB_FIELDS if self.ptype in ("sched_cls", "sched_act") else {})  # fmt: skip
        name = table.get(off, f"ctx+{off}")
        if name == "data":
            return name, Ptr("packet", S.const(0))
        if name == "data_meta":  # metadata before the packet; not modelled beyond its own bytes
            return name, Ptr("meta", S.const(0))
        if name == "data_end":
            return name, "data_end"
        if name == "len" and table is SKB_FIELDS:
            return name, S.zext(self.sym.pkt_len, 32)
        key = name if name in table.values() else f"{name}/{n}"
        if key not in self.sym.ctx:
            bits = 32 if table else 8 * n
            self.sym.ctx[key] = z3.BitVec(f"ctx.{key}", bits)
        v = self.sym.ctx[key]
        return name, S.zext(z3.ZeroExt(64 - v.size(), v), 8 * n)

    def load(self, st: _State, p: Ptr, n: int, pc: int, signed: bool):
        kind = p.region.split(":")[0]
        if p.region == "ctx":
            off = self._offset(p, n, None, pc)
            name, v = self.ctx_field(off, n, pc)
            st.ctx.append(CtxAccess("read", off, n, name, pc))
            return Ptr("packet", st.pkt_len) if isinstance(v, str) else v
        if p.region == "packet":
            st.pkt.append(self.pkt_access(st, "read", p.off, n, pc))
            bs = [z3.Select(st.packet, p.off + i) for i in range(n)]
            return z3.simplify(compose(S, bs, signed))
        if kind == "mapref":
            raise _Incomplete(f"pc {pc}: load through a map reference")
        size = STACK_SIZE if p.region.startswith("stack") else self.region_size(p.region)
        off = self._offset(p, n, size, pc)
        if kind == "mapval":
            st.maps.append(MapAccess(self._map_of(p.region), "value_read", pc, st.steps))
        if n == 8 and (p.region, off) in st.spills:
            return st.spills[(p.region, off)]
        mem = st.mem.setdefault(p.region, {})
        bs = []
        for i in range(off, off + n):
            if (p.region, i) in st.spills or any((p.region, i - k) in st.spills for k in range(8)):
                bs.append(self.fresh(f"{p.region}.spill", 8))
                continue
            if i not in mem:
                mem[i] = self.initial_byte(p.region, i, pc)
            bs.append(mem[i])
        return z3.simplify(compose(S, bs, signed))

    def _map_of(self, region: str) -> str:
        return self.regions[region][1].split("@")[0]

    def region_size(self, region: str) -> int | None:
        kind, label = self.regions.get(region, (region.split(":")[0], region.split(":", 1)[-1]))[:2]
        if kind == "mapval":
            m = self.obj.maps.get(label.split("@")[0])
            return m.value_size if m else None
        if kind == "global":
            return len(self.obj.data.get(label, b""))
        if kind == "ringbuf":
            return self.regions[region][2] if len(self.regions[region]) > 2 else None
        return None

    def initial_byte(self, region: str, off: int, pc: int):
        if region.startswith("global:"):
            sec = region.split(":", 1)[1]
            if sec.startswith(".rodata") or self.concrete_data:
                return z3.BitVecVal(self.obj.data[sec][off], 8)
            key = f"{sec}+{off}"  # .data/.bss: user space and earlier runs may change them
            if key not in self.sym.globals:
                self.sym.globals[key] = z3.BitVec(f"global:{key}", 8)
            return self.sym.globals[key]
        b = z3.BitVec(f"{region}+{off}#{next(self.uid)}", 8)
        if region.startswith("mapval:"):
            self.sym.initial.setdefault(region, {})[off] = b
        return b

    def peek(self, st: _State, p: Any, n: Any, pc: int, what: str) -> list:
        """The bytes ``p[0:n]`` as z3 bytes, for helpers that read memory (keys, values,
        output records); reading packet bytes is recorded as a packet read. A size that is not
        a small constant (or None) gives every byte the region holds so far (an
        over-approximation for information flow)."""
        if not isinstance(p, Ptr):
            raise _Incomplete(f"pc {pc}: {what} is not a pointer")
        k = self._const(n) if n is not None and not isinstance(n, Ptr) else None
        if p.region == "packet":
            if k is None or k > STACK_SIZE:
                raise _Incomplete(f"pc {pc}: {what} is packet data of a size that is not fixed")
            st.pkt.append(self.pkt_access(st, "read", p.off, k, pc))
            return [z3.Select(st.packet, p.off + i) for i in range(k)]
        mem = st.mem.setdefault(p.region, {})
        if k is None or k > STACK_SIZE:
            return list(mem.values())
        size = STACK_SIZE if p.region.startswith("stack") else self.region_size(p.region)
        off = self._offset(p, k, size, pc)
        out = []
        for i in range(off, off + k):
            if any((p.region, i - j) in st.spills for j in range(8)):
                out.append(self.fresh(f"{p.region}.spill", 8))
            else:
                if i not in mem:
                    mem[i] = self.initial_byte(p.region, i, pc)
                out.append(mem[i])
        return out

    def store(self, st: _State, p: Ptr, value, n: int, pc: int) -> None:
        kind = p.region.split(":")[0]
        if isinstance(value, Ptr) and not (p.region.startswith("stack") and n == 8):
            value = self.fresh("leaked_pointer")  # pointer stored outside the stack
        if p.region == "ctx":
            off = self._offset(p, n, None, pc)
            st.ctx.append(CtxAccess("write", off, n, self.ctx_field(off, n, pc)[0], pc))
            return
        if p.region == "packet":
            new = [z3.simplify(b) for b in split(S, value, n)]
            st.pkt.append(self.pkt_access(st, "write", p.off, n, pc, new=new))
            st.flows.append(("packet", value, pc))
            arr = st.packet
            for i, b in enumerate(new):
                arr = z3.Store(arr, p.off + i, b)
            st.packet = arr
            return
        if kind == "mapref":
            raise _Incomplete(f"pc {pc}: store through a map reference")
        if kind == "global" and self.regions.get(p.region, ("", ""))[1].startswith(".rodata"):
            raise _Incomplete(f"pc {pc}: store into read-only {p.region}")
        if p.region.startswith("global:.rodata"):
            raise _Incomplete(f"pc {pc}: store into read-only {p.region}")
        size = STACK_SIZE if p.region.startswith("stack") else self.region_size(p.region)
        off = self._offset(p, n, size, pc)
        if kind == "mapval":
            st.maps.append(MapAccess(self._map_of(p.region), "value_write", pc, st.steps))
            st.flows.append((f"map:{self._map_of(p.region)}", value, pc))
        elif kind == "ringbuf":
            st.flows.append(("ringbuf", value, pc))
        for k in range(-7, n):
            st.spills.pop((p.region, off + k), None)
        mem = st.mem.setdefault(p.region, {})
        if isinstance(value, Ptr):
            st.spills[(p.region, off)] = value
            for i in range(off, off + n):
                mem.pop(i, None)
            return
        for i, b in enumerate(split(S, value, n)):
            mem[off + i] = z3.simplify(b)

    def store_bytes(self, st: _State, off: Any, bs: list, pc: int) -> None:
        """A helper's write of ``bs`` at packet offset ``off`` (skb_store_bytes, csum
        replacements). The helper checks bounds itself, so the access counts as bounded."""
        if isinstance(off, Ptr):
            raise _Incomplete(f"pc {pc}: packet offset is a pointer")
        off = S.zext(off, 32)
        st.pkt.append(self.pkt_access(st, "write", off, len(bs), pc, True, bs))
        arr = st.packet
        for i, b in enumerate(bs):
            arr = z3.Store(arr, off + i, b)
            st.flows.append(("packet", b, pc))
        st.packet = arr

    def write_fresh(self, st: _State, p, n, pc: int, what: str) -> None:
        if not isinstance(p, Ptr):
            raise _Incomplete(f"pc {pc}: {what} into a scalar address")
        if p.region == "packet":
            raise _Incomplete(f"pc {pc}: {what} into the packet is not modelled")
        size = STACK_SIZE if p.region.startswith("stack") else self.region_size(p.region)
        off = self._offset(p, n, size, pc)
        for k in range(-7, n):
            st.spills.pop((p.region, off + k), None)
        mem = st.mem.setdefault(p.region, {})
        for i in range(off, off + n):
            mem[i] = z3.BitVec(f"{what}@{pc}+{i - off}#{next(self.uid)}", 8)

    # -- helpers -----------------------------------------------------------------------------

    def map_arg(self, v, pc: int) -> str:
        if isinstance(v, Ptr) and v.region.startswith("mapref:"):
            return v.region.split(":", 1)[1]
        raise _Incomplete(f"pc {pc}: helper expects a map reference")

    def helper(self, st: _State, hid: int) -> list[_State] | None:
        pc, regs = st.pc, st.regs
        try:
            name = HELPERS[hid].name
        except KeyError:
            name = f"helper{hid}"
        args = regs[1:6]
        ret: Any = None

        def clobber(s: _State) -> None:
            for i in range(1, 6):
                s.regs[i] = self.fresh(f"clobbered.r{i}")

        step = st.steps

        def key_of(m: str) -> tuple:
            size = self.obj.maps[m].key_size if m in self.obj.maps else 0
            return tuple(self.peek(st, args[1], S.const(size), pc, "the key")) if size else ()

        if name in ("map_lookup_elem", "map_lookup_percpu_elem"):
            m = self.map_arg(args[0], pc)
            st.maps.append(MapAccess(m, "read", pc, step))
            key = key_of(m)
            spec = self.obj.maps.get(m)
            index = z3.simplify(z3.Concat(*reversed(key))) if len(key) == 4 else None
            if (
                spec is not None
                and spec.type in _ARRAY_MAPS
                and index is not None
                and not _hard(index)
            ):
                # An array always holds max_entries values: NULL exactly out of range.
                kids = []
                for k, found in self.branch(st, z3.ULT(index, spec.max_entries)):
                    if found:
                        region = self.new_region("mapval", f"{m}@{pc}")
                        k.regs[0] = Ptr(region, S.const(0))
                        k.helpers.append(HelperCall(hid, name, pc, "value", step=step, key=key,
                                                    region=region))  # fmt: skip
                    else:
                        k.regs[0] = S.const(0)
                        k.helpers.append(HelperCall(hid, name, pc, "NULL", step=step, key=key))
                    clobber(k)
                    kids.append(k)
                return kids
            null, val = st.fork(), st
            null.regs[0] = S.const(0)
            null.helpers.append(HelperCall(hid, name, pc, "NULL", step=step, key=key))
            region = self.new_region("mapval", f"{m}@{pc}")
            val.regs[0] = Ptr(region, S.const(0))
            in_range = None  # an array indexed by a hash: the range is a wish, not a condition
            if spec is not None and spec.type in _ARRAY_MAPS and index is not None:
                in_range = z3.ULT(index, spec.max_entries)
            val.helpers.append(HelperCall(hid, name, pc, "value", step=step, key=key,
                                          region=region, wish=in_range))  # fmt: skip
            clobber(null)
            clobber(val)
            return [val, null]
        if name == "ringbuf_reserve":
            m = self.map_arg(args[0], pc)
            st.maps.append(MapAccess(m, "output", pc, step))
            size = self._const(args[1]) if not isinstance(args[1], Ptr) else None
            null, val = st.fork(), st
            null.regs[0] = S.const(0)
            null.helpers.append(HelperCall(hid, name, pc, "NULL", step=step))
            region = self.new_region("ringbuf", f"{m}@{pc}")
            self.regions[region] = ("ringbuf", f"{m}@{pc}", size)
            val.regs[0] = Ptr(region, S.const(0))
            val.helpers.append(HelperCall(hid, name, pc, "value", step=step))
            clobber(null)
            clobber(val)
            return [val, null]
        key: tuple = ()
        if name in ("map_update_elem", "map_push_elem"):
            m = self.map_arg(args[0], pc)
            st.maps.append(MapAccess(m, "write", pc, step))
            vsize = self.obj.maps[m].value_size if m in self.obj.maps else 0
            if name == "map_update_elem":
                key = key_of(m)
                value = self.peek(st, args[2], S.const(vsize), pc, "the value")
            else:
                value = self.peek(st, args[1], S.const(vsize), pc, "the value")
            st.flows.append((f"map:{m}", list(key) + value, pc))
        elif name in ("map_delete_elem", "map_pop_elem"):
            m = self.map_arg(args[0], pc)
            if name == "map_pop_elem":
                st.maps.append(MapAccess(m, "read", pc, step))
            else:
                key = key_of(m)
            st.maps.append(MapAccess(m, "delete", pc, step))
        elif name == "map_peek_elem":
            st.maps.append(MapAccess(self.map_arg(args[0], pc), "read", pc, step))
        elif name in ("ringbuf_submit", "ringbuf_discard"):
            p = args[0]
            label = self.regions.get(p.region, ("", "?"))[1] if isinstance(p, Ptr) else "?"
            st.sinks.append((name, label.split("@")[0], pc))
            ret = S.const(0)
        elif name == "ringbuf_output":
            st.sinks.append((name, self.map_arg(args[0], pc), pc))
            st.maps.append(MapAccess(st.sinks[-1][1], "output", pc, step))
            st.flows.append(("ringbuf", self.peek(st, args[1], args[2], pc, "the record"), pc))
        elif name in ("perf_event_output", "skb_output", "xdp_output"):
            st.sinks.append((name, self.map_arg(args[1], pc), pc))
            st.maps.append(MapAccess(st.sinks[-1][1], "output", pc, step))
            record = self.peek(st, args[3], args[4], pc, "the record")
            if self.ptype in ("xdp", "sched_cls", "sched_act") and not isinstance(args[2], Ptr):
                # the flags' upper 32 bits ask for that many packet bytes after the record
                n = z3.simplify(z3.LShR(args[2], 32) & 0xFFFFF)
                if not (z3.is_bv_value(n) and n.as_long() == 0):
                    size = self._const(n)
                    rng = (0, size) if size is not None else None
                    st.pkt.append(PacketAccess("read", S.const(0), n, rng, True, pc))
                    record.append(z3.Select(st.packet, S.const(0)))
            st.flows.append(("perf_output", record, pc))
        elif name == "probe_write_user":
            st.flows.append(("user", self.peek(st, args[1], args[2], pc, "the source"), pc))
        elif name == "skb_store_bytes":
            n = self._const(args[3]) if not isinstance(args[3], Ptr) else None
            if n is not None and n <= STACK_SIZE:
                self.store_bytes(st, args[1], self.peek(st, args[2], args[3], pc, "from"), pc)
            else:  # a length the input decides: the write covers [off, off + len), bytes unknown
                if isinstance(args[1], Ptr) or isinstance(args[3], Ptr):
                    raise _Incomplete(f"pc {pc}: skb_store_bytes with a pointer offset or length")
                off, length = S.zext(args[1], 32), S.zext(args[3], 32)
                start, end = z3.simplify(off), z3.simplify(off + length)
                st.pkt.append(PacketAccess("write", start, end, None, True, pc, length != 0))
                st.packet = z3.Array(f"packet@{pc}#{next(self.uid)}", z3.BitVecSort(64),
                                     z3.BitVecSort(8))  # fmt: skip
                st.flows.append(("packet", self.peek(st, args[2], None, pc, "from"), pc))
        elif name in ("l3_csum_replace", "l4_csum_replace"):
            new = [self.fresh(f"{name}@{pc}", 8) for _ in range(2)]
            self.store_bytes(st, args[1], [z3.Extract(7, 0, b) for b in new], pc)
        elif name in (
            "redirect",
            "redirect_map",
            "redirect_peer",
            "redirect_neigh",
            "clone_redirect",
        ):
            target = args[0] if name != "redirect_map" else self.map_arg(args[0], pc)
            st.verdict = ("redirect" if name != "clone_redirect" else "clone_redirect", target, pc)
            if name == "redirect_map":
                st.maps.append(MapAccess(target, "read", pc, step))
                flags = args[2] if not isinstance(args[2], Ptr) else S.const(0)
                hit = z3.Bool(f"redirect_map@{pc}#{next(self.uid)}")
                ret = z3.If(hit, S.const(4), flags & 0x3)
            elif self.ptype == "xdp":
                ret = S.const(4)  # XDP_REDIRECT
            else:
                ret = S.const(7)  # TC_ACT_REDIRECT
        elif name in _PROBE_READ:
            dst, size_arg = (
                (args[2], args[3])
                if name in ("skb_load_bytes", "xdp_load_bytes")
                else (args[0], args[1])
            )
            n = self._const(size_arg) if not isinstance(size_arg, Ptr) else None
            if n is None or n > STACK_SIZE:
                raise _Incomplete(f"pc {pc}: {name} of a size that is not a fixed small constant")
            if name in ("skb_load_bytes", "xdp_load_bytes"):
                if isinstance(args[1], Ptr):
                    raise _Incomplete(f"pc {pc}: {name} at an offset that is a pointer")
                # the helper checks bounds itself; the bytes it copies are a packet read
                st.pkt.append(self.pkt_access(st, "read", S.zext(args[1], 32), n, pc, True))
            self.write_fresh(st, dst, n, pc, name)
            src = "user" if "user" in name else ("packet" if "bytes" in name else "kernel")
            st.reads.append((src, pc))
        elif name in _ADJUST:
            for i, r in enumerate(regs):
                if isinstance(r, Ptr) and r.region == "packet":
                    regs[i] = self.fresh("invalidated_packet_pointer")
            for k in [k for k, v in st.spills.items() if v.region == "packet"]:
                del st.spills[k]
            ret = self.fresh(f"{name}@{pc}")
            st.helpers.append(HelperCall(hid, name, pc, ret, step=step))
            regs[0] = ret
            clobber(st)
            ok = ret == 0
            kids = []
            delta = args[1]
            for k, success in self.branch(st, ok):
                if (
                    success
                    and name in ("xdp_adjust_head", "xdp_adjust_tail")
                    and not isinstance(delta, Ptr)
                ):
                    # The same bytes seen from a moved start (head) or end (tail); the kernel
                    # keeps at least an Ethernet header. Bytes grown at the head are unknown.
                    d = S.sext(S.zext(delta, 32), 32)
                    if name == "xdp_adjust_head":
                        i = z3.BitVec(f"i#{next(self.uid)}", 64)
                        grown = z3.Array(f"head@{pc}#{next(self.uid)}", z3.BitVecSort(64),
                                         z3.BitVecSort(8))  # fmt: skip
                        old = k.packet
                        k.packet = z3.Lambda(
                            [i], z3.If(i + d < 0, z3.Select(grown, i), z3.Select(old, i + d))
                        )
                        k.pkt_len = z3.simplify(k.pkt_len - d)
                    else:
                        k.pkt_len = z3.simplify(k.pkt_len + d)
                    k.pc_conds += [z3.UGE(k.pkt_len, 14), z3.ULE(k.pkt_len, self.max_packet)]
                    k.model = None  # the new conditions may not hold in it
                elif success:  # a new packet, which earlier packet pointers do not reach
                    k.packet = z3.Array(
                        f"packet@{pc}#{next(self.uid)}", z3.BitVecSort(64), z3.BitVecSort(8)
                    )
                    k.pkt_len = z3.BitVec(f"pkt_len@{pc}#{next(self.uid)}", 64)
                    k.pc_conds.append(
                        z3.ULE(k.pkt_len, z3.BitVecVal(self.max_packet, 64))
                    )  # holds at 0, so st.model stays a model
                k.pc = st.pc
                kids.append(k)
            return kids
        elif name == "loop":
            raise _Incomplete(f"pc {pc}: bpf_loop callbacks are not modelled")
        # tail_call records the call and continues (the tail call failed); _RECORD_ONLY and
        # _FRESH helpers, and helpers unknown here, give a fresh r0 (a policy denies unknowns).
        if ret is None:
            ret = self.fresh(f"{name}@{pc}")
        st.helpers.append(HelperCall(hid, name, pc, ret, name in MODELLED_HELPERS, step, key))
        regs[0] = ret
        clobber(st)
        return None


def explore(
    obj: BpfObject,
    section: str,
    *,
    max_paths: int = 4096,
    max_insns_per_path: int = 100_000,
    time_budget_s: float = 60.0,
    loop_bound: int = 64,
    max_packet: int = MAX_PACKET,
    concrete_data: bool = False,
) -> Exploration:
    """Explore every path of program ``section`` of ``obj`` symbolically (KrakenGuard §2.4).

    Parameters
    ----------
    obj : BpfObject
        From :func:`datahall.ebpf.loader.load` (or :func:`program_object`).
    section : str
        The program's section; its bpf-to-bpf callees are linked in.
    max_paths, max_insns_per_path, time_budget_s : budgets
        Exhausting one makes the result incomplete (``complete=False``, with the reason).
    loop_bound : int
        How often a path may jump back to the same slot before it is cut as incomplete.
    max_packet : int
        The largest packet length considered.
    concrete_data : bool
        Start ``.data``/``.bss`` from the object's bytes; by default they are symbolic (user
        space and earlier runs may have changed them). ``.rodata`` is always the object's bytes.

    Returns
    -------
    Exploration
        The paths in depth-first order; ``complete`` only when every path reached ``exit``.

    Notes
    -----
    Slots in traces and records are those of :func:`link`: the section first, callees after.
    ``.rodata`` is the object's bytes; maps' contents, ctx fields other than packet pointers,
    and helper results are free symbols, so every path is one that some input can take.

    References
    ----------
    KrakenGuard: load-time policy checking of eBPF programs, NSDI '26 (brief §2.4 items 3-4).
    Iyer, Argyraki, Candea, "Performance Interfaces for Network Functions" (PIX), NSDI '22, and
    its eBPF-SE (github.com/dslab-epfl/ebpf-se): KLEE-based exhaustive symbolic execution of eBPF.

    Examples
    --------
    >>> ex = explore(program_object([isa.insn(0xB7, dst=0, imm=2), isa.insn(0x95)]), "xdp")
    >>> ex.complete, [p.ret_value for p in ex.paths]
    (True, [2])
    """
    t0 = time.monotonic()
    if section not in obj.programs:
        raise KeyError(f"no program section {section!r}; this object has {sorted(obj.programs)}")
    try:
        ex = _Explorer(
            obj,
            section,
            max_paths,
            max_insns_per_path,
            time_budget_s,
            loop_bound,
            max_packet,
            concrete_data,
        )
    except (isa.DecodeError, KeyError) as e:
        return Exploration([], False, f"cannot link {section!r}: {e}", 0, time.monotonic() - t0)
    ex.run()
    reasons = [p.reason for p in ex.paths if not p.complete]
    reason = ex.stop or (f"{len(reasons)} incomplete path(s): {reasons[0]}" if reasons else None)
    return Exploration(ex.paths, reason is None, reason, ex.insns, time.monotonic() - t0, ex.bases)
