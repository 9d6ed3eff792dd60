"""Maximum-weight matching: the greedy against the exact optimum on a fixed graph.

MetaEase (Karimi et al., NSDI '26) analyses greedy max-weight matching, one of its five
domains. The graph is fixed and undirected; the inputs are its edge weights, in the order of
`edges`. A matching is a set of edges no two of which share an end, and more weight is better
(``sense="max"``, gap OPT − H).

- :func:`greedy_matching`: edges by weight, decreasing (ties by edge index), each taken when
  both its ends are still free. It is a ½-approximation: every optimal edge it misses is
  blocked by a taken edge of at least its weight, and a taken edge blocks at most two.
- :func:`optimal_matching`: the exact optimum, Edmonds' blossom algorithm as
  :func:`networkx.max_weight_matching` implements it.

OPT is the maximum of linear functions of the weights (one per matching), so the indicator of
an optimal matching's edges is a subgradient: the Optimum carries it as ``gradient``, the
analogue of the LP duals MetaEase uses for traffic engineering.

>>> edges = [("a", "b"), ("b", "c"), ("c", "d")]
>>> greedy_matching([2, 3, 2], edges)
[1]
>>> optimal_matching([2, 3, 2], edges)
[0, 2]
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np

from .problem import Optimum, Problem, ProblemError

__all__ = [
    "GreedyMatching",
    "MatchingReport",
    "OptimalMatching",
    "default_graph",
    "greedy_matching",
    "matching_problem",
    "optimal_matching",
]

Edge = tuple[Hashable, Hashable]


def greedy_matching(weights: Sequence[Any], edges: Sequence[Edge]) -> list[int]:
    """The edges the greedy takes (indices into `edges`), in the order it takes them.

    Edges are sorted by weight, decreasing, ties by index (a stable sort); an edge is taken
    when neither end is matched yet.

    The example of the MetaEase brief, the path a–b–c–d with weights 2, 3, 2: the greedy takes
    b–c (3) and blocks both other edges; the optimum takes a–b and c–d (4).

    >>> greedy_matching([2, 3, 2], [("a", "b"), ("b", "c"), ("c", "d")])
    [1]
    """
    order = sorted(range(len(edges)), key=lambda e: weights[e], reverse=True)
    matched: set[Hashable] = set()
    taken = []
    for e in order:
        u, v = edges[e]
        if u not in matched and v not in matched:
            matched.update((u, v))
            taken.append(e)
    return taken


def optimal_matching(weights: Sequence[float], edges: Sequence[Edge]) -> list[int]:
    """A maximum-weight matching (sorted edge indices), exact.

    Runs :func:`networkx.max_weight_matching` (Edmonds' blossom algorithm, O(n³)) on the graph
    of `edges` with `weights`; integral weights are passed as ints, so it computes exactly.
    Zero-weight edges never matter to the value and may be left out.

    >>> optimal_matching([2, 3, 2], [("a", "b"), ("b", "c"), ("c", "d")])
    [0, 2]
    """
    w = np.asarray(weights, dtype=float)
    if w.shape != (len(edges),):
        raise ProblemError(f"matching: {w.size} weights for {len(edges)} edges")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ProblemError("matching: edge weights must be finite and >= 0")
    G = nx.Graph()
    index = {}
    for e, (u, v) in enumerate(edges):
        if w[e] > 0:
            G.add_edge(u, v, weight=_num(w[e]))
            index[u, v] = index[v, u] = e
    return sorted(index[u, v] for u, v in nx.max_weight_matching(G))


def default_graph(seed: int = 0, nodes: int = 8, edges: int = 12) -> nx.Graph:
    """The default instance: a seeded G(n, m) random graph, 8 nodes and 12 edges.

    >>> G = default_graph(0)
    >>> G.number_of_nodes(), G.number_of_edges()
    (8, 12)
    """
    return nx.gnm_random_graph(nodes, edges, seed=seed)


def _num(v: float) -> int | float:
    v = float(v)
    return int(v) if v.is_integer() else v


@dataclass(frozen=True)
class GreedyMatching:
    """The heuristic H(x) = weight of :func:`greedy_matching`, `x` the weights of `edges`."""

    edges: tuple[Edge, ...]

    def taken(self, x: Sequence[Any]) -> list[int]:
        return greedy_matching(x, self.edges)

    def __call__(self, x: Sequence[Any]) -> Any:
        return sum(x[e] for e in self.taken(x))


@dataclass(frozen=True)
class OptimalMatching:
    """OPT(x) = weight of a maximum-weight matching, with its edge indicator as a
    subgradient (∂OPT/∂x_e = 1 for matched edges, 0 otherwise)."""

    edges: tuple[Edge, ...]

    def matching(self, x: Sequence[float]) -> list[int]:
        return optimal_matching(x, self.edges)

    def __call__(self, x: Sequence[float]) -> Optimum:
        x = np.asarray(x, dtype=float)
        m = self.matching(x)
        grad = np.zeros(len(self.edges))
        grad[m] = 1.0
        return Optimum(float(x[m].sum()), grad)


@dataclass(frozen=True)
class MatchingReport:
    """``describe(x)``: the weight of the greedy and of the optimal matching, their ratio H/OPT,
    and the edges of each."""

    heuristic: GreedyMatching
    optimum: OptimalMatching

    def __call__(self, x: Sequence[float]) -> dict[str, Any]:
        xs = [float(a) for a in np.asarray(x, dtype=float)]
        edges = self.heuristic.edges
        taken, best = self.heuristic.taken(xs), self.optimum.matching(xs)
        h, opt = sum(xs[e] for e in taken), sum(xs[e] for e in best)

        def show(es: list[int]) -> list[dict[str, Any]]:
            return [{"edge": [edges[e][0], edges[e][1]], "weight": _num(xs[e])} for e in es]

        return {
            "weight_heuristic": _num(h),
            "weight_optimal": _num(opt),
            "gap": _num(opt - h),
            "ratio": h / opt if opt else None,
            "heuristic_edges": show(taken),
            "optimal_edges": show(best),
        }


def _edges(graph: nx.Graph | Iterable[Edge]) -> tuple[Edge, ...]:
    if isinstance(graph, nx.Graph):
        if graph.is_directed() or graph.is_multigraph():
            raise ProblemError(
                "matching: the graph must be a simple undirected nx.Graph; "
                "convert it with nx.Graph(G.to_undirected())"
            )
        edges = tuple((u, v) for u, v in graph.edges())
    else:
        edges = tuple((u, v) for u, v in graph)
    loops = [e for e in edges if e[0] == e[1]]
    if loops:
        raise ProblemError(f"matching: self-loop {loops[0]} cannot be matched; remove it")
    seen = set()
    for u, v in edges:
        if frozenset((u, v)) in seen:
            raise ProblemError(f"matching: edge ({u}, {v}) is listed twice; give each edge once")
        seen.add(frozenset((u, v)))
    if not edges:
        raise ProblemError("matching: the graph has no edges; give at least one")
    return edges


def matching_problem(
    graph: nx.Graph | Iterable[Edge] | None = None, max_weight: int = 10, seed: int = 0
) -> Problem:
    """The matching :class:`~.problem.Problem`: the greedy against the maximum-weight matching.

    `graph` is an undirected ``nx.Graph`` or a list of edges ``(u, v)``; by default the seeded
    random graph :func:`default_graph` (`seed` is used only then). Inputs are the edge weights,
    integers in ``[0, max_weight]``, in edge order, named ``w(u,v)``. The gap is OPT − H in
    units of weight (``sense="max"``, scale 1); the Optimum carries a subgradient.

    >>> p = matching_problem([("a", "b"), ("b", "c"), ("c", "d")])
    >>> p.names
    ['w(a,b)', 'w(b,c)', 'w(c,d)']
    >>> p.gap([2, 3, 2])
    1.0
    """
    edges = _edges(default_graph(seed) if graph is None else graph)
    if not max_weight > 0:
        raise ProblemError(f"matching: max_weight must be > 0, not {max_weight!r}")
    h = GreedyMatching(edges)
    opt = OptimalMatching(edges)
    nodes = {u for e in edges for u in e}
    return Problem(
        "matching",
        heuristic=h,
        optimum=opt,
        lower=[0] * len(edges),
        upper=[max_weight] * len(edges),
        integer=True,
        sense="max",
        names=[f"w({u},{v})" for u, v in edges],
        scale=1.0,
        scale_label="weight",
        describe=MatchingReport(h, opt),
        info={
            "domain": "maximum-weight matching",
            "heuristic": "greedy by weight",
            "nodes": len(nodes),
            "edges": len(edges),
            "max_weight": max_weight,
            "graph": f"default_graph(seed={seed})" if graph is None else "given",
            "paper": "MetaEase (NSDI '26) matching domain",
        },
    )
