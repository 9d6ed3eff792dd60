"""Baseline collective schedules on the same topology and data model as ForestColl's.

Each baseline returns a :class:`~datahall.collectives.schedule.Schedule` whose tree arcs follow
real physical arcs of the topology, so the evaluator and the simulator measure them exactly as
they measure ForestColl's schedules. ``x_star`` and ``U`` of a baseline schedule describe the
rate the baseline itself reaches (its :func:`~datahall.collectives.evaluate.asymptotic_algbw`),
so ``schedule.algbw`` is the baseline's large-message algbw, not the topology's optimum.

- :func:`nccl_ring`: NCCL's ring algorithm. The ring visits the GPUs box by box; it leaves a box
  through one NIC and enters the next box through the NIC of the same index (the same rail), so
  with R rings every NIC of a box carries one ring each way and each ring carries 1/R of the data.
  Allgather and broadcast push chains along the ring, reduce_scatter and reduce pull chains along
  it, allreduce does both (brief §4: AG algbw = N·R·b/(N−1)).
- :func:`nccl_double_binary_tree`: NCCL's tree allreduce. Two complementary binary trees over the
  boxes (the second is the first with box labels shifted by one, so a box that is a leaf in one
  is interior in the other), a chain of GPUs inside each box, each tree carrying half of the
  buffer; `channels` copies use different NICs (heads).
- :func:`one_shot`: every root sends its data straight to every other compute node along a
  fastest physical path (reduce: every node straight to the root).
- :func:`blink`: Blink (Wang et al., MLSys '20, arXiv 1910.04940) style spanning-tree packing by
  multiplicative weights: repeatedly take a minimum-weight spanning arborescence under arc
  weights exp(ε·load_e/b_e), raise the weights of the arcs it used, and weight each tree by how
  often it was picked. Blink packs trees over direct links; on fabrics with switches we route
  each logical GPU→GPU arc over a fastest physical path whose inner nodes are switches.

Paths: a GPU-to-GPU hop takes a fastest physical path (least Σ 1/b_e, store-and-forward time
per byte), GPUs relaying where no switch path exists; among equally fast paths the least loaded
is chosen. Inside a box, rings and chains follow the box's own links (any order on an NVSwitch,
a Hamiltonian path over xGMI on MI250).

What is ours (reconstruction, not NCCL's or Blink's code): the rail pairing of the rings, the
in-order/shifted construction and channel heads of the double binary tree, the path choice, and
Blink's generalisation to all-root collectives and switched fabrics (Blink's paper packs one
root's trees over NVLink; it also prunes trees with an ILP, which we do not). The minimum
arborescence is our Chu–Liu/Edmonds implementation.

>>> from datahall.core.topologies import dgx_a100
>>> G = dgx_a100(boxes=2)
>>> s = nccl_ring(G, "allgather")
>>> s.k, float(s.algbw)            # 8 rings, N·R·b/(N−1) = 16·8·25/15
(8, 213.33333333333334)
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Hashable, Sequence
from fractions import Fraction
from itertools import pairwise

import networkx as nx
import numpy as np
from scipy.sparse import csr_matrix

from ..core.topology import COMPUTE_KINDS, compute_nodes
from .evaluate import asymptotic_algbw
from .schedule import COLLECTIVES, Phase, Schedule, Tree, TreeArc

__all__ = [
    "BASELINES",
    "baseline",
    "nccl_ring",
    "nccl_double_binary_tree",
    "one_shot",
    "blink",
]

Path = tuple[str, ...]
Arc = tuple[str, str]


# --------------------------------------------------------------------------- paths


class _Paths:
    """Fastest physical paths between compute nodes, chosen to spread load.

    A path's cost is its store-and-forward time per byte, Σ_e 1/b_e. With ``relay=True`` other
    GPUs may forward (needed on rings and tori, and between rails); with ``relay=False`` only
    switches and NICs may be inner nodes (Blink's logical links). Among equally fast paths,
    :meth:`pick` takes the one that keeps the most loaded arc lowest (load/capacity), then the
    total lowest, and records its load.
    """

    def __init__(self, G: nx.DiGraph, limit: int = 32) -> None:
        self.G = G
        self.limit = limit
        self.compute = {n for n, k in G.nodes(data="kind") if k in COMPUTE_KINDS}
        self.cap = {(u, v): float(c) for u, v, c in G.edges(data="capacity")}
        self.load: dict[Arc, float] = defaultdict(float)
        self._trees: dict[tuple[str, bool], tuple[dict, dict]] = {}

    def _search(self, u: str, relay: bool) -> tuple[dict[str, float], dict[str, list[str]]]:
        """Dijkstra from u on 1/b_e, keeping every predecessor on a fastest path."""
        key = (u, relay)
        if key not in self._trees:
            dist: dict[str, float] = {u: 0.0}
            preds: dict[str, list[str]] = defaultdict(list)
            done: set[str] = set()
            heap = [(0.0, 0, u)]
            seq = itertools.count(1)
            while heap:
                d, _, x = heapq.heappop(heap)
                if x in done:
                    continue
                done.add(x)
                if x != u and x in self.compute and not relay:
                    continue
                for y in self.G.successors(x):
                    nd = d + 1.0 / self.cap[x, y]
                    old = dist.get(y)
                    if old is None or nd < old * (1 - 1e-9):
                        dist[y] = nd
                        preds[y] = [x]
                        heapq.heappush(heap, (nd, next(seq), y))
                    elif nd <= old * (1 + 1e-9):
                        preds[y].append(x)
            self._trees[key] = (dist, preds)
        return self._trees[key]

    def candidates(self, u: str, v: str, relay: bool = True) -> list[Path]:
        """Up to `limit` fastest u→v paths (inner nodes switches only unless `relay`)."""
        dist, preds = self._search(u, relay)
        if v not in dist:
            return []
        out: list[Path] = []
        stack: list[tuple[str, Path]] = [(v, (v,))]
        while stack and len(out) < self.limit:
            x, tail = stack.pop()
            if x == u:
                out.append(tail)
                continue
            for p in reversed(preds[x]):
                if p not in tail:
                    stack.append((p, (p, *tail)))
        return out

    def pick(self, u: str, v: str, amount: float = 1.0) -> Path:
        """The least-loaded fastest u→v path; its arcs' load grows by `amount`."""
        cands = self.candidates(u, v)
        if not cands:
            name = self.G.graph.get("name", "topology")
            raise ValueError(f"{name}: no path from {u} to {v}; the topology is not connected")

        def score(path: Path) -> tuple[float, float]:
            ratios = [(self.load[e] + amount) / self.cap[e] for e in pairwise(path)]
            return max(ratios), sum(ratios)

        best = min(cands, key=score)
        for e in pairwise(best):
            self.load[e] += amount
        return best


def _boxes(G: nx.DiGraph, gpus: Sequence[str]) -> list[list[str]]:
    """Compute nodes grouped by their ``box`` attribute (first-seen order), each box ordered by
    ``rail`` (then insertion order). Nodes without a box form one box."""
    groups: dict[Hashable, list[str]] = {}
    for g in gpus:
        groups.setdefault(G.nodes[g].get("box", 0), []).append(g)
    order = {g: i for i, g in enumerate(gpus)}
    return [
        sorted(members, key=lambda g: (G.nodes[g].get("rail", 0), order[g]))
        for members in groups.values()
    ]


def _box_adjacency(G: nx.DiGraph, box: list[str]) -> dict[str, set[str]]:
    """Which GPUs of a box reach each other directly or through the box's own switches (an
    NVSwitch, not the IB fabric): the links a ring or chain inside the box should follow."""
    label = G.nodes[box[0]].get("box", 0)
    members = set(box)
    inner = {
        n
        for n, d in G.nodes(data=True)
        if d.get("kind") not in COMPUTE_KINDS and d.get("box", 0) == label
    }
    adj: dict[str, set[str]] = {}
    for x in box:
        seen, queue, reach = {x}, deque([x]), set()
        while queue:
            y = queue.popleft()
            for z in G.successors(y):
                if z in seen:
                    continue
                seen.add(z)
                if z in members:
                    reach.add(z)
                elif z in inner:
                    queue.append(z)
        adj[x] = reach
    return adj


def _hamiltonian(
    box: list[str],
    adj: dict[str, set[str]],
    start: str,
    end: str | None = None,
    close: bool = False,
    step: int = 1,
    budget: int = 20_000,
) -> list[str] | None:
    """A path through every GPU of `box` over `adj`, from `start` (to `end`, or back next to
    `start` when `close`), by depth-first search preferring the neighbour with the fewest
    onward options (Warnsdorff), then the next index in direction `step`. None if the search
    budget runs out first. On an all-to-all box (NVSwitch) it returns the index order."""
    n = len(box)
    index = {g: i for i, g in enumerate(box)}
    path, used = [start], {start}
    options = [None]
    steps = 0

    def choices(x: str) -> list[str]:
        cands = [y for y in adj[x] if y not in used and (y != end or len(path) == n - 1)]
        return sorted(
            cands,
            key=lambda y: (
                sum(1 for z in adj[y] if z not in used),
                (step * (index[y] - index[x])) % n,
            ),
        )

    options[0] = iter(choices(start))
    while path:
        if len(path) == n:
            last = path[-1]
            if (end is None or last == end) and (not close or start in adj[last]):
                return path
        steps += 1
        if steps > budget:
            return None
        nxt = next(options[-1], None) if len(path) < n else None
        if nxt is None:
            used.discard(path.pop())
            options.pop()
            continue
        path.append(nxt)
        used.add(nxt)
        options.append(iter(choices(nxt)))
    return None


# --------------------------------------------------------------------------- schedules


def _check_collective(collective: str, allowed: Sequence[str] = COLLECTIVES) -> None:
    if collective not in allowed:
        raise ValueError(
            f"unknown or unsupported collective {collective!r}; use one of {', '.join(allowed)}"
        )


def _roots(gpus: list[str], collective: str, root: str | None) -> list[str]:
    if collective in ("broadcast", "reduce"):
        root = gpus[0] if root is None else root
        if root not in gpus:
            raise ValueError(
                f"root {root!r} is not a compute node; pick one of {', '.join(gpus[:4])}, ..."
            )
        return [root]
    if root is not None:
        raise ValueError(f"{collective} has every compute node as a root; drop root={root!r}")
    return gpus


def _finish(
    G: nx.DiGraph,
    collective: str,
    gpus: list[str],
    k: int,
    phases: list[Phase],
    meta: dict,
) -> Schedule:
    """Build the Schedule and set x_star and U to the rate the schedule itself reaches."""
    s = Schedule(
        collective=collective,  # type: ignore[arg-type]
        topology=G.graph.get("name", "topology"),
        compute_nodes=tuple(gpus),
        k=k,
        U=Fraction(k),
        x_star=Fraction(1),
        phases=tuple(phases),
        meta=meta,
    )
    algbw = asymptotic_algbw(s, G)
    N = len(gpus)
    if collective in ("broadcast", "reduce"):
        x = algbw
    elif collective == "allreduce":
        x = 2 * algbw / N
    else:
        x = algbw / N
    return dataclasses.replace(s, x_star=x, U=Fraction(k) / x)


def _phases_for(collective: str, down: list[Tree], up: list[Tree]) -> list[Phase]:
    if collective in ("allgather", "broadcast"):
        return [Phase("broadcast", tuple(down))]
    if collective in ("reduce_scatter", "reduce"):
        return [Phase("reduce", tuple(up))]
    return [Phase("reduce", tuple(up)), Phase("broadcast", tuple(down))]


def _chain_down(root: str, order: list[str], index: int, path: Callable[[str, str], Path]) -> Tree:
    """Out-tree chain root → order[1] → ... (data flows parent → child)."""
    arcs = tuple(TreeArc(a, b, path(a, b)) for a, b in pairwise(order))
    return Tree(root, index, 1, arcs)


def _chain_up(root: str, order: list[str], index: int, path: Callable[[str, str], Path]) -> Tree:
    """In-tree chain order[0] → order[1] → ... → root (data flows child → parent, order[-1] is
    the root); arcs listed from the root down."""
    pairs = list(pairwise(order))[::-1]
    arcs = tuple(TreeArc(b, a, path(a, b)) for a, b in pairs)
    return Tree(root, index, 1, arcs)


# --------------------------------------------------------------------------- NCCL ring


def _ring_orders(G: nx.DiGraph, boxes: list[list[str]], rings: int) -> list[list[str]]:
    """The node order of each ring (cyclic).

    Several boxes: ring r enters box a at local index (r + s_a) mod n_a and leaves it from local
    index (r + s_{a+1}) mod n_a, i.e. on the NIC rail it enters the next box on; s alternates
    0, 1, 0, 1, ... (ending in 2 for an odd count of boxes) so that entry and exit differ.
    Inside a box the ring follows the box's own links (a Hamiltonian path from entry to exit;
    any order on an NVSwitch). One box: ring r is a Hamiltonian cycle from GPU r, odd rings
    running the other way. Where no such path is found, index order is used.
    """
    B = len(boxes)
    adj = [_box_adjacency(G, box) for box in boxes]
    out = []
    if B == 1:
        box = boxes[0]
        n = len(box)
        for r in range(rings):
            step = 1 if r % 2 == 0 else -1
            start = box[r % n]
            order = _hamiltonian(box, adj[0], start, close=True, step=step)
            out.append(order or [box[(r % n + step * i) % n] for i in range(n)])
        return out
    shift = [a % 2 for a in range(B)]
    if B % 2 == 1:
        shift[-1] = 2
    for r in range(rings):
        order: list[str] = []
        for a, box in enumerate(boxes):
            n = len(box)
            p = (r + shift[a]) % n
            q = (r + shift[(a + 1) % B]) % n
            if p == q:
                order += [box[p]]
                continue
            inside = _hamiltonian(box, adj[a], box[p], end=box[q])
            if inside is None:
                middle = [box[(p + i) % n] for i in range(1, n) if (p + i) % n != q]
                inside = [box[p], *middle, box[q]]
            order += inside
        out.append(order)
    return out


def nccl_ring(
    G: nx.DiGraph,
    collective: str = "allgather",
    *,
    rings: int | None = None,
    root: str | None = None,
) -> Schedule:
    """NCCL's ring algorithm as a Schedule: R rings, each carrying 1/R of the data.

    `rings` defaults to the GPUs per box on multi-box fabrics (one ring per NIC rail) and 1 on
    a single box. For a root u, ring r gives the chain u → next → ... (allgather, broadcast) or
    the chain next(u) → ... → u (reduce_scatter, reduce); allreduce is reduce_scatter then
    allgather on the same chains. `root` is for broadcast/reduce (default: the first GPU).

    >>> from datahall.core.topologies import ring
    >>> s = nccl_ring(ring(4, capacity=50), "allreduce", rings=1)
    >>> [p.kind for p in s.phases], float(s.algbw)      # N·b/(2(N−1)) = 4·50/6
    (['reduce', 'broadcast'], 33.333333333333336)
    """
    _check_collective(collective)
    gpus = compute_nodes(G)
    boxes = _boxes(G, gpus)
    R = rings if rings is not None else (min(map(len, boxes)) if len(boxes) > 1 else 1)
    if R < 1:
        raise ValueError(f"rings must be >= 1, got {R}")
    roots = _roots(gpus, collective, root)
    finder = _Paths(G)
    down: list[Tree] = []
    up: list[Tree] = []
    orders = _ring_orders(G, boxes, R)
    for r, order in enumerate(orders):
        hop = {a: b for a, b in zip(order, order[1:] + order[:1], strict=True)}
        paths = {(a, b): finder.pick(a, b) for a, b in hop.items()}
        pos = {g: i for i, g in enumerate(order)}
        for u in roots:
            rot = order[pos[u] :] + order[: pos[u]]  # u, next(u), ..., prev(u)
            down.append(_chain_down(u, rot, r, lambda a, b, paths=paths: paths[a, b]))
            up.append(_chain_up(u, rot[1:] + [u], r, lambda a, b, paths=paths: paths[a, b]))
    meta = {"baseline": "nccl-ring", "rings": R, "orders": orders}
    return _finish(G, collective, gpus, R, _phases_for(collective, down, up), meta)


# --------------------------------------------------------------------------- NCCL tree


def _binary_tree(n: int) -> dict[int, int | None]:
    """Parent of each of 0..n−1 in an in-order binary tree (the layout of NCCL's trees):
    position i = label + 1 sits at height log2(lowest set bit of i), so the odd positions are
    the leaves; positions past n are skipped over."""
    if n == 1:
        return {0: None}
    K = n.bit_length()  # 2**(K-1) <= n < 2**K

    def up(i: int) -> int:
        h = i & -i
        return i + h if (i & (2 * h)) == 0 else i - h

    parents: dict[int, int | None] = {}
    top = 1 << (K - 1)
    for i in range(1, n + 1):
        if i == top:
            parents[i - 1] = None
            continue
        p = up(i)
        while p > n:
            p = up(p)
        parents[i - 1] = p - 1
    return parents


def nccl_double_binary_tree(
    G: nx.DiGraph, collective: str = "allreduce", *, channels: int | None = None
) -> Schedule:
    """NCCL's double binary tree allreduce as a Schedule (reduce then broadcast).

    Over the B boxes, tree 0 is an in-order binary tree and tree 1 the same tree with box labels
    shifted by one; each carries half of the buffer. Inside a box the GPUs form a chain from a
    head GPU, and boxes meet head to head over the NIC of the head's rail. `channels` (default:
    GPUs per box on multi-box fabrics, else 1) repeats this with head GPU c of every box for
    channel c, splitting the buffer further. On a single box the two trees are chains from the
    same head running in opposite directions.

    >>> from datahall.core.topologies import dgx_a100
    >>> s = nccl_double_binary_tree(dgx_a100(boxes=2))
    >>> len(s.phases[0].trees), s.phases[0].trees[0].height()
    (16, 8)
    """
    _check_collective(collective, ("allreduce",))
    gpus = compute_nodes(G)
    boxes = _boxes(G, gpus)
    B = len(boxes)
    C = channels if channels is not None else (min(map(len, boxes)) if B > 1 else 1)
    if C < 1:
        raise ValueError(f"channels must be >= 1, got {C}")
    tree0 = _binary_tree(B)
    shifted = {(b + 1) % B: (None if p is None else (p + 1) % B) for b, p in tree0.items()}
    finder = _Paths(G)
    adj = [_box_adjacency(G, box) for box in boxes]
    down: list[Tree] = []
    up: list[Tree] = []
    indices: Counter[str] = Counter()
    for c in range(C):
        for t, parents in enumerate((tree0, shifted)):
            children: dict[int, list[int]] = defaultdict(list)
            top = None
            for b in sorted(parents):
                p = parents[b]
                if p is None:
                    top = b
                else:
                    children[p].append(b)
            assert top is not None

            def chain(b: int, t: int = t, c: int = c) -> list[str]:
                box = boxes[b]
                n, h = len(box), c % len(box)
                step = -1 if (t == 1 and B == 1) else 1
                found = _hamiltonian(box, adj[b], box[h], step=step)
                return found or [box[(h + step * i) % n] for i in range(n)]

            pairs: list[Arc] = []
            queue = deque([top])
            while queue:
                b = queue.popleft()
                members = chain(b)
                pairs += list(pairwise(members))
                for child in children[b]:
                    pairs.append((members[0], chain(child)[0]))
                    queue.append(child)
            root = chain(top)[0]
            idx = indices[root]
            indices[root] += 1
            down.append(
                Tree(root, idx, 1, tuple(TreeArc(a, b, finder.pick(a, b)) for a, b in pairs))
            )
            up.append(Tree(root, idx, 1, tuple(TreeArc(a, b, finder.pick(b, a)) for a, b in pairs)))
    k = max(indices.values())
    meta = {"baseline": "nccl-tree", "channels": C, "box_tree": tree0, "box_tree_shifted": shifted}
    return _finish(G, collective, gpus, k, _phases_for(collective, down, up), meta)


# --------------------------------------------------------------------------- one-shot


def one_shot(G: nx.DiGraph, collective: str = "allgather", *, root: str | None = None) -> Schedule:
    """Direct one-shot: every root sends straight to every other compute node (a star of
    height 1) along a fastest physical path; a reduce sends every node's data straight to the
    root. Equally fast paths are chosen to spread load. `root` is for broadcast/reduce.

    >>> from datahall.core.topologies import dgx_a100
    >>> float(one_shot(dgx_a100(boxes=1)).algbw)        # = the optimum 8·300/7 in one box
    342.85714285714283
    """
    _check_collective(collective)
    gpus = compute_nodes(G)
    roots = _roots(gpus, collective, root)
    finder = _Paths(G)
    down: list[Tree] = []
    up: list[Tree] = []
    for u in roots:
        i = gpus.index(u)
        others = gpus[i + 1 :] + gpus[:i]  # rotated, so that roots do not all hit one GPU first
        if collective != "reduce_scatter" and collective != "reduce":
            down.append(Tree(u, 0, 1, tuple(TreeArc(u, v, finder.pick(u, v)) for v in others)))
        if collective not in ("allgather", "broadcast"):
            up.append(Tree(u, 0, 1, tuple(TreeArc(u, v, finder.pick(v, u)) for v in others)))
    meta = {"baseline": "one-shot"}
    return _finish(G, collective, gpus, 1, _phases_for(collective, down, up), meta)


# --------------------------------------------------------------------------- Blink


def _edmonds(nodes: list[Hashable], root: Hashable, w: dict[tuple, float], fresh) -> dict | None:
    """Chu–Liu/Edmonds on arcs `w` (no arcs into the root, no loops): each non-root node's
    entering arc key, or None when some node cannot be reached. Every cycle of the cheapest
    entering arcs is contracted at once, so few levels of recursion are needed."""
    best: dict[Hashable, tuple] = {}
    for key, x in w.items():
        b = best.get(key[1])
        if b is None or x < w[b]:
            best[key[1]] = key
    if len(best) < len(nodes) - 1:
        return None
    mark: dict[Hashable, Hashable] = {}
    cycles = []
    for start in nodes:
        x, walk = start, []
        while x != root and x not in mark:
            mark[x] = start
            walk.append(x)
            x = best[x][0]
        if x != root and mark[x] == start:
            cycles.append(walk[walk.index(x) :])
    if not cycles:
        return best
    group: dict[Hashable, Hashable] = {}
    for cycle in cycles:
        c = ("cycle", next(fresh))
        for v in cycle:
            group[v] = c
    w2: dict[tuple, float] = {}
    origin: dict[tuple, tuple] = {}
    for (u, v), x in w.items():
        gu, gv = group.get(u, u), group.get(v, v)
        if gu == gv:
            continue
        if v in group:
            x -= w[best[v]]
        key = (gu, gv)
        if key not in w2 or x < w2[key]:
            w2[key] = x
            origin[key] = (u, v)
    sub = _edmonds(list(dict.fromkeys(group.get(n, n) for n in nodes)), root, w2, fresh)
    if sub is None:
        return None
    out = {}
    for key in sub.values():
        u0, v0 = origin[key]
        out[v0] = (u0, v0)
    for cycle in cycles:
        for v in cycle:
            out.setdefault(v, best[v])
    return out


def _min_arborescence(
    nodes: Sequence[Hashable], root: Hashable, cost: dict[tuple, float]
) -> dict[Hashable, Hashable] | None:
    """A minimum-cost spanning arborescence rooted at `root` over arcs `cost` ((u, v) → cost):
    {child: parent}, or None if none spans `nodes` (Chu–Liu/Edmonds, O(V·E))."""
    w = {(u, v): x for (u, v), x in cost.items() if u != v and v != root}
    chosen = _edmonds(list(nodes), root, w, itertools.count())
    return None if chosen is None else {v: u for v, (u, _) in chosen.items()}


def _pack(
    G: nx.DiGraph,
    gpus: list[str],
    roots: list[str],
    rounds: int,
    eps: float,
) -> dict[str, Counter]:
    """Blink's multiplicative-weights packing on `G`: `rounds` trees per root. Returns, per
    root, a Counter of trees, each a tuple of (parent, child, path) in BFS order."""
    finder = _Paths(G, limit=8)
    pairs: list[Arc] = []
    paths: list[Path] = []
    first: list[int] = []  # index in `paths` of each pair's first candidate
    for u in gpus:
        for v in gpus:
            if u != v:
                found = finder.candidates(u, v, relay=False)
                if found:
                    pairs.append((u, v))
                    first.append(len(paths))
                    paths += found
    arcs = sorted({e for p in paths for e in pairwise(p)})
    col = {e: i for i, e in enumerate(arcs)}
    rows = [i for i, p in enumerate(paths) for _ in pairwise(p)]
    cols = [col[e] for p in paths for e in pairwise(p)]
    incidence = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(paths), len(arcs)))
    cap = np.array([float(G.edges[e]["capacity"]) for e in arcs])
    scale = eps * cap.min() / cap  # exponent per tree using the arc
    load = np.zeros(len(arcs))
    starts = np.array(first)
    index = {pair: i for i, pair in enumerate(pairs)}
    order = {g: i for i, g in enumerate(gpus)}
    trees: dict[str, Counter] = {u: Counter() for u in roots}
    for _ in range(rounds):
        for u in roots:
            x = scale * load
            length = np.exp(x - x.max()) / cap
            path_cost = incidence @ length
            cost = np.minimum.reduceat(path_cost, starts)
            parent = _min_arborescence(gpus, u, dict(zip(pairs, cost.tolist(), strict=True)))
            if parent is None:
                name = G.graph.get("name", "topology")
                raise ValueError(
                    f"{name}: Blink packs trees over direct links and switches only, and from "
                    f"{u} they do not reach every compute node; use one_shot or nccl_ring"
                )
            kids: dict[str, list[str]] = defaultdict(list)
            for v, p in parent.items():
                kids[p].append(v)
            tree, queue = [], deque([u])
            while queue:
                p = queue.popleft()
                for v in sorted(kids[p], key=order.__getitem__):
                    i = index[p, v]
                    stop = first[i + 1] if i + 1 < len(first) else len(paths)
                    path = paths[first[i] + int(np.argmin(path_cost[first[i] : stop]))]
                    tree.append((p, v, path))
                    queue.append(v)
                    for e in pairwise(path):
                        load[col[e]] += 1
            trees[u][tuple(tree)] += 1
    return trees


def _is_reversible(trees: dict[str, Counter], G: nx.DiGraph) -> bool:
    return all(
        G.has_edge(b, a)
        for counter in trees.values()
        for tree in counter
        for _, _, path in tree
        for a, b in pairwise(path)
    )


def blink(
    G: nx.DiGraph,
    collective: str = "allgather",
    *,
    root: str | None = None,
    rounds: int = 16,
    eps: float = 0.5,
) -> Schedule:
    """Blink-style spanning-tree packing (MLSys '20) by multiplicative weights.

    Each round, for each root, picks the minimum spanning arborescence over logical GPU→GPU arcs
    whose cost is Σ over the physical path of exp(ε·load_e·b_min/b_e)/b_e (load_e counts the
    trees already on arc e), routes it over the cheapest of the fastest switch-only paths, and
    adds it; after `rounds` rounds a root's trees are weighted by how often each was picked
    (k = rounds). Allgather/reduce_scatter/allreduce pack for every root (all sharing the arc
    weights: our generalisation); broadcast/reduce pack for `root` (Blink's own setting).
    Reduce phases use the trees reversed (packed on the transposed graph if some link is
    one-way).

    >>> from datahall.core.topologies import dgx_a100
    >>> s = blink(dgx_a100(boxes=1), "allgather", rounds=4)
    >>> s.k, round(float(s.algbw), 2)       # the optimum 8·300/7 on one box
    (4, 342.86)

    On switched fabrics the per-tree weight update cannot see that one tree crosses a GPU's
    switch port several times, so a single-root broadcast packs poorly there (one DGX A100 box:
    218 GB/s after 16 rounds, 274 after 64, against the 300 GB/s optimum).
    """
    _check_collective(collective)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    gpus = compute_nodes(G)
    roots = _roots(gpus, collective, root)
    need_down = collective in ("allgather", "broadcast", "allreduce")
    need_up = collective in ("reduce_scatter", "reduce", "allreduce")
    packed_down = _pack(G, gpus, roots, rounds, eps) if need_down else {}
    if need_up and need_down and _is_reversible(packed_down, G):
        packed_up = {
            u: Counter({tuple((p, v, path[::-1]) for p, v, path in t): n for t, n in c.items()})
            for u, c in packed_down.items()
        }
    elif need_up:
        T = G.reverse(copy=True)
        packed_up = {
            u: Counter({tuple((p, v, path[::-1]) for p, v, path in t): n for t, n in c.items()})
            for u, c in _pack(T, gpus, roots, rounds, eps).items()
        }
    else:
        packed_up = {}

    def trees(packed: dict[str, Counter]) -> list[Tree]:
        return [
            Tree(u, i, n, tuple(TreeArc(p, v, path) for p, v, path in t))
            for u in roots
            for i, (t, n) in enumerate(packed[u].items())
        ]

    down = trees(packed_down) if need_down else []
    up = trees(packed_up) if need_up else []
    distinct = {u: len(packed_down.get(u) or packed_up[u]) for u in roots}
    meta = {"baseline": "blink", "rounds": rounds, "eps": eps, "distinct_trees": distinct}
    return _finish(G, collective, gpus, rounds, _phases_for(collective, down, up), meta)


BASELINES: dict[str, Callable[..., Schedule]] = {
    "nccl-ring": nccl_ring,
    "nccl-tree": nccl_double_binary_tree,
    "one-shot": one_shot,
    "blink": blink,
}


def baseline(name: str, G: nx.DiGraph, collective: str, **options) -> Schedule:
    """The baseline `name` (a key of :data:`BASELINES`) for `collective` on `G`."""
    try:
        fn = BASELINES[name]
    except KeyError:
        raise ValueError(
            f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}"
        ) from None
    return fn(G, collective, **options)
