"""KrakenGuard policies: our YAML/JSON form, errors at their line, artifact import, decisions."""

import json
import textwrap
from pathlib import Path

import pytest

from datahall.ebpf.policy import (
    Policy,
    PolicyError,
    from_krakenguard,
    is_krakenguard,
    load_policy,
)

SKETCH = """\
program_types: [xdp]
helpers: {allow: [map_lookup_elem, map_update_elem, ktime_get_ns], deny: [probe_write_user, trace_printk]}
maps: {counters: {read: true, write: true, delete: false}, policy_state: {read: true}}
packet: {read: [[0, 53]], write: [[22, 22]], when: {eth_type: 0x0800, ip_proto: 6}}
ctx: {read: [data, data_end, ingress_ifindex], write: []}
returns: [XDP_PASS, XDP_DROP]
rules: [{if: {helper_called: map_update_elem}, then: {returns: [XDP_PASS]}}]
flow: {deny: [[packet, "map:*"], [kernel, perf_output]]}
budget: {max_paths: 10000, max_insns_per_path: 100000, time_s: 30}
"""


def errors(text: str) -> list[str]:
    with pytest.raises(PolicyError) as e:
        load_policy(textwrap.dedent(text))
    return str(e.value).splitlines()


# --- valid policies -------------------------------------------------------------------------------


def test_the_briefs_sketch_loads_with_every_section():
    p = load_policy(SKETCH)
    assert p.program_types == ["xdp"]
    assert p.helpers.allow == ["map_lookup_elem", "map_update_elem", "ktime_get_ns"]
    assert p.helpers.deny == ["probe_write_user", "trace_printk"]
    assert p.maps["policy_state"].read and not p.maps["policy_state"].write
    (entry,) = p.packet
    assert entry.read == [(0, 53)] and entry.write == [(22, 22)]
    assert entry.when.eth_type == 0x0800 and entry.when.ip_proto == 6
    assert p.ctx.read == ["data", "data_end", "ingress_ifindex"] and p.ctx.write == []
    assert p.returns == ["XDP_PASS", "XDP_DROP"]
    assert p.rules[0].if_.helper_called == "map_update_elem"
    assert p.rules[0].then.returns == ["XDP_PASS"]
    assert p.flow.deny == [("packet", "map:*"), ("kernel", "perf_output")]
    assert (p.budget.max_paths, p.budget.max_insns_per_path, p.budget.time_s) == (10000, 100000, 30)


def test_json_files_and_paths(tmp_path: Path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"helpers": {"deny": ["bpf_trace_printk"]}, "returns": [2, "1"]}))
    p = load_policy(f)
    assert p.helpers.deny == ["trace_printk"] and p.returns == [2, 1]
    assert load_policy(str(f)) == p
    assert load_policy("") == Policy()
    with pytest.raises(PolicyError, match=r"nope.yaml: no such file"):
        load_policy(tmp_path / "nope.yaml")


def test_tc_policy_rules_flows_and_conditions():
    p = load_policy(
        """
        program_types: [tc]
        ctx: {read: [mark, len, data], write: [mark]}
        returns: [TC_ACT_OK, TC_ACT_SHOT, -1]
        packet:
          - {read: [[0, 13]]}
          - {read: [[14, 33]], write: [[30, 33]], when: {ip_proto: udp, dport: 53, daddr: 10.0.0.0/8}}
        rules:
          - {if: {returns: [TC_ACT_SHOT]}, then: {helpers: {deny: [perf_event_output]}}}
          - {if: {map_written: audit}, then: {returns: [TC_ACT_OK]}}
        flow: {deny: [[user, return], ["map:keys", ringbuf], [ctx, packet]]}
        """
    )
    assert p.program_types == ["sched_cls"]
    assert p.packet[1].when.daddr == "10.0.0.0/8" and p.packet[1].when.ip_proto == 17
    assert p.rules[0].if_.returns == ["TC_ACT_SHOT"]


# --- one message per bad policy, at the right line ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "program_types: [xdp]\nhelpers:\n  alow: [map_lookup_elem]\n",
            "policy.yaml:3: helpers.alow: unknown field 'alow' (did you mean 'allow'?); "
            "allowed: allow, deny",
        ),
        (
            "returns: [XDP_PASS]\npackets:\n  read: [[0, 1]]\n",
            "policy.yaml:2: packets: unknown field 'packets' (did you mean 'packet'?)",
        ),
        (
            "helpers:\n  allow:\n    - map_lookup_elem\n    - bpf_trace_prntk\n",
            "policy.yaml:4: helpers.allow[1]: unknown helper 'bpf_trace_prntk' "
            "(did you mean 'trace_printk'?)",
        ),
        (
            "packet:\n  read:\n    - [0, 10]\n    - [20, 5]\n",
            "policy.yaml:4: packet.read[1]: window [20, 5] has lo > hi; "
            "write [lo, hi] with lo <= hi (inclusive)",
        ),
        (
            "program_types: [xdp]\nctx:\n  read: [data]\n  write:\n    - mark\n",
            "policy.yaml:5: ctx.write[0]: unknown ctx field 'mark' for xdp; fields: data, data_end, "
            "data_meta, ingress_ifindex, rx_queue_index, egress_ifindex",
        ),
        (
            "program_types: [sched_cls]\nctx: {read: [rx_queue_indx]}\n",
            "policy.yaml:2: ctx.read[0]: unknown ctx field 'rx_queue_indx' for sched_cls",
        ),
        (
            "returns:\n  - XDP_PASS\n  - XDP_DORP\n",
            "policy.yaml:3: returns[1]: unknown return code 'XDP_DORP' (did you mean 'XDP_DROP'?)",
        ),
        (
            "program_types: [xdp]\nreturns: [XDP_PASS, TC_ACT_OK]\n",
            "policy.yaml:2: returns[1]: return code 'TC_ACT_OK' does not apply to xdp programs",
        ),
        (
            "flow:\n  deny:\n    - [packet, ringbuf]\n    - [pakcet, ringbuf]\n",
            "policy.yaml:4: flow.deny[1][0]: unknown flow source 'pakcet' (did you mean 'packet'?)",
        ),
        (
            "flow:\n  deny:\n    - [packet, kernel]\n",
            "policy.yaml:3: flow.deny[0][1]: unknown flow sink 'kernel'",
        ),
        (
            "rules:\n  - if: {helper_called: map_update_elem}\n    then: {returns: [1]}\n    than: 1\n",
            "policy.yaml:4: rules[0].than: unknown field 'than' (did you mean 'then'?)",
        ),
        (
            "rules:\n  - then: {returns: [1]}\n    if: {helper_called: x, returns: [1]}\n",
            "policy.yaml:3: rules[0].if.helper_called: unknown helper 'x'",
        ),
        (
            "program_types: [xpd]\n",
            "policy.yaml:1: program_types[0]: unknown program type 'xpd' (did you mean 'xdp'?)",
        ),
        (
            "maps:\n  counters: {read: true, delet: true}\n",
            "policy.yaml:2: maps.counters.delet: unknown field 'delet' (did you mean 'delete'?)",
        ),
        (
            "packet:\n  when:\n    ip_proto: tpc\n",
            "policy.yaml:3: packet.when.ip_proto: unknown ip_proto 'tpc' (did you mean 'tcp'?)",
        ),
        (
            "budget:\n  max_paths: 0\n",
            "policy.yaml:2: budget.max_paths: Input should be greater than 0 (got 0)",
        ),
    ],
)
def test_each_bad_policy_gives_one_line_at_its_line(text, expected):
    (line,) = errors(text)
    assert line.startswith(expected), line


def test_a_rule_needs_exactly_one_condition():
    (line,) = errors("rules:\n  - if: {}\n    then: {returns: [XDP_PASS]}\n")
    assert line == (
        "policy.yaml:2: rules[0].if: a rule's `if` takes exactly one of "
        "helper_called, returns, map_written (got none)"
    )


def test_cross_checks_also_guard_the_python_api():
    with pytest.raises(ValueError, match="ctx.read\\[0\\]: unknown ctx field 'mark' for xdp"):
        Policy.model_validate({"program_types": ["xdp"], "ctx": {"read": ["mark"]}})


# --- the artifact's formats -----------------------------------------------------------------------

FLAT = {
    "entry_function": "xdp_prog",
    "packet_constraints": [
        {"sPort": "*", "dPort": "*", "sIP": "*", "dIP": "*", "read-access": "0-33"},
        {
            "sPort": "*",
            "dPort": "80",
            "sIP": "10.0.0.1",
            "dIP": "*",
            "read-access": "0-15,18-1500",
            "write-access": "22-23",
        },
    ],
    "restricted_helpers": ["bpf_probe_write_user"],
    "helper_func": ["bpf_trace_printk"],
    "map_access": [{"name": "counters", "access": "ReadWrite"}, {"name": "cfg", "access": "Read"}],
}


def test_flat_artifact_format_imports():
    assert is_krakenguard(FLAT)
    p = from_krakenguard(FLAT)
    expected = Policy.model_validate(
        {
            "entry_function": "xdp_prog",
            "helpers": {"deny": ["probe_write_user", "trace_printk"]},
            "maps": {
                "counters": {"read": True, "write": True, "delete": True},
                "cfg": {"read": True},
            },
            "packet": [
                {"read": [[0, 33]]},
                {
                    "read": [[0, 15], [18, 1500]],
                    "write": [[22, 23]],
                    "when": {"dport": 80, "saddr": "10.0.0.1"},
                },
            ],
        }
    )
    assert p == expected
    assert not p.map_allowed("cfg", "write") and not p.map_allowed("other", "read")
    assert p.packet_window("read") == [(0, 33)]
    assert p.packet_window("read", dport=80, saddr="10.0.0.1") == [(0, 1500)]
    # entry 0 grants no writes, and entry 1 does not apply: no byte may be written
    assert p.packet_window("write", dport=80, saddr="10.0.0.2") == []


def test_an_empty_map_access_denies_every_map():
    p = from_krakenguard({"map_access": []})
    assert not p.map_allowed("anything", "read")


def test_action_format_imports_to_lists_and_rules():
    data = {
        "policies": [
            {
                "type": "ACTION",
                "actions": {
                    "helper_access": ["bpf_map_lookup_elem", "bpf_map_update_elem"],
                    "return_value": ["XDP_DROP", "XDP_PASS"],
                    "memory_access": {"read-access": "0-53", "write-access": "*"},
                },
            },
            {
                "type": "ACTION",
                "actions": {"return_value": ["XDP_PASS"]},
                "dependencies": {"previous_actions": ["bpf_map_update_elem"]},
            },
            {
                "type": "ACTION",
                "actions": {"return_value": [1]},
                "dependencies": {"memory": {"map": "blocked", "access": "Write"}},
            },
        ]
    }
    p = from_krakenguard(data)
    assert p == Policy.model_validate(
        {
            "helpers": {"allow": ["map_lookup_elem", "map_update_elem"]},
            "returns": ["XDP_DROP", "XDP_PASS"],
            "packet": {"read": [[0, 53]]},
            "rules": [
                {"if": {"helper_called": "map_update_elem"}, "then": {"returns": ["XDP_PASS"]}},
                {"if": {"map_written": "blocked"}, "then": {"returns": [1]}},
            ],
        }
    )
    assert p.return_allowed(1, "xdp") and not p.return_allowed(1, "xdp", called=["map_update_elem"])
    assert not p.return_allowed(2, "xdp", maps_written=["blocked"])


def test_load_policy_detects_the_artifact_and_points_at_its_lines():
    p = load_policy(json.dumps(FLAT, indent=1))
    assert p.helpers.deny == ["probe_write_user", "trace_printk"]
    text = '{\n "restricted_helpers": ["bpf_trace_printk"],\n "map_access": [{"name": "m", "access": "Reed"}]\n}'
    assert errors(text) == [
        "policy.yaml:3: map_access[0].access: access must be Read, Write or ReadWrite (got 'Reed') "
        "(did you mean 'Read'?)"
    ]
    text = '{\n "packet_constraints": [\n  {"dPort": "http", "read-access": "9-3"}]}'
    assert errors(text) == [
        "policy.yaml:3: packet_constraints[0].read-access: byte range '9-3' has lo > hi",
        "policy.yaml:3: packet_constraints[0].dPort: port must be 0..65535 or \"*\" (got 'http')",
    ]


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        (
            {
                "type": "ACTION",
                "actions": {"helper_access": ["bpf_ktime_get_ns"]},
                "dependencies": {"previous_actions": ["bpf_map_update_elem"]},
            },
            "a conditional helper_access cannot be imported",
        ),
        (
            {
                "type": "ACTION",
                "actions": {"return_value": [2]},
                "dependencies": {"previous_actions": ["bpf_map_update_elem", "bpf_ktime_get_ns"]},
            },
            "a conjunction cannot be imported",
        ),
        (
            {
                "type": "ACTION",
                "actions": {"return_value": [2]},
                "dependencies": {"memory": {"region": "stack", "offset": 8}},
            },
            "this one cannot be imported",
        ),
        (
            {"type": "ACTION", "actions": {"memory_access": {"stack": "rw"}}},
            "this memory_access cannot be imported",
        ),
        ({"type": "PHASE", "actions": {}}, "only ACTION policy objects"),
        ({"restricted_helpers": ["bpf_nope"]}, "unknown helper 'bpf_nope'"),
        ({"restricted_helpers": [], "bogus": 1}, "unknown field 'bogus'"),
    ],
)
def test_what_cannot_be_mapped_is_refused_clearly(obj, match):
    with pytest.raises(PolicyError, match=match):
        from_krakenguard(obj)


def test_our_form_round_trips_and_exports_imports():
    for p in (load_policy(SKETCH), from_krakenguard(FLAT)):
        assert load_policy(p.to_yaml()) == p


def test_the_two_forms_do_not_mix():
    with pytest.raises(PolicyError, match="'helpers' is a section of our policy form"):
        load_policy('{"restricted_helpers": [],\n "helpers": {"deny": []}}')


# --- decisions ------------------------------------------------------------------------------------


def test_decisions_on_the_sketch():
    p = load_policy(SKETCH)
    assert p.helper_allowed("map_lookup_elem") and p.helper_allowed("bpf_ktime_get_ns")
    assert not p.helper_allowed("trace_printk") and not p.helper_allowed("redirect")
    assert p.map_allowed("counters", "write") and not p.map_allowed("counters", "delete")
    assert p.map_allowed("policy_state", "read") and not p.map_allowed("policy_state", "write")
    assert not p.map_allowed("unnamed", "read")
    assert p.packet_window("read") == []  # the only windows need eth_type and ip_proto
    assert p.packet_window("read", eth_type=0x0800, ip_proto="tcp") == [(0, 53)]
    assert p.packet_allowed("write", 22, 22, eth_type=0x0800, ip_proto=6)
    assert not p.packet_allowed("write", 21, 22, eth_type=0x0800, ip_proto=6)
    assert (
        p.return_allowed(2, "xdp") and p.return_allowed(1, "xdp") and not p.return_allowed(3, "xdp")
    )
    assert not p.return_allowed(1, "xdp", called=["bpf_map_update_elem"])
    assert p.ctx_allowed("data_end", "read") and not p.ctx_allowed("data", "write")
    assert p.flow_denied("packet", "map:counters") and p.flow_denied("kernel", "perf_output")
    assert not p.flow_denied("kernel", "ringbuf")
    with pytest.raises(ValueError, match="read, write or delete"):
        p.map_allowed("counters", "update")


def test_names_depend_on_the_program_type():
    p = Policy.model_validate({"returns": ["XDP_PASS", "TC_ACT_SHOT", 7]})
    assert (
        p.return_allowed(2, "xdp")
        and p.return_allowed(2, "tc")
        and p.return_allowed(2, "sched_cls")
    )
    assert not p.return_allowed(0, "tc") and p.return_allowed(7, "xdp")
    assert p.return_allowed(2, "kprobe")  # both names apply where the type has no family


def test_rules_deny_helpers_after_a_verdict_or_write():
    p = Policy.model_validate(
        {
            "rules": [
                {
                    "if": {"returns": ["XDP_DROP"]},
                    "then": {"helpers": {"deny": ["ringbuf_output"]}},
                },
                {"if": {"map_written": "m"}, "then": {"helpers": {"deny": ["bpf_redirect"]}}},
            ]
        }
    )
    assert p.helper_allowed("ringbuf_output")
    assert not p.helper_allowed("ringbuf_output", returned=1, program_type="xdp")
    assert p.helper_allowed("ringbuf_output", returned=2, program_type="xdp")
    assert not p.helper_allowed("redirect", maps_written=["m"])
