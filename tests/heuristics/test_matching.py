import itertools
import pickle

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datahall.heuristics.builtins import build
from datahall.heuristics.matching import (
    default_graph,
    greedy_matching,
    matching_problem,
    optimal_matching,
)
from datahall.heuristics.problem import Problem, ProblemError

PATH = [("a", "b"), ("b", "c"), ("c", "d")]


def is_matching(es, edges):
    ends = [u for e in es for u in edges[e]]
    return len(ends) == len(set(ends))


def brute_force(weights, edges):
    best = 0
    for r in range(len(edges) + 1):
        for s in itertools.combinations(range(len(edges)), r):
            if is_matching(s, edges):
                best = max(best, sum(weights[e] for e in s))
    return best


# small random graphs on 6 nodes (≤ 8 edges), with weights
graphs = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 5)).filter(lambda e: e[0] < e[1]),
    min_size=1,
    max_size=8,
    unique=True,
).flatmap(
    lambda edges: st.tuples(
        st.just(edges), st.lists(st.integers(0, 10), min_size=len(edges), max_size=len(edges))
    )
)


def test_brief_oracle_path():
    assert greedy_matching([2, 3, 2], PATH) == [1]
    assert optimal_matching([2, 3, 2], PATH) == [0, 2]
    p = matching_problem(PATH)
    gap, h, opt = p.evaluate([2, 3, 2])
    assert (gap, h, opt.value) == (1.0, 3.0, 4.0)
    assert opt.gradient.tolist() == [1.0, 0.0, 1.0]


def test_greedy_ties_by_edge_index():
    assert greedy_matching([3, 3, 3], PATH) == [0, 2]
    assert greedy_matching([1, 3, 3], PATH) == [1]


def test_default_graph_is_seeded():
    p, q = matching_problem(seed=3), matching_problem(seed=3)
    assert p.names == q.names and p.dim == 12
    assert nx.utils.graphs_equal(default_graph(3), default_graph(3))
    assert build("matching").dim == 12


@settings(max_examples=200, deadline=None)
@given(graphs)
def test_optimum_matches_brute_force(case):
    edges, w = case
    m = optimal_matching(w, edges)
    assert is_matching(m, edges)
    assert sum(w[e] for e in m) == brute_force(w, edges)


@settings(max_examples=200, deadline=None)
@given(graphs)
def test_gap_nonnegative_and_half_approximation(case):
    edges, w = case
    p = matching_problem(edges)
    assert is_matching(p.heuristic.taken(w), edges)
    gap, h, opt = p.evaluate(w)
    assert gap >= 0
    assert 2 * h >= opt.value


@settings(max_examples=100, deadline=None)
@given(graphs, st.data())
def test_gradient_is_a_subgradient(case, data):
    """OPT(y) >= OPT(x) + g · (y − x): OPT is a maximum of linear functions of the weights."""
    edges, w = case
    y = data.draw(st.lists(st.integers(0, 10), min_size=len(w), max_size=len(w)))
    opt = matching_problem(edges).optimum
    ox, oy = opt(w), opt(y)
    assert oy.value >= ox.value + ox.gradient @ (np.array(y) - np.array(w)) - 1e-9


def test_problem_fields_describe_pickle():
    p = matching_problem(PATH, max_weight=5)
    assert isinstance(p, Problem) and p.sense == "max" and p.integer
    assert p.names == ["w(a,b)", "w(b,c)", "w(c,d)"] and list(p.upper) == [5, 5, 5]
    d = p.describe(np.array([2.0, 3.0, 2.0]))
    assert d["weight_heuristic"] == 3 and d["weight_optimal"] == 4 and d["ratio"] == 0.75
    assert d["heuristic_edges"] == [{"edge": ["b", "c"], "weight": 3}]
    assert [e["edge"] for e in d["optimal_edges"]] == [["a", "b"], ["c", "d"]]
    q = pickle.loads(pickle.dumps(matching_problem()))
    assert q.gap(np.zeros(12)) == 0.0


def test_builder_errors():
    with pytest.raises(ProblemError, match="self-loop"):
        matching_problem([("a", "a")])
    with pytest.raises(ProblemError, match="twice"):
        matching_problem([("a", "b"), ("b", "a")])
    with pytest.raises(ProblemError, match="undirected"):
        matching_problem(nx.DiGraph([("a", "b")]))
    with pytest.raises(ProblemError, match="no edges"):
        matching_problem(nx.Graph())
