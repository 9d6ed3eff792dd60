"""Circuit breakers, health checks, the vLLM scrape and retries (brief ai-gateway.md §2.1,
§2.3, §2.5; invariant §2.6.6)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from datahall.core.http import serve_in_thread
from datahall.gateway.resilience import (
    CircuitBreaker,
    HealthChecker,
    MetricsScraper,
    RetryPolicy,
    UpstreamStatusError,
    VllmMetrics,
    parse_retry_after,
    parse_vllm_metrics,
    send_with_retries,
)
from datahall.gateway.routing import Endpoint, NoEndpoint, RequestInfo, Router

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 2.0
vllm:num_requests_running{engine="1",model_name="llama"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 4.0
vllm:num_requests_waiting{engine="1",model_name="llama"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.3
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.7
# HELP vllm:gpu_cache_usage_perc Deprecated name.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="llama"} 0.99
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql,chat",waiting_lora_adapters="math"} 1.8e9
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{model_name="llama"} 1234.0
"""


# --- circuit breaker ---------------------------------------------------------------------------


def test_breaker_opens_after_consecutive_failures_for_the_cooldown(clock):
    b = CircuitBreaker(failure_threshold=3, cooldown=30.0, clock=clock)
    b.record_failure()
    b.record_failure()
    b.record_success()  # a success in between restarts the count
    b.record_failure()
    b.record_failure()
    assert b.state() == "closed"
    b.record_failure()
    assert (b.state(), b.allows(), b.retry_in()) == ("open", False, 30.0)
    clock.now = 29.9
    assert not b.allows()
    clock.now = 30.0
    assert b.state() == "half_open" and b.allows()


def test_half_open_admits_one_probe_and_its_outcome_decides(clock):
    b = CircuitBreaker(failure_threshold=1, cooldown=5.0, clock=clock)
    b.record_failure()
    clock.now = 5.0
    b.on_start()
    assert not b.allows()  # the probe is in flight: nobody else
    b.record_failure()  # the probe failed: another cooldown
    assert b.state() == "open" and b.retry_in() == 5.0
    clock.now = 10.0
    b.on_start()
    b.record_success()
    assert b.state() == "closed" and b.allows() and b.consecutive_failures == 0


@pytest.mark.parametrize("seconds", [0.5, 7.0, 120.0])
def test_retry_after_opens_the_breaker_for_exactly_that_duration(seconds, clock):
    clock.now = 1000.0
    b = CircuitBreaker(failure_threshold=5, cooldown=30.0, clock=clock)
    b.record_failure(retry_after=seconds)  # one 429 suffices, whatever the threshold
    assert b.state() == "open"
    clock.now = 1000.0 + seconds - 1e-6
    assert not b.allows()
    clock.now = 1000.0 + seconds
    assert b.allows()


def test_a_late_failure_does_not_extend_an_open_breaker_but_a_newer_retry_after_wins(clock):
    b = CircuitBreaker(failure_threshold=1, cooldown=10.0, clock=clock)
    b.record_failure()
    clock.now = 5.0
    b.record_failure()  # a request sent before it opened
    assert b.open_until == 10.0
    b.record_failure(retry_after=1.0)
    assert b.open_until == 6.0


def test_a_late_success_does_not_close_an_open_breaker(clock):
    b = CircuitBreaker(clock=clock)
    b.record_failure(retry_after=30.0)  # a 429 with Retry-After: 30
    clock.now = 1.0
    b.record_success()  # a request sent before the 429 answers fine
    assert (b.state(), b.open_until) == ("open", 30.0)
    clock.now = 30.0
    b.on_start()
    b.record_success()  # the half-open probe
    assert b.state() == "closed"


def test_breaker_rejects_bad_settings():
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError, match="cooldown"):
        CircuitBreaker(cooldown=-1)


def test_parse_retry_after():
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(" 0.25 ") == 0.25
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("Sun, 22 Nov 2026 04:01:00 GMT", now=1795320000.0) == 60.0
    assert parse_retry_after("Sun, 22 Nov 2026 03:00:00 GMT", now=1795320000.0) == 0.0
    for bad in ("soon", "", "nan", "inf", None):
        assert parse_retry_after(bad) is None


# --- the vLLM scrape ---------------------------------------------------------------------------


def test_parse_vllm_metrics_reads_the_load_gauges():
    m = parse_vllm_metrics(VLLM_METRICS)
    assert m.num_requests_running == 3.0  # summed over engines
    assert m.num_requests_waiting == 4.0
    assert m.kv_cache_usage_perc == 0.7  # the fullest engine; the current name wins
    assert m.max_lora == 4
    assert m.running_lora_adapters == ("sql", "chat")  # the latest info sample
    assert m.waiting_lora_adapters == ("math",)


def test_parse_vllm_metrics_older_name_and_missing_gauges():
    m = parse_vllm_metrics('vllm:gpu_cache_usage_perc{model_name="x"} 0.42\n')
    assert m == VllmMetrics(kv_cache_usage_perc=0.42)
    assert parse_vllm_metrics("# nothing here\n") == VllmMetrics()
    assert parse_vllm_metrics("other_metric 1\n").num_requests_waiting is None
    with pytest.raises(ValueError):
        parse_vllm_metrics("vllm:num_requests_waiting{broken 3\n")
    # only the load gauges' lines are parsed: a bad line of another metric is not read
    assert parse_vllm_metrics("vllm:e2e{broken 3\n  vllm:num_requests_waiting 2\n") == (
        VllmMetrics(num_requests_waiting=2.0)
    )


# --- a tiny backend over real HTTP -------------------------------------------------------------


@pytest.fixture(scope="module")
def backend():
    """A Starlette app on 127.0.0.1 whose /health and /metrics answers a test can change."""
    state = {"health": 200, "metrics": VLLM_METRICS, "metrics_status": 200, "hits": 0}

    async def health(request: Request) -> Response:
        state["hits"] += 1
        return Response(status_code=state["health"])

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(state["metrics"], status_code=state["metrics_status"])

    app = Starlette(routes=[Route("/health", health), Route("/metrics", metrics)])
    with serve_in_thread(app) as url:
        yield url, state
    state.update(health=200, metrics=VLLM_METRICS, metrics_status=200)


def _closed_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_health_checks_mark_endpoints_down_and_up(backend):
    url, state = backend
    live, dead = Endpoint(url), Endpoint(_closed_port_url())
    router = Router([live, dead], "round-robin")
    changes: list[tuple[str, bool]] = []

    def on_change(endpoint, healthy):
        changes.append((endpoint.url, healthy))
        router.on_health_change(endpoint, healthy)

    async def main() -> None:
        checker = HealthChecker(
            router.endpoints, unhealthy_threshold=2, timeout=2.0, on_change=on_change
        )
        try:
            assert await checker.poll_all() == {url: True, dead.url: False}
            assert dead.healthy  # one failed check is not enough
            await checker.poll_all()
            assert not dead.healthy and "ConnectError" in checker.last_error[dead.url]
            assert {router.pick(RequestInfo()).url for _ in range(4)} == {url}
            state["health"] = 503
            await checker.poll_all()
            await checker.poll_all()
            assert not live.healthy
            with pytest.raises(NoEndpoint, match="are down"):
                router.pick(RequestInfo())
            state["health"] = 200
            await checker.poll_all()  # healthy_threshold 1: back at once
            assert live.healthy
        finally:
            state["health"] = 200
            await checker.aclose()

    asyncio.run(asyncio.wait_for(main(), 20))
    assert changes == [(dead.url, False), (url, False), (url, True)]


def test_the_health_task_polls_on_its_interval(backend):
    url, state = backend
    endpoint = Endpoint(url)

    async def main() -> int:
        checker = HealthChecker(lambda: [endpoint], interval=0.05)
        before = state["hits"]
        checker.start()
        for _ in range(200):  # at most 2 s
            await asyncio.sleep(0.01)
            if checker.rounds >= 3:
                break
        await checker.aclose()
        return state["hits"] - before

    assert asyncio.run(asyncio.wait_for(main(), 10)) >= 3


def test_the_scraper_feeds_the_router(backend, clock):
    url, state = backend
    clock.now = 10.0
    endpoint, idle = Endpoint(url), Endpoint("http://idle.invalid")
    router = Router([endpoint, idle], "kv-aware", clock=clock, metrics_ttl=1.0)

    async def main() -> None:
        scraper = MetricsScraper([endpoint], clock=clock)
        try:
            metrics = await scraper.poll(endpoint)
            assert metrics is not None and metrics.num_requests_waiting == 4.0
            load = router.load(endpoint)
            assert (load.source, load.waiting, load.running, load.kv_cache) == (
                "metrics",
                4.0,
                3.0,
                0.7,
            )
            assert router.pick(RequestInfo()) is idle  # a queue of 4 against none
            state["metrics_status"] = 500
            clock.now = 10.5
            assert await scraper.poll(endpoint) is None
            assert scraper.errors[url] == 1
            assert endpoint.metrics_at == 10.0  # the last good scrape stays until it expires
            clock.now = 11.5
            assert router.load(endpoint).source == "local"
        finally:
            state["metrics_status"] = 200
            await scraper.aclose()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_scraper_with_a_mock_transport_reads_the_lora_state():
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/metrics"
        return httpx.Response(200, text=VLLM_METRICS)

    endpoint = Endpoint("http://backend")

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            scraper = MetricsScraper([endpoint], client=client, clock=lambda: 0.0)
            assert (await scraper.poll_all())[endpoint.url] is not None
            await scraper.aclose()  # does not close a client it was given
            assert not client.is_closed

    asyncio.run(main())
    assert endpoint.lora_state(0.5, 1.0).running_lora_adapters == ("sql", "chat")


# --- retries -----------------------------------------------------------------------------------


def test_retry_policy_matrix():
    policy = RetryPolicy(max_attempts=3)
    for status in (429, 500, 502, 503, 504):
        assert policy.should_retry(1, status=status, first_byte_sent=False)
        assert not policy.should_retry(1, status=status, first_byte_sent=True)
    for status in (400, 401, 404, 413, 422):
        assert not policy.should_retry(1, status=status, first_byte_sent=False)
    for error in (httpx.ConnectError("x"), httpx.RemoteProtocolError("x"), httpx.ReadError("x")):
        assert policy.should_retry(2, error=error, first_byte_sent=False)
        assert not policy.should_retry(3, error=error, first_byte_sent=False)
        assert not policy.should_retry(1, error=error, first_byte_sent=True)
    assert not policy.should_retry(1, error=httpx.ReadTimeout("x"), first_byte_sent=False)
    assert RetryPolicy(retry_on_timeout=True).should_retry(
        1, error=httpx.ReadTimeout("x"), first_byte_sent=False
    )
    assert not policy.should_retry(1, error=ValueError("bug"), first_byte_sent=False)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def _router_and_send(failures: dict[str, Exception], clock):
    eps = [Endpoint(f"http://e{i}") for i in range(4)]
    router = Router(eps, "round-robin", clock=clock)
    sent: list[str] = []

    async def send(endpoint: Endpoint) -> str:
        router.on_start(endpoint)
        sent.append(endpoint.url)
        error = failures.get(endpoint.url)
        if isinstance(error, UpstreamStatusError):
            router.on_finish(endpoint, ok=False, status=error.status, retry_after=error.retry_after)
            raise error
        if error is not None:
            router.on_finish(endpoint, ok=False)
            raise error
        router.on_finish(endpoint)
        return endpoint.url

    return router, eps, sent, send


def test_send_with_retries_moves_to_other_endpoints(clock):
    failures = {
        "http://e0": httpx.ConnectError("refused"),
        "http://e1": UpstreamStatusError(429, retry_after=5.0),
    }
    router, eps, sent, send = _router_and_send(failures, clock)
    info = RequestInfo()
    result = asyncio.run(
        send_with_retries(RetryPolicy(), lambda tried: router.pick(info, exclude=tried), send)
    )
    assert result == "http://e2"
    assert sent == ["http://e0", "http://e1", "http://e2"]
    assert eps[1].breaker.state(router.clock()) == "open"  # honours the 429's Retry-After
    assert eps[1].breaker.retry_in(router.clock()) == 5.0


def test_send_with_retries_is_bounded_and_raises_the_last_upstream_error(clock):
    failures = {f"http://e{i}": UpstreamStatusError(503) for i in range(4)}
    router, eps, sent, send = _router_and_send(failures, clock)
    with pytest.raises(UpstreamStatusError):
        asyncio.run(
            send_with_retries(
                RetryPolicy(max_attempts=2),
                lambda tried: router.pick(RequestInfo(), exclude=tried),
                send,
            )
        )
    assert len(sent) == 2 and len(set(sent)) == 2


def test_send_with_retries_does_not_retry_client_errors_and_stops_when_no_endpoint_is_left(clock):
    router, eps, sent, send = _router_and_send({"http://e0": UpstreamStatusError(400)}, clock)
    with pytest.raises(UpstreamStatusError):
        asyncio.run(
            send_with_retries(RetryPolicy(), lambda t: router.pick(RequestInfo(), exclude=t), send)
        )
    assert sent == ["http://e0"]

    failures = {f"http://e{i}": httpx.ConnectError("refused") for i in range(4)}
    router, eps, sent, send = _router_and_send(failures, clock)
    with pytest.raises(httpx.ConnectError):  # the upstream error, not NoEndpoint
        asyncio.run(
            send_with_retries(
                RetryPolicy(max_attempts=10),
                lambda t: router.pick(RequestInfo(), exclude=t),
                send,
            )
        )
    assert sorted(sent) == [e.url for e in eps]


def test_no_retry_after_the_first_streamed_byte():
    """A stream that breaks after send_with_retries returned is the caller's: it is never
    re-sent, because the client already has part of an answer."""
    sent: list[str] = []

    async def chunks():
        yield b"data: {...}\n\n"
        raise httpx.RemoteProtocolError("peer closed the connection mid-stream")

    async def send(url: str):
        sent.append(url)
        return chunks()  # status and headers are in; the body is not

    async def main() -> list[bytes]:
        stream = await send_with_retries(RetryPolicy(), lambda t: "abc"[len(t)], send)
        got = []
        with pytest.raises(httpx.RemoteProtocolError):
            async for chunk in stream:
                got.append(chunk)
        return got

    assert asyncio.run(main()) == [b"data: {...}\n\n"]
    assert sent == ["a"]
    assert not RetryPolicy().should_retry(
        1, error=httpx.RemoteProtocolError("x"), first_byte_sent=True
    )
