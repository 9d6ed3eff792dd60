"""Policy verdicts and interference (datahall.ebpf.checker) on our fixtures and on hand-assembled
programs whose every path we know."""

import json
from importlib.resources import files

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datahall.ebpf import interpreter, isa
from datahall.ebpf.checker import CheckError, check, interfere, when_condition
from datahall.ebpf.engine import program_object
from datahall.ebpf.isa import insn
from datahall.ebpf.policy import PacketWhen, Policy, load_policy

POLICIES = files("datahall.ebpf") / "policies"


def policy(name: str) -> Policy:
    return load_policy(str(POLICIES / f"{name}.yaml"))


def P(data: dict) -> Policy:
    return Policy.model_validate(data)


# r2 = ctx->data; r3 = ctx->data_end
DATA = [insn(0x61, dst=2, src=1, off=0), insn(0x61, dst=3, src=1, off=4)]
# if (data + 1 > data_end) return XDP_PASS; return *(u8 *)data
RETURN_FIRST_BYTE = DATA + [
    insn(0xBF, dst=4, src=2),
    insn(0x07, dst=4, imm=1),
    insn(0x2D, dst=4, src=3, off=2),
    insn(0x71, dst=0, src=2, off=0),
    insn(0x95),
    insn(0xB7, dst=0, imm=2),
    insn(0x95),
]


# -- fixtures under the shipped policies -----------------------------------------------------------


def test_the_shipped_policies_admit_the_programs_written_for_them(loaded):
    assert check(loaded["rewriter"], policy("ttl-rewriter")).verdict == "COMPLIANT"
    for name in ("firewall", "interfere_b"):
        report = check(loaded[name], policy("tenant-xdp"))
        assert report.verdict == "COMPLIANT" and report.exit_code == 0, name
    for name in ("retina_observer", "flow_counter"):
        assert check(loaded[name], policy("no-kernel-writes")).verdict == "COMPLIANT"


def test_a_tenant_rewriting_the_tos_byte_is_caught_with_a_replayable_packet(loaded):
    report = check(loaded["interfere_a"], policy("tenant-xdp"))
    assert (report.verdict, report.exit_code) == ("VIOLATION", 1)
    (v,) = report.violations
    assert v.rule == "packet"
    assert v.message == (
        "packet write of bytes 15..15 is outside the write windows that apply on this path"
        " (none here)"
    )
    assert v.source == "interfere_a.c:42: iph->tos = DSCP_AF41 | (iph->tos & 3);"
    assert (v.section, v.insn, v.expect) == ("xdp", 35, {"packet_write": [15, 15]})
    pkt = v.counterexample.packet
    # The path to the write: an IPv4 header present, and not UDP to port 53.
    assert len(pkt) >= 34 and pkt[12:14] == b"\x08\x00" and pkt[14] == 0x45
    assert not (pkt[23] == 17 and pkt[36:38] == b"\x00\x35")
    # The concrete interpreter, run on the counterexample, rewrites exactly that byte.
    code = isa.decode(loaded["interfere_a"].programs["xdp"].insns)
    mem, ctx = interpreter.xdp_memory(pkt)
    lookup = 1, lambda m, *a: 0  # the lookup misses: the write does not depend on the map
    res = interpreter.run(code, memory=mem, r1=ctx, helpers=dict([lookup]))
    after = bytes(mem["packet"].data)
    assert res.r0 == 2 and [i for i in range(len(pkt)) if after[i] != pkt[i]] == [15]


def test_the_malicious_kprobe_is_refused_for_both_helpers(loaded):
    report = check(loaded["malicious"], policy("no-kernel-writes"))
    assert report.verdict == "VIOLATION"
    got = [(v.section, v.message, v.source) for v in report.violations]
    assert got == [
        (
            "kprobe/do_sys_openat2",
            "call to helper trace_printk (id 6) is not allowed by the policy",
            'malicious.c:23: bpf_printk("open %s", path);',
        ),
        (
            "kprobe/do_sys_openat2",
            "call to helper probe_write_user (id 36) is not allowed by the policy",
            "malicious.c:24: bpf_probe_write_user((void *)filename, decoy, sizeof(decoy));",
        ),
        (
            "kretprobe/do_sys_openat2",
            "call to helper trace_printk (id 6) is not allowed by the policy",
            'malicious.c:31: bpf_printk("openat2 returned %ld", ret);',
        ),
    ]
    # The witness: probe_read_user_str succeeded (returned >= 0), so the write is reached.
    helpers = report.violations[1].counterexample.helpers
    assert helpers["probe_read_user_str@13"] < 1 << 63


def test_map_permissions_are_checked_per_access_kind(loaded):
    grant = {"deny_list": {"read": True}, "verdict_count": {"read": True, "write": True}}
    report = check(loaded["firewall"], P({"maps": grant}))
    (v,) = report.violations
    assert (v.rule, v.source, v.paths) == (
        "maps",
        "firewall.c:55: __sync_fetch_and_add(hits, 1);",
        1,
    )
    assert v.message == (
        "store into a value of map deny_list needs write access, which maps does not grant"
    )
    # The counterexample puts the packet's source address in the deny list.
    cex = v.counterexample
    assert cex.maps["deny_list"] == {cex.packet[26:30]: bytes(8)}
    assert report.programs[0].maps == {
        "deny_list": ["read", "write"],
        "verdict_count": ["read", "write"],
    }
    grant["deny_list"]["write"] = True
    assert check(loaded["firewall"], P({"maps": grant})).verdict == "COMPLIANT"


def test_information_flow_rules(loaded):
    report = check(loaded["flow_counter"], P({"flow": {"deny": [["packet", "map:*"]]}}))
    assert [(v.rule, v.source) for v in report.violations] == [
        ("flow", "flow_counter.c:59: stats->bytes += skb->len;"),
        ("flow", "flow_counter.c:63: bpf_map_update_elem(&flows, &key, &fresh, BPF_NOEXIST);"),
    ]
    assert report.violations[0].message == (
        "data from packet flows into map:flows, which flow.deny forbids"
    )
    observer = check(loaded["retina_observer"], P({"flow": {"deny": [["packet", "ringbuf"]]}}))
    assert len(observer.violations) == 9
    assert check(
        loaded["retina_observer"], P({"flow": {"deny": [["kernel", "ringbuf"]]}})
    ).verdict == ("COMPLIANT")


def test_a_when_condition_applies_only_where_the_path_proves_it(loaded):
    udp = {"packet": [{"read": [[0, 33]]}, {"read": [[34, 37]], "when": {"ip_proto": "udp"}}]}
    assert check(loaded["interfere_a"], P(udp)).verdict == "COMPLIANT"
    # dport 53 is what the read itself decides, so it cannot hold before the read.
    dns = {
        "packet": [
            {"read": [[0, 33]]},
            {"read": [[34, 37]], "when": {"ip_proto": "udp", "dport": 53}},
        ]
    }
    (v,) = check(loaded["interfere_a"], P(dns)).violations
    assert v.message == (
        "packet read of bytes 36..37 is outside the read windows that apply on this path (0..33)"
    )


def test_a_budget_that_runs_out_gives_unknown_which_fails_closed(loaded):
    report = check(loaded["firewall"], max_paths=3)
    assert (report.verdict, report.exit_code) == ("UNKNOWN", 3)
    assert report.programs[0].unknown == ["max_paths (3) reached"]
    budget = check(loaded["firewall"], P({"budget": {"max_paths": 3}}))
    assert budget.verdict == "UNKNOWN"


def test_a_violation_wins_over_unknown(loaded):
    report = check(loaded["malicious"], policy("no-kernel-writes"), max_paths=1)
    assert report.verdict == "VIOLATION"


def test_sections_and_entry_functions(loaded, fixture_objects):
    report = check(fixture_objects["malicious"], section="kretprobe/do_sys_openat2")
    assert [p.section for p in report.programs] == ["kretprobe/do_sys_openat2"]
    by_entry = check(loaded["malicious"], P({"entry_function": "open_ret"}))
    assert [p.name for p in by_entry.programs] == ["open_ret"]
    with pytest.raises(CheckError, match="no program section 'xdp'"):
        check(loaded["malicious"], section="xdp")
    with pytest.raises(CheckError, match="no program named 'nope'"):
        check(loaded["malicious"], P({"entry_function": "nope"}))
    wrong = check(loaded["rewriter"], P({"program_types": ["sched_cls"]}))
    assert [v.message for v in wrong.violations] == [
        "a xdp program; program_types allows sched_cls"
    ]


def test_the_report_is_json(loaded):
    report = check(loaded["interfere_a"], policy("tenant-xdp"))
    data = json.loads(report.dumps())
    assert data["verdict"] == "VIOLATION" and data["exit_code"] == 1
    (prog,) = data["programs"]
    assert (prog["paths"], prog["complete_paths"], prog["returns"]) == (7, 7, [1, 2])
    cex = prog["violations"][0]["counterexample"]
    assert bytes.fromhex(cex["packet"]) == report.violations[0].counterexample.packet
    assert cex["packet_summary"].startswith("IPv4 ")


# -- hand-assembled programs -----------------------------------------------------------------------


def test_a_packet_access_without_a_bounds_check_is_a_violation():
    prog = program_object(DATA + [insn(0x71, dst=0, src=2, off=0), insn(0x95)])
    (v,) = check(prog).violations
    assert v.rule == "packet"
    assert (
        v.message == "packet read of bytes 0..0 is not proved within data_end by the path's checks"
    )
    assert v.counterexample.packet == b""


def test_a_symbolic_return_value_is_checked_by_the_solver():
    prog = program_object(RETURN_FIRST_BYTE)
    (v,) = check(prog, P({"returns": ["XDP_PASS", "XDP_DROP"]})).violations
    value = v.expect["return"]
    assert value not in (1, 2) and v.counterexample.packet[0] == value
    assert (
        v.message
        == f"can return {value}"
        + ({0: " (XDP_ABORTED)", 3: " (XDP_TX)", 4: " (XDP_REDIRECT)"}.get(value, ""))
        + ", which returns does not allow"
    )
    everything = P({"returns": list(range(256))})
    assert check(prog, everything).verdict == "COMPLIANT"


def test_a_return_value_from_a_helper_is_checked_against_every_allowed_code():
    prog = program_object([insn(0x85, imm=7), insn(0x95)])  # return bpf_get_prandom_u32()
    (v,) = check(prog, P({"returns": list(range(100))})).violations
    drawn = v.counterexample.helpers["get_prandom_u32@0"]
    assert v.expect["return"] == drawn - (1 << 32 if drawn >= 1 << 31 else 0)
    assert not 0 <= drawn < 100


def test_unmodelled_helpers_are_denied_by_default():
    prog = program_object([insn(0x85, imm=84), insn(0xB7, dst=0, imm=2), insn(0x95)])
    (v,) = check(prog).violations
    assert v.message == (
        "helper sk_lookup_tcp (id 84) has no model here and is denied by default;"
        " name it in helpers.allow to accept any result from it"
    )
    assert check(prog, P({"helpers": {"allow": ["sk_lookup_tcp"]}})).verdict == "COMPLIANT"


def test_conditional_rules_follow_the_order_of_events():
    ktime_then_tx = program_object([insn(0x85, imm=5), insn(0xB7, dst=0, imm=3), insn(0x95)])
    rule = {"if": {"helper_called": "ktime_get_ns"}, "then": {"returns": ["XDP_PASS"]}}
    (v,) = check(ktime_then_tx, P({"rules": [rule]})).violations
    assert (v.rule, v.message) == ("returns", "returns 3 (XDP_TX), which returns does not allow")
    twice = program_object([insn(0x85, imm=5), insn(0x85, imm=5), insn(0xB7, dst=0, imm=2),
                            insn(0x95)])  # fmt: skip
    once = {
        "if": {"helper_called": "ktime_get_ns"},
        "then": {"helpers": {"deny": ["ktime_get_ns"]}},
    }
    (v,) = check(twice, P({"rules": [once]})).violations
    assert (v.rule, v.insn) == ("rules", 1)


def test_ctx_fields_are_checked():
    prog = program_object([insn(0x61, dst=0, src=1, off=12), insn(0x95)])  # ingress_ifindex
    (v,) = check(prog, P({"ctx": {"read": ["data", "data_end"]}})).violations
    assert v.message == "read of ctx field ingress_ifindex is not allowed by ctx.read"


@pytest.mark.parametrize(
    ("when", "packet", "holds"),
    [
        (
            {"ip_proto": "udp", "dport": 53},
            "0800" + "45" + "00" * 8 + "11" + "00" * 10 + "0000" + "0035",
            True,
        ),
        (
            {"ip_proto": "udp", "dport": 53},
            "0800" + "46" + "00" * 8 + "11" + "00" * 10 + "0000" + "0035",
            False,
        ),
        ({"saddr": "10.0.0.0/8"}, "0800" + "45" + "00" * 11 + "0a010203" + "00" * 8, True),
        ({"saddr": "10.0.0.0/8"}, "0800" + "45" + "00" * 11 + "0b010203" + "00" * 8, False),
        ({"eth_type": 0x86DD}, "86dd" + "00" * 40, True),
    ],
)
def test_when_conditions_read_the_headers_at_their_offsets(when, packet, holds):
    import z3

    pkt = bytes(12) + bytes.fromhex(packet)
    arr = z3.Array("p", z3.BitVecSort(64), z3.BitVecSort(8))
    s = z3.Solver()
    s.add(*[z3.Select(arr, z3.BitVecVal(i, 64)) == b for i, b in enumerate(pkt)])
    s.add(when_condition(PacketWhen.model_validate(when), arr, z3.BitVecVal(len(pkt), 64)))
    assert (s.check() == z3.sat) is holds


# -- soundness: a COMPLIANT program keeps its policy on concrete runs (brief §2.5) -----------------


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    header=st.binary(min_size=0, max_size=60),
    ipv4=st.booleans(),
)
def test_a_compliant_rewriter_never_writes_outside_its_windows(loaded, header, ipv4):
    pol = policy("ttl-rewriter")
    assert check(loaded["rewriter"], pol).verdict == "COMPLIANT"
    pkt = bytearray(header)
    if ipv4 and len(pkt) >= 14:
        pkt[12:14] = b"\x08\x00"
    code = isa.decode(loaded["rewriter"].programs["xdp"].insns)
    mem, ctx = interpreter.xdp_memory(bytes(pkt))
    res = interpreter.run(code, memory=mem, r1=ctx, helpers={28: lambda m, *a: 0x1234})
    after = bytes(mem["packet"].data)
    changed = [i for i in range(len(pkt)) if after[i] != pkt[i]]
    assert all(pol.packet_allowed("write", i, i) for i in changed)
    assert pol.return_allowed(res.r0, "xdp")


# -- interference ----------------------------------------------------------------------------------


def test_tenant_a_before_tenant_b_interferes_three_ways(loaded):
    result = interfere(loaded["interfere_a"], loaded["interfere_b"])
    assert (result.verdict, result.exit_code) == ("INTERFERE", 1)
    assert [c.kind for c in result.conflicts] == ["packet", "verdict", "map"]
    packet, verdict, shared = result.conflicts
    assert "may write packet bytes 15..15" in packet.message and "overlap 15..15" in packet.message
    assert "can return XDP_DROP" in verdict.message
    drop = verdict.counterexample.packet  # a DNS query over UDP
    assert drop[12:14] == b"\x08\x00" and drop[23] == 17 and drop[36:38] == b"\x00\x35"
    assert shared.message.startswith("both use map shared_stats")
    assert json.loads(json.dumps(result.to_json()))["verdict"] == "INTERFERE"


def test_tenant_b_first_only_shares_the_map(loaded):
    result = interfere(loaded["interfere_b"], loaded["interfere_a"])
    assert [c.kind for c in result.conflicts] == ["map"]


def test_programs_touching_nothing_in_common_are_independent():
    pass_only = program_object([insn(0xB7, dst=0, imm=2), insn(0x95)])
    reads = program_object(DATA + [
        insn(0xBF, dst=4, src=2), insn(0x07, dst=4, imm=1), insn(0x2D, dst=4, src=3, off=1),
        insn(0x71, dst=5, src=2, off=0), insn(0xB7, dst=0, imm=2), insn(0x95),
    ])  # fmt: skip  # reads byte 0, passes
    returns_byte = program_object(RETURN_FIRST_BYTE)  # the byte may be XDP_DROP
    verdicts = [c.message for c in interfere(returns_byte, pass_only).conflicts]
    assert [m.split("can return ")[1].split(",")[0] for m in verdicts] == [
        "XDP_ABORTED", "XDP_DROP", "XDP_TX", "XDP_REDIRECT"
    ]  # fmt: skip
    assert interfere(pass_only, reads).verdict == "INDEPENDENT"
    assert interfere(reads, pass_only).verdict == "INDEPENDENT"
    writer = program_object(DATA + [
        insn(0xBF, dst=4, src=2), insn(0x07, dst=4, imm=1), insn(0x2D, dst=4, src=3, off=1),
        insn(0x72, dst=2, off=0, imm=7), insn(0xB7, dst=0, imm=2), insn(0x95),
    ])  # fmt: skip
    assert [c.kind for c in interfere(writer, reads).conflicts] == ["packet"]
    assert interfere(reads, writer).verdict == "INDEPENDENT"


def test_an_imported_artifact_policy_decides_as_its_export(loaded):
    """Brief §2.5: import a KrakenGuard policy, export ours, and the decisions agree."""
    artifact = {
        "packet_constraints": [
            {"sPort": "*", "dPort": "*", "sIP": "*", "dIP": "*", "read-access": "0-37",
             "write-access": "22-22"},
        ],
        "restricted_helpers": ["bpf_probe_write_user", "bpf_trace_printk"],
        "map_access": [{"name": "shared_stats", "access": "Read"},
                       {"name": "deny_list", "access": "ReadWrite"},
                       {"name": "verdict_count", "access": "ReadWrite"}],
    }  # fmt: skip
    imported = load_policy(json.dumps(artifact), source="kg.json")
    exported = load_policy(imported.to_yaml(), source="ours.yaml")
    verdicts = {}
    for name in ("firewall", "interfere_a", "interfere_b", "rewriter", "malicious"):
        a, b = check(loaded[name], imported), check(loaded[name], exported)
        assert [v.message for v in a.violations] == [v.message for v in b.violations], name
        verdicts[name] = a.verdict
    assert verdicts == {
        "firewall": "COMPLIANT",
        "interfere_a": "VIOLATION",  # writes byte 15 and counts into a read-only map
        "interfere_b": "VIOLATION",  # counts into the read-only map
        "rewriter": "VIOLATION",  # writes MACs and the checksum
        "malicious": "VIOLATION",
    }


def test_interference_needs_programs_of_one_hook(loaded):
    with pytest.raises(CheckError, match="programs chained on one hook have the same type"):
        interfere(loaded["interfere_a"], loaded["flow_counter"])
    with pytest.raises(CheckError, match="has 2 programs"):
        interfere(loaded["malicious"], loaded["interfere_a"])
