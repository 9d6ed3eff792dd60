"""Resilience of the gateway's upstream calls: circuit breakers, active health checks, the
Prometheus scrape of vLLM's load gauges, and the retry rule.

Brief ``ai-gateway.md`` §2.3 ("a circuit breaker that honours ``Retry-After``"), §2.1 (the scrape
fallback with vLLM's metric names), §2.5 ("retries happen only before the first byte of a
stream") and §2.6.6 (the invariants). The pieces:

- :class:`CircuitBreaker`: per endpoint, closed → open after ``failure_threshold`` consecutive
  failures, for ``cooldown`` seconds (Envoy outlier detection's ``consecutive_5xx`` = 5 and
  ``base_ejection_time`` = 30 s are the defaults); an upstream 429/503 with ``Retry-After`` opens
  it for exactly that long (Azure APIM's backend circuit breaker with ``acceptRetryAfter``); then
  half-open, where one probe request decides.
- :class:`HealthChecker`: an asyncio task that polls ``GET /health`` on every endpoint and marks
  it up or down (Envoy's active health checking, with its healthy/unhealthy thresholds).
- :class:`MetricsScraper`: an asyncio task that polls ``GET /metrics`` and reads
  :func:`parse_vllm_metrics` into the endpoint, as the GIE endpoint picker does (~50 ms there).
- :class:`RetryPolicy` and :func:`send_with_retries`: retry connect errors, 5xx and 429 on
  *other* endpoints, a bounded number of times, and never once a byte went to the client.

Clocks are injectable everywhere, so tests run on a fake one:

>>> now = 0.0
>>> breaker = CircuitBreaker(clock=lambda: now)
>>> breaker.record_failure(retry_after=7.5)   # an upstream 429 with Retry-After: 7.5
>>> breaker.state(), breaker.allows()
('open', False)
>>> now = 7.5
>>> breaker.state(), breaker.allows()
('half_open', True)

The polling tasks act on `datahall.gateway.routing.Endpoint` objects (their ``url``,
``healthy`` and ``observe_metrics``); this module imports nothing from routing at run time, so
routing can build its endpoints' breakers from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

if TYPE_CHECKING:
    from datahall.gateway.routing import Endpoint

__all__ = [
    "CircuitBreaker",
    "HealthChecker",
    "MetricsScraper",
    "RetryPolicy",
    "UpstreamStatusError",
    "VllmMetrics",
    "parse_retry_after",
    "parse_vllm_metrics",
    "send_with_retries",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
E = TypeVar("E")
T = TypeVar("T")


# --- Retry-After -----------------------------------------------------------------------------


def parse_retry_after(value: str | float | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (RFC 9110 §10.2.3), or None if unreadable.

    The value is delay-seconds or an HTTP-date; `now` is the wall-clock time (Unix seconds,
    ``time.time()`` by default) an HTTP-date is measured from. A date in the past gives 0.0.
    Fractional seconds are accepted (some servers send them) although the RFC has integers.

    >>> parse_retry_after("120"), parse_retry_after(2.5), parse_retry_after("soon")
    (120.0, 2.5, None)
    >>> parse_retry_after("Sun, 22 Nov 2026 04:00:30 GMT", now=1795320000.0)
    30.0
    """
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(text)
            except (TypeError, ValueError, IndexError):
                return None
            if when is None or when.tzinfo is None:  # RFC 9110 dates are always GMT
                return None
            seconds = when.timestamp() - (time.time() if now is None else now)
            return max(0.0, seconds)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


# --- circuit breaker -------------------------------------------------------------------------


class CircuitBreaker:
    """One endpoint's circuit breaker: ``closed`` → ``open`` → ``half_open`` → ``closed``.

    - *closed*: requests flow; ``failure_threshold`` consecutive failures open it for
      ``cooldown`` seconds (defaults from Envoy's outlier detection: 5 consecutive 5xx, 30 s).
    - *open*: no requests until ``open_until``. :meth:`trip` (an upstream 429/503 with
      ``Retry-After``) sets ``open_until`` to exactly now + that many seconds.
    - *half_open*: once ``open_until`` passes, up to ``half_open_probes`` requests go through;
      a success closes the breaker, a failure opens it for another ``cooldown``.

    Every method takes an optional `now` (seconds on `clock`); the router passes its own clock's
    time so that one fake clock drives a whole test. What counts as a failure is the caller's
    decision (the router counts connect errors, 5xx and 429, not other 4xx).

    >>> b = CircuitBreaker(failure_threshold=2, cooldown=10.0, clock=lambda: 0.0)
    >>> b.record_failure(now=0.0); b.state(now=0.0)
    'closed'
    >>> b.record_failure(now=1.0); b.state(now=1.0), b.retry_in(now=1.0)
    ('open', 10.0)
    >>> b.on_start(now=11.0); b.allows(now=11.0)  # the one half-open probe is in flight
    False
    >>> b.record_success(now=11.5); b.state(now=11.5)
    'closed'
    """

    __slots__ = (
        "failure_threshold",
        "cooldown",
        "half_open_probes",
        "clock",
        "consecutive_failures",
        "open_until",
        "opened_count",
        "_probes",
    )

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        cooldown: float = 30.0,
        half_open_probes: int = 1,
        clock: Clock = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, not {failure_threshold}")
        if not cooldown >= 0:
            raise ValueError(f"cooldown must be >= 0 s, not {cooldown}")
        if half_open_probes < 1:
            raise ValueError(f"half_open_probes must be at least 1, not {half_open_probes}")
        self.failure_threshold = failure_threshold
        self.cooldown = float(cooldown)
        self.half_open_probes = half_open_probes
        self.clock = clock
        self.consecutive_failures = 0
        self.open_until: float | None = None
        """When the open state ends (None: closed)."""
        self.opened_count = 0
        """How many times the breaker opened (for metrics)."""
        self._probes = 0

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    def state(self, now: float | None = None) -> str:
        """``closed``, ``open`` or ``half_open`` at `now`."""
        if self.open_until is None:
            return "closed"
        return "open" if self._now(now) < self.open_until else "half_open"

    def allows(self, now: float | None = None) -> bool:
        """Whether a new request may go to the endpoint now. Has no side effect: call
        :meth:`on_start` when the request is really sent."""
        state = self.state(now)
        if state == "closed":
            return True
        return state == "half_open" and self._probes < self.half_open_probes

    def retry_in(self, now: float | None = None) -> float:
        """Seconds until the breaker admits a request again (0.0 if it does now)."""
        if self.allows(now) or self.open_until is None:
            return 0.0
        return max(0.0, self.open_until - self._now(now))

    def on_start(self, now: float | None = None) -> None:
        """A request was sent; in half-open state it is one of the probes."""
        if self.state(now) == "half_open":
            self._probes += 1

    def record_success(self, now: float | None = None) -> None:
        """A request succeeded: the breaker closes and the failure count restarts. While the
        breaker is open, a success is a late answer to a request sent before it opened, and
        changes nothing: an upstream's ``Retry-After`` holds for its whole duration."""
        if self.state(now) == "open":
            return
        self.consecutive_failures = 0
        self.open_until = None
        self._probes = 0

    def record_failure(self, now: float | None = None, *, retry_after: float | None = None) -> None:
        """A request failed. With `retry_after` (seconds, from the upstream's ``Retry-After``)
        the breaker opens for exactly that long; otherwise a failed half-open probe, or the
        ``failure_threshold``-th failure in a row, opens it for ``cooldown``."""
        t = self._now(now)
        self.consecutive_failures += 1
        if retry_after is not None:
            self.trip(retry_after, now=t)
            return
        state = self.state(t)
        if state == "half_open" or (
            state == "closed" and self.consecutive_failures >= self.failure_threshold
        ):
            self.trip(self.cooldown, now=t)
        # state "open": a late failure of a request sent before the breaker opened; the
        # endpoint is already out, so the cooldown is not extended.

    def trip(self, seconds: float, now: float | None = None) -> None:
        """Open the breaker for exactly `seconds` from `now`; the latest call wins, so an
        upstream's newer ``Retry-After`` replaces an older one."""
        self.open_until = self._now(now) + max(0.0, float(seconds))
        self.opened_count += 1
        self._probes = 0

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(state={self.state()!r}, "
            f"consecutive_failures={self.consecutive_failures})"
        )


# --- vLLM metrics ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VllmMetrics:
    """The load gauges of one vLLM-compatible server, as scraped from ``/metrics`` (brief §2.1).

    None means the server did not export that gauge. ``max_lora`` and the adapter tuples come
    from the labels of ``vllm:lora_requests_info``.
    """

    num_requests_waiting: float | None = None
    num_requests_running: float | None = None
    kv_cache_usage_perc: float | None = None
    max_lora: int | None = None
    running_lora_adapters: tuple[str, ...] = ()
    waiting_lora_adapters: tuple[str, ...] = ()


_WAITING = "vllm:num_requests_waiting"
_RUNNING = "vllm:num_requests_running"
_KV = "vllm:kv_cache_usage_perc"
_KV_OLD = "vllm:gpu_cache_usage_perc"  # vLLM's name before v0.10; GIE still reads it
_LORA = "vllm:lora_requests_info"
_GAUGES = (_WAITING, _RUNNING, _KV, _KV_OLD, _LORA)


def parse_vllm_metrics(text: str) -> VllmMetrics:
    """Read vLLM's load gauges from a Prometheus text exposition (``prometheus_client``'s
    parser). Gauges with several samples (data-parallel engines, several model names) are
    summed for the queue lengths, and the largest KV-cache usage is kept, since the fullest
    engine is the one that preempts first. Of several ``vllm:lora_requests_info`` samples the
    one with the largest value wins: vLLM sets it to the time it was taken, as GIE reads it.
    Only the lines of these gauges are parsed (vLLM's page has hundreds of histogram lines,
    11 ms of parsing on the event loop per scrape); a malformed one raises ValueError.

    >>> parse_vllm_metrics('''
    ... vllm:num_requests_waiting{model_name="m"} 3.0
    ... vllm:gpu_cache_usage_perc{model_name="m"} 0.25
    ... vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql,chat",waiting_lora_adapters=""} 1.7e9
    ... ''')
    VllmMetrics(num_requests_waiting=3.0, num_requests_running=None, kv_cache_usage_perc=0.25, max_lora=2, running_lora_adapters=('sql', 'chat'), waiting_lora_adapters=())
    """
    from prometheus_client.parser import text_string_to_metric_families

    wanted = "\n".join(line for line in text.splitlines() if line.lstrip().startswith(_GAUGES))
    sums: dict[str, float] = {}
    kv: dict[str, float] = {}
    lora: tuple[float, dict[str, str]] | None = None
    for family in text_string_to_metric_families(wanted):
        for sample in family.samples:
            name, value = sample.name, float(sample.value)
            if not math.isfinite(value) and name != _LORA:
                continue  # a NaN gauge says nothing about load
            if name in (_WAITING, _RUNNING):
                sums[name] = sums.get(name, 0.0) + value
            elif name in (_KV, _KV_OLD):
                kv[name] = max(kv.get(name, value), value)
            elif name == _LORA and (lora is None or value >= lora[0]):
                lora = (value, dict(sample.labels))
    usage = kv.get(_KV, kv.get(_KV_OLD))
    max_lora: int | None = None
    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    if lora is not None:
        labels = lora[1]
        with contextlib.suppress(ValueError, OverflowError):  # "", "nan", "inf"
            max_lora = int(float(labels.get("max_lora", "")))
        running = _adapters(labels.get("running_lora_adapters", ""))
        waiting = _adapters(labels.get("waiting_lora_adapters", ""))
    return VllmMetrics(
        num_requests_waiting=sums.get(_WAITING),
        num_requests_running=sums.get(_RUNNING),
        kv_cache_usage_perc=usage,
        max_lora=max_lora,
        running_lora_adapters=running,
        waiting_lora_adapters=waiting,
    )


def _adapters(label: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in label.split(",") if name.strip())


# --- polling tasks ---------------------------------------------------------------------------


class _Poller:
    """A task that runs :meth:`poll_all` every ``interval`` seconds until stopped.

    `endpoints` is a list, or a callable read on every round, e.g. ``lambda: router.endpoints``
    so that endpoints added by ``Router.update`` are polled too. A `client` passed in is used
    and left open; without one, the poller makes its own and closes it in :meth:`aclose`.
    """

    path: str

    def __init__(
        self,
        endpoints: Iterable[Endpoint] | Callable[[], Iterable[Endpoint]],
        *,
        interval: float,
        timeout: float,
        client: httpx.AsyncClient | None,
        clock: Clock,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 s, not {interval}")
        # A callable is read on every round, so endpoints added to a router are polled too.
        self._endpoints = endpoints if callable(endpoints) else list(endpoints)
        self.interval = float(interval)
        self.timeout = float(timeout)
        self.clock = clock
        self._client = client
        self._own_client = client is None
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0
        """Completed polling rounds."""

    def endpoints(self) -> list[Endpoint]:
        source = self._endpoints
        return list(source() if callable(source) else source)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
        return self._client

    async def _get(self, endpoint: Endpoint) -> httpx.Response:
        url = endpoint.url.rstrip("/") + self.path
        return await self._http().get(url, timeout=self.timeout)

    async def poll(self, endpoint: Endpoint) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    async def poll_all(self) -> dict[str, Any]:
        """One round over all endpoints, concurrently; returns each endpoint's result by URL."""
        endpoints = self.endpoints()
        results = await asyncio.gather(*(self.poll(e) for e in endpoints))
        self.rounds += 1
        return {e.url: r for e, r in zip(endpoints, results, strict=True)}

    async def run(self) -> None:
        """Poll every ``interval`` seconds until cancelled. A round that fails unexpectedly is
        logged and the loop goes on: a monitoring task must not die of one bad answer."""
        while True:
            try:
                await self.poll_all()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 -- logged; the next round tries again
                log.exception("%s round failed", type(self).__name__)
            await asyncio.sleep(self.interval)

    def start(self) -> asyncio.Task[None]:
        """Start :meth:`run` as a task of the running event loop (once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self.run(), name=type(self).__name__
            )
        return self._task

    async def aclose(self) -> None:
        """Stop the task and close the HTTP client if this object created it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._own_client and self._client is not None:
            await self._client.aclose()
            self._client = None


class HealthChecker(_Poller):
    """Active health checks: ``GET <url>/health`` on every endpoint each ``interval`` seconds.

    A 2xx answer within ``timeout`` is a pass; anything else (another status, a connect error,
    a timeout) a fail. An endpoint is marked down (``endpoint.healthy = False``) after
    ``unhealthy_threshold`` fails in a row and up again after ``healthy_threshold`` passes in a
    row, as Envoy's active health checker does, so that one lost probe does not flap it.
    `on_change(endpoint, healthy)` is called on each transition (the router's
    ``on_health_change``, which restarts an endpoint's ORCA blackout when it comes back).
    """

    def __init__(
        self,
        endpoints: Iterable[Endpoint] | Callable[[], Iterable[Endpoint]],
        *,
        interval: float = 5.0,
        timeout: float = 2.0,
        path: str = "/health",
        unhealthy_threshold: int = 2,
        healthy_threshold: int = 1,
        on_change: Callable[[Endpoint, bool], None] | None = None,
        client: httpx.AsyncClient | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(endpoints, interval=interval, timeout=timeout, client=client, clock=clock)
        if unhealthy_threshold < 1 or healthy_threshold < 1:
            raise ValueError("healthy_threshold and unhealthy_threshold must be at least 1")
        self.path = path
        self.unhealthy_threshold = unhealthy_threshold
        self.healthy_threshold = healthy_threshold
        self.on_change = on_change
        self._streak: dict[str, int] = {}  # > 0: passes in a row, < 0: fails in a row
        self.last_error: dict[str, str] = {}
        """Why each failing endpoint failed its last check."""

    async def poll(self, endpoint: Endpoint) -> bool:
        """Check one endpoint, update its health, and return whether this check passed."""
        try:
            response = await self._get(endpoint)
            passed = 200 <= response.status_code < 300
            error = "" if passed else f"GET {self.path} answered {response.status_code}"
        except httpx.HTTPError as exc:
            passed, error = False, f"GET {self.path} failed: {type(exc).__name__}: {exc}"
        if error:
            self.last_error[endpoint.url] = error
        else:
            self.last_error.pop(endpoint.url, None)
        self._apply(endpoint, passed)
        return passed

    def _apply(self, endpoint: Endpoint, passed: bool) -> None:
        streak = self._streak.get(endpoint.url, 0)
        streak = max(streak, 0) + 1 if passed else min(streak, 0) - 1
        self._streak[endpoint.url] = streak
        endpoint.health_checked_at = self.clock()
        if endpoint.healthy and streak <= -self.unhealthy_threshold:
            endpoint.healthy = False
            log.warning("endpoint %s is down: %s", endpoint.url, self.last_error.get(endpoint.url))
            if self.on_change is not None:
                self.on_change(endpoint, False)
        elif not endpoint.healthy and streak >= self.healthy_threshold:
            endpoint.healthy = True
            log.info("endpoint %s is up again", endpoint.url)
            if self.on_change is not None:
                self.on_change(endpoint, True)


class MetricsScraper(_Poller):
    """The Prometheus fallback of brief §2.1: ``GET <url>/metrics`` on every endpoint each
    ``interval`` seconds, read with :func:`parse_vllm_metrics` and handed to
    ``endpoint.observe_metrics(metrics, now)``. A failed scrape leaves the last snapshot in
    place; the router stops trusting it once it is older than its ``metrics_ttl``."""

    def __init__(
        self,
        endpoints: Iterable[Endpoint] | Callable[[], Iterable[Endpoint]],
        *,
        interval: float = 0.25,
        timeout: float = 1.0,
        path: str = "/metrics",
        client: httpx.AsyncClient | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(endpoints, interval=interval, timeout=timeout, client=client, clock=clock)
        self.path = path
        self.errors: dict[str, int] = {}
        """Failed scrapes per endpoint URL."""

    async def poll(self, endpoint: Endpoint) -> VllmMetrics | None:
        """Scrape one endpoint; returns its metrics, or None when the scrape failed."""
        try:
            response = await self._get(endpoint)
            response.raise_for_status()
            metrics = parse_vllm_metrics(response.text)
        except (httpx.HTTPError, ValueError) as exc:
            self.errors[endpoint.url] = self.errors.get(endpoint.url, 0) + 1
            log.debug("scraping %s%s failed: %s", endpoint.url, self.path, exc)
            return None
        endpoint.observe_metrics(metrics, self.clock())
        return metrics


# --- retries ---------------------------------------------------------------------------------


class UpstreamStatusError(Exception):
    """An upstream answered with a status the gateway may retry elsewhere (5xx, 429), before
    anything was sent to the client. `retry_after` is its ``Retry-After`` in seconds, if any."""

    def __init__(self, status: int, retry_after: float | None = None, message: str = "") -> None:
        super().__init__(message or f"upstream answered {status}")
        self.status = status
        self.retry_after = retry_after


# Transport errors after which the request surely or very likely never reached the model:
# connection refused or reset, pool exhausted, protocol garbage. A read timeout is left out by
# default: the upstream may still be working on the request, and a retry would double its load.
_RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When the gateway tries another endpoint (brief §2.5, §2.6.6).

    A request is retried only while nothing has reached the client (``first_byte_sent`` is
    False: once a stream started, a retry would splice two answers), only after a connect-level
    error or a status in ``retry_statuses``, and at most ``max_attempts`` attempts in all, each
    on an endpoint not tried before (the router's ``exclude``).

    >>> policy = RetryPolicy(max_attempts=3)
    >>> policy.should_retry(1, status=503, first_byte_sent=False)
    True
    >>> policy.should_retry(1, status=503, first_byte_sent=True)  # the stream already started
    False
    >>> policy.should_retry(1, status=400, first_byte_sent=False)  # the client's mistake
    False
    >>> policy.should_retry(3, error=httpx.ConnectError("refused"), first_byte_sent=False)
    False
    """

    max_attempts: int = 3
    retry_statuses: frozenset[int] = frozenset({429, 500, 502, 503, 504})
    retry_on_timeout: bool = False

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {self.max_attempts}")

    def retryable_status(self, status: int) -> bool:
        return status in self.retry_statuses

    def retryable_error(self, error: BaseException) -> bool:
        if isinstance(error, UpstreamStatusError):
            return self.retryable_status(error.status)
        if isinstance(error, _RETRYABLE_ERRORS):
            return True
        return self.retry_on_timeout and isinstance(error, httpx.TimeoutException)

    def should_retry(
        self,
        attempts: int,
        *,
        first_byte_sent: bool,
        status: int | None = None,
        error: BaseException | None = None,
    ) -> bool:
        """Whether to try again after `attempts` attempts, the last of which failed with
        `status` or `error`."""
        if first_byte_sent or attempts >= self.max_attempts:
            return False
        if status is not None and self.retryable_status(status):
            return True
        return error is not None and self.retryable_error(error)


async def send_with_retries(
    policy: RetryPolicy,
    pick: Callable[[Sequence[E]], E],
    send: Callable[[E], Awaitable[T]],
    *,
    on_retry: Callable[[E, BaseException], None] | None = None,
) -> T:
    """Send one request with `policy`'s retries.

    `pick(tried)` returns an endpoint not in `tried` (e.g. ``lambda tried:
    router.pick(info, exclude=tried)``) or raises LookupError (the router's ``NoEndpoint``);
    `send(endpoint)` performs the attempt and must return **before** writing anything to the
    client (for a stream: once the upstream's status and headers are in), raising
    `UpstreamStatusError` for a retryable status or letting the httpx error through. Whatever
    happens after `send` returned is never retried. When the attempts run out, or no endpoint
    is left, the last upstream error is raised.

    >>> async def send(url):
    ...     if url == "a":
    ...         raise httpx.ConnectError("refused")
    ...     return f"answer from {url}"
    >>> pick = lambda tried: next(u for u in "abc" if u not in tried)
    >>> asyncio.run(send_with_retries(RetryPolicy(), pick, send))
    'answer from b'
    """
    tried: list[E] = []
    last: BaseException | None = None
    for attempt in range(1, policy.max_attempts + 1):
        try:
            endpoint = pick(tuple(tried))
        except LookupError:
            if last is not None:
                raise last from None
            raise
        tried.append(endpoint)
        try:
            return await send(endpoint)
        except Exception as exc:
            if not policy.should_retry(attempt, error=exc, first_byte_sent=False):
                raise
            last = exc
            if on_retry is not None:
                on_retry(endpoint, exc)
    assert last is not None  # the loop ran at least once and every pass raised or returned
    raise last
