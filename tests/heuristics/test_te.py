"""Traffic engineering: max-flow OPT with duals, demand pinning and POP, on the brief's hand
instance (§3) and on Abilene."""

import itertools
import multiprocessing
import pickle

import networkx as nx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from datahall.core.topologies.wan import wan
from datahall.heuristics.problem import ProblemError
from datahall.heuristics.te import (
    DemandPinning,
    MaxFlow,
    Pop,
    TEInstance,
    builtin_te,
    demand_pinning_problem,
    pinning_example,
    pop_problem,
    te_instance,
)

ABILENE = te_instance(wan("abilene"), k=4)


def scipy_max_flow(inst, demand, capacity=None):
    """The path LP by a fresh dense scipy linprog: (value, ∂OPT/∂d from the marginals)."""
    n, m = len(inst.pairs), len(inst.links)
    cols = [(i, p) for i, ps in enumerate(inst.paths) for p in ps]
    A = np.zeros((n + m, len(cols)))
    for j, (i, p) in enumerate(cols):
        A[i, j] = 1
        for e in p:
            A[n + e, j] = 1
    cap = inst.capacity if capacity is None else capacity
    r = linprog(-np.ones(len(cols)), A_ub=A, b_ub=np.concatenate([demand, cap]), method="highs")
    assert r.status == 0
    return -r.fun, -r.ineqlin.marginals[:n]  # scipy minimises: ∂OPT/∂b = −marginal


def random_demands(rng, n, density=0.4, top=200):
    return (rng.integers(0, top + 1, n) * (rng.random(n) < density)).astype(float)


# ---- the hand instance (brief §3) ---------------------------------------------------------------


def test_hand_instance_gap_is_the_threshold():
    inst = pinning_example()
    assert inst.links == ((0, 1), (1, 3), (1, 2), (2, 3))
    assert inst.paths == (((0, 1),), ((1,), (2, 3)))
    opt, dp = MaxFlow(inst), DemandPinning(inst, threshold=5)
    assert opt([100, 5]).value == 105.0
    assert dp([100, 5]) == 100.0
    p = demand_pinning_problem(inst)
    assert p.info["threshold"] == 5 and p.upper.tolist() == [200.0, 200.0]
    assert p.gap([100, 5]) == 5.0 and p.gap([100, 5]) / p.scale == 0.0125
    assert p.gap([200, 200]) == 0.0  # the all-max seed pins nothing
    # gap = min(d03, 100) − min(d03, 100 − d13) for d13 <= T
    for d03, d13 in itertools.product([0, 40, 97, 100, 150], [0, 1, 3, 5]):
        assert p.gap([d03, d13]) == min(d03, 100) - min(d03, 100 - d13)


def test_pinned_leftover_goes_to_the_lp():
    inst = pinning_example()
    dp = DemandPinning(inst, threshold=150)
    # (0,3) pins 100 on 0→1→3, leaving no room on 1→3; (1,3)'s 150 is pinned with 0 placed and
    # its leftover is routed by the LP over 1→2→3 (100 units)
    assert dp([100, 150]) == 200.0 == MaxFlow(inst)([100, 150]).value
    # (0,3) pins 30; (1,3) pins the 70 left on 1→3, and its leftover 80 takes the detour
    assert dp([30, 150]) == 180.0 == MaxFlow(inst)([30, 150]).value
    assert dp.pinned([30, 150]) == [0, 1]


def test_dual_sign_and_finite_difference_on_the_hand_instance():
    inst = pinning_example()
    opt = MaxFlow(inst)
    for x, grad in [([50, 30], [1, 1]), ([150, 5], [0, 1]), ([60, 170], [0, 0])]:
        g = opt(x).gradient
        assert g.tolist() == grad
        _, scipy_grad = scipy_max_flow(inst, np.array(x, float))
        assert np.allclose(scipy_grad, grad)  # same sign convention as scipy's −marginal
        h = 0.5
        for i in range(2):
            up, down = np.array(x, float), np.array(x, float)
            up[i] += h
            down[i] -= h
            assert (opt(up).value - opt(down).value) / (2 * h) == pytest.approx(g[i], abs=1e-6)
    # 1→3 and the detour are full and (1,3) is short, so one more unit of (0,3) displaces one
    # of (1,3): both demand duals are 0, the price sits on 1→3 and on the detour
    s = opt.solve([60, 170])
    assert s.value == 200.0 and s.path_flow.sum() == 200.0
    assert s.link_duals[0] == 0.0 and s.link_duals[1] == 1.0
    assert s.link_duals[2] + s.link_duals[3] == 1.0


def test_dual_is_a_supergradient_and_matches_central_differences_on_abilene():
    opt = MaxFlow(ABILENE)
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 120, len(ABILENE.pairs))  # real-valued: most coordinates non-degenerate
    o, h = opt(x), 1e-3
    assert np.all((o.gradient >= 0) & (o.gradient <= 1))
    smooth = 0
    for i in range(len(x)):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        right = (opt(up).value - o.value) / h
        left = (o.value - opt(down).value) / h
        # OPT is concave in d: right derivative <= dual <= left derivative
        assert right - 1e-6 <= o.gradient[i] <= left + 1e-6
        if abs(right - left) < 1e-9:
            smooth += 1
            assert (opt(up).value - opt(down).value) / (2 * h) == pytest.approx(
                o.gradient[i], abs=1e-6
            )
    assert smooth >= len(x) // 2


# ---- invariants -----------------------------------------------------------------------------


def test_warm_started_model_matches_a_fresh_scipy_lp():
    opt, dp = MaxFlow(ABILENE), DemandPinning(ABILENE)
    rng = np.random.default_rng(1)
    for _ in range(12):
        x = random_demands(rng, len(ABILENE.pairs))
        value, _ = scipy_max_flow(ABILENE, x)
        assert opt(x).value == pytest.approx(value, abs=1e-6)
    # and the residual LP of demand pinning, against its own cold scipy solve
    x = random_demands(rng, len(ABILENE.pairs), density=1.0, top=10)
    residual, rest, pinned = ABILENE.capacity.copy(), x.copy(), 0.0
    for i, d in enumerate(x):
        if d <= dp.threshold:
            put = min(d, residual[list(ABILENE.shortest[i])].min())
            residual[list(ABILENE.shortest[i])] -= put
            rest[i] -= put
            pinned += put
    assert dp(list(x)) == pytest.approx(pinned + scipy_max_flow(ABILENE, rest, residual)[0])


def test_threshold_zero_pins_nothing_and_one_part_pop_is_opt():
    opt, dp0 = MaxFlow(ABILENE), DemandPinning(ABILENE, threshold=0)
    pop1 = Pop(ABILENE, parts=1, draws=2)
    rng = np.random.default_rng(2)
    for _ in range(5):
        x = random_demands(rng, len(ABILENE.pairs))
        assert dp0(list(x)) == pytest.approx(opt(x).value, abs=1e-6)
        assert pop1(x) == pytest.approx(opt(x).value, abs=1e-6)


_DP = demand_pinning_problem(ABILENE)
_POP = pop_problem(ABILENE, draws=2)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(0, 200), min_size=len(ABILENE.pairs), max_size=len(ABILENE.pairs)),
    st.integers(0, 10),
)
def test_gap_is_never_negative(values, small):
    x = np.array(values, dtype=float)
    x[:: small + 2] = np.minimum(x[:: small + 2], small)  # some demands under the threshold
    assert _DP.gap(x) >= -1e-6
    assert _POP.gap(x) >= -1e-6


def test_determinism_pickling_and_forked_workers():
    a, b = Pop(ABILENE, seed=3), Pop(ABILENE, seed=3)
    same = zip(itertools.chain(*a.partitions), itertools.chain(*b.partitions), strict=True)
    assert all(np.array_equal(g, h) for g, h in same)
    assert not np.array_equal(a.partitions[0][0], Pop(ABILENE, seed=4).partitions[0][0])
    assert len(a.partitions) == 5 and all(len(d) == 2 for d in a.partitions)
    assert sorted(np.concatenate(a.partitions[0]).tolist()) == list(range(len(ABILENE.pairs)))
    x = random_demands(np.random.default_rng(5), len(ABILENE.pairs))
    assert a(x) == b(x) == a(x)
    p = builtin_te("dp", "abilene")
    h, o = pickle.loads(pickle.dumps(p.heuristic)), pickle.loads(pickle.dumps(p.optimum))
    assert h(list(x)) == p.heuristic(list(x)) and o(x).value == p.optimum(x).value
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        gaps = pool.map(p.gap, [x, x / 2, x / 10])
    assert gaps == [p.gap(x), p.gap(x / 2), p.gap(x / 10)]


def test_branches_are_taken_on_the_inputs_as_given():
    seen = []

    class Tracked:
        def __init__(self, v):
            self.v = v

        def __le__(self, other):
            seen.append((self.v, other))
            return self.v <= other

        def __float__(self):
            return float(self.v)

    dp = DemandPinning(pinning_example())
    assert dp([Tracked(100), Tracked(5)]) == 100.0
    assert seen == [(100, 5), (5, 5)]


# ---- instances and problems -----------------------------------------------------------------


def test_paths_are_the_k_shortest_with_name_order_ties():
    G = wan("abilene")
    for (s, t), ps in zip(ABILENE.pairs, ABILENE.paths, strict=True):
        brute = sorted(nx.all_simple_paths(G, s, t), key=lambda p: (len(p), p))[:4]
        assert [[ABILENE.links[e][0] for e in p] + [t] for p in ps] == brute
    assert len(ABILENE.pairs) == 132 and ABILENE.total_capacity == 3000.0


def test_pair_choices():
    G = wan("tatanld")
    inst = te_instance(G, k=4, pairs=60, seed=1)
    assert len(inst.pairs) == 60 and inst.pairs == te_instance(G, 4, 60, seed=1).pairs
    assert inst.pairs != te_instance(G, 4, 60, seed=2).pairs
    assert all(1 <= len(ps) <= 4 for ps in inst.paths)
    one = te_instance(G, k=2, pairs=[("Mumbai", "Delhi"), ("Delhi", "Mumbai")])
    assert one.names == ["Mumbai->Delhi", "Delhi->Mumbai"] and len(one.paths[0]) == 2
    H = nx.DiGraph()
    H.add_edge("a", "b", capacity=1)
    H.add_node("c")
    assert te_instance(H).pairs == (("a", "b"),)  # pairs without a path are dropped
    with pytest.raises(ProblemError, match="connected ordered pairs"):
        te_instance(wan("abilene"), pairs=1000)
    with pytest.raises(ProblemError, match="not two distinct nodes"):
        te_instance(wan("abilene"), pairs=[("ATLAng", "Nowhere")])
    for bad in (True, 2.5, [1, 2], [("ATLAng", "CHINng", "IPLSng")]):
        with pytest.raises(ProblemError, match="pairs must be"):
            te_instance(wan("abilene"), pairs=bad)


def test_problem_builders():
    p = builtin_te("pop", "abilene", draws=2)
    assert p.dim == 132 and p.integer and p.sense == "max" and p.names[0] == "ATLAM5->ATLAng"
    assert p.scale == 3000.0 and p.scale_label == "of total capacity"
    assert p.info["parts"] == 2 and p.info["draws"] == 2 and p.info["topology"] == "abilene"
    x = np.zeros(132)
    x[[0, 5]] = [150, 4]
    d = p.describe(x)
    assert d["nonzero"] == 2 and d["largest"][0] == [p.names[0], 150.0] and len(d["per_draw"]) == 2
    dp = builtin_te("dp", "abilene", threshold=10, max_demand=50)
    assert dp.info["threshold"] == 10 and dp.upper.max() == 50.0
    assert dp.describe(x)["pinned"] == 1 and dp.describe(x)["pinned_pairs"] == [dp.names[5]]
    with pytest.raises(ProblemError, match="dp"):
        builtin_te("ecmp")
    with pytest.raises(ProblemError, match="no parameter 'parts'; it takes threshold"):
        builtin_te("dp", parts=3)
    with pytest.raises(ProblemError, match="no path"):
        MaxFlow(TEInstance("bad", (0, 1), ((0, 1),), [1.0], ((0, 1),), ((),)))
    with pytest.raises(ProblemError, match="expected 132 demands"):
        MaxFlow(ABILENE)([1, 2])
