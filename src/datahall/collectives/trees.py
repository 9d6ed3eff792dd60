"""Spanning-tree packing on the switch-free logical graph (ForestColl, NSDI '26; brief §2.5).

Given integer arc capacities c on the compute nodes and k trees wanted per root, the trees are
grown one arc at a time (Lovász's constructive proof of Edmonds' branching theorem, the semantics
of the reference ``BranchingGenerator``). A tree object (root u, multiplicity C_u) holds a vertex
set V_u and an arc list; adding arc (x, y), x ∈ V_u ∌ y, to μ of its C_u copies is safe when

    μ = min(C_u, c(x, y), maxflow_D′(x, y) − Σ_other C)

where D′ is D plus, for every *other* unfinished object j, a node s_j with uncapacitated arcs to
V_j and an arc x→s_j of capacity C_j. If μ < C_u the object splits: μ copies take the arc, the
other C_u − μ keep the old state and are grown later. Lovász's theorem guarantees some arc out of
V_u always has μ ≥ 1, so every object finishes spanning all compute nodes.

Symmetric variant (brief §2.5, our reconstruction of ``SymmtricBranchingGenerator``): with a group
Γ of fabric automorphisms acting freely on compute nodes (:func:`automorphisms`, derived from the
generator's structure, never from colour refinement), trees are grown only for one root per orbit
and every step is applied to all |Γ| images at once. A step is kept only if the whole state stays
completable: a global source feeding C_j to each object's s_j must still deliver Σ C_j to every
compute node, and by symmetry one sink per orbit suffices. If no symmetric step exists the caller
falls back to the plain packing.

>>> from datahall.core.topologies import ring
>>> trees = pack_trees({("a", "b"): 1, ("b", "c"): 1, ("c", "a"): 1}, ["a", "b", "c"], {"a": 1})
>>> trees[0].arcs
(('a', 'b'), ('b', 'c'))
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from ..core.flow import IntFlowNetwork
from ..core.topology import compute_nodes
from ..core.units import exact

__all__ = [
    "Branching",
    "PackingError",
    "Symmetry",
    "automorphisms",
    "pack_trees",
    "check_packing",
]

Arc = tuple[Hashable, Hashable]


class PackingError(RuntimeError):
    """Tree packing could not finish (only the symmetric variant can get stuck)."""


@dataclass(frozen=True)
class Branching:
    """One tree object of the logical graph: `multiplicity` identical out-trees from `root`,
    `arcs` (parent, child) listed parents before children."""

    root: Hashable
    multiplicity: int
    arcs: tuple[Arc, ...]


# -- symmetry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Symmetry:
    """A group of automorphisms of a fabric that acts freely on its compute nodes.

    `elements` are node→node maps over every node (identity first), `names` describe the
    generators. Every compute orbit has |elements| nodes.
    """

    elements: tuple[dict, ...]
    names: tuple[str, ...] = ()
    generators: tuple[dict, ...] = field(default=(), repr=False)

    @property
    def order(self) -> int:
        return len(self.elements)

    def representatives(self, nodes: Sequence[Hashable]) -> list[Hashable]:
        """One node per orbit, the first of each orbit in the order of `nodes`."""
        seen, reps = set(), []
        for n in nodes:
            if n not in seen:
                reps.append(n)
                seen.update(g[n] for g in self.elements)
        return reps

    def orbit(self, node: Hashable) -> list[Hashable]:
        return list(dict.fromkeys(g[node] for g in self.elements))


def _relabel(G: nx.DiGraph, fn: Callable[[str], str]) -> dict | None:
    """The node map n → fn(n), or None if it is not a permutation of G's nodes."""
    try:
        p = {n: fn(n) for n in G}
    except (KeyError, ValueError, IndexError, TypeError, AttributeError, ZeroDivisionError):
        return None  # the names do not follow the generator's scheme
    if set(p.values()) != set(G) or len(set(p.values())) != len(p):
        return None
    return p


def is_automorphism(G: nx.DiGraph, p: dict) -> bool:
    """True if node map `p` preserves node kinds and every arc with its exact capacity."""
    kind = G.nodes
    if any(kind[n].get("kind") != kind[p[n]].get("kind") for n in G):
        return False
    for u, v, c in G.edges(data="capacity"):
        a, b = p[u], p[v]
        if not G.has_edge(a, b) or exact(G[a][b]["capacity"]) != exact(c):
            return False
    return G.number_of_edges() == len({(p[u], p[v]) for u, v in G.edges})


_BOX = re.compile(r"^box(\d+)/(.+)$")
_NUM = re.compile(r"^(.*?)(\d+)$")


def _box_of(n: str) -> tuple[int, str] | None:
    m = _BOX.match(n)
    return (int(m[1]), m[2]) if m else None


def _shift_index(name: str, step: int, mod: int) -> str:
    m = _NUM.match(name)
    return f"{m[1]}{(int(m[2]) + step) % mod}"


def _boxes_by(G: nx.DiGraph, uplink_kind: str) -> dict[str, list[int]]:
    """Boxes grouped by the switch their first NIC joins (leaf or rail group), in order."""
    groups: dict[str, list[int]] = {}
    for n in G:
        b = _box_of(n)
        if b and b[1] == "nic0":
            ups = [m for m in G.successors(n) if G.nodes[m].get("kind") == uplink_kind]
            key = ups[0].split("/")[0] if ups else ""
            groups.setdefault(key, []).append(b[0])
    return {k: sorted(v) for k, v in sorted(groups.items(), key=lambda kv: _natural(kv[0]))}


def _natural(s: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


def _count(G: nx.DiGraph, pattern: str) -> int:
    r = re.compile(pattern)
    return sum(1 for n in G if r.match(str(n)))


def _box_candidates(G: nx.DiGraph, uplink_kind: str | None) -> list[tuple[str, dict | None]]:
    """Box rotations (within each leaf / rail group, then across them) and local-index
    rotation (GPU i → i+1 with its NIC, and rail-indexed switches along)."""
    boxes = sorted({b[0] for n in G if (b := _box_of(n))})
    gpus = _count(G, r"^box0/(gpu|gcd)\d+$")
    out: list[tuple[str, dict | None]] = []
    groups = {"": boxes} if uplink_kind is None else _boxes_by(G, uplink_kind)
    within = {}
    for members in groups.values():
        for i, a in enumerate(members):
            within[a] = members[(i + 1) % len(members)]

    def box_map(mapping: dict[int, int], other: Callable[[str], str] = lambda n: n):
        def fn(n: str) -> str:
            b = _box_of(n)
            return f"box{mapping[b[0]]}/{b[1]}" if b else other(n)

        return fn

    if len(boxes) > 1:
        out.append(
            (
                "box rotation" if uplink_kind is None else "box rotation in group",
                _relabel(G, box_map(within)),
            )
        )
    keys = list(groups)
    if len(keys) > 1 and len({len(v) for v in groups.values()}) == 1:
        across = {}
        for gi, key in enumerate(keys):
            for pos, a in enumerate(groups[key]):
                across[a] = groups[keys[(gi + 1) % len(keys)]][pos]
        L = len(keys)

        def other(n: str) -> str:  # leaf{l} → leaf{l+1}; group{g}/rail{i} → group{g+1}/rail{i}
            if G.nodes[n].get("kind") == uplink_kind:
                head, _, tail = n.partition("/")
                return _shift_index(head, 1, L) + (f"/{tail}" if tail else "")
            return n

        out.append(("group rotation", _relabel(G, box_map(across, other))))
    if gpus > 1:
        rails = sorted(n for n in G if G.nodes[n].get("kind") == "ib" and _NUM.match(n))

        def local(n: str) -> str:
            b = _box_of(n)
            if b:
                name = b[1]
                if _NUM.match(name) and not name.startswith("nvswitch"):
                    return f"box{b[0]}/{_shift_index(name, 1, gpus)}"
                return n
            kind = G.nodes[n].get("kind")
            if kind == "ib" and len(rails) > 1:
                return _shift_index(n, 1, len(rails))
            if uplink_kind == "leaf" and "/rail" in n:  # rail-optimized: rail i → i+1 in group
                head, _, tail = n.partition("/")
                return f"{head}/{_shift_index(tail, 1, gpus)}"
            return n

        out.append(("GPU rotation in box", _relabel(G, local)))
    return out


def _mesh_candidates(G: nx.DiGraph, limit: int = 64) -> list[tuple[str, dict | None]]:
    """Automorphisms of one MI250 box's xGMI mesh (the generator's link table, matched with
    exact capacities), applied to every box alike; the IB switch stays put."""
    box = [n for n in G if str(n).startswith("box0/") and G.nodes[n].get("kind") == "gpu"]
    H = nx.Graph()
    H.add_nodes_from(box)
    H.add_edges_from((u, v, {"c": exact(c)}) for u, v, c in G.subgraph(box).edges(data="capacity"))
    matcher = nx.algorithms.isomorphism.GraphMatcher(H, H, edge_match=lambda a, b: a["c"] == b["c"])
    out = []
    for i, m in enumerate(itertools.islice(matcher.isomorphisms_iter(), limit)):
        local = {n.split("/", 1)[1]: m[n].split("/", 1)[1] for n in box}
        if all(a == b for a, b in local.items()):
            continue

        def fn(n: str, local=local) -> str:
            b = _box_of(n)
            return f"box{b[0]}/{local[b[1]]}" if b and b[1] in local else n

        out.append((f"xGMI mesh automorphism {i}", _relabel(G, fn)))
    return out


def _candidates(G: nx.DiGraph) -> list[tuple[str, dict | None]]:
    gen = G.graph.get("generator")
    if gen in ("dgx-a100", "dgx-h100"):
        return _box_candidates(G, None)[:2]
    if gen == "mi250":
        return _box_candidates(G, None)[:1] + _mesh_candidates(G)
    if gen in ("leaf-spine", "rail-optimized"):  # boxes grouped by leaf / rail group
        return _box_candidates(G, "leaf")
    if gen in ("ring", "direct-connect"):
        n = len(G)
        return [("rotation", _relabel(G, lambda s: _shift_index(s, 1, n)))]
    if gen == "torus":
        coords = {n: tuple(int(t) for t in n[3:].split("-")) for n in G}
        dims = [
            max(c[i] for c in coords.values()) + 1 for i in range(len(next(iter(coords.values()))))
        ]
        out = []
        for axis, d in enumerate(dims):

            def fn(n: str, axis=axis, d=d) -> str:
                c = list(coords[n])
                c[axis] = (c[axis] + 1) % d
                return "gpu" + "-".join(map(str, c))

            out.append((f"translation along axis {axis}", _relabel(G, fn)))
        return out
    return []


def _closure(gens: list[tuple], limit: int) -> list[tuple] | None:
    """All products of the permutations `gens` (tuples over node positions), or None if more
    than `limit` (then the group cannot act freely on `limit` compute nodes)."""
    ident = tuple(range(len(gens[0])))
    seen = {ident: None}
    frontier = [ident]
    while frontier:
        nxt = []
        for p in frontier:
            for g in gens:
                q = tuple(g[i] for i in p)
                if q not in seen:
                    seen[q] = None
                    nxt.append(q)
                    if len(seen) > limit:
                        return None
        frontier = nxt
    return list(seen)


def automorphisms(G: nx.DiGraph) -> Symmetry | None:
    """Automorphisms of `G` known from the generator that built it (``G.graph["generator"]``):
    box rotations for DGX / MI250 clusters (within and across leaves or rail groups), GPU
    rotation inside a box (with its NICs and rails), ring/mesh rotation and torus translations.

    Each candidate is checked to preserve node kinds and exact capacities; the group they
    generate is kept only while it acts freely on the compute nodes (so every compute orbit has
    |Γ| nodes and a tree replicates to one tree per root). Returns None when no non-trivial
    group is found, e.g. for random fabrics or a degraded cluster. Never guesses from colour
    refinement (brief pitfall 8).

    >>> from datahall.core.topologies import dgx_a100
    >>> sym = automorphisms(dgx_a100(boxes=4))
    >>> sym.order, sym.names
    (32, ('box rotation', 'GPU rotation in box'))
    """
    nodes = list(G)
    pos = {n: i for i, n in enumerate(nodes)}
    Vc = [pos[n] for n in compute_nodes(G)]
    chosen: list[tuple] = []
    names: list[str] = []
    group: list[tuple] = [tuple(range(len(nodes)))]
    try:
        candidates = _candidates(G)
    except (KeyError, ValueError, IndexError, TypeError, AttributeError):
        candidates = []  # a graph that only claims to come from a generator
    for name, p in candidates:
        if p is None or all(p[n] == n for n in nodes) or not is_automorphism(G, p):
            continue
        perm = tuple(pos[p[n]] for n in nodes)
        if perm in group:  # already generated
            continue
        trial = _closure([*chosen, perm], len(Vc))
        if trial is None:
            continue
        free = all(all(g[v] != v for v in Vc) for g in trial if g != group[0])
        if free:
            chosen.append(perm)
            names.append(name)
            group = trial
    if len(group) == 1:
        return None
    ident = tuple(range(len(nodes)))
    group.sort(key=lambda g: g != ident)
    elements = tuple({n: nodes[g[i]] for i, n in enumerate(nodes)} for g in group)
    gens = tuple({n: nodes[g[i]] for i, n in enumerate(nodes)} for g in chosen)
    return Symmetry(elements, tuple(names), gens)


# -- packing ------------------------------------------------------------------------------------


@dataclass
class _Obj:
    root: int
    C: int
    V: list[int]
    Vset: set[int]
    arcs: list[tuple[int, int]]

    def copy(self, C: int) -> _Obj:
        return _Obj(self.root, C, list(self.V), set(self.Vset), list(self.arcs))


class _Packing:
    """Shared state of both packers: integer capacities on node indices 0..N-1."""

    def __init__(self, capacity: dict[Arc, int], nodes: Sequence[Hashable], roots: dict):
        self.nodes = list(nodes)
        self.N = len(self.nodes)
        self.idx = {n: i for i, n in enumerate(self.nodes)}
        for r in roots:
            if r not in self.idx:
                raise ValueError(f"root {r!r} is not one of the packed nodes")
        self.cap: dict[tuple[int, int], int] = {}
        for (u, v), c in capacity.items():
            if c > 0 and u != v:
                self.cap[self.idx[u], self.idx[v]] = c
        self.succ: list[list[int]] = [[] for _ in range(self.N)]
        for u, v in sorted(self.cap):
            self.succ[u].append(v)
        self.roots = {self.idx[r]: k for r, k in roots.items() if k > 0}
        self.BIG = 2 * sum(self.roots.values()) + max(self.cap.values(), default=0) + 1

    def out(self, objs: list[_Obj]) -> list[Branching]:
        nodes = self.nodes
        return [
            Branching(nodes[o.root], o.C, tuple((nodes[x], nodes[y]) for x, y in o.arcs))
            for o in objs
        ]


class _PlainPacker(_Packing):
    """The reference semantics: grow each object to completion, splitting it when μ < C."""

    def pack(self) -> list[Branching]:
        self.objs = [_Obj(r, k, [r], {r}, []) for r, k in sorted(self.roots.items())]
        self.alive = list(range(len(self.objs)))
        self.flows = 0
        queue = deque(self.alive)
        done = []
        while queue:
            i = queue.popleft()
            queue.extend(self._grow(i))
            self.alive.remove(i)
            done.append(i)
        return self.out([self.objs[i] for i in sorted(done, key=lambda i: (self.objs[i].root, i))])

    def _build(self, current: int) -> None:
        N, sigma = self.N, self.N
        slot = {j: N + 1 + s for s, j in enumerate(self.alive)}
        self.slot = slot
        t = [u for u, _ in self.cap] + [sigma] * N
        h = [v for _, v in self.cap] + list(range(N))
        c = list(self.cap.values()) + [0] * N
        for j, node in slot.items():
            o = self.objs[j]
            t.append(sigma)
            h.append(node)
            c.append(0 if j == current else o.C)
            t += [node] * N
            h += range(N)
            c += [self.BIG if v in o.Vset else 0 for v in range(N)]
        self.net = IntFlowNetwork(N + 1 + len(slot), t, h, c)

    def _grow(self, i: int) -> list[int]:
        """Grow object i to a spanning tree; return the objects split off it."""
        o = self.objs[i]
        new: list[int] = []
        self._build(i)
        others = sum(self.objs[j].C for j in self.alive) - o.C
        sigma = self.N
        bfs = deque(o.V)
        while bfs:
            x = bfs.popleft()
            for y in self.succ[x]:
                if y in o.Vset or self.cap.get((x, y), 0) == 0:
                    continue
                self.net.set(sigma, x, self.BIG)
                f, _ = self.net.maximum_flow(sigma, y, cut=False)
                self.net.set(sigma, x, 0)
                self.flows += 1
                mu = min(o.C, self.cap[x, y], f - others)
                if mu <= 0:
                    continue
                if mu < o.C:  # split: C − μ copies keep the old state
                    j = len(self.objs)
                    self.objs.append(o.copy(o.C - mu))
                    self.alive.append(j)
                    new.append(j)
                    o.C = mu
                    self._build(i)  # a new object node
                    others = sum(self.objs[j].C for j in self.alive) - o.C
                o.arcs.append((x, y))
                o.V.append(y)
                o.Vset.add(y)
                self.cap[x, y] -= mu
                self.net.set(x, y, self.cap[x, y])
                self.net.set(self.slot[i], y, self.BIG)
                bfs.append(y)
        if len(o.V) != self.N:  # pragma: no cover - Lovász's theorem says this cannot happen
            raise PackingError(f"tree from {self.nodes[o.root]!r} stuck at {len(o.V)} nodes")
        return new


class _SymmetricPacker(_Packing):
    """Grow one root per orbit; apply every step to all |Γ| images (see the module doc)."""

    def __init__(self, capacity, nodes, roots, symmetry: Symmetry):
        super().__init__(capacity, nodes, roots)
        idx = self.idx
        self.P = np.array([[idx[g[n]] for n in self.nodes] for g in symmetry.elements])
        for g in symmetry.generators or symmetry.elements:
            for (u, v), c in self.cap.items():
                a, b = idx[g[self.nodes[u]]], idx[g[self.nodes[v]]]
                if self.cap.get((a, b)) != c:
                    raise PackingError("the logical graph is not invariant under the symmetry")
            for r, k in self.roots.items():
                if self.roots.get(idx[g[self.nodes[r]]]) != k:
                    raise PackingError("the roots are not invariant under the symmetry")
        self.g = len(self.P)
        self.arc_list = sorted(self.cap)
        self.arc_pos = {a: i for i, a in enumerate(self.arc_list)}
        self.capv = np.array([self.cap[a] for a in self.arc_list], dtype=np.int64)
        self.tD = np.array([a[0] for a in self.arc_list], dtype=np.int64)
        self.hD = np.array([a[1] for a in self.arc_list], dtype=np.int64)
        reps = symmetry.representatives(self.nodes)
        self.sinks = [idx[v] for v in reps]
        self.flows = 0

    def pack(self) -> list[Branching]:
        chosen, seen = [], set()
        for r in range(self.N):
            if r in self.roots and r not in seen:
                chosen.append(r)
                seen.update(int(v) for v in self.P[:, r])
        self.objs = [_Obj(r, self.roots[r], [r], {r}, []) for r in chosen]
        self.alive = list(range(len(self.objs)))
        queue = deque(self.alive)
        done = []
        while queue:
            i = queue.popleft()
            queue.extend(self._grow(i))
            self.alive.remove(i)
            done.append(i)
        trees = []
        for i in sorted(done, key=lambda i: (self.objs[i].root, i)):
            o = self.objs[i]
            for p in self.P:
                arcs = tuple((self.nodes[p[x]], self.nodes[p[y]]) for x, y in o.arcs)
                trees.append(Branching(self.nodes[p[o.root]], o.C, arcs))
        trees.sort(key=lambda b: self.idx[b.root])
        return trees

    def _arrays(self, i: int, x: int, y: int, mu: int, whole: bool):
        """The global-source network after adding (x, y) to μ copies of object i and all its
        images. With `whole` (μ = C_i) the object simply grows; otherwise a temporary object
        holds the μ moved copies (σ → t_γ of capacity μ, t_γ → γ(V_i ∪ {y})). Returns the node
        count, the arc arrays, and the positions of the image arcs γ(x, y), of the arcs σ → s_γ
        of object i and of the arcs σ → t_γ (None when `whole`)."""
        N, g, P = self.N, self.g, self.P
        sigma = N
        caps = self.capv.copy()
        img = np.array(
            [self.arc_pos[int(a), int(b)] for a, b in zip(P[:, x], P[:, y], strict=True)]
        )
        np.subtract.at(caps, img, mu)
        tails, heads, cs = [self.tD], [self.hD], [caps]
        offset = len(caps)
        node = N + 1
        own = temp = None
        for j in [*self.alive, *([] if whole else [-1])]:  # -1: the temporary object
            if j == -1:
                V, C = [*self.objs[i].V, y], mu
            else:
                o = self.objs[j]
                V, C = o.V, (o.C - mu if j == i else o.C)
                if j == i and whole:
                    V, C = [*o.V, y], o.C
            s_nodes = node + np.arange(g)
            node += g
            if j == i:
                own = offset + np.arange(g)
            elif j == -1:
                temp = offset + np.arange(g)
            tails.append(np.full(g, sigma))
            heads.append(s_nodes)
            cs.append(np.full(g, C))
            imgs = P[:, V]  # g × |V|
            tails.append(np.repeat(s_nodes, len(V)))
            heads.append(imgs.ravel())
            cs.append(np.full(imgs.size, self.BIG))
            offset += g + imgs.size
        return (
            node,
            np.concatenate(tails),
            np.concatenate(heads),
            np.concatenate(cs),
            img,
            own,
            temp,
        )

    def _probe(self, i: int, x: int, y: int) -> int:
        """The largest μ ≤ min(C_i, c(x, y)) whose symmetric step keeps the state completable.

        Dinkelbach on μ: a failing sink's min cut A has value f now and f + μ·slope before the
        step, where slope counts the image arcs γ(x, y) leaving A, plus σ → s_γ arcs that
        cross A, minus σ → t_γ arcs that cross it; the next try is ⌊(f + μ·slope − T)/slope⌋.
        """
        o = self.objs[i]
        T = self.g * sum(self.objs[j].C for j in self.alive)
        mu = min(o.C, self.cap[x, y])
        sigma = self.N
        while mu > 0:
            whole = mu == o.C
            n, t, h, c, img, own, temp = self._arrays(i, x, y, mu, whole)
            net = IntFlowNetwork(n, t, h, c)
            side = None
            for s_i, v in enumerate(self.sinks):
                self.flows += 1
                f, cut = net.maximum_flow(sigma, v)
                if f < T:
                    side = cut
                    self.sinks.insert(0, self.sinks.pop(s_i))
                    break
            if side is None:
                return mu
            slope = int((side[t[img]] & ~side[h[img]]).sum())
            if not whole:  # the moved copies: σ → s_γ lost μ, σ → t_γ gained μ
                slope += int((~side[h[own]]).sum()) - int((~side[h[temp]]).sum())
            new = (f + mu * slope - T) // slope if slope > 0 else 0
            assert 0 <= new < mu, (mu, new, slope)
            mu = new
        return 0

    def _grow(self, i: int) -> list[int]:
        o = self.objs[i]
        new: list[int] = []
        while len(o.V) < self.N:
            progress = False
            bfs = deque(o.V)
            while bfs:
                x = bfs.popleft()
                for y in self.succ[x]:
                    if y in o.Vset or self.cap.get((x, y), 0) == 0:
                        continue
                    mu = self._probe(i, x, y)
                    if mu <= 0:
                        continue
                    if mu < o.C:
                        j = len(self.objs)
                        self.objs.append(o.copy(o.C - mu))
                        self.alive.append(j)
                        new.append(j)
                        o.C = mu
                    for p in self.P:
                        a, b = int(p[x]), int(p[y])
                        self.cap[a, b] -= mu
                        self.capv[self.arc_pos[a, b]] -= mu
                    o.arcs.append((x, y))
                    o.V.append(y)
                    o.Vset.add(y)
                    bfs.append(y)
                    progress = True
            if not progress:
                raise PackingError(
                    f"no symmetric step extends the tree from {self.nodes[o.root]!r} "
                    f"beyond {len(o.V)} of {self.N} nodes"
                )
        return new


def pack_trees(
    capacity: dict[Arc, int],
    nodes: Sequence[Hashable],
    roots: dict[Hashable, int],
    *,
    symmetry: Symmetry | None = None,
) -> list[Branching]:
    """Pack roots[r] spanning out-trees from every root r into integer arc capacities.

    `capacity` is the switch-free logical graph on `nodes` (from :func:`~.split.edge_split`);
    the packing exists iff maxflow(s, v) ≥ Σ roots for every node v, s feeding roots[r] to r
    (Edmonds). Returns tree objects with multiplicities summing to roots[r] per root, and per
    arc Σ multiplicity ≤ capacity. With `symmetry` (automorphisms acting freely on `nodes` that
    preserve `capacity` and `roots`) trees are grown for one root per orbit and replicated;
    :class:`PackingError` if that gets stuck.

    >>> trees = pack_trees({("a", "b"): 2, ("b", "a"): 2}, ["a", "b"], {"a": 2, "b": 2})
    >>> [(t.root, t.multiplicity, t.arcs) for t in trees]
    [('a', 2, (('a', 'b'),)), ('b', 2, (('b', 'a'),))]
    """
    if symmetry is not None and symmetry.order > 1:
        return _SymmetricPacker(capacity, nodes, roots, symmetry).pack()
    return _PlainPacker(capacity, nodes, roots).pack()


def check_packing(
    trees: Sequence[Branching],
    capacity: dict[Arc, int],
    nodes: Sequence[Hashable],
    roots: dict[Hashable, int],
) -> None:
    """Raise AssertionError unless `trees` is a valid packing (brief §2.7 invariants 1–2):
    every tree an arborescence spanning `nodes` (N−1 arcs, one parent per non-root, parents
    listed first), Σ multiplicity = roots[r] per root, per arc Σ multiplicity ≤ capacity."""
    N = len(nodes)
    per_root: dict = dict.fromkeys(roots, 0)
    load: dict = {}
    for t in trees:
        assert t.multiplicity > 0, t
        assert len(t.arcs) == N - 1, f"tree from {t.root!r} has {len(t.arcs)} arcs, want {N - 1}"
        seen = {t.root}
        for x, y in t.arcs:
            assert x in seen, f"arc {x!r}->{y!r} listed before its parent is reached"
            assert y not in seen, f"{y!r} has two parents in the tree from {t.root!r}"
            seen.add(y)
            load[x, y] = load.get((x, y), 0) + t.multiplicity
        assert seen == set(nodes), f"tree from {t.root!r} misses {set(nodes) - seen}"
        per_root[t.root] = per_root.get(t.root, 0) + t.multiplicity
    for r, k in roots.items():
        assert per_root.get(r, 0) == k, f"root {r!r} has {per_root.get(r, 0)} trees, want {k}"
    for arc, n in load.items():
        assert n <= capacity.get(arc, 0), f"arc {arc} carries {n} > {capacity.get(arc, 0)} slots"
