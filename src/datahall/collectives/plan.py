"""Plan a throughput-optimal collective schedule: bound → switch removal → trees → paths.

The planning core of ForestColl (NSDI '26; brief §2): compute the optimal rate x* and the tree
slots (U, k) (:mod:`.bound`), replace switches by logical arcs (:mod:`.split`), pack k spanning
out-trees per root (:mod:`.trees`), then give every tree arc exactly one physical path, splitting
a tree object where its units of a logical arc travel different paths. The result is a
:class:`~.schedule.Schedule` whose trees load every physical arc e with at most ⌊U·b_e⌋ tree
units, i.e. whose algbw is exactly the optimum (brief §2.7).

Collectives: allgather is one broadcast phase of out-trees; reduce_scatter one reduce phase of
in-trees, grown as out-trees on the transposed graph and reversed (brief §2.6, asymmetric links
allowed); allreduce is reduce then broadcast at the smaller of the two rates; broadcast / reduce
use one root.

>>> from datahall.core.topologies import dgx_a100
>>> s = plan(dgx_a100(boxes=1))
>>> s.k, s.U, round(float(s.algbw), 3), achieved_algbw(dgx_a100(boxes=1), s) == s.algbw
(1, Fraction(7, 300), 342.857, True)
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from fractions import Fraction
from typing import Literal

import networkx as nx

from ..core.units import exact
from .bound import (
    check_request,
    fixed_k_bound,
    is_symmetric,
    optimal_bound,
    slot_capacities,
    transposed,
)
from .schedule import Phase, Schedule, Tree, TreeArc
from .split import Split, SplitError, edge_split
from .trees import Branching, PackingError, Symmetry, automorphisms, check_packing, pack_trees

__all__ = [
    "plan",
    "degrade",
    "map_paths",
    "phase_loads",
    "achieved_algbw",
    "check_schedule",
    "forest",
]

Path = tuple[Hashable, ...]
Symmetric = bool | Literal["auto"]

PHASES = {
    "allgather": ("broadcast",),
    "broadcast": ("broadcast",),
    "reduce_scatter": ("reduce",),
    "reduce": ("reduce",),
    "allreduce": ("reduce", "broadcast"),
}


def map_paths(
    trees: Sequence[Branching], split: Split
) -> list[tuple[Hashable, int, tuple[tuple[Hashable, Hashable, Path], ...]]]:
    """Give every arc of every tree object one physical path (brief §2.6).

    A logical arc's slots may come from several physical paths (``split.paths``); a tree object
    whose C units of that arc straddle two paths is split into two objects, so every returned
    (root, multiplicity, arcs) has one path per arc, multiplicities per root still sum to k, and
    each path's units are used at most as often as the split made them.
    """
    pools: dict = {
        arc: [[p, n] for p, n in sorted(paths.items(), key=lambda pn: (len(pn[0]), pn[0]))]
        for arc, paths in split.paths.items()
    }
    out = []
    for tree in trees:
        pieces: list[list] = [[tree.multiplicity, []]]
        for x, y in tree.arcs:
            pool = pools.get((x, y))
            if pool is None:
                raise ValueError(f"tree from {tree.root!r} uses {x!r}->{y!r}, not a logical arc")
            grown = []
            for C, arcs in pieces:
                fit = next((e for e in pool if e[1] >= C), None)
                if fit is not None:  # best case: one path carries all C units
                    fit[1] -= C
                    arcs.append((x, y, fit[0]))
                    grown.append([C, arcs])
                    continue
                need = C
                for e in pool:
                    if e[1] == 0:
                        continue
                    take = min(e[1], need)
                    e[1] -= take
                    need -= take
                    grown.append([take, [*arcs, (x, y, e[0])]])
                    if need == 0:
                        break
                if need:
                    raise ValueError(f"logical arc {x!r}->{y!r} is over-subscribed by the trees")
            pieces = grown
        out.extend((tree.root, C, tuple(arcs)) for C, arcs in pieces)
    return out


PLAIN_LIMIT = 128  # compute nodes beyond which the plain algorithm takes hours


def _guard_plain(H: nx.DiGraph, symmetric: Symmetric, meta: dict) -> None:
    """Refuse to fall back silently to the plain algorithm on a large fabric."""
    n = sum(1 for _, kind in H.nodes(data="kind") if kind == "gpu")
    if symmetric is not False and n > PLAIN_LIMIT:
        why = meta["symmetry"]["fallback"] or "no symmetry was found"
        raise ValueError(
            f"{H.graph.get('name', 'topology')}: {n} GPUs need the symmetric planner, but {why}; "
            "the plain algorithm would take hours here (pass symmetric=False to run it anyway)"
        )


def forest(
    H: nx.DiGraph,
    U: Fraction,
    k: int,
    roots: Sequence[Hashable] | None = None,
    *,
    symmetric: Symmetric = "auto",
    spread: bool = True,
) -> tuple[list[tuple[Hashable, int, tuple]], dict]:
    """Out-trees of `H` with physical paths: k per root (all compute nodes, or `roots`).

    edge_split → pack_trees → map_paths, with the symmetric variant when `symmetric` allows it
    and a group is found (only for all-compute-node roots), falling back to the plain algorithm
    if the symmetric one gets stuck. Returns the path-mapped tree objects and a meta dict.
    """
    meta: dict = {}
    sym: Symmetry | None = None
    if symmetric and roots is None:
        sym = automorphisms(H)
        if sym is None and symmetric is True:
            raise ValueError(
                f"{H.graph.get('name', 'topology')}: no symmetry found (it is derived from the "
                "generator of box/rail fabrics); plan with symmetric=False or 'auto'"
            )
    meta["symmetry"] = {
        "group_order": sym.order if sym else 1,
        "generators": list(sym.names) if sym else [],
        "used_for_split": False,
        "used_for_trees": False,
        "fallback": None,
    }
    t = time.perf_counter()
    split = None
    if sym is not None:
        try:
            split = edge_split(H, U, k, roots=roots, symmetry=sym, spread=spread)
            meta["symmetry"]["used_for_split"] = True
        except SplitError as e:
            meta["symmetry"]["fallback"] = f"split: {e}"
    if split is None:
        _guard_plain(H, symmetric, meta)
        split = edge_split(H, U, k, roots=roots, spread=spread)
    meta["split_s"] = time.perf_counter() - t
    t = time.perf_counter()
    trees = None
    if sym is not None and meta["symmetry"]["used_for_split"]:
        try:
            trees = pack_trees(split.capacity, split.compute_nodes, split.roots, symmetry=sym)
            check_packing(trees, split.capacity, split.compute_nodes, split.roots)
            meta["symmetry"]["used_for_trees"] = True
        except (PackingError, AssertionError) as e:
            meta["symmetry"]["fallback"] = f"trees: {e}"
            trees = None
    if trees is None:
        _guard_plain(H, symmetric, meta)
        trees = pack_trees(split.capacity, split.compute_nodes, split.roots)
        check_packing(trees, split.capacity, split.compute_nodes, split.roots)
    meta["trees_s"] = time.perf_counter() - t
    t = time.perf_counter()
    mapped = map_paths(trees, split)
    meta["map_s"] = time.perf_counter() - t
    meta["logical_arcs"] = len(split.capacity)
    meta["tree_objects_logical"] = len(trees)
    meta["split"] = split.meta
    return mapped, meta


def _tree_height(arcs: Sequence[tuple]) -> int:
    depth: dict = {}
    for a in arcs:
        depth[a[1]] = depth.get(a[0], 0) + 1
    return max(depth.values(), default=0)


def phase_loads(phase: Phase) -> Counter:
    """Tree units on every physical arc in one phase: Σ multiplicity over tree arcs whose path
    uses the arc (a unit carries 1/k of a root's share of the phase's bytes)."""
    load: Counter = Counter()
    for tree in phase.trees:
        for a in tree.arcs:
            for e in zip(a.path, a.path[1:], strict=False):
                load[e] += tree.multiplicity
    return load


def achieved_algbw(G: nx.DiGraph, schedule: Schedule) -> Fraction:
    """The algbw the schedule's trees reach on `G` under the pipelined bandwidth model, exactly.

    A phase with R roots moving M bytes takes U_p·M/(R·k) with U_p = max_e load_e/b_e, so
    algbw = R·k / Σ_p U_p (brief §2.7 invariant 3: equals N·x* for an optimal plan).
    """
    total = Fraction(0)
    R = 1
    for phase in schedule.phases:
        load = phase_loads(phase)
        U_p = max(
            (Fraction(n) / exact(G[u][v]["capacity"]) for (u, v), n in load.items()),
            default=Fraction(0),
        )
        total += U_p
        R = len(phase.roots())
    if total == 0:
        raise ValueError("the schedule moves no data")
    return Fraction(R * schedule.k) / total


def _check_loads(G: nx.DiGraph, phase: Phase, U: Fraction) -> Fraction:
    """Max load/b over G's arcs; raise AssertionError if a load exceeds its slots ⌊U·b⌋."""
    slots = slot_capacities(G, U)
    worst = Fraction(0)
    for (u, v), n in phase_loads(phase).items():
        if not G.has_edge(u, v):
            raise AssertionError(f"path arc {u!r}->{v!r} is not in the topology")
        assert n <= slots.get((u, v), 0), f"arc {u!r}->{v!r} carries {n} > {slots.get((u, v), 0)}"
        worst = max(worst, Fraction(n) / exact(G[u][v]["capacity"]))
    return worst


def plan(
    G: nx.DiGraph,
    collective: str = "allgather",
    *,
    fixed_k: int | None = None,
    root: str | None = None,
    symmetric: Symmetric = "auto",
    spread: bool = True,
) -> Schedule:
    """Plan the throughput-optimal tree schedule of `collective` on fabric `G` (ForestColl).

    bound (:func:`~.bound.optimal_bound`, or :func:`~.bound.fixed_k_bound` with `fixed_k`, e.g.
    1 for MSCCL XML) → switch removal (:func:`~.split.edge_split`) → tree packing
    (:func:`~.trees.pack_trees`) → one physical path per tree arc (:func:`map_paths`). Every
    phase is checked: each physical arc carries at most ⌊U·b_e⌋ tree units, so the schedule's
    algbw equals the bound. ``symmetric="auto"`` grows trees for one root per orbit of the
    fabric's automorphisms when they are known (generator-built clusters) — what makes 256 GPUs
    tractable — and falls back to the plain algorithm otherwise (refused beyond 128 GPUs, where
    it takes hours, unless ``symmetric=False``); True requires symmetry.

    `meta` of the result holds the bottleneck cut, timings in seconds, symmetry use, logical
    arc and tree counts, the height of the tallest tree and, with `fixed_k`, the optimum it gives
    up. Errors: unknown collective, missing/extra root → ValueError; unusable fabric (disconnected,
    no compute nodes, bad capacities, unbalanced switch) → TopologyError.
    """
    t0 = time.perf_counter()
    Vc = check_request(G, collective, root)
    opt = optimal_bound(G, collective, root)
    bound = opt if fixed_k is None else fixed_k_bound(G, fixed_k, collective, root)
    t_bound = time.perf_counter() - t0
    U, k = bound.U, bound.k
    roots = None if collective not in ("broadcast", "reduce") else [root]
    sym_G = is_symmetric(G)
    built: dict[bool, tuple] = {}  # transposed? -> (mapped trees, meta)
    phases = []
    metas = {}
    for kind in PHASES[collective]:
        trans = kind == "reduce" and not sym_G
        if trans not in built:
            H = transposed(G) if trans else G
            built[trans] = forest(H, U, k, roots, symmetric=symmetric, spread=spread)
        mapped, m = built[trans]
        metas[kind] = m
        per_root: Counter = Counter()
        trees = []
        for r, C, arcs in mapped:
            if kind == "broadcast":
                tarcs = tuple(TreeArc(p, c, tuple(path)) for p, c, path in arcs)
            else:  # in-tree: data flows child → parent along the reversed path
                tarcs = tuple(TreeArc(p, c, tuple(reversed(path))) for p, c, path in arcs)
            trees.append(Tree(r, per_root[r], C, tarcs))
            per_root[r] += 1
        phase = Phase(kind, tuple(trees))
        _check_loads(G, phase, U)
        phases.append(phase)
    total = time.perf_counter() - t0
    heights = [_tree_height([(a.parent, a.child) for a in t.arcs]) for p in phases for t in p.trees]
    first = next(iter(metas.values()))
    meta = {
        "bottleneck_cut": sorted(map(str, bound.cut)),
        "cut_in_transposed_graph": bound.transposed,
        "x_star": str(bound.x_star),
        "algbw_GBps": float(bound.algbw),
        "optimal_x_star": str(opt.x_star),
        "optimal_algbw_GBps": float(opt.algbw),
        "fixed_k": fixed_k,
        "fixed_k_loss": None if fixed_k is None else float(1 - bound.algbw / opt.algbw),
        "timings_s": {
            "bound": t_bound,
            "split": sum(m["split_s"] for m in {id(m): m for m in metas.values()}.values()),
            "trees": sum(m["trees_s"] for m in {id(m): m for m in metas.values()}.values()),
            "map": sum(m["map_s"] for m in {id(m): m for m in metas.values()}.values()),
            "total": total,
        },
        "symmetry": first["symmetry"],
        "logical_arcs": first["logical_arcs"],
        "tree_objects": sum(len(p.trees) for p in phases),
        "max_height": max(heights, default=0),
        "phases": {
            kind: {"symmetry": m["symmetry"], "split": m["split"]} for kind, m in metas.items()
        },
    }
    if collective == "allreduce" and not sym_G:
        # both phases share (U, k) at the slower rate; each at its own optimum would give this
        x_ag = optimal_bound(G, "allgather").x_star
        x_rs = optimal_bound(G, "reduce_scatter").x_star
        meta["allreduce_separate_rates_GBps"] = float(len(Vc) / (1 / x_ag + 1 / x_rs))
    return Schedule(
        collective=collective,
        topology=str(G.graph.get("name", "topology")),
        compute_nodes=tuple(Vc),
        k=k,
        U=U,
        x_star=bound.x_star,
        phases=tuple(phases),
        meta=meta,
    )


def check_schedule(G: nx.DiGraph, schedule: Schedule) -> None:
    """Raise AssertionError unless `schedule` is a valid plan on `G` (brief §2.7):

    every tree spans the compute nodes as an arborescence (N−1 arcs, one parent each, parents
    listed first; one node for broadcast/reduce roots); multiplicities sum to k per root and
    phase; every arc's path runs through G in the data's direction (parent → child in a
    broadcast phase, child → parent in a reduce phase) with only switches inside; and every
    physical arc carries at most ⌊U·b_e⌋ tree units.
    """
    Vc = set(schedule.compute_nodes)
    N = len(Vc)
    for phase in schedule.phases:
        per_root: Counter = Counter()
        for tree in phase.trees:
            assert tree.multiplicity > 0
            assert len(tree.arcs) == N - 1, f"tree {tree.root}/{tree.index}: {len(tree.arcs)} arcs"
            seen = {tree.root}
            for a in tree.arcs:
                assert a.parent in seen and a.child not in seen, f"not an arborescence at {a}"
                seen.add(a.child)
                src, dst = (a.parent, a.child) if phase.kind == "broadcast" else (a.child, a.parent)
                assert a.path[0] == src and a.path[-1] == dst, f"path {a.path} is not {src}→{dst}"
                assert all(n not in Vc for n in a.path[1:-1]), f"path {a.path} crosses a GPU"
                for e in zip(a.path, a.path[1:], strict=False):
                    assert G.has_edge(*e), f"path {a.path} uses {e}, not an arc of the topology"
            assert seen == Vc, f"tree {tree.root}/{tree.index} misses {sorted(Vc - seen)}"
            per_root[tree.root] += tree.multiplicity
        assert set(per_root.values()) == {schedule.k}, f"trees per root {dict(per_root)} != k"
        _check_loads(G, phase, schedule.U)


def degrade(G: nx.DiGraph, failed_links: Iterable[tuple[str, str] | str]) -> nx.DiGraph:
    """A copy of `G` without the given links (both arcs), for re-planning after failures.

    Each failed link is a pair (a, b) or the string ``"a,b"`` (the CLI's ``--fail-link a,b``).
    Raises ValueError naming an unknown node or a pair with no link between them. The copy is
    named ``<name>-degraded`` and lists its ``failed_links``; plan() then finds whether the
    remaining fabric still connects every GPU (TopologyError if not).

    >>> from datahall.core.topologies import ring
    >>> H = degrade(ring(4), ["gpu0,gpu1"])
    >>> H.number_of_edges(), H.has_edge("gpu1", "gpu0")
    (6, False)
    """
    H = G.copy()
    name = G.graph.get("name", "topology")
    failed = []
    for link in failed_links:
        if isinstance(link, str):
            parts = [p.strip() for p in link.split(",")]
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"failed link {link!r}: write it as A,B (two node names)")
            a, b = parts
        else:
            a, b = link
        for n in (a, b):
            if n not in H:
                example = ", ".join(map(str, list(H.nodes)[:3]))
                raise ValueError(
                    f"failed link {a},{b}: {name} has no node {n!r} (nodes look like {example})"
                )
        if not (H.has_edge(a, b) or H.has_edge(b, a)):
            raise ValueError(f"failed link {a},{b}: {name} has no link between {a!r} and {b!r}")
        for u, v in ((a, b), (b, a)):
            if H.has_edge(u, v):
                H.remove_edge(u, v)
        failed.append((a, b))
    H.graph["name"] = f"{name}-degraded"
    H.graph["failed_links"] = [*G.graph.get("failed_links", []), *failed]
    return H
