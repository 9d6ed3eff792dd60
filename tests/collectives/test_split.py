"""Switch removal by edge splitting: the flow invariant, no surviving switch, path expansion."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datahall.collectives.bound import optimal_bound, slot_capacities
from datahall.collectives.split import (
    SplitError,
    check_balance,
    edge_split,
    expand,
    flow_invariant,
)
from datahall.collectives.trees import automorphisms
from datahall.core.topologies import dgx_a100, leaf_spine, mi250, random_fabric
from datahall.core.topology import TopologyError, add_link, add_node, compute_nodes, new_topology


def _split(G, **kw):
    b = optimal_bound(G)
    return b, edge_split(G, b.U, b.k, **kw)


def _check_split(G, b, s):
    """Brief §2.7 invariant 4 and the edge_map / path bookkeeping."""
    Vc = compute_nodes(G)
    assert set(s.compute_nodes) == set(Vc)
    # no switch survives: every logical arc joins two compute nodes
    assert all(u in Vc and v in Vc and u != v for u, v in s.capacity)
    # the invariant maxflow(s, v) >= N·k still holds on the logical graph
    assert flow_invariant(s.capacity, s.compute_nodes, s.roots) >= 0
    slots = slot_capacities(G, b.U)
    used: Counter = Counter()
    for (u, t), c in s.capacity.items():
        paths = expand(s, u, t)
        assert sum(n for _, n in paths) == c
        for path, n in paths:
            assert path[0] == u and path[-1] == t
            assert all(x not in Vc for x in path[1:-1])  # only switches inside
            for e in zip(path, path[1:], strict=False):
                assert G.has_edge(*e)
                used[e] += n
        # edge_map: the slots of (u, t) are its own physical slots plus those split off via w
        assert c == slots.get((u, t), 0) + sum(s.edge_map.get((u, t), {}).values())
    # every physical arc lends at most its ⌊U·b⌋ slots
    assert all(n <= slots[e] for e, n in used.items())


def test_a100x2_and_mi250x1_give_16_nodes_and_56_logical_arcs():
    b, s = _split(dgx_a100(2), spread=False)  # the reference's greedy order
    assert (len(s.compute_nodes), len(s.capacity)) == (16, 56)
    _check_split(dgx_a100(2), b, s)
    b, s = _split(mi250(1))  # no switches: the 56 physical arcs
    assert (len(s.compute_nodes), len(s.capacity)) == (16, 56)
    assert s.edge_map == {}


@pytest.mark.parametrize("spread", [True, False])
def test_a100x2_split_keeps_the_invariant(spread):
    G = dgx_a100(2)
    b, s = _split(G, spread=spread)
    _check_split(G, b, s)
    # 16 GPUs × 13 trees: every GPU still receives 208 slots' worth of flow
    assert sum(s.roots.values()) == 16 * 13


def test_the_split_is_tight_where_the_fabric_is():
    # a100(1) at k=1: each GPU has 7 slots to the NVSwitch, exactly N−1 = 7 needed
    G = dgx_a100(1)
    b, s = _split(G)
    _check_split(G, b, s)
    assert flow_invariant(s.capacity, s.compute_nodes, s.roots) == 0
    assert all(sum(c for (u, _), c in s.capacity.items() if u == g) == 7 for g in s.compute_nodes)


def test_symmetric_split_keeps_the_automorphisms():
    G = dgx_a100(2)
    sym = automorphisms(G)
    b, s = _split(G, symmetry=sym)
    _check_split(G, b, s)
    for g in sym.elements:
        for (u, v), c in s.capacity.items():
            assert s.capacity.get((g[u], g[v])) == c


def test_symmetric_split_of_a_leaf_spine_cluster():
    G = leaf_spine(boxes=4, boxes_per_leaf=2, spines=2)
    sym = automorphisms(G)
    assert sym is not None and sym.order == 32
    b, s = _split(G, symmetry=sym)
    _check_split(G, b, s)


def test_broadcast_split_uses_the_root_only():
    G = dgx_a100(2)
    b = optimal_bound(G, "broadcast", root="box0/gpu0")
    s = edge_split(G, b.U, b.k, roots=["box0/gpu0"])
    assert s.roots == {"box0/gpu0": b.k}
    assert flow_invariant(s.capacity, s.compute_nodes, s.roots) >= 0


def test_expand_gives_part_of_an_arc_and_rejects_too_much():
    G = dgx_a100(2)
    b, s = _split(G)
    (u, t), c = next(iter(s.capacity.items()))
    assert sum(n for _, n in expand(s, u, t, 1)) == 1
    assert s.expand(u, t) == expand(s, u, t, c)
    with pytest.raises(ValueError, match="slots"):
        expand(s, u, t, c + 1)


def test_unbalanced_switch_is_a_clear_error():
    G = new_topology("one-way")
    for n in ("a", "b"):
        add_node(G, n, "gpu")
    add_node(G, "sw", "switch")
    add_link(G, "a", "sw", 10)
    add_link(G, "b", "sw", 10, bidirectional=False)
    add_link(G, "a", "b", 10)
    with pytest.raises(TopologyError, match="switch 'sw' has 20 GB/s in but 10 GB/s out"):
        check_balance(G)
    with pytest.raises(TopologyError, match="needs them equal"):
        edge_split(G, Fraction(1), 1)


def test_too_many_trees_are_refused():
    G = dgx_a100(1)
    with pytest.raises(SplitError, match="do not fit"):
        edge_split(G, Fraction(7, 300), 2)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gpus=st.integers(2, 6),
    switches=st.integers(1, 3),
    extra=st.integers(0, 5),
    seed=st.integers(0, 10_000),
    spread=st.booleans(),
)
def test_random_fabrics_split_completely(gpus, switches, extra, seed, spread):
    G = random_fabric(gpus=gpus, switches=switches, extra_links=extra, seed=seed)
    b, s = _split(G, spread=spread)
    _check_split(G, b, s)
