"""The gateway's HTTP server: an OpenAI- and Anthropic-compatible front door to the backend pools.

Brief ``ai-gateway.md`` §2 and issue 6: this module composes the gateway's pieces (ORCA
ingestion, endpoint picking, the response cache, prompt transforms, token limits, retries and
breakers) into one Starlette app; the composition and the order of the steps are ours
([reconstruction]). Routes:

- ``POST /v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings`` (OpenAI), and
  ``POST /v1/messages`` (Anthropic Messages: translated to a chat request inside, so an
  ``anthropic`` client reaches OpenAI backends); a backend whose config says ``api: anthropic``
  gets an Anthropic request and its answer and stream are translated back;
- ``GET /v1/models`` (the aliases and the pools' models; with keys configured it needs one, as
  the API routes do), ``/health`` (the process answers),
  ``/ready`` (every pool has a backend up) and ``/metrics`` (Prometheus text).

Each request goes through, in this order (a failing step answers with OpenAI's error shape,
``{"error": {"message", "type", "param", "code"}}``, or Anthropic's on ``/v1/messages``):

1. **size**: the body's bytes (413), then messages and estimated prompt tokens (400);
2. **JSON**: a body that is not a JSON object (400);
3. **API key → tenant**: with keys configured, a missing or unknown key is a 401; the
   ``x-request-criticality`` header (``critical``, ``standard``, ``sheddable``; GIE's names)
   is read here, an unknown value is a 400;
4. **token rate limit** per key and tenant: 429 with ``Retry-After`` and the remaining-token
   headers; the estimate is reconciled with the answer's ``usage`` afterwards (§2.5);
5. **model alias → pool**: an unknown model is a 404 ``model_not_found``;
6. **transforms** (templates, system prompt, guard, redaction): a refusal answers with its status;
7. **response cache** (chat only): a hit is replayed, as SSE to a streaming client and as JSON
   otherwise, with ``x-cache: hit`` and the similarity; a miss says ``x-cache: miss``;
8. **routing**: ``Router.pick`` (a sheddable request finding every backend saturated is shed
   with a 503 ``request_shed``); every upstream request carries
   ``endpoint-load-metrics-format``, and every upstream answer's headers feed the router's ORCA
   snapshot (a malformed report is counted and ignored);
9. **send**, retried on another backend after a connect error, a retryable status (429, 5xx) or
   a TTFT timeout, only while nothing has reached the client (§2.5, §2.6.6); a 429/503 with
   ``Retry-After`` opens that backend's breaker for that long. A stream is held until its first
   event arrives, so the first byte the client sees is already a token;
10. **respond**: streams are relayed event by event as they arrive (never buffered whole), while
    a copy is assembled for the cache (only complete streams are stored) and the usage is read
    for accounting. A backend that fails mid-stream ends the client's stream with an error
    event (``data: {"error": ...}``); nothing of it is cached.

Timeouts: ``timeouts.ttft_s`` bounds each attempt of a stream until its first event (so a
stalled backend is skipped), ``timeouts.total_s`` the whole request; a whole (non-streamed)
answer has only the total, since its headers come with its last token.

The hot path stays cheap when features are off: no embedding without the cache, no Jinja
without templates, the client's bytes forwarded untouched when nothing changes the body, and the
upstream's bytes relayed untouched when the client speaks the backend's API.

>>> from datahall.gateway.config import parse_config
>>> app = create_app(parse_config("backends: [{url: 'http://127.0.0.1:8001', models: [m]}]"))
>>> sorted(r.path for r in app.routes)[:3]
['/health', '/metrics', '/ready']
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from datahall.core.http import TTFT_BUCKETS
from datahall.gateway.config import ApiKey, Backend, GatewayConfig
from datahall.gateway.orca import (
    ENDPOINT_LOAD_METRICS,
    ENDPOINT_LOAD_METRICS_BIN,
    ENDPOINT_LOAD_METRICS_FORMAT,
)
from datahall.gateway.ratelimit import (
    RateLimit,
    RedisTokenRateLimiter,
    Reservation,
    TokenRateLimiter,
)
from datahall.gateway.resilience import (
    CircuitBreaker,
    HealthChecker,
    MetricsScraper,
    RetryPolicy,
    UpstreamStatusError,
    parse_retry_after,
    send_with_retries,
)
from datahall.gateway.routing import (
    CRITICALITIES,
    Endpoint,
    LoadGapFilter,
    NoEndpoint,
    OrcaWrrPicker,
    PrefixCacheScorer,
    Profile,
    RequestInfo,
    Router,
    compose,
    make_profile,
)
from datahall.gateway.semcache import CacheLookup, SemanticCache
from datahall.gateway.transform import (
    AnthropicToOpenAIStream,
    OpenAIToAnthropicStream,
    PolicyError,
    SseDecoder,
    Transformer,
    TranslationError,
    anthropic_error_to_openai,
    anthropic_sse,
    anthropic_to_openai_request,
    anthropic_to_openai_response,
    openai_sse,
    openai_to_anthropic_request,
    openai_to_anthropic_response,
    openai_usage,
    resolve_model,
)
from datahall.gateway.wrr import WrrConfig

try:  # orjson is several times faster on the hot path; json is the fallback
    import orjson

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    _loads: Callable[[bytes | str], Any] = orjson.loads
    _JSON_ERRORS: tuple[type[Exception], ...] = (orjson.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover - depends on the environment

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()

    _loads = json.loads
    _JSON_ERRORS = (ValueError, UnicodeDecodeError)

__all__ = ["Gateway", "build_profile", "create_app"]

log = logging.getLogger(__name__)
access_log = logging.getLogger("datahall.gateway.access")
"""One JSON line per request at INFO (request id, tenant, model, pool, endpoint, status, cache,
ttft, duration, tokens)."""

REQUEST_ID = "x-request-id"
BACKEND = "x-gateway-backend"
"""Response header naming the backend that answered."""
CRITICALITY = "x-request-criticality"
"""Request header with the request's criticality: ``critical``, ``standard`` (the default) or
``sheddable``, as the Gateway API Inference Extension names them."""
ANTHROPIC_VERSION = "2023-06-01"

_OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}
_PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}
# upstream response headers the gateway never relays: hop-by-hop ones, those it sets itself,
# and the ORCA report, which is for the gateway
_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "content-type",
        "content-encoding",
        "date",
        "server",
        ENDPOINT_LOAD_METRICS,
        ENDPOINT_LOAD_METRICS_BIN,
    }
)
_DONE = b"data: [DONE]\n\n"
# The OpenTelemetry GenAI semantic conventions' advised buckets. For the time to first token
# the gateway takes vLLM's (datahall.core.http.TTFT_BUCKETS, as the kvshare server and the
# simulator do): they hold every bound OTel advises (0.001 .. 10 s) and go on past 10 s, where
# a queued request still waits within the default timeouts.ttft_s of 30 s.
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
# fmt: off
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                     40.96, 81.92)
# fmt: on
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# An SSE event ends at a blank line. A line ends with CRLF, LF or a lone CR (the SSE spec's
# three), and one stream may mix them; a CR is "lone" only when no LF follows.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class _CookielessClient(httpx.AsyncClient):
    """The upstream client: no cookie jar, since a cookie set by a backend in one tenant's
    answer must never ride on another tenant's request (and reading them costs per answer)."""

    @property  # type: ignore[override]
    def cookies(self) -> httpx.Cookies:
        return _NoCookies()

    @cookies.setter
    def cookies(self, value: Any) -> None:
        pass


# --- the routing profile ------------------------------------------------------------------------


def build_profile(config: GatewayConfig) -> Profile:
    """The routing profile ``routing.policy`` names (a preset of ``routing.PROFILES``), tuned by
    the config: ``scorer_weights`` and ``imbalance_threshold`` for the scorer presets
    (``prefix-load``, ``kv-aware``), the ``orca`` settings for ``orca-wrr``. A weight of 0
    leaves its scorer out; the default weights build the presets themselves.

    >>> from datahall.gateway.config import parse_config
    >>> p = build_profile(parse_config("backends: [{url: 'http://a:1'}]"))
    >>> p.name, [(s.name, w) for s, w in p.scorers], [f.name for f in p.filters]
    ('prefix-load', [('queue', 1.0), ('kv-cache', 1.0), ('prefix', 3.0), ('lora-affinity', 1.0)], ['load-gap'])
    """
    routing = config.routing
    w = routing.scorer_weights
    if routing.policy in ("prefix-load", "kv-aware"):
        # in the presets' order, so that ties and scores read the same as theirs
        weights = {"queue": w.queue, "kv-cache": w.kv_cache}
        filters = []
        if routing.policy == "prefix-load":
            weights["prefix"] = w.prefix
            filters = [LoadGapFilter(routing.imbalance_threshold)]
        weights["lora-affinity"] = w.lora
        used = {name: weight for name, weight in weights.items() if weight > 0}
        return compose(used, filters=filters, name=routing.policy)
    if routing.policy == "orca-wrr":
        o = routing.orca
        names = tuple(o.metric_names_for_computing_utilization) or (
            # vLLM reports no application_utilization: its KV-cache usage stands in (§2.2)
            "named_metrics.kv_cache_usage_perc",
        )
        wrr = WrrConfig(
            blackout_period=o.blackout_period_s,
            weight_expiration_period=o.weight_expiration_period_s,
            weight_update_period=o.weight_update_period_s,
            error_utilization_penalty=o.error_utilization_penalty,
            metric_names_for_computing_utilization=names,
        )
        return Profile("orca-wrr", picker=OrcaWrrPicker(wrr))
    return make_profile(routing.policy)


# --- per-request state --------------------------------------------------------------------------


@dataclass(slots=True)
class _Call:
    """What the gateway knows of one request while it runs (for the answer, metrics and log)."""

    id: str
    route: str  # chat, completions, embeddings (the operation inside)
    client_api: str  # openai or anthropic
    started: float  # perf_counter
    deadline: float  # event-loop time
    stream: bool = False
    model: str = ""
    backend_model: str = ""
    pool: str | None = None
    tenant: str = "default"
    key: str | None = None
    criticality: str = "standard"
    reservation: Reservation | None = None
    headers: dict[str, str] = field(default_factory=dict)  # gateway headers for the client
    lookup: CacheLookup | None = None
    cache: str | None = None
    endpoint: Endpoint | None = None
    attempts: int = 0
    status: int = 0
    ttft: float | None = None
    usage: dict[str, Any] | None = None
    injected_usage: bool = False
    error: str | None = None
    logged: bool = False


@dataclass(slots=True)
class _Upstream:
    """An attempt that reached a backend: a whole answer (`content`) or an open stream whose
    first events are in `first` and the rest in `events`."""

    endpoint: Endpoint
    backend: Backend
    status: int
    headers: dict[str, str]
    content: bytes | None = None
    response: httpx.Response | None = None
    events: AsyncIterator[bytes] | None = None
    first: list[bytes] = field(default_factory=list)


class _UpstreamFailure(UpstreamStatusError):
    """A retryable status from a backend; if no other backend is left it goes to the client."""

    def __init__(self, upstream: _Upstream, retry_after: float | None) -> None:
        super().__init__(upstream.status, retry_after)
        self.upstream = upstream


class _TtftTimeout(httpx.TimeoutException):
    """No first event within ``timeouts.ttft_s``: retryable on another backend (the stream was
    closed, so the backend drops the request)."""


class _TotalTimeout(Exception):
    """The request ran out of ``timeouts.total_s``: never retried."""


def _event_data(event: bytes) -> str:
    """The data of one SSE event (its ``data:`` lines joined)."""
    text = event.decode("utf-8", "replace")
    lines = [line[5:].removeprefix(" ") for line in text.splitlines() if line.startswith("data:")]
    return "\n".join(lines)


async def _sse_events(response: httpx.Response) -> AsyncIterator[bytes]:
    """The complete SSE events of an upstream stream, each as its own bytes (relayed as they
    came), as soon as each arrives; line ends may be CRLF, LF or CR, mixed, and split across
    chunks. Blank lines before an event are dropped, so each event starts with its first
    field. A final piece without its blank line (a server that closed cleanly mid-event) is
    yielded as it is.

    (:class:`~datahall.gateway.transform.SseDecoder` parses the same framing into each event's
    data; the relay needs the bytes themselves, to forward them untouched.)"""
    buffer = b""
    resume = 0  # where the next search starts: no event ends before it
    async for chunk in response.aiter_bytes():
        buffer = buffer + chunk if buffer else chunk
        start = 0
        while (m := _EVENT_END.search(buffer, max(start, resume))) is not None:
            end = m.end()
            if end == len(buffer) and buffer[-1:] == b"\r":
                break  # maybe the first half of a CRLF: the next chunk tells
            event = buffer[start:end].lstrip(b"\r\n")
            start = end
            if event:
                yield event
        buffer = buffer[start:]
        # an event's end is at most 4 bytes (CRLF CRLF): one that the next chunk completes
        # starts within the last 3 bytes of this buffer, so older bytes need no new search
        resume = max(0, len(buffer) - 3)
    event = buffer.lstrip(b"\r\n")
    if event.strip():
        yield event


async def _anthropic_events(response: httpx.Response) -> AsyncIterator[bytes]:
    """An Anthropic Messages stream as OpenAI chat-completion SSE events (ending in
    ``[DONE]``), translated event by event; an error chunk if the stream stopped early."""
    decoder = SseDecoder()
    translator = AnthropicToOpenAIStream(include_usage=True)
    async for chunk in response.aiter_bytes():
        for _, data in decoder.feed(chunk):
            try:
                event = json.loads(data)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            for out in translator.feed(event):
                yield openai_sse(out)
            if translator.finished:
                yield _DONE
                return
    for out in translator.close():
        yield openai_sse(out)


class _AnthropicSink:
    """Turns the OpenAI events of a chat stream into Anthropic events for a Messages client."""

    def __init__(self) -> None:
        # the model as the backend names it, as in a relayed whole answer
        self.translator = OpenAIToAnthropicStream()

    def feed(self, event: bytes) -> bytes:
        data = _event_data(event)
        if not data:
            return b""
        if data.strip() == "[DONE]":
            return b"".join(anthropic_sse(e) for e in self.translator.close())
        try:
            chunk = json.loads(data)
        except ValueError:
            return b""
        return b"".join(anthropic_sse(e) for e in self.translator.feed(chunk))

    def error(self, message: str) -> bytes:
        self.translator.closed = True
        return anthropic_sse({"type": "error", "error": {"type": "api_error", "message": message}})


# --- metrics ------------------------------------------------------------------------------------


class _StateCollector:
    """Per-endpoint and cache state, read from the router and the cache at scrape time (so the
    hot path only bumps plain counters)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Any:
        g = self.gateway
        picks = CounterMetricFamily(
            "datahall_gateway_endpoint_picks", "Requests the router sent to each endpoint.",
            labels=["endpoint", "pool"],
        )  # fmt: skip
        scores = GaugeMetricFamily(
            "datahall_gateway_endpoint_score",
            "Each scorer's last value (and the weighted total) for each endpoint.",
            labels=["endpoint", "scorer"],
        )
        in_flight = GaugeMetricFamily(
            "datahall_gateway_endpoint_in_flight", "Requests open to each endpoint.",
            labels=["endpoint"],
        )  # fmt: skip
        healthy = GaugeMetricFamily(
            "datahall_gateway_endpoint_healthy", "1 if the endpoint passes its health checks.",
            labels=["endpoint"],
        )  # fmt: skip
        breaker = GaugeMetricFamily(
            "datahall_gateway_endpoint_breaker_open",
            "1 if the endpoint's circuit breaker refuses requests (open), else 0.",
            labels=["endpoint"],
        )
        load = GaugeMetricFamily(
            "datahall_gateway_endpoint_load",
            "The load the router sees (waiting, running, kv_cache), from ORCA, a scrape or "
            "the gateway's own count.",
            labels=["endpoint", "kind", "source"],
        )
        orca = GaugeMetricFamily(
            "datahall_gateway_endpoint_orca",
            "The last ORCA load report of each endpoint, field by field.",
            labels=["endpoint", "metric"],
        )
        orca_age = GaugeMetricFamily(
            "datahall_gateway_endpoint_orca_age_seconds", "Age of the last ORCA report.",
            labels=["endpoint"],
        )  # fmt: skip
        orca_errors = CounterMetricFamily(
            "datahall_gateway_endpoint_orca_errors", "Malformed ORCA reports ignored.",
            labels=["endpoint"],
        )  # fmt: skip
        for e, snap in zip(g.router.endpoints, g.router.snapshot(), strict=True):
            name = g.names[e.url]
            picks.add_metric([name, e.pool], e.picks)
            for scorer, value in snap["scores"].items():
                scores.add_metric([name, scorer], value)
            in_flight.add_metric([name], e.in_flight)
            healthy.add_metric([name], 1.0 if e.healthy else 0.0)
            breaker.add_metric([name], 1.0 if snap["breaker"] == "open" else 0.0)
            for kind in ("waiting", "running", "kv_cache"):
                if snap[kind] is not None:
                    load.add_metric([name, kind, snap["load_source"]], float(snap[kind]))
            if e.orca is not None:
                for metric, value in _orca_fields(e.orca):
                    orca.add_metric([name, metric], value)
            if snap["orca_age"] is not None:
                orca_age.add_metric([name], snap["orca_age"])
            orca_errors.add_metric([name], e.orca_errors)
        yield from (picks, scores, in_flight, healthy, breaker, load, orca, orca_age, orca_errors)
        if g.cache is not None:
            s = g.cache.stats
            cache = CounterMetricFamily(
                "datahall_gateway_cache_lookups", "Response-cache lookups by result.",
                labels=["result"],
            )  # fmt: skip
            cache.add_metric(["exact_hit"], s.exact_hits)
            cache.add_metric(["semantic_hit"], s.semantic_hits)
            cache.add_metric(["miss"], s.misses)
            cache.add_metric(["bypass"], s.bypassed)
            yield cache
            for name, value, doc in (
                ("guard_rejections", s.guard_rejections, "Semantic matches refused by the guard."),
                ("stores", s.stores, "Answers stored."),
                ("incomplete", s.incomplete, "Answers refused for storing as incomplete."),
                ("evictions", s.evictions, "Entries evicted by LRU."),
            ):
                family = CounterMetricFamily(f"datahall_gateway_cache_{name}", doc)
                family.add_metric([], value)
                yield family


def _orca_fields(report: Any) -> list[tuple[str, float]]:
    out = []
    for name in (
        "cpu_utilization",
        "mem_utilization",
        "application_utilization",
        "rps_fractional",
        "eps",
    ):
        value = getattr(report, name, None)
        if value:
            out.append((name, float(value)))
    for prefix in ("named_metrics", "utilization"):
        for key, value in (getattr(report, prefix, None) or {}).items():
            out.append((f"{prefix}.{key}", float(value)))
    return out


class _Metrics:
    """The app's Prometheus registry: OpenTelemetry GenAI metrics under their Prometheus names,
    and the gateway's own counters."""

    def __init__(self, gateway: Gateway) -> None:
        self.registry = r = CollectorRegistry()
        labels = ["gen_ai_operation_name", "gen_ai_request_model"]
        self.tokens = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per request (gen_ai.client.token.usage), by gen_ai.token.type.",
            [*labels, "gen_ai_token_type"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "gen_ai_server_request_duration_seconds",
            "Time from the request's arrival to its last byte (gen_ai.server.request.duration).",
            labels,
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to the first streamed event (gen_ai.server.time_to_first_token).",
            labels,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first (gen_ai.server.time_per_output_token).",
            labels,
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "datahall_gateway_requests", "Requests answered, by route and status.",
            ["route", "status"], registry=r,
        )  # fmt: skip
        self.cache = Counter(
            "datahall_gateway_cache_responses", "Answers by x-cache value.", ["cache"],
            registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            "datahall_gateway_rate_limit_rejections", "Requests refused by a token rate limit.",
            ["unit"], registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "datahall_gateway_upstream_errors",
            "Failed upstream attempts, by endpoint and kind (a status or an error name).",
            ["endpoint", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "datahall_gateway_upstream_retries", "Attempts retried on another endpoint.",
            ["endpoint"], registry=r,
        )  # fmt: skip
        r.register(_StateCollector(gateway))
        self._children: dict[tuple[str, str], tuple[Any, ...]] = {}

    def per_model(self, operation: str, model: str) -> tuple[Any, ...]:
        # label lookups take a lock and a tuple build each; cache the children per model
        key = (operation, model)
        children = self._children.get(key)
        if children is None:
            children = (
                self.duration.labels(operation, model),
                self.ttft.labels(operation, model),
                self.tpot.labels(operation, model),
                self.tokens.labels(operation, model, "input"),
                self.tokens.labels(operation, model, "output"),
            )
            self._children[key] = children
        return children


# --- the gateway --------------------------------------------------------------------------------


class Gateway:
    """The state behind one app: config, router, HTTP client, cache, limiter, metrics.

    Built by :func:`create_app`; tests reach it as ``app.state.gateway`` (its :attr:`router`'s
    ``snapshot()``, its :attr:`cache`). Not thread-safe: one event loop drives it.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        cb = config.circuit_breaker
        self.backends: dict[str, Backend] = {}
        self.names: dict[str, str] = {}
        endpoints = []
        for b in config.backends:
            e = Endpoint(
                b.url,
                pool=b.pool,
                weight=b.weight,
                priority=b.priority,
                models=frozenset(b.models),
                adapters=frozenset(b.adapters),
                breaker=CircuitBreaker(
                    failure_threshold=cb.failure_threshold, cooldown=cb.open_s, clock=clock
                ),
            )
            endpoints.append(e)
            self.backends[e.url] = b
            self.names[e.url] = b.name or e.url
        orca = config.routing.orca
        self.profile = build_profile(config)
        self.router = Router(
            endpoints,
            self.profile,
            clock=clock,
            # a scrape is trusted for two periods, so one late scrape does not drop it
            metrics_ttl=max(1.0, 2 * orca.scrape_interval_s),
        )
        self.wants_prompt = any(isinstance(s, PrefixCacheScorer) for s, _ in self.profile.scorers)
        self.aliases = config.alias_targets()
        self.base_models = {m for b in config.backends for m in b.models}
        self.adapters = {a for b in config.backends for a in b.adapters}
        self.known_models = self.base_models | self.adapters
        self.open_backends = any(not b.models for b in config.backends)
        self.size = config.limits.size_limits()
        self.retry = RetryPolicy(
            max_attempts=config.retries.attempts,
            retry_statuses=frozenset(config.retries.on_status),
            retry_on_timeout=True,  # only our TTFT timeout: the stream was closed first
        )
        # keys, and each key's limits, resolved once (not per request)
        self.keys = config.keys_by_secret()
        self.limits: dict[str | None, dict[str, RateLimit]] = {None: config.rate_limits(None)}
        for k in config.api_keys:
            self.limits[k.name] = config.rate_limits(k)
        any_limit = any(self.limits.values())
        self.limiter: TokenRateLimiter | RedisTokenRateLimiter | None = None
        if any_limit:
            self.limiter = (
                RedisTokenRateLimiter(config.redis_url)
                if config.redis_url
                else TokenRateLimiter(clock=clock)
            )
        t = config.transforms
        self.transformer: Transformer | None = None
        if (
            t.templates
            or t.system_prompt is not None
            or t.render_message_templates
            or t.redaction.enabled
            or (t.guard is not None and (t.guard.deny or t.guard.allow))
        ):
            self.transformer = Transformer.from_config(t)
        self.cache: SemanticCache | None = None
        sc = config.semantic_cache
        if sc.enabled:
            try:
                self.cache = SemanticCache(sc.cache_config(), redis_url=config.cache_redis_url())
            except ImportError as e:  # the embedder's package is missing: say how to fix it
                raise ValueError(
                    f"semantic_cache: {e} (or set semantic_cache.semantic: false for an exact "
                    "cache only)"
                ) from None
        self.cache_blocks = self.cache is not None and self.cache.redis is not None
        self.upstream_headers = {b.url: self._base_headers(b) for b in config.backends}
        # upstream URLs parsed once: httpx's URL parsing is a visible share of a request
        self.urls = {
            (b.url, route): httpx.URL(b.url + ("/v1/messages" if b.api == "anthropic" else path))
            for b in config.backends
            for route, path in _PATHS.items()
        }
        t_out = config.timeouts
        self._own_client = http_client is None
        self.client = http_client or _CookielessClient(
            limits=httpx.Limits(
                max_connections=1024, max_keepalive_connections=256, keepalive_expiry=60.0
            ),
            timeout=httpx.Timeout(
                connect=t_out.connect_s, read=None, write=t_out.connect_s, pool=t_out.connect_s
            ),
            trust_env=False,  # never route loopback backends through an environment proxy
        )
        self.metrics = _Metrics(self)
        self.pollers: list[Any] = []

    def _base_headers(self, b: Backend) -> list[tuple[bytes, bytes]]:
        headers = {
            "content-type": "application/json",
            "accept-encoding": "identity",
            "user-agent": "datahall-gateway",
            # servers send ORCA reports only when asked (brief §2.1)
            ENDPOINT_LOAD_METRICS_FORMAT: self.config.routing.orca.request_format,
        }
        key = b.resolved_api_key()
        if b.api == "anthropic":
            headers["anthropic-version"] = ANTHROPIC_VERSION
            if key:
                headers["x-api-key"] = key
        elif key:
            headers["authorization"] = f"Bearer {key}"
        headers.update({k.lower(): v for k, v in b.headers.items()})
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    # -- lifecycle

    async def start(self) -> None:
        """Start the health checks and the Prometheus scrapes (brief §2.1 fallback)."""
        hc = self.config.health_checks
        if hc.enabled:
            # a provider's public API (api: anthropic) has no health route; its breaker
            # covers it
            checked = [e for e in self.router.endpoints if self.backends[e.url].api == "openai"]
            if checked:
                self.pollers.append(
                    HealthChecker(
                        checked,
                        interval=hc.interval_s,
                        timeout=hc.timeout_s,
                        path=hc.path,
                        unhealthy_threshold=hc.unhealthy_threshold,
                        healthy_threshold=hc.healthy_threshold,
                        on_change=self.router.on_health_change,
                        client=self.client,
                        clock=self.clock,
                    )
                )
        paths: dict[str, list[Endpoint]] = {}
        for e in self.router.endpoints:
            path = self.backends[e.url].metrics_path
            if path is not None and self.backends[e.url].api == "openai":
                paths.setdefault(path, []).append(e)
        interval = self.config.routing.orca.scrape_interval_s
        for path, group in paths.items():

            def without_orca(group: list[Endpoint] = group) -> list[Endpoint]:
                # a backend that sends fresh ORCA reports needs no scrape
                now = self.clock()
                return [
                    e for e in group if e.orca_at is None or now - e.orca_at >= self.router.orca_ttl
                ]

            self.pollers.append(
                MetricsScraper(
                    without_orca,
                    interval=interval,
                    timeout=min(interval, 1.0),
                    path=path,
                    client=self.client,
                    clock=self.clock,
                )
            )
        for p in self.pollers:
            p.start()

    async def aclose(self) -> None:
        for p in self.pollers:
            await p.aclose()
        self.pollers.clear()
        if self._own_client:
            await self.client.aclose()

    # -- small helpers

    def _error(self, call: _Call, e: PolicyError) -> Response:
        body = e.anthropic_body() if call.client_api == "anthropic" else e.openai_body()
        call.status = e.status
        call.error = e.message
        headers = {**call.headers, **e.headers}
        return Response(_dumps(body), e.status, headers, media_type="application/json")

    async def _acquire(self, call: _Call, limits: dict[str, RateLimit], estimate: int) -> None:
        assert self.limiter is not None
        if isinstance(self.limiter, RedisTokenRateLimiter):
            decision = await asyncio.to_thread(self.limiter.acquire, limits, estimate)
        else:
            decision = self.limiter.acquire(limits, estimate)
        call.headers.update(decision.headers)
        if not decision.allowed:
            self.metrics.rate_limited.labels(decision.unit or "tokens").inc()
            raise decision.error()
        call.reservation = decision.reservation

    def _reconcile(self, call: _Call, usage: Mapping[str, Any] | int | None) -> None:
        if self.limiter is None or call.reservation is None:
            return
        reservation, call.reservation = call.reservation, None
        if isinstance(self.limiter, RedisTokenRateLimiter):
            # a Redis round trip: off the event loop, and nobody waits for it
            task = asyncio.get_running_loop().run_in_executor(
                None, self.limiter.reconcile, reservation, usage
            )
            task.add_done_callback(_log_failure)
        else:
            self.limiter.reconcile(reservation, usage)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.size.max_body_bytes
        length = request.headers.get("content-length")
        if limit is None:
            return await request.body()
        if length is not None and length.isdigit():
            self.size.check_body_bytes(int(length))
            return await request.body()
        chunks, total = [], 0
        async for chunk in request.stream():  # chunked: count as it comes
            total += len(chunk)
            self.size.check_body_bytes(total)
            chunks.append(chunk)
        return b"".join(chunks)

    def _authenticate(self, call: _Call, request: Request) -> None:
        key = self._api_key(request)
        if key is not None:
            call.key, call.tenant = key.name, key.tenant

    def _api_key(self, request: Request) -> ApiKey | None:
        """The client's key (None when no keys are configured); a 401 PolicyError when keys
        are configured and the request has none or an unknown one."""
        if not self.keys:
            return None
        secret = request.headers.get("x-api-key")
        auth = request.headers.get("authorization")
        if auth is not None and auth[:7].lower() == "bearer ":
            secret = auth[7:].strip()
        if not secret:
            raise PolicyError(
                401,
                "missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        key = self.keys.get(secret)
        if key is None:
            raise PolicyError(
                401,
                f"incorrect API key provided: {secret[:3]}...{secret[-2:] if len(secret) > 6 else ''}"
                "; ask the gateway's operator for a key",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        return key

    def _criticality(self, request: Request) -> str:
        """The request's criticality from ``x-request-criticality`` (GIE's names; without the
        header ``standard``): a ``sheddable`` request is refused when every backend is
        saturated, rather than added to a queue that is already long."""
        value = request.headers.get(CRITICALITY)
        if value is None:
            return "standard"
        name = value.strip().lower()
        if name not in CRITICALITIES:
            raise PolicyError(
                400,
                f"header {CRITICALITY} must be one of {', '.join(CRITICALITIES)} "
                f"(got {value!r}); leave it out for standard",
                code="invalid_criticality",
            )
        return name

    def _resolve(self, call: _Call, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """Alias → pool and backend model; the body with the backend's model name, and the
        LoRA adapter the model names (if any). 404 for a model nothing serves."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise PolicyError(400, "`model` is required (a string)", param="model")
        call.model = model
        target = resolve_model(model, self.aliases)
        if target is not None:
            call.pool = target.pool
            backend_model = target.model or model
        else:
            backend_model = model
            if not self.open_backends and model not in self.known_models:
                raise self._unknown_model(model)
        call.backend_model = backend_model
        if backend_model != model:
            body = {**body, "model": backend_model}
        adapter = (
            backend_model
            if backend_model in self.adapters and backend_model not in self.base_models
            else None
        )
        return body, adapter

    def _unknown_model(self, model: str) -> PolicyError:
        known = sorted(set(self.aliases) | self.base_models | self.adapters)
        return PolicyError(
            404,
            f"The model `{model}` does not exist or is not served by this gateway; "
            f"known models: {', '.join(known) or 'none'} (GET /v1/models lists them)",
            type="invalid_request_error",
            param="model",
            code="model_not_found",
        )

    def _request_info(
        self, call: _Call, body: Mapping[str, Any], adapter: str | None, request: Request
    ) -> RequestInfo:
        session = request.headers.get(self.config.routing.session_header)
        model = "" if adapter else call.backend_model
        if self.wants_prompt and call.route != "embeddings":
            return RequestInfo.from_openai(
                body,
                model=model,
                adapter=adapter,
                session_id=session,
                tenant=call.tenant,
                priority=call.criticality,
                pool=call.pool,
            )
        return RequestInfo(
            model=model,
            adapter=adapter,
            session_id=session,
            tenant=call.tenant,
            priority=call.criticality,
            pool=call.pool,
        )

    # -- the pipeline

    async def handle(self, request: Request, route: str, client_api: str = "openai") -> Any:
        """Answer one API request (steps 1–10 of the module docstring)."""
        loop = asyncio.get_running_loop()
        call = _Call(
            id=request.headers.get(REQUEST_ID) or uuid.uuid4().hex,
            route=route,
            client_api=client_api,
            started=time.perf_counter(),
            deadline=loop.time() + self.config.timeouts.total_s,
        )
        call.headers[REQUEST_ID] = call.id
        response: Any
        try:
            response = await self._pipeline(request, call)
        except PolicyError as e:
            response = self._error(call, e)
        except Exception as e:  # noqa: BLE001 -- a bug must still answer in the API's shape
            log.exception("request %s failed", call.id)
            response = self._error(
                call,
                PolicyError(
                    500, f"internal gateway error: {type(e).__name__}: {e}", type="server_error"
                ),
            )
        if not isinstance(response, _Relay):
            if call.status == 0:
                call.status = response.status_code
            self._done(call)
        return response

    async def _pipeline(self, request: Request, call: _Call) -> Any:
        # 1-2. size and JSON
        raw = await self._read_body(request)
        try:
            body = _loads(raw)
        except _JSON_ERRORS as e:
            raise PolicyError(
                400,
                f"the request body is not valid JSON: {e}; send a JSON object",
                code="invalid_json",
            ) from None
        if not isinstance(body, dict):
            raise PolicyError(400, "the request body must be a JSON object", code="invalid_json")
        estimate = self.size.check(body)
        call.stream = body.get("stream") is True
        # 3. key and tenant (and the criticality the client claims)
        self._authenticate(call, request)
        call.criticality = self._criticality(request)
        # 4. token rate limit
        limits = self.limits.get(call.key) or {}
        if limits and self.limiter is not None:
            await self._acquire(call, limits, estimate)
        changed = False
        if call.client_api == "anthropic":
            try:
                body = anthropic_to_openai_request(body)
            except TranslationError as e:
                raise PolicyError(400, str(e), param=e.param) from None
            changed = True
        # 5. alias and pool
        resolved, adapter = self._resolve(call, body)
        changed = changed or resolved is not body
        body = resolved
        # 6. transforms (chat only: templates and prompts are about messages)
        if call.route == "chat" and (
            self.transformer is not None or "template" in body or "variables" in body
        ):
            transformer = self.transformer or Transformer()
            metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else None
            body = transformer.apply(body, tenant=call.tenant, metadata=metadata).body
            changed = True
        # 7. the response cache
        if self.cache is not None and call.route == "chat":
            if self.cache_blocks or self.cache.config.semantic:
                lookup = await asyncio.to_thread(self.cache.lookup, body, tenant=call.tenant)
            else:
                lookup = self.cache.lookup(body, tenant=call.tenant)
            call.lookup = lookup
            call.cache = "hit" if lookup.hit else "miss"
            call.headers.update(lookup.headers)
            if lookup.hit:
                return self._replay(call, lookup)
        # usage of a stream is needed for the token limit and the metrics: ask for it, and
        # hide it again from a client that did not
        if call.stream and call.route != "embeddings":
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage")):
                body = {**body, "stream_options": {**(options or {}), "include_usage": True}}
                call.injected_usage = call.client_api == "openai"
                changed = True
        # 8-9. route and send
        info = self._request_info(call, body, adapter, request)
        payload = _Payload(body, None if changed else raw)
        upstream = await self._send(call, info, payload)
        call.endpoint = upstream.endpoint
        call.headers[BACKEND] = self.names[upstream.endpoint.url]
        # 10. respond
        if upstream.events is not None:
            return _Relay(self, call, upstream)
        return self._whole(call, upstream)

    async def _send(self, call: _Call, info: RequestInfo, payload: _Payload) -> _Upstream:
        def pick(tried: Any) -> Endpoint:
            return self.router.pick(info, exclude=tried)

        def on_retry(endpoint: Endpoint, exc: BaseException) -> None:
            self.metrics.retries.labels(self.names[endpoint.url]).inc()

        try:
            return await send_with_retries(
                self.retry, pick, lambda e: self._attempt(call, e, payload), on_retry=on_retry
            )
        except NoEndpoint as e:
            if e.reason == "unknown":
                raise self._unknown_model(call.model) from None
            if e.reason == "saturated":
                raise PolicyError(
                    503,
                    f"the request was shed: {e}",
                    type="server_error",
                    code="request_shed",
                ) from None
            retry = e.retry_after
            headers = {"retry-after": str(max(1, math.ceil(retry)))} if retry else {}
            raise PolicyError(
                503,
                f"no backend can take this request: {e}",
                type="server_error",
                code="no_backend_available",
                headers=headers,
            ) from None
        except _UpstreamFailure as e:
            raise _relay_error(call, e.upstream) from None
        except _TtftTimeout as e:
            raise PolicyError(504, str(e), type="server_error", code="upstream_timeout") from None
        except _TotalTimeout as e:
            raise PolicyError(504, str(e), type="server_error", code="upstream_timeout") from None
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
            raise PolicyError(
                503,
                f"no backend could be reached ({type(e).__name__}: {e}); check that they run",
                type="server_error",
                code="backend_unreachable",
            ) from None
        except httpx.HTTPError as e:
            raise PolicyError(
                502,
                f"the backend failed before answering ({type(e).__name__}: {e})",
                type="server_error",
                code="upstream_error",
            ) from None

    async def _attempt(self, call: _Call, endpoint: Endpoint, payload: _Payload) -> _Upstream:
        """One try on `endpoint`; returns before anything reaches the client (for a stream,
        once its first event is in), raising a retryable error otherwise."""
        router, backend = self.router, self.backends[endpoint.url]
        name = self.names[endpoint.url]
        url, content = self._upstream_request(call, backend, payload)
        router.on_start(endpoint)
        if call.attempts and self.config.retries.backoff_s:
            await asyncio.sleep(self.config.retries.backoff_s)
        call.attempts += 1
        loop = asyncio.get_running_loop()
        headers = [
            *self.upstream_headers[endpoint.url],
            (b"x-request-id", call.id.encode("latin-1")),
        ]
        # a ready Request skips the client's per-request merging of URL, headers and cookies
        request = httpx.Request("POST", url, headers=headers, content=content)
        stream = call.stream and call.route != "embeddings"
        limit = call.deadline
        if stream:
            limit = min(limit, loop.time() + self.config.timeouts.ttft_s)
        response: httpx.Response | None = None
        events: AsyncIterator[bytes] | None = None
        try:
            async with asyncio.timeout_at(limit):
                response = await self.client.send(request, stream=True)
                received = _header_dict(response.headers.raw)
                router.on_response_headers(endpoint, received)
                status = response.status_code
                if status >= 400 or not stream:
                    content_in = await response.aread()
                    upstream = _Upstream(endpoint, backend, status, received, content_in)
                else:
                    if backend.api == "anthropic":
                        events = _anthropic_events(response)
                    else:
                        events = _sse_events(response)
                    first = await anext(events, None)
                    if first is None:
                        raise httpx.RemoteProtocolError("the stream ended before its first event")
                    call.ttft = time.perf_counter() - call.started
                    upstream = _Upstream(endpoint, backend, status, received)
                    upstream.response, upstream.events, upstream.first = response, events, [first]
        except BaseException as exc:
            if events is not None:
                with contextlib.suppress(Exception):
                    await events.aclose()  # type: ignore[attr-defined]
            if response is not None:
                with contextlib.suppress(Exception):
                    await response.aclose()
            if isinstance(exc, asyncio.CancelledError):
                # the gateway is stopping or the caller went: not the backend's fault
                router.on_finish(endpoint, ok=False, status=499)
                raise
            if isinstance(exc, TimeoutError):
                router.on_finish(endpoint, ok=False)
                self.metrics.upstream_errors.labels(name, "timeout").inc()
                if stream and limit < call.deadline:
                    raise _TtftTimeout(
                        f"backend {name} sent no first token within timeouts.ttft_s "
                        f"({self.config.timeouts.ttft_s:g} s)"
                    ) from None
                raise _TotalTimeout(
                    f"no complete answer within timeouts.total_s "
                    f"({self.config.timeouts.total_s:g} s)"
                ) from None
            router.on_finish(endpoint, ok=False)
            if isinstance(exc, httpx.HTTPError):
                self.metrics.upstream_errors.labels(name, type(exc).__name__).inc()
            raise
        if status >= 400:
            self.metrics.upstream_errors.labels(name, str(status)).inc()
            retry_after = None
            if self.config.circuit_breaker.honour_retry_after:
                retry_after = _retry_after(upstream.headers)
            router.on_finish(endpoint, ok=False, status=status, retry_after=retry_after)
            if self.retry.retryable_status(status):
                raise _UpstreamFailure(upstream, retry_after)
            return upstream
        if not stream:
            router.on_finish(endpoint, ok=True, status=status)
        return upstream

    def _upstream_request(
        self, call: _Call, backend: Backend, payload: _Payload
    ) -> tuple[httpx.URL, bytes]:
        if backend.api == "anthropic":
            if call.route != "chat":
                raise PolicyError(
                    400,
                    f"backend {backend.name} speaks the Anthropic Messages API, which has no "
                    f"{_PATHS[call.route]}; route this model to an OpenAI-compatible pool",
                    param="model",
                )
            return self.urls[backend.url, call.route], payload.anthropic()
        return self.urls[backend.url, call.route], payload.openai()

    # -- answers

    def _whole(self, call: _Call, upstream: _Upstream) -> Response:
        """A whole upstream answer (or a non-retryable error) in the client's API."""
        if upstream.status >= 400:
            raise _relay_error(call, upstream)
        content = upstream.content or b""
        try:
            parsed = _loads(content)
        except _JSON_ERRORS:
            parsed = None
        if not isinstance(parsed, dict):
            raise PolicyError(
                502,
                f"backend {upstream.backend.name} answered with a body that is not a JSON object",
                type="server_error",
                code="upstream_error",
            )
        call.status = upstream.status
        completion: dict[str, Any] | None = parsed
        if upstream.backend.api == "anthropic":
            completion = anthropic_to_openai_response(parsed)
            call.usage = completion.get("usage")
            if call.client_api == "openai":
                content = _dumps(completion)
        else:
            call.usage = parsed.get("usage")
            if call.client_api == "anthropic":
                content = _dumps(openai_to_anthropic_response(parsed))
        if call.lookup is not None and call.lookup.cacheable and completion is not None:
            self._store(call.lookup, completion)
        headers = _relayed(upstream.headers)
        headers.update(call.headers)
        return Response(content, upstream.status, headers, media_type="application/json")

    def _store(self, lookup: CacheLookup, completion: dict[str, Any]) -> None:
        assert self.cache is not None
        if self.cache_blocks:  # a Redis write: off the loop, and nobody waits for it
            task = asyncio.get_running_loop().run_in_executor(
                None, self.cache.store, lookup, completion
            )
            task.add_done_callback(_log_failure)
        else:
            self.cache.store(lookup, completion)

    def _replay(self, call: _Call, lookup: CacheLookup) -> Response:
        """A cache hit rendered for the client: JSON, or SSE for a streaming client."""
        replay = lookup.replay()
        call.status = 200
        assert lookup.completion is not None
        call.usage = lookup.completion.get("usage")
        if call.client_api == "anthropic":
            if lookup.stream:
                sink = _AnthropicSink()
                body = b"".join(sink.feed(event) for event in replay.chunks)
            else:
                body = _dumps(openai_to_anthropic_response(_loads(replay.body)))
        else:
            body = replay.body
        return Response(body, 200, call.headers, media_type=replay.media_type)

    def _done(self, call: _Call) -> None:
        """Account for a finished request: the limiter, the metrics and the access log."""
        if call.logged:
            return
        call.logged = True
        duration = time.perf_counter() - call.started
        usage = (
            openai_usage(call.usage) if call.usage and "input_tokens" in call.usage else call.usage
        )
        input_tokens = output_tokens = None
        if isinstance(usage, Mapping):
            input_tokens = usage.get("prompt_tokens")
            output_tokens = usage.get("completion_tokens")
        if call.reservation is not None:
            if call.cache == "hit" or (call.status >= 400 and usage is None):
                self._reconcile(call, 0)  # nothing reached a model: give the tokens back
            else:
                self._reconcile(call, usage)
        m = self.metrics
        m.requests.labels(
            call.route if call.client_api == "openai" else "messages", str(call.status)
        ).inc()
        if call.cache is not None:
            m.cache.labels(call.cache).inc()
        if call.backend_model:
            dur, ttft, tpot, tok_in, tok_out = m.per_model(_OPERATIONS[call.route], call.model)
            dur.observe(duration)
            if call.ttft is not None:
                ttft.observe(call.ttft)
            if isinstance(input_tokens, int):
                tok_in.observe(input_tokens)
            if isinstance(output_tokens, int):
                tok_out.observe(output_tokens)
                if call.ttft is not None and output_tokens > 1:
                    tpot.observe((duration - call.ttft) / (output_tokens - 1))
        if access_log.isEnabledFor(logging.INFO):
            record = {
                "request_id": call.id,
                "route": call.route,
                "api": call.client_api,
                "tenant": call.tenant,
                "key": call.key,
                "model": call.model,
                "backend_model": call.backend_model,
                "pool": call.pool,
                "endpoint": self.names[call.endpoint.url] if call.endpoint else None,
                "attempts": call.attempts,
                "status": call.status,
                "stream": call.stream,
                "cache": call.cache,
                "ttft_ms": None if call.ttft is None else round(call.ttft * 1000, 2),
                "duration_ms": round(duration * 1000, 2),
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "error": call.error,
            }
            access_log.info(json.dumps(record, ensure_ascii=False))

    # -- plain routes

    async def models(self, request: Request) -> Response:
        # the model list tells what a fleet serves: behind keys, as the API routes are
        try:
            self._api_key(request)
        except PolicyError as e:
            return JSONResponse(e.openai_body(), e.status, e.headers)
        created = int(time.time())
        data, seen = [], set()
        for alias, target in self.aliases.items():
            seen.add(alias)
            data.append(
                {
                    "id": alias,
                    "object": "model",
                    "created": created,
                    "owned_by": f"pool:{target.pool}",
                    "root": target.model or alias,
                }
            )
        for b in self.config.backends:
            for m in [*b.models, *b.adapters]:
                if m not in seen:
                    seen.add(m)
                    data.append(
                        {
                            "id": m,
                            "object": "model",
                            "created": created,
                            "owned_by": f"pool:{b.pool}",
                        }
                    )
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        now = self.clock()
        pools: dict[str, int] = {}
        for e in self.router.endpoints:
            pools.setdefault(e.pool, 0)
            if e.healthy and e.breaker.allows(now):
                pools[e.pool] += 1
        down = sorted(p for p, n in pools.items() if n == 0)
        if down:
            body = PolicyError(
                503,
                f"no backend is up in pool(s) {', '.join(down)}",
                type="server_error",
                code="not_ready",
            ).openai_body()
            return JSONResponse({**body, "pools": pools}, status_code=503)
        return JSONResponse({"status": "ready", "pools": pools})

    async def metrics_route(self, request: Request) -> Response:
        return Response(_generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@dataclass(slots=True)
class _Payload:
    """The upstream body in each API, serialised once per API; `raw` is the client's own bytes
    when nothing changed them (forwarded untouched)."""

    body: dict[str, Any]
    raw: bytes | None = None
    _anthropic: bytes | None = None

    def openai(self) -> bytes:
        if self.raw is None:
            self.raw = _dumps(self.body)
        return self.raw

    def anthropic(self) -> bytes:
        if self._anthropic is None:
            try:
                self._anthropic = _dumps(openai_to_anthropic_request(self.body))
            except TranslationError as e:
                raise PolicyError(400, str(e), param=e.param) from None
        return self._anthropic


def _header_dict(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Response headers as a plain dict with lower-case names (repeated ones joined by ", ",
    as HTTP allows): read several times per request, and httpx's Headers decode on each read."""
    out: dict[str, str] = {}
    for k, v in raw:
        key, value = k.decode("latin-1").lower(), v.decode("latin-1")
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def _retry_after(headers: Mapping[str, str]) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms is not None:
        with contextlib.suppress(ValueError):
            value = float(ms) / 1000
            if math.isfinite(value) and value >= 0:
                return value
    return parse_retry_after(headers.get("retry-after"))


def _relayed(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k not in _DROP}


def _relay_error(call: _Call, upstream: _Upstream) -> PolicyError:
    """An upstream error answer as a PolicyError in the client's API, keeping its status,
    message and ``Retry-After``."""
    status = upstream.status
    try:
        parsed = _loads(upstream.content or b"")
    except _JSON_ERRORS:
        parsed = None
    name = upstream.backend.name
    if isinstance(parsed, dict) and upstream.backend.api == "anthropic":
        parsed = anthropic_error_to_openai(parsed, status)
    err = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or err)
        e = PolicyError(
            status,
            message,
            type=err.get("type") or None,
            code=err.get("code"),
            param=err.get("param"),
        )
    else:
        text = (upstream.content or b"").decode("utf-8", "replace").strip()[:500]
        e = PolicyError(status, f"backend {name} answered {status}: {text or '(no body)'}")
    for h in ("retry-after", "retry-after-ms"):
        if h in upstream.headers:
            e.headers[h] = upstream.headers[h]
    return e


def _log_failure(future: Any) -> None:
    exc = future.exception()
    if exc is not None:
        log.warning("a background cache or rate-limit update failed: %s", exc)


# --- streaming ----------------------------------------------------------------------------------


class _Relay:
    """The ASGI response of a streamed answer: relays each upstream event as it arrives,
    keeps a copy for the cache when the request may be stored, reads the usage, and ends with
    an error event if the upstream fails mid-stream. A client that disconnects closes the
    upstream stream at once."""

    def __init__(self, gateway: Gateway, call: _Call, upstream: _Upstream) -> None:
        self.gateway, self.call, self.upstream = gateway, call, upstream
        lookup = call.lookup
        self.copy: list[bytes] | None = (
            [] if lookup is not None and lookup.cacheable and not lookup.hit else None
        )
        self.sink = _AnthropicSink() if call.client_api == "anthropic" else None
        self.done = False
        self.errored = False  # the upstream sent an error event of its own (relayed as is)
        self.failed: str | None = None  # why the gateway ends the stream with an error
        headers = _relayed(upstream.headers)
        headers.update(call.headers)
        headers.update(
            {
                "content-type": "text/event-stream; charset=utf-8",
                "cache-control": "no-cache",
                "x-accel-buffering": "no",  # proxies in front must not buffer the stream either
            }
        )
        self.raw_headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
        ]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        call = self.call
        call.status = 200
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():  # the client left: stop reading the upstream
                pump.cancel()
                call.error = "the client disconnected"
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
            else:
                pump.result()
        finally:
            watch.cancel()
            await self._finish()

    async def _pump(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        up = self.upstream
        assert up.events is not None
        try:
            for event in up.first:
                await self._emit(send, event)
            while True:
                async with asyncio.timeout_at(self.call.deadline):
                    event = await anext(up.events, None)
                if event is None:
                    break
                await self._emit(send, event)
        except TimeoutError:
            self.failed = (
                f"the answer did not finish within timeouts.total_s "
                f"({self.gateway.config.timeouts.total_s:g} s)"
            )
        except httpx.HTTPError as e:
            self.failed = (
                f"backend {up.backend.name} broke off the stream mid-answer "
                f"({type(e).__name__}: {e})"
            )
        if self.failed is not None:
            await self._send_error(send, self.failed)
        elif self.copy is not None and self.done and not self.errored:
            self._store()
        elif self.sink is not None and not self.done:
            # no [DONE]: the Anthropic client still gets its closing (or error) events
            tail = self.sink.feed(_DONE)
            if tail:
                await send({"type": "http.response.body", "body": tail, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _emit(self, send: Any, event: bytes) -> None:
        call = self.call
        if self.copy is not None:
            self.copy.append(event)
        forward = True
        if event.startswith(b"data: [DONE]") or event.startswith(b"data:[DONE]"):
            self.done = True
        elif b'"usage"' in event and b'"usage":null' not in event and b'"usage": null' not in event:
            try:
                chunk = json.loads(_event_data(event))
            except ValueError:
                chunk = None
            if isinstance(chunk, dict):
                if isinstance(chunk.get("usage"), dict):
                    call.usage = chunk["usage"]
                if call.injected_usage and chunk.get("choices") == []:
                    forward = False  # the client did not ask for the usage chunk
        elif event.startswith(b'data: {"error"'):
            self.errored = True
        if not forward:
            return
        if self.sink is not None:
            event = self.sink.feed(event)
            if not event:
                return
        await send({"type": "http.response.body", "body": event, "more_body": True})

    async def _send_error(self, send: Any, message: str) -> None:
        self.call.error = message
        if self.sink is not None:
            data = self.sink.error(message)
        else:
            body = PolicyError(502, message, type="server_error", code="upstream_stream_error")
            data = openai_sse(body.openai_body())
        await send({"type": "http.response.body", "body": data, "more_body": True})

    def _store(self) -> None:
        g, call = self.gateway, self.call
        assert g.cache is not None and call.lookup is not None and self.copy is not None
        if g.cache_blocks:
            task = asyncio.get_running_loop().run_in_executor(
                None, g.cache.store_stream, call.lookup, self.copy
            )
            task.add_done_callback(_log_failure)
        else:
            g.cache.store_stream(call.lookup, self.copy)

    async def _finish(self) -> None:
        g, call, up = self.gateway, self.call, self.upstream
        with contextlib.suppress(Exception):
            await up.events.aclose()  # type: ignore[union-attr]
        if up.response is not None:
            with contextlib.suppress(Exception):
                await up.response.aclose()
        broken = self.failed is not None or self.errored
        g.router.on_finish(up.endpoint, ok=not broken, status=None if broken else 200)
        if self.errored and call.error is None:
            call.error = "the backend sent an error event"
        g._done(call)


async def _disconnected(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


# --- the app ------------------------------------------------------------------------------------


def create_app(
    config: GatewayConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    http_client: httpx.AsyncClient | None = None,
) -> Starlette:
    """The gateway as a Starlette app; its :class:`Gateway` is ``app.state.gateway``.

    `clock` (seconds) drives the router, the breakers and the local rate limiter (tests pass a
    fake one); `http_client` replaces the shared upstream client (it is then left open). The
    lifespan starts the health checks and the Prometheus scrapes of backends without ORCA.
    Raises :class:`~datahall.gateway.config.ConfigError` for an API key variable that is not
    set, and ValueError when the semantic cache's embedder is not installed.
    """
    gateway = Gateway(config, clock=clock, http_client=http_client)

    def api(route: str, client_api: str = "openai") -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Any:
            return await gateway.handle(request, route, client_api)

        return endpoint

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.aclose()

    routes = [
        Route("/v1/chat/completions", api("chat"), methods=["POST"]),
        Route("/v1/completions", api("completions"), methods=["POST"]),
        Route("/v1/embeddings", api("embeddings"), methods=["POST"]),
        Route("/v1/messages", api("chat", "anthropic"), methods=["POST"]),
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/health", gateway.health, methods=["GET"]),
        Route("/ready", gateway.ready, methods=["GET"]),
        Route("/metrics", gateway.metrics_route, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gateway = gateway
    return app
