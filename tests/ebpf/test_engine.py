"""Tests of the symbolic engine (KrakenGuard NSDI '26, brief §2.4 item 3-4 and §2.5)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import z3

from datahall.ebpf import engine, interpreter, isa
from datahall.ebpf.engine import explore, link, program_object
from datahall.ebpf.isa import insn, lddw

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX = 0, 1, 2, 3


def ldxw(dst, src, off):
    return insn(0x61, dst=dst, src=src, off=off)


def ldxb(dst, src, off):
    return insn(0x71, dst=dst, src=src, off=off)


MOV, ADDI, EXIT = 0xB7, 0x07, insn(0x95)

# Drop packets shorter than 14 bytes; of the rest, pass those whose byte 12 is 0x08, else drop.
ETH_CHECK = [
    ldxw(2, 1, 0),  # r2 = data
    ldxw(3, 1, 4),  # r3 = data_end
    insn(0xBF, dst=4, src=2),  # r4 = data
    insn(ADDI, dst=4, imm=14),  # r4 += 14
    insn(MOV, dst=0, imm=XDP_DROP),
    insn(0x2D, dst=4, src=3, off=4),  # if r4 > r3 goto exit
    ldxb(5, 2, 12),  # r5 = byte 12
    insn(MOV, dst=0, imm=XDP_PASS),
    insn(0x15, dst=5, imm=8, off=1),  # if r5 == 8 goto exit
    insn(MOV, dst=0, imm=XDP_DROP),
    EXIT,
]


@pytest.fixture(scope="module")
def explored(loaded):
    return {
        "rewriter": explore(loaded["rewriter"], "xdp"),
        "firewall": explore(loaded["firewall"], "xdp"),
        "malicious": explore(loaded["malicious"], "kprobe/do_sys_openat2"),
    }


# -- hand-assembled programs -------------------------------------------------------------------


def test_straight_line_one_path():
    ex = explore(program_object([lddw(0, 1 << 40), insn(0x77, dst=0, imm=38), EXIT]), "xdp")
    assert ex.complete and ex.reason is None
    assert [p.ret_value for p in ex.paths] == [4]
    assert ex.insns_executed == 3
    assert ex.paths[0].trace == [0, 2, 3]


def test_bounds_check_forks_on_pkt_len():
    ex = explore(program_object(ETH_CHECK), "xdp")
    assert ex.complete
    assert sorted(p.ret_value for p in ex.paths) == [XDP_DROP, XDP_DROP, XDP_PASS]
    short = [p for p in ex.paths if not p.packet_accesses]
    assert len(short) == 1 and len(short[0].model()["packet"]) < 14
    for p in ex.paths:
        for a in p.packet_accesses:
            assert a.kind == "read" and a.range == (12, 13) and a.bounded
    passing = next(p for p in ex.paths if p.ret_value == XDP_PASS)
    pkt = passing.model()["packet"]
    assert len(pkt) >= 14 and pkt[12] == 8


def test_unchecked_packet_access_is_unbounded():
    prog = [ldxw(2, 1, 0), ldxb(0, 2, 20), EXIT]
    ex = explore(program_object(prog), "xdp")
    (p,) = ex.paths
    (a,) = p.packet_accesses
    assert a.range == (20, 21) and not a.bounded
    assert ex.complete and p.ret_value is None  # r0 is the packet byte: not fixed


def test_symbolic_return_and_ctx_field():
    # return ingress_ifindex == 7 ? XDP_TX : XDP_PASS
    prog = [
        ldxw(2, 1, 12),
        insn(MOV, dst=0, imm=XDP_TX),
        insn(0x15, dst=2, imm=7, off=1),
        insn(MOV, dst=0, imm=XDP_PASS),
        EXIT,
    ]
    ex = explore(program_object(prog), "xdp")
    assert sorted(p.ret_value for p in ex.paths) == [XDP_PASS, XDP_TX]
    tx = next(p for p in ex.paths if p.ret_value == XDP_TX)
    assert tx.model()["ctx"]["ingress_ifindex"] == 7
    assert [c.field for c in tx.ctx_accesses] == ["ingress_ifindex"]


def test_loop_bound_and_budgets_make_exploration_incomplete():
    spin = [insn(MOV, dst=0, imm=0), insn(ADDI, dst=0, imm=1), insn(0x05, off=-2), EXIT]
    ex = explore(program_object(spin), "xdp", loop_bound=5)
    assert not ex.complete and "loop" in ex.reason
    assert ex.paths[0].status == "incomplete"
    ex = explore(program_object(spin), "xdp", loop_bound=10**6, max_insns_per_path=50)
    assert not ex.complete and "instruction budget" in ex.reason
    # A bounded loop (10 iterations) within the bound completes with the exact count.
    count = [
        insn(MOV, dst=0, imm=0),
        insn(ADDI, dst=0, imm=1),
        insn(0xA5, dst=0, imm=10, off=-2),  # if r0 < 10 goto -2
        EXIT,
    ]
    ex = explore(program_object(count), "xdp", loop_bound=16)
    assert ex.complete and [p.ret_value for p in ex.paths] == [10]


def test_max_paths_is_reported():
    ex = explore(program_object(ETH_CHECK), "xdp", max_paths=1)
    assert not ex.complete and "max_paths" in ex.reason


def test_unmodelled_construct_ends_path_not_explore():
    prog = [insn(MOV, dst=2, imm=5), ldxw(0, 2, 0), EXIT]  # load through a scalar
    ex = explore(program_object(prog), "xdp")
    assert not ex.complete and "scalar" in ex.reason
    prog = [insn(0x8D, imm=1), EXIT]  # callx
    assert "callx" in explore(program_object(prog), "xdp").reason


def test_stack_spill_keeps_pointer_and_helpers_clobber():
    prog = [
        insn(0x7B, dst=10, src=1, off=-8),  # *(u64 *)(r10 - 8) = r1 (ctx)
        insn(0x85, imm=5),  # ktime_get_ns
        insn(0x79, dst=1, src=10, off=-8),  # r1 = ctx again
        ldxw(0, 1, 16),  # r0 = rx_queue_index
        EXIT,
    ]
    ex = explore(program_object(prog), "xdp")
    (p,) = ex.paths
    assert ex.complete
    assert [(h.name, h.pc) for h in p.helpers] == [("ktime_get_ns", 1)]
    assert [c.field for c in p.ctx_accesses] == ["rx_queue_index"]


def test_map_lookup_forks_null_and_value(loaded):
    ex = explore(loaded["firewall"], "xdp")
    lookups = {h.ret for p in ex.paths for h in p.helpers if h.name == "map_lookup_elem"}
    assert lookups == {"NULL", "value"}


# -- fixtures ----------------------------------------------------------------------------------


def test_rewriter_paths_and_written_bytes(explored):
    ex = explored["rewriter"]
    assert ex.complete
    assert sorted(p.ret_value for p in ex.paths) == [XDP_ABORTED, XDP_ABORTED, XDP_PASS, XDP_TX]
    for p in ex.paths:
        assert all(a.bounded and a.range is not None for a in p.packet_accesses)
        written = {b for a in p.packet_accesses if a.kind == "write" for b in range(*a.range)}
        if p.ret_value == XDP_TX:
            # MAC addresses (0..11), the TTL (22) and the header checksum (24, 25).
            assert written == set(range(12)) | {22, 24, 25}
            assert [h.name for h in p.helpers] == ["csum_diff"]
        else:
            assert written == set()


def test_firewall_verdicts_maps_and_bounds(explored):
    ex = explored["firewall"]
    assert ex.complete
    assert {XDP_DROP, XDP_PASS} == {p.ret_value for p in ex.paths}
    kinds = {(m.map, m.kind) for p in ex.paths for m in p.map_accesses}
    assert ("deny_list", "read") in kinds
    assert not {k for k in kinds if k[0] == "deny_list" and k[1] in ("write", "delete")}
    assert all(a.bounded for p in ex.paths for a in p.packet_accesses)
    assert all(a.kind == "read" for p in ex.paths for a in p.packet_accesses)
    # A packet whose TCP destination port is the blocked port 23 (from .rodata) is dropped.
    dropped_telnet = [
        p
        for p in ex.paths
        if p.ret_value == XDP_DROP
        and any(a.range == (36, 38) for a in p.packet_accesses)
        and all(h.ret != "value" for h in p.helpers if h.pc < 40)
    ]
    assert dropped_telnet
    pkt = dropped_telnet[0].model()["packet"]
    assert pkt[36:38] == b"\x00\x17"


def test_malicious_records_probe_write_user_and_printk(explored):
    ex = explored["malicious"]
    assert ex.complete
    names = {h.name for p in ex.paths for h in p.helpers}
    assert {"probe_write_user", "trace_printk", "probe_read_user_str"} <= names
    assert any(src == "user" for p in ex.paths for src, _ in p.memory_reads)
    assert {p.ret_value for p in ex.paths} == {0}


def test_every_fixture_explores_completely(loaded):
    for name, obj in loaded.items():
        for section in obj.entry_programs:
            ex = explore(obj, section, time_budget_s=10)
            assert ex.complete, (name, section, ex.reason)
            assert all(isinstance(p.path_condition, list) for p in ex.paths)


def test_sinks_and_redirect(loaded):
    ex = explore(loaded["retina_observer"], "classifier")
    assert {s[:2] for p in ex.paths for s in p.sinks} == {("ringbuf_submit", "flow_events")}
    assert {(m.map, m.kind) for p in ex.paths for m in p.map_accesses} == {
        ("flow_events", "output")
    }
    prog = [insn(MOV, dst=1, imm=3), insn(MOV, dst=2, imm=0), insn(0x85, imm=23), EXIT]
    (p,) = explore(program_object(prog), "xdp").paths
    assert p.verdict[0] == "redirect" and p.ret_value == 4


# -- soundness spot-check against the concrete interpreter (brief §2.5) -------------------------


def _holds_for_packet(path, packet: bytes, ctx=None) -> bool:
    """Whether ``path``'s condition can hold with this concrete packet (helpers left free)."""
    sym = path._symbols
    s = z3.Solver()
    s.add(*path.path_condition)
    s.add(sym.pkt_len == len(packet))
    for i, b in enumerate(packet):
        s.add(z3.Select(sym.packet, z3.BitVecVal(i, 64)) == b)
    for name, value in (ctx or {}).items():
        if name in sym.ctx:
            s.add(sym.ctx[name] == value)
    return s.check() == z3.sat


def _random_packet(rng: random.Random) -> bytes:
    n = rng.choice([0, 5, 13, 14, 20, 33, 34, 40, 60])
    pkt = bytearray(rng.randrange(256) for _ in range(n))
    if n > 13 and rng.random() < 0.7:
        pkt[12:14] = b"\x08\x00"
    return bytes(pkt)


@pytest.mark.parametrize("which", ["eth_check", "rewriter"])
def test_concrete_runs_follow_some_symbolic_path(which, loaded):
    if which == "eth_check":
        insns, ex = ETH_CHECK, explore(program_object(ETH_CHECK), "xdp")
    else:
        obj = loaded["rewriter"]
        insns, ex = isa.decode(obj.programs["xdp"].insns), explore(obj, "xdp")
    rng = random.Random(7)
    for _ in range(25):
        pkt = _random_packet(rng)
        mem, ctx = interpreter.xdp_memory(pkt)
        res = interpreter.run(insns, memory=mem, r1=ctx, helpers={28: lambda m, *a: 0}, trace=True)
        r0, fields = res.r0, {"ingress_ifindex": 1, "rx_queue_index": 0}
        matches = [
            p
            for p in ex.paths
            if p.ret_value == r0 and p.trace == res.trace and _holds_for_packet(p, pkt, fields)
        ]
        assert matches, (pkt.hex(), r0)


def test_models_replay_in_the_concrete_interpreter(explored, loaded):
    rewriter = isa.decode(loaded["rewriter"].programs["xdp"].insns)
    cases = [
        (explore(program_object(ETH_CHECK), "xdp"), ETH_CHECK),
        (explored["rewriter"], rewriter),
    ]
    for ex, code in cases:
        for p in ex.paths:
            m = p.model()
            mem, ctx = interpreter.xdp_memory(
                m["packet"],
                ingress_ifindex=m["ctx"].get("ingress_ifindex", 1),
                rx_queue_index=m["ctx"].get("rx_queue_index", 0),
            )
            returns = {h.split("@")[0]: v for h, v in m["helpers"].items()}
            helpers = {28: lambda mem, *a, v=returns.get("csum_diff", 0): v}
            assert interpreter.run(code, memory=mem, r1=ctx, helpers=helpers).r0 == p.ret_value


@pytest.mark.parametrize("hit", [False, True])
def test_firewall_concrete_runs_match_a_symbolic_trace(loaded, explored, hit):
    """Linked firewall in the interpreter, the deny list missing (or hitting); the verdict
    counters are an array, whose lookups of a valid index always find a value."""
    obj = loaded["firewall"]
    insns, relocs = link(obj, "xdp")
    index = dict(zip(isa.program_counters(insns), range(len(insns)), strict=True))
    rng = random.Random(11)
    ex = explored["firewall"]
    want = "value" if hit else "NULL"
    for _ in range(20):
        pkt = bytearray(_random_packet(rng))
        if len(pkt) >= 38 and rng.random() < 0.5:
            pkt[23] = 6  # TCP
            pkt[36:38] = rng.choice([b"\x00\x17", b"\x00\x50"])
        pkt = bytes(pkt)
        mem, ctx = interpreter.xdp_memory(pkt)
        rodata = mem.add("rodata", obj.data[".rodata"], writable=False)
        value = mem.add("value", 8)
        code = list(insns)
        for slot, rel in relocs.items():
            if rel[0] == "global":
                code[index[slot]] = lddw(code[index[slot]].dst, rodata.base + rel[2])
            elif rel[0] == "map":
                fake = 0xDEAD if rel[1] == "deny_list" else 0xBEEF
                code[index[slot]] = lddw(code[index[slot]].dst, fake)

        def lookup(m, map_addr, *a, v=value.base):
            return v if hit or map_addr == 0xBEEF else 0

        res = interpreter.run(code, memory=mem, r1=ctx, helpers={1: lookup}, trace=True)
        matches = [
            p
            for p in ex.paths
            if p.trace == res.trace
            and p.ret_value == res.r0
            and all(
                h.ret == want or (h.region or "").startswith("mapval:verdict_count")
                for h in p.helpers
            )
            and _holds_for_packet(p, pkt, {"ingress_ifindex": 1, "rx_queue_index": 0})
        ]
        assert matches, (pkt.hex(), res.r0)


def test_adjust_head_forks_and_invalidates_packet_pointers():
    keep = [
        insn(0xBF, dst=6, src=1),  # r6 = ctx
        ldxw(7, 1, 0),  # r7 = data
        insn(MOV, dst=2, imm=14),
        insn(0x85, imm=44),  # xdp_adjust_head(ctx, 14)
        insn(0x55, dst=0, imm=0, off=3),  # if r0 != 0 goto drop
        ldxw(2, 6, 0),  # fresh data pointer from ctx: fine
        insn(MOV, dst=0, imm=XDP_PASS),
        EXIT,
    ]
    drop = [insn(MOV, dst=0, imm=XDP_DROP), EXIT]
    ex = explore(program_object(keep + drop), "xdp")
    assert ex.complete and sorted(p.ret_value for p in ex.paths) == [XDP_DROP, XDP_PASS]
    stale = keep[:4] + [ldxb(0, 7, 0), EXIT]  # reads through the stale packet pointer
    ex = explore(program_object(stale), "xdp")
    assert len(ex.paths) == 2 and not ex.complete
    assert all("not a pointer" in p.reason for p in ex.paths)


def test_globals_rodata_concrete_data_symbolic():
    from datahall.ebpf.loader import Relocation

    obj = program_object([lddw(1, 0), ldxw(0, 1, 4), EXIT])
    prog = obj.programs["xdp"]
    for sec in (".rodata", ".bss"):
        rel = Relocation(0, "global", sec, 0, "", 1)
        obj.programs["xdp"] = dataclasses.replace(prog, relocations=(rel,))
        obj.data = {sec: bytes([0, 0, 0, 0, 7, 0, 0, 0])}
        (p,) = explore(obj, "xdp").paths
        if sec == ".rodata":
            assert p.ret_value == 7
        else:
            assert p.ret_value is None and set(p.model()["globals"]) == {
                ".bss+4",
                ".bss+5",
                ".bss+6",
                ".bss+7",
            }
            assert explore(obj, "xdp", concrete_data=True).paths[0].ret_value == 7


def test_unknown_helper_is_recorded_and_havocs_r0():
    prog = [insn(MOV, dst=0, imm=1), insn(0x85, imm=170), EXIT]  # 170: no model here
    ex = explore(program_object(prog), "xdp")
    (p,) = ex.paths
    assert ex.complete and p.ret_value is None
    assert [(h.id, h.modelled) for h in p.helpers] == [(170, False)]
    assert "map_lookup_elem" in engine.MODELLED_HELPERS
