"""The MetaOpt-style MILP oracles against hand-checked values and brute-force enumeration."""

import itertools

import networkx as nx
import numpy as np
import pytest
from scipy.optimize import linprog

from datahall.heuristics.oracle import (
    OracleResult,
    demand_pinning_oracle,
    exhaustive_oracle,
    pop_oracle,
)
from datahall.heuristics.problem import Optimum, Problem, ProblemError
from datahall.heuristics.te import DemandPinning, MaxFlow, Pop, TEInstance


def hand_instance(capacity=100.0):
    """The brief's §3 instance: 0→1, 1→3, 1→2, 2→3; (0,3) over 0→1→3; (1,3) over 1→3 or 1→2→3."""
    return TEInstance(
        "hand",
        (0, 1, 2, 3),
        ((0, 1), (1, 3), (1, 2), (2, 3)),
        np.full(4, capacity),
        ((0, 3), (1, 3)),
        (((0, 1),), ((1,), (2, 3))),
    )


def y_instance():
    """Pairs (0,3) and (1,3) meet on the link 2→3; every link has capacity 100."""
    return TEInstance(
        "y",
        (0, 1, 2, 3),
        ((0, 2), (1, 2), (2, 3)),
        np.full(3, 100.0),
        ((0, 3), (1, 3)),
        (((0, 2),), ((1, 2),)),
    )


def small_instance():
    """A 4-node graph with a chord, both directions, uneven capacities, 2 paths per pair."""
    g = nx.DiGraph()
    caps = {(0, 1): 10, (1, 2): 6, (2, 3): 10, (3, 0): 8, (0, 2): 4}
    links, capacity = [], []
    for (a, b), c in caps.items():
        for u, v in ((a, b), (b, a)):
            g.add_edge(u, v, index=len(links))
            links.append((u, v))
            capacity.append(float(c))
    pairs = ((0, 2), (1, 3), (0, 1), (3, 2))
    paths = []
    for s, t in pairs:
        ps = itertools.islice(nx.shortest_simple_paths(g, s, t), 2)
        paths.append(tuple(tuple(g[u][v]["index"] for u, v in itertools.pairwise(p)) for p in ps))
    return TEInstance("small", (0, 1, 2, 3), tuple(links), np.array(capacity), pairs, tuple(paths))


def max_flow(capacity, paths, demands):
    """Path max-flow by a dense LP, independent of the oracle's own evaluator."""
    cols = [(i, p) for i, ps in enumerate(paths) for p in ps]
    if not cols:
        return 0.0
    a = np.zeros((len(paths) + len(capacity), len(cols)))
    for j, (i, p) in enumerate(cols):
        a[i, j] = 1.0
        for e in p:
            a[len(paths) + e, j] = 1.0
    b = np.concatenate([np.asarray(demands, float), np.asarray(capacity, float)])
    res = linprog(-np.ones(len(cols)), A_ub=a, b_ub=b, method="highs")
    assert res.status == 0
    return -res.fun


def dp_gap(inst, d, threshold):
    """OPT − DP, or None when the pinned load overloads a link (outside the oracle's subspace)."""
    cap = np.asarray(inst.capacity, float)
    residual = cap.copy()
    pinned = [i for i in range(len(d)) if 0 < d[i] <= threshold]
    for i in pinned:
        for e in inst.paths[i][0]:
            residual[e] -= d[i]
    if np.any(residual < -1e-9):
        return None
    rest = [0.0 if i in pinned else d[i] for i in range(len(d))]
    h = sum(d[i] for i in pinned) + max_flow(residual, inst.paths, rest)
    return max_flow(cap, inst.paths, d) - h


def pop_gap(inst, d, partitions, parts):
    cap = np.asarray(inst.capacity, float)
    h = np.mean(
        [
            sum(
                max_flow(cap / parts, [inst.paths[i] for i in grp], [d[i] for i in grp])
                for grp in draw
            )
            for draw in partitions
        ]
    )
    return max_flow(cap, inst.paths, d) - h


def check_consistent(r: OracleResult):
    assert r.status == "optimal"
    assert not r.mismatch
    assert r.gap == pytest.approx(r.objective, abs=1e-6)
    assert r.gap == pytest.approx(r.optimum - r.heuristic)
    assert r.bound >= r.gap - 1e-6


# ---- demand pinning ----------------------------------------------------------------------------


def test_dp_search_quality_oracle():
    r = demand_pinning_oracle(hand_instance(), threshold=5, levels=[5, 100, 200])
    check_consistent(r)
    assert r.gap == pytest.approx(5.0, abs=1e-9)
    assert r.demands[1] == 5.0 and r.demands[0] in (100.0, 200.0)
    assert r.optimum == pytest.approx(105.0) and r.heuristic == pytest.approx(100.0)
    assert r.normalized == pytest.approx(5 / 400)
    assert r.levels == (5.0, 100.0, 200.0)
    assert r.info["pinned_load_fits"]


def test_dp_default_levels_are_threshold_and_twice_capacity():
    r = demand_pinning_oracle(hand_instance(), threshold=5)
    assert r.levels == (5.0, 200.0)
    assert r.gap == pytest.approx(5.0, abs=1e-9)
    assert r.demands.tolist() == [200.0, 5.0]
    assert demand_pinning_oracle(hand_instance(), 5, max_demand=150).levels == (5.0, 150.0)


def test_dp_realistic_constraint_and_threshold_zero():
    # One non-zero demand cannot hurt DP here; with threshold 0 nothing is pinned and DP = OPT.
    assert demand_pinning_oracle(hand_instance(), 5, [5, 100, 200], max_nonzero=1).gap == 0.0
    r = demand_pinning_oracle(hand_instance(), 0, [5, 100, 200])
    check_consistent(r)
    assert r.gap == pytest.approx(0.0, abs=1e-9)


def test_dp_matches_brute_force():
    inst, threshold, levels = small_instance(), 2.0, (2.0, 5.0, 12.0)
    best = max(
        g
        for d in itertools.product((0.0, *levels), repeat=len(inst.pairs))
        if (g := dp_gap(inst, d, threshold)) is not None
    )
    assert best > 1.0  # the instance is not trivial
    r = demand_pinning_oracle(inst, threshold, levels)
    check_consistent(r)
    assert r.gap == pytest.approx(best, abs=1e-6)
    assert dp_gap(inst, r.demands.tolist(), threshold) == pytest.approx(best, abs=1e-6)


def test_dp_subspace_excludes_overloading_pins():
    # Capacity 4 with threshold 5: a pinned 5 would overload 1→3, so inputs with d13 = 5 are
    # excluded; pinning d13 = 3 under d03 = 8 gives OPT 7 (4 + 3 on the detour) and DP 4.
    r = demand_pinning_oracle(hand_instance(4.0), threshold=5, levels=[3, 5, 8])
    check_consistent(r)
    assert r.gap == pytest.approx(3.0, abs=1e-9)
    assert r.demands[1] == 3.0


# ---- POP ---------------------------------------------------------------------------------------


def test_pop_hand_split_and_together():
    inst = y_instance()
    split = pop_oracle(inst, [[[0], [1]]], parts=2, levels=[50, 100])
    check_consistent(split)
    # Each group sees 50 on the shared link: one demand of 100 alone loses 50; two lose nothing.
    assert split.gap == pytest.approx(50.0) and sorted(split.demands.tolist()) == [0.0, 100.0]
    assert (split.optimum, split.heuristic) == pytest.approx((100.0, 50.0))

    together = pop_oracle(inst, [[[0, 1], []]], parts=2, levels=[50, 100], max_nonzero=1)
    assert together.gap == pytest.approx(50.0)
    # Averaged over both draws, H(100, 0) = (50 + 50) / 2 and H(100, 100) = (100 + 50) / 2.
    both = pop_oracle(inst, [[[0], [1]], [[0, 1], []]], parts=2, levels=[50, 100])
    check_consistent(both)
    assert both.gap == pytest.approx(50.0) and sorted(both.demands.tolist()) == [0.0, 100.0]
    # One part: POP is the optimum.
    assert pop_oracle(inst, [[[0, 1]]], levels=[50, 100]).gap == pytest.approx(0.0, abs=1e-9)


def test_pop_matches_brute_force():
    inst, levels = small_instance(), (3.0, 7.0, 15.0)
    partitions = [[[0, 1], [2, 3]], [[0, 2], [1, 3]]]
    best = max(
        pop_gap(inst, d, partitions, 2)
        for d in itertools.product((0.0, *levels), repeat=len(inst.pairs))
    )
    assert best > 1.0
    r = pop_oracle(inst, partitions, parts=2, levels=levels)
    check_consistent(r)
    assert r.gap == pytest.approx(best, abs=1e-6)
    assert pop_gap(inst, r.demands.tolist(), partitions, 2) == pytest.approx(best, abs=1e-6)


def test_pop_rejects_bad_partitions():
    with pytest.raises(ProblemError, match="exactly one group"):
        pop_oracle(y_instance(), [[[0]]], levels=[100])
    with pytest.raises(ProblemError, match="exactly one group"):
        pop_oracle(y_instance(), [[[0, 1], [1]]], levels=[100])


def test_bad_inputs_say_what_to_fix():
    with pytest.raises(ProblemError, match="non-negative"):
        demand_pinning_oracle(hand_instance(), 5, levels=[-1, 5])
    with pytest.raises(ProblemError, match="positive level"):
        demand_pinning_oracle(hand_instance(), 5, levels=[0])
    bad = TEInstance("bad", (0, 1), ((0, 1),), np.ones(1), ((0, 1),), (((3,),),))
    with pytest.raises(ProblemError, match="outside"):
        demand_pinning_oracle(bad, 5)


def test_time_limit_is_reported_honestly():
    inst = small_instance()
    r = demand_pinning_oracle(inst, 2, (1, 2, 5, 9, 12), time_limit=1e-9)
    assert r.status == "time_limit"
    # Whatever came back is a true gap of its input (the all-zero input when HiGHS had no
    # incumbent yet), and the bound is not claimed to be tight.
    assert dp_gap(inst, r.demands.tolist(), 2) == pytest.approx(r.gap, abs=1e-6)
    assert r.mip_gap > 0 and r.bound >= r.gap
    if np.isnan(r.objective):
        assert r.gap == 0.0 and not r.demands.any()


def test_agrees_with_the_python_heuristics():
    inst = small_instance()
    r = demand_pinning_oracle(inst, 2, (2.0, 5.0, 12.0))
    opt, dp = MaxFlow(inst), DemandPinning(inst, threshold=2)
    assert opt(r.demands).value - dp(r.demands.tolist()) == pytest.approx(r.gap, abs=1e-6)
    pop = Pop(inst, parts=2, draws=3, seed=1)
    r = pop_oracle(inst, pop.partitions, pop.parts, levels=(3.0, 7.0, 15.0))
    check_consistent(r)
    assert opt(r.demands).value - pop(r.demands.tolist()) == pytest.approx(r.gap, abs=1e-6)
    best = max(
        pop_gap(inst, d, pop.partitions, 2)
        for d in itertools.product((0.0, 3.0, 7.0, 15.0), repeat=len(inst.pairs))
    )
    assert r.gap == pytest.approx(best, abs=1e-6)


# ---- exhaustive --------------------------------------------------------------------------------


def first_fit(sizes, capacity=10):
    bins = []
    for s in sizes:
        for k, load in enumerate(bins):
            if load + s <= capacity:
                bins[k] += s
                break
        else:
            bins.append(s)
    return len(bins)


def optimal_bins(sizes, capacity=10):
    n = len(sizes)
    for k in range(1, n + 1):
        for assign in itertools.product(range(k), repeat=n):
            loads = [0.0] * k
            for s, b in zip(sizes, assign, strict=True):
                loads[b] += s
            if max(loads) <= capacity:
                return k
    return n


def bin_packing():
    return Problem(
        "first-fit",
        heuristic=lambda x: first_fit([float(v) for v in x]),
        optimum=lambda x: Optimum(optimal_bins(list(x))),
        lower=[1] * 4,
        upper=[9] * 4,
        sense="min",
    )


def test_exhaustive_first_fit():
    r = exhaustive_oracle(bin_packing(), [1, 9])
    # Items 1, 1, 9, 9: first fit opens 3 bins, the optimum 2; the first such point in grid order.
    assert (r.gap, r.heuristic, r.optimum) == (1.0, 3.0, 2.0)
    assert r.demands.tolist() == [1.0, 1.0, 9.0, 9.0]
    assert r.status == "optimal" and r.info["evaluated"] == 16


def test_exhaustive_respects_feasibility_and_per_input_grids():
    capped = bin_packing()
    capped.A, capped.b = np.ones((1, 4)), np.array([12.0])  # at most one item of 9
    r = exhaustive_oracle(capped, [1, 9])
    assert r.gap == 0.0 and (r.info["evaluated"], r.info["skipped"]) == (5, 11)
    capped.b = np.array([3.0])
    with pytest.raises(ProblemError, match="no grid point is feasible"):
        exhaustive_oracle(capped, [1, 9])
    r = exhaustive_oracle(bin_packing(), [[1], [1, 9], [0, 9], [9]])  # 0 is outside the box
    assert r.info["skipped"] == 2 and r.gap == 1.0
    with pytest.raises(ProblemError, match="max_points"):
        exhaustive_oracle(bin_packing(), range(1, 10), max_points=1000)
    with pytest.raises(ProblemError, match="grids for 4 inputs"):
        exhaustive_oracle(bin_packing(), [[1], [9]])
