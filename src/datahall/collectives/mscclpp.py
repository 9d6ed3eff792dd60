"""MSCCL++ execution-plan JSON for a tree schedule, and a self-consistency check of such plans.

MSCCL++ (github.com/microsoft/mscclpp) runs a collective from a JSON "execution plan": top-level
``name``, ``collective``, ``protocol``, ``inplace``, ``gpus``, ``num_threads_per_block``,
``use_double_scratch_buffer``, ``min_message_size``, ``max_message_size``; per GPU its chunk
counts, ``threadblocks`` (each a list of ``ops`` plus the ``channels`` and remote buffers it
uses), its ``channels`` (``memory``: GPU threads copy into the peer's memory; ``port``: a proxy
posts DMA/RDMA) and its ``remote_buffers``. Ops used here: ``put`` (copy local chunks into a
peer's buffer over a channel), ``signal`` / ``wait`` (a counting semaphore per channel pair),
``copy``, ``re`` (reduce local buffers) and ``flush`` (drain a port channel).

**[reconstruction]** The brief gives only the schema's outline (mscclpp
``docs/design/mscclpp-dsl-json-file.md``); the mapping of trees onto it is ours:

- Field names are those the MSCCL++ Python DSL writes (``python/mscclpp/language``,
  ``Program.to_json``) and the executor reads (``src/core/executor/execution_plan.cc``):
  ``input_chunks``, ``channel_type``/``connected_to``, ``remote_buffers`` with
  ``access_channel_types``, per-threadblock ``remote_buffer_refs``, ops with ``channel_ids``
  and ``src_buff``/``dst_buff`` entries ``{type | buffer_id, index, size}``. The design doc
  spells some of them in camelCase (``inputChunks``, ``remoteBuffers``, ``connectedTo``); we
  follow the code. Nothing here was run on MSCCL++ itself.
- One threadblock per (tree, instance, GPU). Every tree arc gets its own channel pair, memory
  when the path is a direct link or one NVSwitch, port when it crosses a NIC or network switch
  (decided from node kinds when `topology` is given, else from the path length). Channels
  pair up in order: the i-th channel of GPU a to b with the i-th of b to a.
- Chunks: a tree of multiplicity m moves m consecutive chunks (MSCCL++ has no one-chunk limit,
  so ``fixed_k`` is not needed); index ``shard·k·ninstance + inst·k + offset`` as in MSCCL.
- Broadcast arcs: the parent ``put``s the chunk into the child's output and ``signal``s; the
  child ``wait``s, forwards, and ``signal``s back an acknowledgement once it no longer reads the
  chunk; the parent waits for it before finishing, so the next call cannot overwrite a chunk
  still being forwarded.
- Reduce arcs: the child ``put``s its partial sum into a scratch slot of the parent and
  ``signal``s; the parent ``wait``s for all children, ``re``-duces, and acknowledges each slot.
  Allreduce skips both acknowledgements: the broadcast half already orders the next call.
- No ``pipeline`` loops and no LL packets: a chunk moves as one unit, pipelining comes from
  `ninstance` and from many trees running at once.

>>> from fractions import Fraction
>>> from datahall.collectives.schedule import Phase, Schedule, Tree, TreeArc
>>> t = lambda r, c: Tree(r, 0, 1, (TreeArc(r, c, (r, c)),))
>>> s = Schedule("allgather", "pair", ("a", "b"), 1, Fraction(1), Fraction(1),
...              (Phase("broadcast", (t("a", "b"), t("b", "a"))),))
>>> plan = to_mscclpp_json(s)
>>> [op["name"] for op in plan["gpus"][0]["threadblocks"][0]["ops"]]
['put', 'signal', 'wait']
>>> check_mscclpp_plan(plan)
[]
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from .msccl import _by_root, _check_exportable
from .schedule import Schedule, Tree

__all__ = ["MscclppError", "to_mscclpp_json", "check_mscclpp_plan", "COLLECTIVE_NAMES"]

# Our collective names → MSCCL++'s.
COLLECTIVE_NAMES = {
    "allgather": "allgather",
    "reduce_scatter": "reducescatter",
    "allreduce": "allreduce",
    "broadcast": "broadcast",
}
CHANNEL_TYPES = ("memory", "port")
_PORT_KINDS = frozenset({"nic", "ib", "switch", "tor", "leaf", "spine", "roadm", "host"})
_OPS = frozenset({"put", "get", "copy", "signal", "wait", "flush", "re", "nop", "barrier"})
U64_MAX = 2**64 - 1


class MscclppError(ValueError):
    """A schedule that cannot become an MSCCL++ plan, or bad arguments; one line."""


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Conn:
    """A channel pair between GPUs a and b: each side's index among its channels of the type."""

    ctype: str
    side: dict[int, int]  # rank -> that rank's channel index


@dataclass
class _Gpu:
    rank: int
    peers: dict[str, list[int]] = field(default_factory=lambda: {t: [] for t in CHANNEL_TYPES})
    remote: list[tuple[int, str, str]] = field(default_factory=list)  # (rank, buffer, ctype)
    tbs: list[_Tb] = field(default_factory=list)
    scratch: int = 0

    def slot(self, size: int) -> int:
        self.scratch += size
        return self.scratch - size


@dataclass(eq=False)
class _Tb:
    gpu: _Gpu
    ops: list[dict[str, Any]] = field(default_factory=list)
    chans: dict[str, list[int]] = field(default_factory=lambda: {t: [] for t in CHANNEL_TYPES})
    bufs: dict[str, list[int]] = field(default_factory=lambda: {t: [] for t in CHANNEL_TYPES})

    def _chan(self, conn: _Conn) -> int:
        ids = self.chans[conn.ctype]
        g = conn.side[self.gpu.rank]
        if g not in ids:
            ids.append(g)
        return ids.index(g)

    def _buf(self, peer: int, buffer: str, ctype: str) -> int:
        key = (peer, buffer, ctype)
        if key not in self.gpu.remote:
            self.gpu.remote.append(key)
        gid = self.gpu.remote.index(key)
        refs = self.bufs[ctype]
        if gid not in refs:
            refs.append(gid)
        return refs.index(gid)

    def sync(self, name: str, conn: _Conn) -> None:
        self.ops.append(
            {"name": name, "channel_type": conn.ctype, "channel_ids": [self._chan(conn)]}
        )

    def put(self, src: tuple[str, int], peer: int, dst: tuple[str, int], size: int, conn: _Conn):
        self.ops.append(
            {
                "name": "put",
                "src_buff": [{"type": src[0], "index": src[1], "size": size}],
                "dst_buff": [
                    {
                        "buffer_id": self._buf(peer, dst[0], conn.ctype),
                        "index": dst[1],
                        "size": size,
                    }
                ],
                "channel_type": conn.ctype,
                "channel_ids": [self._chan(conn)],
            }
        )
        self.sync("signal", conn)

    def local(self, name: str, srcs: list[tuple[str, int]], dst: tuple[str, int], size: int):
        self.ops.append(
            {
                "name": name,
                "src_buff": [{"type": b, "index": i, "size": size} for b, i in srcs],
                "dst_buff": [{"type": dst[0], "index": dst[1], "size": size}],
            }
        )

    def flush(self, conns: list[_Conn]) -> None:
        for c in conns:
            if c.ctype == "port":
                self.sync("flush", c)


def _channel_type(path: tuple[str, ...], topology: nx.DiGraph | None) -> str:
    inner = path[1:-1]
    if topology is None:
        return "memory" if len(inner) <= 1 else "port"
    kinds = {topology.nodes[n].get("kind") if n in topology else None for n in inner}
    return "port" if kinds & _PORT_KINDS or None in kinds else "memory"


def to_mscclpp_json(
    schedule: Schedule,
    *,
    name: str | None = None,
    protocol: str = "Simple",
    inplace: bool = True,
    ninstance: int = 1,
    num_threads_per_block: int = 1024,
    use_double_scratch_buffer: bool = False,
    min_message_size: int = 0,
    max_message_size: int = U64_MAX,
    topology: nx.DiGraph | None = None,
) -> dict[str, Any]:
    """An MSCCL++ execution plan (a JSON-ready dict) running `schedule`'s trees.

    Supports allgather, reduce_scatter, allreduce and broadcast with the Simple protocol; trees
    may have any multiplicity. GPU ranks follow ``schedule.compute_nodes``; `topology` decides
    memory vs port channels from node kinds. See the module docstring for what is our
    reconstruction. Raises :class:`MscclppError` for what MSCCL++ cannot run.
    """
    coll = schedule.collective
    if coll not in COLLECTIVE_NAMES:
        raise MscclppError(
            f"MSCCL++ plans exist for {', '.join(COLLECTIVE_NAMES)}; not for {coll} (export it "
            "to MSCCL XML instead)"
        )
    if protocol != "Simple":
        raise MscclppError(
            f"protocol {protocol!r} needs LL packet operations, which this exporter does not "
            "emit; use protocol='Simple'"
        )
    if not isinstance(ninstance, int) or ninstance < 1:
        raise MscclppError(f"ninstance must be a positive integer, got {ninstance!r}")
    if num_threads_per_block <= 0 or num_threads_per_block % 32 or num_threads_per_block > 1024:
        raise MscclppError(
            f"num_threads_per_block must be a multiple of 32 up to 1024, got {num_threads_per_block}"
        )
    if not 0 <= min_message_size <= max_message_size <= U64_MAX:
        raise MscclppError(
            "need 0 <= min_message_size <= max_message_size < 2**64, got "
            f"{min_message_size} and {max_message_size}"
        )
    _check_exportable(schedule, MscclppError, unit_trees=False)

    ranks = {v: i for i, v in enumerate(schedule.compute_nodes)}
    N, k = len(ranks), schedule.k
    nroots = 1 if coll == "broadcast" else N
    C = ninstance * k * nroots
    gpus = [_Gpu(r) for r in range(N)]
    phases = {p.kind: _by_root(p) for p in schedule.phases}

    def connect(a: str, b: str, path: tuple[str, ...]) -> _Conn:
        ctype = _channel_type(path, topology)
        side = {}
        for x, y in ((a, b), (b, a)):
            peers = gpus[ranks[x]].peers[ctype]
            side[ranks[x]] = len(peers)
            peers.append(ranks[y])
        return _Conn(ctype, side)

    roots = sorted({t.root for p in schedule.phases for t in p.trees}, key=ranks.__getitem__)
    for inst in range(ninstance):
        for r in roots:
            off = 0
            trees = phases.get("broadcast", phases.get("reduce"))[r]
            for pos, lead in enumerate(trees):
                m = lead.multiplicity
                shard = 0 if coll == "broadcast" else ranks[r]
                j = shard * k * ninstance + inst * k + off
                local = inst * k + off
                off += m
                bt = phases["broadcast"][r][pos] if "broadcast" in phases else None
                rt = phases["reduce"][r][pos] if "reduce" in phases else None
                _tree_tbs(gpus, ranks, connect, coll, bt, rt, j, local, m, inplace)

    chunks = {"allgather": (C // N, C), "reduce_scatter": (C, C // N)}.get(coll, (C, C))
    plan: dict[str, Any] = {
        "name": name or f"forestcoll-{coll}-k{k}-inst{ninstance}-{schedule.topology}",
        "collective": COLLECTIVE_NAMES[coll],
        "protocol": protocol,
        "inplace": inplace,
        "reuse_resources": False,
        "gpus": [],
        "num_threads_per_block": num_threads_per_block,
        "use_double_scratch_buffer": use_double_scratch_buffer,
        "buffer_alignment": 16,
        "min_message_size": min_message_size,
        "max_message_size": max_message_size,
    }
    for g in gpus:
        plan["gpus"].append(
            {
                "id": g.rank,
                "input_chunks": chunks[0],
                "output_chunks": chunks[1],
                "scratch_chunks": g.scratch,
                "threadblocks": [
                    {
                        "id": i,
                        "ops": tb.ops,
                        "channels": [
                            {"channel_type": t, "channel_ids": ids}
                            for t, ids in tb.chans.items()
                            if ids
                        ],
                        "remote_buffer_refs": [
                            {"access_channel_type": t, "remote_buffer_ids": ids}
                            for t, ids in tb.bufs.items()
                            if ids
                        ],
                    }
                    for i, tb in enumerate(g.tbs)
                ],
                "channels": [
                    {"channel_type": t, "connected_to": peers}
                    for t, peers in g.peers.items()
                    if peers
                ],
                "remote_buffers": [
                    {"rank": rank, "type": buf, "access_channel_types": [ctype]}
                    for rank, buf, ctype in g.remote
                ],
                "semaphores": [],
            }
        )
    return plan


def _tree_tbs(gpus, ranks, connect, coll, bt: Tree | None, rt: Tree | None, j, local, m, inplace):
    """The threadblocks of one tree (both halves for allreduce) on every GPU."""
    allreduce = coll == "allreduce"
    shape = bt or rt
    fused = allreduce and rt.parent() == bt.parent()
    parent = shape.parent()
    children: dict[str, list[str]] = defaultdict(list)
    for a in shape.arcs:
        children[a.parent].append(a.child)
    down = {(a.parent, a.child): connect(a.parent, a.child, a.path) for a in shape.arcs}
    up = down
    if allreduce and not fused:  # different reduce tree: its own parent map and channels
        parent_r = rt.parent()
        children_r: dict[str, list[str]] = defaultdict(list)
        for a in rt.arcs:
            children_r[a.parent].append(a.child)
        up = {(a.parent, a.child): connect(a.parent, a.child, a.path) for a in rt.arcs}
    else:
        parent_r, children_r = parent, children
    nodes = sorted(ranks, key=ranks.__getitem__)
    tbs = {v: _Tb(gpus[ranks[v]]) for v in nodes}
    for v in nodes:
        gpus[ranks[v]].tbs.append(tbs[v])
    own = ("i", j)  # a GPU's contribution to chunk j (in place, input and output alias)
    # Reduce half: scratch slots for every child's partial sum, then wait, reduce, put up.
    if rt is not None:
        slot = {}
        for v in nodes:
            for c in children_r.get(v, []):
                slot[v, c] = gpus[ranks[v]].slot(m)
        final = ("o", local) if coll == "reduce_scatter" else ("o", j)
        for v in nodes:
            tb, kids = tbs[v], children_r.get(v, [])
            for c in kids:
                tb.sync("wait", up[v, c])
            src = own
            if kids:
                dst = final if v == rt.root else ("s", gpus[ranks[v]].slot(m))
                tb.local("re", [own, *(("s", slot[v, c]) for c in kids)], dst, m)
                src = dst
                if not allreduce:
                    for c in kids:
                        tb.sync("signal", up[v, c])
            elif v == rt.root:  # a root without children cannot happen (N >= 2)
                raise MscclppError(f"tree rooted at {v} has no arcs")
            if v != rt.root:
                p = parent_r[v]
                tb.put(src, ranks[p], ("s", slot[p, v]), m, up[p, v])
                tb.flush([up[p, v]])
                if not allreduce:
                    tb.sync("wait", up[p, v])
    # Broadcast half: the root's chunk goes down; children acknowledge unless allreduce.
    if bt is not None:
        for v in nodes:
            tb, kids = tbs[v], children.get(v, [])
            if v == bt.root:
                if coll == "allgather" and not inplace:
                    tb.local("copy", [("i", local)], ("o", j), m)
                elif coll == "broadcast" and not inplace:
                    tb.local("copy", [("i", j)], ("o", j), m)
            else:
                tb.sync("wait", down[parent[v], v])
            for c in kids:
                tb.put(("o", j), ranks[c], ("o", j), m, down[v, c])
            tb.flush([down[v, c] for c in kids])
            if not allreduce:
                if v != bt.root:
                    tb.sync("signal", down[parent[v], v])
                for c in kids:
                    tb.sync("wait", down[v, c])


# --------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------


def check_mscclpp_plan(plan: Mapping[str, Any]) -> list[str]:
    """Self-consistency problems of an MSCCL++ plan (empty when consistent): GPU and
    threadblock ids, channels that pair up between peers, buffer ids and chunk ranges in
    bounds, every ``put`` followed by a ``signal`` on its channel, and as many ``signal``\\ s on
    each channel as ``wait``\\ s on its peer's side."""
    problems: list[str] = []
    for key in (
        "name",
        "collective",
        "protocol",
        "inplace",
        "gpus",
        "num_threads_per_block",
        "use_double_scratch_buffer",
        "min_message_size",
        "max_message_size",
    ):
        if key not in plan:
            problems.append(f"missing top-level {key!r}")
    gpus = plan.get("gpus", [])
    N = len(gpus)
    chunks = []
    peers: list[dict[str, list[int]]] = []
    for pos, g in enumerate(gpus):
        if g.get("id") != pos:
            problems.append(f"gpus[{pos}] has id {g.get('id')}; the executor reads gpus[rank]")
        chunks.append(
            {
                "i": g.get("input_chunks", 0),
                "o": g.get("output_chunks", 0),
                "s": g.get("scratch_chunks", 0),
            }
        )
        flat: dict[str, list[int]] = {t: [] for t in CHANNEL_TYPES}
        for ch in g.get("channels", []):
            t = ch.get("channel_type")
            if t not in CHANNEL_TYPES:
                problems.append(f"gpu {pos}: channel type {t!r}")
                continue
            for p in ch.get("connected_to", []):
                if not (isinstance(p, int) and 0 <= p < N and p != pos):
                    problems.append(f"gpu {pos}: channel to invalid peer {p!r}")
                flat[t].append(p)
        peers.append(flat)
    # The i-th channel of a to b pairs with the i-th channel of b to a.
    pair: dict[tuple[int, str, int], tuple[int, int]] = {}
    for a in range(N):
        for t in CHANNEL_TYPES:
            nth: Counter[int] = Counter()
            for idx, b in enumerate(peers[a][t]):
                pair[a, t, idx] = (b, nth[b])
                nth[b] += 1
    for a in range(N):
        for t in CHANNEL_TYPES:
            for b, n in Counter(peers[a][t]).items():
                if 0 <= b < N and Counter(peers[b][t])[a] != n:
                    problems.append(
                        f"gpu {a} has {n} {t} channel(s) to gpu {b} but gpu {b} has "
                        f"{Counter(peers[b][t])[a]} to gpu {a}"
                    )
    signals: Counter[tuple[int, int, str, int]] = Counter()  # (from, to, type, nth)
    waits: Counter[tuple[int, int, str, int]] = Counter()  # (from peer, at, type, nth)
    for a, g in enumerate(gpus):
        remote = g.get("remote_buffers", [])
        for rb in remote:
            if not (0 <= rb.get("rank", -1) < N) or rb.get("rank") == a:
                problems.append(f"gpu {a}: remote buffer of invalid rank {rb.get('rank')!r}")
            if rb.get("type") not in ("i", "o", "s"):
                problems.append(f"gpu {a}: remote buffer type {rb.get('type')!r}")
        for tpos, tb in enumerate(g.get("threadblocks", [])):
            where = f"gpu {a} tb {tpos}"
            if tb.get("id") != tpos:
                problems.append(f"{where}: id {tb.get('id')}")
            chans = {t: [] for t in CHANNEL_TYPES}
            for ch in tb.get("channels", []):
                t = ch.get("channel_type")
                for cid in ch.get("channel_ids", []):
                    if t not in CHANNEL_TYPES or not 0 <= cid < len(peers[a].get(t, [])):
                        problems.append(f"{where}: no {t} channel {cid} on gpu {a}")
                    else:
                        chans[t].append(cid)
            refs = {t: [] for t in CHANNEL_TYPES}
            for ref in tb.get("remote_buffer_refs", []):
                t = ref.get("access_channel_type")
                for bid in ref.get("remote_buffer_ids", []):
                    if t not in CHANNEL_TYPES or not 0 <= bid < len(remote):
                        problems.append(f"{where}: no remote buffer {bid} on gpu {a}")
                    elif t not in remote[bid].get("access_channel_types", []):
                        problems.append(f"{where}: remote buffer {bid} is not reachable by {t}")
                    else:
                        refs[t].append(bid)
            unsignalled: set[tuple[str, int]] = set()
            for opos, op in enumerate(tb.get("ops", [])):
                ow = f"{where} op {opos} ({op.get('name')})"
                name = op.get("name")
                if name not in _OPS:
                    problems.append(f"{ow}: unknown op")
                    continue
                t = op.get("channel_type")
                ids = [
                    chans[t][c]
                    for c in op.get("channel_ids", [])
                    if t in chans and 0 <= c < len(chans[t])
                ]
                if len(ids) != len(op.get("channel_ids", [])):
                    problems.append(f"{ow}: channel_ids outside the threadblock's {t} channels")
                chan_peers = {pair[a, t, c][0] for c in ids}
                for side, key in (("src", "src_buff"), ("dst", "dst_buff")):
                    for buf in op.get(key, []):
                        problems += _check_buf(buf, ow, side, a, refs.get(t, []), remote, chunks)
                        if "buffer_id" in buf and 0 <= buf["buffer_id"] < len(refs.get(t, [])):
                            owner = remote[refs[t][buf["buffer_id"]]]["rank"]
                            if chan_peers and owner not in chan_peers:
                                problems.append(
                                    f"{ow}: writes gpu {owner}'s buffer over a channel to gpu "
                                    f"{sorted(chan_peers)[0]}"
                                )
                if name == "put":
                    unsignalled.update((t, c) for c in ids)
                elif name in ("signal", "wait"):
                    for c in ids:
                        b, nth = pair[a, t, c]
                        if name == "signal":
                            unsignalled.discard((t, c))
                            signals[a, b, t, nth] += 1
                        else:
                            waits[b, a, t, nth] += 1
            for t, c in sorted(unsignalled):
                problems.append(f"{where}: a put on {t} channel {c} is never followed by a signal")
    for key in sorted(set(signals) | set(waits)):
        if signals[key] != waits[key]:
            a, b, t, nth = key
            problems.append(
                f"gpu {a} signals {t} channel #{nth} to gpu {b} {signals[key]} time(s) but gpu {b} "
                f"waits on it {waits[key]} time(s)"
            )
    return problems


def _check_buf(buf, where, side, rank, refs, remote, chunks) -> list[str]:
    """Problems of one ``src_buff``/``dst_buff`` entry: unknown buffer, chunks out of range."""
    index, size = buf.get("index", -1), buf.get("size", 0)
    if "buffer_id" in buf:
        if not 0 <= buf["buffer_id"] < len(refs):
            return [f"{where}: {side} buffer_id {buf['buffer_id']} not in the threadblock's refs"]
        rb = remote[refs[buf["buffer_id"]]]
        owner, kind = rb["rank"], rb["type"]
        if not 0 <= owner < len(chunks):
            return [f"{where}: {side} buffer of invalid rank {owner}"]
    else:
        owner, kind = rank, buf.get("type")
        if kind not in ("i", "o", "s"):
            return [f"{where}: {side} buffer type {kind!r}"]
    n = chunks[owner][kind]
    if size < 1 or index < 0 or index + size > n:
        return [
            f"{where}: {side} chunks {index}..{index + size - 1} of gpu {owner}'s {kind!r} "
            f"buffer, which has {n}"
        ]
    return []
