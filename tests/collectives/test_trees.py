"""Tree packing (plain and symmetric) and the automorphisms derived from fabric generators."""

from __future__ import annotations

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datahall.collectives.bound import optimal_bound
from datahall.collectives.plan import degrade
from datahall.collectives.split import edge_split
from datahall.collectives.trees import (
    PackingError,
    Symmetry,
    automorphisms,
    check_packing,
    is_automorphism,
    pack_trees,
)
from datahall.core.topologies import (
    dgx_a100,
    dgx_h100,
    direct_connect,
    leaf_spine,
    mi250,
    rail_optimized,
    random_fabric,
    ring,
    torus,
)
from datahall.core.topology import compute_nodes


def _logical(G, symmetry=None):
    b = optimal_bound(G)
    return b, edge_split(G, b.U, b.k, symmetry=symmetry)


@pytest.mark.parametrize(
    "build,order",
    [
        (lambda: dgx_a100(1), 8),
        (lambda: dgx_a100(2), 16),
        (lambda: dgx_a100(4), 32),
        (lambda: dgx_h100(2), 16),
        (lambda: mi250(1), 4),  # the xGMI mesh has a free Klein four-group
        (lambda: mi250(2), 8),
        (lambda: leaf_spine(boxes=8), 64),
        (lambda: rail_optimized(boxes=4, boxes_per_group=2), 32),
        (lambda: ring(6), 6),
        (lambda: direct_connect(5), 5),
        (lambda: torus((2, 3)), 6),
    ],
)
def test_automorphisms_from_generators(build, order):
    G = build()
    sym = automorphisms(G)
    assert sym is not None and sym.order == order
    Vc = compute_nodes(G)
    ident = [g for g in sym.elements if all(g[n] == n for n in G)]
    assert len(ident) == 1 and sym.elements[0] is ident[0]
    for g in sym.elements:
        assert is_automorphism(G, g)
        if g is not ident[0]:
            assert all(g[v] != v for v in Vc)  # acts freely on compute nodes
    # orbits of compute nodes all have |Γ| nodes
    reps = sym.representatives(Vc)
    assert len(reps) * sym.order == len(Vc)
    assert sorted(v for r in reps for v in sym.orbit(r)) == sorted(Vc)


def test_no_symmetry_is_guessed():
    assert automorphisms(random_fabric(gpus=6, seed=3)) is None
    # a failed link breaks the box rotation of a 2-box cluster; GPU rotation breaks as well
    G = degrade(dgx_a100(2), ["box0/gpu0,box0/nic0"])
    assert automorphisms(G) is None
    H = dgx_a100(2)
    H.graph["generator"] = "unknown"
    assert automorphisms(H) is None
    # nodes renamed away from the generator's scheme: no symmetry rather than an error
    R = nx.relabel_nodes(ring(4), {f"gpu{i}": i for i in range(4)})
    assert automorphisms(R) is None


def test_plain_packing_on_a100x2():
    G = dgx_a100(2)
    b, s = _logical(G)
    trees = pack_trees(s.capacity, s.compute_nodes, s.roots)
    check_packing(trees, s.capacity, s.compute_nodes, s.roots)
    assert {t.root for t in trees} == set(compute_nodes(G))
    assert sum(t.multiplicity for t in trees) == 16 * 13


def test_symmetric_packing_replicates_orbit_trees():
    G = dgx_a100(2)
    sym = automorphisms(G)
    b, s = _logical(G, sym)
    trees = pack_trees(s.capacity, s.compute_nodes, s.roots, symmetry=sym)
    check_packing(trees, s.capacity, s.compute_nodes, s.roots)
    # one orbit of roots: the trees of box0/gpu0, mapped by each automorphism, are everyone's
    base = [t for t in trees if t.root == "box0/gpu0"]
    for g in sym.elements:
        mine = sorted((t.multiplicity, t.arcs) for t in trees if t.root == g["box0/gpu0"])
        assert mine == sorted(
            (t.multiplicity, tuple((g[x], g[y]) for x, y in t.arcs)) for t in base
        )


def test_symmetric_packing_refuses_a_graph_that_is_not_symmetric():
    cap = {("a", "b"): 2, ("b", "a"): 1}
    sym = Symmetry(({"a": "a", "b": "b"}, {"a": "b", "b": "a"}))
    with pytest.raises(PackingError, match="not invariant"):
        pack_trees(cap, ["a", "b"], {"a": 1, "b": 1}, symmetry=sym)


def test_trees_split_when_an_arc_has_fewer_slots_than_trees():
    # two trees from a: one can go a→b→c, the other a→c→b: each arc has a single slot
    cap = {("a", "b"): 1, ("a", "c"): 1, ("b", "c"): 1, ("c", "b"): 1}
    trees = pack_trees(cap, ["a", "b", "c"], {"a": 2})
    check_packing(trees, cap, ["a", "b", "c"], {"a": 2})
    assert [t.multiplicity for t in trees] == [1, 1]  # the object of multiplicity 2 split
    # a→b with a→c would leave the second tree no way out of a
    assert {frozenset(t.arcs) for t in trees} == {
        frozenset({("a", "b"), ("b", "c")}),
        frozenset({("a", "c"), ("c", "b")}),
    }


def test_check_packing_catches_broken_packings():
    cap = {("a", "b"): 1, ("b", "a"): 1}
    from datahall.collectives.trees import Branching

    with pytest.raises(AssertionError, match="slots"):
        check_packing([Branching("a", 2, (("a", "b"),))], cap, ["a", "b"], {"a": 2})
    with pytest.raises(AssertionError, match="trees, want"):
        check_packing([Branching("a", 1, (("a", "b"),))], cap, ["a", "b"], {"a": 2})
    with pytest.raises(AssertionError, match="arcs, want"):
        check_packing([Branching("a", 1, ())], cap, ["a", "b"], {"a": 1})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gpus=st.integers(2, 6),
    switches=st.integers(0, 2),
    extra=st.integers(0, 6),
    seed=st.integers(0, 10_000),
)
def test_random_fabrics_pack(gpus, switches, extra, seed):
    G = random_fabric(gpus=gpus, switches=switches, extra_links=extra, seed=seed)
    b, s = _logical(G)
    trees = pack_trees(s.capacity, s.compute_nodes, s.roots)
    check_packing(trees, s.capacity, s.compute_nodes, s.roots)


@pytest.mark.parametrize(
    "build", [lambda: ring(5), lambda: torus((2, 2)), lambda: direct_connect(4)]
)
def test_symmetric_packing_on_direct_fabrics(build):
    G = build()
    sym = automorphisms(G)
    b, s = _logical(G, sym)
    trees = pack_trees(s.capacity, s.compute_nodes, s.roots, symmetry=sym)
    check_packing(trees, s.capacity, s.compute_nodes, s.roots)
