"""Switch removal by edge splitting (ForestColl, NSDI '26; brief §2.4).

Trees are packed over compute nodes only, so the switches of a fabric are first replaced by
logical compute→compute arcs with the same tree-packing capability. With integer tree slots
c_e = ⌊U·b_e⌋ and a super source s feeding k to every compute root, N·k trees fit iff
maxflow(s, v) ≥ N·k for every compute v (Edmonds' branching theorem). Splitting off the arc pair
(u, w), (w, t) at a switch w by M units moves M slots onto a logical arc u→t:

    c(u,w) −= M,   c(w,t) −= M,   c(u,t) += M,   edge_map[(u,t)][w] += M

and is allowed while the invariant survives. Repeating it until no arc touches w removes w; a
complete splitting exists when in- and out-capacity agree at w (Bang-Jensen, Frank and Jackson
1995), which bidirectional links give.

How much to split. A split of M only lowers cuts A (s ∈ A) with u, t ∈ A ∌ w or w ∈ A ∌ u, t,
each by M per split pair, so the cut value is linear in M. We try the largest M the capacities
allow; if some sink fails, its min cut A gives d_M(A) = d_0(A) − M·δ(A) and the new try is
⌊(d_0(A) − N·k)/δ(A)⌋, strictly smaller, until every sink passes (a Dinkelbach-style search, our
reconstruction; the reference uses auxiliary max-flows instead). With a :class:`Symmetry` the
split is applied to a whole orbit of pairs at once, so the logical graph keeps the fabric's
automorphisms and only one sink per orbit is checked.

Every logical arc also carries the physical paths its slots came from (``paths``), built as the
splits happen, so :func:`expand` turns c units of a logical arc into (path, count) pairs.

>>> from datahall.core.topologies import dgx_a100
>>> from datahall.collectives.bound import optimal_bound
>>> G = dgx_a100(boxes=2)
>>> b = optimal_bound(G)
>>> s = edge_split(G, b.U, b.k, spread=False)  # the reference's greedy order
>>> len(s.compute_nodes), len(s.capacity)
(16, 56)
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np

from ..core.flow import FlowNetwork, IntFlowNetwork
from ..core.topology import TopologyError, compute_nodes
from ..core.units import exact
from .bound import slot_capacities

if TYPE_CHECKING:
    from .trees import Symmetry

__all__ = ["Split", "SplitError", "edge_split", "expand", "check_balance", "flow_invariant"]

Arc = tuple[Hashable, Hashable]
Path = tuple[Hashable, ...]


class SplitError(RuntimeError):
    """Edge splitting could not remove a switch while keeping the flow invariant."""


@dataclass
class Split:
    """The switch-free logical graph of a fabric and how its arcs map back to physical paths.

    `capacity` holds the integer slots of the logical compute→compute arcs; `paths[(u, t)]` the
    physical paths (node tuples) behind them with their slot counts, summing to capacity[(u, t)];
    `edge_map[(u, t)][w]` the slots split off through switch w (recursive: (u, w) and (w, t) may
    themselves be logical arcs of earlier splits, as in the reference). `roots` maps each tree
    root to its k; the invariant is maxflow(s, v) ≥ Σ roots for every compute v.
    """

    compute_nodes: tuple[Hashable, ...]
    capacity: dict[Arc, int]
    paths: dict[Arc, Counter]
    edge_map: dict[Arc, dict[Hashable, int]]
    U: Fraction
    k: int
    roots: dict[Hashable, int]
    meta: dict = field(default_factory=dict)

    def graph(self) -> nx.DiGraph:
        """The logical graph as a DiGraph with integer ``capacity`` arcs."""
        D = nx.DiGraph()
        D.add_nodes_from(self.compute_nodes)
        D.add_edges_from((u, v, {"capacity": c}) for (u, v), c in self.capacity.items())
        return D

    def expand(self, u: Hashable, t: Hashable, c: int | None = None) -> list[tuple[Path, int]]:
        """See :func:`expand`."""
        return expand(self, u, t, c)


def expand(split: Split, u: Hashable, t: Hashable, c: int | None = None) -> list[tuple[Path, int]]:
    """Physical paths carrying c units (default: all) of logical arc u→t, as (path, count) pairs
    whose counts sum to c; shortest paths first.

    >>> from datahall.core.topologies import dgx_a100
    >>> s = edge_split(dgx_a100(boxes=1), Fraction(7, 300), 1)
    >>> arc = next(iter(s.capacity))
    >>> expand(s, *arc)[0][0][1]
    'box0/nvswitch'
    """
    have = split.capacity.get((u, t), 0)
    c = have if c is None else c
    if c > have:
        raise ValueError(f"logical arc {u!r} -> {t!r} has {have} slots, asked for {c}")
    out = []
    for path, n in sorted(split.paths.get((u, t), {}).items(), key=lambda p: (len(p[0]), p[0])):
        if c <= 0:
            break
        take = min(n, c)
        out.append((path, take))
        c -= take
    return out


def check_balance(G: nx.DiGraph) -> None:
    """Raise :class:`TopologyError` unless in- and out-capacity agree at every switch."""
    Vc = set(compute_nodes(G))
    name = G.graph.get("name", "topology")
    for w in G:
        if w in Vc:
            continue
        into = sum((exact(c) for _, _, c in G.in_edges(w, data="capacity")), Fraction(0))
        out = sum((exact(c) for _, _, c in G.out_edges(w, data="capacity")), Fraction(0))
        if into != out:
            raise TopologyError(
                f"{name}: switch {w!r} has {float(into):g} GB/s in but {float(out):g} GB/s out; "
                "switch removal needs them equal (give every link its reverse direction)"
            )


def _natural(n: Hashable) -> tuple:
    """Sort key reading digit runs as numbers: box2 < box10."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(n)))


def _join(p: Path, q: Path) -> Path:
    """p then q (p ends where q starts) with any cycle cut out: a shortcut only frees arcs."""
    out: list = []
    seen: dict = {}
    for x in (*p, *q[1:]):
        if x in seen:
            del out[seen[x] + 1 :]
            seen = {y: i for i, y in enumerate(out)}
        else:
            seen[x] = len(out)
            out.append(x)
    return tuple(out)


def _take(pool: Counter, n: int) -> list[tuple[Path, int]]:
    """Remove n units from a path pool, shortest paths first."""
    out = []
    for path in sorted(pool, key=lambda p: (len(p), p)):
        if n == 0:
            break
        t = min(n, pool[path])
        out.append((path, t))
        pool[path] -= t
        if pool[path] == 0:
            del pool[path]
        n -= t
    return out


class _Splitter:
    """State of one edge-splitting run; see :func:`edge_split`."""

    def __init__(self, G, U, k, roots, symmetry):
        self.Vc = compute_nodes(G)
        self.Vc_set = set(self.Vc)
        self.roots = dict.fromkeys(self.Vc, k) if roots is None else {r: k for r in roots}
        self.T = sum(self.roots.values())
        self.k = k
        self.c: dict[Arc, int] = slot_capacities(G, U)
        self.paths: dict[Arc, Counter] = {a: Counter({a: n}) for a, n in self.c.items()}
        self.edge_map: dict[Arc, dict] = {}
        self.succ: dict = {n: set() for n in G}
        self.pred: dict = {n: set() for n in G}
        for u, v in self.c:
            self.succ[u].add(v)
            self.pred[v].add(u)
        self.source = ("__source__",)
        self.index = {n: i for i, n in enumerate([*G.nodes, self.source])}
        self.symmetry = symmetry
        elements = symmetry.elements if symmetry is not None else ({},)
        self.elements = elements
        sinks = self.Vc if symmetry is None else symmetry.representatives(self.Vc)
        self.sinks = list(sinks)
        self.checks = 0
        self.spread = True
        self.flows = 0
        s = self.index[self.source]
        self.s_t = np.full(len(self.roots), s, dtype=np.int64)
        self.s_h = np.array([self.index[r] for r in self.roots], dtype=np.int64)
        self.s_c = np.array(list(self.roots.values()), dtype=np.int64)
        self._compact()

    # -- the invariant ------------------------------------------------------------------------
    def _compact(self) -> None:
        """Arc arrays for the max-flow networks: position pos[arc] holds c[arc] (0 if gone)."""
        idx = self.index
        arcs = list(self.c)
        self.pos: dict[Arc, int] = {a: i for i, a in enumerate(arcs)}
        size = max(16, 2 * len(arcs))
        self.t = np.zeros(size, dtype=np.int64)
        self.h = np.zeros(size, dtype=np.int64)
        self.cv = np.zeros(size, dtype=np.int64)
        self.m = len(arcs)
        self.t[: self.m] = [idx[u] for u, _ in arcs]
        self.h[: self.m] = [idx[v] for _, v in arcs]
        self.cv[: self.m] = [self.c[a] for a in arcs]

    def _slot(self, arc: Arc) -> int:
        """The array position of `arc`, allocated with capacity 0 if new."""
        p = self.pos.get(arc)
        if p is None:
            if self.m == len(self.t):
                for name in ("t", "h", "cv"):
                    old = getattr(self, name)
                    setattr(self, name, np.concatenate([old, np.zeros_like(old)]))
            p = self.pos[arc] = self.m
            self.t[p], self.h[p] = self.index[arc[0]], self.index[arc[1]]
            self.m += 1
        return p

    def violated(self, overrides: dict[int, int] | None = None):
        """(source-side mask, flow value) of a min cut below Σ roots for some sink, or None.

        The network is the current capacities with `overrides` (array position → capacity).
        """
        self.checks += 1
        m = self.m
        caps = self.cv[:m].copy()
        if overrides:
            caps[list(overrides)] = list(overrides.values())
        net = IntFlowNetwork(
            len(self.index),
            np.concatenate([self.t[:m], self.s_t]),
            np.concatenate([self.h[:m], self.s_h]),
            np.concatenate([caps, self.s_c]),
        )
        s = self.index[self.source]
        for i, v in enumerate(self.sinks):
            self.flows += 1
            value, side = net.maximum_flow(s, self.index[v])
            if value < self.T:
                self.sinks.insert(0, self.sinks.pop(i))  # the failing sink first next time
                return side, value
        return None

    # -- splitting ----------------------------------------------------------------------------
    def triples(self, u, w, t) -> list[tuple]:
        return sorted({(g.get(u, u), g.get(w, w), g.get(t, t)) for g in self.elements}, key=repr)

    def max_split(self, u, w, t, limit: int | None = None, clean: bool = False) -> tuple[int, list]:
        """The largest M ≤ limit splittable at (u, w, t) and its whole orbit simultaneously
        (0 if `clean` and two pairs of the orbit share an arc)."""
        triples = self.triples(u, w, t)
        delta: Counter = Counter()  # array position → capacity change per unit of M
        for a, b, d in triples:
            delta[self._slot((a, b))] -= 1
            delta[self._slot((b, d))] -= 1
            if a != d:
                delta[self._slot((a, d))] += 1
        if clean and min(delta.values()) < -1:
            return 0, triples
        M = min(int(self.cv[p]) // -n for p, n in delta.items() if n < 0)
        if limit is not None:
            M = min(M, limit)
        idx = self.index
        while M > 0:
            found = self.violated({p: int(self.cv[p]) + n * M for p, n in delta.items()})
            if found is None:
                return M, triples
            side, flow = found
            # the cut's value is linear in M: `flow` after the split, flow + M·slope before
            slope = 0
            for a, b, d in triples:
                ia, ib, id_ = bool(side[idx[a]]), bool(side[idx[b]]), bool(side[idx[d]])
                slope += int(ia and not ib) + int(ib and not id_) - int(a != d and ia and not id_)
            new = (flow + M * slope - self.T) // slope
            assert 0 <= new < M, (u, w, t, M, new)
            M = new
        return 0, triples

    def apply(self, triples, M) -> None:
        for a, b, d in triples:
            for arc in ((a, b), (b, d)):
                self.c[arc] -= M
                self.cv[self.pos[arc]] -= M
            left = _take(self.paths[a, b], M)
            right = _take(self.paths[b, d], M)
            if a != d:
                self.c[a, d] = self.c.get((a, d), 0) + M
                self.cv[self._slot((a, d))] += M
                self.succ[a].add(d)
                self.pred[d].add(a)
                pool = self.paths.setdefault((a, d), Counter())
                self.edge_map.setdefault((a, d), {}).setdefault(b, 0)
                self.edge_map[a, d][b] += M
                i = j = 0
                lp, rp = [list(x) for x in left], [list(x) for x in right]
                while i < len(lp) and j < len(rp):
                    n = min(lp[i][1], rp[j][1])
                    pool[_join(lp[i][0], rp[j][0])] += n
                    lp[i][1] -= n
                    rp[j][1] -= n
                    i += lp[i][1] == 0
                    j += rp[j][1] == 0
            for arc in ((a, b), (b, d)):
                if self.c[arc] == 0:
                    self._drop(arc)

    def _drop(self, arc: Arc) -> None:
        u, v = arc
        del self.c[arc]
        self.cv[self.pos[arc]] = 0
        self.paths.pop(arc, None)
        self.succ[u].discard(v)
        self.pred[v].discard(u)

    def _round(self, w, balanced: bool, clean: bool = False) -> bool:
        progress = False
        for u in sorted(self.pred[w], key=repr):
            # compute neighbours first, switch→switch pairs late (a logical arc between two
            # switches fixed by the symmetry would be shared by a whole orbit), loops last
            def order(t, u=u):
                return (t == u, u not in self.Vc_set and t not in self.Vc_set, repr(t))

            outs = sorted(self.succ[w], key=order)
            others = [t for t in outs if t != u and not order(t)[1]]
            if (u, w) not in self.c or (balanced and not others):
                continue
            share = None
            if balanced:  # an even share, rounded up to whole trees (multiples of k)
                share = -(-self.c[u, w] // len(others))
                share = -(-share // self.k) * self.k
            for t in others if balanced else outs:
                if (u, w) not in self.c:
                    break
                if (w, t) not in self.c:
                    continue
                M, triples = self.max_split(u, w, t, share, clean)
                if M:
                    self.apply(triples, M)
                    progress = True
        return progress

    def remove(self, w) -> None:
        """Split off every arc pair at switch w (and, with symmetry, at its whole orbit)."""
        # one round spreading each in-arc evenly over w's other out-neighbours (shallow trees),
        # then greedy rounds of the largest splits until w is empty or nothing moves
        if self.spread:
            self._round(w, balanced=True)
        # at a switch fixed by the symmetry (a spine), first only "clean" pair orbits whose
        # images use distinct arcs: an arc to another fixed switch shared by a whole orbit of
        # pairs splits only in multiples of the orbit size, and can leave the switch stuck
        fixed = all(g.get(w, w) == w for g in self.elements)
        for clean in (True, False) if fixed and len(self.elements) > 1 else (False,):
            while self.pred[w] and self.succ[w] and self._round(w, False, clean):
                pass
        for w2 in {g.get(w, w) for g in self.elements}:
            if self.pred[w2] and self.succ[w2]:
                raise SplitError(
                    f"could not split off switch {w2!r}: {len(self.pred[w2])} arcs in and "
                    f"{len(self.succ[w2])} out remain"
                )
            # a switch with only in- (or only out-) arcs left carries no flow: drop them
            for u in list(self.pred[w2]):
                self._drop((u, w2))
            for t in list(self.succ[w2]):
                self._drop((w2, t))
        self._compact()


def edge_split(
    G: nx.DiGraph,
    U: Fraction,
    k: int,
    *,
    roots: Iterable[Hashable] | None = None,
    symmetry: Symmetry | None = None,
    spread: bool = True,
) -> Split:
    """Remove every switch of `G` by edge splitting with tree slots ⌊U·b_e⌋ (brief §2.4).

    The flow invariant maxflow(s, v) ≥ Σ_r k (s feeding k to each root r: every compute node, or
    the given `roots` for broadcast/reduce) holds before and after every split. `symmetry`
    (automorphisms of `G` acting freely on compute nodes) splits whole orbits at once so the
    result keeps them; it raises :class:`SplitError` if a symmetric splitting gets stuck (the
    caller then retries without symmetry).

    With `spread` (default) switches are processed leaves first (NICs before the switches behind
    them), each first spreading every in-arc's slots evenly (in whole trees, multiples of k) over
    the switch's other neighbours, then greedily: logical graphs get denser and trees shallower.
    ``spread=False`` is the reference's greedy order (fabric-wide switches first, then box by
    box; 2×8 A100 then has 56 logical arcs, brief §2.4).

    Raises :class:`TopologyError` if a switch's in- and out-capacity differ, and
    :class:`SplitError` if the invariant does not hold to begin with.
    """
    check_balance(G)
    sp = _Splitter(G, Fraction(U), k, roots, symmetry)
    if sp.violated() is not None:
        raise SplitError(
            f"{k} trees per root do not fit in slots ⌊{U}·b⌋; use (U, k) from optimal_bound "
            "or fixed_k_bound"
        )
    switches = [w for w in G if w not in sp.Vc_set]
    if spread:  # leaves first (NICs before the switches behind them)
        switches.sort(key=lambda w: (G.in_degree(w) + G.out_degree(w), _natural(w)))
    else:  # the reference's order: fabric-wide switches (box -1) first, then box by box
        switches.sort(key=lambda w: (G.nodes[w].get("box", 0), _natural(w)))
    if symmetry is not None:
        # largest orbits first: an orbit is split all at once, so its switches must not be
        # neighbours; splitting a fixed switch (a spine) first would join the orbit (the leaves)
        reps = symmetry.representatives(switches)
        size = {w: len(symmetry.orbit(w)) for w in reps}
        switches = sorted(reps, key=lambda w: -size[w])  # stable: keeps the order above
    sp.spread = spread
    for w in switches:
        sp.remove(w)
    for w in G:
        if w not in sp.Vc_set and (sp.pred[w] or sp.succ[w]):  # pragma: no cover
            raise AssertionError(f"switch {w!r} survived edge splitting")
    assert all(u in sp.Vc_set and v in sp.Vc_set for u, v in sp.c)
    assert sp.violated() is None, "edge splitting broke the flow invariant"
    return Split(
        compute_nodes=tuple(sp.Vc),
        capacity=dict(sorted(sp.c.items(), key=repr)),
        paths={a: sp.paths[a] for a in sp.c},
        edge_map=sp.edge_map,
        U=Fraction(U),
        k=k,
        roots=sp.roots,
        meta={"checks": sp.checks, "maxflows": sp.flows, "switches": len(switches)},
    )


def flow_invariant(
    capacity: dict[Arc, int], nodes: Sequence[Hashable], roots: dict[Hashable, int]
) -> int:
    """min over compute v of maxflow(s, v) − Σ roots on integer capacities (≥ 0 iff the trees fit).

    >>> flow_invariant({("a", "b"): 1, ("b", "a"): 1}, ["a", "b"], {"a": 1, "b": 1})
    0
    """
    T = sum(roots.values())
    s = ("__source__",)
    caps = {**{a: c for a, c in capacity.items() if c > 0}, **{(s, r): d for r, d in roots.items()}}
    net = FlowNetwork(caps, [*nodes, s])
    return int(min(net.maximum_flow(s, v, cut=False).value for v in nodes) - T)
