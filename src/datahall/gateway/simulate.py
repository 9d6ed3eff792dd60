"""A simulated OpenAI-compatible LLM server: the backend of the gateway's tests and benchmarks.

In the spirit of llm-d's ``llm-d-inference-sim`` (brief §5, "Backend simulator"; the model is our
reconstruction), each server answers like vLLM without a model and takes the time a model would:

- ``POST /v1/chat/completions`` and ``/v1/completions``, whole or streamed as server-sent events
  (a role chunk, one chunk per token, a chunk with ``finish_reason``, an optional ``usage`` chunk,
  ``data: [DONE]``); ``POST /v1/embeddings`` (deterministic unit vectors); ``GET /v1/models``,
  ``/health`` and ``/metrics``.
- **A queue**: at most ``max_running`` requests run at once, as in continuous batching; the others
  wait first-in first-out. A request that names a LoRA adapter also needs its adapter among the
  ``max_lora`` active ones (one already active, or a free slot), else later requests pass it.
- **Service times** (:func:`service_times`, a pure function): time to first token
  ``(a + b · uncached_prompt_tokens) / speed`` after the wait, then one token every
  ``itl · (1 + growth · (running − 1)) / speed``; tokens ≈ characters / 4.
- **A KV prefix cache**: the prompt's 64-character blocks, chain-hashed as the gateway hashes them
  (:mod:`datahall.gateway.prefix`), in an LRU of ``kv_blocks`` blocks; a request's leading cached
  blocks are not prefilled again and show as ``usage.prompt_tokens_details.cached_tokens``.
- **Metrics** with vLLM's names, so the gateway's scraper reads a simulator as it reads vLLM
  (brief §2.1 fallback): ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
  ``vllm:kv_cache_usage_perc``, ``vllm:prefix_cache_queries`` and ``_hits`` (in tokens),
  ``vllm:lora_requests_info`` (labels ``max_lora``, ``running_lora_adapters``,
  ``waiting_lora_adapters``), ``vllm:time_to_first_token_seconds``, ...
- **ORCA** (brief §2.1): a request with ``endpoint-load-metrics-format: text|json|bin`` gets an
  ``endpoint-load-metrics`` header with ``named_metrics.kv_cache_usage_perc``,
  ``named_metrics.num_requests_waiting`` and ``application_utilization`` = running / max_running,
  a snapshot at response start (when a stream's headers go out; when a whole answer is ready).
- **Faults** for tests (:class:`Faults`, changeable while the server runs): a forced status (429
  with ``Retry-After``, 503, ...) for all or the next N requests, a random error rate, a cut after
  k stream chunks, or the whole server down.

Time is real (``asyncio.sleep``): this is a server. :func:`serve_backends` runs several on
127.0.0.1 in one process, each with its own `speed`, for unequal backends:

>>> with serve_backends([SimConfig(speed=1.0), SimConfig(speed=2.0)]) as backends:  # doctest: +SKIP
...     httpx.post(backends[0].url + "/v1/completions", json={"model": "sim-llm", "prompt": "Hi"})
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import random
import struct
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..core.http import E2E_BUCKETS, TTFT_BUCKETS, ClientDisconnected, unless_disconnected
from .orca import ENDPOINT_LOAD_METRICS_FORMAT, OrcaError, OrcaLoadReport, orca_headers
from .prefix import BLOCK_CHARS, PrefixIndex, hash64, prefix_hashes, request_text
from .transform import openai_sse

__all__ = [
    "Faults",
    "SimConfig",
    "ServiceTimes",
    "SimStats",
    "Simulator",
    "RunningBackend",
    "count_tokens",
    "cached_tokens",
    "prefill_seconds",
    "itl_seconds",
    "service_times",
    "fake_embedding",
    "create_app",
    "serve_backends",
    "run_backends",
]

BACKEND_HEADER = "x-sim-backend"
"""Response header naming the simulator that answered, so tests see where a request went."""

# The generated text: seeded picks from a small fixed vocabulary, one word a token.
# fmt: off
_WORDS = (
    "the", "model", "answers", "with", "plain", "words", "that", "carry", "no", "meaning", "but",
    "keep", "a", "steady", "rhythm", "of", "tokens", "so", "every", "test", "sees", "same",
    "text", "for", "prompt", "and", "benchmark", "pays", "each", "token", "it", "asks", "about",
    "one", "at", "time", "while", "queue", "moves", "forward",
)
# fmt: on

# ---- configuration -------------------------------------------------------------------------


class Faults(BaseModel):
    """Faults a simulator injects, for tests of the gateway's resilience (issue 6, "Bad input").
    Assignments are validated, so a test can change them while the server runs:
    ``backend.sim.faults.status = 503``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    down: bool = False
    """Every route, ``/health`` included, answers 503."""
    status: int | None = Field(None, ge=400, le=599)
    """Completions and embeddings answer this status instead of working."""
    status_count: int | None = Field(None, ge=0)
    """Only the next `status_count` requests get `status` (None: all of them)."""
    retry_after_s: float | None = Field(None, ge=0)
    """With `status`, send ``Retry-After`` (whole seconds, rounded up) and ``retry-after-ms``."""
    error_rate: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of requests failing at random (seeded by the config's `seed`) with `error_status`."""
    error_status: int = Field(500, ge=400, le=599)
    disconnect_after_chunks: int | None = Field(None, ge=0)
    """Streams close the connection after this many SSE chunks, without ``[DONE]``."""


class SimConfig(BaseModel):
    """One simulated server: its models, queue, timing model (brief §5), cache and faults.
    Times are seconds; `speed` divides all of them, so ``speed=2`` is a server twice as fast.

    >>> SimConfig(speed=2.0, max_running=4).max_running
    4
    """

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    """Shown in ``x-sim-backend``; :func:`serve_backends` names unnamed ones ``sim-<i>``."""
    models: list[str] = Field(default_factory=lambda: ["sim-llm"], min_length=1)
    """Served base model names (the first labels the metrics, as vLLM's ``model_name``)."""
    lora_adapters: list[str] = Field(default_factory=list)
    """LoRA adapters, served as models of their own on top of the first base model."""
    max_lora: int = Field(1, ge=1)
    """Adapters that can be active at once (vLLM's ``--max-loras``)."""
    max_running: int = Field(8, ge=1)
    """Requests decoded together (vLLM's ``--max-num-seqs``); the rest wait in FIFO order."""
    ttft_base_s: float = Field(0.02, ge=0)
    """`a` of TTFT = a + b · uncached prompt tokens."""
    prefill_s_per_token: float = Field(0.0005, ge=0)
    """`b` of TTFT = a + b · uncached prompt tokens."""
    itl_s: float = Field(0.01, ge=0)
    """Inter-token latency with one request running."""
    itl_growth: float = Field(0.0, ge=0)
    """Relative growth of the inter-token latency per other running request."""
    speed: float = Field(1.0, gt=0)
    kv_blocks: int = Field(4096, ge=0)
    """KV-cache capacity in blocks: the prefix cache's LRU size, and 100 % KV usage."""
    block_chars: int = Field(BLOCK_CHARS, ge=1)
    chars_per_token: int = Field(4, ge=1)
    max_model_len: int = Field(32768, ge=2)
    default_max_tokens: int = Field(16, ge=1)
    response_tokens: int | None = Field(None, ge=1)
    """The natural answer length: a request whose max_tokens is larger ends after this many
    tokens with finish_reason "stop" (unless ``ignore_eos``); None: always "length"."""
    embedding_dim: int = Field(384, ge=1)
    seed: int = 0
    faults: Faults = Field(default_factory=Faults)

    @model_validator(mode="after")
    def _check(self) -> SimConfig:
        if self.block_chars % self.chars_per_token:
            raise ValueError(
                f"block_chars ({self.block_chars}) must be a multiple of chars_per_token "
                f"({self.chars_per_token}): a cache block holds whole tokens"
            )
        clash = sorted(set(self.models) & set(self.lora_adapters))
        if clash:
            raise ValueError(f"names used both as a model and an adapter: {', '.join(clash)}")
        return self

    @property
    def block_tokens(self) -> int:
        """Tokens in one KV block (16 with the defaults, as vLLM's)."""
        return self.block_chars // self.chars_per_token


# ---- the timing model (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class ServiceTimes:
    """What one request costs on an idle-enough server, queueing excluded (brief §5)."""

    ttft_s: float
    """Prefill: time from admission to the first token."""
    itl_s: float
    """Time between two tokens."""
    e2e_s: float
    """From admission to the last token: ttft + (completion_tokens − 1) · itl."""


def count_tokens(text: str, chars_per_token: int = 4) -> int:
    """Tokens of `text` by the usual pre-check estimate (brief §6): characters / 4, rounded up.

    >>> count_tokens("Hello, world"), count_tokens("a"), count_tokens("")
    (3, 1, 0)
    """
    return -(-len(text) // chars_per_token)


def cached_tokens(prompt_tokens: int, matched_blocks: int, block_tokens: int) -> int:
    """Prompt tokens served from the prefix cache: the matched full blocks, but at least one
    token is always computed (as vLLM does, to produce the first output token).

    >>> cached_tokens(100, 3, 16), cached_tokens(32, 2, 16), cached_tokens(10, 0, 16)
    (48, 31, 0)
    """
    return max(0, min(matched_blocks * block_tokens, prompt_tokens - 1))


def prefill_seconds(config: SimConfig, uncached_tokens: int) -> float:
    """Prefill time of a prompt with `uncached_tokens` to compute: (a + b · tokens) / speed.

    >>> prefill_seconds(SimConfig(ttft_base_s=0.25, prefill_s_per_token=0.125, speed=2.0), 4)
    0.375
    """
    return (config.ttft_base_s + config.prefill_s_per_token * uncached_tokens) / config.speed


def itl_seconds(config: SimConfig, running: int) -> float:
    """Inter-token latency with `running` requests decoding together:
    itl · (1 + growth · (running − 1)) / speed.

    >>> itl_seconds(SimConfig(itl_s=0.5, itl_growth=0.25, speed=2.0), 3)
    0.375
    """
    return config.itl_s * (1.0 + config.itl_growth * max(0, running - 1)) / config.speed


def service_times(
    config: SimConfig,
    *,
    prompt_tokens: int,
    cached_tokens: int = 0,
    completion_tokens: int = 1,
    running: int = 1,
) -> ServiceTimes:
    """The simulator's timing model as a pure function (brief §5): prefill of the uncached
    prompt tokens, then `completion_tokens` tokens at the inter-token latency of `running`
    requests. The server adds the time spent waiting for a slot.

    >>> cfg = SimConfig(ttft_base_s=0.25, prefill_s_per_token=0.125, itl_s=0.5, speed=2.0)
    >>> service_times(cfg, prompt_tokens=20, cached_tokens=16, completion_tokens=3)
    ServiceTimes(ttft_s=0.375, itl_s=0.25, e2e_s=0.875)
    """
    ttft = prefill_seconds(config, max(0, prompt_tokens - cached_tokens))
    itl = itl_seconds(config, running)
    return ServiceTimes(ttft, itl, ttft + max(0, completion_tokens - 1) * itl)


# ---- the server's state --------------------------------------------------------------------


@dataclass(frozen=True)
class SimStats:
    """A snapshot of a simulator's load and counters."""

    running: int
    waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens: int
    generation_tokens: int
    requests: int
    running_lora_adapters: tuple[str, ...]
    waiting_lora_adapters: tuple[str, ...]


@dataclass(eq=False)
class _Job:
    """One completion request inside the simulator."""

    model: str
    adapter: str | None
    hashes: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    seed: int
    arrival: float = field(default_factory=time.monotonic)
    admitted: asyncio.Future[None] | None = None
    cached_tokens: int = 0
    generated: int = 0


class _SimCollector:
    """vLLM's gauges and token counters, read from the simulator at scrape time."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    # (vLLM name, help, SimStats field); the token counters are in tokens, as vLLM's
    GAUGES = (
        ("vllm:num_requests_running", "Number of requests in model execution batches.", "running"),
        ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "waiting"),
        (
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            "kv_cache_usage",
        ),
    )
    COUNTERS = (
        (
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in queried tokens.",
            "prefix_cache_queries",
        ),
        ("vllm:prefix_cache_hits", "Prefix cache hits, in cached tokens.", "prefix_cache_hits"),
        ("vllm:prompt_tokens", "Number of prefill tokens processed.", "prompt_tokens"),
        ("vllm:generation_tokens", "Number of generation tokens processed.", "generation_tokens"),
    )

    def collect(self) -> Iterator[Any]:
        sim, model = self.sim, [self.sim.config.models[0]]
        st = sim.stats()
        for family, table in (
            (GaugeMetricFamily, self.GAUGES),
            (CounterMetricFamily, self.COUNTERS),
        ):
            for name, doc, attr in table:
                metric = family(name, doc, labels=["model_name"])
                metric.add_metric(model, getattr(st, attr))
                yield metric
        if sim.config.lora_adapters:
            # vLLM's info gauge: the labels carry the state, the value is when it was taken
            info = GaugeMetricFamily(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            )
            info.add_metric(
                [
                    str(sim.config.max_lora),
                    ",".join(st.running_lora_adapters),
                    ",".join(st.waiting_lora_adapters),
                ],
                time.time(),
            )
            yield info


class Simulator:
    """The state of one simulated server: its queue, prefix cache, counters and metrics. All of
    it lives on the server's event loop; other threads may read :meth:`stats` and change
    :attr:`faults`."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.name = config.name or "sim"
        self.faults = config.faults.model_copy()  # per server, even when configs share one
        self.running: list[_Job] = []
        self.waiting: deque[_Job] = deque()
        self.cache: PrefixIndex[str] = PrefixIndex(capacity_per_endpoint=config.kv_blocks)
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests = 0
        self._errors = random.Random(config.seed)
        self.registry = CollectorRegistry()
        self.registry.register(_SimCollector(self))
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            ["model_name"],
            registry=self.registry,
            buckets=TTFT_BUCKETS,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            ["model_name"],
            registry=self.registry,
            buckets=E2E_BUCKETS,
        )
        self.success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )

    # -- load ---------------------------------------------------------------------------------

    def kv_cache_usage(self) -> float:
        """Blocks held by running requests (prompt and tokens so far) over the capacity; cached
        blocks of finished requests count as free, as in vLLM, where they are evictable."""
        if not self.config.kv_blocks:
            return 0.0
        bt = self.config.block_tokens
        held = sum(-(-(j.prompt_tokens + j.generated) // bt) for j in self.running)
        return min(1.0, held / self.config.kv_blocks)

    def stats(self) -> SimStats:
        """The current load and counters."""
        running, waiting = list(self.running), list(self.waiting)
        return SimStats(
            running=len(running),
            waiting=len(waiting),
            kv_cache_usage=self.kv_cache_usage(),
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            requests=self.requests,
            running_lora_adapters=tuple(sorted({j.adapter for j in running if j.adapter})),
            waiting_lora_adapters=tuple(sorted({j.adapter for j in waiting if j.adapter})),
        )

    def orca_headers(self, fmt: str) -> dict[str, str]:
        """The ``endpoint-load-metrics`` header in `fmt` (text, json or bin), as vLLM fills it
        plus the slot utilization; {} for a format ORCA lacks (the server then sends none)."""
        st = self.stats()
        report = OrcaLoadReport(
            named_metrics={
                "kv_cache_usage_perc": st.kv_cache_usage,
                "num_requests_waiting": float(st.waiting),
            },
            application_utilization=st.running / self.config.max_running,
        )
        try:
            return orca_headers(report, fmt)
        except OrcaError:
            return {}

    # -- faults -------------------------------------------------------------------------------

    def take_fault(self) -> tuple[int, dict[str, str]] | None:
        """The status (and headers) a request must fail with now, or None; counts down
        ``faults.status_count``."""
        f = self.faults
        if f.status is not None and (f.status_count is None or f.status_count > 0):
            if f.status_count is not None:
                f.status_count -= 1
            headers = {}
            if f.retry_after_s is not None:
                # Retry-After is whole seconds (RFC 9110); OpenAI clients read the finer one
                headers["retry-after"] = str(math.ceil(f.retry_after_s))
                headers["retry-after-ms"] = str(round(f.retry_after_s * 1000))
            return f.status, headers
        if f.error_rate and self._errors.random() < f.error_rate:
            return f.error_status, {}
        return None

    # -- the queue ----------------------------------------------------------------------------

    def enqueue(self, job: _Job) -> None:
        """Put `job` in the queue; it runs at once if a slot (and a LoRA slot) is free."""
        job.admitted = asyncio.get_running_loop().create_future()
        self.waiting.append(job)
        self._admit()

    def _release(self, job: _Job) -> None:
        if job in self.running:
            self.running.remove(job)
        elif job in self.waiting:
            self.waiting.remove(job)
        self._admit()

    def _admit(self) -> None:
        """Start waiting jobs in arrival order while slots are free; a job whose adapter cannot
        be loaded (max_lora adapters already active) waits, and later ones may pass it."""
        active = {j.adapter for j in self.running if j.adapter}
        kept: deque[_Job] = deque()
        while self.waiting and len(self.running) < self.config.max_running:
            job = self.waiting.popleft()
            if job.adapter and job.adapter not in active and len(active) >= self.config.max_lora:
                kept.append(job)
                continue
            self.running.append(job)
            if job.adapter:
                active.add(job.adapter)
            if job.admitted is not None and not job.admitted.done():
                job.admitted.set_result(None)
        kept.extend(self.waiting)
        self.waiting = kept

    async def run(self, job: _Job) -> AsyncIterator[str]:
        """Serve an enqueued `job`: wait for a slot, prefill what the cache lacks, then yield
        its tokens at the inter-token latency. Closing the iterator (the client left) frees the
        slot."""
        cfg, label = self.config, self.config.models[0]
        try:
            assert job.admitted is not None, "enqueue() the job first"
            await job.admitted
            matched = self.cache.match(job.hashes).get("kv", 0) if job.hashes else 0
            job.cached_tokens = cached_tokens(job.prompt_tokens, matched, cfg.block_tokens)
            self.prefix_cache_queries += job.prompt_tokens
            self.prefix_cache_hits += job.cached_tokens
            await asyncio.sleep(prefill_seconds(cfg, job.prompt_tokens - job.cached_tokens))
            self.prompt_tokens += job.prompt_tokens
            self.cache.record("kv", job.hashes)
            self.ttft.labels(label).observe(time.monotonic() - job.arrival)
            words = random.Random(job.seed)
            for i in range(job.completion_tokens):
                if i:
                    await asyncio.sleep(itl_seconds(cfg, len(self.running)))
                job.generated += 1
                self.generation_tokens += 1
                word = words.choice(_WORDS)
                yield word if i == 0 else " " + word
            self.e2e.labels(label).observe(time.monotonic() - job.arrival)
            self.success.labels(label, job.finish_reason).inc()
        finally:
            self._release(job)


# ---- HTTP ----------------------------------------------------------------------------------


class _BadRequest(Exception):
    def __init__(
        self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


_ERROR_KINDS = {
    400: ("invalid_request_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    503: ("service_unavailable", "service_unavailable"),
}


def _error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
    kind, default_code = _ERROR_KINDS.get(status, ("server_error", None))
    body = {
        "error": {"message": message, "type": kind, "param": param, "code": code or default_code}
    }
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


class _EventStream:
    """An SSE response as a bare ASGI app: it stops (and frees the slot) when the client goes,
    and for the `disconnect_after_chunks` fault it ends the connection after k chunks without
    finishing the body, which clients see as a peer that closed mid-stream."""

    def __init__(
        self, chunks: AsyncIterator[bytes], headers: Mapping[str, str], cut_after: int | None
    ):
        self.chunks, self.cut_after = chunks, cut_after
        self.headers = {
            **headers,
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
        }

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": 200, "headers": raw})

        async def pump() -> bool:
            async with contextlib.aclosing(self.chunks) as chunks:
                sent = 0
                async for chunk in chunks:
                    if self.cut_after is not None and sent >= self.cut_after:
                        return False
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    sent += 1
            return True

        with contextlib.suppress(ClientDisconnected):
            if await unless_disconnected(pump(), receive):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        # else: the client left, or the fault cuts the stream: returning without the last body
        # message makes uvicorn close the connection


class _Handlers:
    """The routes of one simulated server."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.created = int(time.time())

    def _down(self) -> JSONResponse | None:
        if self.sim.faults.down:
            return _error(503, f"{self.sim.name} is down (simulated fault)")
        return None

    async def health(self, request: Request) -> Response:
        return self._down() or Response(status_code=200)

    async def metrics(self, request: Request) -> Response:
        down = self._down()
        if down is not None:
            return down
        return Response(_generate_latest(self.sim.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        down = self._down()
        if down is not None:
            return down
        cfg, base = self.sim.config, self.sim.config.models[0]
        entry = {"object": "model", "created": self.created, "owned_by": "datahall"}
        data = [
            {**entry, "id": m, "root": m, "parent": None, "max_model_len": cfg.max_model_len}
            for m in cfg.models
        ] + [
            {**entry, "id": a, "root": a, "parent": base, "max_model_len": cfg.max_model_len}
            for a in cfg.lora_adapters
        ]
        return JSONResponse({"object": "list", "data": data})

    async def chat(self, request: Request) -> Any:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Any:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, *, chat: bool) -> Any:
        sim = self.sim
        down = self._down()
        if down is not None:
            return down
        sim.requests += 1
        try:
            body = await _json_object(request)
            job, stream, include_usage = self._job(body, chat)
        except _BadRequest as e:
            return _error(e.status, e.message, param=e.param, code=e.code)
        fault = sim.take_fault()
        if fault is not None:
            status, headers = fault
            return _error(status, f"simulated fault: {status}", headers=headers)
        sim.enqueue(job)
        fmt = request.headers.get(ENDPOINT_LOAD_METRICS_FORMAT)
        kind = "chat.completion" if chat else "text_completion"
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            "object": kind,
            "created": int(time.time()),
            "model": job.model,
        }
        if stream:
            headers = {BACKEND_HEADER: sim.name, **(sim.orca_headers(fmt) if fmt else {})}
            events = self._events(job, head, chat, include_usage)
            return _EventStream(events, headers, sim.faults.disconnect_after_chunks)

        async def collect() -> str:
            async with contextlib.aclosing(sim.run(job)) as tokens:
                return "".join([t async for t in tokens])

        try:
            text = await unless_disconnected(collect(), request.receive)
        except ClientDisconnected:
            return Response(status_code=499)  # the client is gone; nobody reads this
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": job.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        headers = {BACKEND_HEADER: sim.name, **(sim.orca_headers(fmt) if fmt else {})}
        return JSONResponse({**head, "choices": [choice], "usage": _usage(job)}, headers=headers)

    async def _events(
        self, job: _Job, head: dict[str, Any], chat: bool, include_usage: bool
    ) -> AsyncIterator[bytes]:
        """The SSE chunks of a stream, as vLLM sends them."""
        head = {**head, "object": "chat.completion.chunk"} if chat else head

        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                choice["delta"] = delta
            else:
                choice["text"] = delta.get("content", "")
            return openai_sse({**head, "choices": [choice]})

        async with contextlib.aclosing(self.sim.run(job)) as tokens:
            first = True
            async for token in tokens:
                if first and chat:
                    yield chunk({"role": "assistant", "content": ""})
                first = False
                yield chunk({"content": token})
        yield chunk({}, job.finish_reason)
        if include_usage:
            yield openai_sse({**head, "choices": [], "usage": _usage(job)})
        yield openai_sse("[DONE]")

    async def embeddings(self, request: Request) -> Response:
        sim, cfg = self.sim, self.sim.config
        down = self._down()
        if down is not None:
            return down
        sim.requests += 1
        try:
            body = await _json_object(request)
            model, _ = self._model(body)
            texts = _embedding_inputs(body.get("input"))
            dim = body.get("dimensions", cfg.embedding_dim)
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
                raise _BadRequest("`dimensions` must be a positive integer", param="dimensions")
            encoding = body.get("encoding_format", "float")
            if encoding not in ("float", "base64"):
                raise _BadRequest(
                    "`encoding_format` must be float or base64", param="encoding_format"
                )
        except _BadRequest as e:
            return _error(e.status, e.message, param=e.param, code=e.code)
        fault = sim.take_fault()
        if fault is not None:
            return _error(fault[0], f"simulated fault: {fault[0]}", headers=fault[1])
        tokens = sum(count_tokens(t, cfg.chars_per_token) for t in texts)
        await asyncio.sleep(prefill_seconds(cfg, tokens))
        data = []
        for i, text in enumerate(texts):
            vector = fake_embedding(model, text, dim, seed=cfg.seed)
            value: Any = vector
            if encoding == "base64":  # what the openai client asks for by default
                value = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": i, "embedding": value})
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse(
            {"object": "list", "data": data, "model": model, "usage": usage},
            headers={BACKEND_HEADER: sim.name},
        )

    # -- request parsing ----------------------------------------------------------------------

    def _model(self, body: Mapping[str, Any]) -> tuple[str, str | None]:
        """The requested model and its LoRA adapter (None for a base model)."""
        cfg = self.sim.config
        name = body.get("model")
        served = [*cfg.models, *cfg.lora_adapters]
        if not isinstance(name, str):
            raise _BadRequest("`model` is required: one of " + ", ".join(served), param="model")
        if name in cfg.models:
            return name, None
        if name in cfg.lora_adapters:
            return name, name
        raise _BadRequest(
            f"The model `{name}` does not exist; this server has {', '.join(served)}",
            status=404,
            param="model",
        )

    def _job(self, body: Mapping[str, Any], chat: bool) -> tuple[_Job, bool, bool]:
        cfg = self.sim.config
        model, adapter = self._model(body)
        field_name = "messages" if chat else "prompt"
        if field_name not in body:
            raise _BadRequest(f"`{field_name}` is required", param=field_name)
        try:
            text = request_text({field_name: body[field_name]})
        except ValueError as e:
            raise _BadRequest(str(e), param=field_name) from None
        if not text:
            raise _BadRequest(f"`{field_name}` is empty", param=field_name)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = cfg.default_max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise _BadRequest("`max_tokens` must be an integer >= 1", param="max_tokens")
        if body.get("n", 1) != 1:
            raise _BadRequest("this server generates one choice: `n` must be 1", param="n")
        prompt_tokens = count_tokens(text, cfg.chars_per_token)
        if prompt_tokens + max_tokens > cfg.max_model_len:
            raise _BadRequest(
                f"This model's maximum context length is {cfg.max_model_len} tokens; the request "
                f"has {prompt_tokens} prompt tokens (estimated) and max_tokens {max_tokens}",
                param=field_name,
                code="context_length_exceeded",
            )
        natural = cfg.response_tokens
        if natural is not None and natural < max_tokens and not body.get("ignore_eos"):
            completion, finish = natural, "stop"
        else:
            completion, finish = max_tokens, "length"
        # the prompt's full blocks, all of them: the server's cache is not capped at 256 blocks
        hashes = prefix_hashes(
            model,
            text,
            block_chars=cfg.block_chars,
            max_blocks=len(text.encode("utf-8")) // cfg.block_chars,
            cache_salt=str(body.get("cache_salt") or ""),
        )
        seed = hash64(f"{model}\0{text}".encode()) ^ cfg.seed
        if isinstance(body.get("seed"), int):  # a client's seed picks another answer
            seed ^= body["seed"] & (2**64 - 1)
        job = _Job(model, adapter, hashes, prompt_tokens, completion, finish, seed)
        stream = body.get("stream") is True
        options = body.get("stream_options") or {}
        include_usage = (
            stream and isinstance(options, dict) and options.get("include_usage") is True
        )
        return job, stream, include_usage


def _usage(job: _Job) -> dict[str, Any]:
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": job.generated,
        "total_tokens": job.prompt_tokens + job.generated,
        "prompt_tokens_details": {"cached_tokens": job.cached_tokens},
    }


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise _BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("the request body must be a JSON object")
    return body


def _embedding_inputs(value: Any) -> list[str]:
    """``input`` as texts: a string, a list of strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return [" ".join(map(str, value))]
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, list) and all(isinstance(i, int) for i in v) for v in value):
            return [" ".join(map(str, v)) for v in value]
    raise _BadRequest(
        "`input` must be a string, a list of strings or token ids (not empty)", param="input"
    )


def fake_embedding(model: str, text: str, dim: int, *, seed: int = 0) -> list[float]:
    """A deterministic unit vector for `text`: equal texts give equal vectors, others are
    nearly orthogonal. Not semantic: for the semantic cache use the real embedder.

    >>> v = fake_embedding("m", "hello", 8)
    >>> v == fake_embedding("m", "hello", 8), round(sum(x * x for x in v), 9)
    (True, 1.0)
    """
    rng = random.Random(hash64(f"{model}\0{text}".encode()) ^ seed)
    vector = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def create_app(config: SimConfig | None = None) -> Starlette:
    """The Starlette app of one simulated server; its :class:`Simulator` is ``app.state.sim``
    (with its own Prometheus registry, so many servers can live in one process)."""
    sim = Simulator(config or SimConfig())
    h = _Handlers(sim)
    routes = [
        Route("/v1/chat/completions", h.chat, methods=["POST"]),
        Route("/v1/completions", h.completions, methods=["POST"]),
        Route("/v1/embeddings", h.embeddings, methods=["POST"]),
        Route("/v1/models", h.models, methods=["GET"]),
        Route("/health", h.health, methods=["GET"]),
        Route("/metrics", h.metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    app.state.sim = sim
    return app


# ---- running several -----------------------------------------------------------------------


@dataclass(frozen=True)
class RunningBackend:
    """A simulator being served: its name, base URL and state (to read stats, set faults)."""

    name: str
    url: str
    sim: Simulator


@contextlib.contextmanager
def serve_backends(
    configs: Sequence[SimConfig | Mapping[str, Any]],
) -> Iterator[list[RunningBackend]]:
    """Serve one simulator per config on free ports of 127.0.0.1, each with uvicorn in a thread
    of this process; yields them in order and stops them all on exit. Unnamed ones are called
    ``sim-0``, ``sim-1``, ... by position."""
    from datahall.core.http import serve_in_thread

    parsed = [c if isinstance(c, SimConfig) else SimConfig.model_validate(c) for c in configs]
    with contextlib.ExitStack() as stack:
        backends = []
        for i, cfg in enumerate(parsed):
            if cfg.name is None:
                cfg = cfg.model_copy(update={"name": f"sim-{i}"})
            app = create_app(cfg)
            url = stack.enter_context(serve_in_thread(app))
            backends.append(RunningBackend(app.state.sim.name, url, app.state.sim))
        yield backends


def run_backends(
    configs: Sequence[SimConfig | Mapping[str, Any]],
    *,
    duration_s: float | None = None,
    echo: Callable[[str], Any] = print,
) -> None:
    """Serve simulators (see :func:`serve_backends`), print ``name url`` for each, and block
    for `duration_s` seconds or until Ctrl-C; for a CLI command."""
    with serve_backends(configs) as backends:
        for b in backends:
            echo(f"{b.name} {b.url}")
        deadline = None if duration_s is None else time.monotonic() + duration_s
        with contextlib.suppress(KeyboardInterrupt):
            while deadline is None or time.monotonic() < deadline:
                left = 0.2 if deadline is None else deadline - time.monotonic()
                time.sleep(max(0.0, min(0.2, left)))
