"""Maximum flow, minimum cut and linear programs, exact where it matters.

One interface, two max-flow backends:

- ``"scipy"``: :func:`scipy.sparse.csgraph.maximum_flow` (Dinic) on int32 capacities. Fast.
  Capacities are exact Fractions scaled by the lcm of their denominators; if the scaled values
  (or the total that could leave the source) do not fit in int32, :class:`FlowOverflowError`.
- ``"networkx"``: :func:`networkx.minimum_cut` on the same scaled integers. Slow; the reference.
- ``"auto"`` (default): scipy, falling back to networkx on overflow.

Both return the flow value as a Fraction in the graph's capacity units and the source side of a
minimum cut. :func:`bottleneck_cut` solves min over cuts of B⁺(S)/|S∩T| exactly (the quantity
behind ForestColl's optimal throughput) and :func:`solve_lp` wraps HiGHS with duals.

>>> import networkx as nx
>>> G = nx.DiGraph()
>>> G.add_edge("s", "a", capacity=3); G.add_edge("a", "t", capacity=2.5)
>>> f = maximum_flow(G, "s", "t")
>>> f.value, sorted(f.source_side)
(Fraction(5, 2), ['a', 's'])
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import networkx as nx
import numpy as np
from scipy.optimize import linprog
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import breadth_first_order
from scipy.sparse.csgraph import maximum_flow as _scipy_maximum_flow

from .units import exact

__all__ = [
    "Backend",
    "Flow",
    "FlowOverflowError",
    "FlowNetwork",
    "IntFlowNetwork",
    "maximum_flow",
    "Bottleneck",
    "bottleneck_cut",
    "LPResult",
    "LPError",
    "solve_lp",
]

Backend = Literal["auto", "scipy", "networkx"]
INT32_MAX = 2**31 - 1


class FlowOverflowError(OverflowError):
    """Scaled integer capacities do not fit the int32 that scipy's max-flow needs."""


@dataclass(frozen=True)
class Flow:
    """A maximum flow: its value and the source side of one minimum cut."""

    value: Fraction
    source_side: frozenset[Hashable]


class IntFlowNetwork:
    """Max flows between node indices 0..n-1 on integer capacities that may change between
    queries: the engine under :class:`FlowNetwork`, and what the ForestColl planner drives
    directly (thousands of queries on one arc list, a few capacities edited in between).

    Arcs live at fixed positions of one CSR matrix (zeros allowed), so :meth:`set` edits a
    capacity in O(log degree) without recompiling. The scipy backend needs every node's total
    in- and out-capacity, hence every flow, within int32; ``backend="auto"`` checks that at
    construction and otherwise answers with networkx. Parallel arcs are merged. Edits through
    :meth:`set` must keep those totals within int32 on the scipy backend.

    >>> net = IntFlowNetwork(3, [0, 1, 0], [1, 2, 2], [4, 3, 1])
    >>> net.maximum_flow(0, 2)[0]
    4
    >>> net.set(1, 2, 0); net.maximum_flow(0, 2)[0]
    1
    """

    def __init__(self, n: int, tails, heads, caps, backend: Backend = "auto") -> None:
        if backend not in ("auto", "scipy", "networkx"):
            raise ValueError(f"unknown max-flow backend {backend!r}; use auto, scipy or networkx")
        self.n = n
        m = csr_matrix(
            (
                np.asarray(caps, dtype=np.int64),
                (np.asarray(tails, dtype=np.int64), np.asarray(heads, dtype=np.int64)),
            ),
            shape=(n, n),
        )
        m.sum_duplicates()
        m.sort_indices()
        totals = (np.asarray(m.sum(axis=1)).ravel(), np.asarray(m.sum(axis=0)).ravel())
        fits = max(t.max(initial=0) for t in totals) <= INT32_MAX
        if backend == "scipy" and not fits:
            raise FlowOverflowError(
                f"node capacity totals exceed int32 (max {INT32_MAX}); "
                "use backend='networkx' or round the capacities"
            )
        self.backend: Backend = "scipy" if fits and backend != "networkx" else "networkx"
        dtype = np.int32 if self.backend == "scipy" else np.int64
        self.csr = csr_matrix((m.data.astype(dtype), m.indices, m.indptr), shape=(n, n))
        self._nx: nx.DiGraph | None = None

    def pos(self, u: int, v: int) -> int:
        """Position of arc u→v in the CSR data (it must have been given at construction)."""
        lo, hi = self.csr.indptr[u], self.csr.indptr[u + 1]
        p = lo + int(np.searchsorted(self.csr.indices[lo:hi], v))
        if p >= hi or self.csr.indices[p] != v:
            raise KeyError((u, v))
        return p

    def set(self, u: int, v: int, c: int) -> None:
        """Set the capacity of arc u→v (an arc given at construction)."""
        self.csr.data[self.pos(u, v)] = c
        self._nx = None

    def maximum_flow(self, s: int, t: int, cut: bool = True) -> tuple[int, np.ndarray | None]:
        """The maximum s→t flow and, if `cut`, a boolean mask of a min cut's source side."""
        if self.backend == "networkx":
            if self._nx is None:
                coo = self.csr.tocoo()
                self._nx = nx.DiGraph()
                self._nx.add_nodes_from(range(self.n))
                self._nx.add_weighted_edges_from(
                    zip(coo.row.tolist(), coo.col.tolist(), coo.data.tolist(), strict=True),
                    weight="capacity",
                )
            value, (side, _) = nx.minimum_cut(self._nx, s, t)
            mask = np.zeros(self.n, dtype=bool)
            mask[list(side)] = True
            return int(value), mask if cut else None
        res = _scipy_maximum_flow(self.csr, s, t, method="dinic")
        if not cut:
            return int(res.flow_value), None
        residual = (self.csr - res.flow).tocsr()
        residual.data[residual.data < 0] = 0
        residual.eliminate_zeros()
        mask = np.zeros(self.n, dtype=bool)
        mask[breadth_first_order(residual, s, directed=True, return_predecessors=False)] = True
        return int(res.flow_value), mask


class FlowNetwork:
    """A capacitated digraph compiled once for many max-flow queries between different nodes.

    `capacities` maps arcs (u, v) to non-negative numbers (converted with
    :func:`~datahall.core.units.exact`), scaled to integers by the lcm of their denominators
    and handed to an :class:`IntFlowNetwork`. Arcs of capacity 0 are dropped.

    >>> net = FlowNetwork({("s", "a"): 2, ("a", "t"): 1, ("s", "t"): Fraction(1, 3)})
    >>> net.maximum_flow("s", "t").value
    Fraction(4, 3)
    """

    def __init__(
        self,
        capacities: dict[tuple[Hashable, Hashable], float | Fraction],
        nodes: Iterable[Hashable] = (),
        backend: Backend = "auto",
    ):
        if backend not in ("auto", "scipy", "networkx"):
            raise ValueError(f"unknown max-flow backend {backend!r}; use auto, scipy or networkx")
        exact_caps = {arc: exact(c) for arc, c in capacities.items()}
        for arc, c in exact_caps.items():
            if c < 0:
                raise ValueError(f"arc {arc[0]!r} -> {arc[1]!r} has negative capacity {c}")
        self.nodes: list[Hashable] = list(
            dict.fromkeys([*nodes, *(x for a in exact_caps for x in a)])
        )
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.scale = math.lcm(*(c.denominator for c in exact_caps.values())) if exact_caps else 1
        arcs = [
            (self.index[u], self.index[v], int(c * self.scale))
            for (u, v), c in exact_caps.items()
            if c > 0
        ]
        tails, heads, caps = zip(*arcs, strict=True) if arcs else ((), (), ())
        self._net = IntFlowNetwork(len(self.nodes), tails, heads, caps, backend)
        self.backend = self._net.backend

    def maximum_flow(self, s: Hashable, t: Hashable, cut: bool = True) -> Flow:
        """The maximum s→t flow and the source side of a minimum cut (empty if not `cut`)."""
        for x in (s, t):
            if x not in self.index:
                raise KeyError(f"node {x!r} is not in the flow network")
        if s == t:
            raise ValueError("source and sink must differ")
        value, mask = self._net.maximum_flow(self.index[s], self.index[t], cut)
        side = (
            frozenset() if mask is None else frozenset(self.nodes[i] for i in np.flatnonzero(mask))
        )
        return Flow(Fraction(value, self.scale), side)


def _capacities(G: nx.DiGraph, capacity: str) -> dict[tuple[Hashable, Hashable], Fraction]:
    return {(u, v): exact(c) for u, v, c in G.edges(data=capacity, default=0)}


def maximum_flow(
    G: nx.DiGraph, s: Hashable, t: Hashable, capacity: str = "capacity", backend: Backend = "auto"
) -> Flow:
    """Maximum s→t flow in `G` (arc attribute `capacity`) with the source side of a min cut.

    For many queries on one graph, build a :class:`FlowNetwork` once instead.
    """
    return FlowNetwork(_capacities(G, capacity), G.nodes, backend).maximum_flow(s, t)


@dataclass(frozen=True)
class Bottleneck:
    """The minimum of B⁺(S)/|S∩T| over node sets S that hold some but not all terminals T."""

    ratio: Fraction
    cut: frozenset[Hashable]
    iterations: int


SUPER_SOURCE = ("__source__",)


def bottleneck_cut(
    G: nx.DiGraph,
    terminals: Sequence[Hashable],
    capacity: str = "capacity",
    backend: Backend = "auto",
) -> Bottleneck:
    """Exact min over cuts S ⊉ T, S∩T ≠ ∅ of B⁺(S) / |S ∩ T|, and a cut attaining it.

    With T the compute nodes this is x*, the per-GPU exit bandwidth that bounds every
    allgather (ForestColl, NSDI '26, §2.2 of our brief): T_opt = M/(N·x*). It is solved by a
    Dinkelbach iteration on parametric min cuts (our reconstruction, brief §2.3): with a super
    source feeding x to every terminal, x ≤ x* iff every terminal v receives N·x; a failing
    sink's min cut A gives the smaller ratio B⁺(A)/|A∩T| and the loop restarts from it. x falls
    through finitely many cut ratios, so the answer is exact.

    >>> from datahall.core.topologies import dgx_a100
    >>> G = dgx_a100(boxes=2)
    >>> b = bottleneck_cut(G, [n for n, k in G.nodes(data="kind") if k == "gpu"])
    >>> b.ratio, len([n for n in b.cut if "gpu" in n])
    (Fraction(65, 3), 15)
    """
    T = list(terminals)
    N = len(T)
    if N < 2:
        raise ValueError("a bottleneck cut needs at least two terminals")
    caps = _capacities(G, capacity)
    # S = V∖{v} is a cut with ratio ingress(v)/(N−1): a valid start, often the answer.
    ing = {v: sum((caps[u, v] for u in G.predecessors(v)), Fraction(0)) for v in T}
    start = min(T, key=lambda v: ing[v])
    x = ing[start] / (N - 1)
    cut = frozenset(n for n in G if n != start)
    order = [start, *(v for v in T if v != start)]
    iterations = 0
    while True:
        iterations += 1
        net = FlowNetwork({**caps, **{(SUPER_SOURCE, c): x for c in T}}, G.nodes, backend)
        for v in order:
            if net.maximum_flow(SUPER_SOURCE, v, cut=False).value < N * x:
                flow = net.maximum_flow(SUPER_SOURCE, v)
                A = flow.source_side - {SUPER_SOURCE}
                out = sum((c for (a, b), c in caps.items() if a in A and b not in A), Fraction(0))
                x, cut = out / sum(1 for c in T if c in A), frozenset(A)
                order = [v, *(w for w in order if w != v)]  # the failing sink first next time
                break
        else:
            return Bottleneck(x, cut, iterations)


@dataclass(frozen=True)
class LPResult:
    """An optimal LP solution with the duals (marginals) of its constraints."""

    x: np.ndarray
    objective: float
    ineq_duals: np.ndarray
    eq_duals: np.ndarray


class LPError(RuntimeError):
    """The LP is infeasible, unbounded or failed; the message is HiGHS's status."""


def solve_lp(
    c: Sequence[float],
    A_ub=None,
    b_ub=None,
    A_eq=None,
    b_eq=None,
    bounds=(0, None),
    maximize: bool = False,
) -> LPResult:
    """Solve min (or max) cᵀx s.t. A_ub x ≤ b_ub, A_eq x = b_eq, bounds, with HiGHS.

    Duals are ∂objective/∂b for the objective as stated (so for ``maximize=True`` they are the
    marginals of the maximisation): the envelope theorem gradients MetaEase-style searches need.

    >>> r = solve_lp([1, 1], A_ub=[[1, 0], [0, 1]], b_ub=[2, 3], maximize=True)
    >>> r.objective, r.ineq_duals.tolist()
    (5.0, [1.0, 1.0])
    """
    sign = -1.0 if maximize else 1.0
    res = linprog(
        sign * np.asarray(c, dtype=float),
        A_ub=A_ub,
        b_ub=b_ub,
        A_eq=A_eq,
        b_eq=b_eq,
        bounds=bounds,
        method="highs",
    )
    if res.status != 0:
        raise LPError(f"linear program not solved: {res.message}")
    ineq = getattr(res, "ineqlin", None)
    eq = getattr(res, "eqlin", None)
    return LPResult(
        x=res.x,
        objective=float(sign * res.fun),
        ineq_duals=sign * np.asarray(ineq.marginals if ineq is not None else []),
        eq_duals=sign * np.asarray(eq.marginals if eq is not None else []),
    )
