"""MSCCL-IR XML: export a tree schedule, lint a file, explain why an algorithm was not picked.

MSCCL (github.com/microsoft/msccl, the NCCL 2.12 fork; RCCL carries the same interpreter) runs a
collective from an XML file named in ``MSCCL_XML_FILES`` (or listed by ``MSCCL_CONFIG``). The
"old format" read by ``mscclGetAlgoFromXMLAndSetAlgo`` is::

    <algo name proto nchannels nchunksperloop ngpus coll inplace outofplace minBytes maxBytes [nthreads]>
      <gpu id i_chunks o_chunks s_chunks>
        <tb id send recv chan>
          <step s type srcbuf srcoff dstbuf dstoff cnt depid deps hasdep/>

Each ``gpu`` is a rank; each ``tb`` a CUDA threadblock with at most one send peer and one
receive peer on one channel; each ``step`` moves ``cnt`` chunks (``s`` send, ``r`` receive,
``rcs`` receive-copy-send, ``rrs`` receive-reduce-send, ``rrc`` receive-reduce-copy, ``rrcs``
receive-reduce-copy-send, ``cpy``, ``re``, ``ra``, ``nop``). A step with ``depid``/``deps``
waits until threadblock ``depid`` has finished its step ``deps``; that step must say
``hasdep="1"`` or the waiter spins forever.

**Tree mapping** (ForestColl's exporter, brief §2.8 [repo]; this code is our own). Every tree
(multiplicity 1, so the schedule must be planned with ``fixed_k``) and every instance gets one
chunk, index ``root·k·ninstance + inst·k + tree offset``; ``nchunksperloop = ninstance·k·N``.
The tree is cut into chains, deepest leaf first; a chain's arcs share one channel, the smallest
one not yet used on any of its GPU→GPU links (in both directions for allreduce), so no (link,
channel) pair repeats; given the topology, an arc through InfiniBand switch ``ibR`` keeps
channels ≡ R (mod number of rails), as NCCL picks a channel's NIC by the channel number. A
node's *main child* is the next node on its own chain (same channel as its parent arc): the
node gets one threadblock for (parent, main child) per tree, plus one per extra child.

- allgather / broadcast: root ``s``; inner nodes ``rcs`` (``r`` without a main child); an extra
  child is served by an ``s`` that depends on the node's receive.
- reduce_scatter / reduce: leaves ``s``, inner nodes ``rrs``, the root ``rrc``; extra children
  arrive by a chain of ``rrc`` steps that the main step depends on.
- allreduce: reduce then broadcast on the same per-shard tree; the root does ``rrcs``.

**Why MSCCL silently ignores a file** (brief §4): it fails to parse or validate (then the log
says "failed to initialize. Will be ignored"), or it parses but ``ncclTopoGetMSCCLAlgo`` never
selects it: wrong collective, reduction op other than sum/prod/max/min, the call's in-placeness
differs from ``inplace``, ``ngpus`` differs from the communicator, the element count is not a
multiple of ``nchunksperloop``, the size is outside ``[minBytes, maxBytes)`` (``maxBytes``
defaults to 128 MiB when absent), the protocol is disabled, the call is inside a group of
several collectives, or, for allreduce, ``NCCL_ALGO`` does not list ``MSCCL`` (MSCCL is off by
default there). :func:`lint_msccl_xml` finds the first kind, :func:`explain_msccl_xml` the second.
The linter also knows NCCL's hand-written XML reader (src/graph/xml.cc), which is stricter than
XML: no ``<?xml ...?>`` declaration, no tabs, each tag on one line, double quotes only,
attribute values of at most 255 characters, integers read by ``strtol`` (``"010"`` is 8, and
``"four"`` is 0).

>>> from fractions import Fraction
>>> from datahall.collectives.schedule import Phase, Schedule, Tree, TreeArc
>>> g = ["g0", "g1", "g2"]
>>> def chain(r):
...     o = [g[(r + i) % 3] for i in range(3)]
...     return Tree(o[0], 0, 1, tuple(TreeArc(a, b, (a, b)) for a, b in zip(o, o[1:])))
>>> s = Schedule("allgather", "ring3", tuple(g), 1, Fraction(1), Fraction(1),
...              (Phase("broadcast", tuple(chain(r) for r in range(3))),))
>>> xml = to_msccl_xml(s)
>>> xml.splitlines()[1]
'  <gpu id="0" i_chunks="1" o_chunks="3" s_chunks="0">'
>>> lint_msccl_xml(xml)
[]
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Literal

import networkx as nx

from .schedule import Phase, Schedule, Tree

__all__ = [
    "MscclError",
    "Finding",
    "Verdict",
    "to_msccl_xml",
    "lint_msccl_xml",
    "explain_msccl_xml",
    "MAX_STEPS",
    "MAX_TBS",
    "MAX_TBS_PER_CHANNEL",
    "MAX_CHANNELS",
    "MAX_COUNT",
]

# Limits of the runtime: microsoft/msccl src/include/msccl.h, NCCL's MAXCHANNELS and XML reader.
MAX_STEPS = 256  # MSCCL_MAX_NUM_STEPS, steps per threadblock
MAX_TBS = 216  # MSCCL_MAX_NUM_THREAD_BLOCKS, threadblocks per GPU
MAX_TBS_PER_CHANNEL = 32  # MSCCL_MAX_NUM_THREAD_BLOCKS_PER_CHANNEL (senders, and receivers)
MAX_CHANNELS = 32  # NCCL MAXCHANNELS
MAX_COUNT = 72  # MSCCL_MAX_COUNT: cnt must be below it
A100_SMS = 108  # every threadblock must be resident at once; the ForestColl exporter keeps <= 108
XML_MAX_STR_LEN = 255  # NCCL XML reader: longest attribute value
XML_MAX_ATTRS = 16  # NCCL XML reader: attributes per element (more are dropped)
DEFAULT_MAX_BYTES = 1 << 27  # what MSCCL assumes when maxBytes is absent (128 MiB)
WARP = 32

PROTOCOLS = ("Simple", "LL", "LL128")
STEP_TYPES = ("s", "r", "rcs", "rrs", "rrc", "rrcs", "cpy", "re", "ra", "nop")
SENDS = frozenset({"s", "rcs", "rrs", "rrcs"})
RECVS = frozenset({"r", "rcs", "rrs", "rrc", "rrcs"})
# Operands each step type reads or writes (MSCCL ignores the others).
_OPERANDS = {
    "s": ("src",), "r": ("dst",), "rcs": ("dst",), "rrs": ("src",), "rrc": ("src", "dst"),
    "rrcs": ("src", "dst"), "cpy": ("src", "dst"), "re": ("src", "dst"), "ra": ("src", "dst"),
    "nop": (),
}  # fmt: skip
# `coll` spellings: the old MSCCL parser, and RCCL / the msccl 2.x executor.
COLLS_MSCCL = (
    "allreduce", "allgather", "reduce", "broadcast", "alltoall", "reduce_scatter", "custom",
)  # fmt: skip
COLLS_EXECUTOR = (
    "allreduce", "allgather", "reduce", "broadcast", "alltoall", "reducescatter", "send", "recv",
    "gather", "scatter", "alltoallv",
)  # fmt: skip
_REDOPS = ("sum", "prod", "max", "min")

_REQUIRED = {
    "algo": ("name", "proto", "nchannels", "nchunksperloop", "ngpus", "coll", "inplace"),
    "gpu": ("id", "i_chunks", "o_chunks", "s_chunks"),
    "tb": ("id", "send", "recv", "chan"),
    "step": (
        "s", "type", "srcbuf", "srcoff", "dstbuf", "dstoff", "cnt", "depid", "deps", "hasdep",
    ),
}  # fmt: skip
_INT_ATTRS = {
    "algo": (
        "nchannels", "nchunksperloop", "ngpus", "inplace", "outofplace", "minBytes", "maxBytes",
        "nthreads",
    ),
    "gpu": ("id", "i_chunks", "o_chunks", "s_chunks"),
    "tb": ("id", "send", "recv", "chan"),
    "step": ("s", "srcoff", "dstoff", "cnt", "depid", "deps", "hasdep"),
}  # fmt: skip


class MscclError(ValueError):
    """Input that is not MSCCL XML, or a schedule that cannot become MSCCL XML; one line."""


@dataclass(frozen=True)
class Finding:
    """One lint result: ``severity`` is ``error`` (MSCCL rejects or hangs), ``warning`` (works
    on some runtimes or degrades) or ``info``; ``where`` names the element; ``rule`` is a short
    id such as ``missing-attr``."""

    severity: Literal["error", "warning", "info"]
    where: str
    message: str
    rule: str = ""

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


_Buf = tuple[str, int]  # (buffer "i" / "o" / "s", chunk index)


@dataclass
class _Step:
    type: str
    srcbuf: str
    srcoff: int
    dstbuf: str
    dstoff: int
    cnt: int = 1
    dep: tuple[_TB, int] | None = None
    hasdep: int = 0


@dataclass(eq=False)
class _TB:
    send: int
    recv: int
    chan: int
    note: str
    steps: list[_Step] = field(default_factory=list)

    def add(self, step: _Step) -> tuple[_TB, int]:
        self.steps.append(step)
        return (self, len(self.steps) - 1)


_Dep = tuple[_TB, int] | None  # the (threadblock, step) a step waits for


@dataclass
class _Layout:
    """One tree of one instance, cut into chains with channels."""

    root: str
    parent: dict[str, str]
    children: dict[str, list[str]]  # main child first
    main: dict[str, str | None]
    chan: dict[tuple[str, str], int]  # (parent, child) -> channel

    def extras(self, v: str) -> list[str]:
        return [c for c in self.children.get(v, []) if c != self.main.get(v)]


class _Channels:
    """Greedy channel choice so that no (GPU→GPU link, channel) pair repeats."""

    def __init__(
        self, rank: Mapping[str, int], rail_class: Mapping[tuple[str, ...], int], nrails: int
    ):
        self.used: dict[tuple[str, str], set[int]] = defaultdict(set)
        self.rank = rank
        self.rail_class = rail_class
        self.nrails = nrails

    def _free(self, links: list[tuple[str, str]], cls: int | None) -> int:
        taken = set().union(*(self.used[link] for link in links))
        c = 0 if cls is None else cls
        step = 1 if cls is None else self.nrails
        while c in taken:
            c += step
        for link in links:
            self.used[link].add(c)
        return c

    def layout(self, tree: Tree, reserve: Literal["down", "up", "both"]) -> _Layout:
        parent = tree.parent()
        kids = tree.children()
        depth = tree.depth()
        path_of = {(a.parent, a.child): a.path for a in tree.arcs}
        leaves = [v for v in tree.nodes() if v not in kids]
        leaves.sort(key=lambda v: (-depth[v], self.rank[v]))
        visited = {tree.root}
        children: dict[str, list[str]] = defaultdict(list)
        main: dict[str, str | None] = {}
        chan: dict[tuple[str, str], int] = {}
        for leaf in leaves:
            path = [leaf]
            while path[-1] != tree.root:
                path.append(parent[path[-1]])
            path.reverse()
            first_new = next(i for i, v in enumerate(path) if v not in visited)
            chain = path[first_new - 1 :]
            visited.update(chain)
            for seg in self._split_by_rail(chain, path_of):
                links: list[tuple[str, str]] = []
                for a, b in pairwise(seg):
                    if reserve in ("down", "both"):
                        links.append((a, b))
                    if reserve in ("up", "both"):
                        links.append((b, a))
                cls = next(
                    (
                        self.rail_class[path_of[a, b]]
                        for a, b in pairwise(seg)
                        if path_of[a, b] in self.rail_class
                    ),
                    None,
                )
                c = self._free(links, cls)
                for i, (a, b) in enumerate(pairwise(seg)):
                    chan[a, b] = c
                    children[a].append(b)
                    # The chain's interior nodes (and the root on its first chain) forward on
                    # the channel they receive on: that child is their main child.
                    if (i > 0 or a == tree.root) and a not in main:
                        main[a] = b
        for v in tree.nodes():
            main.setdefault(v, None)
            kids_v = children.get(v, [])
            if main[v] is not None:
                kids_v.remove(main[v])
                kids_v.insert(0, main[v])
        return _Layout(tree.root, parent, dict(children), main, chan)

    def _split_by_rail(
        self, chain: list[str], path_of: Mapping[tuple[str, str], tuple[str, ...]]
    ) -> list[list[str]]:
        segs: list[list[str]] = [[chain[0]]]
        cls: int | None = None
        for a, b in pairwise(chain):
            c = self.rail_class.get(path_of[a, b])
            if c is not None and cls is not None and c != cls:
                segs.append([a])
            if c is not None:
                cls = c
            segs[-1].append(b)
        return segs


def _rail_classes(
    schedule: Schedule, topology: nx.DiGraph | None
) -> tuple[dict[tuple[str, ...], int], int]:
    """(arc path → rail of the first InfiniBand switch it crosses, number of rails); empty
    when there is no topology or fewer than 2 rails."""
    if topology is None:
        return {}, 0
    ib = {
        n: d.get("rail", -1)
        for n, d in topology.nodes(data=True)
        if d.get("kind") == "ib" and d.get("rail", -1) >= 0
    }
    rails = sorted(set(ib.values()))
    if len(rails) < 2:
        return {}, 0
    index = {r: i for i, r in enumerate(rails)}
    out: dict[tuple[str, ...], int] = {}
    for t in schedule.trees():
        for a in t.arcs:
            hit = next((ib[n] for n in a.path if n in ib), None)
            if hit is not None:
                out[a.path] = index[hit]
    return out, len(rails)


def _check_exportable(
    schedule: Schedule, error: type[ValueError] = MscclError, *, unit_trees: bool = True
) -> None:
    """Raise `error` unless `schedule` is a well-formed tree schedule of a runnable collective;
    with `unit_trees`, every tree must have multiplicity 1 (MSCCL XML)."""
    nodes = set(schedule.compute_nodes)
    if len(nodes) != len(schedule.compute_nodes):
        raise error("schedule.compute_nodes lists a GPU twice; ranks must be unique")
    if len(nodes) < 2:
        raise error("a collective needs at least 2 GPUs; this schedule has fewer")
    for t in schedule.trees():
        if unit_trees and t.multiplicity != 1:
            raise error(
                f"tree (root {t.root}, index {t.index}) has multiplicity {t.multiplicity}; MSCCL "
                "XML needs one tree per chunk, so plan with a fixed k (plan(G, collective, "
                "fixed_k=1)) or export to MSCCL++ instead"
            )
        reached = {t.root}
        for a in t.arcs:
            if a.parent not in reached or a.child in reached or a.child not in nodes:
                raise error(
                    f"tree (root {t.root}, index {t.index}) is not an arborescence over "
                    f"schedule.compute_nodes at arc {a.parent}->{a.child}"
                )
            reached.add(a.child)
        if reached != nodes:
            missing = ", ".join(sorted(nodes - reached))
            raise error(f"tree (root {t.root}, index {t.index}) misses {missing}")
    expected = {
        "allgather": ("broadcast",),
        "broadcast": ("broadcast",),
        "reduce_scatter": ("reduce",),
        "reduce": ("reduce",),
        "allreduce": ("reduce", "broadcast"),
    }[schedule.collective]
    kinds = tuple(p.kind for p in schedule.phases)
    if kinds != expected:
        raise error(f"a {schedule.collective} schedule needs phases {expected}, not {kinds}")
    multi_root = schedule.collective in ("allgather", "reduce_scatter", "allreduce")
    for p in schedule.phases:
        per_root: Counter[str] = Counter()
        for t in p.trees:
            per_root[t.root] += t.multiplicity
        if multi_root and set(per_root) != nodes:
            raise error(f"the {p.kind} phase must have trees rooted at every GPU")
        if not multi_root and len(per_root) != 1:
            raise error(f"a {schedule.collective} schedule must have exactly one root")
        for r, n in per_root.items():
            if n != schedule.k:
                raise error(f"root {r} has {n} trees in the {p.kind} phase, but k={schedule.k}")
    if schedule.collective == "allreduce":
        shapes = [
            [(t.root, t.multiplicity) for t in sorted(p.trees, key=_key)] for p in schedule.phases
        ]
        if shapes[0] != shapes[1]:
            raise error(
                "an allreduce needs the same per-root trees (and multiplicities) in both phases"
            )


def _key(t: Tree) -> tuple[str, int]:
    return (t.root, t.index)


def _by_root(phase: Phase) -> dict[str, list[Tree]]:
    out: dict[str, list[Tree]] = defaultdict(list)
    for t in sorted(phase.trees, key=lambda t: t.index):
        out[t.root].append(t)
    return out


class _Builder:
    """The threadblocks of every GPU, filled in tree by tree (brief §2.8 tree mapping)."""

    def __init__(self, ranks: Mapping[str, int]):
        self.ranks = ranks
        self.gpus: dict[str, list[_TB]] = {v: [] for v in ranks}
        self.scratch: Counter[str] = Counter()

    def tb(self, v: str, send: str | None, recv: str | None, chan: int, note: str) -> _TB:
        r = self.ranks
        tb = _TB(-1 if send is None else r[send], -1 if recv is None else r[recv], chan, note)
        self.gpus[v].append(tb)
        return tb

    def scratch_slot(self, v: str) -> tuple[str, int]:
        self.scratch[v] += 1
        return ("s", self.scratch[v] - 1)

    def order(self, L: _Layout) -> list[str]:
        return sorted({L.root, *L.parent}, key=self.ranks.__getitem__)

    def broadcast(
        self, L: _Layout, j: int, root_src: _Buf, root_dep: _Dep, note: str, fused: bool = False
    ) -> None:
        """Out-tree into output chunk j: the root sends `root_src` (after `root_dep`), inner
        nodes ``rcs`` (``r`` without a main child), each extra child gets an ``s`` that waits
        for the node's receive. `fused`: the root's main child is already served (``rrcs``)."""
        for v in self.order(L):
            m = L.main[v]
            if v == L.root:
                if not fused:
                    a = self.tb(v, m, None, L.chan[v, m], note)
                    a.add(_Step("s", *root_src, "o", j, dep=root_dep))
                    if root_src[0] == "i":  # out of place: the root's own chunk into its output
                        a.add(_Step("cpy", *root_src, "o", j))
                fwd, src = root_dep, root_src
            else:
                p = L.parent[v]
                a = self.tb(v, m, p, L.chan[p, v], note)
                fwd, src = a.add(_Step("rcs" if m else "r", "o", j, "o", j)), ("o", j)
            for x in L.extras(v):
                self.tb(v, x, None, L.chan[v, x], note).add(_Step("s", *src, "o", j, dep=fwd))

    def reduce(
        self,
        L: _Layout,
        j: int,
        own: _Buf,
        acc_of: Callable[[str], _Buf],
        final: _Buf,
        note: str,
        fused: bool = False,
    ) -> _Dep:
        """In-tree towards the root: extra children arrive by a chain of ``rrc`` into the
        node's accumulator ``acc_of(node)``, then ``rrs`` (``s`` at a leaf) goes up; the root
        ends in ``final`` with ``rrc``, or ``rrcs`` when `fused` with the broadcast. Returns
        the root's last step, which a following broadcast waits for."""
        root_last: _Dep = None
        for v in self.order(L):
            m, src, prev = L.main[v], own, None
            acc = final if v == L.root else None
            for x in L.extras(v):
                acc = acc or acc_of(v)
                prev = self.tb(v, None, x, L.chan[v, x], note).add(
                    _Step("rrc", *src, *acc, dep=prev)
                )
                src = acc
            if v != L.root:
                p = L.parent[v]
                a = self.tb(v, p, m, L.chan[p, v], note)
                a.add(_Step("rrs" if m else "s", *src, *src, dep=prev))
            elif fused:
                a = self.tb(v, m, m, L.chan[v, m], note)
                root_last = a.add(_Step("rrcs", *src, *final, dep=prev))
            else:
                a = self.tb(v, None, m, L.chan[v, m], note)
                root_last = a.add(_Step("rrc", *src, *final, dep=prev))
        return root_last


def to_msccl_xml(
    schedule: Schedule,
    *,
    proto: str = "Simple",
    ninstance: int = 1,
    min_bytes: int = 0,
    max_bytes: int = 1 << 40,
    inplace: bool = True,
    name: str | None = None,
    nthreads: int | None = None,
    topology: nx.DiGraph | None = None,
    coll_name: str | None = None,
    comments: bool = True,
) -> str:
    """MSCCL-IR XML ("old format") text for a k-fixed tree `schedule`.

    GPU ranks follow ``schedule.compute_nodes``. `ninstance` copies of every tree run on their own
    channels (more parallelism, more threadblocks). MSCCL uses the file only for calls whose
    in-placeness equals `inplace` and whose size in bytes is in ``[min_bytes, max_bytes)``.
    Pass `topology` to keep InfiniBand paths on channels of their rail. `coll_name` overrides
    the ``coll`` attribute (``reducescatter`` for RCCL or the msccl 2.x executor); `comments`
    adds an XML comment per GPU and threadblock saying which tree it serves.

    Raises :class:`MscclError` when the schedule has trees of multiplicity > 1 (plan with
    ``fixed_k``) or needs more than MSCCL's 32 channels or 216 threadblocks per GPU.
    """
    if proto not in PROTOCOLS:
        raise MscclError(f"proto must be one of {', '.join(PROTOCOLS)}, got {proto!r}")
    if not isinstance(ninstance, int) or ninstance < 1:
        raise MscclError(f"ninstance must be a positive integer, got {ninstance!r}")
    if min_bytes < 0 or max_bytes < 0 or min_bytes > max_bytes:
        raise MscclError(
            f"need 0 <= min_bytes <= max_bytes, got min_bytes={min_bytes}, max_bytes={max_bytes}"
        )
    if nthreads is not None and (nthreads <= 0 or nthreads % WARP):
        raise MscclError(f"nthreads must be a positive multiple of {WARP}, got {nthreads}")
    _check_exportable(schedule)
    coll = schedule.collective
    name = name or f"ForestColl {coll} k={schedule.k} ninstance={ninstance} {schedule.topology}"
    if re.search(r'["<>&\n\r\t]', name) or len(name) > XML_MAX_STR_LEN:
        raise MscclError(
            f"algorithm name {name[:40]!r}... must be at most {XML_MAX_STR_LEN} characters "
            "without quotes, <, >, & or line breaks (NCCL's XML reader cannot escape them)"
        )

    ranks = {v: i for i, v in enumerate(schedule.compute_nodes)}
    N, k = len(ranks), schedule.k
    single_root = coll in ("broadcast", "reduce")
    C = ninstance * k * (1 if single_root else N)
    b = _Builder(ranks)
    chans = _Channels(ranks, *_rail_classes(schedule, topology))
    phases = {p.kind: _by_root(p) for p in schedule.phases}
    roots = sorted({t.root for p in schedule.phases for t in p.trees}, key=ranks.__getitem__)
    for inst, r, off in ((i, r, o) for i in range(ninstance) for r in roots for o in range(k)):
        j = (0 if single_root else ranks[r]) * k * ninstance + inst * k + off
        local = inst * k + off  # the index within one rank's shard
        bt = phases["broadcast"][r][off] if "broadcast" in phases else None
        rt = phases["reduce"][r][off] if "reduce" in phases else None
        note = f"root {r} tree {(bt or rt).index} instance {inst} chunk {j}"
        if coll in ("allgather", "broadcast"):
            own = ("o", j) if inplace else ("i", local if coll == "allgather" else j)
            b.broadcast(chans.layout(bt, "down"), j, own, None, note)
        elif coll == "reduce_scatter":  # accumulate in the input in place, else in scratch
            own, L = ("i", j), chans.layout(rt, "up")
            if inplace:
                b.reduce(L, j, own, lambda v, own=own: own, own, note)
            else:
                b.reduce(L, j, own, b.scratch_slot, ("o", local), note)
        elif coll == "reduce":
            own = ("o", j) if inplace else ("i", j)
            b.reduce(chans.layout(rt, "up"), j, own, b.scratch_slot, ("o", j), note)
        else:  # allreduce: reduce then broadcast; partial sums wait in the output chunk
            own, out = ("o", j) if inplace else ("i", j), ("o", j)
            if rt.parent() == bt.parent():  # the same tree: the root does rrcs
                L = chans.layout(bt, "both")
                last = b.reduce(L, j, own, lambda v, out=out: out, out, note, fused=True)
                b.broadcast(L, j, out, last, note, fused=True)
            else:
                last = b.reduce(chans.layout(rt, "up"), j, own, lambda v, out=out: out, out, note)
                b.broadcast(chans.layout(bt, "down"), j, out, last, note)

    nchannels = 1 + max((c for used in chans.used.values() for c in used), default=0)
    _check_limits(b.gpus, nchannels, ninstance)
    chunks = {"allgather": (C // N, C), "reduce_scatter": (C, C // N)}.get(coll, (C, C))
    algo: dict[str, object] = {
        "name": name,
        "proto": proto,
        "nchannels": nchannels,
        "nchunksperloop": C,
        "ngpus": N,
        "coll": coll_name or coll,
        "inplace": int(inplace),
        "outofplace": int(not inplace),
        "minBytes": min_bytes,
        "maxBytes": max_bytes,
    }
    if nthreads is not None:
        algo["nthreads"] = nthreads
    return _render(algo, b.gpus, chunks, b.scratch, comments)


def _check_limits(gpus: Mapping[str, list[_TB]], nchannels: int, ninstance: int) -> None:
    fix = f"use fewer instances (ninstance={ninstance}) or a smaller k"
    if nchannels > MAX_CHANNELS:
        raise MscclError(
            f"the schedule needs {nchannels} channels and MSCCL has {MAX_CHANNELS}; {fix}"
        )
    for v, tbs in gpus.items():
        if len(tbs) > MAX_TBS:
            raise MscclError(
                f"GPU {v} needs {len(tbs)} threadblocks and MSCCL allows {MAX_TBS}; {fix}"
            )
        for side in ("send", "recv"):
            per_chan = Counter(tb.chan for tb in tbs if getattr(tb, side) >= 0)
            over = [c for c, n in per_chan.items() if n > MAX_TBS_PER_CHANNEL]
            if over:
                raise MscclError(
                    f"GPU {v} has more than {MAX_TBS_PER_CHANNEL} threadblocks that {side} on "
                    f"channel {over[0]}; {fix}"
                )


def _comment(text: str) -> str:
    """Text safe inside an XML comment (no "--")."""
    return text.replace("--", "- -")


def _render(
    algo: Mapping[str, object],
    gpus: Mapping[str, list[_TB]],
    chunks: tuple[int, int],
    scratch: Mapping[str, int],
    comments: bool,
) -> str:
    ids = {tb: i for tbs in gpus.values() for i, tb in enumerate(tbs)}
    for tbs in gpus.values():
        for tb in tbs:
            for st in tb.steps:
                if st.dep is not None:
                    dtb, ds = st.dep
                    dtb.steps[ds].hasdep = 1

    def attrs(d: Mapping[str, object]) -> str:
        return " ".join(f'{key}="{val}"' for key, val in d.items())

    out = [f"<algo {attrs(algo)}>"]
    for rank, (v, tbs) in enumerate(gpus.items()):
        g = {"id": rank, "i_chunks": chunks[0], "o_chunks": chunks[1], "s_chunks": scratch[v]}
        out.append(f"  <gpu {attrs(g)}>")
        if comments:
            out.append(f"    <!-- {_comment(v)} -->")
        for tb in tbs:
            out.append(
                f'    <tb id="{ids[tb]}" send="{tb.send}" recv="{tb.recv}" chan="{tb.chan}">'
            )
            if comments:
                out.append(f"      <!-- {_comment(tb.note)} -->")
            for s, st in enumerate(tb.steps):
                depid, deps = (ids[st.dep[0]], st.dep[1]) if st.dep else (-1, -1)
                step = {
                    "s": s,
                    "type": st.type,
                    "srcbuf": st.srcbuf,
                    "srcoff": st.srcoff,
                    "dstbuf": st.dstbuf,
                    "dstoff": st.dstoff,
                    "cnt": st.cnt,
                    "depid": depid,
                    "deps": deps,
                    "hasdep": st.hasdep,
                }
                out.append(f"      <step {attrs(step)}/>")
            out.append("    </tb>")
        out.append("  </gpu>")
    out.append("</algo>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _read(text_or_path: str | bytes | os.PathLike[str]) -> tuple[str, str]:
    """(text, label) from XML text, bytes or a path."""
    if isinstance(text_or_path, bytes):
        return text_or_path.decode("utf-8", errors="replace"), "<bytes>"
    if isinstance(text_or_path, os.PathLike) or (
        isinstance(text_or_path, str) and not text_or_path.lstrip("\ufeff \t\r\n").startswith("<")
    ):
        p = Path(text_or_path)
        try:
            return p.read_text(encoding="utf-8", errors="replace"), str(p)
        except OSError as e:
            raise MscclError(
                f"{str(text_or_path)[:80]!r} is neither MSCCL XML text nor a readable file "
                f"({e.strerror or e})"
            ) from None
    if not isinstance(text_or_path, str):
        raise MscclError(f"expected XML text or a path, got {type(text_or_path).__name__}")
    return text_or_path, "<text>"


def _parse(text: str, label: str) -> ET.Element:
    try:
        root = ET.fromstring(text.lstrip("\ufeff"))
    except ET.ParseError as e:
        raise MscclError(
            f"{label}: not well-formed XML ({e}); fix it or export it again with to_msccl_xml"
        ) from None
    if root.tag == "algo":
        return root
    hint = {
        "msccl_algos": "this is an MSCCL_CONFIG file; lint the algorithm files its <load path=...> name",
        "Algo": "this is ForestColl's tree XML, not MSCCL-IR; convert the schedule with to_msccl_xml",
        "system": "this is an NCCL topology file (NCCL_TOPO_FILE), not an MSCCL algorithm",
        "graphs": "this is an NCCL graph file (NCCL_GRAPH_FILE), not an MSCCL algorithm",
    }.get(root.tag, "MSCCL reads only files whose top element is <algo ...>")
    raise MscclError(f"{label}: not MSCCL XML: the top element is <{root.tag}>; {hint}")


_C_INT = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def _c_int(value: str) -> tuple[int | None, bool]:
    """C's ``strtol(value, NULL, 0)`` as NCCL's XML reader uses it: (the number, or None when
    `value` is not wholly an integer; whether a leading zero made it octal)."""
    m = _C_INT.match(value)
    if not m or value[m.end() :].strip():
        return None, False
    sign, digits = m.groups()
    if digits[:2] in ("0x", "0X"):
        n, octal = int(digits, 16), False
    elif len(digits) > 1 and digits[0] == "0":
        n, octal = int(digits, 8), True
    else:
        n, octal = int(digits), False
    return (-n if sign == "-" else n), octal


def _strtol_prefix(raw: str) -> int:
    """What strtol returns for a string that is not wholly an integer: its numeric prefix or 0."""
    m = _C_INT.match(raw)
    if not m:
        return 0
    sign, digits = m.groups()
    base = 16 if digits[:2] in ("0x", "0X") else 8 if len(digits) > 1 and digits[0] == "0" else 10
    n = int(digits, base)
    return -n if sign == "-" else n


# --------------------------------------------------------------------------------------------
# Lint
# --------------------------------------------------------------------------------------------


class _Findings(list):
    """A list of :class:`Finding` with one-line adders (rule before message)."""

    def error(self, where: str, rule: str, message: str) -> None:
        self.append(Finding("error", where, message, rule))

    def warn(self, where: str, rule: str, message: str) -> None:
        self.append(Finding("warning", where, message, rule))

    def info(self, where: str, rule: str, message: str) -> None:
        self.append(Finding("info", where, message, rule))


_TAG = re.compile(r"""<!--.*?-->|<(?:[^>"']|"[^"]*"|'[^']*')*>?""", re.S)
_READER = "NCCL's XML reader"


def _lint_syntax(text: str) -> _Findings:
    """What NCCL's hand-written XML reader (src/graph/xml.cc) chokes on."""
    out = _Findings()

    def line(pos: int) -> str:
        return f"line {text.count(chr(10), 0, pos) + 1}"

    if text.startswith("\ufeff"):
        out.error("line 1", "bom", f"the file starts with a byte-order mark; {_READER} expects '<'")
        text = text[1:]
    pos = 0
    for m in _TAG.finditer(text):
        gap, tag, where = text[pos : m.start()], m.group(), line(m.start())
        if "\t" in gap:
            out.error(
                line(pos + gap.index("\t")),
                "tab",
                f"tab between elements; {_READER} only skips spaces and line breaks",
            )
        elif gap.strip(" \r\n"):
            out.error(
                line(pos),
                "text-content",
                f"text {gap.strip()[:30]!r} between elements; {_READER} expects only elements",
            )
        pos = m.end()
        if tag.startswith("<!--"):
            continue
        if tag.startswith(("<?", "<!")):
            out.error(
                where,
                "declaration",
                f"{tag[:20]}... is not understood by {_READER}; delete it (start with <algo ...>)",
            )
            continue
        if any(ch in tag for ch in "\t\r\n"):
            out.error(
                where,
                "attr-separator",
                f"a tag spans lines or uses tabs; {_READER} needs each tag on one line with "
                "attributes separated by spaces",
            )
        if re.search(r"=\s*'", tag):
            out.error(
                where,
                "single-quote",
                f"single-quoted attribute value; {_READER} reads up to the next double quote",
            )
        values = re.findall(r'="([^"]*)"', tag)
        if any(len(v) > XML_MAX_STR_LEN for v in values):
            out.error(
                where,
                "value-too-long",
                f"an attribute value is longer than {XML_MAX_STR_LEN} characters and overflows "
                f"{_READER}",
            )
        if len(values) > XML_MAX_ATTRS:
            out.warn(
                where,
                "too-many-attrs",
                f"{len(values)} attributes; {_READER} keeps the first {XML_MAX_ATTRS}",
            )
    if text[pos:].strip(" \r\n"):
        out.error(line(pos), "text-content", f"text after the last element; {_READER} ignores it")
    return out


def _ints(el: ET.Element, kind: str, where: str, out: _Findings) -> dict[str, int | None]:
    """The integer attributes of `el` as NCCL reads them (strtol base 0), flagging bad ones."""
    vals: dict[str, int | None] = {}
    for key in _INT_ATTRS[kind]:
        raw = el.get(key)
        n, octal = _c_int(raw) if raw is not None else (None, False)
        if raw is not None and n is None:
            n = _strtol_prefix(raw)
            out.error(
                where,
                "not-int",
                f"{key}={raw!r} is not an integer; NCCL's reader (strtol) reads it as {n}",
            )
        elif octal:
            out.warn(
                where,
                "octal-int",
                f"{key}={raw!r} has a leading zero, so NCCL reads it as octal ({n})",
            )
        vals[key] = n
    return vals


def lint_msccl_xml(text_or_path: str | bytes | os.PathLike[str]) -> list[Finding]:
    """Everything that makes MSCCL reject, hang on, or misread an algorithm file.

    `text_or_path` is XML text, bytes, or a path. Returns the findings (empty when clean);
    raises :class:`MscclError` when the input is not XML or not MSCCL XML at all.
    """
    text, label = _read(text_or_path)
    out = _lint_syntax(text)
    out += _lint_tree(_parse(text, label))
    return list(out)


def _lint_tree(root: ET.Element) -> _Findings:
    """The <algo> element: its attributes, its GPUs, and the sends and receives between them."""
    out = _Findings()
    for key in _REQUIRED["algo"]:
        if root.get(key) is None:
            out.error("algo", "missing-attr", f"missing {key}=...; MSCCL cannot load the file")
    for key, default in (("minBytes", "0"), ("maxBytes", "128 MiB")):
        if root.get(key) is None:
            out.error(
                "algo",
                "missing-attr",
                f"missing {key}=...; the msccl 2.x executor rejects the file and older MSCCL "
                f"assumes {default}, so other sizes silently fall back to NCCL",
            )
    if root.get("outofplace") is None:
        out.warn("algo", "missing-attr", "missing outofplace=...; the msccl 2.x executor needs it")
    a = _ints(root, "algo", "algo", out)
    proto, coll = root.get("proto"), root.get("coll")
    if proto is not None and proto not in PROTOCOLS:
        out.error("algo", "proto", f"proto={proto!r}; MSCCL knows {', '.join(PROTOCOLS)}")
    if coll is not None and coll not in COLLS_MSCCL + COLLS_EXECUTOR:
        out.error(
            "algo",
            "coll",
            f"coll={coll!r} is not a collective MSCCL knows ({', '.join(COLLS_MSCCL)})",
        )
    elif coll in ("reduce_scatter", "reducescatter"):
        other = "reducescatter" if coll == "reduce_scatter" else "reduce_scatter"
        who = "the old MSCCL parser" if coll == "reduce_scatter" else "RCCL and msccl 2.x"
        out.info("algo", "coll-spelling", f'coll="{coll}" is read by {who}; others read "{other}"')
    lo, hi = a["minBytes"], a["maxBytes"]
    if (lo is not None and lo < 0) or (hi is not None and hi < 0):
        out.error("algo", "bytes-range", "minBytes and maxBytes must not be negative")
    elif lo is not None and hi is not None and lo > hi:
        out.error("algo", "bytes-range", f"minBytes={lo} is above maxBytes={hi}; MSCCL rejects it")
    elif lo is not None and lo == hi:
        out.warn("algo", "bytes-range", f"minBytes = maxBytes = {lo}: no size is in [min, max)")
    if a["inplace"] == 0 and a["outofplace"] == 0:
        out.error("algo", "inplace-flags", "inplace and outofplace are both 0; no call can use it")
    nt, nch, ngpus, C = a["nthreads"], a["nchannels"], a["ngpus"], a["nchunksperloop"]
    if nt is not None and (nt % WARP or nt < 0):
        out.error(
            "algo", "nthreads", f"nthreads={nt} is not a multiple of {WARP}; MSCCL rejects it"
        )
    if nch is not None and not 1 <= nch <= MAX_CHANNELS:
        out.error("algo", "nchannels", f"nchannels={nch}; it must be between 1 and {MAX_CHANNELS}")
    if C is not None and C < 1:
        out.error("algo", "nchunksperloop", f"nchunksperloop={C} must be positive")
        C = None

    gpus = [g for g in root if g.tag == "gpu"]
    if ngpus is not None and len(gpus) != ngpus:
        out.error(
            "algo",
            "ngpus-count",
            f"ngpus={ngpus} but the file has {len(gpus)} <gpu> elements; every rank of an "
            "ngpus-rank communicator needs its <gpu>",
        )
    ids: Counter[int] = Counter()
    chunks: dict[int, dict[str, int]] = {}
    elements: dict[int, ET.Element] = {}
    for gi, g in enumerate(gpus):
        where = f"gpu {g.get('id', f'#{gi}')}"
        for key in _REQUIRED["gpu"]:
            if g.get(key) is None:
                out.error(where, "missing-attr", f"missing {key}=...")
        gv = _ints(g, "gpu", where, out)
        gid = gv["id"]
        if gid is None:
            continue
        ids[gid] += 1
        if ngpus is not None and not 0 <= gid < ngpus:
            out.error(where, "gpu-ids", f"id {gid} is outside 0..{ngpus - 1}")
        if (gv["s_chunks"] or 0) < 0:
            out.error(where, "chunks", f"s_chunks={gv['s_chunks']} must not be negative")
        if C is not None and ngpus and coll is not None:
            _check_chunks(coll, gv["i_chunks"], gv["o_chunks"], C, ngpus, where, out)
        chunks[gid] = {b: gv[f"{b}_chunks"] or 0 for b in "ios"}
        elements[gid] = g
    for gid, n in ids.items():
        if n > 1:
            out.error(f"gpu {gid}", "gpu-ids", f"{n} <gpu> elements have id {gid}")

    sends: dict[tuple[int, int, int], list[int]] = defaultdict(list)  # (src, dst, chan) -> cnts
    recvs: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for gid in sorted(elements):
        _lint_gpu(gid, elements[gid], chunks[gid], ngpus, nch, out, sends, recvs)
    for key in sorted(set(sends) | set(recvs)):
        s, r = sends.get(key, []), recvs.get(key, [])
        if len(s) != len(r) or sum(s) != sum(r):
            src, dst, chan = key
            out.error(
                f"gpu {src} -> gpu {dst}",
                "unmatched-send-recv",
                f"gpu {src} sends {len(s)} step(s) ({sum(s)} chunks) to gpu {dst} on channel "
                f"{chan} but gpu {dst} receives {len(r)} ({sum(r)} chunks) from gpu {src} on "
                f"channel {chan}; unmatched sends and receives hang",
            )
    return out


def _check_chunks(coll, ic, oc, C, ngpus, where, out: _Findings) -> None:
    """MSCCL's rule: i_chunks·(N for allgather) and o_chunks·(N for reduce_scatter) must equal
    nchunksperloop whenever they are positive."""
    imul = ngpus if coll == "allgather" else 1
    omul = ngpus if coll in ("reduce_scatter", "reducescatter") else 1
    for key, n, mul in (("i_chunks", ic, imul), ("o_chunks", oc, omul)):
        if n is not None and n > 0 and n * mul != C:
            need = f"{key}·{mul}" if mul > 1 else key
            out.error(
                where,
                "chunk-consistency",
                f"{key}={n} does not fit coll={coll} with nchunksperloop={C}: MSCCL needs "
                f"{need} = nchunksperloop",
            )


def _lint_gpu(gid, g, chunks, ngpus, nch, out: _Findings, sends, recvs) -> None:
    """One <gpu>: threadblock ids and peers, channels, steps, dependencies."""
    gw = f"gpu {gid}"
    tbs = [t for t in g if t.tag == "tb"]
    if len(tbs) > MAX_TBS:
        out.error(gw, "tb-limit", f"{len(tbs)} threadblocks; MSCCL allows {MAX_TBS}")
    elif len(tbs) > A100_SMS:
        out.warn(
            gw,
            "tb-limit",
            f"{len(tbs)} threadblocks; more than an A100's {A100_SMS} SMs, and all must run at "
            "once or the algorithm can deadlock",
        )
    tb_ids: Counter[int] = Counter()
    steps_of: dict[int, list[dict[str, int | None]]] = {}
    conns: dict[str, dict[tuple[int, int], list[int]]] = {
        "send": defaultdict(list),
        "recv": defaultdict(list),
    }
    for ti, t in enumerate(tbs):
        tw = f"{gw} / tb {t.get('id', f'#{ti}')}"
        for key in _REQUIRED["tb"]:
            if t.get(key) is None:
                out.error(tw, "missing-attr", f"missing {key}=...")
        for key in ("send", "recv"):
            if re.search(r"\d\s*[,; ]\s*-?\d", t.get(key, "")):
                out.error(
                    tw,
                    "multi-peer",
                    f"{key}={t.get(key)!r} names several peers; a threadblock has one {key} "
                    "peer (use one threadblock per peer)",
                )
        tv = _ints(t, "tb", tw, out)
        tid = tv["id"]
        if tid is None:
            continue
        tb_ids[tid] += 1
        send = -1 if tv["send"] is None else tv["send"]
        recv = -1 if tv["recv"] is None else tv["recv"]
        chan = tv["chan"] if tv["chan"] is not None else 0
        if gid in (send, recv):
            out.error(tw, "self-peer", f"sends to or receives from its own GPU {gid}")
        for key, peer in (("send", send), ("recv", recv)):
            if peer < -1 or (ngpus is not None and peer >= ngpus):
                out.error(tw, "peer-range", f"{key}={peer} is not -1 or a rank below ngpus")
            elif peer >= 0:
                conns[key][peer, chan].append(tid)
        if chan < 0 or (nch is not None and chan >= nch):
            out.error(
                tw,
                "channel-range",
                f"chan={chan} is outside 0..nchannels-1 ({nch}); MSCCL sets up only those",
            )
        st_els = [s for s in t if s.tag == "step"]
        if len(st_els) > MAX_STEPS:
            out.error(
                tw, "step-limit", f"{len(st_els)} steps; MSCCL allows {MAX_STEPS} per threadblock"
            )
        steps_of[tid] = [
            _lint_step(s, si, f"{tw} / step {s.get('s', f'#{si}')}", send, recv, chunks, out)
            for si, s in enumerate(st_els)
        ]
        for sv in steps_of[tid]:
            if sv["type"] in SENDS and send >= 0:
                sends[gid, send, chan].append(sv["cnt"] or 1)
            if sv["type"] in RECVS and recv >= 0:
                recvs[recv, gid, chan].append(sv["cnt"] or 1)
    for tid, n in tb_ids.items():
        if n > 1:
            out.error(f"{gw} / tb {tid}", "tb-ids", f"{n} threadblocks have id {tid}")
    if tb_ids:
        missing = sorted(set(range(max(tb_ids) + 1)) - set(tb_ids))
        if missing or min(tb_ids) < 0:
            bad = missing[0] if missing else min(tb_ids)
            out.error(
                gw, "tb-ids", f"threadblock ids must run 0..n-1; {bad} is missing or negative"
            )
    for side, by_conn in conns.items():
        for c, n in Counter(c for (_, c), t in by_conn.items() for _ in t).items():
            if n > MAX_TBS_PER_CHANNEL:
                out.error(
                    gw,
                    "tbs-per-channel",
                    f"{n} threadblocks {side} on channel {c}; MSCCL allows {MAX_TBS_PER_CHANNEL}",
                )
        for (peer, c), t in by_conn.items():
            if len(t) > 1:
                verb = "send to" if side == "send" else "receive from"
                out.error(
                    gw,
                    "duplicate-connection",
                    f"threadblocks {', '.join(map(str, t))} all {verb} gpu {peer} on channel {c}; "
                    "a (peer, channel) connection serves one threadblock",
                )
    for tid, steps in steps_of.items():
        for si, sv in enumerate(steps):
            depid, deps = sv["depid"], sv["deps"]
            if depid is None or depid < 0:
                continue
            sw = f"{gw} / tb {tid} / step {si}"
            target = steps_of.get(depid)
            if target is None:
                out.error(sw, "deps", f"depid={depid}: gpu {gid} has no threadblock {depid}")
            elif deps is None or not 0 <= deps < len(target):
                out.error(
                    sw, "deps", f"deps={deps}: threadblock {depid} has steps 0..{len(target) - 1}"
                )
            elif not any(t["hasdep"] == 1 for t in target[deps:]):
                out.error(
                    sw,
                    "deps",
                    f'waits for tb {depid} step {deps}, which does not set hasdep="1"; the wait '
                    "never ends",
                )


def _lint_step(s: ET.Element, si: int, sw: str, send: int, recv: int, chunks, out: _Findings):
    """One <step>: its integers, type, peers and buffer ranges; returns its integer view."""
    for key in _REQUIRED["step"]:
        if s.get(key) is None:
            out.error(sw, "missing-attr", f"missing {key}=...")
    sv: dict = _ints(s, "step", sw, out)
    typ = s.get("type")
    if sv["s"] is not None and sv["s"] >= MAX_STEPS:
        out.error(sw, "step-limit", f"s={sv['s']}; MSCCL allows steps 0..{MAX_STEPS - 1}")
    elif sv["s"] is not None and sv["s"] != si:
        out.warn(
            sw,
            "step-order",
            f"s={sv['s']} but it is step #{si} of its threadblock; MSCCL numbers steps by "
            "position, so deps that name s point elsewhere",
        )
    if typ is not None and typ not in STEP_TYPES:
        out.error(sw, "step-type", f"type={typ!r}; MSCCL knows {', '.join(STEP_TYPES)}")
        typ = None
    sv["type"] = typ
    cnt = sv["cnt"]
    if cnt is not None and not 0 < cnt < MAX_COUNT:
        out.error(sw, "count", f"cnt={cnt}; it must be between 1 and {MAX_COUNT - 1}")
    if sv["hasdep"] not in (None, 0, 1):
        out.error(sw, "hasdep", f"hasdep={sv['hasdep']}; it must be 0 or 1")
    if typ in SENDS and send < 0:
        out.error(sw, "step-peer", f"a {typ} step in a threadblock without a send peer (send=-1)")
    if typ in RECVS and recv < 0:
        out.error(sw, "step-peer", f"a {typ} step in a threadblock without a recv peer (recv=-1)")
    names = {"i": "input (i_chunks", "o": "output (o_chunks", "s": "scratch (s_chunks"}
    for operand in _OPERANDS.get(typ or "nop", ()):
        buf, off = s.get(f"{operand}buf"), sv[f"{operand}off"]
        if buf is None or off is None:
            continue
        if buf not in names:
            out.error(sw, "buffer", f"{operand}buf={buf!r}; MSCCL knows i, o and s")
            continue
        n, c = chunks[buf], cnt or 1
        if off < 0 or off + c > n:
            out.error(
                sw,
                "buffer",
                f"{operand} chunks {off}..{off + c - 1} are outside the {names[buf]}={n})",
            )
    return sv


# --------------------------------------------------------------------------------------------
# Why wasn't my algorithm picked?
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What :func:`explain_msccl_xml` decided: ``picked`` and, if not, every reason why;
    ``notes`` are caveats that depend on things the call did not say (environment, hardware)."""

    picked: bool
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        head = "MSCCL would run this algorithm" if self.picked else "MSCCL would not pick it:"
        lines = [head, *(f"  - {r}" for r in self.reasons), *(f"  note: {n}" for n in self.notes)]
        return "\n".join(lines)


def _env_list(value: str, universe: Iterable[str]) -> set[str]:
    """NCCL's parseList: comma-separated, case-insensitive, a leading ^ means all but these."""
    universe = list(universe)
    neg = value.startswith("^")
    names = {s.strip().lower() for s in value.lstrip("^").split(",") if s.strip()}
    if neg:
        return {u for u in universe if u.lower() not in names}
    return {u for u in universe if u.lower() in names}


def explain_msccl_xml(
    text_or_path: str | bytes | os.PathLike[str],
    *,
    nbytes: int,
    ngpus: int,
    coll: str | None = None,
    in_place: bool = True,
    dtype_size: int = 4,
    redop: str = "sum",
    env: Mapping[str, str] | None = None,
    group_size: int = 1,
) -> Verdict:
    """Would MSCCL run this algorithm for a call, and if not, why? (The brief's "why wasn't my
    algorithm picked" explainer; it follows microsoft/msccl ``ncclTopoGetMSCCLAlgo``.)

    `nbytes` is NCCL's size of the call: the output for allgather, the input for
    reduce_scatter, the buffer for allreduce/broadcast/reduce. `env` is the environment of the
    job (``NCCL_ALGO``, ``NCCL_PROTO``, ``MSCCL_XML_FILES``, ``MSCCL_CONFIG``); ``None`` skips
    the environment checks and adds notes instead. `group_size` is the number of collectives
    in the ``ncclGroupStart/End`` block of the call.
    """
    text, label = _read(text_or_path)
    root = _parse(text, label)
    findings = _lint_syntax(text) + _lint_tree(root)
    reasons: list[str] = []
    notes: list[str] = []
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more; run lint_msccl_xml)" if len(errors) > 1 else ""
        reasons.append(
            f"the file does not load ('failed to initialize. Will be ignored'): {errors[0]}{more}"
        )
    ints = {k: _c_int(root.get(k, ""))[0] for k in _INT_ATTRS["algo"]}
    acoll = root.get("coll", "")
    norm = {"reducescatter": "reduce_scatter"}
    want = norm.get(coll or acoll, coll or acoll)
    if coll is not None and norm.get(acoll, acoll) != want:
        reasons.append(f"the call is {coll} but the algorithm is coll={acoll!r}")
    if redop.lower() not in _REDOPS:
        reasons.append(
            f"reduction {redop!r}: MSCCL only runs {', '.join(_REDOPS)}; average and premultiplied "
            "sums fall back to NCCL"
        )
    if group_size > 1:
        reasons.append(
            f"the call is one of {group_size} collectives in an NCCL group; MSCCL runs only "
            "single collectives (split the group)"
        )
    algo_in = ints["inplace"]
    if algo_in is not None and bool(algo_in) != in_place:
        have = "in place" if in_place else "out of place"
        reasons.append(
            f'the call is {have} but the algorithm says inplace="{algo_in}"; MSCCL picks only '
            f"algorithms whose inplace matches (export one with inplace={in_place})"
        )
    a_n = ints["ngpus"]
    if a_n is not None and a_n != ngpus:
        reasons.append(
            f"the communicator has {ngpus} ranks but the algorithm has ngpus={a_n}; MSCCL loads it "
            "only for that many ranks"
        )
    lo = ints["minBytes"] if root.get("minBytes") is not None else 0
    hi = ints["maxBytes"] if root.get("maxBytes") is not None else DEFAULT_MAX_BYTES
    if lo is not None and hi is not None and not lo <= nbytes < hi:
        why = (
            "maxBytes is absent, so MSCCL assumes 128 MiB; " if root.get("maxBytes") is None else ""
        )
        reasons.append(
            f"{nbytes} bytes is outside [minBytes, maxBytes) = [{lo}, {hi}); {why}export with "
            f"min_bytes <= {nbytes} < max_bytes"
        )
    C = ints["nchunksperloop"]
    elem = 1 if want in ("allgather", "broadcast", "alltoall") else dtype_size
    count = nbytes // elem
    if C and count % C:
        unit = "bytes" if elem == 1 else f"elements of {dtype_size} bytes"
        reasons.append(
            f"the call moves {count} {unit}, not a multiple of nchunksperloop={C}; MSCCL needs "
            f"whole chunks (pad the buffer to a multiple of {C} {unit.split(' ')[0]})"
        )
    proto = root.get("proto", "")
    if env is None:
        notes.append(
            "MSCCL loads only files named in MSCCL_XML_FILES (':'-separated, at most 4) or in "
            "MSCCL_CONFIG"
        )
        if want == "allreduce":
            notes.append(
                "for allreduce MSCCL is off unless NCCL_ALGO lists MSCCL (e.g. "
                "NCCL_ALGO=MSCCL,Ring,Tree)"
            )
    else:
        files = env.get("MSCCL_XML_FILES")
        if files is None and env.get("MSCCL_CONFIG") is None:
            reasons.append("neither MSCCL_XML_FILES nor MSCCL_CONFIG is set; MSCCL loads nothing")
        elif files is not None and label not in ("<text>", "<bytes>"):
            listed = [f for f in files.split(":") if f]
            here = os.path.abspath(label)
            hits = [i for i, f in enumerate(listed) if os.path.abspath(f) == here]
            if not hits and env.get("MSCCL_CONFIG") is None:
                reasons.append(f"{label} is not in MSCCL_XML_FILES ({files})")
            elif hits and hits[0] >= 4:
                reasons.append(
                    f"{label} is file #{hits[0] + 1} in MSCCL_XML_FILES; MSCCL loads only the first 4"
                )
        algo_env = env.get("NCCL_ALGO")
        algos = ("Tree", "Ring", "MSCCL", "CollNet")
        if want == "allreduce":
            if algo_env is None:
                reasons.append(
                    "NCCL_ALGO is not set and MSCCL is off by default for allreduce; set "
                    "NCCL_ALGO=MSCCL,Ring,Tree"
                )
            elif "MSCCL" not in _env_list(algo_env, algos):
                reasons.append(
                    f"NCCL_ALGO={algo_env} does not enable MSCCL, which allreduce needs; add MSCCL"
                )
        proto_env = env.get("NCCL_PROTO")
        if proto_env is not None and proto and proto not in _env_list(proto_env, PROTOCOLS):
            reasons.append(f"NCCL_PROTO={proto_env} disables the algorithm's proto={proto}")
        maxch = env.get("NCCL_MAX_NCHANNELS")
        nch = ints["nchannels"]
        limit = _c_int(maxch)[0] if maxch is not None else None
        if limit is not None and nch is not None and nch > limit:
            notes.append(
                f"NCCL_MAX_NCHANNELS={maxch} is below nchannels={nch}; MSCCL warns and the run "
                "may hang"
            )
    if proto == "LL128":
        notes.append(
            "LL128 is on by default only on Volta/Ampere with NVLink; elsewhere set NCCL_PROTO "
            "to include LL128 or the algorithm is skipped"
        )
    return Verdict(not reasons, tuple(reasons), tuple(notes))
