"""Regression tests from a review of the checker (helper-33): each was a program the checker
judged wrongly (most of them COMPLIANT while breaking the policy) before its fix."""

from __future__ import annotations

import dataclasses

from datahall.ebpf.checker import check, interfere
from datahall.ebpf.engine import program_object
from datahall.ebpf.helpers import by_name
from datahall.ebpf.isa import insn, lddw
from datahall.ebpf.loader import BpfMap, Relocation
from datahall.ebpf.policy import Policy

EXIT = insn(0x95)


def call(name):
    return insn(0x85, imm=by_name(name).id)


def mov(d, imm):
    return insn(0xB7, dst=d, imm=imm)


def movr(d, s):
    return insn(0xBF, dst=d, src=s)


def add(d, imm):
    return insn(0x07, dst=d, imm=imm)


def ldxw(d, s, off):
    return insn(0x61, dst=d, src=s, off=off)


def jgt(d, s, off):  # if d > s goto +off
    return insn(0x2D, dst=d, src=s, off=off)


def jne(d, imm, off):
    return insn(0x55, dst=d, imm=imm, off=off)


def jeq(d, imm, off):
    return insn(0x15, dst=d, imm=imm, off=off)


def with_map(insns, slots, mtype=1, key_size=4, value_size=8, max_entries=16,
             section="xdp", ptype="xdp"):  # fmt: skip
    """A program_object whose lddw at each slot in `slots` loads map ``m``."""
    obj = program_object(insns, section, ptype)
    prog = obj.programs[section]
    rel = tuple(Relocation(s * 8, "map", "m", 0, "m", 1) for s in slots)
    obj.programs[section] = dataclasses.replace(prog, relocations=rel)
    obj.maps["m"] = BpfMap("m", mtype, key_size, value_size, max_entries)
    return obj


def P(d):
    return Policy.model_validate(d)


# --- packet reads the checker does not see ------------------------------------------------------


def test_skb_load_bytes_read_outside_window_is_a_violation():
    # tc: bpf_skb_load_bytes(skb, 100, fp-8, 4) reads packet bytes 100..103; the policy lets
    # the program read 0..13 only.
    prog = [
        movr(6, 1), mov(2, 100), movr(3, 10), add(3, -8), mov(4, 4), call("skb_load_bytes"),
        mov(0, 0), EXIT,
    ]  # fmt: skip
    obj = program_object(prog, "tc", "sched_cls")
    report = check(obj, P({"packet": {"read": [[0, 13]]}}))
    assert report.verdict == "VIOLATION", report.to_json()


def test_xdp_load_bytes_read_outside_window_is_a_violation():
    prog = [
        mov(2, 100), movr(3, 10), add(3, -8), mov(4, 4), call("xdp_load_bytes"),
        mov(0, 2), EXIT,
    ]  # fmt: skip
    report = check(program_object(prog), P({"packet": {"read": [[0, 13]]}}))
    assert report.verdict == "VIOLATION", report.to_json()


def test_map_key_read_from_packet_is_checked_against_read_window():
    # key = data + 40 (bounds-checked up to 44): map_lookup_elem reads packet bytes 40..43,
    # outside the read window 0..13.
    prog = [
        ldxw(2, 1, 0), ldxw(3, 1, 4), movr(4, 2), add(4, 44), jgt(4, 3, 4),
        lddw(1, 0), add(2, 40), call("map_lookup_elem"),
        mov(0, 2), EXIT,
    ]  # fmt: skip
    obj = with_map(prog, [5])
    report = check(obj, P({"packet": {"read": [[0, 13]]}, "maps": {"m": {"read": True}}}))
    assert report.verdict == "VIOLATION", report.to_json()


# --- packet writes recorded with the wrong length -------------------------------------------------


def test_skb_store_bytes_variable_length_write_is_checked_in_full():
    # tc: v = lookup(m, &0); if (!v) return; len = (skb->mark & 7) + 1;
    # bpf_skb_store_bytes(skb, 12, v, len, 0) writes bytes 12..12+len-1 (up to 12..19); the
    # policy lets it write 12..13 only. The engine records the write with as many bytes as the
    # source region happens to hold in its model (none here), so 12..11 passes.
    prog = [
        movr(6, 1), insn(0x62, dst=10, off=-4, imm=0),
        lddw(1, 0), movr(2, 10), add(2, -4), call("map_lookup_elem"),
        jeq(0, 0, 9),
        movr(3, 0), ldxw(4, 6, 8), insn(0x57, dst=4, imm=7), add(4, 1),
        movr(1, 6), mov(2, 12), mov(5, 0), call("skb_store_bytes"),
        mov(0, 0), EXIT,
    ]  # fmt: skip
    obj = with_map(prog, [2], mtype=2, value_size=64, section="tc", ptype="sched_cls")
    report = check(obj, P({"packet": {"write": [[12, 13]]}}))
    assert report.verdict == "VIOLATION", report.to_json()


# --- paths the engine prunes as infeasible --------------------------------------------------------


def test_data_meta_is_not_the_same_pointer_as_data():
    # After bpf_xdp_adjust_meta(ctx, -4), data_meta + 4 <= data holds, and the program calls
    # trace_printk, which the policy denies. The engine maps data_meta to packet offset 0 (as
    # data), so it finds `meta + 4 > data` always true and never explores the call.
    prog = [
        movr(6, 1), mov(2, -4), call("xdp_adjust_meta"), jne(0, 0, 6),
        ldxw(2, 6, 8), ldxw(3, 6, 0), movr(4, 2), add(4, 4), jgt(4, 3, 1),
        call("trace_printk"),
        mov(0, 2), EXIT,
    ]  # fmt: skip
    report = check(program_object(prog), P({"helpers": {"deny": ["trace_printk"]}}))
    assert report.verdict != "COMPLIANT", report.to_json()


# --- rules ----------------------------------------------------------------------------------------


def test_rule_if_returns_then_helpers_deny_is_enforced():
    # rules: if the program returns XDP_TX, it must not have called trace_printk.
    prog = [call("trace_printk"), mov(0, 3), EXIT]
    pol = P({"rules": [{"if": {"returns": ["XDP_TX"]},
                        "then": {"helpers": {"deny": ["trace_printk"]}}}]})  # fmt: skip
    assert check(program_object(prog), pol).verdict == "VIOLATION"


def test_symbolic_return_with_rule_if_returns_integer_is_checked():
    # r0 = ctx->ingress_ifindex (any value); the rule forbids returning 42 (it narrows the
    # allowed set to XDP_PASS when the program returns 42).
    prog = [ldxw(0, 1, 12), EXIT]
    pol = P({"rules": [{"if": {"returns": [42]}, "then": {"returns": ["XDP_PASS"]}}]})
    assert pol.return_allowed(42, "xdp") is False
    assert check(program_object(prog), pol).verdict == "VIOLATION"


# --- interference ---------------------------------------------------------------------------------


def test_interfere_sees_redirect_map_verdict():
    # return bpf_redirect_map(&devmap, 0, 0): XDP_REDIRECT or XDP_ABORTED, both pre-empting.
    first = with_map([lddw(1, 0), mov(2, 0), mov(3, 0), call("redirect_map"), EXIT], [0], mtype=14)
    second = program_object([mov(0, 2), EXIT])
    result = interfere(first, second)
    assert result.verdict == "INTERFERE", result.to_json()


def test_interfere_sees_symbolic_drop_verdict():
    # return ctx->rx_queue_index: may be XDP_DROP (1).
    first = program_object([ldxw(0, 1, 16), EXIT])
    second = program_object([mov(0, 2), EXIT])
    assert interfere(first, second).verdict == "INTERFERE"


def test_interfere_sees_xdp_adjust_head():
    # The first strips 14 bytes with bpf_xdp_adjust_head; the second reads bytes 0..13.
    first = program_object([mov(2, 14), call("xdp_adjust_head"), mov(0, 2), EXIT])
    second = program_object([
        ldxw(2, 1, 0), ldxw(3, 1, 4), movr(4, 2), add(4, 14), jgt(4, 3, 1),
        insn(0x71, dst=5, src=2, off=12),
        mov(0, 2), EXIT,
    ])  # fmt: skip
    result = interfere(first, second)
    assert result.verdict == "INTERFERE", result.to_json()


# --- counterexamples ------------------------------------------------------------------------------


def test_counterexample_after_xdp_adjust_head_drives_the_violating_path():
    # bpf_xdp_adjust_head(ctx, 14); if the new first byte (the old byte 14) is 0x99, XDP_TX.
    # A counterexample must be a packet whose byte 14 is 0x99 (at least 15 bytes long); the
    # engine gives the adjusted packet fresh bytes and length unrelated to the input packet.
    prog = [
        movr(6, 1), mov(2, 14), call("xdp_adjust_head"), jne(0, 0, 8),
        ldxw(2, 6, 0), ldxw(3, 6, 4), movr(4, 2), add(4, 1), jgt(4, 3, 4),
        insn(0x71, dst=5, src=2, off=0), jne(5, 0x99, 2),
        mov(0, 3), EXIT,
        mov(0, 2), EXIT,
    ]  # fmt: skip
    report = check(program_object(prog), P({"returns": ["XDP_PASS"]}))
    assert report.verdict == "VIOLATION"
    cex = report.violations[0].counterexample
    assert cex is not None
    assert len(cex.packet) >= 15 and cex.packet[14] == 0x99, cex.packet.hex()


# --- false positives ------------------------------------------------------------------------------


def test_read_spanning_two_adjacent_windows_is_allowed():
    # Windows 0..13 and 14..33 together allow a 4-byte read of 12..15 (packet_window merges
    # them; check_packet wants one window to hold the whole access).
    prog = [
        ldxw(2, 1, 0), ldxw(3, 1, 4), movr(4, 2), add(4, 16), jgt(4, 3, 1),
        ldxw(5, 2, 12),
        mov(0, 2), EXIT,
    ]  # fmt: skip
    pol = P({"packet": [{"read": [[0, 13]]}, {"read": [[14, 33]]}]})
    assert pol.packet_allowed("read", 12, 15)
    assert check(program_object(prog), pol).verdict == "COMPLIANT"


# --- messages -------------------------------------------------------------------------------------


def test_policy_that_is_a_directory_gets_a_clear_error(tmp_path):
    from datahall.ebpf.policy import PolicyError, resolve_policy

    try:
        resolve_policy(str(tmp_path))
    except PolicyError as e:
        text = str(e)
    else:  # pragma: no cover
        raise AssertionError("a directory is not a policy")
    assert str(tmp_path) in text and "policy.yaml" not in text, text


def test_perf_event_output_packet_copy_is_a_packet_read():
    # In XDP, bpf_perf_event_output(ctx, &events, (u64)len << 32 | BPF_F_CURRENT_CPU, &rec, 8)
    # also copies the first `len` (here 1500) packet bytes to user space (bpf_xdp_event_output);
    # the policy lets the program read bytes 0..13 only and forbids packet -> perf_output.
    prog = [
        insn(0x7A, dst=10, off=-8, imm=0),
        lddw(2, 0), lddw(3, (1500 << 32) | 0xFFFFFFFF), movr(4, 10), add(4, -8), mov(5, 8),
        call("perf_event_output"),
        mov(0, 2), EXIT,
    ]  # fmt: skip
    obj = with_map(prog, [1], mtype=4, key_size=4, value_size=4)
    pol = P({"packet": {"read": [[0, 13]]}, "flow": {"deny": [["packet", "perf_output"]]}})
    assert check(obj, pol).verdict == "VIOLATION"
