"""A multi-variant inference engine for fine-tunes of one base: continuous batching, prefix
caching, and DroidSpeak's cross-variant cache sharing.

DroidSpeak (Liu et al., NSDI '26) serves several fine-tuned variants of one base and lets a
receiver reuse a sibling's prefix cache: the sibling's K/V for most layers, its own K/V for the
pair's recompute group [s, e), rebuilt from the sibling's hidden state entering layer s (the E
cache; brief §2.1). This module is the serving side of that mechanism (brief §2.5, our
reconstruction), in three sharing modes compared by the benchmark:

- ``"none"``: every prompt is the receiver's full prefill (the baseline);
- ``"prefix"``: vLLM's automatic prefix caching: the longest cached prefix *this* variant
  produced is reused for every layer and only the rest of the prompt is prefilled;
- ``"droidspeak"``: as ``"prefix"``, and when a sibling variant produced a longer prefix the
  engine reuses it with :func:`~datahall.kvshare.hybrid.hybrid_kv`, recomputing the group that
  ``profiles(sibling, variant)`` names (none: the pair is not shared); it picks whichever of
  the two costs fewer token-layers of compute.

After a prefill the prompt's whole blocks go into the store under the variant's own key, with
the E caches at the layers where the siblings' groups start (``profiles(variant, sibling)``).
A prefill that reused a sibling's cache is *not* stored: its KV is a hybrid, not the variant's
own, and storing it under the variant's key would hand later same-variant hits an approximation
as if it were exact (the key-safety issue of vLLM #3264 and llama.cpp #26207, brief §4).

**Scheduling** follows vLLM's continuous (iteration-level) batching: each :meth:`Engine.step`
drops cancelled requests, admits waiting ones first-come first-served (bounded by `max_batch`
running requests, a per-step token budget as vLLM's ``max_num_batched_tokens``, and the KV
byte budget), prefills them one by one (each sees the entries the previous one stored), and
then runs one decode step per variant for all its running requests as a single forward pass.
The batched cache stacks the requests' K/V with left padding, an attention mask and
per-request positions; it is rebuilt only when the batch's membership changes.

**Exactness.** Masked (padding) positions never change a result: padding filled with junk
instead of zeros gives bitwise-equal logits (tested). Batched and single decoding are *not*
bitwise equal on CPU: MKL's float32 GEMM blocks rows differently for 1, 2 and 3+ rows, and
sdpa takes a masked kernel once padding is present, so logits differ in the last bits
(≈1e-7). Greedy token ids are equal (tested); exact batch invariance would need batch-invariant
kernels (vLLM's ``VLLM_BATCH_INVARIANT``), which this CPU engine does not have. A batch of one
request runs without mask or padding, so ``max_batch=1`` decodes exactly like
:func:`~datahall.kvshare.hybrid.generate`.

A background worker thread runs the steps; requests stream their tokens to asyncio code through
a queue fed with ``loop.call_soon_threadsafe``, and record arrival, first-token and per-token
times for TTFT and inter-token latency.

**Nodes.** Several engines (nodes) share caches through Redis (a
:class:`~datahall.kvshare.store.TieredStore`). With ``shared="blob"`` whole entries go through
Redis. With ``shared="directory"`` (or ``"both"``) a node given a
:class:`~datahall.kvshare.transfer.CacheNode` serves its hot tier to its peers over TCP and
publishes a small directory record per stored entry (the key → its cache server's
``host:port``); on a miss in its own tiers a node looks the prompt up in the directory for its
own variant and the siblings it shares with, and fetches the cheapest: a same-variant entry
whole (every layer's K/V and the E caches the siblings need; the copy goes into the hot tier,
not published), or a sibling's with the pair's group [s, e) recomputed as the E cache arrives
while the other layers stream (:func:`~datahall.kvshare.transfer.fetch_hybrid`, E-first
pipelining); the hybrid is used for this request only. A fetch that fails (truncated, corrupted,
timed out, refused, unreachable) is never used: it is logged and counted, and the request is
prefilled as if the directory had not named the peer (its own tiers, else a full prefill).
:attr:`Request.transfer` holds the fetch's timings; :attr:`EngineStats.transfers` counts
outcomes.

*What blocks the worker:* the store lookups (the hot tier; Redis round trips for pointers and
directory records, two per prompt for all the variants asked, bounded by the store's socket
timeout and skipped while it backs off after an outage; in blob mode, reading a whole entry
from Redis) and the puts (the blob, in blob mode; one small directory write). *What does not:*
the transfer and the group's recompute run on the cache node's thread; the request waits
(counted as waiting, as vLLM counts a request waiting for remote KV) while the engine keeps
decoding the others, and is prefilled at the first step after its fetch ends.

>>> from datahall.kvshare.models import load
>>> with Engine({"a": load("tiny-llama")}, max_batch=2) as engine:
...     request = engine.generate(list(range(1, 20)), "a", max_new_tokens=4)
>>> len(request.output), request.finish_reason, request.prefill_kind
(4, 'length', 'full')
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

import torch
from transformers import DynamicCache

from .hybrid import Group, SenderCache, _pick, check_group, hybrid_kv, to_cache
from .models import Model, check_compatible
from .store import CacheEntry, CorruptCache, Hit, LocalStore, Location, StoreStats, TieredStore
from .transfer import (
    CacheNode,
    CorruptTransfer,
    FetchRequest,
    PeerError,
    TransferError,
    TransferTimeout,
    TruncatedTransfer,
)

__all__ = [
    "Sharing",
    "PREFILL_KINDS",
    "EngineError",
    "BadRequest",
    "UnknownModel",
    "PromptTooLong",
    "EngineUnavailable",
    "SamplingParams",
    "TRANSFER_OUTCOMES",
    "Transfer",
    "Request",
    "EngineStats",
    "Engine",
    "profiled_groups",
]

log = logging.getLogger(__name__)

Sharing = Literal["none", "prefix", "droidspeak"]
PREFILL_KINDS = ("full", "same_variant", "cross_variant")
"""How a prompt was prefilled: from scratch, on the variant's own cached prefix, or on a
sibling variant's cached prefix with the pair's group recomputed."""

TRANSFER_OUTCOMES = ("ok", "truncated", "corrupt", "timeout", "peer_error", "unreachable", "error")
"""How a fetch from a peer ended: used, or why not (the peer closed early; a checksum, the
protocol or the tokens failed; too slow; the peer refused, e.g. no longer holding the entry; no
connection; anything else)."""

KV = list[tuple[torch.Tensor, torch.Tensor]]


class EngineError(Exception):
    """A request the engine refuses; carries the OpenAI error `type`, `code`, `param` and the
    HTTP `status` a server answers with."""

    type = "invalid_request_error"
    status = 400
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(EngineError):
    """A sampling parameter out of range (400)."""


class UnknownModel(EngineError):
    """No variant of that name is served (404, like OpenAI's ``model_not_found``)."""

    status = 404
    code = "model_not_found"


class PromptTooLong(EngineError):
    """The prompt, or prompt plus the tokens asked for, exceeds the engine's limits (400,
    OpenAI's ``context_length_exceeded``)."""

    code = "context_length_exceeded"


class EngineUnavailable(EngineError):
    """The engine is not running (503): not started, stopped, or its worker failed."""

    type = "service_unavailable_error"
    status = 503


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings: greedy when ``temperature == 0``, else nucleus sampling from a
    generator seeded with `seed`; `stop` token ids end the output (the stop token is not part
    of it)."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: frozenset[int] = frozenset()


_DONE = object()


@dataclass
class Transfer:
    """A cache fetched from a peer node for one request: from whom (`peer`, its cache server's
    ``host:port``), what (the `variant` that produced it, `tokens` of the prompt, the `kind`
    of prefill it is for and the `group` recomputed), how it ended (`outcome`, one of
    :data:`TRANSFER_OUTCOMES`, and the `error`), and when: `started` (the engine asked) and
    `finished` (the fetch ended) are ``time.perf_counter()`` values; the ``_s`` fields are
    seconds after the fetch began on the cache node's loop: the E cache's arrival, the
    group's recompute start and end, the last frame's arrival (`transfer_s`), the whole fetch
    with its recompute (`total_s`); `bytes` as received, for a fetch that arrived."""

    peer: str
    variant: str
    kind: str
    group: Group
    tokens: int
    started: float = field(default_factory=time.perf_counter)
    finished: float | None = None
    outcome: str | None = None
    error: str | None = None
    e_arrived_s: float | None = None
    recompute_start_s: float | None = None
    recompute_end_s: float | None = None
    transfer_s: float | None = None
    total_s: float | None = None
    bytes: int = 0


@dataclass(eq=False)
class Request:
    """One generation request and, as it runs, its output and timings (``time.perf_counter``
    seconds). Read :attr:`output` after :meth:`wait`, or iterate :meth:`stream` from asyncio."""

    id: str
    variant: str
    prompt: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))
    output: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    """``"stop"``, ``"length"``, ``"abort"`` (cancelled or shut down) or ``"error"``."""
    error: str | None = None
    prefill_kind: str | None = None
    cached_tokens: int = 0
    """Prompt tokens whose K/V came from the store (vLLM's ``cached_tokens``)."""
    source_variant: str | None = None
    group: Group | None = None
    transfer: Transfer | None = None
    """The fetch from a peer node this request's prefill waited for (None: none)."""

    def __post_init__(self) -> None:
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._generator = torch.Generator().manual_seed(self.params.seed)
        self._kv: KV | None = None  # own K/V between prefill and joining a batch
        self._length = 0  # tokens whose K/V the cache holds

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def ttft(self) -> float | None:
        """Seconds from arrival to the first token (queueing included, as vLLM counts it)."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival

    @property
    def inter_token_latencies(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.token_times)]

    def cancel(self) -> None:
        """Ask the engine to drop this request; it does so at its next iteration and frees the
        request's cache (a client that went away)."""
        self._cancelled.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request is finished; False on timeout."""
        return self._done.wait(timeout)

    async def stream(self) -> AsyncIterator[int]:
        """The output tokens as they are produced. Leaving the loop early (or being
        cancelled, as when a client disconnects) cancels the request."""
        if self._queue is None:
            raise RuntimeError("stream() needs the request submitted from a running event loop")
        try:
            while True:
                item = await self._queue.get()
                if item is _DONE:
                    return
                yield item
        finally:
            if not self.done:
                self.cancel()

    def _bind(self, loop: asyncio.AbstractEventLoop | None) -> None:
        if loop is not None:
            self._loop, self._queue = loop, asyncio.Queue()

    def _put(self, item: object) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _emit(self, token: int, now: float) -> None:
        if self.first_token_time is None:
            self.first_token_time = now
        self.output.append(token)
        self.token_times.append(now)
        self._put(token)

    def _finish(self, reason: str, error: str | None = None) -> None:
        self._kv = None
        self.finish_reason, self.error = reason, error
        self.finish_time = time.perf_counter()
        self._done.set()
        self._put(_DONE)


@dataclass
class EngineStats:
    """A snapshot of the engine's counters (the server's metrics read these). Token counts are
    per variant; ``prefix_query_tokens``/``prefix_hit_tokens`` count prompt tokens looked up
    and reused, as vLLM's ``prefix_cache_queries``/``prefix_cache_hits`` do."""

    running: int = 0
    waiting: int = 0
    kv_cache_bytes: int = 0
    kv_cache_capacity: int = 0
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    prefills: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PREFILL_KINDS, 0))
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    generation_tokens: dict[str, int] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)
    decode_steps: int = 0
    decode_tokens: int = 0
    """Rows over all decode forward passes: ``decode_tokens / decode_steps`` is the mean
    decode batch size."""
    fetching: int = 0
    """Requests waiting for a fetch from a peer (also counted in `waiting`)."""
    transfers: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TRANSFER_OUTCOMES, 0))
    """Fetches from peers by outcome."""
    transfer_bytes: int = 0
    """Bytes of the caches received intact from peers."""
    store: StoreStats | None = None

    @property
    def kv_cache_usage(self) -> float:
        """Bytes of live request caches (padding included) over the budget: vLLM's
        ``kv_cache_usage_perc``, a fraction."""
        return self.kv_cache_bytes / self.kv_cache_capacity if self.kv_cache_capacity else 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return (
            self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0
        )


@dataclass
class _Plan:
    """How to prefill one request: `reuse` prompt tokens from `hit` (with `group` recomputed
    for a sibling's hit), costing `cost` token-layers over layers (tokens of a full pass); or
    from a peer at `location` (fetched first); `kv` is the prefix's KV once built."""

    kind: str
    cost: float
    hit: Hit | None = None
    reuse: int = 0
    group: Group | None = None
    location: Location | None = None
    kv: KV | None = None

    @property
    def source(self) -> str | None:
        if self.hit is not None:
            return self.hit.variant
        return self.location.variant if self.location is not None else None


@dataclass(eq=False)
class _Fetch:
    request: Request
    plan: _Plan
    future: concurrent.futures.Future


class _Batch:
    """The running requests of one variant as one batched cache: row b holds request b's K/V
    right-aligned (left padding), `mask` marks the real positions (None for one row: no
    padding, so a lone request runs exactly the unbatched path)."""

    def __init__(self, model, rows: list[Request], kvs: list[KV]):
        self.rows = rows
        lengths = [kv[0][0].shape[2] for kv in kvs]
        width = max(lengths)
        self.cache = DynamicCache(config=model.config)
        if len(rows) == 1:
            self.mask = None
            for i, (k, v) in enumerate(kvs[0]):
                self.cache.update(k, v, i)
            return
        self.mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, n in enumerate(lengths):
            self.mask[b, width - n :] = 1
        for i in range(len(kvs[0])):
            k0 = kvs[0][i][0]
            keys = k0.new_zeros(len(rows), k0.shape[1], width, k0.shape[3])
            values = torch.zeros_like(keys)
            for b, kv in enumerate(kvs):
                keys[b, :, width - lengths[b] :] = kv[i][0][0]
                values[b, :, width - lengths[b] :] = kv[i][1][0]
            self.cache.update(keys, values, i)  # layers in increasing order (brief §7.3)

    def row_kv(self, b: int) -> KV:
        """Request b's own K/V (views, padding cut off)."""
        n = self.rows[b]._length
        return [
            (layer.keys[b : b + 1, :, -n:], layer.values[b : b + 1, :, -n:])
            for layer in self.cache.layers
        ]

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for layer in self.cache.layers
            for t in (layer.keys, layer.values)
        )


def _kv_bytes(kv: KV | None) -> int:
    return sum(t.numel() * t.element_size() for pair in kv or () for t in pair)


class Engine:
    """Serves `models` (variant name → :class:`~datahall.kvshare.models.Model`), fine-tunes of
    one base (checked with :func:`~datahall.kvshare.models.check_compatible`), with the
    `sharing` mode of this module's docstring. `store` holds prefix caches (a
    :class:`~datahall.kvshare.store.LocalStore` or a :class:`~datahall.kvshare.store.TieredStore`
    shared through Redis); `profiles(sender, receiver)` gives a pair's recompute group (see
    :func:`profiled_groups`), None for a pair that must not share.

    Limits: at most `max_batch` running requests; per step at most `max_batch_tokens` tokens of
    prefill compute and decode rows (vLLM's ``max_num_batched_tokens``; a prompt longer than the
    budget is admitted alone); prompts of at most `max_prompt_tokens`; prompt plus new tokens
    at most `max_model_len` (the models' position limit by default); live caches at most
    `kv_cache_bytes` (default: `max_batch` requests of `max_model_len` tokens), the denominator
    of the KV-usage metric. `peers` names the variants that other nodes serve through the same
    shared store: their caches are reused here, and the E caches their groups start at are
    stored for them. `node` (a :class:`~datahall.kvshare.transfer.CacheNode` over the store's
    hot tier) serves this node's caches to its peers and fetches theirs when the store shares
    a directory (``TieredStore(..., shared="directory")``); the engine starts and closes it
    with its worker. Start the worker with :meth:`start` (or ``with Engine(...)``), or drive
    it by hand with :meth:`step` (start the node yourself then).
    """

    def __init__(
        self,
        models: Mapping[str, Model],
        *,
        store: TieredStore | LocalStore | None = None,
        profiles: Callable[[str, str], Group | None] | None = None,
        sharing: Sharing = "none",
        max_batch: int = 8,
        max_batch_tokens: int | None = None,
        max_prompt_tokens: int = 2048,
        max_model_len: int | None = None,
        kv_cache_bytes: int | None = None,
        peers: Sequence[str] = (),
        node: CacheNode | None = None,
    ):
        if not models:
            raise ValueError("an engine needs at least one model")
        if sharing not in ("none", "prefix", "droidspeak"):
            raise ValueError(f"sharing must be none, prefix or droidspeak, got {sharing!r}")
        if sharing != "none" and store is None:
            raise ValueError(
                f"sharing={sharing!r} needs a prefix-cache store: pass store=LocalStore(capacity) "
                "or a TieredStore"
            )
        if max_batch < 1 or max_prompt_tokens < 1:
            raise ValueError("max_batch and max_prompt_tokens must be positive")
        local = store.local if isinstance(store, TieredStore) else store
        if node is not None and node.store is not local:
            raise ValueError(
                "the cache node must serve the engine's hot tier: CacheNode(store.local)"
            )
        if node is None and isinstance(store, TieredStore) and store.directory:
            raise ValueError(
                f"shared={store.shared!r} needs a cache node to serve and fetch entries: pass "
                "node=CacheNode(store.local), or share blobs (shared='blob')"
            )
        self.models = dict(models)
        first = next(iter(self.models.values()))
        for model in self.models.values():
            check_compatible(first, model)
        self.base = first.base
        self.store = store
        self.node = node
        self.sharing: Sharing = sharing
        self.max_batch = max_batch
        self.max_prompt_tokens = max_prompt_tokens
        self.max_batch_tokens = max_batch_tokens or max_prompt_tokens
        config = first.config
        self.num_layers = config.num_hidden_layers
        self.max_model_len = max_model_len or getattr(config, "max_position_embeddings", 4096)
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        itemsize = first.model.dtype.itemsize
        self.kv_bytes_per_token = (
            2 * self.num_layers * config.num_key_value_heads * head_dim * itemsize
        )
        self.kv_cache_bytes = (
            kv_cache_bytes or max_batch * self.max_model_len * self.kv_bytes_per_token
        )
        self._profiles = cache(profiles) if profiles is not None else None
        # every variant of the deployment: those served here and those other nodes serve
        # through the shared store (their caches are candidates, their groups need E caches)
        self.siblings = list(self.models) + [p for p in peers if p not in self.models]

        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: dict[str, list[Request]] = {v: [] for v in self.models}
        self._batches: dict[str, _Batch] = {}
        self._stats = EngineStats(
            kv_cache_capacity=self.kv_cache_bytes,
            prompt_tokens=dict.fromkeys(self.models, 0),
            generation_tokens=dict.fromkeys(self.models, 0),
        )
        self._fetching: list[_Fetch] = []
        self._submitted = 0  # requests ever queued (wakes a step that waits for fetches)
        self._listeners: list[Callable[[Request], None]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failure: str | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def variants(self) -> list[str]:
        return list(self.models)

    @property
    def alive(self) -> bool:
        """True while the worker thread runs (what a readiness probe asks)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> Engine:
        """Start the background worker (once)."""
        if self._failure is not None:
            raise EngineUnavailable(f"the engine's worker failed: {self._failure}")
        if self.node is not None:
            self.node.start()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="kvshare-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still waiting or running finish with ``"abort"``."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self._abort_all("abort", None)  # else the worker does it when its step ends
        if self.node is not None:
            self.node.close()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_listener(self, callback: Callable[[Request], None]) -> None:
        """Call `callback(request)` when a request finishes (in the worker thread; keep it
        short). The server observes its latency histograms this way."""
        self._listeners.append(callback)

    # ---- requests --------------------------------------------------------------------------

    def submit(
        self,
        prompt: Sequence[int],
        variant: str,
        *,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[int] = (),
        request_id: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Request:
        """Queue a request for `prompt` (token ids: the caller applies any chat template) on
        `variant`. From asyncio code the request's :meth:`Request.stream` yields its tokens
        (the running loop is used unless `loop` is given). Raises :class:`EngineError`
        subclasses for bad input and :class:`EngineUnavailable` when not running."""
        if variant not in self.models:
            raise UnknownModel(
                f"The model `{variant}` does not exist; this server has {', '.join(self.models)}",
                param="model",
            )
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise BadRequest("the prompt is empty; send at least one token", param="prompt")
        if len(prompt) > self.max_prompt_tokens:
            raise PromptTooLong(
                f"the prompt has {len(prompt)} tokens; this server accepts at most "
                f"{self.max_prompt_tokens}. Shorten the prompt.",
                param="prompt",
            )
        if max_new_tokens < 1:
            raise BadRequest(
                f"max_tokens must be at least 1, got {max_new_tokens}", param="max_tokens"
            )
        if len(prompt) + max_new_tokens > self.max_model_len:
            raise PromptTooLong(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_new_tokens}) exceeds "
                f"the maximum context length of {self.max_model_len} tokens; ask for fewer tokens",
                param="max_tokens",
            )
        if not 0 <= temperature <= 100:
            raise BadRequest(
                f"temperature must be in [0, 100], got {temperature}", param="temperature"
            )
        if not 0 < top_p <= 1:
            raise BadRequest(f"top_p must be in (0, 1], got {top_p}", param="top_p")
        if self._failure is not None or self._stopping:
            raise EngineUnavailable(
                f"the engine is not running ({self._failure or 'stopped'}); restart the server"
            )
        vocab = self.models[variant].config.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise BadRequest(f"prompt token ids must be in [0, {vocab})", param="prompt")
        params = SamplingParams(
            max_new_tokens,
            float(temperature),
            float(top_p),
            secrets.randbits(62) if seed is None else int(seed) % (1 << 63),
            frozenset(int(t) for t in stop),
        )
        request = Request(request_id or uuid.uuid4().hex, variant, prompt, params)
        if loop is None:
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
        request._bind(loop)
        with self._lock:
            self._waiting.append(request)
            self._submitted += 1
            self._lock.notify_all()
        return request

    def generate(
        self, prompt: Sequence[int], variant: str, *, timeout: float | None = None, **params
    ) -> Request:
        """Submit and wait (blocking; for scripts and benchmarks). The engine must be started."""
        if not self.alive:
            raise EngineUnavailable("start the engine first (engine.start() or `with Engine(...)`)")
        request = self.submit(prompt, variant, **params)
        if not request.wait(timeout):
            request.cancel()
            raise TimeoutError(f"request {request.id} did not finish within {timeout} s")
        return request

    def stats(self) -> EngineStats:
        """A copy of the counters, with the current queue lengths."""
        with self._lock:
            stats = dataclasses.replace(
                self._stats,
                waiting=len(self._waiting) + len(self._fetching),
                fetching=len(self._fetching),
                prefills=dict(self._stats.prefills),
                transfers=dict(self._stats.transfers),
                prompt_tokens=dict(self._stats.prompt_tokens),
                generation_tokens=dict(self._stats.generation_tokens),
                finished=dict(self._stats.finished),
            )
        if self.store is not None:
            stats.store = self._local.stats
        return stats

    # ---- the scheduler ---------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while not self._stopping:
                if not self.step():
                    with self._lock:
                        self._lock.wait_for(
                            lambda: self._stopping or any(not r.cancelled for r in self._waiting),
                            timeout=0.5,
                        )
        except Exception as e:  # a bug or an out-of-memory: fail loudly, not silently hang
            log.exception("the kvshare engine's worker failed")
            self._failure = f"{type(e).__name__}: {e}"
            self._abort_all("error", self._failure)
        else:
            self._abort_all("abort", None)

    @torch.inference_mode()
    def step(self) -> bool:
        """One iteration: drop cancelled requests, admit and prefill waiting ones, one decode
        step for every running request. Returns whether there was anything to do. Call it
        yourself only on an engine whose worker is not started."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("the engine's worker is running; do not call step() as well")
        self._drop_cancelled()
        submitted = self._submitted
        prefilled = self._admit()
        decoded = False
        for variant, running in self._running.items():
            rows = [r for r in running if r not in prefilled]
            if rows:
                self._decode(variant, rows)
                decoded = True
            elif variant in self._batches:
                del self._batches[variant]  # its requests all left: free the batched cache
        live = sum(b.nbytes for b in self._batches.values())
        live += sum(_kv_bytes(r._kv) for rs in self._running.values() for r in rs)
        with self._lock:
            self._stats.kv_cache_bytes = live
            self._stats.running = sum(map(len, self._running.values()))
        busy = bool(prefilled) or decoded or any(self._running.values())
        if self._fetching and not busy:
            # only fetches under way: sleep until one ends or a request comes (not spin)
            with self._lock:
                self._lock.wait_for(
                    lambda: (
                        self._stopping
                        or self._submitted != submitted
                        or any(f.future.done() or f.request.cancelled for f in self._fetching)
                    ),
                    timeout=0.5,
                )
        return busy or bool(self._fetching)

    def _wake(self, _: object = None) -> None:
        with self._lock:
            self._lock.notify_all()

    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
        for r in gone:
            self._finish(r, "abort")
        for running in self._running.values():
            for r in [r for r in running if r.cancelled]:
                running.remove(r)
                self._finish(r, "abort")
        for f in [f for f in self._fetching if f.request.cancelled]:
            self._fetching.remove(f)
            f.future.cancel()
            self._finish(f.request, "abort")

    def _admit(self) -> list[Request]:
        """Admit waiting requests in arrival order while the limits allow, prefilling each."""
        admitted: list[Request] = []
        running = sum(map(len, self._running.values()))
        budget = self.max_batch_tokens - running
        # the KV budget is reserved for each request's longest possible cache: with no
        # preemption, an admitted request must be able to run to its length limit
        reserved = sum(self._reserve(r) for rs in self._running.values() for r in rs)
        reserved += sum(self._reserve(f.request) for f in self._fetching)
        # requests whose fetch ended were admitted before any still waiting: prefill them first
        for f in [f for f in self._fetching if f.future.done()]:
            self._fetching.remove(f)
            plan = self._fetched(f)
            budget -= plan.cost
            admitted.append(f.request)
            self._prefill(f.request, plan)
        running += len(self._fetching) + len(admitted)
        while running < self.max_batch:
            with self._lock:
                request = self._waiting[0] if self._waiting else None
            if request is None:
                break
            if request.cancelled:
                with self._lock:
                    self._waiting.popleft()
                self._finish(request, "abort")
                continue
            need = self._reserve(request)
            if running and reserved + need > self.kv_cache_bytes:
                break  # first come, first served: no overtaking the head of the queue
            plan = self._plan(request)
            if admitted and plan.cost > budget:
                break
            with self._lock:
                self._waiting.popleft()
            reserved += need
            running += 1
            if plan.location is not None:
                self._fetch(request, plan)  # prefilled at the first step after it ends
                continue
            budget -= plan.cost
            admitted.append(request)
            self._prefill(request, plan)
        return admitted

    def _reserve(self, request: Request) -> int:
        return (len(request.prompt) + request.params.max_new_tokens) * self.kv_bytes_per_token

    def _group(self, sender: str, receiver: str) -> Group | None:
        if self._profiles is None:
            return None
        group = self._profiles(sender, receiver)
        return None if group is None else check_group(group, self.num_layers)

    def _e_layers(self, variant: str) -> set[int]:
        """Layers whose E cache the siblings' groups start at (s = 0 needs none: the receiver
        embeds the tokens itself)."""
        if self.sharing != "droidspeak":
            return set()
        layers = set()
        for sibling in self.siblings:
            group = self._group(variant, sibling) if sibling != variant else None
            if group is not None and group[1] > group[0] and group[0] > 0:
                layers.add(group[0])
        return layers

    def _sources(self, variant: str) -> list[tuple[str, Group]]:
        """The siblings whose caches `variant` reuses, with the pair's groups."""
        if self.sharing != "droidspeak":
            return []
        out = []
        for sibling in self.siblings:
            group = self._group(sibling, variant) if sibling != variant else None
            if group is not None:
                out.append((sibling, group))
        return out

    def _plan(self, request: Request, *, remote: bool = True) -> _Plan:
        """The cheapest way to prefill `request`, in layer-passes over tokens: full (n), on
        its own cached prefix of m tokens (n − m), or on a sibling's with group [s, e)
        recomputed ((e − s)/L·m + n − m); from the node's own tiers, else (`remote`) from a
        peer that the directory names for a longer prefix."""
        best = self._plan_local(request)
        if remote and self.node is not None and self.node.alive:
            best = self._plan_remote(request, best)
        return best

    def _plan_remote(self, request: Request, best: _Plan) -> _Plan:
        """`best`, or a fetch from a peer whose cache makes the prefill cheaper. Transfer time
        is not weighed: a peer's longer prefix always wins (the paper's adaptation does not
        consider bandwidth either, brief §1)."""
        n = len(request.prompt)
        if self.sharing == "none" or not isinstance(self.store, TieredStore):
            return best
        if best.reuse >= n - 1:
            return best
        sources = self._sources(request.variant)
        variants = [request.variant] + [v for v, _ in sources]
        located = self.store.locate(
            request.prompt,
            self.base,
            variants,
            min_tokens=best.reuse + 1,
            exclude=self.node.address,
        )
        groups = dict(sources)
        for variant in variants:
            loc = located.get(variant)
            if loc is None or min(loc.n, n - 1) <= best.reuse:
                continue
            m = min(loc.n, n - 1)
            if variant == request.variant:
                plan = _Plan("same_variant", float(n - m), reuse=m, location=loc)
            else:
                s, e = groups[variant]
                if e > s and s > 0 and s not in loc.e_layers:
                    log.debug("%s's cache at %s lacks the E cache at %d", variant, loc.address, s)
                    continue
                cost = (e - s) / self.num_layers * m + n - m
                plan = _Plan("cross_variant", cost, reuse=m, group=(s, e), location=loc)
            if plan.cost < best.cost:
                best = plan
        return best

    def _plan_local(self, request: Request) -> _Plan:
        n = len(request.prompt)
        best = _Plan("full", float(n))
        if self.sharing == "none" or self.store is None:
            return best
        own = self.store.lookup(request.prompt, self.base, request.variant)
        if own is not None and min(own.n, n - 1) > 0:
            m = min(own.n, n - 1)  # the last prompt token is always run: its logits are needed
            best = _Plan("same_variant", float(n - m), own, m)
        if best.reuse == n - 1:
            return best
        for sibling, group in self._sources(request.variant):
            hit = self.store.lookup(request.prompt, self.base, sibling)
            if hit is None or min(hit.n, n - 1) <= best.reuse:
                continue
            s, e = group
            if e > s and s > 0 and s not in hit.entry.e_cache:
                log.debug("%s's cache lacks the E cache at layer %d; not reusing it", sibling, s)
                continue
            m = min(hit.n, n - 1)
            cost = (e - s) / self.num_layers * m + n - m
            # at equal cost a sibling's cache beats a full prefill (it is the same work, and it
            # makes the group [0, L) an exactness test of this path) but not the own cache
            if cost < best.cost or (cost == best.cost and best.kind == "full"):
                best = _Plan("cross_variant", cost, hit, m, group)
        return best

    def _prefill(self, request: Request, plan: _Plan) -> None:
        model = self.models[request.variant].model
        n, m = len(request.prompt), plan.reuse
        e_layers = self._e_layers(request.variant) if plan.kind != "cross_variant" else set()
        try:
            sent: SenderCache | None = None
            if plan.kv is not None:  # a sibling's hybrid fetched from a peer
                past = to_cache(model, plan.kv)
            elif plan.hit is None:
                past = DynamicCache(config=model.config)
            else:
                sent = plan.hit.entry.to_sender(m, dtype=model.dtype)
                kv = sent.kv if plan.kind == "same_variant" else hybrid_kv(model, sent, plan.group)
                past = to_cache(model, kv)
            out = model(
                torch.tensor([request.prompt[m:]]),
                past_key_values=past,
                use_cache=True,
                logits_to_keep=1,
                output_hidden_states=bool(e_layers),
            )
            kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
            if plan.kind != "cross_variant":
                self._put(request, kv, e_layers, out.hidden_states, sent, plan)
        except Exception as e:  # one bad request (or cache) must not take the engine down
            log.exception("prefill of request %s failed", request.id)
            self._finish(request, "error", f"{type(e).__name__}: {e}")
            return
        with self._lock:
            self._stats.prefills[plan.kind] += 1
            self._stats.prompt_tokens[request.variant] += n
            if self.sharing != "none":
                self._stats.prefix_query_tokens += n
                self._stats.prefix_hit_tokens += m
        request.prefill_kind, request.cached_tokens = plan.kind, m
        request.source_variant = plan.source
        request.group = plan.group
        request._kv, request._length = kv, n
        self._running[request.variant].append(request)
        self._accept(request, out.logits[0, -1].float())

    def _put(self, request: Request, kv: KV, e_layers: set[int], hidden, sent, plan: _Plan) -> None:
        """Store the prompt's whole blocks under the variant's own key, with the E caches the
        siblings' groups start at (those known for every stored token)."""
        if self.store is None or self.sharing == "none":
            return
        n = len(request.prompt) // self.store.block_tokens * self.store.block_tokens
        m = plan.reuse
        if n == 0 or (plan.hit is not None and plan.hit.n >= n):
            return  # nothing the store does not already hold
        e_cache = {}
        for s in sorted(e_layers):
            if m == 0:
                e_cache[s] = hidden[s][:, :n]
            elif s in plan.hit.entry.e_cache:  # the reused tokens' E cache, then the new ones'
                e_cache[s] = torch.cat([sent.e_cache[s], hidden[s]], dim=1)[:, :n]
        ids = torch.tensor([request.prompt[:n]])
        entry = CacheEntry(
            self.base, request.variant, ids, [(k[:, :, :n], v[:, :, :n]) for k, v in kv], e_cache
        )
        stored = self.store.put(entry)
        if stored and isinstance(self.store, TieredStore) and self.node and self.node.alive:
            self.store.publish(entry, self.node.address)  # peers may fetch it from here

    # ---- fetches from peers ----------------------------------------------------------------

    def _fetch(self, request: Request, plan: _Plan) -> None:
        """Start fetching the cache `plan` locates from its peer (on the cache node's thread):
        a same-variant entry whole, with the E caches this variant's siblings start at; a
        sibling's with the pair's group recomputed as the E cache arrives."""
        loc = plan.location
        assert loc is not None and self.node is not None
        if plan.kind == "same_variant":
            e_layers = tuple(sorted(self._e_layers(request.variant)))
            ask = FetchRequest((0, 0), loc.key, tuple(request.prompt[: loc.n]), e_layers)
        else:
            ask = FetchRequest(plan.group, loc.key, tuple(request.prompt[: plan.reuse]))
        request.transfer = Transfer(
            loc.address, loc.variant, plan.kind, plan.group or (0, 0), len(ask.tokens)
        )
        model = self.models[request.variant].model
        try:
            future = self.node.fetch(model, loc.host, loc.port, ask)
        except RuntimeError as e:  # the node stopped since the plan was made
            future = concurrent.futures.Future()
            future.set_exception(TransferError(f"this node's cache node is not running: {e}"))
        transfer = request.transfer

        def ended(_: concurrent.futures.Future) -> None:
            transfer.finished = time.perf_counter()
            self._wake()

        future.add_done_callback(ended)
        self._fetching.append(_Fetch(request, plan, future))

    def _fetched(self, f: _Fetch) -> _Plan:
        """The plan to prefill with now that `f`'s fetch ended: on the fetched cache if it
        arrived intact and is the prompt's, else the best without peers."""
        request, plan, t = f.request, f.plan, f.request.transfer
        assert t is not None and plan.location is not None
        try:
            got = f.future.result()
            t.bytes = got.wire_bytes
            t.e_arrived_s, t.transfer_s, t.total_s = got.e_arrived_s, got.transfer_s, got.total_s
            t.recompute_start_s, t.recompute_end_s = got.recompute_start_s, got.recompute_end_s
            if got.ids.reshape(-1).tolist() != request.prompt[: t.tokens]:
                raise CorruptTransfer(
                    f"the peer sent the cache of other tokens than the {t.tokens} asked"
                )
            if plan.kind == "same_variant":
                entry = CacheEntry(self.base, request.variant, got.ids, got.kv, got.e_cache)
                self._local.put(entry)  # the hot tier only: the peer is the published holder
                done = dataclasses.replace(plan, hit=Hit(entry, entry.n, "peer"))
            else:  # the hybrid of exactly the reused tokens (checked above)
                done = dataclasses.replace(plan, kv=got.kv)
        except Exception as e:  # never use a cache that did not arrive whole and checked
            t.outcome, t.error = _outcome(e), f"{type(e).__name__}: {e}"
            with self._lock:
                self._stats.transfers[t.outcome] += 1
            log.warning(
                "fetching %s's cache for request %s from %s failed (%s): %s; prefilling without it",
                t.variant,
                request.id,
                t.peer,
                t.outcome,
                e,
            )
            if t.outcome in ("peer_error", "unreachable") and isinstance(self.store, TieredStore):
                # the peer lacks the entry or is gone: do not send other requests there
                self.store.forget(plan.location)
            return self._plan(request, remote=False)
        t.outcome = "ok"
        with self._lock:
            self._stats.transfers["ok"] += 1
            self._stats.transfer_bytes += t.bytes
        return done

    @property
    def _local(self) -> LocalStore:
        assert self.store is not None
        return self.store.local if isinstance(self.store, TieredStore) else self.store

    def _decode(self, variant: str, rows: list[Request]) -> None:
        model = self.models[variant].model
        batch = self._batches.get(variant)
        if batch is None or batch.rows != rows:
            kvs = []
            for r in rows:
                if r._kv is not None:
                    kvs.append(r._kv)
                else:
                    kvs.append(batch.row_kv(batch.rows.index(r)))
            batch = self._batches[variant] = _Batch(model, rows, kvs)
            for r in rows:
                r._kv = None  # the batch holds it now
        ids = torch.tensor([[r.output[-1]] for r in rows])
        positions = torch.tensor([[r._length] for r in rows])
        if batch.mask is not None:
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(rows), 1)], dim=1)
        try:
            out = model(
                ids,
                attention_mask=batch.mask,
                position_ids=positions,
                past_key_values=batch.cache,
                use_cache=True,
            )
        except Exception as e:
            log.exception("decode step of %s failed", variant)
            del self._batches[variant]
            for r in rows:
                self._running[variant].remove(r)
                self._finish(r, "error", f"{type(e).__name__}: {e}")
            return
        with self._lock:
            self._stats.decode_steps += 1
            self._stats.decode_tokens += len(rows)
        logits = out.logits[:, -1].float()
        for b, r in enumerate(rows):
            r._length += 1
            self._accept(r, logits[b])

    def _accept(self, request: Request, logits: torch.Tensor) -> None:
        """Sample the next token; emit it, or finish the request on a stop token or its
        length limit."""
        p = request.params
        token = _pick(logits, p.temperature, p.top_p, request._generator)
        now = time.perf_counter()
        if request.first_token_time is None:
            request.first_token_time = now  # a stop token too is a first token (as vLLM counts)
        if token in p.stop:
            self._running[request.variant].remove(request)
            self._finish(request, "stop")
            return
        request._emit(token, now)
        with self._lock:
            self._stats.generation_tokens[request.variant] += 1
        if len(request.output) >= p.max_new_tokens:
            self._running[request.variant].remove(request)
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        request._finish(reason, error)
        with self._lock:
            self._stats.finished[reason] = self._stats.finished.get(reason, 0) + 1
        for callback in self._listeners:
            try:
                callback(request)
            except Exception:
                log.exception("a request listener failed")

    def _abort_all(self, reason: str, error: str | None) -> None:
        with self._lock:
            pending = list(self._waiting)
            self._waiting.clear()
        for running in self._running.values():
            pending += running
            running.clear()
        for f in self._fetching:
            f.future.cancel()
            pending.append(f.request)
        self._fetching.clear()
        self._batches.clear()
        for r in pending:
            if not r.done:
                self._finish(r, reason, error)
        with self._lock:
            self._stats.running = 0
            self._stats.kv_cache_bytes = 0


def _outcome(error: BaseException) -> str:
    """The :data:`TRANSFER_OUTCOMES` label of a failed fetch."""
    if isinstance(error, TruncatedTransfer):
        return "truncated"
    if isinstance(error, CorruptTransfer | CorruptCache):
        return "corrupt"
    if isinstance(error, TransferTimeout | TimeoutError):
        return "timeout"
    if isinstance(error, PeerError):
        return "peer_error"
    if isinstance(error, TransferError):
        return "unreachable"
    return "error"


def profiled_groups(max_loss: float = 0.02, **choose) -> Callable[[str, str], Group | None]:
    """`profiles` for :class:`Engine` from the pairs' offline profiles
    (:func:`~datahall.kvshare.profile.find_profile`): the group
    :meth:`~datahall.kvshare.profile.Profile.choose` picks within `max_loss` (and the other
    `choose` arguments); None for a pair without a profile or without a group that qualifies."""
    from .profile import Profile, find_profile

    def group(sender: str, receiver: str) -> Group | None:
        path = find_profile(sender, receiver)
        if path is None:
            return None
        try:
            return Profile.load(path).choose(max_loss, **choose).group
        except ValueError as e:
            log.warning("not sharing %s -> %s: %s", sender, receiver, e)
            return None

    return group
