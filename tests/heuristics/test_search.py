"""Guided search: gradient ascent on the gap that stays on a code path, with duals or finite
differences for OPT and finite differences or a GP for H."""

import math

import numpy as np
import pytest

from datahall.heuristics.concolic import trace
from datahall.heuristics.problem import Optimum, Problem
from datahall.heuristics.search import gp_gradient, guided_search


class Pinning:
    """Two demands on one link of capacity 100: demands at most 5 are pinned and each pinned
    unit also costs one unit of the other's capacity (a toy with a known worst case)."""

    def __call__(self, x):
        pinned = x[0] if x[0] <= 5 else 0
        rest = x[1]
        if rest > 100 - 2 * pinned:
            rest = 100 - 2 * pinned
        return pinned + rest


class LinkOpt:
    def __init__(self, duals: bool):
        self.duals = duals
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        total = x[0] + x[1]
        value = min(total, 100.0)
        grad = np.array([1.0, 1.0]) if total < 100 else np.zeros(2)
        return Optimum(value, grad if self.duals else None)


@pytest.mark.parametrize("duals", [True, False])
def test_climbs_to_the_worst_case_of_the_seed_path(duals):
    opt = LinkOpt(duals)
    p = Problem("toy", Pinning(), opt, [0, 0], [200, 200])
    seed = np.array([1.0, 150.0])  # the path where d0 is pinned and d1 is capped
    r = guided_search(p, seed, budget_s=10, rng=1)
    # on this path the gap is min(d0 + d1, 100) − (d0 + 100 − 2 d0) = d0, at most 5
    assert r.gap == 5.0
    assert r.x[0] == 5.0 and r.x[1] >= 90.0
    assert trace(p.heuristic, r.x.tolist()).path == trace(p.heuristic, seed.tolist()).path
    assert r.gap == p.gap(r.x)
    assert r.history == sorted(r.history, key=lambda t: t[1])


def test_duals_save_optimum_calls():
    calls = {}
    for duals in (True, False):
        opt = LinkOpt(duals)
        p = Problem("toy", Pinning(), opt, [0, 0], [200, 200])
        guided_search(p, np.array([1.0, 150.0]), budget_s=10, rng=1, max_iters=5)
        calls[duals] = opt.calls
    assert calls[True] < calls[False]


def test_min_sense_gap_is_heuristic_minus_optimum():
    # "bins": the heuristic uses one bin per item above 4; the optimum pairs them
    p = Problem(
        "bins",
        lambda x: sum(1 for v in x if v > 4),
        lambda x: Optimum(math.ceil(sum(1 for v in x if v > 4) / 2)),
        [0, 0, 0, 0],
        [5, 5, 5, 5],
        sense="min",
    )
    r = guided_search(p, np.array([5.0, 5.0, 5.0, 0.0]), budget_s=5)
    assert r.gap == 2.0 and p.gap(r.x) == 2.0 and r.x.tolist() == [5.0] * 4  # H 4, OPT 2
    seed = np.array([5.0, 5.0, 5.0, 0.0])
    r = guided_search(p, seed, budget_s=5, hop=False)
    # MetaEase's rule: the climb stays on the seed's path (points it probed off the path still
    # count toward the best gap seen)
    assert r.info["path"] == trace(p.heuristic, seed.tolist()).path and r.info["hops"] == 0


def test_a_crash_keeps_the_best_point_found_before_it():
    def fragile(x):
        if x[0] > 150:
            raise RuntimeError("overflow in my heuristic")
        return 0

    p = Problem("fragile", fragile, lambda x: Optimum(float(x[0])), [0], [200])
    r = guided_search(p, np.array([10.0]), budget_s=5)
    assert "overflow in my heuristic" in r.info["error"]
    assert 10.0 < r.gap <= 150.0 and r.gap == r.x[0]


def test_budget_is_respected():
    p = Problem(
        "slow", lambda x: x[0] + x[1] * 0, lambda x: Optimum(2.0 * x[0]), [0, 0], [1e6, 1e6]
    )
    r = guided_search(p, np.array([1.0, 1.0]), budget_s=0.3, max_iters=10**6)
    assert r.seconds < 1.5


def test_surrogate_gradient_finds_the_same_worst_case():
    opt = LinkOpt(True)
    p = Problem("toy", Pinning(), opt, [0, 0], [200, 200])
    r = guided_search(p, np.array([1.0, 150.0]), budget_s=10, rng=3, surrogate=True)
    assert r.gap == 5.0


def test_gp_gradient_of_a_linear_function():
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, size=(30, 3))
    w = np.array([2.0, -1.0, 0.5])
    g = gp_gradient(X, X @ w, np.zeros(3), 0.0, np.ones(3))
    assert np.allclose(g, w, atol=0.25)
