"""Traffic engineering on WAN topologies: multi-commodity max-flow (OPT) and the heuristics that
approximate it, demand pinning and POP (MetaOpt, NSDI '24; MetaEase, NSDI '26).

Inputs are the demands of the instance's pairs, in order. Each pair routes over its first
``k`` shortest paths (by hop count; ``paths[i][0]`` is the shortest).

- :class:`MaxFlow` is OPT: the path-formulation multi-commodity max-flow LP, built once in HiGHS
  and re-solved warm for each demand vector; its demand-row duals are ∂OPT/∂d.
- :class:`DemandPinning` (DP, Microsoft's WAN heuristic as MetaOpt models it): demands at or below
  a threshold go on their shortest path, the rest is optimised jointly.
- :class:`Pop` (POP, Narayanan et al., SOSP '21): random partitions of the demands, each solved on
  the whole network with a share of every link's capacity.

The §3 instance of the MetaEase brief: pinning (1,3)'s 5 units on its shortest path costs (0,3)
5 units that OPT would carry.

>>> inst = pinning_example()
>>> MaxFlow(inst)([100, 5]).value, DemandPinning(inst, threshold=5)([100, 5])
(105.0, 100.0)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from heapq import heappop, heappush
from typing import Any, Literal

import highspy
import networkx as nx
import numpy as np

from .problem import Optimum, Problem, ProblemError

__all__ = [
    "TEInstance",
    "te_instance",
    "pinning_example",
    "FlowSolution",
    "MaxFlow",
    "DemandPinning",
    "Pop",
    "demand_pinning_problem",
    "pop_problem",
    "builtin_te",
]

_INF = highspy.kHighsInf


@dataclass(frozen=True, eq=False)
class TEInstance:
    """A traffic-engineering instance: directed links with capacities, demand pairs and their
    candidate paths.

    ``links[e] = (u, v)`` with ``capacity[e]``; ``pairs[i] = (s, t)`` is input coordinate ``i``;
    ``paths[i]`` lists the pair's paths, each a tuple of link indices, shortest first.
    """

    name: str
    nodes: tuple
    links: tuple[tuple, ...]
    capacity: np.ndarray
    pairs: tuple[tuple, ...]
    paths: tuple[tuple[tuple[int, ...], ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "capacity", np.asarray(self.capacity, dtype=float))

    def validate(self) -> None:
        """Raise :class:`~datahall.heuristics.problem.ProblemError` unless every pair has a path,
        every path is a chain of links from its source to its target, and the capacities are
        finite and >= 0. The LPs here call it."""
        cap, m = self.capacity, len(self.links)
        if cap.shape != (m,):
            raise ProblemError(f"{self.name}: {cap.size} capacities for {m} links")
        if np.any(cap < 0) or not np.all(np.isfinite(cap)):
            raise ProblemError(f"{self.name}: link capacities must be finite and >= 0")
        if len(self.paths) != len(self.pairs):
            raise ProblemError(
                f"{self.name}: {len(self.paths)} path lists for {len(self.pairs)} pairs"
            )
        for (s, t), ps in zip(self.pairs, self.paths, strict=True):
            if not ps:
                raise ProblemError(f"{self.name}: pair {s}->{t} has no path; drop the pair")
            for p in ps:
                if not p or any(not 0 <= e < m for e in p):
                    raise ProblemError(
                        f"{self.name}: path {p} of pair {s}->{t} has a link index outside 0..{m - 1}"
                    )
                hops = [self.links[e] for e in p]
                ok = hops[0][0] == s and hops[-1][1] == t
                if not (ok and all(a[1] == b[0] for a, b in zip(hops, hops[1:], strict=False))):
                    raise ProblemError(f"{self.name}: path {p} does not lead from {s} to {t}")

    @property
    def total_capacity(self) -> float:
        """Σ link capacities: MetaOpt normalises gaps by it."""
        return float(np.sum(self.capacity))

    @cached_property
    def names(self) -> list[str]:
        """The pairs as ``"s->t"``, the input names."""
        return [f"{s}->{t}" for s, t in self.pairs]

    @classmethod
    def from_paths(
        cls,
        links: dict[tuple, float],
        paths: dict[tuple, Sequence[Sequence]],
        name: str = "te",
    ) -> TEInstance:
        """An instance from explicit lists: ``links[(u, v)] = capacity`` (in link order) and
        ``paths[(s, t)] = [[s, ..., t], ...]`` as node sequences, shortest first.

        >>> inst = TEInstance.from_paths({(0, 1): 10, (1, 2): 10}, {(0, 2): [[0, 1, 2]]})
        >>> inst.paths, inst.names
        ((((0, 1),),), ['0->2'])
        """
        index = {link: e for e, link in enumerate(links)}
        nodes = tuple(dict.fromkeys(n for link in links for n in link))
        out = []
        for (s, t), ps in paths.items():
            tunnels = []
            for p in ps:
                try:
                    tunnels.append(tuple(index[(a, b)] for a, b in zip(p, p[1:], strict=False)))
                except KeyError as e:
                    raise ProblemError(
                        f"{name}: path {list(p)} of pair {s}->{t} uses link {e.args[0]}, "
                        "which is not in links"
                    ) from None
            out.append(tuple(tunnels))
        capacity = np.array(list(links.values()), dtype=float)
        return cls(name, nodes, tuple(links), capacity, tuple(paths), tuple(out))

    # -- derived arrays ---------------------------------------------------------------------------

    @cached_property
    def column_pair(self) -> np.ndarray:
        """Pair index of each path variable (columns ordered pair by pair, path by path), to read
        :attr:`FlowSolution.path_flow` by pair."""
        return np.repeat(np.arange(len(self.pairs)), [len(ps) for ps in self.paths])

    @cached_property
    def shortest(self) -> tuple[tuple[int, ...], ...]:
        """Each pair's first (shortest) path."""
        return tuple(ps[0] for ps in self.paths)


def pinning_example() -> TEInstance:
    """The demand-pinning gap instance of the MetaEase brief (§3), capacity 100 per link.

    Links 0→1, 1→3, 1→2, 2→3; pair (0,3) has the one path 0→1→3, pair (1,3) has 1→3 then 1→2→3.
    With demands (100, 5) and threshold 5, OPT carries 105 and demand pinning 100: a gap of 5,
    1.25% of the 400 units of total capacity.

    >>> pinning_example().total_capacity
    400.0
    """
    links = {(0, 1): 100, (1, 3): 100, (1, 2): 100, (2, 3): 100}
    paths = {(0, 3): [[0, 1, 3]], (1, 3): [[1, 3], [1, 2, 3]]}
    return TEInstance.from_paths(links, paths, name="pinning-example")


# -- paths ----------------------------------------------------------------------------------------


def _lex_shortest(succ, pred, s, t, banned_nodes, banned_arcs):
    """The shortest s→t path by hops avoiding the banned nodes and arcs, smallest in node-rank
    order among equals; ``None`` when t is unreachable."""
    dist = {t: 0}
    frontier = [t]
    while frontier and s not in dist:
        nxt = []
        for v in frontier:
            dv = dist[v] + 1
            for u in pred[v]:
                if u not in dist and u not in banned_nodes and (u, v) not in banned_arcs:
                    dist[u] = dv
                    nxt.append(u)
        frontier = nxt
    if s not in dist:
        return None
    path, u = [s], s
    while u != t:
        want = dist[u] - 1
        u = next(v for v in succ[u] if dist.get(v) == want and (u, v) not in banned_arcs)
        path.append(u)
    return path


def _k_shortest(succ, pred, rank, s, t, k):
    """Yen's k shortest simple paths by hop count, ties broken by the sequence of node ranks
    (the order is prefix-consistent, so Yen's deviation argument still holds)."""
    first = _lex_shortest(succ, pred, s, t, frozenset(), frozenset())
    if first is None:
        return []
    found = [first]
    heap: list = []
    seen = {tuple(first)}
    while len(found) < k:
        prev = found[-1]
        for j in range(len(prev) - 1):
            root = prev[: j + 1]
            arcs = {(p[j], p[j + 1]) for p in found if p[: j + 1] == root}
            spur = _lex_shortest(succ, pred, prev[j], t, set(root[:-1]), arcs)
            if spur is not None:
                cand = root[:-1] + spur
                key = tuple(cand)
                if key not in seen:
                    seen.add(key)
                    heappush(heap, (len(cand), tuple(rank[n] for n in cand), cand))
        if not heap:
            break
        found.append(heappop(heap)[2])
    return found


def te_instance(
    G: nx.DiGraph,
    k: int = 4,
    pairs: Literal["all"] | int | Iterable[tuple] = "all",
    seed: int = 0,
    name: str | None = None,
) -> TEInstance:
    """The traffic-engineering instance of topology `G`, as MetaOpt (NSDI '24) and MetaEase
    (NSDI '26) set it up: every arc of `G` is a link with its ``capacity``, and each demand pair
    routes over its first `k` shortest simple paths by hop count ("tunnels").

    `pairs` is ``"all"`` (every ordered pair of distinct nodes, in node order), an integer (a
    sample of that many pairs drawn with `seed` among those with a path, kept in node order), or
    an explicit list of ``(s, t)``. Pairs without a path are dropped. Equal-length paths are
    ordered by their node names (as strings), so the instance is deterministic.

    Yen's algorithm with a breadth-first spur search: about 1 ms per pair on the 143-node TataNld.

    >>> from datahall.core.topologies.wan import wan
    >>> inst = te_instance(wan("abilene"), k=4)
    >>> len(inst.pairs), len(inst.links), inst.names[0], max(len(ps) for ps in inst.paths)
    (132, 30, 'ATLAM5->ATLAng', 4)
    """
    if not isinstance(k, int) or k < 1:
        raise ProblemError(f"k (paths per pair) must be a positive integer, not {k!r}")
    nodes = list(G.nodes)
    rank = {n: r for r, n in enumerate(sorted(nodes, key=str))}
    links = list(G.edges)
    capacity = []
    for u, v in links:
        c = G[u][v].get("capacity")
        if c is None:
            raise ProblemError(f"link {u!r} -> {v!r} has no capacity; give every arc one")
        capacity.append(float(c))
    index = {link: e for e, link in enumerate(links)}
    succ = {n: sorted(G.successors(n), key=rank.__getitem__) for n in nodes}
    pred = {n: list(G.predecessors(n)) for n in nodes}
    position = {n: i for i, n in enumerate(nodes)}

    if isinstance(pairs, str):
        if pairs != "all":
            raise ProblemError(f'pairs must be "all", a number or a list of (s, t), not {pairs!r}')
        chosen = [(s, t) for s in nodes for t in nodes if s != t]
    elif isinstance(pairs, (int, np.integer)) and not isinstance(pairs, bool):
        reach = [(s, t) for s in nodes for t in sorted(nx.descendants(G, s), key=position.get)]
        if not 0 < pairs <= len(reach):
            raise ProblemError(
                f"pairs={pairs}, but {G.graph.get('name', 'the topology')} has "
                f"{len(reach)} connected ordered pairs; ask for 1..{len(reach)} or 'all'"
            )
        pick = np.random.default_rng(seed).choice(len(reach), size=int(pairs), replace=False)
        chosen = [reach[i] for i in sorted(pick)]
    else:
        try:
            chosen = [tuple(p) for p in pairs]
        except TypeError:
            chosen = None
        if chosen is None or any(len(p) != 2 for p in chosen):
            raise ProblemError(
                f'pairs must be "all", a number or a list of (s, t), not {pairs!r}'
            ) from None
        for s, t in chosen:
            if s not in position or t not in position or s == t:
                raise ProblemError(f"pair {s!r}->{t!r} is not two distinct nodes of the topology")

    kept, tunnels = [], []
    for s, t in chosen:
        ps = _k_shortest(succ, pred, rank, s, t, k)
        if ps:
            kept.append((s, t))
            tunnels.append(
                tuple(tuple(index[(a, b)] for a, b in zip(p, p[1:], strict=False)) for p in ps)
            )
    if not kept:
        raise ProblemError("no demand pair has a path; the topology has no usable pair")
    label = name if name is not None else str(G.graph.get("name", "topology"))
    return TEInstance(
        label, tuple(nodes), tuple(links), np.array(capacity), tuple(kept), tuple(tunnels)
    )


# -- the path LP, built once and re-solved warm ---------------------------------------------------


@dataclass(frozen=True)
class FlowSolution:
    """One max-flow solution: the value, the flow on each path variable (columns ordered pair by
    pair, see :attr:`TEInstance.column_pair`), and the duals: ``demand_duals[i]`` = ∂OPT/∂d_i
    and ``link_duals[e]`` = ∂OPT/∂c_e, each in [0, 1] (a subgradient at degenerate points)."""

    value: float
    path_flow: np.ndarray
    demand_duals: np.ndarray
    link_duals: np.ndarray


class _PathLP:
    """max Σ f  s.t.  Σ_p f_ip <= d_i,  Σ_{p ∋ e} f_p <= c_e,  f >= 0 over a subset of pairs.

    The HiGHS model is built on first use and kept; a solve changes row bounds only, so HiGHS
    starts from the previous basis. The model is not pickled, and is rebuilt in a forked child.
    """

    def __init__(
        self, inst: TEInstance, pairs: np.ndarray | None = None, share: float = 1.0, check=True
    ):
        if check:
            inst.validate()
        self.inst = inst
        self.pairs = np.arange(len(inst.pairs)) if pairs is None else np.asarray(pairs, dtype=int)
        self.capacity = inst.capacity * share
        self._highs: Any = None
        self._pid = -1

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_highs"], state["_pid"] = None, -1
        return state

    def _build(self) -> Any:
        inst, m, n = self.inst, len(self.inst.links), len(self.pairs)
        starts, index = [0], []
        for r, i in enumerate(self.pairs):
            for p in inst.paths[i]:
                index.append(r)
                index.extend(n + e for e in p)
                starts.append(len(index))
        ncol = len(starts) - 1
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = ncol, n + m
        lp.sense_ = highspy.ObjSense.kMaximize
        lp.col_cost_ = np.ones(ncol)
        lp.col_lower_ = np.zeros(ncol)
        lp.col_upper_ = np.full(ncol, _INF)
        lp.row_lower_ = np.full(n + m, -_INF)
        lp.row_upper_ = np.concatenate([np.zeros(n), self.capacity])
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = np.array(starts, dtype=np.int32)
        lp.a_matrix_.index_ = np.array(index, dtype=np.int32)
        lp.a_matrix_.value_ = np.ones(len(index))
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
        h.setOptionValue("threads", 1)
        h.setOptionValue("presolve", "off")
        h.passModel(lp)
        self._rows = np.arange(n + m, dtype=np.int32)
        self._lower = np.full(n + m, -_INF)
        self._upper = np.concatenate([np.zeros(n), self.capacity])
        self._highs, self._pid = h, os.getpid()
        return h

    def solve(self, demand: np.ndarray, capacity: np.ndarray | None = None) -> Any:
        """Solve for `demand` (one per pair of the subset) and optionally new link capacities;
        return the HiGHS object, solved."""
        h = self._highs if self._pid == os.getpid() else self._build()
        n = len(self.pairs)
        upper = self._upper
        upper[:n] = np.maximum(demand, 0.0)
        if capacity is not None:
            upper[n:] = np.maximum(capacity, 0.0)
        h.changeRowsBounds(len(upper), self._rows, self._lower, upper)
        h.run()
        if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            h.clearSolver()  # lost the basis (should not happen: f = 0 is feasible); start cold
            h.run()
            if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
                raise RuntimeError(
                    f"{self.inst.name}: HiGHS ended with {h.modelStatusToString(h.getModelStatus())}"
                    " on the max-flow LP"
                )
        return h

    def value(self, demand: np.ndarray, capacity: np.ndarray | None = None) -> float:
        return float(self.solve(demand, capacity).getInfo().objective_function_value)


def _demands(x: Sequence[Any], n: int, who: str) -> np.ndarray:
    d = np.asarray([float(v) for v in x], dtype=float)
    if d.shape != (n,):
        raise ProblemError(f"{who}: expected {n} demands, one per pair, got {d.size}")
    return d


class MaxFlow:
    """OPT: multi-commodity max-flow over the instance's paths (the path formulation MetaOpt,
    NSDI '24, and MetaEase, NSDI '26, use): maximise Σ f_ip subject to Σ_p f_ip <= d_i per pair
    and Σ_{paths through e} f <= c_e per link.

    ``maxflow(x)`` returns an :class:`~datahall.heuristics.problem.Optimum` whose gradient is
    ∂OPT/∂d_i, the dual of demand row i (envelope theorem; HiGHS reports duals of a maximisation
    as ∂objective/∂bound, so no sign flip). :meth:`solve` also returns the path flows and the link
    duals. The LP is built once and re-solved from the previous basis; the object pickles without
    its HiGHS model, which is rebuilt on first use (also in a forked child).

    Negative demands count as 0.

    >>> opt = MaxFlow(pinning_example())
    >>> o = opt([50, 30])
    >>> o.value, o.gradient.tolist()
    (80.0, [1.0, 1.0])
    >>> s = opt.solve([150, 5])  # (0,3) is capped by its path 0→1→3: one unit of either link
    >>> s.value, s.demand_duals.tolist(), float(s.link_duals[:2].sum())
    (105.0, [0.0, 1.0], 1.0)
    """

    def __init__(self, instance: TEInstance):
        self.instance = instance
        self._lp = _PathLP(instance)

    def solve(self, x: Sequence[float]) -> FlowSolution:
        n = len(self.instance.pairs)
        h = self._lp.solve(_demands(x, n, "MaxFlow"))
        sol = h.getSolution()
        duals = np.asarray(sol.row_dual)
        return FlowSolution(
            float(h.getInfo().objective_function_value),
            np.asarray(sol.col_value),
            np.clip(duals[:n], 0.0, None),
            np.clip(duals[n:], 0.0, None),
        )

    def __call__(self, x: Sequence[float]) -> Optimum:
        s = self.solve(x)
        return Optimum(s.value, s.demand_duals)


class DemandPinning:
    """Demand pinning (DP), the WAN heuristic MetaOpt (NSDI '24) analyses: each demand at or
    below `threshold` is pinned on its shortest path, carrying as much as that path still has room
    for; all that is left (unpinned demands and any pinned remainder) is routed by the max-flow LP
    over the residual capacities, "which jointly considers all the remaining demands". Pairs are
    pinned in instance order; the pinning rule (min of demand and the path's residual room)
    follows MetaEase's ``demand_pinning_TE`` (NSDI '26).

    `threshold` defaults to 5% of the smallest link capacity, as an integer (MetaEase's
    configuration). ``dp(x)`` is plain Python over `x`: each ``x[i] <= threshold`` is evaluated on
    the element as given (a concolic tracer sees the branch), and only then is the value turned
    into a float.

    >>> dp = DemandPinning(pinning_example())
    >>> dp.threshold, dp([100, 5]), dp([100, 6]), dp.pinned([100, 5])
    (5, 100.0, 106.0, [1])
    """

    def __init__(self, instance: TEInstance, threshold: float | None = None):
        self.instance = instance
        if threshold is None:
            threshold = int(0.05 * float(np.min(instance.capacity)))
        self.threshold = threshold
        self._lp = _PathLP(instance)
        self._capacity = [float(c) for c in instance.capacity]

    def __call__(self, x: Sequence[Any]) -> float:
        inst, threshold = self.instance, self.threshold
        n = len(inst.pairs)
        if len(x) != n:
            raise ProblemError(f"DemandPinning: expected {n} demands, one per pair, got {len(x)}")
        residual = list(self._capacity)
        rest = [0.0] * n
        pinned = 0.0
        for i in range(n):
            d = x[i]
            if d <= threshold:
                v = max(float(d), 0.0)
                path = inst.shortest[i]
                put = min(v, min(residual[e] for e in path))
                if put > 0:
                    for e in path:
                        residual[e] -= put
                    pinned += put
                rest[i] = v - put
            else:
                rest[i] = float(d)
        return pinned + self._lp.value(np.array(rest), np.array(residual))

    def pinned(self, x: Sequence[float]) -> list[int]:
        """Indices of the pairs whose demand is pinned (``x[i] <= threshold``), zeros included."""
        return [i for i, d in enumerate(x) if float(d) <= self.threshold]


class Pop:
    """POP, Partitioned Optimization Problems (Narayanan et al., SOSP '21), for traffic
    engineering as MetaOpt (NSDI '24) analyses it: split the demands at random into `parts`
    groups; each group solves max-flow on the whole topology with every capacity divided by
    `parts`; the draw's value is the sum over the groups. The heuristic's value is the mean over
    `draws` random partitions (MetaEase, NSDI '26, averages 5), fixed at construction by `seed`,
    so ``pop(x)`` is deterministic.

    ``partitions[r][g]`` holds the (sorted) pair indices of group `g` in draw `r`; a draw splits a
    random permutation into near-equal groups.

    >>> inst = pinning_example()
    >>> pop = Pop(inst, parts=2, draws=1)
    >>> [g.tolist() for g in pop.partitions[0]], pop([100, 5]), Pop(inst, parts=1)([100, 5])
    ([[0], [1]], 55.0, 105.0)
    """

    def __init__(self, instance: TEInstance, parts: int = 2, draws: int = 5, seed: int = 0):
        n = len(instance.pairs)
        for what, v in [("parts", parts), ("draws", draws)]:
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ProblemError(f"Pop: {what} must be a positive integer, not {v!r}")
        if parts > n:
            raise ProblemError(f"Pop: {parts} parts for {n} pairs; use at most {n} parts")
        self.instance, self.parts, self.draws, self.seed = instance, int(parts), int(draws), seed
        instance.validate()
        rng = np.random.default_rng(seed)
        self.partitions: list[list[np.ndarray]] = [
            [np.sort(g) for g in np.array_split(rng.permutation(n), parts)] for _ in range(draws)
        ]
        self._lps = [
            [_PathLP(instance, g, 1.0 / parts, False) for g in draw] for draw in self.partitions
        ]

    def values(self, x: Sequence[Any]) -> np.ndarray:
        """The value of each draw (the sum over its groups)."""
        d = _demands(x, len(self.instance.pairs), "Pop")
        return np.array(
            [sum(lp.value(d[lp.pairs]) for lp in draw) for draw in self._lps], dtype=float
        )

    def __call__(self, x: Sequence[Any]) -> float:
        return float(np.mean(self.values(x)))


# -- problems for the search ----------------------------------------------------------------------


def _largest(inst: TEInstance, x: np.ndarray, top: int = 5) -> list[list]:
    order = np.argsort(-x, kind="stable")[:top]
    return [[inst.names[i], float(x[i])] for i in order if x[i] > 0]


class _DescribeDP:
    def __init__(self, dp: DemandPinning):
        self.dp = dp

    def __call__(self, x: np.ndarray) -> dict[str, Any]:
        x = np.asarray(x, dtype=float)
        inst, t = self.dp.instance, self.dp.threshold
        pinned = np.flatnonzero((x > 0) & (x <= t)).tolist()
        return {
            "nonzero": int(np.count_nonzero(x)),
            "pinned": len(pinned),
            "pinned_multi_hop": sum(len(inst.shortest[i]) > 1 for i in pinned),
            "threshold": t,
            "total_demand": float(x.sum()),
            "largest": _largest(inst, x),
            "pinned_pairs": [inst.names[i] for i in pinned[:10]],
        }


class _DescribePop:
    def __init__(self, pop: Pop):
        self.pop = pop

    def __call__(self, x: np.ndarray) -> dict[str, Any]:
        x = np.asarray(x, dtype=float)
        return {
            "nonzero": int(np.count_nonzero(x)),
            "total_demand": float(x.sum()),
            "largest": _largest(self.pop.instance, x),
            "per_draw": [round(float(v), 6) for v in self.pop.values(x)],
        }


def _te_problem(
    kind: str, h: DemandPinning | Pop, describe: Any, max_demand: float | None, /, **info: Any
) -> Problem:
    """The search problem "maximise OPT − H" for the TE heuristic `h` on its instance: integer
    demands in [0, `max_demand`] (default twice the largest link capacity, MetaEase's
    configuration), max-flow as OPT, the gap normalised by total capacity as MetaOpt (NSDI '24)
    reports it; `info` goes into the problem's info."""
    inst = h.instance
    top = 2 * float(np.max(inst.capacity)) if max_demand is None else float(max_demand)
    if not top > 0:
        raise ProblemError(f"max_demand must be positive, not {max_demand!r}")
    n = len(inst.pairs)
    return Problem(
        f"{kind}-{inst.name}",
        heuristic=h,
        optimum=MaxFlow(inst),
        lower=np.zeros(n),
        upper=np.full(n, top),
        integer=True,
        sense="max",
        names=inst.names,
        scale=inst.total_capacity,
        scale_label="of total capacity",
        describe=describe,
        info={
            "topology": inst.name,
            "pairs": n,
            "links": len(inst.links),
            "paths_per_pair": max(len(ps) for ps in inst.paths),
            "total_capacity": inst.total_capacity,
            **info,
            "max_demand": top,
        },
    )


def demand_pinning_problem(
    inst: TEInstance, threshold: float | None = None, max_demand: float | None = None
) -> Problem:
    """The search problem "maximise OPT − DP" over integer demands in [0, `max_demand`] (default
    twice the largest link capacity, as MetaEase's configuration), the gap normalised by total
    capacity as MetaOpt (NSDI '24) reports it.

    >>> p = demand_pinning_problem(pinning_example())
    >>> p.gap([100, 5]) / p.scale, p.describe([100, 5])["pinned_pairs"]
    (0.0125, ['1->3'])
    """
    dp = DemandPinning(inst, threshold)
    return _te_problem(
        "dp", dp, _DescribeDP(dp), max_demand, heuristic="demand pinning", threshold=dp.threshold
    )


def pop_problem(
    inst: TEInstance,
    parts: int = 2,
    draws: int = 5,
    seed: int = 0,
    max_demand: float | None = None,
) -> Problem:
    """The search problem "maximise OPT − POP" (POP averaged over `draws` fixed random
    partitions into `parts`, as MetaOpt and MetaEase analyse it), integer demands in
    [0, `max_demand`], the gap normalised by total capacity.

    >>> p = pop_problem(pinning_example(), draws=1)
    >>> p.gap([100, 5])
    50.0
    """
    pop = Pop(inst, parts, draws, seed)
    return _te_problem(
        "pop",
        pop,
        _DescribePop(pop),
        max_demand,
        heuristic="POP",
        parts=parts,
        draws=draws,
        seed=seed,
    )


def builtin_te(
    kind: Literal["dp", "pop"],
    topology: str = "abilene",
    pairs: Literal["all"] | int | Iterable[tuple] = "all",
    k: int = 4,
    *,
    capacity: float = 100,
    seed: int = 0,
    **kw: Any,
) -> Problem:
    """A TE problem on a built-in WAN (:func:`datahall.core.topologies.wan`): ``"dp"`` (demand
    pinning) or ``"pop"``. `seed` draws the pair sample (and POP's partitions); other keywords go
    to :func:`demand_pinning_problem` or :func:`pop_problem`.

    >>> p = builtin_te("dp", "abilene")
    >>> p.name, p.dim, p.info["threshold"], p.info["max_demand"]
    ('dp-abilene', 132, 5, 200.0)
    """
    from ..core.topologies.wan import wan

    if kind not in ("dp", "pop"):
        raise ProblemError(f'unknown TE heuristic {kind!r}; use "dp" (demand pinning) or "pop"')
    allowed = {"dp": ("threshold", "max_demand"), "pop": ("parts", "draws", "max_demand")}[kind]
    for key in kw:
        if key not in allowed:
            raise ProblemError(
                f"TE heuristic {kind!r} has no parameter {key!r}; it takes "
                f"{', '.join(allowed)} (and topology, pairs, k, capacity, seed)"
            )
    inst = te_instance(wan(topology, capacity), k=k, pairs=pairs, seed=seed)
    if kind == "dp":
        return demand_pinning_problem(inst, **kw)
    return pop_problem(inst, seed=seed, **kw)
