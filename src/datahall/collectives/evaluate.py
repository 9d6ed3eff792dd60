"""Analytic evaluation of a collective schedule on its topology: time, algbw and busbw.

The evaluator is ours (the ForestColl brief's §2.8 "Evaluator" is marked [reconstruction]); it
implements the pipelined α–β time model of the brief's §2.6 on the physical paths of a
:class:`~datahall.collectives.schedule.Schedule`:

- **Load.** A tree of phase p moves ``schedule.tree_bytes(p, tree, M)`` bytes over every
  physical arc of every path of its arcs; load_e is the sum over trees and phases. A tree whose
  multiplicity is C stands for C identical trees and moves C times the bytes.
- **Bandwidth term.** β = max_e load_e / b_e, per phase, summed over the phases. An allreduce's
  reduce and broadcast phases are pipelined chunk by chunk (a chunk is broadcast as soon as its
  root has reduced it), so with ``overlap=True`` (the default) they share one term,
  max_e (load_e(reduce) + load_e(broadcast)) / b_e. That equals the sum of the two phase maxima
  whenever both phases load the same arcs alike (rings, ForestColl's reversed trees on
  symmetric links) and is smaller when they use different arcs. ``overlap=False`` gives the
  plain sum over phases.
- **Pipeline fill (latency) term.** A tree's bytes travel in C equal chunks of c bytes
  (:func:`chunking`: at most 128 KiB, and at most :func:`chunk_limit` chunks per tree). A chunk is stored and forwarded at every node of a path, switches
  included, so along a root–leaf path with physical hops e the last chunk arrives after
  Σ_e (α_e + c/b_e) − c/b_min plus the bandwidth term; each tree arc may add a fixed
  ``step_latency`` (software/kernel overhead). The phase adds the largest such fill over its
  trees. This is the brief's T ≈ U·M/(N·k) + (height − 1)·chunk/b + α·height written per hop;
  for a lone chain on FIFO links it is exact. With many trees sharing the bottleneck, one
  tree's fill overlaps the others' transfers, so the model is then an upper estimate: the
  discrete-event simulator (:mod:`datahall.collectives.simulate`) lands between the bandwidth
  term and this time.

algbw is M/T (nccl-tests: M is the output size in bytes), and busbw follows nccl-tests:
allgather and reduce_scatter algbw·(N−1)/N, allreduce algbw·2(N−1)/N, broadcast and reduce
busbw = algbw. Capacities are GB/s with 1 GB/s = 10⁹ bytes/s; times are seconds.

>>> from datahall.core.topologies import ring
>>> from datahall.collectives.baselines import nccl_ring
>>> G = ring(4, capacity=50)
>>> s = nccl_ring(G, "allgather", rings=1)
>>> asymptotic_algbw(s, G)            # N·b/(N−1) = 4·50/3
Fraction(200, 3)
>>> round(evaluate(s, G, 2**30).algbw, 2)   # 2048 chunks of 128 KiB per chain
66.64
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction

import networkx as nx

from ..core.units import GB, exact, parse_bytes
from .schedule import Phase, Schedule, Tree

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_MAX_CHUNKS",
    "Evaluation",
    "evaluate",
    "asymptotic_algbw",
    "arc_loads",
    "busbw",
    "chunking",
    "chunk_limit",
    "CHUNK_BUDGET",
    "tree_share",
    "check_schedule",
]

Arc = tuple[str, str]

DEFAULT_CHUNK = 128 * 2**10
"""Default pipeline chunk: 128 KiB (NCCL's Simple protocol moves chunks of this order)."""
DEFAULT_MAX_CHUNKS = 64
"""Chunks per tree that :func:`chunking` allows when called on its own."""
CHUNK_BUDGET = 2**18
"""With ``max_chunks=None``, a schedule's trees share this many (chunk, tree arc) sends, so the
simulation's cost is bounded whatever M and the number of trees (see :func:`chunk_limit`)."""


def busbw(collective: str, algbw: float, N: int) -> float:
    """Bus bandwidth from algbw, per the nccl-tests conventions (brief §4).

    >>> busbw("allreduce", 100.0, 16)
    187.5
    """
    if collective in ("allgather", "reduce_scatter"):
        return algbw * (N - 1) / N
    if collective == "allreduce":
        return algbw * 2 * (N - 1) / N
    return algbw


def chunking(
    nbytes: float, chunk: float | None = None, max_chunks: int = DEFAULT_MAX_CHUNKS
) -> tuple[int, float]:
    """How a tree's `nbytes` are pipelined: (number of chunks, bytes per chunk).

    Equal chunks of at most `chunk` bytes (default :data:`DEFAULT_CHUNK`), but never more than
    `max_chunks` of them (then chunks grow). Zero bytes give (0, 0.0).

    >>> chunking(2**20)
    (8, 131072.0)
    >>> chunking(2**30)[0], chunking(100.0)
    (64, (1, 100.0))
    """
    if nbytes <= 0:
        return 0, 0.0
    if max_chunks < 1:
        raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
    size = DEFAULT_CHUNK if chunk is None else chunk
    if not size > 0:
        raise ValueError(f"chunk must be > 0 bytes, got {chunk!r}")
    count = max(1, min(max_chunks, math.ceil(nbytes / size - 1e-9)))
    return count, nbytes / count


def chunk_limit(schedule: Schedule, budget: int = CHUNK_BUDGET) -> int:
    """The per-tree chunk cap used when ``max_chunks=None``: `budget` divided by the number of
    tree arcs in the schedule, at least 4. On 2×DGX A100 that is 136 for 8 rings' allgather,
    68 for their allreduce and 546 for the double binary tree or ForestColl's allgather."""
    arcs = sum(len(t.arcs) for p in schedule.phases for t in p.trees)
    return max(4, budget // max(arcs, 1))


def tree_share(phase: Phase, tree: Tree) -> Fraction:
    """The exact fraction of M that `tree` moves in `phase` (as :meth:`Schedule.tree_bytes`)."""
    per_root = sum(t.multiplicity for t in phase.trees if t.root == tree.root)
    return Fraction(tree.multiplicity, len(phase.roots()) * per_root)


def _hops(path: tuple[str, ...]) -> list[Arc]:
    return list(zip(path[:-1], path[1:], strict=True))


def check_schedule(schedule: Schedule, G: nx.DiGraph) -> None:
    """Raise ValueError unless every tree arc's path runs along arcs of `G` in the data's
    direction (parent … child in a broadcast phase, child … parent in a reduce phase)."""
    name = G.graph.get("name", "topology")
    for p, phase in enumerate(schedule.phases):
        for tree in phase.trees:
            for a in tree.arcs:
                src, dst = (a.parent, a.child) if phase.kind == "broadcast" else (a.child, a.parent)
                where = f"phase {p} ({phase.kind}) tree ({tree.root}, {tree.index}) arc {a.parent} -> {a.child}"
                if len(a.path) < 2 or a.path[0] != src or a.path[-1] != dst:
                    raise ValueError(
                        f"{where}: path {a.path} must run from {src} to {dst} "
                        f"(the data's direction in a {phase.kind} phase)"
                    )
                for u, v in _hops(a.path):
                    if not G.has_edge(u, v):
                        raise ValueError(
                            f"{where}: path uses {u} -> {v}, which is not a link of {name}; "
                            "was the schedule planned for another topology?"
                        )


def _phase_groups(schedule: Schedule, overlap: bool) -> list[list[int]]:
    """Phases that run concurrently: an allreduce's reduce → broadcast pair when pipelined."""
    ph = schedule.phases
    if (
        overlap
        and len(ph) == 2
        and (ph[0].kind, ph[1].kind) == ("reduce", "broadcast")
        and set(ph[0].roots()) == set(ph[1].roots())
    ):
        return [[0, 1]]
    return [[i] for i in range(len(ph))]


def _exact_phase_loads(schedule: Schedule) -> list[dict[Arc, Fraction]]:
    out = []
    for phase in schedule.phases:
        loads: dict[Arc, Fraction] = defaultdict(Fraction)
        for tree in phase.trees:
            share = tree_share(phase, tree)
            for a in tree.arcs:
                for e in _hops(a.path):
                    loads[e] += share
        out.append(dict(loads))
    return out


def arc_loads(schedule: Schedule, M: float = 1.0, phase: int | None = None) -> dict[Arc, float]:
    """Bytes each physical arc carries when the collective moves M bytes (all phases, or the
    phase with index `phase`)."""
    per_phase = _exact_phase_loads(schedule)
    chosen = per_phase if phase is None else [per_phase[phase]]
    total: dict[Arc, float] = defaultdict(float)
    for loads in chosen:
        for e, share in loads.items():
            total[e] += float(share) * M
    return dict(total)


def asymptotic_algbw(schedule: Schedule, G: nx.DiGraph, *, overlap: bool = True) -> Fraction:
    """The exact algbw (GB/s) as M → ∞: M over the bandwidth term, latency negligible.

    For a ForestColl schedule this is N·x* (allgather, reduce_scatter) or N·x*/2 (allreduce);
    for R rings crossing a NIC of b GB/s on N GPUs it is N·R·b/(N−1).
    """
    check_schedule(schedule, G)
    per_phase = _exact_phase_loads(schedule)
    seconds_per_gb = Fraction(0)
    for group in _phase_groups(schedule, overlap):
        merged: dict[Arc, Fraction] = defaultdict(Fraction)
        for p in group:
            for e, share in per_phase[p].items():
                merged[e] += share
        seconds_per_gb += max(
            (share / exact(G.edges[e]["capacity"]) for e, share in merged.items()),
            default=Fraction(0),
        )
    if seconds_per_gb == 0:
        raise ValueError("the schedule moves no data (a single compute node?); algbw is unbounded")
    return 1 / seconds_per_gb


def _tree_fill(G: nx.DiGraph, tree: Tree, chunk_bytes: float, step_latency: float) -> float:
    """Pipeline fill of one tree: the largest Σ_hops(α_e + c/b_e) − c/b_min over its
    root–leaf paths, with `step_latency` added per tree arc."""
    if not tree.arcs or chunk_bytes <= 0:
        return 0.0
    acc = {tree.root: 0.0}
    bmin = {tree.root: math.inf}
    fill = 0.0
    for a in tree.arcs:
        cost, low = step_latency, math.inf
        for u, v in _hops(a.path):
            d = G.edges[u, v]
            b = float(d["capacity"]) * GB
            cost += float(d.get("latency", 0.0)) + chunk_bytes / b
            low = min(low, b)
        acc[a.child] = acc[a.parent] + cost
        bmin[a.child] = min(bmin[a.parent], low)
        fill = max(fill, acc[a.child] - chunk_bytes / bmin[a.child])
    return fill


@dataclass(frozen=True)
class Evaluation:
    """The analytic evaluation of a schedule at message size M (bytes); times in seconds,
    bandwidths in GB/s.

    ``time = bandwidth_time + latency_time``; `phase_times` has one entry per group of phases
    that run together (a pipelined allreduce is one group); `heights` the tallest tree per
    phase; `bottleneck` the arc with the largest load/capacity; `loads` bytes per arc.
    """

    collective: str
    N: int
    M: float
    time: float
    bandwidth_time: float
    latency_time: float
    algbw: float
    busbw: float
    bottleneck: Arc | None
    heights: tuple[int, ...]
    phase_times: tuple[float, ...]
    loads: dict[Arc, float] = field(repr=False, compare=False)


def _bytes(M: float | int | str) -> float:
    value = float(parse_bytes(M)) if isinstance(M, str) else float(M)
    if not value > 0:
        raise ValueError(f"message size must be > 0 bytes, got {M!r}")
    return value


def evaluate(
    schedule: Schedule,
    G: nx.DiGraph,
    M: float | int | str,
    *,
    chunk: float | None = None,
    max_chunks: int | None = None,
    step_latency: float = 0.0,
    overlap: bool = True,
) -> Evaluation:
    """Time, algbw and busbw of `schedule` on `G` for a collective of M bytes (a number or a
    string such as ``"1GiB"``), by the pipelined α–β model described in the module docstring.

    `chunk`/`max_chunks` set the pipelining (see :func:`chunking`; ``max_chunks=None`` is
    :func:`chunk_limit`, as in the simulator), `step_latency` is a fixed per-tree-arc overhead
    in seconds, `overlap` pipelines an allreduce's two phases.
    """
    M = _bytes(M)
    check_schedule(schedule, G)
    if max_chunks is None:
        max_chunks = chunk_limit(schedule)
    cap = {e: float(G.edges[e]["capacity"]) * GB for e in G.edges}
    per_phase = [
        {e: float(share) * M for e, share in loads.items()}
        for loads in _exact_phase_loads(schedule)
    ]
    fills, heights = [], []
    for phase in schedule.phases:
        fill = 0.0
        for tree in phase.trees:
            _, c = chunking(schedule.tree_bytes(phase, tree, M), chunk, max_chunks)
            fill = max(fill, _tree_fill(G, tree, c, step_latency))
        fills.append(fill)
        heights.append(max((t.height() for t in phase.trees if t.arcs), default=0))
    bandwidth_time, phase_times = 0.0, []
    total: dict[Arc, float] = defaultdict(float)
    for group in _phase_groups(schedule, overlap):
        merged: dict[Arc, float] = defaultdict(float)
        for p in group:
            for e, load in per_phase[p].items():
                merged[e] += load
                total[e] += load
        beta = max((load / cap[e] for e, load in merged.items()), default=0.0)
        bandwidth_time += beta
        phase_times.append(beta + sum(fills[p] for p in group))
    latency_time = sum(fills)
    time = bandwidth_time + latency_time
    algbw = M / time / GB if time > 0 else math.inf
    bottleneck = max(total, key=lambda e: total[e] / cap[e]) if total else None
    return Evaluation(
        collective=schedule.collective,
        N=schedule.N,
        M=M,
        time=time,
        bandwidth_time=bandwidth_time,
        latency_time=latency_time,
        algbw=algbw,
        busbw=busbw(schedule.collective, algbw, schedule.N),
        bottleneck=bottleneck,
        heights=tuple(heights),
        phase_times=tuple(phase_times),
        loads=dict(total),
    )
