"""ForestColl's optimality bound: x*, the bottleneck cut and the tree-slot scale (U, k).

For an allgather every shard held inside a node set S must leave S through the arcs B⁺(S), so the
best per-compute-node rate is (ForestColl, NSDI '26; our brief §2.2)

    x* = min over S ⊂ V with S ⊉ Vc of B⁺(S) / |S ∩ Vc|,     algbw_opt = N·x*.

A schedule reaching it packs k out-trees per compute root into integer "tree slots"
c_e = ⌊U·b_e⌋ with k/U = x* (brief §2.2, "Recovering (U, k)"). Reduce-scatter is bounded the same
way on the transposed graph (ingress B⁻(S)); allreduce is reduce-scatter then allgather, so
algbw = N·x*/2; broadcast and reduce from one root are bounded by the root's weakest max-flow.

Three independent ways to compute x* are here: :func:`optimal_bound` (Dinkelbach on parametric min
cuts via :func:`datahall.core.flow.bottleneck_cut`, our reconstruction, brief §2.3.2),
:func:`binary_search_bound` (the reference method, brief §2.3.1) and :func:`lp_bound` (a
multi-commodity LP on HiGHS, brief §6). Tests check that they agree.

>>> from datahall.core.topologies import dgx_a100
>>> b = optimal_bound(dgx_a100(boxes=2))
>>> b.x_star, b.algbw, b.U, b.k
(Fraction(65, 3), Fraction(1040, 3), Fraction(3, 5), 13)
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from fractions import Fraction

import networkx as nx
import numpy as np
from scipy.sparse import coo_matrix

from ..core.flow import FlowNetwork, bottleneck_cut, solve_lp
from ..core.topology import TopologyError, compute_nodes, validate
from ..core.units import exact
from .schedule import COLLECTIVES

__all__ = [
    "Bound",
    "optimal_bound",
    "fixed_k_bound",
    "binary_search_bound",
    "lp_bound",
    "recover_U_k",
    "slot_capacities",
    "check_request",
    "transposed",
]

SOURCE = ("__source__",)


@dataclass(frozen=True)
class Bound:
    """The best rate a tree-pipeline schedule can reach for `collective` on a topology.

    `x_star` is the per-compute-node rate in GB/s (for broadcast/reduce: the root's rate) and
    `algbw` the nccl-tests algorithm bandwidth it allows. `U` and `k` are the tree-slot scale: k
    trees per root fit in the integer capacities ⌊U·b_e⌋, and k/U = x_star. `cut` is the source
    side of a bottleneck cut; with `transposed` true it is a cut of the transposed graph (its
    ingress B⁻ in the topology binds). `fixed_k` marks a bound restricted to a given k.
    """

    collective: str
    N: int
    x_star: Fraction
    algbw: Fraction
    U: Fraction
    k: int
    cut: frozenset
    root: str | None = None
    transposed: bool = False
    iterations: int = 0
    fixed_k: bool = False


def check_request(G: nx.DiGraph, collective: str, root: str | None) -> list[str]:
    """Validate a planning request and return the compute nodes; one clear error otherwise."""
    if collective not in COLLECTIVES:
        raise ValueError(f"unknown collective {collective!r}; use one of {', '.join(COLLECTIVES)}")
    validate(G)
    Vc = compute_nodes(G)
    name = G.graph.get("name", "topology")
    if len(Vc) < 2:
        raise TopologyError(
            f"{name}: a collective needs at least two compute nodes, found {len(Vc)}; "
            'mark GPUs with "kind": "gpu"'
        )
    if collective in ("broadcast", "reduce"):
        if root is None:
            raise ValueError(f"{collective} needs a root; pass root=<compute node>, e.g. {Vc[0]!r}")
        if root not in G:
            raise ValueError(f"root {root!r} is not a node of {name}; pick one of {Vc[:4]} ...")
        if root not in Vc:
            raise ValueError(f"root {root!r} is a {G.nodes[root]['kind']}, not a compute node")
    elif root is not None:
        raise ValueError(f"root is only for broadcast and reduce, not {collective}")
    return Vc


def transposed(G: nx.DiGraph) -> nx.DiGraph:
    """G with every arc reversed (same attributes): the graph reduce trees are grown on."""
    return G.reverse(copy=True)


def is_symmetric(G: nx.DiGraph) -> bool:
    """True when every arc u→v has a reverse v→u of equal capacity (G equals its transpose)."""
    return all(
        G.has_edge(v, u) and exact(G[v][u]["capacity"]) == exact(c)
        for u, v, c in G.edges(data="capacity")
    )


def _capacities(G: nx.DiGraph) -> dict[tuple[Hashable, Hashable], Fraction]:
    return {(u, v): exact(c) for u, v, c in G.edges(data="capacity") if u != v}


def slot_capacities(G: nx.DiGraph, U: Fraction) -> dict[tuple[Hashable, Hashable], int]:
    """The integer tree slots c_e = ⌊U·b_e⌋ of every arc (brief §2.2); zero-slot arcs dropped.

    >>> from datahall.core.topologies import ring
    >>> slot_capacities(ring(3, capacity=25), Fraction(1, 10))[("gpu0", "gpu1")]
    2
    """
    out = {}
    for arc, b in _capacities(G).items():
        c = math.floor(U * b)
        if c > 0:
            out[arc] = c
    return out


def recover_U_k(x: Fraction, capacities: Iterable) -> tuple[Fraction, int]:
    """The smallest k (and U = k/x) that make every U·b_e an integer (brief §2.2).

    Write 1/x = a/b in lowest terms and let g = gcd(b, every capacity); then U = a/g, k = b/g.
    Non-integer capacities are first scaled exactly by the lcm L of their denominators (rate
    and capacities both), which gives U = L·a/g with 1/(L·x) = a/b.

    >>> recover_U_k(Fraction(65, 3), [300, 25])
    (Fraction(3, 5), 13)
    >>> recover_U_k(Fraction(5, 4), [2.5, 1])  # half-GB/s links: 4·2.5 and 4·1 are integers
    (Fraction(4, 1), 5)
    """
    x = exact(x)
    if x <= 0:
        raise ValueError(f"rate must be positive, got {x}")
    caps = [exact(c) for c in capacities]
    L = math.lcm(*(c.denominator for c in caps)) if caps else 1
    inv = 1 / (x * L)
    a, b = inv.numerator, inv.denominator
    g = math.gcd(b, *(int(c * L) for c in caps))
    return Fraction(a * L, g), b // g


def _algbw(collective: str, N: int, x: Fraction) -> Fraction:
    if collective in ("broadcast", "reduce"):
        return x
    return N * x / 2 if collective == "allreduce" else N * x


def _root_rate(H: nx.DiGraph, root: str, Vc: list[str]) -> tuple[Fraction, frozenset]:
    """min over compute v of maxflow(root → v) in H, with the source side of the worst cut."""
    net = FlowNetwork(_capacities(H), H.nodes)
    best, cut = None, frozenset()
    for v in Vc:
        if v == root:
            continue
        f = net.maximum_flow(root, v)
        if best is None or f.value < best:
            best, cut = f.value, f.source_side
    return best, cut


def optimal_bound(G: nx.DiGraph, collective: str = "allgather", root: str | None = None) -> Bound:
    """The optimal rate x*, algbw, bottleneck cut and (U, k) of `collective` on fabric `G`.

    allgather: x* = min_S B⁺(S)/|S∩Vc| (brief §2.2), algbw = N·x*. reduce_scatter: the same on
    the transposed graph (ingress; pitfall 5 of the brief). allreduce: reduce-scatter then
    allgather sharing one (U, k), so both run at the smaller of the two rates, algbw = N·x*/2
    (on symmetric fabrics the rates agree; on asymmetric ones running each phase at its own rate
    could reach N/(1/x_rs + 1/x_ag), which plan() reports in its meta). broadcast/reduce from `root`: x* = min over compute
    v of maxflow(root → v) (reduce on the transposed graph), algbw = x*. x* is exact: Dinkelbach
    iteration on parametric min cuts (:func:`~datahall.core.flow.bottleneck_cut`).

    >>> from datahall.core.topologies import mi250
    >>> b = optimal_bound(mi250(boxes=2))
    >>> b.x_star, b.k, b.U, round(float(b.algbw), 3)
    (Fraction(166, 15), 83, Fraction(15, 2), 354.133)
    """
    Vc = check_request(G, collective, root)
    N = len(Vc)
    caps = _capacities(G).values()
    if collective in ("broadcast", "reduce"):
        H = G if collective == "broadcast" else transposed(G)
        x, cut = _root_rate(H, root, Vc)
        U, k = recover_U_k(x, caps)
        return Bound(collective, N, x, x, U, k, cut, root, collective == "reduce", 1)
    candidates = []
    if collective in ("allgather", "allreduce"):
        b = bottleneck_cut(G, Vc)
        candidates.append((b.ratio, b.cut, False, b.iterations))
    if collective == "reduce_scatter" or (collective == "allreduce" and not is_symmetric(G)):
        b = bottleneck_cut(transposed(G), Vc)
        candidates.append((b.ratio, b.cut, True, b.iterations))
    x, cut, trans, iters = min(candidates, key=lambda c: c[0])
    U, k = recover_U_k(x, caps)
    return Bound(collective, N, x, _algbw(collective, N, x), U, k, cut, None, trans, iters)


def _min_scale(bs: list[Fraction], K: int) -> Fraction:
    """The smallest U ≥ 0 with Σ ⌊U·b⌋ ≥ K over the positive capacities `bs`."""
    if K <= 0:
        return Fraction(0)
    U = Fraction(K) / sum(bs)  # Σ⌊U·b⌋ ≤ U·Σb, so nothing smaller works
    while sum(math.floor(U * b) for b in bs) < K:
        U = min(Fraction(math.floor(U * b) + 1) / b for b in bs)  # the next step of the sum
    return U


def _fixed_k_U(
    H: nx.DiGraph, demand: dict[str, int], sinks: list[str], U: Fraction
) -> tuple[Fraction, frozenset, int]:
    """Smallest U ≥ the given start such that maxflow(s, v) ≥ Σ demand for every sink with arc
    capacities ⌊U·b_e⌋ and s→r of capacity demand[r] (our parametric reconstruction).

    A failing sink's min cut A (s ∈ A) needs Σ_{δ⁺(A∖s)} ⌊U·b_e⌋ ≥ Σ_{r ∈ A} demand[r]; the
    smallest U meeting it is a lower bound, so U rises through such values to the exact optimum.
    """
    caps = _capacities(H)
    T = sum(demand.values())
    order = list(sinks)
    cut: frozenset = frozenset()
    iterations = 0
    while True:
        iterations += 1
        slots = {a: math.floor(U * b) for a, b in caps.items()}
        slots.update({(SOURCE, r): d for r, d in demand.items()})
        net = FlowNetwork(slots, [*H.nodes, SOURCE])
        for v in order:
            if net.maximum_flow(SOURCE, v, cut=False).value < T:
                A = net.maximum_flow(SOURCE, v).source_side - {SOURCE}
                need = sum(d for r, d in demand.items() if r in A)
                U = _min_scale([b for (a, c), b in caps.items() if a in A and c not in A], need)
                cut = frozenset(A)
                order = [v, *(w for w in order if w != v)]
                break
        else:
            return U, cut, iterations


def fixed_k_bound(
    G: nx.DiGraph, k: int, collective: str = "allgather", root: str | None = None
) -> Bound:
    """The best schedule with exactly `k` trees per root: the smallest U such that N·k trees
    fit in the integer slots ⌊U·b_e⌋ (the reference's ``fixed_K`` mode, brief §2.2).

    Optimal only among k-tree schedules; MSCCL XML export needs k = 1 (pitfall 3). The rate is
    x = k/U ≤ x*, and algbw follows from it as in :func:`optimal_bound`.

    >>> from datahall.core.topologies import dgx_a100
    >>> b = fixed_k_bound(dgx_a100(boxes=2), 1)
    >>> b.U, round(float(b.algbw), 3)
    (Fraction(7, 150), 342.857)
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"fixed k must be a positive integer, got {k!r}")
    opt = optimal_bound(G, collective, root)
    Vc = check_request(G, collective, root)
    N = len(Vc)
    if collective in ("broadcast", "reduce"):
        runs = [(G if collective == "broadcast" else transposed(G), {root: k})]
    else:
        runs = []
        if collective in ("allgather", "allreduce"):
            runs.append((G, dict.fromkeys(Vc, k)))
        if collective == "reduce_scatter" or (collective == "allreduce" and not is_symmetric(G)):
            runs.append((transposed(G), dict.fromkeys(Vc, k)))
    U, cut, trans, iters = Fraction(0), opt.cut, opt.transposed, 0
    for i, (H, demand) in enumerate(runs):
        sinks = [v for v in Vc if v not in demand or len(demand) > 1]
        start = max(U, k / opt.x_star)  # ⌊U·b⌋ ≤ U·b: no U below k/x* can work
        u, c, it = _fixed_k_U(H, demand, sinks, start)
        iters += it
        if u > U or i == 0:
            U, cut, trans = u, (c or opt.cut), H is not G
    x = k / U
    return Bound(collective, N, x, _algbw(collective, N, x), U, k, cut, root, trans, iters, True)


def _integer_scale(G: nx.DiGraph) -> tuple[dict, int]:
    caps = _capacities(G)
    L = math.lcm(*(c.denominator for c in caps.values()))
    return {a: int(c * L) for a, c in caps.items()}, L


def _x_graph(collective: str, G: nx.DiGraph) -> list[nx.DiGraph]:
    if collective == "allgather":
        return [G]
    if collective == "reduce_scatter":
        return [transposed(G)]
    if collective == "allreduce":
        return [G, transposed(G)]
    raise ValueError(f"this bound covers allgather, reduce_scatter and allreduce, not {collective}")


def binary_search_bound(G: nx.DiGraph, collective: str = "allgather") -> Fraction:
    """x* by the reference method (``OptimalBranchingsAlgo.binary_search``, brief §2.3.1).

    With integer capacities (scaled exactly by the lcm L of their denominators), bisect
    t = 1/x over [(N−1)/min_bw, N−1], min_bw the smallest compute-node ingress; each probe asks
    whether every compute v receives N·x from a super source feeding x to each compute node.
    1/x* has a denominator B⁺(S) ≤ min_bw, and such fractions are ≥ 1/min_bw² apart, so once the
    interval is below 1/(2·min_bw²) ``limit_denominator(min_bw)`` snaps to it exactly. Weakly
    polynomial: the probe count grows with the capacities. Used to cross-check
    :func:`optimal_bound`.
    """
    Vc = check_request(G, collective, None)
    N = len(Vc)
    best = None
    for H in _x_graph(collective, G):
        caps, L = _integer_scale(H)
        into: dict = {}
        for (_, v), c in caps.items():
            into[v] = into.get(v, 0) + c
        D = min(into.get(v, 0) for v in Vc)

        def feasible(t: Fraction, caps=caps, H=H) -> bool:
            x = 1 / t
            net = FlowNetwork({**caps, **{(SOURCE, c): x for c in Vc}}, [*H.nodes, SOURCE])
            return all(net.maximum_flow(SOURCE, v, cut=False).value >= N * x for v in Vc)

        lo, hi = Fraction(N - 1, D), Fraction(N - 1)
        if feasible(lo):
            t = lo
        else:
            while hi - lo >= Fraction(1, 2 * D * D):
                mid = (lo + hi) / 2
                if feasible(mid):
                    hi = mid
                else:
                    lo = mid
            t = hi.limit_denominator(D)
            if not (lo < t <= hi and feasible(t)):  # pragma: no cover - a broken invariant
                raise AssertionError(f"binary search snapped to {t} outside ({lo}, {hi}]")
        x = 1 / (t * L)
        best = x if best is None else min(best, x)
    return best


def lp_bound(G: nx.DiGraph, collective: str = "allgather") -> float:
    """x* as a linear program solved by HiGHS (brief §6): maximise x such that for every compute
    sink v a flow f^v, with arcs s→c ≤ x and f_e ≤ b_e, brings N·x into v.

    N·(|E|+N) variables: meant for cross-checks on topologies up to ~32 GPUs. Returns a float.
    """
    Vc = check_request(G, collective, None)
    N = len(Vc)
    best = math.inf
    for H in _x_graph(collective, G):
        idx = {n: i for i, n in enumerate(H.nodes)}
        n = len(idx)
        caps = _capacities(H)
        tails = np.array([idx[u] for u, _ in caps] + [-1] * N)  # -1: the super source
        heads = np.array([idx[v] for _, v in caps] + [idx[c] for c in Vc])
        upper = [float(b) for b in caps.values()] + [None] * N
        m = len(tails)
        inner = np.flatnonzero(tails >= 0)
        src = np.flatnonzero(tails < 0)
        xcol = N * m  # the column of x, after one block of m flow variables per sink
        rows, cols, vals, urows, ucols, uvals = [], [], [], [], [], []
        for j, v in enumerate(Vc):
            # conservation: inflow − outflow = 0 at every node, = N·x at the sink v
            rows += [j * n + heads, j * n + tails[inner], [j * n + idx[v]]]
            cols += [j * m + np.arange(m), j * m + inner, [xcol]]
            vals += [np.ones(m), -np.ones(len(inner)), [-float(N)]]
            # every source arc s→c carries at most x
            r = j * N + np.arange(N)
            urows += [r, r]
            ucols += [j * m + src, np.full(N, xcol)]
            uvals += [np.ones(N), -np.ones(N)]
        A_eq = coo_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(N * n, xcol + 1),
        ).tocsr()
        A_ub = coo_matrix(
            (np.concatenate(uvals), (np.concatenate(urows), np.concatenate(ucols))),
            shape=(N * N, xcol + 1),
        ).tocsr()
        c = np.zeros(xcol + 1)
        c[-1] = 1.0
        res = solve_lp(
            c,
            A_ub=A_ub,
            b_ub=np.zeros(N * N),
            A_eq=A_eq,
            b_eq=np.zeros(N * n),
            bounds=[(0, u) for _ in Vc for u in upper] + [(0, None)],
            maximize=True,
        )
        best = min(best, res.objective)
    return best
