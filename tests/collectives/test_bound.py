"""The optimality bound: exact oracle values of the ForestColl brief §3 and three methods that agree."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datahall.collectives.bound import (
    binary_search_bound,
    fixed_k_bound,
    lp_bound,
    optimal_bound,
    recover_U_k,
    slot_capacities,
)
from datahall.core.topologies import dgx_a100, direct_connect, mi250, random_fabric, ring
from datahall.core.topology import (
    TopologyError,
    add_link,
    add_node,
    compute_nodes,
    egress,
    ingress,
    new_topology,
)

# (topology, x*, k, U or None): brief §3, exact
ORACLES = [
    ("a100(1)", lambda: dgx_a100(1), Fraction(300, 7), 1, None),
    ("a100(2)", lambda: dgx_a100(2), Fraction(65, 3), 13, Fraction(3, 5)),
    ("a100(4)", lambda: dgx_a100(4), Fraction(25, 3), 1, None),
    ("mi250(1)", lambda: mi250(1), Fraction(150, 7), 3, None),
    ("mi250(2)", lambda: mi250(2), Fraction(166, 15), 83, Fraction(15, 2)),
    ("mi250(4)", lambda: mi250(4), Fraction(16, 3), 8, None),
]
SMALL = [o for o in ORACLES if o[0] in ("a100(1)", "a100(2)", "mi250(1)", "mi250(2)")]


@pytest.mark.parametrize("name,build,x,k,U", ORACLES, ids=[o[0] for o in ORACLES])
def test_optimal_bound_matches_the_brief(name, build, x, k, U):
    G = build()
    b = optimal_bound(G)
    N = len(compute_nodes(G))
    assert b.x_star == x
    assert b.algbw == N * x
    assert b.k == k
    if U is not None:
        assert b.U == U
    assert b.k / b.U == x
    # every slot count U·b_e is an integer, so the k trees per root fit without rounding
    assert all((b.U * Fraction(c)).denominator == 1 for _, _, c in G.edges(data="capacity"))
    # the reported cut attains x*
    S = b.cut
    assert egress(G, S) / sum(1 for v in compute_nodes(G) if v in S) == x


def test_bottleneck_cuts_are_the_ones_of_the_brief():
    gpus = lambda G, S: [v for v in compute_nodes(G) if v in S]  # noqa: E731
    G = dgx_a100(1)
    assert len(gpus(G, optimal_bound(G).cut)) == 7
    G = dgx_a100(2)
    assert len(gpus(G, optimal_bound(G).cut)) == 15
    G = dgx_a100(4)
    b = optimal_bound(G)
    assert len(gpus(G, b.cut)) == 24 and egress(G, b.cut) == 200


def test_allreduce_and_reduce_scatter_on_a100x2():
    G = dgx_a100(2)
    ar = optimal_bound(G, "allreduce")
    assert ar.algbw == Fraction(520, 3)  # 173.333 GB/s
    assert ar.x_star == Fraction(65, 3) and (ar.U, ar.k) == (Fraction(3, 5), 13)
    rs = optimal_bound(G, "reduce_scatter")
    assert rs.x_star == Fraction(65, 3) and rs.transposed


def _asymmetric() -> object:
    """A star: g1 and g2 send 100 GB/s into the hub g0, which sends back only 5 to each."""
    G = new_topology("asym")
    for n in ("g0", "g1", "g2"):
        add_node(G, n, "gpu")
    for leaf in ("g1", "g2"):
        add_link(G, leaf, "g0", 100, bidirectional=False)
        add_link(G, "g0", leaf, 5, bidirectional=False)
    return G


def test_reduce_scatter_uses_ingress_on_asymmetric_fabrics():
    G = _asymmetric()
    ag = optimal_bound(G, "allgather")
    rs = optimal_bound(G, "reduce_scatter")
    assert rs.transposed and not ag.transposed
    # ingress bound: min over S of B⁻(S)/|S ∩ Vc| on G equals the egress bound of the transpose
    best = min(
        ingress(G, S) / len(S)
        for S in ({"g0"}, {"g1"}, {"g2"}, {"g0", "g1"}, {"g1", "g2"}, {"g0", "g2"})
    )
    assert rs.x_star == best == 5
    assert ag.x_star == Fraction(5, 2)  # {g0, g1} sends out only g0→g2
    ar = optimal_bound(G, "allreduce")
    assert ar.x_star == min(ag.x_star, rs.x_star)
    assert binary_search_bound(G, "reduce_scatter") == rs.x_star
    assert lp_bound(G, "reduce_scatter") == pytest.approx(float(rs.x_star), rel=1e-7)


def test_broadcast_and_reduce_from_a_root():
    G = dgx_a100(2)
    b = optimal_bound(G, "broadcast", root="box0/gpu0")
    # the other box is reached through 8 NICs of 25 GB/s
    assert b.x_star == 200 and b.algbw == 200
    assert b.k / b.U == 200 and "box0/gpu0" in b.cut
    r = optimal_bound(G, "reduce", root="box0/gpu0")
    assert r.x_star == 200 and r.transposed


@pytest.mark.parametrize(
    "build,k,U,algbw",
    [
        (lambda: dgx_a100(2), 1, Fraction(7, 150), Fraction(2400, 7)),  # 342.857
        (lambda: mi250(2), 1, Fraction(1, 10), Fraction(320)),
        (lambda: dgx_a100(2), 13, Fraction(3, 5), Fraction(1040, 3)),  # the optimal k loses nothing
    ],
)
def test_fixed_k_bound(build, k, U, algbw):
    b = fixed_k_bound(build(), k)
    assert (b.U, b.k, b.algbw) == (U, k, algbw)
    assert b.fixed_k


def test_fixed_k_is_never_better_than_optimal():
    G = mi250(1)
    opt = optimal_bound(G)
    for k in (1, 2, 3, 4):
        assert fixed_k_bound(G, k).x_star <= opt.x_star
    assert fixed_k_bound(G, 3).x_star == opt.x_star


def test_recover_U_k_scales_non_integer_capacities_exactly():
    assert recover_U_k(Fraction(65, 3), [300, 25]) == (Fraction(3, 5), 13)
    # halving every capacity halves x*, keeps k and doubles U
    G = dgx_a100(2)
    H = G.copy()
    for u, v, c in G.edges(data="capacity"):
        H[u][v]["capacity"] = c / 2  # 150 and 12.5 GB/s
    b, h = optimal_bound(G), optimal_bound(H)
    assert h.x_star == b.x_star / 2 and h.k == b.k and h.U == 2 * b.U
    assert slot_capacities(H, h.U) == slot_capacities(G, b.U)
    U, k = recover_U_k(Fraction(1, 3), [0.1, 0.25])
    assert k / U == Fraction(1, 3)
    assert (U * Fraction(1, 10)).denominator == 1 and (U * Fraction(1, 4)).denominator == 1


@pytest.mark.parametrize("name,build,x,k,U", SMALL, ids=[o[0] for o in SMALL])
def test_binary_search_and_lp_agree_with_dinkelbach(name, build, x, k, U):
    G = build()
    assert binary_search_bound(G) == x
    assert lp_bound(G) == pytest.approx(float(x), rel=1e-7)


def test_binary_search_agrees_on_a100x4():
    assert binary_search_bound(dgx_a100(4)) == Fraction(25, 3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gpus=st.integers(2, 6),
    switches=st.integers(0, 2),
    extra=st.integers(0, 6),
    seed=st.integers(0, 10_000),
)
def test_three_methods_agree_on_random_fabrics(gpus, switches, extra, seed):
    G = random_fabric(gpus=gpus, switches=switches, extra_links=extra, seed=seed)
    b = optimal_bound(G)
    assert binary_search_bound(G) == b.x_star
    assert lp_bound(G) == pytest.approx(float(b.x_star), rel=1e-7)
    assert b.k / b.U == b.x_star
    assert all((b.U * Fraction(c)).denominator == 1 for _, _, c in G.edges(data="capacity"))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_simple_fabrics_have_closed_forms(n):
    # ring of n with 50 GB/s each way: the cut around one GPU gives 100/(n-1) per GPU
    assert optimal_bound(ring(n, capacity=50)).x_star == Fraction(100 if n > 2 else 50, n - 1)
    # full mesh: each GPU receives (n-1)·50 from the others
    assert optimal_bound(direct_connect(n, capacity=50)).x_star == 50


def test_bad_input_is_one_clear_error():
    G = new_topology("split")
    for n in ("a", "b", "c"):
        add_node(G, n, "gpu")
    add_link(G, "a", "b", 10)
    with pytest.raises(TopologyError, match="unreachable"):
        optimal_bound(G)  # disconnected
    add_link(G, "b", "c", 10, bidirectional=False)
    with pytest.raises(TopologyError, match="cannot reach"):
        optimal_bound(G)  # c has ingress but no way back
    H = ring(3)
    H["gpu0"]["gpu1"]["capacity"] = 0
    with pytest.raises(TopologyError, match="capacity must be > 0"):
        optimal_bound(H)
    H["gpu0"]["gpu1"]["capacity"] = -5
    with pytest.raises(TopologyError, match="capacity must be > 0"):
        optimal_bound(H)
    with pytest.raises(ValueError, match="unknown collective"):
        optimal_bound(ring(3), "alltoall")
    with pytest.raises(ValueError, match="needs a root"):
        optimal_bound(ring(3), "broadcast")
    with pytest.raises(ValueError, match="not a compute node"):
        optimal_bound(dgx_a100(1), "broadcast", root="box0/nvswitch")
    with pytest.raises(ValueError, match="only for broadcast"):
        optimal_bound(ring(3), "allgather", root="gpu0")
    with pytest.raises(ValueError, match="positive integer"):
        fixed_k_bound(ring(3), 0)
    one = new_topology("one")
    add_node(one, "g", "gpu")
    with pytest.raises(TopologyError, match="at least two compute nodes"):
        optimal_bound(one)


def test_a_random_but_fixed_fabric_has_a_stable_bound():
    rng = random.Random(7)
    G = random_fabric(gpus=5, switches=1, extra_links=3, seed=rng.randint(0, 99))
    assert optimal_bound(G) == optimal_bound(G.copy())
