"""Layer-by-layer streaming of prefix caches between nodes over TCP, E cache first.

DroidSpeak's receiver fetches the sender's KV for the reused layers and the E cache at its
recompute group's first layer, and "carefully pipelin[es] the layer-wise re-computation and
the loading of reused KV cache" (brief §1, §2.4): the sender streams the E cache first, so the
receiver starts recomputing [s, e) while the reused layers still arrive, and TTFT approaches
max(transfer, compute) instead of their sum (brief §2.4's TTFT model; the schedule is our
reconstruction).

A **sender** node runs a :class:`CacheServer` that answers a :class:`FetchRequest` (an opaque
key and/or the prefix tokens, and the group) with frames, in this order::

    META (n, layers, group, dtype, E layers) | IDS | E at s (if s > 0)
        | K, V of layers 0..s−1, e..L−1 | E at the other layers asked for and held | END

each carrying its own header and checksums (the frame format of :mod:`datahall.kvshare.store`).
A **receiver** iterates :func:`fetch`, which yields frames as they arrive and raises a
:class:`TransferError` on a truncated, corrupted, malformed or slow stream, so that the caller
can fall back to recomputing the prefix; :func:`fetch_hybrid` assembles the hybrid KV of
:func:`~datahall.kvshare.hybrid.hybrid_kv`, bitwise, running the group's recompute in a thread
as soon as the E cache is in. A serving node runs both sides on a :class:`CacheNode`.

**Speed.** The receiver reads each frame straight into the buffer that becomes its tensor
(``sock_recv_into``: no copy after the kernel's), the sender writes header and payload without
joining them, and frames carry crc32s (about 4× blake2b's speed here). On the 2-core test
machine, idle, a 44.8 MB SmolLM2-shaped cache (30 layers of K/V and one E cache, 1024 tokens)
moved unpaced at 10–17.5 Gb/s between two processes (two nodes; medians of two runs) and
9 Gb/s with both ends on one event loop (blake2b frames read through asyncio streams: 3.7 and
2.2 Gb/s). The two checksum passes and Python's loop bound it there: a :class:`Link` of
25 Gb/s delivered 8–14 Gb/s over such a fetch (connection and first frame included), which
measures the machine, not the link.

A :class:`Link` emulates the network between nodes: a bandwidth cap (a token bucket paced in
chunks) and a one-way latency on the sender-to-receiver direction, so a cache of b bytes takes
about ``latency + 8·b / bandwidth`` seconds; the small request is not delayed. Servers listen on
127.0.0.1 only; every read has a timeout and every loop a bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.units import parse_bandwidth, parse_time
from .hybrid import Group, SenderCache, check_group, recompute
from .store import (
    FRAME_HEADER_BYTES,
    MAGIC,
    PREAMBLE,
    VERSION,
    CacheEntry,
    CorruptCache,
    ECache,
    Kind,
    LocalStore,
    check_preamble,
    encode_frame,
    frame_parts,
    frame_tensor,
    parse_header,
)

__all__ = [
    "TransferError",
    "TruncatedTransfer",
    "CorruptTransfer",
    "TransferTimeout",
    "PeerError",
    "Link",
    "PacedWriter",
    "FetchRequest",
    "Arrival",
    "Assembled",
    "CacheServer",
    "frame_plan",
    "stream_frames",
    "fetch",
    "fetch_hybrid",
    "CacheNode",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
MAX_REQUEST_BYTES = 1 << 20


class TransferError(Exception):
    """A cache could not be received intact; nothing of it should be used (recompute instead)."""


class TruncatedTransfer(TransferError):
    """The peer closed the stream before its END frame."""


class CorruptTransfer(TransferError, CorruptCache):
    """A frame failed its checksum, or the stream broke the protocol (order, shapes)."""


class TransferTimeout(TransferError, TimeoutError):
    """The peer was too slow: no bytes within the idle timeout, or the whole transfer over its
    deadline."""


class PeerError(TransferError):
    """The sender answered with an error (no such cache, no E cache at the group's start)."""


@dataclass(frozen=True)
class Link:
    """An emulated network link: `bandwidth_bps` bits per second (None: unlimited) and a fixed
    one-way `latency_s`.

    Data is paced in chunks of about a millisecond of link time (1 KiB to 4 MiB), fine enough
    for frame arrival times and coarse enough that Python's per-chunk cost stays small. The
    emulation can only slow the path down: above what loopback TCP and the checksums sustain
    in Python (the module's "Speed"), measured times are the machine's, not the link's.
    """

    bandwidth_bps: float | None = None
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if self.bandwidth_bps is not None and not 0 < self.bandwidth_bps < math.inf:
            raise ValueError(f"bandwidth must be positive bits/s, got {self.bandwidth_bps}")
        if not 0 <= self.latency_s < math.inf:
            raise ValueError(
                f"latency must be a non-negative number of seconds, got {self.latency_s}"
            )

    @property
    def chunk_bytes(self) -> int:
        if self.bandwidth_bps is None:
            return 4 << 20
        return int(min(4 << 20, max(1024, self.bandwidth_bps / 8 * 1e-3)))

    @classmethod
    def parse(cls, bandwidth: str | float, latency: str | float = 0.0) -> Link:
        """A link from engineers' units: ``Link.parse("25Gb/s", "5us")``."""
        return cls(float(parse_bandwidth(bandwidth)) * 8, float(parse_time(latency)))

    @property
    def unlimited(self) -> bool:
        return self.bandwidth_bps is None and self.latency_s == 0

    def transfer_s(self, nbytes: int) -> float:
        """The time `nbytes` take on this link: latency + serialization."""
        rate = 0.0 if self.bandwidth_bps is None else 8 * nbytes / self.bandwidth_bps
        return self.latency_s + rate


class PacedWriter:
    """Writes to a stream as if through `link`: a chunk leaves the link's queue when the link
    has serialized everything before it (a token bucket of one chunk) and reaches the peer
    `latency_s` later. Delivery times come from the link model, not from when sleeps return,
    so a late wake-up on a loaded machine does not add up over a transfer."""

    def __init__(self, writer: asyncio.StreamWriter, link: Link | None, *, max_queued: int = 16):
        self.writer = writer
        self.link = link or Link()
        self._queue: asyncio.Queue[tuple[float, memoryview] | None] = asyncio.Queue(max_queued)
        self._task: asyncio.Task | None = None
        self._wire_free = 0.0
        self.bytes_written = 0

    async def write(self, data: bytes) -> None:
        self.bytes_written += len(data)
        if self.link.unlimited:
            self.writer.write(data)
            await self.writer.drain()
            return
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = loop.create_task(self._deliver())
        view = memoryview(data)
        bps = self.link.bandwidth_bps
        for i in range(0, len(view), self.link.chunk_bytes):
            chunk = view[i : i + self.link.chunk_bytes]
            start = max(loop.time(), self._wire_free)
            self._wire_free = start + (0.0 if bps is None else 8 * len(chunk) / bps)
            await self._put((self._wire_free + self.link.latency_s, chunk))

    async def _put(self, item: tuple[float, memoryview] | None) -> None:
        assert self._task is not None
        if not self._queue.full():
            self._queue.put_nowait(item)
            return
        # wait for room, unless the delivery fails meanwhile (the peer went away)
        put = asyncio.ensure_future(self._queue.put(item))
        await asyncio.wait({put, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            await self._task  # raises the delivery's error
            raise ConnectionError("the link's delivery stopped")

    async def _deliver(self) -> None:
        loop = asyncio.get_running_loop()
        while (item := await self._queue.get()) is not None:
            at, chunk = item
            if (delay := at - loop.time()) > 0:
                await asyncio.sleep(delay)
            self.writer.write(chunk)
            await self.writer.drain()

    async def flush(self) -> None:
        """Wait until everything written has been delivered."""
        if self._task is not None:
            await self._put(None)
            await self._task
            self._task = None
        await self.writer.drain()

    def abort(self) -> None:
        if self._task is not None:
            self._task.cancel()


@dataclass(frozen=True)
class FetchRequest:
    """What a receiver asks a sender for: the recompute `group` it will run, and the cache by
    an opaque `key` (e.g. a store key) and/or the prefix `tokens`; the sender's resolver
    interprets them. `e_layers` asks for more E caches, sent after the KV (those the sender
    holds): a node that keeps a same-variant copy keeps the E caches its siblings start at."""

    group: Group
    key: str = ""
    tokens: tuple[int, ...] = ()
    e_layers: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "group": list(self.group),
            "key": self.key,
            "tokens": list(self.tokens),
            "e_layers": list(self.e_layers),
        }

    @classmethod
    def from_json(cls, obj: Any) -> FetchRequest:
        try:
            s, e = (int(x) for x in obj["group"])
            return cls(
                (s, e),
                str(obj.get("key", "")),
                tuple(int(t) for t in obj.get("tokens", ())),
                tuple(int(i) for i in obj.get("e_layers", ())),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptTransfer(f"malformed fetch request: {exc}") from None


def frame_plan(
    num_layers: int, group: Group | None, e_layers: Iterable[int] = ()
) -> list[tuple[Kind, int]]:
    """The data frames a sender streams for `group`, in order: the token ids, the E cache at s
    (first, so the recompute can start; none for s = 0, where the receiver embeds the ids),
    then K and V of each reused layer in layer order, the order the receiver's suffix pass
    consumes them, then the E caches of the other `e_layers` asked for."""
    s, e = check_group(group, num_layers)
    plan = [(Kind.IDS, 0)]
    if e > s and s > 0:
        plan.append((Kind.E, s))
    for i in [*range(s), *range(e, num_layers)]:
        plan += [(Kind.K, i), (Kind.V, i)]
    for i in sorted(set(e_layers)):
        if not 0 <= i < num_layers:
            raise ValueError(f"E layer {i} is outside the model's {num_layers} layers")
        if (Kind.E, i) not in plan:
            plan.append((Kind.E, i))
    return plan


def _json_frame(kind: Kind, obj: Any) -> bytes:
    data = json.dumps(obj, sort_keys=True).encode()
    return encode_frame(kind, 0, torch.frombuffer(bytearray(data), dtype=torch.uint8))


def _frame_json(t: torch.Tensor) -> Any:
    try:
        return json.loads(bytes(t.tolist()).decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptTransfer(f"a control frame is not JSON: {e}") from None


def stream_frames(
    source: SenderCache, group: Group | None, e_layers: Iterable[int] = ()
) -> Iterator[bytes]:
    """The encoded frames a sender streams for `group` (META, the plan's frames, END), each
    encoded only when reached, so the first frames leave before the last are built; the E
    caches of `e_layers` that `source` holds follow the KV (META lists them). Raises
    :class:`MissingECache` before any frame if the E cache at s is not held."""
    for head, payload in _stream_parts(source, group, e_layers):
        yield b"".join((head, payload))


def _held(source: SenderCache, layer: int) -> bool:
    try:
        source.e_cache[layer]  # noqa: B018
    except (LookupError, IndexError):
        return False
    return True


def _stream_parts(
    source: SenderCache, group: Group | None, e_layers: Iterable[int] = ()
) -> Iterator[tuple[bytes, Any]]:
    """:func:`stream_frames` as (header, payload view) pairs, written without joining."""
    s, e = check_group(group, source.num_layers)
    extra = sorted({i for i in e_layers if 0 <= i < source.num_layers and _held(source, i)})
    plan = frame_plan(source.num_layers, (s, e), extra)
    if e > s and s > 0:
        source.e_cache[s]  # noqa: B018 -- fail before streaming anything
    k0 = source.kv[0][0]
    meta = {
        "n": source.n,
        "num_layers": source.num_layers,
        "group": [s, e],
        "dtype": str(k0.dtype).removeprefix("torch."),
        "kv_shape": list(k0.shape),
        "e_layers": extra,
    }
    yield _json_frame(Kind.META, meta), b""
    for kind, layer in plan:
        if kind is Kind.IDS:
            tensor = source.ids.reshape(1, -1).long()
        elif kind is Kind.E:
            tensor = source.e_cache[layer]
        else:
            tensor = source.kv[layer][0 if kind is Kind.K else 1]
        yield frame_parts(kind, layer, tensor)
    yield frame_parts(Kind.END, 0, torch.tensor([len(plan)], dtype=torch.int64))


Resolver = Callable[[FetchRequest], "SenderCache | CacheEntry | None"]


class CacheServer:
    """The sender node's side: serves caches that `resolve` finds (a SenderCache, a store
    entry, or None for "not here") to receivers, through an emulated `link`.

    Use as ``async with CacheServer(resolve, link=Link(25e9)) as server:`` and give receivers
    ``server.port``. The resolver runs in a worker thread (it may read Redis). Each connection
    gets `timeout_s` in all; the request must arrive within `request_timeout_s`.
    """

    def __init__(
        self,
        resolve: Resolver,
        *,
        link: Link | None = None,
        port: int = 0,
        timeout_s: float = 60.0,
        request_timeout_s: float = 5.0,
    ):
        self.resolve = resolve
        self.link = link
        self.timeout_s = timeout_s
        self.request_timeout_s = request_timeout_s
        self._port = port
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.served = 0

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the cache server is not started")
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> int:
        # loopback only: nodes of one machine; a real deployment puts a network here
        self._server = await asyncio.start_server(self._handle, HOST, self._port)
        return self.port

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5.0)
        self._server = None

    async def __aenter__(self) -> CacheServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        out = PacedWriter(writer, self.link)
        try:
            async with asyncio.timeout(self.timeout_s):
                request = await asyncio.wait_for(_read_request(reader), self.request_timeout_s)
                try:
                    source = await asyncio.to_thread(self.resolve, request)
                    if isinstance(source, CacheEntry):
                        source = source.to_sender(dtype=source.dtype)
                    if source is None:
                        raise LookupError(f"no cache here for key {request.key!r}")
                    frames = _stream_parts(source, request.group, request.e_layers)
                    first = next(frames)  # MissingECache / a bad group surface here
                except Exception as e:  # the receiver must hear why, then recompute
                    if not isinstance(e, (LookupError, ValueError)):
                        log.exception("resolving a cache request failed")
                    await out.write(PREAMBLE.pack(MAGIC, VERSION, 0))
                    await out.write(_json_frame(Kind.ERROR, {"error": str(e)}))
                    await out.flush()
                    return
                await out.write(PREAMBLE.pack(MAGIC, VERSION, 0) + first[0])
                for head, payload in frames:  # bounded: one plan
                    await out.write(head)
                    await out.write(payload)
                await out.flush()
                self.served += 1
        except (TransferError, CorruptCache, TimeoutError, ConnectionError) as e:
            log.info("cache transfer to a peer ended early: %s", e)
        finally:
            out.abort()
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            self._tasks.discard(task)


async def _read_request(reader: asyncio.StreamReader) -> FetchRequest:
    try:
        check_preamble(await reader.readexactly(PREAMBLE.size))
        head = parse_header(await reader.readexactly(FRAME_HEADER_BYTES))
        if head.kind is not Kind.REQUEST or head.nbytes > MAX_REQUEST_BYTES:
            raise CorruptTransfer(f"expected a request of at most 1 MiB, got {head.kind.name}")
        payload = await reader.readexactly(head.nbytes)
    except asyncio.IncompleteReadError:
        raise TruncatedTransfer("the receiver closed before sending its whole request") from None
    return FetchRequest.from_json(_frame_json(frame_tensor(head, payload)))


@dataclass(frozen=True)
class Arrival:
    """A frame as received: kind, layer, tensor (None for META, whose dict is `meta`), the
    ``time.perf_counter()`` of its last byte, and the bytes received so far, its own
    included."""

    kind: Kind
    layer: int
    tensor: torch.Tensor | None
    t: float
    wire_bytes: int
    meta: dict[str, Any] | None = None


def _check_meta(meta: Any, request: FetchRequest) -> tuple[int, list[tuple[Kind, int]]]:
    """The prefix length and the frame plan META announces, if it is what was asked."""
    try:
        n, L = int(meta["n"]), int(meta["num_layers"])
        group = check_group(tuple(meta["group"]), L)
        extra = [int(i) for i in meta.get("e_layers", ())]
        plan = frame_plan(L, group, extra)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptTransfer(f"malformed META frame: {e}") from None
    if n < 1 or group != check_group(request.group, L):
        raise CorruptTransfer(
            f"the sender streams group {group} of {n} tokens; asked {request.group}"
        )
    if not set(extra) <= set(request.e_layers):
        raise CorruptTransfer(f"the sender streams E caches {extra}; asked {request.e_layers}")
    return n, plan


async def fetch(
    port: int,
    request: FetchRequest,
    *,
    host: str = HOST,
    timeout_s: float = 60.0,
    idle_timeout_s: float = 5.0,
) -> AsyncIterator[Arrival]:
    """Ask the sender at `host`:`port` for a cache and yield its frames as they arrive: META
    first, then the data frames of :func:`frame_plan`, each checked (header and payload
    crc32s, the plan's order, consistent shapes). END is checked, not yielded.

    Raises :class:`TruncatedTransfer`, :class:`CorruptTransfer`, :class:`TransferTimeout`
    (no byte for `idle_timeout_s`, or past `timeout_s` in all) or :class:`PeerError`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    received = 0
    what = "the stream's start"

    async def read(nbytes: int) -> bytearray:
        """The next `nbytes`, received straight into a buffer of their own (the tensor's
        memory: no copy after the kernel's)."""
        nonlocal received
        buf = bytearray(nbytes)
        view = memoryview(buf)
        got = 0
        try:
            while got < nbytes:
                budget = min(idle_timeout_s, deadline - loop.time())
                if budget <= 0:
                    raise TimeoutError
                async with asyncio.timeout(budget):
                    chunk = await loop.sock_recv_into(sock, view[got:])
                if chunk == 0:
                    raise TruncatedTransfer(
                        f"the sender closed the stream after {received + got} bytes, in "
                        f"{what}; recompute the prefix"
                    )
                got += chunk
        except ConnectionError as e:
            raise TruncatedTransfer(
                f"the connection broke after {received + got} bytes, in {what}: {e}"
            ) from None
        except TimeoutError:
            raise TransferTimeout(
                f"no cache bytes from {host}:{port} for {idle_timeout_s:g} s (or past the "
                f"{timeout_s:g} s deadline) after {received + got} bytes, in {what}"
            ) from None
        received += nbytes
        return buf

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        try:
            async with asyncio.timeout(max(0.0, min(idle_timeout_s, deadline - loop.time()))):
                await loop.sock_connect(sock, (host, port))
        except TimeoutError:
            raise TransferTimeout(f"no connection to the sender at {host}:{port} in time") from None
        except OSError as e:
            raise TransferError(f"cannot connect to the sender at {host}:{port}: {e}") from None
        try:
            ask = PREAMBLE.pack(MAGIC, VERSION, 0) + _json_frame(Kind.REQUEST, request.to_json())
            async with asyncio.timeout(max(0.0, min(idle_timeout_s, deadline - loop.time()))):
                await loop.sock_sendall(sock, ask)
        except (ConnectionError, TimeoutError) as e:
            raise TransferError(f"the sender at {host}:{port} dropped the request: {e}") from None
        try:
            check_preamble(await read(PREAMBLE.size))
        except CorruptCache as e:
            raise CorruptTransfer(str(e)) from None
        plan: list[tuple[Kind, int]] | None = None
        n = 0
        kv_shape: torch.Size | None = None
        # at most META + the plan + END frames; the bound is set once META says how many
        for index in range(2 + 2 * 65536):
            what = "a frame header"
            try:
                head = parse_header(await read(FRAME_HEADER_BYTES))
                what = f"the {head.kind.name} frame of layer {head.layer}"
                tensor = frame_tensor(head, await read(head.nbytes), owned=True)
            except CorruptCache as e:
                raise CorruptTransfer(f"{e}; recompute the prefix") from None
            t = time.perf_counter()
            if head.kind is Kind.ERROR:
                raise PeerError(_frame_json(tensor).get("error", "unknown error"))
            if plan is None:
                if head.kind is not Kind.META:
                    raise CorruptTransfer(f"the stream starts with {head.kind.name}, not META")
                meta = _frame_json(tensor)
                n, plan = _check_meta(meta, request)
                yield Arrival(Kind.META, 0, None, t, received, meta)
                continue
            if index > len(plan):
                if head.kind is not Kind.END or tensor.tolist() != [len(plan)]:
                    raise CorruptTransfer(f"expected END after {len(plan)} frames, got {what}")
                return
            want = plan[index - 1]
            if (head.kind, head.layer) != want:
                raise CorruptTransfer(f"expected {want[0].name} of layer {want[1]}, got {what}")
            shape = tensor.shape
            ok = {
                Kind.IDS: shape == (1, n),
                Kind.E: len(shape) == 3 and shape[:2] == (1, n),
                Kind.K: len(shape) == 4 and shape[2] == n and kv_shape in (None, shape),
                Kind.V: shape == kv_shape,
            }[head.kind]
            if not ok:
                raise CorruptTransfer(f"{what} has shape {tuple(shape)} for a {n}-token prefix")
            if head.kind is Kind.K:
                kv_shape = shape
            yield Arrival(head.kind, head.layer, tensor, t, received)
        raise CorruptTransfer("the stream has more frames than any plan")
    finally:
        sock.close()


@dataclass
class Assembled:
    """A receiver's hybrid prefix KV built from a fetched cache, and when things happened, in
    seconds after the request: the E cache's arrival, the recompute's start and end, the last
    frame's arrival, and the whole fetch; `e_cache` holds the E caches received."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    ids: torch.Tensor
    group: Group
    arrivals: list[Arrival] = field(repr=False)
    e_arrived_s: float | None
    recompute_start_s: float | None
    recompute_end_s: float | None
    transfer_s: float
    total_s: float
    wire_bytes: int
    e_cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def compute_s(self) -> float:
        if self.recompute_start_s is None or self.recompute_end_s is None:
            return 0.0
        return self.recompute_end_s - self.recompute_start_s


def _recompute(
    receiver: Any, ids: torch.Tensor, e_in: torch.Tensor | None, group: Group, num_layers: int
) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], float, float]:
    start = time.perf_counter()
    s, e = group
    # recompute reads only the ids (s = 0) or the E cache at s; no KV is needed to start
    partial = SenderCache(ids, [], ECache({} if e_in is None else {s: e_in}, num_layers))
    out = {i: (k, v) for i, k, v in recompute(receiver, partial, s, e)}
    return out, start, time.perf_counter()


async def fetch_hybrid(
    receiver: Any,
    port: int,
    request: FetchRequest,
    *,
    host: str = HOST,
    pipelined: bool = True,
    timeout_s: float = 60.0,
    idle_timeout_s: float = 5.0,
) -> Assembled:
    """The `receiver` model's hybrid prefix KV for ``request.group``, from the sender at
    `port`: equal to ``hybrid_kv(receiver, sent, group)`` for the sender's cache.

    With `pipelined`, the group's recompute starts in a worker thread as soon as its input is
    in (the E frame, or the ids for s = 0) while the reused layers keep streaming (E-first
    pipelining, brief §2.4); without, it starts after the last frame (the serial baseline).
    Raises :class:`TransferError` subclasses as :func:`fetch` does.
    """
    model_dtype = next(receiver.parameters()).dtype
    num_layers = receiver.config.num_hidden_layers
    t0 = time.perf_counter()
    ids: torch.Tensor | None = None
    e_in: torch.Tensor | None = None
    e_at: float | None = None
    e_cache: dict[int, torch.Tensor] = {}
    keys: dict[int, torch.Tensor] = {}
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    arrivals: list[Arrival] = []
    group: Group = (0, 0)
    task: asyncio.Future | None = None

    def start() -> asyncio.Future:
        assert ids is not None
        return asyncio.ensure_future(
            asyncio.to_thread(_recompute, receiver, ids, e_in, group, num_layers)
        )

    try:
        async with aclosing(
            fetch(port, request, host=host, timeout_s=timeout_s, idle_timeout_s=idle_timeout_s)
        ) as frames:
            async for a in frames:
                arrivals.append(a)
                if a.kind is Kind.META:
                    assert a.meta is not None
                    if a.meta["num_layers"] != num_layers:
                        raise CorruptTransfer(
                            f"the sender's model has {a.meta['num_layers']} layers, the "
                            f"receiver's {num_layers}: not variants of one base"
                        )
                    group = check_group(tuple(a.meta["group"]), num_layers)
                    continue
                assert a.tensor is not None
                tensor = a.tensor if a.kind is Kind.IDS else a.tensor.to(model_dtype)
                s, e = group
                start_e = a.kind is Kind.E and a.layer == s and e > s  # the group's input
                if a.kind is Kind.IDS:
                    ids = tensor
                elif a.kind is Kind.E:
                    e_cache[a.layer] = tensor
                    if start_e:
                        e_in, e_at = tensor, a.t - t0
                elif a.kind is Kind.K:
                    keys[a.layer] = tensor
                else:
                    kv[a.layer] = (keys.pop(a.layer), tensor)
                ready = start_e or (a.kind is Kind.IDS and s == 0)
                if pipelined and task is None and e > s and ready:
                    task = start()
        transfer_end = time.perf_counter()
        s, e = group
        if task is None and e > s:
            task = start()
        rec_start = rec_end = None
        if task is not None:
            recomputed, rs, re_ = await task
            task = None
            kv.update(recomputed)
            rec_start, rec_end = rs - t0, re_ - t0
    finally:
        if task is not None:  # a failed transfer: its recompute's result is not wanted
            task.cancel()
    assert ids is not None
    return Assembled(
        [kv[i] for i in range(num_layers)],
        ids,
        group,
        arrivals,
        e_at,
        rec_start,
        rec_end,
        transfer_end - t0,
        time.perf_counter() - t0,
        arrivals[-1].wire_bytes if arrivals else 0,
        e_cache,
    )


class CacheNode:
    """A serving node's side of DroidSpeak's cross-node path: a :class:`CacheServer` over the
    node's hot tier (`store`), paced by `link`, and the node's fetches from its peers, all on
    one event loop in a thread of its own, so transfers neither wait for the engine's steps
    nor block them.

    Peers ask for an entry by its store key and the prompt tokens they share with it; the
    resolver serves the entry truncated to those tokens, after checking them (None, "no cache
    here", when the entry was evicted or does not match). :attr:`address` is what the node
    publishes in the directory. :meth:`fetch` runs :func:`fetch_hybrid` with the node's
    timeouts and returns a :class:`concurrent.futures.Future`.

    >>> from datahall.kvshare.store import LocalStore
    >>> with CacheNode(LocalStore(1 << 20)) as node:
    ...     node.address.startswith("127.0.0.1:")
    True
    """

    def __init__(
        self,
        store: LocalStore,
        *,
        link: Link | None = None,
        port: int = 0,
        timeout_s: float = 30.0,
        idle_timeout_s: float = 2.0,
    ):
        self.store = store
        self.link = link
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.server = CacheServer(self._resolve, link=link, port=port, timeout_s=timeout_s)
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._address: str | None = None

    @property
    def address(self) -> str:
        """``host:port`` of the cache server (once started; kept after it stops)."""
        if self._address is None:
            raise RuntimeError("the cache node is not started")
        return self._address

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> CacheNode:
        """Start the loop thread and listen (once). Raises OSError naming the port if it is
        taken."""
        if self._thread is not None:
            return self
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kvshare-transfer", daemon=True
        )
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(10)
        except OSError as e:
            self.close()
            raise OSError(
                f"cannot listen for cache transfers on {HOST}:{self._port}: "
                f"{e.strerror or e}; pick another cache port (0 picks a free one)"
            ) from None
        self._address = f"{HOST}:{self.server.port}"
        return self

    def close(self) -> None:
        """Stop serving, cancel fetches under way (their futures are cancelled), stop the
        thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            await self.server.close()
            mine = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not mine]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5.0)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> CacheNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _resolve(self, request: FetchRequest) -> CacheEntry | None:
        entry = self.store.get(request.key)
        if entry is None:
            return None
        tokens = list(request.tokens)
        if tokens:
            if len(tokens) > entry.n or entry.ids[0, : len(tokens)].tolist() != tokens:
                return None
            entry = entry.truncate(len(tokens))
        return entry

    def fetch(
        self, receiver: Any, host: str, port: int, request: FetchRequest
    ) -> concurrent.futures.Future[Assembled]:
        """Start :func:`fetch_hybrid` of `request` from the peer at `host`:`port` for the
        `receiver` model (E-first pipelined); cancelling the future cancels the transfer."""
        if self._loop is None:
            raise RuntimeError("start the cache node first")
        return asyncio.run_coroutine_threadsafe(
            fetch_hybrid(
                receiver,
                port,
                request,
                host=host,
                timeout_s=self.timeout_s,
                idle_timeout_s=self.idle_timeout_s,
            ),
            self._loop,
        )
