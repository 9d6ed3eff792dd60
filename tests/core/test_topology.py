import json
from fractions import Fraction

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datahall.core.topologies import build, random_fabric
from datahall.core.topology import (
    TopologyError,
    add_link,
    add_node,
    compute_nodes,
    egress,
    from_dict,
    ingress,
    load,
    new_topology,
    save,
    to_dict,
    validate,
)


def two_gpus(cap=25):
    G = new_topology("pair")
    add_node(G, "g0", "gpu")
    add_node(G, "g1", "gpu")
    add_link(G, "g0", "g1", cap)
    return G


def test_links_are_two_arcs_and_parallel_links_add():
    G = two_gpus()
    add_link(G, "g0", "g1", "200Gb/s")
    assert G["g0"]["g1"]["capacity"] == 50 and G["g1"]["g0"]["capacity"] == 50
    add_link(G, "g0", "g1", 1, bidirectional=False)
    assert (G["g0"]["g1"]["capacity"], G["g1"]["g0"]["capacity"]) == (51, 50)


def test_egress_ingress():
    G = build("dgx-a100", boxes=2)
    box0 = [n for n in G if n.startswith("box0/")]
    assert egress(G, box0) == ingress(G, box0) == 8 * 25
    assert egress(G, ["box0/gpu0"]) == 325


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda G: G["g0"]["g1"].update(capacity=-25), "capacity must be > 0"),
        (lambda G: G["g0"]["g1"].update(capacity=0), "capacity must be > 0"),
        (lambda G: nx.set_node_attributes(G, "switch", "kind"), "no compute nodes"),
        (lambda G: G.remove_edge("g1", "g0"), "cannot reach"),
        (lambda G: add_node(G, "g2", "gpu"), "unreachable"),
        (lambda G: G.nodes["g0"].update(kind="toaster"), "unknown node kind"),
    ],
)
def test_validate_names_the_problem(mutate, message):
    G = two_gpus()
    mutate(G)
    with pytest.raises(TopologyError, match=message):
        validate(G)


def test_file_errors_point_at_the_entry(tmp_path):
    bad = {
        "nodes": [{"id": "a", "kind": "gpu"}],
        "links": [{"source": "a", "target": "zz", "capacity": 1}],
    }
    with pytest.raises(TopologyError, match=r"links\[0\] refers to node 'zz'"):
        from_dict(bad, "f.json")
    p = tmp_path / "t.json"
    p.write_text('{"nodes": [\n  {"id": "a",, }]}')
    with pytest.raises(TopologyError, match=r"t.json:2:\d+: not valid JSON"):
        load(p)
    p = tmp_path / "t.yaml"
    p.write_text("nodes: [a\nlinks: {")
    with pytest.raises(TopologyError, match="not valid YAML"):
        load(p)
    with pytest.raises(TopologyError, match="unknown format"):
        load(tmp_path / "x.txt")
    with pytest.raises(TopologyError, match="no such file"):
        load(tmp_path / "missing.json")


def test_units_in_files(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text(
        "name: pair\nnodes:\n- {id: a, kind: gpu}\n- {id: b, kind: gpu}\n"
        "links:\n- {source: a, target: b, capacity: 400Gb/s, latency: 2us}\n"
    )
    G = load(p)
    assert G["b"]["a"]["capacity"] == 50 and G["a"]["b"]["latency"] == pytest.approx(2e-6)


def _same(G, H):
    assert dict(G.nodes(data=True)) == dict(H.nodes(data=True))
    assert {(u, v): Fraction(str(c)) for u, v, c in G.edges(data="capacity")} == {
        (u, v): Fraction(str(c)) for u, v, c in H.edges(data="capacity")
    }


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".graphml"])
@pytest.mark.parametrize("name", ["dgx-a100", "mi250", "rail-optimized"])
def test_file_round_trip(tmp_path, suffix, name):
    G = build(name, boxes=2)
    H = load(save(G, tmp_path / f"t{suffix}"))
    _same(G, H)
    assert compute_nodes(H) == compute_nodes(G)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 12), st.integers(0, 3), st.integers(0, 12), st.integers(0, 10**6))
def test_json_round_trip_property(gpus, switches, extra, seed):
    G = random_fabric(
        gpus=gpus, switches=switches, extra_links=extra, capacities=(12.5, 25, 300), seed=seed
    )
    H = from_dict(json.loads(json.dumps(to_dict(G))))
    _same(G, H)
