from fractions import Fraction

import pytest

from datahall.core.flow import bottleneck_cut
from datahall.core.topologies import GENERATORS, build
from datahall.core.topology import TopologyError, compute_nodes, egress, validate


@pytest.mark.parametrize(
    ("name", "boxes", "nodes", "arcs"),
    [
        ("dgx-a100", 1, 9, 16),
        ("dgx-a100", 2, 36, 96),
        ("dgx-a100", 4, 70, 192),
        ("mi250", 1, 16, 56),
        ("mi250", 2, 33, 176),
        ("mi250", 4, 65, 352),
    ],
)
def test_sizes_match_the_forestcoll_brief(name, boxes, nodes, arcs):
    G = build(name, boxes=boxes)
    assert (G.number_of_nodes(), G.number_of_edges()) == (nodes, arcs)


def test_dgx_a100_numbers():
    G = build("dgx-a100", boxes=2)
    assert G["box1/gpu3"]["box1/nvswitch"]["capacity"] == 300
    assert G["box1/gpu3"]["box1/nic3"]["capacity"] == 25
    assert G["box1/nic3"]["ib1"]["capacity"] == 25 and G["box0/nic6"]["ib0"]["capacity"] == 25
    assert len([n for n in build("dgx-a100", boxes=2, rails=8) if n.startswith("ib")]) == 8


def test_mi250_every_gcd_has_350_GBps_of_xgmi():
    G = build("mi250")
    assert {egress(G, [g]) for g in compute_nodes(G)} == {350}
    G2 = build("mi250", boxes=2)
    assert {egress(G2, [g]) for g in compute_nodes(G2)} == {366}


def test_h100_defaults_are_parameters():
    G = build("dgx-h100", boxes=2, nvlink="900GB/s")
    assert G["box0/gpu0"]["box0/nvswitch"]["capacity"] == 900
    assert G["box0/gpu0"]["box0/nic0"]["capacity"] == 50


def test_leaf_spine_oversubscription():
    G = build("leaf-spine", boxes=8, boxes_per_leaf=4, spines=2, oversubscription=8.0)
    # leaf downlink 4 boxes x 8 NICs x 25 GB/s = 800; uplink 800/8 over 2 spines
    assert G["leaf0"]["spine1"]["capacity"] == 50
    # the bottleneck is one leaf's 100 GB/s uplink shared by its 32 GPUs (not one box's 200/56)
    assert bottleneck_cut(G, compute_nodes(G)).ratio == Fraction(100, 32)
    full = build("leaf-spine", boxes=8, boxes_per_leaf=4, spines=2)
    assert bottleneck_cut(full, compute_nodes(full)).ratio == Fraction(200, 56)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_every_generator_builds_a_valid_fabric(name):
    validate(build(name))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"boxes": 0}, "positive integer"), ({"rails": 0}, "rails"), ({"colour": 1}, "no parameter")],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(TopologyError, match=message):
        build("dgx-a100", **kwargs)


def test_unknown_generator_lists_choices():
    with pytest.raises(TopologyError, match="choose one of .*dgx-a100"):
        build("dgx-z9000")
