"""The concolic tracer: tracked arithmetic agrees with Python and with z3, branches name paths,
and generational search finds every path of small heuristics."""

import math
import operator

import numpy as np
import pytest
import z3
from hypothesis import given, settings
from hypothesis import strategies as st

from datahall.heuristics.concolic import explore_paths, path_id, trace, variables

OPS = [operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod]


def _z3_value(e, xs, values):
    sub = [(v, z3.IntVal(int(a))) for v, a in zip(xs, values, strict=True)]
    r = z3.simplify(z3.substitute(e, *sub))
    if z3.is_int_value(r):
        return r.as_long()
    return r.numerator_as_long() / r.denominator_as_long()


@settings(max_examples=60, deadline=None)
@given(
    st.integers(-50, 50),
    st.integers(1, 50),
    st.sampled_from(OPS),
    st.booleans(),
)
def test_tracked_arithmetic_matches_python_and_z3(a, b, op, with_constant):
    xs = variables(2, integer=True)
    seen = {}

    def h(x):
        seen["v"] = op(x[0], 7) if with_constant else op(x[0], x[1])
        return 0

    trace(h, [a, b], xs=xs)
    expected = op(a, 7) if with_constant else op(a, b)
    assert seen["v"].v == expected
    assert math.isclose(_z3_value(seen["v"].e, xs, [a, b]), expected)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 20), st.integers(0, 20))
def test_predicates_hold_on_the_input_that_took_them(a, b):
    xs = variables(2, integer=True)

    def h(x):
        s = 0
        if x[0] + x[1] > 10:
            s += 1
        if abs(x[0] - x[1]) <= 3:
            s += 2
        return max(x[0], 2 * x[1]) + s

    t = trace(h, [a, b], xs=xs)
    ref = max(a, 2 * b) + (a + b > 10) + 2 * (abs(a - b) <= 3)
    assert t.value == ref
    solver = z3.Solver()
    solver.add(*t.predicates, xs[0] == a, xs[1] == b)
    assert solver.check() == z3.sat
    assert len(t.deps) == len(t.predicates) == t.branches


def test_path_ids_name_branch_outcomes():
    def h(x):
        return 1 if x[0] <= 5 else 0

    assert trace(h, [3]).path == trace(h, [5]).path == path_id([True])
    assert trace(h, [6]).path == path_id([False]) != path_id([True])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 200), min_size=4, max_size=4), st.integers(0, 3))
def test_path_unchanged_by_perturbations_that_cross_no_threshold(x, i):
    """Brief §2.4: a perturbation smaller than the distance to the nearest threshold keeps the
    path id."""

    def pin(d):
        return sum(v for v in d if v <= 5)

    y = list(x)
    y[i] = x[i] + 1 if x[i] != 5 else x[i] - 1
    assert (trace(pin, x).path == trace(pin, y).path) is ((x[i] <= 5) == (y[i] <= 5))


def test_explore_finds_every_pinning_path_and_proves_completeness():
    def pin(d):
        return sum(v for v in d if v <= 5)

    e = explore_paths(pin, [0] * 3, [200] * 3)
    assert len(e.paths) == 8 and e.complete
    for p in e.paths:  # every seed really takes its path
        assert trace(pin, p.seed.tolist()).path == p.id
    assert {p.outcomes for p in e.paths} == {
        (a, b, c) for a in (True, False) for b in (True, False) for c in (True, False)
    }


def test_infeasible_branches_are_counted_not_reached():
    def h(x):
        if x[0] > 5 and x[0] < 3:  # the inner branch is dead code
            return 1
        return 0

    e = explore_paths(h, [0], [10])
    assert e.complete and e.unsat >= 1
    assert {p.outcomes for p in e.paths} == {(True, False), (False,)}


def test_sorting_paths_of_first_fit_decreasing():
    def ffd(x):
        bins = []
        for i in sorted(range(len(x)), key=lambda i: x[i], reverse=True):
            for b in range(len(bins)):
                if bins[b] + x[i] <= 10:
                    bins[b] = bins[b] + x[i]
                    break
            else:
                bins.append(x[i])
        return len(bins)

    e = explore_paths(ffd, [1] * 4, [10] * 4, max_paths=5000, budget_s=60)
    assert e.complete
    ids = [p.id for p in e.paths]
    assert len(ids) == len(set(ids))
    for p in e.paths:
        assert trace(ffd, p.seed.tolist()).path == p.id
    assert {p.value for p in e.paths} == {1, 2, 3, 4}


def test_real_inputs_and_nonlinear_division():
    def h(x):
        return 1 if x[0] / (x[1] + 1) > 2.5 else 0

    e = explore_paths(h, [0.0, 0.0], [10.0, 10.0], integer=False)
    assert e.complete and sorted(p.value for p in e.paths) == [0, 1]


def test_seeds_respect_the_nonzero_budget_and_linear_constraints():
    def h(x):
        return sum(1 for v in x if v >= 3)

    A, b = np.array([[1.0, 1.0, 1.0, 1.0]]), np.array([9.0])
    e = explore_paths(h, [0] * 4, [5] * 4, max_nonzero=2, A=A, b=b)
    assert e.complete
    for p in e.paths:
        assert np.count_nonzero(p.seed) <= 2 and p.seed.sum() <= 9
    # at most two inputs can reach 3 under the budget: values 0, 1, 2
    assert sorted({p.value for p in e.paths}) == [0, 1, 2]


def test_concretized_inputs_hide_their_branches():
    def h(x):
        return 1 if float(x[0]) <= 5 else 0

    t = trace(h, [3])
    assert t.branches == 0 and t.concretized == 1


def test_a_crash_on_one_input_does_not_end_exploration():
    def h(x):
        if x[0] > 5:
            raise RuntimeError("boom")
        return 0

    e = explore_paths(h, [0], [10])
    assert len(e.paths) == 1 and e.errors and "boom" in e.errors[0]
    # the branches after the crash were never traced, so the paths found are not all of them
    assert not e.complete


def test_budget_bounds_an_exponential_exploration():
    def pin(d):
        return sum(v for v in d if v <= 5)

    e = explore_paths(pin, [0] * 40, [200] * 40, budget_s=0.5)
    assert not e.complete and e.seconds < 2.0 and len(e.paths) > 1


@pytest.mark.parametrize("integer", [True, False])
def test_trace_of_a_plain_value_heuristic(integer):
    t = trace(lambda x: x[0] * 2 + 1, [3], integer=integer)
    assert t.value == 7 and t.branches == 0
