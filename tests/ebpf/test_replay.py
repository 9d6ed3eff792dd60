"""Tests of counterexample replay with BPF_PROG_TEST_RUN (KrakenGuard brief §2.4 item 7, §2.5)."""

from __future__ import annotations

import dataclasses

import pytest

from datahall.ebpf import checker, kernel
from datahall.ebpf.engine import program_object
from datahall.ebpf.isa import insn
from datahall.ebpf.policy import Policy, load_policy
from datahall.ebpf.replay import Replay, replay, replay_report

if kernel.available() is not None:
    pytest.skip(kernel.available(), allow_module_level=True)

POLICIES = "src/datahall/ebpf/policies"


def _only(obj, policy, **match) -> Replay:
    """Replay the single violation of ``obj`` under ``policy`` whose expect matches ``match``."""
    report = checker.check(
        obj, Policy.model_validate(policy) if isinstance(policy, dict) else policy
    )
    hits = [v for v in report.violations if all(k in v.expect for k in match)]
    assert hits, [v.expect for v in report.violations]
    return replay(obj, hits[0])


def test_interfere_a_packet_write_confirmed(loaded):
    from pathlib import Path

    policy = load_policy(Path(__file__).parents[2] / POLICIES / "tenant-xdp.yaml")
    r = _only(loaded["interfere_a"], policy, packet_write=True)
    assert r.violation.expect == {"packet_write": [15, 15]}
    assert r.status == "confirmed", r.reason
    assert r.changed == [15]
    assert r.to_json()["status"] == "confirmed"


def test_rewriter_xdp_tx_confirmed(loaded):
    obj = loaded["rewriter"]
    report = checker.check(obj, Policy.model_validate({"returns": ["XDP_PASS", "XDP_DROP"]}))
    [r] = [x for x in replay_report(obj, report) if x.violation.expect == {"return": 3}]
    assert r.status == "confirmed", r.reason
    assert r.retval == 3
    assert r.data_out[22] == 64
    # the TTL, the checksum and the swapped MAC addresses, nothing else
    assert 22 in r.changed and set(r.changed) <= set(range(12)) | {22, 24, 25}
    short = [x for x in replay_report(obj, report) if x.violation.expect == {"return": 0}]
    for x in short:  # the ABORTED path's packet is shorter than an Ethernet header
        assert x.status == "not_replayable" and "ETH_HLEN" in x.reason


def test_firewall_deny_list_write_confirmed(loaded):
    policy = {"maps": {"deny_list": {"read": True}, "verdict_count": {"read": True, "write": True}}}
    r = _only(loaded["firewall"], policy, map=True)
    assert r.violation.expect == {"map": "deny_list", "access": "write"}
    assert r.status == "confirmed", r.reason
    [key] = r.violation.counterexample.maps["deny_list"]
    assert r.reason == f"map deny_list changed at key(s) {key.hex()}"


def test_kprobe_not_replayable(loaded):
    obj = loaded["malicious"]
    report = checker.check(obj, Policy.model_validate({"program_types": ["xdp"]}))
    assert report.violations
    for v in report.violations:
        r = replay(obj, v)
        assert r.status == "not_replayable" and "kprobe" in r.reason


def test_packet_read_not_replayable(loaded):
    r = _only(loaded["interfere_a"], {"packet": [{"read": [[0, 11]]}]}, packet_read=True)
    assert r.status == "not_replayable"
    assert r.reason == "a packet_read violation leaves no trace a test run can observe"


def test_returned_packet_byte_confirmed():
    k = 20
    prog = program_object(
        [
            insn(0x61, dst=2, src=1, off=0),  # r2 = ctx->data
            insn(0x61, dst=3, src=1, off=4),  # r3 = ctx->data_end
            insn(0xBF, dst=4, src=2),  # r4 = r2
            insn(0x07, dst=4, imm=k + 1),  # r4 += k + 1
            insn(0x2D, dst=4, src=3, off=2),  # if r4 > r3 goto pass
            insn(0x71, dst=0, src=2, off=k),  # r0 = packet[k]
            insn(0x95),
            insn(0xB7, dst=0, imm=2),  # pass: r0 = XDP_PASS
            insn(0x95),
        ]
    )
    report = checker.check(prog, Policy.model_validate({"returns": ["XDP_PASS"]}))
    rs = replay_report(prog, report)
    assert rs
    for r in rs:
        assert r.status == "confirmed", r.reason
        assert r.retval == r.violation.counterexample.packet[k]
        assert r.violation.expect == {"return": r.retval}


def test_no_kernel_or_no_counterexample(loaded, monkeypatch):
    obj = loaded["rewriter"]
    report = checker.check(obj, Policy.model_validate({"returns": ["XDP_PASS", "XDP_DROP"]}))
    v = next(v for v in report.violations if v.expect == {"return": 3})
    bare = dataclasses.replace(v, counterexample=None)
    assert replay(obj, bare).reason == "the violation has no counterexample"
    monkeypatch.setattr(kernel, "available", lambda: "bpf() not permitted: EPERM")
    r = replay(obj, v)
    assert (r.status, r.reason) == ("not_replayable", "bpf() not permitted: EPERM")
