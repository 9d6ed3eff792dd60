"""Baseline schedules (NCCL ring, NCCL double binary tree, one-shot, Blink): valid trees on real
physical arcs, and the closed-form throughputs of the ForestColl brief (§1, §4)."""

import random
from fractions import Fraction

import networkx as nx
import pytest

from datahall.collectives.baselines import (
    BASELINES,
    _binary_tree,
    _min_arborescence,
    baseline,
    blink,
    nccl_double_binary_tree,
    nccl_ring,
    one_shot,
)
from datahall.collectives.evaluate import arc_loads, asymptotic_algbw, check_schedule
from datahall.core.topologies import dgx_a100, direct_connect, leaf_spine, mi250, ring, torus
from datahall.core.topology import compute_nodes

KINDS = {
    "allgather": ["broadcast"],
    "broadcast": ["broadcast"],
    "reduce_scatter": ["reduce"],
    "reduce": ["reduce"],
    "allreduce": ["reduce", "broadcast"],
}


def assert_valid(s, G):
    """Trees span the compute nodes, paths follow arcs of G, multiplicities add up to k."""
    gpus = compute_nodes(G)
    check_schedule(s, G)
    assert s.compute_nodes == tuple(gpus)
    assert [p.kind for p in s.phases] == KINDS[s.collective]
    for phase in s.phases:
        per_root = {}
        for tree in phase.trees:
            assert len(tree.arcs) == len(gpus) - 1
            seen = {tree.root}
            for a in tree.arcs:  # parents before children, every node entered once
                assert a.parent in seen and a.child not in seen
                seen.add(a.child)
            assert seen == set(gpus)
            per_root[tree.root] = per_root.get(tree.root, 0) + tree.multiplicity
        assert set(per_root.values()) == {s.k}
    assert s.algbw == asymptotic_algbw(s, G)
    assert s.k / s.x_star == s.U


TOPOLOGIES = {
    "dgx1": lambda: dgx_a100(1),
    "dgx2": lambda: dgx_a100(2),
    "dgx3": lambda: dgx_a100(3),
    "ring5": lambda: ring(5),
    "oneway4": lambda: ring(4, bidirectional=False),
    "torus": lambda: torus((2, 3)),
    "mesh4": lambda: direct_connect(4),
    "mi250": lambda: mi250(1),
    "leafspine": lambda: leaf_spine(boxes=2, gpus_per_box=4, boxes_per_leaf=1, spines=2),
}


@pytest.mark.parametrize("topo", sorted(TOPOLOGIES))
@pytest.mark.parametrize("collective", sorted(KINDS))
def test_ring_and_one_shot_are_valid_everywhere(topo, collective):
    G = TOPOLOGIES[topo]()
    for s in (nccl_ring(G, collective), one_shot(G, collective)):
        assert_valid(s, G)


@pytest.mark.parametrize("topo", ["dgx1", "dgx2", "ring5", "mesh4", "mi250", "leafspine"])
@pytest.mark.parametrize("collective", ["allgather", "reduce_scatter", "allreduce", "broadcast"])
def test_blink_is_valid(topo, collective):
    G = TOPOLOGIES[topo]()
    s = blink(G, collective, rounds=3)
    assert_valid(s, G)
    assert s.k == 3
    assert sum(s.meta["distinct_trees"].values()) <= 3 * len(s.phases[0].roots())


@pytest.mark.parametrize("topo", ["dgx1", "dgx2", "dgx3", "ring5", "mi250", "leafspine"])
def test_double_binary_tree_is_valid(topo):
    G = TOPOLOGIES[topo]()
    assert_valid(nccl_double_binary_tree(G), G)


def test_nccl_ring_on_two_dgx_a100_matches_the_closed_form():
    # brief §1 [derived]: 8 rings, each crossing a 25 GB/s NIC: N·R·b/(N−1) = 16·8·25/15
    G = dgx_a100(boxes=2)
    ag = nccl_ring(G, "allgather")
    assert ag.k == 8 and ag.meta["rings"] == 8
    assert ag.algbw == Fraction(640, 3)
    assert asymptotic_algbw(nccl_ring(G, "reduce_scatter"), G) == Fraction(640, 3)
    assert asymptotic_algbw(nccl_ring(G, "allreduce"), G) == Fraction(320, 3)  # /(2(N−1))
    assert asymptotic_algbw(nccl_ring(G, "allgather", rings=1), G) == Fraction(16 * 25, 15)
    # every NIC arc (GPU→NIC, NIC→IB, IB→NIC, NIC→GPU) carries exactly one ring's (N−1)/N·M/R
    loads = arc_loads(ag, M=1.0)
    nic_arcs = [(u, v) for u, v in G.edges if "nic" in u or "nic" in v]
    assert len(nic_arcs) == 64
    for e in nic_arcs:
        assert loads[e] == pytest.approx(15 / 16 / 8, rel=1e-12)
    # each ring is a Hamiltonian cycle through the 16 GPUs, box by box
    for order in ag.meta["orders"]:
        assert sorted(order) == sorted(compute_nodes(G))
        assert [g.split("/")[0] for g in order] == ["box0"] * 8 + ["box1"] * 8


def test_nccl_ring_on_three_boxes_uses_every_nic_once_per_direction():
    G = dgx_a100(boxes=3)
    s = nccl_ring(G, "allgather")
    assert s.algbw == Fraction(24 * 8 * 25, 23)
    loads = arc_loads(s, M=1.0)
    for u, v in G.edges:
        if "nic" in u or "nic" in v:
            assert loads[u, v] == pytest.approx(23 / 24 / 8, rel=1e-12)


@pytest.mark.parametrize("n", [3, 4, 6])
def test_single_ring_on_a_ring_topology(n):
    G = ring(n, capacity=50)
    assert nccl_ring(G, "allgather", rings=1).algbw == Fraction(n * 50, n - 1)
    assert nccl_ring(G, "allreduce", rings=1).algbw == Fraction(n * 50, 2 * (n - 1))
    two = nccl_ring(G, "allgather", rings=2)  # both directions of the ring
    assert two.algbw == Fraction(2 * n * 50, n - 1)


def test_ring_broadcast_and_root_checks():
    G = ring(4, capacity=50)
    s = nccl_ring(G, "broadcast", root="gpu2")
    assert s.phases[0].roots() == ["gpu2"] and s.algbw == 50
    assert one_shot(G, "reduce", root="gpu1").phases[0].roots() == ["gpu1"]
    with pytest.raises(ValueError, match="not a compute node"):
        nccl_ring(G, "broadcast", root="nope")
    with pytest.raises(ValueError, match="every compute node as a root"):
        nccl_ring(G, "allgather", root="gpu0")
    with pytest.raises(ValueError, match="unknown or unsupported collective"):
        nccl_ring(G, "alltoall")
    with pytest.raises(ValueError, match="rings"):
        nccl_ring(G, rings=0)


def test_double_binary_tree_on_two_dgx_a100():
    G = dgx_a100(boxes=2)
    s = nccl_double_binary_tree(G)
    assert s.meta["channels"] == 8 and s.k == 1
    assert len(s.phases[0].roots()) == 16  # 2 trees × 8 channels, distinct head GPUs
    assert {t.height() for t in s.phases[0].trees} == {8}  # chain, NIC hop, chain
    # the NVSwitch port of a GPU carries 14/16 of M in each phase: 300/(2·14/16) = 1200/7
    assert s.algbw == Fraction(1200, 7)
    with pytest.raises(ValueError, match="allreduce"):
        nccl_double_binary_tree(G, "allgather")


@pytest.mark.parametrize("boxes", [2, 4, 6, 8])
def test_double_binary_trees_are_complementary(boxes):
    # NCCL's double binary tree: with an even number of boxes, no box is a leaf in both trees
    t0 = _binary_tree(boxes)
    t1 = {(b + 1) % boxes: None if p is None else (p + 1) % boxes for b, p in t0.items()}
    for t in (t0, t1):
        fanout = {}
        for p in t.values():
            if p is not None:
                fanout[p] = fanout.get(p, 0) + 1
        assert max(fanout.values()) <= 2 and list(t.values()).count(None) == 1
    leaves0 = {b for b in t0 if b not in t0.values()}
    leaves1 = {b for b in t1 if b not in t1.values()}
    assert not leaves0 & leaves1


def test_double_binary_tree_on_four_rail_matched_boxes():
    G = dgx_a100(boxes=4, rails=8)
    s = nccl_double_binary_tree(G)
    assert_valid(s, G)
    assert s.meta["box_tree"] == _binary_tree(4)


def test_one_shot_is_optimal_inside_one_nvswitch_box():
    G = dgx_a100(boxes=1)
    assert one_shot(G).algbw == Fraction(8 * 300, 7)
    assert one_shot(G, "allreduce").algbw == Fraction(8 * 300, 14)
    assert one_shot(G, "broadcast").algbw == Fraction(300, 7)  # 7 copies through one port
    assert {t.height() for t in one_shot(G).trees()} == {1}


def test_one_shot_across_boxes_pays_for_every_copy():
    G = dgx_a100(boxes=2)
    s = one_shot(G)
    # each of box0's 8 shards (M/16) goes separately to the 8 GPUs of box1: 4·M leaves box0
    # through its NICs (a ring sends each shard across once), so algbw <= 16·8·25/64 = 50
    loads = arc_loads(s, M=1.0)
    out = sum(
        load for (u, v), load in loads.items() if u.startswith("box0/nic") and v.startswith("ib")
    )
    assert out == pytest.approx(4.0, rel=1e-12)
    assert s.algbw <= 50


def _networkx_cost(nodes, root, cost):
    H = nx.DiGraph()
    H.add_nodes_from(nodes)
    for (u, v), w in cost.items():
        if v != root and u != v:
            H.add_edge(u, v, weight=w)
    try:
        A = nx.minimum_spanning_arborescence(H)
    except nx.NetworkXException:
        return None
    return sum(H[u][v]["weight"] for u, v in A.edges)


@pytest.mark.parametrize("seed", range(30))
def test_min_arborescence_matches_networkx(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 9)
    nodes = list(range(n))
    density = rng.choice([0.3, 0.6, 1.0])
    cost = {
        (u, v): rng.random()
        for u in nodes
        for v in nodes
        if u != v and (rng.random() < density or v == u + 1)
    }
    root = rng.randrange(n)
    parent = _min_arborescence(nodes, root, cost)
    expected = _networkx_cost(nodes, root, cost)
    reach = nx.descendants(nx.DiGraph(list(cost)), root) | {root}
    if reach != set(nodes):
        assert parent is None and expected is None
        return
    assert parent is not None
    assert set(parent) == set(nodes) - {root}
    for v in parent:  # reaches the root
        x, steps = v, 0
        while x != root:
            x, steps = parent[x], steps + 1
            assert steps <= n
    assert sum(cost[parent[v], v] for v in parent) == pytest.approx(expected, abs=1e-9)


def test_min_arborescence_reports_unreachable_nodes():
    assert _min_arborescence(["a", "b", "c"], "a", {("a", "b"): 1.0}) is None


def test_blink_packs_well_where_it_should():
    G1 = dgx_a100(boxes=1)
    assert blink(G1, rounds=4).algbw == Fraction(8 * 300, 7)
    G2 = dgx_a100(boxes=2)
    s = blink(G2)
    # beats the rings, never beats the ForestColl optimum N·x* = 16·65/3 (brief §3)
    assert Fraction(640, 3) < s.algbw <= Fraction(16 * 65, 3)
    assert s.k == 16
    b = blink(G2, "broadcast", root="box1/gpu3", rounds=8)
    assert b.phases[0].roots() == ["box1/gpu3"]
    assert b.algbw <= 200  # box-to-box ingress bounds a single-root broadcast


def test_blink_reduce_on_one_way_links_uses_the_transposed_graph():
    G = ring(4, bidirectional=False)
    s = blink(G, "allreduce", rounds=2)
    assert_valid(s, G)
    for tree in s.phases[0].trees:  # in-trees: data runs child → parent along real arcs
        for a in tree.arcs:
            assert a.path[0] == a.child and a.path[-1] == a.parent


def test_blink_rejects_bad_options():
    G = ring(4)
    with pytest.raises(ValueError, match="rounds"):
        blink(G, rounds=0)
    with pytest.raises(ValueError, match="eps"):
        blink(G, eps=0)


def test_registry():
    G = ring(4)
    assert set(BASELINES) == {"nccl-ring", "nccl-tree", "one-shot", "blink"}
    assert baseline("nccl-ring", G, "allgather", rings=1).meta["baseline"] == "nccl-ring"
    assert baseline("nccl-tree", G, "allreduce").meta["baseline"] == "nccl-tree"
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline("taccl", G, "allgather")
