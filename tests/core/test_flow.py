from fractions import Fraction

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datahall.core.flow import (
    FlowNetwork,
    FlowOverflowError,
    IntFlowNetwork,
    LPError,
    bottleneck_cut,
    maximum_flow,
    solve_lp,
)
from datahall.core.topologies import build
from datahall.core.topology import compute_nodes, egress


def cut_capacity(caps, side):
    return sum(
        (Fraction(c) for (u, v), c in caps.items() if u in side and v not in side), Fraction(0)
    )


@st.composite
def flow_graphs(draw):
    n = draw(st.integers(2, 9))
    arcs = draw(
        st.lists(
            st.tuples(
                st.integers(0, n - 1),
                st.integers(0, n - 1),
                st.integers(1, 40),
                st.sampled_from([1, 2, 3, 4]),
            ),
            max_size=30,
        )
    )
    caps = {(u, v): Fraction(c, d) for u, v, c, d in arcs if u != v}
    s, t = draw(st.sampled_from([(0, n - 1), (n - 1, 0), (0, 1)]))
    return n, caps, s, t


@settings(max_examples=150, deadline=None)
@given(flow_graphs())
def test_backends_agree_and_min_cut_equals_max_flow(case):
    n, caps, s, t = case
    results = {
        b: FlowNetwork(caps, range(n), backend=b).maximum_flow(s, t) for b in ("scipy", "networkx")
    }
    assert results["scipy"].value == results["networkx"].value
    for r in results.values():
        assert s in r.source_side and t not in r.source_side
        assert cut_capacity(caps, r.source_side) == r.value


@settings(max_examples=60, deadline=None)
@given(flow_graphs(), st.data())
def test_int_network_edits_match_a_fresh_network(case, data):
    # set() on the compiled CSR gives the flows of a network built from scratch, both backends
    n, caps, s, t = case
    arcs = [(u, v) for u, v in caps]
    ints = [int(c * 12) for c in caps.values()]
    tails, heads = [u for u, _ in arcs], [v for _, v in arcs]
    for backend in ("scipy", "networkx"):
        net = IntFlowNetwork(n, tails, heads, ints, backend)
        assert net.backend == backend
        current = dict(zip(arcs, ints, strict=True))
        for _ in range(data.draw(st.integers(0, 4))):
            if not arcs:
                break
            arc = data.draw(st.sampled_from(arcs))
            current[arc] = data.draw(st.integers(0, 500))
            net.set(*arc, current[arc])
            value, side = net.maximum_flow(s, t)
            fresh = FlowNetwork(current, range(n), backend="networkx").maximum_flow(s, t)
            assert value == fresh.value
            assert side[s] and not side[t]
            cut = {i for i in range(n) if side[i]}
            assert cut_capacity(current, cut) == value
    with pytest.raises(KeyError):
        IntFlowNetwork(3, [0], [1], [1]).set(1, 2, 5)


def test_fractional_capacities_are_exact():
    G = nx.DiGraph()
    G.add_edge("s", "a", capacity=0.1)
    G.add_edge("s", "b", capacity=0.2)
    G.add_edge("a", "t", capacity=1)
    G.add_edge("b", "t", capacity=1)
    assert maximum_flow(G, "s", "t").value == Fraction(3, 10)


def test_overflow_is_detected_and_auto_falls_back():
    caps = {("s", "a"): 2**31, ("a", "t"): 5}
    with pytest.raises(FlowOverflowError, match="int32"):
        FlowNetwork(caps, backend="scipy")
    net = FlowNetwork(caps)
    assert net.backend == "networkx" and net.maximum_flow("s", "t").value == 5
    # fits per arc but the total into t would overflow a flow value
    many = {("s", f"m{i}"): 2**30 for i in range(3)} | {(f"m{i}", "t"): 2**30 for i in range(3)}
    assert FlowNetwork(many).backend == "networkx"


def test_flow_network_errors():
    with pytest.raises(ValueError, match="negative capacity"):
        FlowNetwork({("a", "b"): -1})
    net = FlowNetwork({("a", "b"): 1})
    with pytest.raises(KeyError, match="not in the flow network"):
        net.maximum_flow("a", "zz")
    with pytest.raises(ValueError, match="unknown max-flow backend"):
        FlowNetwork({("a", "b"): 1}, backend="gurobi")


@pytest.mark.parametrize(
    ("name", "boxes", "x_star", "iterations"),
    [
        ("dgx-a100", 1, Fraction(300, 7), 1),
        ("dgx-a100", 2, Fraction(65, 3), 1),
        ("dgx-a100", 4, Fraction(25, 3), 2),
        ("mi250", 1, Fraction(150, 7), 2),
        ("mi250", 2, Fraction(166, 15), 2),
        ("mi250", 4, Fraction(16, 3), 3),
    ],
)
def test_bottleneck_cut_reference_values(name, boxes, x_star, iterations):
    """x* and the Dinkelbach iteration counts of the ForestColl brief, §3."""
    G = build(name, boxes=boxes)
    gpus = compute_nodes(G)
    b = bottleneck_cut(G, gpus)
    assert (b.ratio, b.iterations) == (x_star, iterations)
    assert egress(G, b.cut) / len(set(gpus) & b.cut) == x_star


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 6), st.integers(0, 10**6))
def test_bottleneck_cut_is_the_brute_force_minimum(n, seed):
    G = build("random", gpus=n, switches=1, extra_links=3, seed=seed)
    gpus = compute_nodes(G)
    nodes = list(G)
    best = None
    for mask in range(1, 2 ** len(nodes)):
        S = {v for i, v in enumerate(nodes) if mask >> i & 1}
        inside = len(S & set(gpus))
        if 0 < inside < len(gpus):
            r = egress(G, S) / inside
            best = r if best is None else min(best, r)
    assert bottleneck_cut(G, gpus).ratio == best


def test_solve_lp_with_duals():
    # max 3x + 2y  s.t. x + y <= 4, x + 3y <= 6, x <= 3.5: optimum (3.5, 0.5)
    r = solve_lp([3, 2], A_ub=[[1, 1], [1, 3], [1, 0]], b_ub=[4, 6, 3.5], maximize=True)
    assert r.objective == pytest.approx(11.5)
    assert np.allclose(r.x, [3.5, 0.5])
    assert np.allclose(r.ineq_duals, [2, 0, 1])  # d objective / d b
    r = solve_lp([1], A_eq=[[2]], b_eq=[3])
    assert r.x[0] == pytest.approx(1.5) and r.eq_duals[0] == pytest.approx(0.5)
    with pytest.raises(LPError, match="infeasible"):
        solve_lp([1], A_ub=[[1]], b_ub=[-1])
