import itertools
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datahall.heuristics.builtins import build
from datahall.heuristics.knapsack import (
    greedy_knapsack,
    knapsack_problem,
    optimal_knapsack,
)
from datahall.heuristics.problem import Problem, ProblemError


def brute_force(values, weights, capacity):
    best = 0
    for r in range(len(values) + 1):
        for s in itertools.combinations(range(len(values)), r):
            if sum(weights[i] for i in s) <= capacity:
                best = max(best, sum(values[i] for i in s))
    return best


items = st.integers(1, 7).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 100), min_size=n, max_size=n),
        st.lists(st.integers(1, 20), min_size=n, max_size=n),
    )
)


def test_brief_oracle_light_dense_item_blocks_the_heavy_one():
    assert greedy_knapsack([2, 10], [1, 10], 10) == [0]
    assert optimal_knapsack([2, 10], [1, 10], 10) == (10, [1])
    p = knapsack_problem(items=2, capacity=10)
    gap, h, opt = p.evaluate([2, 10, 1, 10])
    assert (gap, h, opt.value) == (8.0, 2.0, 10.0)
    assert opt.gradient is None


def test_greedy_keeps_scanning_after_an_item_does_not_fit():
    # densities 5, 4, 1: item 1 (weight 5) does not fit after item 0, item 2 still does
    assert greedy_knapsack([20, 20, 1], [4, 5, 1], 6) == [0, 2]


def test_greedy_ties_by_index():
    # equal density 2: the lower index is tried first, and then the other no longer fits
    assert greedy_knapsack([4, 2], [2, 1], 2) == [0]
    assert greedy_knapsack([2, 4], [1, 2], 2) == [0]


def test_optimum_needs_integer_weights():
    with pytest.raises(ProblemError, match="integer weights"):
        optimal_knapsack([1, 2], [1.5, 2], 5)
    with pytest.raises(ProblemError, match="values"):
        optimal_knapsack([1, 2], [1], 5)


def test_item_heavier_than_capacity_is_never_taken():
    assert optimal_knapsack([50, 1], [30, 1], 20) == (1, [1])
    assert greedy_knapsack([50, 1], [30, 1], 20) == [1]


@settings(max_examples=200, deadline=None)
@given(items, st.integers(0, 30))
def test_optimum_matches_brute_force(case, capacity):
    values, weights = case
    opt, chosen = optimal_knapsack(values, weights, capacity)
    assert opt == brute_force(values, weights, capacity)
    assert sum(weights[i] for i in chosen) <= capacity
    assert sum(values[i] for i in chosen) == opt


@settings(max_examples=200, deadline=None)
@given(items, st.integers(1, 30))
def test_gap_nonnegative_greedy_feasible_and_half_approximation(case, capacity):
    values, weights = case
    n = len(values)
    p = knapsack_problem(items=n, capacity=capacity)
    x = values + weights
    taken = p.heuristic.taken(x)
    assert len(set(taken)) == len(taken)
    assert sum(weights[i] for i in taken) <= capacity
    gap, h, opt = p.evaluate(x)
    assert gap >= 0 and h == sum(values[i] for i in taken)
    # the classic guarantee: the greedy or the best single item gets at least OPT / 2
    single = max([v for v, w in zip(values, weights, strict=True) if w <= capacity], default=0)
    assert 2 * max(h, single) >= opt.value


def test_problem_fields_describe_pickle():
    p = knapsack_problem(items=3, capacity=10, max_value=50)
    assert isinstance(p, Problem) and p.sense == "max" and p.integer
    assert p.names == ["value[0]", "value[1]", "value[2]", "weight[0]", "weight[1]", "weight[2]"]
    assert list(p.lower) == [0, 0, 0, 1, 1, 1] and list(p.upper) == [50, 50, 50, 10, 10, 10]
    x = np.array([2, 10, 0, 1, 10, 3], dtype=float)
    d = p.describe(x)
    assert d["value_heuristic"] == 2 and d["value_optimal"] == 10 and d["gap"] == 8
    assert d["ratio"] == 0.2
    assert [i["item"] for i in d["heuristic_items"]] == [0, 2]
    assert d["optimal_items"] == [{"item": 1, "value": 10, "weight": 10, "density": 1.0}]
    q = pickle.loads(pickle.dumps(p))
    assert q.gap(x) == 8.0
    assert build("knapsack").dim == 16


def test_builder_errors():
    with pytest.raises(ProblemError, match="capacity"):
        knapsack_problem(capacity=2.5)
    with pytest.raises(ProblemError, match="items"):
        knapsack_problem(items=0)
