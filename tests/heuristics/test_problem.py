"""The problem interface: projections that land inside the realistic-input constraints, and
optimum values of any numeric type."""

import numpy as np
import pytest

from datahall.heuristics.problem import Optimum, Problem, ProblemError, problem


def _first(x):
    return x[0]


def _total(x):
    return Optimum(float(sum(x)))


def test_nonzero_budget_keeps_inputs_whose_bounds_exclude_zero():
    # x[0] cannot be 0, so it must be the one non-zero input that max_nonzero=1 leaves
    p = Problem("mnz", _first, _total, [1, 0, 0], [10, 10, 10], max_nonzero=1)
    for x in ([1, 5, 5], [10, 10, 10], [3, 0, 7]):
        y = p.project(np.array(x, dtype=float))
        assert p.feasible(y), y
        assert y[0] == x[0] and np.count_nonzero(y) == 1
    # without forced inputs the smallest are dropped, as before
    q = Problem("mnz", _first, _total, [0] * 3, [10] * 3, max_nonzero=2)
    assert q.project(np.array([4.0, 9.0, 6.0])).tolist() == [0.0, 9.0, 6.0]


@pytest.mark.parametrize("x", [[7, 2], [10, 0], [9, 3], [10, 10]])
def test_integer_projection_meets_rows_with_negative_coefficients(x):
    # x0 <= 2 x1 + 1: rounding a point of the segment toward the anchor can break the row
    p = Problem("row", _first, _total, [0, 0], [10, 10], A=[[1, -2]], b=[1])
    y = p.project(np.array(x, dtype=float))
    assert p.feasible(y), y


def test_real_projection_is_the_bisection_toward_the_anchor():
    p = Problem("row", _first, _total, [0, 0], [10, 10], A=[[1, 1]], b=[10], integer=False)
    assert p.project(np.array([8.0, 8.0])) == pytest.approx([5.0, 5.0], abs=1e-6)


def test_optimum_values_may_be_numpy_numbers():
    for v in (np.int64(7), np.float32(7.0), 7):
        p = Problem("np", _first, lambda x, v=v: Optimum(v), [0], [5])
        assert p.gap([1]) == 6.0
    with pytest.raises(ProblemError, match="optimum returned"):
        Problem("nan", _first, lambda x: Optimum(float("nan")), [0], [5]).gap([1])
    with pytest.raises(ProblemError, match="optimum returned"):
        Problem("str", _first, lambda x: Optimum("seven"), [0], [5]).gap([1])


def test_decorator_takes_array_bounds_and_rejects_a_wrong_dim():
    @problem(optimum=sum, lower=np.zeros(3), upper=np.full(3, 9.0))
    def first(x):
        return x[0]

    assert first.dim == 3 and first.gap([1, 2, 3]) == 5.0
    with pytest.raises(ProblemError, match="3 bounds for dim=2"):
        problem(optimum=sum, lower=[0, 0, 0], upper=9, dim=2)(_first)
