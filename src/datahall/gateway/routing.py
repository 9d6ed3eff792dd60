"""Endpoint picking: which backend serves a request, from live load and cache affinity.

Brief ``ai-gateway.md`` §2.3. A request goes through the pipeline of the Gateway API Inference
Extension's endpoint picker (GIE ``pkg/epp/scheduling``): **filters** narrow the endpoints,
**weighted scorers** give each survivor a score in [0, 1], a **picker** chooses, and then the
plugins' **pre-request hooks** run (the prefix scorer records what the chosen endpoint now
caches) and, when the response comes, their **post-response hooks** (ORCA reports feed the
weighted round robin). The composition, the presets and the load gate on prefix affinity are
ours ([reconstruction]); each policy's docstring names its source.

Before any plugin runs, the :class:`Router` applies the hard rules, which no plugin can undo:
the endpoint serves the model (and LoRA adapter) and pool asked for, was not already tried
(``exclude``), is healthy (active health checks) and its circuit breaker admits a request; of
those, the endpoints of the best **priority** tier (lower number first, as Azure APIM's backend
pools) that is not saturated, falling back tier by tier (brief §2.3, "priority and fallback
pools").

The load an endpoint reports comes from the freshest source (:meth:`Endpoint.load`): its last
ORCA report while fresh, else the last ``/metrics`` scrape while fresh, else the gateway's own
count of requests in flight to it. A bad or missing ORCA header never breaks routing: it only
leaves the older sources in charge.

>>> router = Router([Endpoint("http://a"), Endpoint("http://b")], "round-robin")
>>> [router.pick(RequestInfo(model="m")).url for _ in range(3)]
['http://a', 'http://b', 'http://a']

Presets by name (:data:`PROFILES`): ``round-robin``, ``least-request``, ``p2c``, ``orca-wrr``,
``kv-aware``, ``prefix-load``, ``prefix-loadaware`` and ``session``; :func:`compose` builds
others from scorer names and weights.
"""

from __future__ import annotations

import bisect
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from datahall.gateway.orca import OrcaLoadReport, parse_orca
from datahall.gateway.prefix import (
    BLOCK_CHARS,
    MAX_BLOCKS,
    PrefixIndex,
    hash64,
    prefix_hashes,
    request_text,
)
from datahall.gateway.resilience import CircuitBreaker, VllmMetrics, parse_retry_after
from datahall.gateway.wrr import WeightedRoundRobin, WrrConfig

__all__ = [
    "CRITICALITIES",
    "PROFILES",
    "SCORERS",
    "ConsistentHashPicker",
    "Endpoint",
    "Filter",
    "KvCacheScorer",
    "LeastRequestPicker",
    "Load",
    "LoadAwarePrefixScorer",
    "LoadGapFilter",
    "LoraAffinityScorer",
    "LowQueueFilter",
    "MaxScorePicker",
    "NoEndpoint",
    "OrcaWrrPicker",
    "PickContext",
    "Picker",
    "Plugin",
    "PowerOfTwoPicker",
    "PrefixCacheScorer",
    "Profile",
    "QueueScorer",
    "RequestInfo",
    "RoundRobinPicker",
    "Router",
    "Saturation",
    "Scorer",
    "compose",
    "kv_cache_score",
    "loadaware_scores",
    "lora_affinity_score",
    "make_profile",
    "queue_scores",
]

log = logging.getLogger(__name__)

CRITICALITIES = ("critical", "standard", "sheddable")
"""GIE's request criticalities (brief §2.3 flow control), most important first. Only
``sheddable`` requests are refused when every endpoint is saturated."""

_TIE = 1e-9  # scores closer than this are a tie (sums of float products differ in the last bits)


# --- what a policy sees ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What the router knows of one request.

    `model` is the backend model name (after aliasing); `adapter` a LoRA adapter or DroidSpeak
    variant served on top of it. The prefix scorer hashes `prompt` (or takes the ready
    `prefix_hashes`, e.g. from ``prefix.request_hashes(body)``). `session_id` keys session
    affinity; `priority` is one of :data:`CRITICALITIES`; `pool` restricts the endpoints to
    one pool (a model alias's backend pool); `prompt_tokens` is the gateway's estimate.
    """

    model: str = ""
    adapter: str | None = None
    prompt: str | None = None
    prefix_hashes: tuple[int, ...] | None = None
    session_id: str | None = None
    tenant: str | None = None
    priority: str = "standard"
    prompt_tokens: int = 0
    pool: str | None = None

    def __post_init__(self) -> None:
        if self.priority not in CRITICALITIES:
            raise ValueError(
                f"request priority must be one of {', '.join(CRITICALITIES)}, not {self.priority!r}"
            )

    @classmethod
    def from_openai(
        cls,
        body: Mapping[str, Any],
        *,
        model: str | None = None,
        adapter: str | None = None,
        session_id: str | None = None,
        tenant: str | None = None,
        priority: str = "standard",
        pool: str | None = None,
    ) -> RequestInfo:
        """The request info of an OpenAI request `body` (chat or completions): its prefix
        hashes over ``prefix.request_text`` (what the backend simulator hashes too), salted
        with ``cache_salt``, and a chars/4 token estimate (brief §6). `model` overrides the
        body's (after aliasing). A body without a prompt (embeddings) gets no hashes.

        >>> info = RequestInfo.from_openai({"model": "m", "messages": [
        ...     {"role": "user", "content": "x" * 200}]})
        >>> len(info.prefix_hashes), info.prompt_tokens
        (3, 51)
        """
        name = model if model is not None else str(body.get("model", ""))
        try:
            text = request_text(body)
        except ValueError:
            text = ""
        hashes = prefix_hashes(adapter or name, text, cache_salt=str(body.get("cache_salt") or ""))
        return cls(
            model=name,
            adapter=adapter,
            prefix_hashes=tuple(hashes),
            session_id=session_id,
            tenant=tenant,
            priority=priority,
            prompt_tokens=len(text) // 4,
            pool=pool,
        )

    @property
    def target_model(self) -> str:
        """The model the server runs for this request: the adapter if any, else the model
        (GIE's ``TargetModel``; an adapter's KV cache is not the base model's)."""
        return self.adapter or self.model


@dataclass(frozen=True, slots=True)
class Load:
    """An endpoint's load as the router sees it now.

    `waiting` is the server's queue; when no fresh server report exists (`source` ``local``) it
    is the gateway's own in-flight count, the best queue estimate it has. `running` is the
    server's count, or, when its report has none (vLLM's ORCA header), the gateway's requests
    to it that are not waiting. `kv_cache` is None when unknown. `requests` = waiting + running
    is what the load gates compare.
    """

    waiting: float
    running: float
    kv_cache: float | None
    source: str  # "orca", "metrics" or "local"

    @property
    def requests(self) -> float:
        return self.waiting + self.running


@dataclass(eq=False)
class Endpoint:
    """One backend server: its configuration and the live state the router keeps about it.

    Configuration: `url`; `pool`; `weight` (static share for round robin, as APIM's weighted
    pools); `priority` (lower is preferred; higher tiers are fallbacks); `models` and `adapters`
    it serves (empty: any); `max_in_flight` (the gateway's own concurrency cap, None: none);
    `breaker`.

    Live state: `in_flight` (requests the gateway has open to it), the last ORCA report and when
    it came (`orca`, `orca_at`), the last scrape (`metrics`, `metrics_at`), `healthy` (from the
    health checks), `picks` and `last_scores` (for the metrics page). Endpoints compare by
    identity; two endpoints of a router must have distinct URLs.
    """

    url: str
    pool: str = "default"
    weight: float = 1.0
    priority: int = 0
    models: frozenset[str] = frozenset()
    adapters: frozenset[str] = frozenset()
    max_in_flight: int | None = None
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker, repr=False)
    in_flight: int = field(default=0, repr=False)
    orca: OrcaLoadReport | None = field(default=None, repr=False)
    orca_at: float | None = field(default=None, repr=False)
    metrics: VllmMetrics | None = field(default=None, repr=False)
    metrics_at: float | None = field(default=None, repr=False)
    healthy: bool = field(default=True, repr=False)
    health_checked_at: float | None = field(default=None, repr=False)
    picks: int = field(default=0, repr=False)
    last_scores: dict[str, float] = field(default_factory=dict, repr=False)
    orca_errors: int = field(default=0, repr=False)
    # in-flight count when each snapshot arrived: requests sent since are not in it yet
    _in_flight_at_orca: int = field(default=0, repr=False)
    _in_flight_at_metrics: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.models = frozenset(self.models)
        self.adapters = frozenset(self.adapters)
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"endpoint {self.url}: weight must be positive, not {self.weight}")

    def serves(self, model: str, adapter: str | None = None) -> bool:
        """Whether this endpoint can serve `model` (and `adapter`)."""
        if self.models and model and model not in self.models:
            return False
        return not (adapter and self.adapters and adapter not in self.adapters)

    def observe_orca(self, report: OrcaLoadReport, now: float) -> None:
        """Keep `report` (read from a response at `now`) as the ORCA snapshot."""
        self.orca, self.orca_at, self._in_flight_at_orca = report, now, self.in_flight

    def observe_metrics(self, metrics: VllmMetrics, now: float) -> None:
        """Keep a ``/metrics`` scrape taken at `now` (called by `resilience.MetricsScraper`)."""
        self.metrics, self.metrics_at = metrics, now
        self._in_flight_at_metrics = self.in_flight

    def load(self, now: float, *, orca_ttl: float = 2.0, metrics_ttl: float = 1.0) -> Load:
        """The load now, from the freshest source that has a queue length (brief §2.1): the
        ORCA snapshot if younger than `orca_ttl` and carrying ``num_requests_waiting``, else
        the scrape if younger than `metrics_ttl`, else the local in-flight count.

        A snapshot is taken at one instant, and requests sent after it are not in it; so the
        requests opened since (net of those closed) are added to its queue. Without this, a
        burst arriving between two reports would all see the same "least loaded" endpoint.

        >>> e = Endpoint("http://a")
        >>> e.in_flight = 2
        >>> e.load(0.0)
        Load(waiting=2, running=0, kv_cache=None, source='local')
        >>> e.observe_orca(OrcaLoadReport(named_metrics={"num_requests_waiting": 4.0,
        ...                                              "kv_cache_usage_perc": 0.4}), now=0.0)
        >>> e.in_flight = 3  # one more request since the report
        >>> e.load(1.0)
        Load(waiting=5.0, running=0.0, kv_cache=0.4, source='orca')
        >>> e.load(3.0).source  # the report is older than orca_ttl
        'local'
        """
        orca = self.orca if _fresh(self.orca_at, now, orca_ttl) else None
        scraped = self.metrics if _fresh(self.metrics_at, now, metrics_ttl) else None
        kv: float | None = None
        if orca is not None:
            kv = orca.named_metrics.get("kv_cache_usage_perc")
        if kv is None and scraped is not None:
            kv = scraped.kv_cache_usage_perc
        if orca is not None and "num_requests_waiting" in orca.named_metrics:
            since = max(0, self.in_flight - self._in_flight_at_orca)
            waiting = orca.named_metrics["num_requests_waiting"] + since
            running = orca.named_metrics.get("num_requests_running")
            return Load(waiting, self._running(running, waiting), kv, "orca")
        if scraped is not None and scraped.num_requests_waiting is not None:
            since = max(0, self.in_flight - self._in_flight_at_metrics)
            waiting = scraped.num_requests_waiting + since
            running = scraped.num_requests_running
            return Load(waiting, self._running(running, waiting), kv, "metrics")
        return Load(self.in_flight, 0, kv, "local")

    def _running(self, reported: float | None, waiting: float) -> float:
        # vLLM's ORCA report carries no running count; the gateway's own requests that are
        # not waiting must be running, which is a lower bound when other gateways share it.
        if reported is not None:
            return reported
        return float(max(0.0, self.in_flight - waiting))

    def lora_state(self, now: float, metrics_ttl: float) -> VllmMetrics | None:
        """The last scrape if fresh and it carries LoRA information, else None."""
        m = self.metrics
        if m is None or m.max_lora is None or not _fresh(self.metrics_at, now, metrics_ttl):
            return None
        return m


def _fresh(at: float | None, now: float, ttl: float) -> bool:
    return at is not None and now - at < ttl


@dataclass(frozen=True, slots=True)
class Saturation:
    """When an endpoint counts as saturated, so that its tier falls back to the next one and
    sheddable requests are refused. Defaults are GIE's saturation detector
    (``pkg/epp/saturationdetector``: waiting queue > 5, KV-cache usage > 0.8); they apply only to
    server-reported load. ``max_in_flight`` of an endpoint always applies."""

    queue_depth: float = 5
    kv_cache: float = 0.8

    def saturated(self, endpoint: Endpoint, load: Load) -> bool:
        if endpoint.max_in_flight is not None and endpoint.in_flight >= endpoint.max_in_flight:
            return True
        if load.source == "local":
            return False
        return load.waiting > self.queue_depth or (load.kv_cache or 0.0) > self.kv_cache


class NoEndpoint(LookupError):
    """No endpoint may take this request. `reason` is one of ``unknown`` (nothing serves the
    model or pool), ``exhausted`` (all were tried already), ``down`` (all unhealthy or their
    breakers open) or ``saturated`` (a sheddable request and every endpoint saturated);
    `retry_after` is the seconds until a breaker admits again, when known. The gateway answers
    503 (``unknown``: 404) with ``Retry-After``."""

    def __init__(self, message: str, *, reason: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


# --- plugins ---------------------------------------------------------------------------------


class PickContext:
    """What plugins see during one pick: the request, the time, and cached per-pick lookups
    (each endpoint's :class:`Load`, the prompt's prefix hashes)."""

    __slots__ = ("info", "now", "router", "_loads", "_hashes")

    def __init__(self, info: RequestInfo, now: float, router: Router) -> None:
        self.info, self.now, self.router = info, now, router
        self._loads: dict[int, Load] = {}
        self._hashes: dict[tuple[int, int], tuple[int, ...]] = {}

    def load(self, endpoint: Endpoint) -> Load:
        key = id(endpoint)
        if key not in self._loads:
            self._loads[key] = self.router.load(endpoint, self.now)
        return self._loads[key]

    def hashes(
        self, block_chars: int = BLOCK_CHARS, max_blocks: int = MAX_BLOCKS
    ) -> tuple[int, ...]:
        """The request's chained prefix hashes (given, or computed from its prompt)."""
        info = self.info
        if info.prefix_hashes is not None:
            return info.prefix_hashes
        key = (block_chars, max_blocks)
        if key not in self._hashes:
            text = info.prompt or ""
            self._hashes[key] = tuple(
                prefix_hashes(
                    info.target_model, text, block_chars=block_chars, max_blocks=max_blocks
                )
            )
        return self._hashes[key]


class Plugin:
    """Base of filters, scorers and pickers: a `name` and no-op hooks.

    - `bind(router)`: called once when the router is built, and again after ``Router.update``;
    - `pre_request(ctx, endpoint)`: the router picked `endpoint` for ``ctx.info``;
    - `on_report(endpoint, report)`: a response from `endpoint` carried an ORCA report;
    - `on_finish(endpoint, ok, now)`: a request to `endpoint` finished;
    - `on_health_change(endpoint, healthy)`: a health check flipped the endpoint.
    """

    name = "plugin"

    def bind(self, router: Router) -> None:
        pass

    def pre_request(self, ctx: PickContext, endpoint: Endpoint) -> None:
        pass

    def on_report(self, endpoint: Endpoint, report: OrcaLoadReport) -> None:
        pass

    def on_finish(self, endpoint: Endpoint, ok: bool, now: float) -> None:
        pass

    def on_health_change(self, endpoint: Endpoint, healthy: bool) -> None:
        pass


class Filter(Plugin):
    """Narrows the candidates. A profile filter is a preference: when it would leave nothing,
    the router keeps the candidates it had (the hard rules are the router's own)."""

    is_load_gate = False

    def filter(self, ctx: PickContext, candidates: list[Endpoint]) -> list[Endpoint]:
        raise NotImplementedError


class Scorer(Plugin):
    """Scores each candidate in [0, 1]; higher is better. ``needs_load_gate`` marks affinity
    scorers that must never run without a load gate in the same profile."""

    needs_load_gate = False

    def score(self, ctx: PickContext, candidates: list[Endpoint]) -> list[float]:
        raise NotImplementedError


class Picker(Plugin):
    """Chooses one of the candidates, given their weighted total scores."""

    def pick(self, ctx: PickContext, candidates: list[Endpoint], scores: list[float]) -> Endpoint:
        raise NotImplementedError


# --- scorers ---------------------------------------------------------------------------------


def queue_scores(queues: Sequence[float]) -> list[float]:
    """GIE's ``queue-scorer``: (max − q)/(max − min) for each queue length q; all 1.0 when
    the queues are equal (brief §2.3, oracle §3).

    >>> queue_scores([0, 5, 10])
    [1.0, 0.5, 0.0]
    >>> queue_scores([3, 3])
    [1.0, 1.0]
    """
    if not queues:
        return []
    low, high = min(queues), max(queues)
    if high - low <= 0:
        return [1.0] * len(queues)
    return [min(1.0, max(0.0, (high - q) / (high - low))) for q in queues]


def kv_cache_score(usage: float | None) -> float:
    """GIE's ``kv-cache-utilization-scorer``: 1 − usage, clamped to [0, 1]. An unknown usage
    scores as an empty cache, as GIE treats a missing metric as zero.

    >>> kv_cache_score(0.4)
    0.6
    >>> kv_cache_score(None), kv_cache_score(1.3)
    (1.0, 0.0)
    """
    if usage is None or not math.isfinite(usage):
        return 1.0
    return min(1.0, max(0.0, round(1.0 - usage, 12)))


def lora_affinity_score(
    adapter: str,
    running: Collection[str],
    waiting: Collection[str],
    max_lora: int,
) -> float:
    """GIE's ``lora-affinity-scorer`` (brief §2.3): 1.0 if `adapter` is active on the server;
    else 0.8 if a slot is free (the adapters running or waiting, counted once, are fewer than
    `max_lora`); else 0.6 if it is only waiting; else 0.0.

    >>> lora_affinity_score("sql", ["sql"], [], 2)
    1.0
    >>> lora_affinity_score("sql", ["chat"], [], 2)
    0.8
    >>> lora_affinity_score("sql", ["chat"], ["sql"], 2)
    0.6
    >>> lora_affinity_score("sql", ["chat", "math"], [], 2)
    0.0
    """
    if adapter in running:
        return 1.0
    if len(set(running) | set(waiting)) < max_lora:
        return 0.8
    if adapter in waiting:
        return 0.6
    return 0.0


def loadaware_scores(
    matched_fractions: Sequence[float], loads: Sequence[float], beta: float = 1.0
) -> list[float]:
    """vLLM production-stack's ``loadaware`` prefix score (PR #1035): matched/prompt −
    β·(load − mean)/max(1, mean), then min-max normalised to [0, 1] (1.0 when all equal) so
    that it composes with the other scorers. The load term penalises endpoints busier than
    average, which keeps prefix affinity from building a hot spot.

    >>> loadaware_scores([1.0, 0.0], [10, 0])   # the cached endpoint is far busier
    [0.0, 1.0]
    >>> loadaware_scores([1.0, 0.0], [3, 3])   # equal load: the cache decides
    [1.0, 0.0]
    """
    if not matched_fractions:
        return []
    mean = sum(loads) / len(loads)
    raw = [
        m - beta * (load - mean) / max(1.0, mean)
        for m, load in zip(matched_fractions, loads, strict=True)
    ]
    return queue_scores([-r for r in raw])


class QueueScorer(Scorer):
    """Prefers short server queues (``num_requests_waiting``): :func:`queue_scores`."""

    name = "queue"

    def score(self, ctx: PickContext, candidates: list[Endpoint]) -> list[float]:
        return queue_scores([ctx.load(c).waiting for c in candidates])


class KvCacheScorer(Scorer):
    """Prefers free KV cache (``kv_cache_usage_perc``): :func:`kv_cache_score`."""

    name = "kv-cache"

    def score(self, ctx: PickContext, candidates: list[Endpoint]) -> list[float]:
        return [kv_cache_score(ctx.load(c).kv_cache) for c in candidates]


class LoraAffinityScorer(Scorer):
    """Prefers endpoints that already run the request's adapter (:func:`lora_affinity_score`,
    from ``vllm:lora_requests_info``). A request without an adapter scores 1.0 everywhere; an
    endpoint without fresh LoRA information scores 0.8, as if a slot were free."""

    name = "lora-affinity"

    def score(self, ctx: PickContext, candidates: list[Endpoint]) -> list[float]:
        adapter = ctx.info.adapter
        if not adapter:
            return [1.0] * len(candidates)
        out = []
        for c in candidates:
            state = c.lora_state(ctx.now, ctx.router.metrics_ttl)
            if state is None:
                out.append(0.8)
            else:
                out.append(
                    lora_affinity_score(
                        adapter,
                        state.running_lora_adapters,
                        state.waiting_lora_adapters,
                        state.max_lora or 0,
                    )
                )
        return out


class PrefixCacheScorer(Scorer):
    """GIE's approximate ``prefix-cache-scorer`` (brief §2.3): the longest run of the prompt's
    blocks, from the first, that an endpoint was last sent, over the prompt's block count.

    The index (`prefix.PrefixIndex`, keyed by endpoint URL) learns in the pre-request hook:
    the chosen endpoint records the request's hashes. The score alone would pile all traffic
    sharing a prefix on one endpoint (aibrix#2382, production-stack#1035), so a profile holding
    this scorer always gets a load gate (:class:`LoadGapFilter`; see :class:`Profile`).
    """

    name = "prefix"
    needs_load_gate = True

    def __init__(
        self,
        index: PrefixIndex[str] | None = None,
        *,
        block_chars: int = BLOCK_CHARS,
        max_blocks: int = MAX_BLOCKS,
    ) -> None:
        self.index: PrefixIndex[str] = index if index is not None else PrefixIndex()
        self.block_chars, self.max_blocks = block_chars, max_blocks

    def fractions(self, ctx: PickContext, candidates: list[Endpoint]) -> list[float]:
        hashes = ctx.hashes(self.block_chars, self.max_blocks)
        if not hashes:
            return [0.0] * len(candidates)
        matched = self.index.match(hashes)
        return [matched.get(c.url, 0) / len(hashes) for c in candidates]

    def score(self, ctx: PickContext, candidates: list[Endpoint]) -> list[float]:
        return self.fractions(ctx, candidates)

    def pre_request(self, ctx: PickContext, endpoint: Endpoint) -> None:
        hashes = ctx.hashes(self.block_chars, self.max_blocks)
        if hashes:
            self.index.record(endpoint.url, hashes)

    def bind(self, router: Router) -> None:
        # an endpoint that left the router takes its cache with it
        urls = {e.url for e in router.endpoints}
        for url in self.index.endpoints():
            if url not in urls:
                self.index.remove(url)


class LoadAwarePrefixScorer(PrefixCacheScorer):
    """production-stack's ``loadaware`` routing as a scorer (:func:`loadaware_scores`): the
    prefix fraction minus β times the endpoint's load above the mean, normalised to [0, 1].
    The load term is its own gate, so it needs no separate one."""

    name = "prefix-loadaware"
    needs_load_gate = False

    def __init__(self, index: PrefixIndex[str] | None = None, *, beta: float = 1.0, **kw: Any):
        super().__init__(index, **kw)
        self.beta = beta

    def score(self, ctx: PickContext, candidates: list[Endpoint]) -> list[float]:
        fractions = self.fractions(ctx, candidates)
        loads = [ctx.load(c).requests for c in candidates]
        return loadaware_scores(fractions, loads, self.beta)


# --- filters ---------------------------------------------------------------------------------


class LoadGapFilter(Filter):
    """The load gate of cache affinity: keeps only endpoints whose load (waiting + running)
    is at most the least-loaded candidate's plus `threshold`.

    This is AIBrix's imbalance gate (prefix routers fall back to the least-loaded pod when
    max − min running > 8; vllm-project/aibrix#842) in filter form: instead of dropping
    affinity altogether, it removes only the endpoints that are too far ahead, so affinity
    still chooses among the rest. Whatever the scorers say, no endpoint is sent a request while
    it is more than `threshold` requests busier than another candidate.
    """

    name = "load-gap"
    is_load_gate = True

    def __init__(self, threshold: float = 8) -> None:
        if not threshold >= 0:
            raise ValueError(f"load gap threshold must be >= 0, not {threshold}")
        self.threshold = threshold

    def filter(self, ctx: PickContext, candidates: list[Endpoint]) -> list[Endpoint]:
        loads = [ctx.load(c).requests for c in candidates]
        limit = min(loads) + self.threshold
        return [c for c, load in zip(candidates, loads, strict=True) if load <= limit]


class LowQueueFilter(Filter):
    """GIE's legacy ``low-queue`` filter: keeps endpoints whose queue is below `threshold`
    (128 by default)."""

    name = "low-queue"

    def __init__(self, threshold: float = 128) -> None:
        self.threshold = threshold

    def filter(self, ctx: PickContext, candidates: list[Endpoint]) -> list[Endpoint]:
        return [c for c in candidates if ctx.load(c).waiting < self.threshold]


# --- pickers ---------------------------------------------------------------------------------


class _TieBreak:
    """Round robin among tied endpoints, in the router's endpoint order. A random tie-break
    sends whole bursts to one endpoint when many requests see the same scores
    (llm-d-router PR #2515); a rotating cursor spreads them, and deterministically."""

    def __init__(self) -> None:
        self._cursor = 0

    def choose(self, ctx: PickContext, tied: list[Endpoint]) -> Endpoint:
        if len(tied) == 1:
            return tied[0]
        position = ctx.router.position
        order = sorted(tied, key=position)
        chosen = next((e for e in order if position(e) >= self._cursor), order[0])
        self._cursor = position(chosen) + 1
        return chosen


class MaxScorePicker(Picker):
    """GIE's ``max-score-picker``: the highest total score, ties broken by round robin."""

    name = "max-score"

    def __init__(self) -> None:
        self._ties = _TieBreak()

    def pick(self, ctx: PickContext, candidates: list[Endpoint], scores: list[float]) -> Endpoint:
        best = max(scores)
        tied = [c for c, s in zip(candidates, scores, strict=True) if s >= best - _TIE]
        return self._ties.choose(ctx, tied)


class RoundRobinPicker(Picker):
    """Round robin weighted by each endpoint's static `weight` (nginx's smooth weighted round
    robin: every pick adds each candidate's weight to its credit and takes the largest credit,
    first in order on a tie, which then pays the total). With equal weights it is plain round
    robin; it ignores scores."""

    name = "round-robin"

    def __init__(self) -> None:
        self._credit: dict[str, float] = {}

    def pick(self, ctx: PickContext, candidates: list[Endpoint], scores: list[float]) -> Endpoint:
        total = 0.0
        best: Endpoint | None = None
        for c in candidates:
            self._credit[c.url] = self._credit.get(c.url, 0.0) + c.weight
            total += c.weight
            if best is None or self._credit[c.url] > self._credit[best.url] + _TIE:
                best = c
        assert best is not None
        self._credit[best.url] -= total
        return best


class LeastRequestPicker(Picker):
    """Least request (Envoy ``LEAST_REQUEST`` with all endpoints compared): the fewest
    requests waiting + running by :meth:`Router.load`, ties by round robin."""

    name = "least-request"

    def __init__(self) -> None:
        self._ties = _TieBreak()

    def pick(self, ctx: PickContext, candidates: list[Endpoint], scores: list[float]) -> Endpoint:
        loads = [ctx.load(c).requests for c in candidates]
        low = min(loads)
        tied = [c for c, load in zip(candidates, loads, strict=True) if load <= low + _TIE]
        return self._ties.choose(ctx, tied)


class PowerOfTwoPicker(Picker):
    """Power of two choices (Mitzenmacher 2001; Envoy's default ``choice_count`` 2): sample
    two candidates with a seeded generator, send to the less loaded; on equal load, to the one
    picked less often, then the first sampled."""

    name = "p2c"

    def __init__(self, seed: int | None = 0) -> None:
        self._rng = random.Random(seed)

    def pick(self, ctx: PickContext, candidates: list[Endpoint], scores: list[float]) -> Endpoint:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(candidates, 2)
        return min((a, b), key=lambda e: (ctx.load(e).requests, e.picks))


class OrcaWrrPicker(Picker):
    """ORCA weighted round robin (gRFC A58, Envoy CSWRR; brief §2.2), over
    `wrr.WeightedRoundRobin`: weight = qps / (utilization + eps/qps · penalty), with the
    blackout and expiry periods of `config`.

    vLLM reports no request rate, so for a report without ``rps_fractional`` the qps is the
    rate of responses the gateway saw from that endpoint over the last `qps_window` seconds.
    By default utilization may also come from ``named_metrics.kv_cache_usage_perc`` (Envoy's
    ``metric_names_for_computing_utilization``) when the report has no
    ``application_utilization``. A scheduled endpoint the router filtered out is skipped.
    """

    name = "orca-wrr"

    def __init__(
        self,
        config: WrrConfig | None = None,
        *,
        qps_window: float = 10.0,
        seed: int | None = 0,
    ) -> None:
        self.config = config or WrrConfig(
            metric_names_for_computing_utilization=("named_metrics.kv_cache_usage_perc",)
        )
        self.qps_window = qps_window
        self.seed = seed
        self.wrr: WeightedRoundRobin | None = None
        self._done: dict[str, deque[float]] = {}
        self._clock: Callable[[], float] = time.monotonic
        self._fallback = RoundRobinPicker()

    def bind(self, router: Router) -> None:
        self._clock = router.clock
        urls = [e.url for e in router.endpoints]
        self._done = {url: done for url, done in self._done.items() if url in urls}
        if self.wrr is None:
            self.wrr = WeightedRoundRobin(
                urls, config=self.config, clock=router.clock, seed=self.seed
            )
        else:
            self.wrr.update(urls)

    def qps(self, url: str, now: float) -> float:
        """Responses per second from `url` over the last `qps_window` seconds."""
        done = self._done.get(url)
        if not done:
            return 0.0
        self._forget_old(done, now)
        return len(done) / self.qps_window

    def _forget_old(self, done: deque[float], now: float) -> None:
        while done and now - done[0] > self.qps_window:
            done.popleft()

    def on_finish(self, endpoint: Endpoint, ok: bool, now: float) -> None:
        done = self._done.setdefault(endpoint.url, deque())
        done.append(now)
        # trimmed here too, not only when a report asks for the rate: an endpoint whose
        # reports carry their own rps_fractional (or that sends none) would grow it forever
        self._forget_old(done, now)

    def on_report(self, endpoint: Endpoint, report: OrcaLoadReport) -> None:
        if self.wrr is None:
            return
        qps = None if report.rps_fractional > 0 else self.qps(endpoint.url, self._clock())
        self.wrr.report(endpoint.url, report, qps=qps)

    def on_health_change(self, endpoint: Endpoint, healthy: bool) -> None:
        if healthy and self.wrr is not None:
            self.wrr.on_ready(endpoint.url)  # A58: a reconnected endpoint goes through blackout

    def pick(self, ctx: PickContext, candidates: list[Endpoint], scores: list[float]) -> Endpoint:
        if self.wrr is not None:
            by_url = {c.url: c for c in candidates}
            # The schedule covers every endpoint; skipping the filtered-out ones costs them
            # their turn only, so the candidates keep their relative shares. Bounded: each
            # endpoint comes up within a few rounds of the schedule.
            for _ in range(4 * len(self.wrr.addresses)):
                chosen = by_url.get(self.wrr.pick())
                if chosen is not None:
                    return chosen
        return self._fallback.pick(ctx, candidates, scores)


class ConsistentHashPicker(Picker):
    """Session affinity by consistent hashing with bounded loads (Mirrokni, Thorup and
    Zadimoghaddam, SODA 2018; HAProxy's ``hash-balance-factor``).

    Each endpoint has `vnodes` points on a 64-bit ring; a request's key (its ``session_id``,
    or its ``tenant`` when `key` is ``"tenant"``) goes to the first endpoint clockwise from the
    key's hash whose in-flight count is below ⌈`load_factor` · (total in flight + 1) / n⌉ over
    the n candidates. So a session sticks to one endpoint while that endpoint is not more than
    `load_factor` times the average busy, and only then spills to the next on the ring. A
    request without a key goes to `fallback` (max score by default).
    """

    name = "session"

    def __init__(
        self,
        *,
        load_factor: float = 1.25,
        vnodes: int = 64,
        key: str = "session",
        fallback: Picker | None = None,
    ) -> None:
        if not load_factor >= 1.0:
            raise ValueError(
                f"load_factor must be >= 1 (1 means perfect balance), not {load_factor}"
            )
        if key not in ("session", "tenant"):
            raise ValueError(f"consistent-hash key must be 'session' or 'tenant', not {key!r}")
        self.load_factor, self.vnodes, self.key = load_factor, vnodes, key
        self.fallback = fallback or MaxScorePicker()
        self._points: list[int] = []
        self._owners: list[str] = []

    def bind(self, router: Router) -> None:
        ring = sorted(
            (hash64(f"{e.url}#{i}".encode()), e.url)
            for e in router.endpoints
            for i in range(self.vnodes)
        )
        self._points = [p for p, _ in ring]
        self._owners = [u for _, u in ring]
        self.fallback.bind(router)

    def capacity(self, candidates: Sequence[Endpoint]) -> int:
        """The in-flight bound of each candidate for the next request."""
        total = sum(c.in_flight for c in candidates)
        return math.ceil(self.load_factor * (total + 1) / len(candidates))

    def pick(self, ctx: PickContext, candidates: list[Endpoint], scores: list[float]) -> Endpoint:
        key = ctx.info.session_id if self.key == "session" else ctx.info.tenant
        if not key or not self._points:
            return self.fallback.pick(ctx, candidates, scores)
        by_url = {c.url: c for c in candidates}
        bound = self.capacity(candidates)
        start = bisect.bisect_left(self._points, hash64(key.encode()))
        seen: set[str] = set()
        n = len(self._points)
        for step in range(n):
            url = self._owners[(start + step) % n]
            if url in seen:
                continue
            seen.add(url)
            endpoint = by_url.get(url)
            if endpoint is not None and endpoint.in_flight < bound:
                return endpoint
        # unreachable: the least busy candidate is always below the bound
        return min(candidates, key=lambda c: c.in_flight)


# --- profiles --------------------------------------------------------------------------------


@dataclass
class Profile:
    """One scheduling profile: filters → weighted scorers → picker (GIE's
    ``SchedulerProfile``). A profile whose scorers include cache affinity
    (``needs_load_gate``) and whose filters include no load gate gets a :class:`LoadGapFilter`
    appended: in datahall, prefix affinity is never ungated (brief §2.3, §7.4).

    >>> p = Profile("mine", scorers=[(PrefixCacheScorer(), 1.0)])
    >>> [f.name for f in p.filters]
    ['load-gap']
    """

    name: str
    filters: list[Filter] = field(default_factory=list)
    scorers: list[tuple[Scorer, float]] = field(default_factory=list)
    picker: Picker = field(default_factory=MaxScorePicker)

    def __post_init__(self) -> None:
        for scorer, weight in self.scorers:
            if not (weight >= 0 and math.isfinite(weight)):
                raise ValueError(f"profile {self.name}: scorer {scorer.name} has weight {weight}")
        gated = any(f.is_load_gate for f in self.filters)
        if not gated and any(s.needs_load_gate for s, _ in self.scorers):
            self.filters = [*self.filters, LoadGapFilter()]

    def plugins(self) -> list[Plugin]:
        return [*self.filters, *(s for s, _ in self.scorers), self.picker]


SCORERS: dict[str, Callable[[], Scorer]] = {
    "queue": QueueScorer,
    "kv-cache": KvCacheScorer,
    "lora-affinity": LoraAffinityScorer,
    "prefix": PrefixCacheScorer,
    "prefix-loadaware": LoadAwarePrefixScorer,
}
"""Scorers by the names :func:`compose` accepts (``kv`` is an alias of ``kv-cache``)."""

_PICKERS: dict[str, Callable[[], Picker]] = {
    "max-score": MaxScorePicker,
    "round-robin": RoundRobinPicker,
    "least-request": LeastRequestPicker,
    "p2c": PowerOfTwoPicker,
    "orca-wrr": OrcaWrrPicker,
    "session": ConsistentHashPicker,
}


def compose(
    scorers: Mapping[str | Scorer, float],
    *,
    filters: Iterable[Filter] = (),
    picker: str | Picker = "max-score",
    name: str = "custom",
) -> Profile:
    """A profile from scorer names (or instances) and their weights.

    >>> p = compose({"queue": 1, "kv": 1, "prefix": 3})
    >>> [(s.name, w) for s, w in p.scorers], [f.name for f in p.filters], p.picker.name
    ([('queue', 1), ('kv-cache', 1), ('prefix', 3)], ['load-gap'], 'max-score')
    """
    built: list[tuple[Scorer, float]] = []
    for spec, weight in scorers.items():
        if isinstance(spec, Scorer):
            built.append((spec, weight))
            continue
        key = "kv-cache" if spec == "kv" else spec
        if key not in SCORERS:
            raise ValueError(f"unknown scorer {spec!r}; known: kv, {', '.join(SCORERS)}")
        built.append((SCORERS[key](), weight))
    if isinstance(picker, str):
        if picker not in _PICKERS:
            raise ValueError(f"unknown picker {picker!r}; known: {', '.join(_PICKERS)}")
        picker = _PICKERS[picker]()
    return Profile(name, list(filters), built, picker)


def _prefix_load(gap: float = 8) -> Profile:
    # GIE's typical weights (queue 1, kv-cache 1, prefix 3) plus LoRA affinity, which is
    # neutral for requests without an adapter, behind AIBrix's gap of 8.
    return compose(
        {"queue": 1, "kv-cache": 1, "prefix": 3, "lora-affinity": 1},
        filters=[LoadGapFilter(gap)],
        name="prefix-load",
    )


PROFILES: dict[str, Callable[[], Profile]] = {
    "round-robin": lambda: Profile("round-robin", picker=RoundRobinPicker()),
    "least-request": lambda: Profile("least-request", picker=LeastRequestPicker()),
    "p2c": lambda: Profile("p2c", picker=PowerOfTwoPicker()),
    "orca-wrr": lambda: Profile("orca-wrr", picker=OrcaWrrPicker()),
    "kv-aware": lambda: compose({"queue": 1, "kv-cache": 1, "lora-affinity": 1}, name="kv-aware"),
    "prefix-load": _prefix_load,
    "prefix-loadaware": lambda: compose({"prefix-loadaware": 1}, name="prefix-loadaware"),
    "session": lambda: compose(
        {"queue": 1, "kv-cache": 1}, picker=ConsistentHashPicker(), name="session"
    ),
}
"""The ready-made profiles by name; each call builds fresh, unshared state."""


def make_profile(name: str) -> Profile:
    """The preset profile `name` (a fresh one each call).

    >>> make_profile("prefix-load").name
    'prefix-load'
    """
    try:
        return PROFILES[name]()
    except KeyError:
        raise ValueError(
            f"unknown routing policy {name!r}; choose one of {', '.join(PROFILES)}"
        ) from None


# --- the router ------------------------------------------------------------------------------


class Router:
    """Picks an endpoint for each request and keeps the endpoints' live state.

    The gateway calls, per attempt: :meth:`pick` → :meth:`on_start` (right away, in the same
    event-loop step, so the next pick sees the request) → :meth:`on_response_headers` with the
    upstream's headers → :meth:`on_finish`. Health checks call :meth:`on_health_change`.

    `policy` is a preset name (:data:`PROFILES`) or a :class:`Profile`. `orca_ttl` and
    `metrics_ttl` say how long an ORCA snapshot and a scrape count as fresh; `saturation`
    decides tier fallback and shedding. `clock` (seconds) drives the breakers, the ORCA weights
    and the freshness checks; tests pass a fake one. Not thread-safe: one event loop drives it.
    """

    def __init__(
        self,
        endpoints: Iterable[Endpoint],
        policy: str | Profile = "prefix-load",
        *,
        clock: Callable[[], float] = time.monotonic,
        orca_ttl: float = 2.0,
        metrics_ttl: float = 1.0,
        saturation: Saturation | None = None,
    ) -> None:
        self.clock = clock
        self.orca_ttl, self.metrics_ttl = orca_ttl, metrics_ttl
        self.saturation = saturation or Saturation()
        self.profile = make_profile(policy) if isinstance(policy, str) else policy
        self.endpoints: list[Endpoint] = []
        self._position: dict[int, int] = {}
        self._plugins: list[Plugin] = []
        self.update(endpoints)

    # -- endpoints --

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        """Replace the endpoint list (a config reload or a resolver update); plugins re-bind,
        keeping the state of URLs that stay."""
        endpoints = list(endpoints)
        urls = [e.url for e in endpoints]
        if len(set(urls)) != len(urls):
            dup = sorted({u for u in urls if urls.count(u) > 1})
            raise ValueError(f"endpoint URLs must be distinct; repeated: {', '.join(dup)}")
        self.endpoints = endpoints
        self._position = {id(e): i for i, e in enumerate(endpoints)}
        self._plugins = self.profile.plugins()
        for plugin in self._plugins:
            plugin.bind(self)

    def position(self, endpoint: Endpoint) -> int:
        """The endpoint's index in :attr:`endpoints` (the tie-break order)."""
        return self._position[id(endpoint)]

    def endpoint(self, url: str) -> Endpoint:
        """The endpoint with `url` (KeyError if none)."""
        url = url.rstrip("/")
        for e in self.endpoints:
            if e.url == url:
                return e
        raise KeyError(f"no endpoint {url!r}; known: {', '.join(e.url for e in self.endpoints)}")

    def load(self, endpoint: Endpoint, now: float | None = None) -> Load:
        """The endpoint's load as the policies see it (:meth:`Endpoint.load`)."""
        now = self.clock() if now is None else now
        return endpoint.load(now, orca_ttl=self.orca_ttl, metrics_ttl=self.metrics_ttl)

    # -- picking --

    def eligible(
        self, info: RequestInfo, exclude: Collection[Endpoint | str] = (), now: float | None = None
    ) -> list[Endpoint]:
        """The endpoints the hard rules allow for `info`, before the profile runs: serving the
        model, adapter and pool; not in `exclude`; healthy with a closed (or probing) breaker;
        of the best priority tier with an unsaturated endpoint. Raises :class:`NoEndpoint`."""
        now = self.clock() if now is None else now
        return self._eligible(PickContext(info, now, self), exclude)

    def _eligible(self, ctx: PickContext, exclude: Collection[Endpoint | str]) -> list[Endpoint]:
        # takes the pick's context, so that the profile reuses the loads read here
        info, now = ctx.info, ctx.now
        excluded = {e if isinstance(e, str) else e.url for e in exclude}
        excluded = {u.rstrip("/") for u in excluded}
        what = f"model {info.target_model!r}" + (f" in pool {info.pool!r}" if info.pool else "")
        serving = [
            e
            for e in self.endpoints
            if (info.pool is None or e.pool == info.pool) and e.serves(info.model, info.adapter)
        ]
        if not serving:
            raise NoEndpoint(f"no endpoint serves {what}; check the model name", reason="unknown")
        left = [e for e in serving if e.url not in excluded]
        if not left:
            raise NoEndpoint(
                f"all {len(serving)} endpoints for {what} were already tried", reason="exhausted"
            )
        up = [e for e in left if e.healthy and e.breaker.allows(now)]
        if not up:
            waits = [e.breaker.retry_in(now) for e in left if e.healthy]
            retry = min((w for w in waits if w > 0), default=None)
            hint = f"; the first circuit breaker closes in {retry:.1f} s" if retry else ""
            raise NoEndpoint(
                f"all {len(left)} endpoints for {what} are down (failed health checks or "
                f"open circuit breakers){hint}",
                reason="down",
                retry_after=retry,
            )
        tiers = sorted({e.priority for e in up})
        for tier in tiers:
            members = [e for e in up if e.priority == tier]
            free = [e for e in members if not self.saturation.saturated(e, ctx.load(e))]
            if free:
                return free
        if info.priority == "sheddable":
            raise NoEndpoint(
                f"all {len(up)} endpoints for {what} are saturated and the request is "
                "sheddable; retry later",
                reason="saturated",
            )
        # every tier saturated: a critical or standard request still goes, to the best tier
        return [e for e in up if e.priority == tiers[0]]

    def pick(self, info: RequestInfo, exclude: Collection[Endpoint | str] = ()) -> Endpoint:
        """The endpoint to send `info` to, never one of `exclude` (endpoints or URLs already
        tried). Runs the hard rules, the profile's filters, scorers and picker, then the
        pre-request hooks. Raises :class:`NoEndpoint` when no endpoint is eligible."""
        ctx = PickContext(info, self.clock(), self)
        candidates = self._eligible(ctx, exclude)
        allowed = {id(c) for c in candidates}
        for f in self.profile.filters:
            narrowed = [c for c in f.filter(ctx, candidates) if id(c) in allowed]
            if narrowed:
                candidates = narrowed
        per_scorer: dict[str, list[float]] = {}
        totals = [0.0] * len(candidates)
        for scorer, weight in self.profile.scorers:
            values = scorer.score(ctx, candidates)
            if len(values) != len(candidates):
                raise RuntimeError(f"scorer {scorer.name} returned {len(values)} scores")
            # clamp: a scorer bug must not let one endpoint outbid the others without bound
            values = [min(1.0, max(0.0, v)) if math.isfinite(v) else 0.0 for v in values]
            per_scorer[scorer.name] = values
            totals = [t + weight * v for t, v in zip(totals, values, strict=True)]
        chosen = self.profile.picker.pick(ctx, candidates, totals)
        if id(chosen) not in {id(c) for c in candidates}:
            raise RuntimeError(
                f"picker {self.profile.picker.name} chose {chosen.url}, not a candidate"
            )
        for i, c in enumerate(candidates):
            c.last_scores = {name: values[i] for name, values in per_scorer.items()}
            c.last_scores["total"] = totals[i]
        chosen.picks += 1
        for plugin in self._plugins:
            plugin.pre_request(ctx, chosen)
        return chosen

    # -- feedback --

    def on_start(self, endpoint: Endpoint) -> None:
        """A request was sent to `endpoint`."""
        endpoint.in_flight += 1
        endpoint.breaker.on_start(self.clock())

    def on_response_headers(
        self, endpoint: Endpoint, headers: Mapping[str, str]
    ) -> OrcaLoadReport | None:
        """Read the ORCA report in a response's headers, if any, into `endpoint`'s snapshot and
        the plugins (the ORCA weights). A malformed header is counted in
        ``endpoint.orca_errors`` and otherwise ignored: it never fails the request."""
        try:
            report = parse_orca(headers)
        except Exception as exc:  # noqa: BLE001 -- untrusted input; OrcaError and anything else
            endpoint.orca_errors += 1
            log.debug("ignoring the ORCA header of %s: %s", endpoint.url, exc)
            return None
        if report is None:
            return None
        endpoint.observe_orca(report, self.clock())
        for plugin in self._plugins:
            plugin.on_report(endpoint, report)
        return report

    def on_finish(
        self,
        endpoint: Endpoint,
        ok: bool = True,
        status: int | None = None,
        retry_after: float | str | None = None,
    ) -> None:
        """A request to `endpoint` ended. `ok` False with `status` None is a transport error.

        Connect errors, 5xx and 429 count as failures of the endpoint; other statuses (a 400
        is the client's doing) as successes. A 429 or 503 with `retry_after` (seconds or the
        header's value) opens the endpoint's breaker for exactly that long.
        """
        now = self.clock()
        endpoint.in_flight = max(0, endpoint.in_flight - 1)
        failed = not ok and (status is None or status >= 500 or status == 429)
        wait = parse_retry_after(retry_after) if retry_after is not None else None
        if not ok and status in (429, 503) and wait is not None:
            endpoint.breaker.record_failure(now, retry_after=wait)
        elif failed:
            endpoint.breaker.record_failure(now)
        else:
            endpoint.breaker.record_success(now)
        for plugin in self._plugins:
            plugin.on_finish(endpoint, not failed, now)

    def on_health_change(self, endpoint: Endpoint, healthy: bool) -> None:
        """A health check marked `endpoint` up or down (`resilience.HealthChecker`)."""
        endpoint.healthy = healthy
        for plugin in self._plugins:
            plugin.on_health_change(endpoint, healthy)

    # -- observability --

    def snapshot(self) -> list[dict[str, Any]]:
        """Each endpoint's state for metrics and logs: URL, pool, priority, health, breaker
        state, in-flight count, picks, load and its source, ORCA age, last scores."""
        now = self.clock()
        out = []
        for e in self.endpoints:
            load = self.load(e, now)
            out.append(
                {
                    "url": e.url,
                    "pool": e.pool,
                    "priority": e.priority,
                    "healthy": e.healthy,
                    "breaker": e.breaker.state(now),
                    "in_flight": e.in_flight,
                    "picks": e.picks,
                    "waiting": load.waiting,
                    "running": load.running,
                    "kv_cache": load.kv_cache,
                    "load_source": load.source,
                    "orca_age": None if e.orca_at is None else now - e.orca_at,
                    "orca_errors": e.orca_errors,
                    "scores": dict(e.last_scores),
                }
            )
        return out
