import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datahall.heuristics.builtins import build
from datahall.heuristics.packing import (
    FirstFit,
    FirstFitDecreasing,
    OptimalBins,
    bin_packing_problem,
    first_fit,
    first_fit_decreasing,
    lower_bound,
    optimal_packing,
)
from datahall.heuristics.problem import Problem, ProblemError


def brute_force_bins(sizes, capacity):
    """The fewest bins by trying every assignment of items to bins (tiny instances only)."""
    items = [s for s in sizes if any(v > 0 for v in s)]
    best = len(items)

    def place(k, loads):
        nonlocal best
        if len(loads) >= best:
            return
        if k == len(items):
            best = len(loads)
            return
        s = items[k]
        for b, load in enumerate(loads):
            if all(a + v <= capacity for a, v in zip(load, s, strict=True)):
                loads[b] = [a + v for a, v in zip(load, s, strict=True)]
                place(k + 1, loads)
                loads[b] = load
        place(k + 1, [*loads, list(s)])

    place(0, [])
    return best


def check_packing(bins, x, capacity, dims):
    s = np.asarray(x, dtype=float).reshape(-1, dims)
    placed = sorted(i for b in bins for i in b)
    assert placed == [i for i in range(len(s)) if np.any(s[i] > 0)]
    for b in bins:
        assert b
        assert np.all(s[b].sum(axis=0) <= capacity)


# -- the brief's oracles (§3) -------------------------------------------------------------------


def test_ffd_oracle_three_bins_where_two_suffice():
    x = [6, 5, 3, 2, 2, 2]
    assert len(first_fit_decreasing(x, 10)) == 3
    opt = optimal_packing(x, 10)
    assert len(opt) == 2
    assert sorted(sorted(x[i] for i in b) for b in opt) == [[2, 2, 6], [2, 3, 5]]
    p = bin_packing_problem("ffd", items=6, capacity=10)
    gap, h, o = p.evaluate(x)
    assert (gap, h, o.value) == (1.0, 3.0, 2.0)
    assert o.gradient is None


def test_ff_oracle_small_items_first():
    x = [1, 1, 9, 9]
    assert first_fit(x, 10) == [[0, 1], [2], [3]]
    assert len(optimal_packing(x, 10)) == 2
    p = bin_packing_problem("ff", items=4, capacity=10)
    assert p.evaluate(x)[:2] == (1.0, 3.0)
    # FFD sorts the 9s first and pairs each with a 1
    assert bin_packing_problem("ffd", items=4).gap(x) == 0.0


# -- heuristics ---------------------------------------------------------------------------------


def test_zero_items_need_no_bin():
    assert first_fit([0, 0, 0], 10) == []
    assert first_fit([0, 4, 0, 7], 10) == [[1], [3]]
    assert optimal_packing([0, 0], 10) == []
    p = bin_packing_problem("ffd", items=3)
    assert p.evaluate([0, 0, 0])[:2] == (0.0, 0.0)


def test_vector_item_must_fit_every_dimension():
    # (6, 2) and (4, 9) fit together in cpu (10) but not in mem (11)
    assert first_fit([6, 2, 4, 9], 10, dims=2) == [[0], [1]]
    assert first_fit([6, 1, 4, 9], 10, dims=2) == [[0, 1]]


def test_ffd_sorts_by_sum_ties_by_index():
    # (5, 1) and (1, 5) tie on 6 after (5, 5): the lower index goes first and takes bin 0
    assert first_fit_decreasing([5, 1, 1, 5, 5, 5], 10, dims=2) == [[2, 0], [1]]
    assert first_fit_decreasing([1, 5, 5, 1, 5, 5], 10, dims=2) == [[2, 0], [1]]


def test_input_not_divisible_by_dims():
    with pytest.raises(ProblemError, match="dimensions"):
        first_fit([1, 2, 3], 10, dims=2)


# -- the optimum --------------------------------------------------------------------------------


def test_optimum_when_lower_bound_is_not_tight():
    # seven items of 4: the volume bound says 3 bins, but no bin holds three of them
    x = [4] * 7
    assert lower_bound(x, 10) == 3
    assert len(optimal_packing(x, 10)) == 4


def test_optimum_rejects_oversize_item():
    with pytest.raises(ProblemError, match="exceeds the bin capacity"):
        optimal_packing([3, 11], 10)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 2).flatmap(
        lambda d: st.tuples(
            st.just(d), st.lists(st.lists(st.integers(0, 10), min_size=d, max_size=d), max_size=6)
        )
    )
)
def test_optimum_matches_brute_force(case):
    dims, items = case
    x = [v for s in items for v in s]
    bins = optimal_packing(x, 10, dims)
    check_packing(bins, x, 10, dims)
    assert len(bins) == brute_force_bins(items, 10)


def test_milp_path_matches_brute_force():
    """Instances where the better of FF and FFD misses the lower bound, so the MILP decides."""
    rng = np.random.default_rng(7)
    solved = 0
    while solved < 40:
        dims = int(rng.integers(1, 3))
        x = rng.integers(0, 11, size=7 * dims).tolist()
        ffd = min(len(first_fit(x, 10, dims)), len(first_fit_decreasing(x, 10, dims)))
        if ffd == lower_bound(x, 10, dims):
            continue
        solved += 1
        bins = optimal_packing(x, 10, dims)
        check_packing(bins, x, 10, dims)
        assert len(bins) == brute_force_bins(np.reshape(x, (-1, dims)).tolist(), 10)


# -- properties ---------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(["ff", "ffd"]),
    st.integers(1, 3),
    st.data(),
)
def test_gap_is_nonnegative_and_packings_valid(kind, dims, data):
    n = data.draw(st.integers(1, 8))
    x = data.draw(st.lists(st.integers(0, 10), min_size=n * dims, max_size=n * dims))
    p = bin_packing_problem(kind, items=n, dims=dims, capacity=10)
    check_packing(p.heuristic.bins(x), x, 10, dims)
    check_packing(p.optimum.bins(x), x, 10, dims)
    assert p.gap(x) >= 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=12))
def test_ffd_dosa_bound(x):
    """FFD(I) <= 11/9 OPT(I) + 6/9 in one dimension (Dósa 2007)."""
    ffd = len(first_fit_decreasing(x, 20))
    opt = len(optimal_packing(x, 20))
    assert opt <= ffd
    assert 9 * ffd <= 11 * opt + 6


# -- the Problem --------------------------------------------------------------------------------


def test_problem_fields_names_and_describe():
    p = bin_packing_problem("ffd", items=3, dims=2, capacity=10)
    assert isinstance(p, Problem)
    assert p.sense == "min" and p.integer and p.scale_label == "bins"
    assert p.names == [f"item{i}.{d}" for i in range(3) for d in ("cpu", "mem")]
    assert list(p.lower) == [0] * 6 and list(p.upper) == [10] * 6
    assert bin_packing_problem("ff", items=2).names == ["item0", "item1"]
    d = p.describe(np.array([6, 2, 4, 9, 0, 0], dtype=float))
    assert d["bins_heuristic"] == 2 and d["bins_optimal"] == 2 and d["ratio"] == 1.0
    assert d["empty_items"] == [2]
    assert d["heuristic_packing"] == [  # FFD: (4, 9) has the larger sum, so it opens bin 0
        {"items": [1], "load": [4, 9]},
        {"items": [0], "load": [6, 2]},
    ]
    d = bin_packing_problem("ffd", items=6).describe(np.array([6, 5, 3, 2, 2, 2.0]))
    assert d["heuristic"] == "ffd" and d["gap_bins"] == 1 and d["ratio"] == 1.5


def test_problem_pickles_and_builtins():
    p = build("ff", items=4)
    assert isinstance(p.heuristic, FirstFit) and not isinstance(p.heuristic, FirstFitDecreasing)
    q = pickle.loads(pickle.dumps(p))
    assert q.gap([1, 1, 9, 9]) == 1.0
    assert isinstance(build("ffd").heuristic, FirstFitDecreasing)
    assert isinstance(pickle.loads(pickle.dumps(OptimalBins(2, 1, 10))), OptimalBins)


def test_builder_errors():
    with pytest.raises(ProblemError, match="unknown heuristic"):
        bin_packing_problem("bfd")
    with pytest.raises(ProblemError, match="dim_names"):
        bin_packing_problem(dims=2, dim_names=["cpu"])
