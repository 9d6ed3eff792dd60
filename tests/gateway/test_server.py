"""The gateway server end to end (issue 6; ai-gateway.md §2): simulated backends on 127.0.0.1
(`simulate.serve_backends`), the gateway served by uvicorn in a thread, real HTTP in between.

Timing parameters of the simulators are tiny, so the whole file runs in seconds; the one test
about streaming timing uses a slow decode to see chunks arrive before the backend finished."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from datahall.core.http import serve_in_thread
from datahall.gateway.config import GatewayConfig
from datahall.gateway.server import _sse_events, create_app
from datahall.gateway.simulate import SimConfig, serve_backends
from datahall.gateway.transform import SseDecoder, anthropic_sse

FAST = {"ttft_base_s": 0.001, "prefill_s_per_token": 0.0, "itl_s": 0.001, "response_tokens": 4}


def sims(count: int, **overrides) -> list[SimConfig]:
    return [SimConfig(name=f"sim-{i}", **{**FAST, **overrides}) for i in range(count)]


def make_config(backends, **extra) -> GatewayConfig:
    """Round robin (a deterministic first pick), no health checks, `gpt-4o` → sim-llm."""
    data = {
        "backends": [
            {"name": b.name, "url": b.url, "models": ["sim-llm"]} if hasattr(b, "sim") else b
            for b in backends
        ],
        "aliases": {"gpt-4o": {"pool": "default", "model": "sim-llm"}},
        "health_checks": {"enabled": False},
        "routing": {"policy": "round-robin"},
        "retries": {"attempts": 2, "backoff_s": 0},
    }
    for key, value in extra.items():
        if key in ("routing", "retries", "health_checks"):  # merged; the rest replaced
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return GatewayConfig.model_validate(data)


@contextlib.contextmanager
def gateway(config: GatewayConfig):
    app = create_app(config)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        client.app = app
        client.gateway = app.state.gateway
        yield client


def chat(text="Hello there", *, model="gpt-4o", **extra):
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def sse_data(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def _until(condition, timeout=3.0):
    """Poll `condition` (bounded) until it holds; returns its last value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


@pytest.fixture
def two():
    with serve_backends(sims(2)) as backends:
        yield backends


# --- passthrough --------------------------------------------------------------------------------


def test_whole_answer_alias_models_and_headers(two):
    with gateway(make_config(two)) as gw:
        r = gw.post("/v1/chat/completions", json=chat(temperature=0))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["model"] == "sim-llm"  # the alias was rewritten to the pool's model
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == 4
        assert r.headers["x-gateway-backend"] == "sim-0" == r.headers["x-sim-backend"]
        assert len(r.headers["x-request-id"]) == 32
        assert "endpoint-load-metrics" not in r.headers  # ORCA is for the gateway
        # the backend's own name works too, and round robin moves on
        r = gw.post(
            "/v1/chat/completions", json=chat(model="sim-llm"), headers={"x-request-id": "r1"}
        )
        assert r.status_code == 200 and r.headers["x-gateway-backend"] == "sim-1"
        assert r.headers["x-request-id"] == "r1"
        ids = [m["id"] for m in gw.get("/v1/models").json()["data"]]
        assert ids == ["gpt-4o", "sim-llm"]
        assert gw.get("/health").json() == {"status": "ok"}
        ready = gw.get("/ready")
        assert ready.status_code == 200 and ready.json()["pools"] == {"default": 2}


def test_completions_and_embeddings_pass_through(two):
    with gateway(make_config(two)) as gw:
        r = gw.post("/v1/completions", json={"model": "gpt-4o", "prompt": "Once upon a time"})
        assert r.status_code == 200 and r.json()["object"] == "text_completion"
        r = gw.post("/v1/embeddings", json={"model": "sim-llm", "input": ["a", "b"]})
        assert r.status_code == 200, r.text
        assert [len(d["embedding"]) for d in r.json()["data"]] == [384, 384]
        r = gw.post("/v1/completions", json={"model": "gpt-4o", "prompt": "Hi", "stream": True})
        events = sse_data(r.text)
        assert events[-1] == "[DONE]" and json.loads(events[0])["object"] == "text_completion"


def test_stream_is_relayed_chunk_by_chunk_as_the_backend_decodes():
    # 10 tokens at 40 ms each: a buffering gateway would deliver them all at once at the end
    with (
        serve_backends(sims(1, itl_s=0.04, response_tokens=None)) as backends,
        gateway(make_config(backends)) as gw,
    ):
        arrivals = []
        with gw.stream("POST", "/v1/chat/completions", json=chat(stream=True, max_tokens=10)) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-gateway-backend"] == "sim-0"
            for line in r.iter_lines():
                if line.startswith("data: "):
                    arrivals.append((time.monotonic(), line[6:]))
        data = [d for _, d in arrivals]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert all(c["choices"] for c in chunks)  # the usage chunk it asked for is hidden
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert len(text.split()) == 10
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        spread = arrivals[-1][0] - arrivals[0][0]
        assert spread > 0.2, f"chunks arrived within {spread:.3f} s: the stream was buffered"
        # a client that asks for usage gets it, as the backend sent it
        r = gw.post(
            "/v1/chat/completions",
            json=chat(stream=True, max_tokens=2, stream_options={"include_usage": True}),
        )
        last = json.loads(sse_data(r.text)[-2])
        assert last["choices"] == [] and last["usage"]["completion_tokens"] == 2


# --- bad input ----------------------------------------------------------------------------------


def test_bad_requests_get_openai_errors(two):
    config = make_config(two, limits={"max_body_bytes": 2000, "max_messages": 3})
    with gateway(config) as gw:
        r = gw.post("/v1/chat/completions", json=chat(model="gpt-5"))
        assert r.status_code == 404
        err = r.json()["error"]
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert "gpt-4o" in err["message"]
        assert set(err) == {"message", "type", "param", "code"}
        r = gw.post("/v1/chat/completions", content=b'{"model": "gpt-4o", "messages": [')
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = gw.post("/v1/chat/completions", content=b"[1, 2]")
        assert r.status_code == 400
        r = gw.post("/v1/chat/completions", json=chat("x" * 5000))
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = gw.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [{}] * 4})
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_messages"
        r = gw.post("/v1/chat/completions", json={"messages": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        assert sum(b.sim.requests for b in two) == 0  # none of it reached a backend


def test_api_keys_and_tenants(two):
    keys = [{"name": "app", "key": "sk-app-123456", "tenant": "acme"}]
    with gateway(make_config(two, api_keys=keys)) as gw:
        r = gw.post("/v1/chat/completions", json=chat())
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = gw.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer nope"})
        assert r.status_code == 401
        auth = {"authorization": "Bearer sk-app-123456"}
        assert gw.post("/v1/chat/completions", json=chat(), headers=auth).status_code == 200
        r = gw.post("/v1/chat/completions", json=chat(), headers={"x-api-key": "sk-app-123456"})
        assert r.status_code == 200
        # the model list is behind the key too; the operator's routes are not
        r = gw.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert gw.get("/v1/models", headers={"authorization": "Bearer nope"}).status_code == 401
        r = gw.get("/v1/models", headers=auth)
        assert r.status_code == 200 and [m["id"] for m in r.json()["data"]][0] == "gpt-4o"
        assert gw.get("/v1/models", headers={"x-api-key": "sk-app-123456"}).status_code == 200
        for path in ("/health", "/ready", "/metrics"):
            assert gw.get(path).status_code == 200


def test_token_rate_limit_429_headers_and_reconciliation(two):
    keys = [
        {"name": "app", "key": "sk-app-123456", "rate_limit": {"tokens_per_minute": 60}},
    ]
    auth = {"authorization": "Bearer sk-app-123456"}
    prompt = "y" * 80  # estimated at 20 tokens (characters / 4)
    with gateway(make_config(two, api_keys=keys)) as gw:
        first = gw.post("/v1/chat/completions", json=chat(prompt), headers=auth)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "60"
        assert first.headers["x-ratelimit-remaining-tokens"] == "40"
        used = first.json()["usage"]["total_tokens"]
        assert used != 20  # the real usage differs from the estimate...
        second = gw.post("/v1/chat/completions", json=chat(prompt), headers=auth)
        assert second.status_code == 200
        # ...and the bucket was charged the real usage (refill: 1 token a second)
        expected = 60 - used - 20
        assert expected <= int(second.headers["x-ratelimit-remaining-tokens"]) <= expected + 2
        third = gw.post("/v1/chat/completions", json=chat(prompt), headers=auth)
        assert third.status_code == 429
        assert third.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(third.headers["retry-after"]) >= 1
        assert "x-ratelimit-remaining-tokens" in third.headers
        metrics = gw.get("/metrics").text
        assert 'datahall_gateway_rate_limit_rejections_total{unit="tokens"} 1.0' in metrics


# --- the response cache -------------------------------------------------------------------------

EXACT_CACHE = {"enabled": True, "semantic": False}


def test_exact_cache_replays_json_and_sse(two):
    with gateway(make_config(two, semantic_cache=EXACT_CACHE)) as gw:
        body = chat("What is the capital of France?", temperature=0)
        first = gw.post("/v1/chat/completions", json=body)
        assert first.headers["x-cache"] == "miss"
        second = gw.post("/v1/chat/completions", json=body)
        assert second.headers["x-cache"] == "hit" and second.headers["x-cache-tier"] == "exact"
        assert second.headers["x-cache-similarity"] == "1.0000"
        assert second.headers["content-type"] == "application/json"
        a, b = first.json(), second.json()
        assert b["choices"][0]["message"] == a["choices"][0]["message"]
        assert sum(x.sim.requests for x in two) == 1
        # a streaming client: miss, stored from the relayed stream, then replayed as SSE
        streamed = {**body, "stream": True}
        r = gw.post("/v1/chat/completions", json=streamed)
        assert r.headers["x-cache"] == "miss"
        r = gw.post("/v1/chat/completions", json=streamed)
        assert r.headers["x-cache"] == "hit"
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_data(r.text)
        assert events[-1] == "[DONE]"
        text = "".join(
            json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]
        )
        assert text == a["choices"][0]["message"]["content"]
        assert sum(x.sim.requests for x in two) == 2
        # a sampled request bypasses the cache
        r = gw.post("/v1/chat/completions", json={**body, "temperature": 0.7})
        assert r.headers["x-cache"] == "miss" and r.headers["x-cache-skip"] == "temperature"
        metrics = gw.get("/metrics").text
        assert 'datahall_gateway_cache_lookups_total{result="exact_hit"} 2.0' in metrics


def test_cut_stream_ends_with_an_error_event_and_is_never_cached():
    configs = sims(2)
    configs[0].faults.disconnect_after_chunks = 2
    with (
        serve_backends(configs) as backends,
        gateway(make_config(backends, semantic_cache=EXACT_CACHE)) as gw,
    ):
        body = chat("Tell me a story", temperature=0, stream=True)
        r = gw.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.headers["x-gateway-backend"] == "sim-0"
        events = sse_data(r.text)
        assert len(events) == 3 and "[DONE]" not in events
        error = json.loads(events[-1])["error"]
        assert error["code"] == "upstream_stream_error" and "sim-0" in error["message"]
        # no retry once bytes went out: the other backend never saw the request
        assert [b.sim.requests for b in backends] == [1, 0]
        assert gw.gateway.cache.stats.stores == 0
        r = gw.post("/v1/chat/completions", json=body)  # goes to sim-1, still a miss
        assert r.headers["x-cache"] == "miss" and sse_data(r.text)[-1] == "[DONE]"
        snap = {s["url"]: s for s in gw.gateway.router.snapshot()}
        assert snap[backends[0].url]["in_flight"] == 0


def _embedder_or_skip():
    from datahall.gateway.embed import Embedder, EmbedderUnavailable

    try:
        return Embedder.load()
    except EmbedderUnavailable as e:
        pytest.skip(f"the semantic cache's embedder is not installed: {e}")


def test_semantic_cache_hits_a_paraphrase_and_replays_for_the_asker(two):
    _embedder_or_skip()
    cache = {"enabled": True, "min_cosine_similarity": 0.85}
    with gateway(make_config(two, semantic_cache=cache)) as gw:
        r = gw.post("/v1/chat/completions", json=chat("How do I reset my password?", temperature=0))
        assert r.headers["x-cache"] == "miss"
        r = gw.post("/v1/chat/completions", json=chat("password reset - how?", temperature=0))
        assert r.headers["x-cache"] == "hit" and r.headers["x-cache-tier"] == "semantic"
        assert 0.85 <= float(r.headers["x-cache-similarity"]) < 0.95
        # the opposite intent scores higher than the paraphrase, and the guard refuses it
        gw.post("/v1/chat/completions", json=chat("How to turn on dark mode?", temperature=0))
        r = gw.post("/v1/chat/completions", json=chat("How to turn off dark mode?", temperature=0))
        assert r.headers["x-cache"] == "miss"
        # stored from a stream, replayed as JSON to a client that does not stream
        streamed = chat("What is the boiling point of water?", temperature=0, stream=True)
        assert gw.post("/v1/chat/completions", json=streamed).headers["x-cache"] == "miss"
        r = gw.post("/v1/chat/completions", json={**streamed, "stream": False})
        assert r.headers["x-cache"] == "hit" and r.json()["object"] == "chat.completion"


def test_replicas_share_the_cache_and_the_limits_through_redis(two, redis_server):
    import redis

    keys = [{"name": "app", "key": "sk-app-123456", "rate_limit": {"tokens_per_minute": 60}}]
    config = make_config(two, semantic_cache=EXACT_CACHE, redis_url=redis_server.url, api_keys=keys)
    auth = {"authorization": "Bearer sk-app-123456"}
    body = chat("Name a prime number" + "!" * 61, temperature=0)  # estimated at 20 tokens
    store = redis.Redis.from_url(redis_server.url)
    with gateway(config) as first, gateway(config) as second:
        r = first.post("/v1/chat/completions", json=body, headers=auth)
        assert r.headers["x-cache"] == "miss" and r.headers["x-ratelimit-remaining-tokens"] == "40"
        # the answer is written to Redis off the event loop
        assert _until(lambda: store.keys("datahall:gateway:cache:*"))
        r = second.post("/v1/chat/completions", json=body, headers=auth)
        assert r.headers["x-cache"] == "hit" and r.headers["x-cache-tier"] == "exact"
        # the other replica took its tokens from the same bucket (a replica of its own: 40)
        assert int(r.headers["x-ratelimit-remaining-tokens"]) <= 21
        assert sum(b.sim.requests for b in two) == 1


# --- routing, ORCA, resilience ------------------------------------------------------------------


def test_orca_reports_reach_the_router_and_the_metrics(two):
    with gateway(make_config(two)) as gw:
        assert gw.post("/v1/chat/completions", json=chat()).status_code == 200
        snap = {s["url"]: s for s in gw.gateway.router.snapshot()}[two[0].url]
        assert snap["load_source"] == "orca" and snap["orca_age"] is not None
        assert snap["picks"] == 1 and snap["in_flight"] == 0
        metrics = gw.get("/metrics").text
        assert (
            'datahall_gateway_endpoint_orca{endpoint="sim-0",metric="named_metrics.kv_cache_usage_perc"}'
            in metrics
        )
        assert (
            'datahall_gateway_endpoint_picks_total{endpoint="sim-0",pool="default"} 1.0' in metrics
        )
        for name in (
            'gen_ai_client_token_usage_count{gen_ai_operation_name="chat",gen_ai_request_model="gpt-4o",gen_ai_token_type="input"} 1.0',
            'gen_ai_client_token_usage_count{gen_ai_operation_name="chat",gen_ai_request_model="gpt-4o",gen_ai_token_type="output"} 1.0',
            "gen_ai_server_request_duration_seconds_count",
            "gen_ai_server_time_to_first_token_seconds",
            "gen_ai_server_time_per_output_token_seconds",
        ):
            assert name in metrics


def _bad_orca_backend() -> Starlette:
    async def chat_route(request: Request) -> Response:
        body = await request.json()
        completion = {
            "id": "c1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
        }
        return JSONResponse(completion, headers={"endpoint-load-metrics": "XML <load/>"})

    return Starlette(routes=[Route("/v1/chat/completions", chat_route, methods=["POST"])])


def test_a_bad_orca_header_never_breaks_routing():
    with serve_in_thread(_bad_orca_backend()) as url:
        config = make_config([{"name": "bad", "url": url, "models": ["m"], "metrics_path": None}])
        with gateway(config) as gw:
            for _ in range(2):
                r = gw.post("/v1/chat/completions", json=chat(model="m"))
                assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
            snap = gw.gateway.router.snapshot()[0]
            assert snap["orca_errors"] == 2 and snap["load_source"] == "local"


def test_a_503_is_retried_on_another_backend_before_the_first_byte():
    configs = sims(2)
    configs[0].faults.status = 503
    with serve_backends(configs) as backends:
        # sim-0 is preferred (priority 0) as long as its breaker stays closed
        preferred = [
            {"name": b.name, "url": b.url, "models": ["sim-llm"], "priority": i}
            for i, b in enumerate(backends)
        ]
        with gateway(make_config(preferred)) as gw:
            for stream in (False, True):
                r = gw.post("/v1/chat/completions", json=chat(stream=stream))
                assert r.status_code == 200 and r.headers["x-gateway-backend"] == "sim-1"
                assert sse_data(r.text)[-1] == "[DONE]" if stream else r.json()["choices"]
            assert backends[0].sim.requests == 2 and backends[1].sim.requests == 2
            metrics = gw.get("/metrics").text
            assert 'datahall_gateway_upstream_retries_total{endpoint="sim-0"} 2.0' in metrics
            assert (
                'datahall_gateway_upstream_errors_total{endpoint="sim-0",kind="503"} 2.0' in metrics
            )


def test_a_429_with_retry_after_opens_the_breaker():
    configs = sims(2)
    configs[0].faults.status, configs[0].faults.retry_after_s = 429, 30
    with serve_backends(configs) as backends, gateway(make_config(backends)) as gw:
        for _ in range(4):
            r = gw.post("/v1/chat/completions", json=chat())
            assert r.status_code == 200 and r.headers["x-gateway-backend"] == "sim-1"
        assert backends[0].sim.requests == 1  # its breaker stayed open after the 429
        snap = {s["url"]: s for s in gw.gateway.router.snapshot()}
        assert snap[backends[0].url]["breaker"] == "open"


def test_all_backends_down_is_a_503_with_retry_after():
    configs = sims(2)
    for c in configs:
        c.faults.status, c.faults.retry_after_s = 503, 20
    with serve_backends(configs) as backends, gateway(make_config(backends)) as gw:
        r = gw.post("/v1/chat/completions", json=chat())  # both tried; the last 503 relayed
        assert r.status_code == 503 and r.headers["retry-after"] == "20"
        r = gw.post("/v1/chat/completions", json=chat())  # both breakers now open
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "no_backend_available"
        assert 19 <= int(r.headers["retry-after"]) <= 20
        assert gw.get("/ready").status_code == 503
        assert [b.sim.requests for b in backends] == [1, 1]
    # backends that are not even listening
    with serve_backends(sims(1)) as gone:
        url = gone[0].url
    with gateway(make_config([{"name": "gone", "url": url, "models": ["sim-llm"]}])) as gw:
        r = gw.post("/v1/chat/completions", json=chat())
        assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unreachable"


def test_a_stream_without_a_first_token_in_time_moves_to_another_backend():
    configs = [
        SimConfig(name="slow", **{**FAST, "ttft_base_s": 1.0}),
        SimConfig(name="fast", **FAST),
    ]
    with serve_backends(configs) as backends:
        config = make_config(backends, timeouts={"ttft_s": 0.2, "total_s": 5})
        with gateway(config) as gw:
            start = time.monotonic()
            r = gw.post("/v1/chat/completions", json=chat(stream=True))
            assert r.status_code == 200 and r.headers["x-gateway-backend"] == "fast"
            assert time.monotonic() - start < 0.9
            assert sse_data(r.text)[-1] == "[DONE]"


def test_health_checks_and_scrapes_run_in_the_background():
    configs = sims(2)
    configs[1].faults.down = True
    with serve_backends(configs) as backends:
        config = make_config(
            backends,
            health_checks={"enabled": True, "interval_s": 0.05, "unhealthy_threshold": 2},
            routing={"orca": {"scrape_interval_s": 0.05}},
        )
        with gateway(config) as gw:
            router = gw.gateway.router
            assert _until(lambda: not router.endpoints[1].healthy)
            # no request yet, so no ORCA report: the load comes from the /metrics scrape
            assert _until(lambda: router.snapshot()[0]["load_source"] == "metrics")
            for _ in range(3):
                r = gw.post("/v1/chat/completions", json=chat())
                assert r.status_code == 200 and r.headers["x-gateway-backend"] == "sim-0"
            assert gw.get("/ready").json()["pools"] == {"default": 1}
            backends[1].sim.faults.down = False
            assert _until(lambda: router.endpoints[1].healthy)


def test_a_client_that_leaves_mid_stream_frees_the_backend():
    with (
        serve_backends(sims(1, itl_s=0.05, response_tokens=None)) as backends,
        gateway(make_config(backends)) as gw,
    ):
        with gw.stream("POST", "/v1/chat/completions", json=chat(stream=True, max_tokens=200)) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    break  # one chunk, then hang up
        sim, endpoint = backends[0].sim, gw.gateway.router.endpoints[0]
        assert _until(lambda: sim.stats().running == 0 and endpoint.in_flight == 0)
        assert sim.stats().generation_tokens < 100  # it stopped long before 200 tokens


# --- official clients ---------------------------------------------------------------------------


def test_the_openai_client_works(two):
    openai = pytest.importorskip("openai")
    with gateway(make_config(two)) as gw:
        client = openai.OpenAI(base_url=str(gw.base_url) + "/v1", api_key="unused", max_retries=0)
        done = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hi"}]
        )
        assert done.choices[0].message.content and done.usage.completion_tokens == 4
        stream = client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == done.choices[0].message.content
        emb = client.embeddings.create(model="sim-llm", input="hello")
        assert len(emb.data[0].embedding) == 384
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "Hi"}]
            )


def test_the_anthropic_client_reaches_openai_backends(two):
    anthropic = pytest.importorskip("anthropic")
    with gateway(make_config(two)) as gw:
        client = anthropic.Anthropic(base_url=str(gw.base_url), api_key="unused", max_retries=0)
        message = client.messages.create(
            model="gpt-4o", max_tokens=16, messages=[{"role": "user", "content": "Hi"}]
        )
        assert message.content[0].text and message.stop_reason == "end_turn"
        assert message.usage.output_tokens == 4
        with client.messages.stream(
            model="gpt-4o", max_tokens=16, messages=[{"role": "user", "content": "Hi"}]
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        assert text == message.content[0].text and final.stop_reason == "end_turn"
        with pytest.raises(anthropic.NotFoundError):
            client.messages.create(
                model="nope", max_tokens=16, messages=[{"role": "user", "content": "Hi"}]
            )


def _anthropic_backend(seen: list) -> Starlette:
    """A stand-in for an Anthropic Messages API server."""

    async def messages(request: Request) -> Response:
        body = await request.json()
        seen.append((dict(request.headers), body))
        usage = {"input_tokens": 5, "output_tokens": 3}
        if not body.get("stream"):
            return JSONResponse(
                {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": [{"type": "text", "text": "Bonjour from Claude"}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": usage,
                }
            )
        start = {"id": "msg_2", "type": "message", "role": "assistant", "model": body["model"]}
        events = [
            {
                "type": "message_start",
                "message": {**start, "content": [], "usage": {"input_tokens": 5}},
            },
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Bonjour"},
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": " à vous"},
            },
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 3},
            },
            {"type": "message_stop"},
        ]

        async def stream():
            for e in events:
                yield anthropic_sse(e)
                await asyncio.sleep(0)

        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/messages", messages, methods=["POST"])])


def test_openai_requests_reach_an_anthropic_backend():
    seen: list = []
    with serve_in_thread(_anthropic_backend(seen)) as url:
        backend = {
            "name": "claude",
            "url": url,
            "api": "anthropic",
            "api_key": "sk-ant-test",
            "metrics_path": None,
            "pool": "anthropic",
        }
        config = make_config(
            [backend], aliases={"claude-sonnet": {"pool": "anthropic", "model": "claude-x"}}
        )
        with gateway(config) as gw:
            r = gw.post("/v1/chat/completions", json=chat(model="claude-sonnet", max_tokens=20))
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["message"]["content"] == "Bonjour from Claude"
            assert body["choices"][0]["finish_reason"] == "stop"
            assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 3
            headers, sent = seen[-1]
            assert headers["x-api-key"] == "sk-ant-test" and "anthropic-version" in headers
            assert sent["model"] == "claude-x" and sent["max_tokens"] == 20
            r = gw.post("/v1/chat/completions", json=chat(model="claude-sonnet", stream=True))
            events = sse_data(r.text)
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            text = "".join(
                c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
            )
            assert text == "Bonjour à vous"
            r = gw.post("/v1/embeddings", json={"model": "claude-sonnet", "input": "x"})
            assert r.status_code == 400 and "Anthropic" in r.json()["error"]["message"]


# --- criticality --------------------------------------------------------------------------------


def _saturated_backend(seen: list) -> Starlette:
    """A backend whose every answer reports a queue of 10 (saturated: GIE's detector says
    more than 5 waiting), and that counts the requests reaching it."""

    async def chat_route(request: Request) -> Response:
        body = await request.json()
        seen.append(body)
        completion = {
            "id": f"c{len(seen)}",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
        }
        report = "TEXT named_metrics.num_requests_waiting=10, named_metrics.kv_cache_usage_perc=0.5"
        return JSONResponse(completion, headers={"endpoint-load-metrics": report})

    return Starlette(routes=[Route("/v1/chat/completions", chat_route, methods=["POST"])])


def test_sheddable_requests_are_shed_when_every_backend_is_saturated():
    seen: list = []
    with serve_in_thread(_saturated_backend(seen)) as url:
        config = make_config([{"name": "busy", "url": url, "models": ["m"], "metrics_path": None}])
        with gateway(config) as gw:

            def ask(criticality: str | None) -> httpx.Response:
                headers = {} if criticality is None else {"x-request-criticality": criticality}
                return gw.post("/v1/chat/completions", json=chat(model="m"), headers=headers)

            # no report yet: nothing is known to be saturated, so even sheddable work goes
            assert ask("sheddable").status_code == 200
            assert gw.gateway.router.snapshot()[0]["waiting"] == 10  # now it is saturated
            r = ask("sheddable")
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert err["code"] == "request_shed" and "sheddable" in err["message"]
            assert ask("Sheddable").status_code == 503  # GIE's spelling in its CRDs
            assert len(seen) == 1  # shed before reaching the backend
            # standard (the default) and critical requests still go to the saturated backend
            assert ask(None).status_code == 200
            assert ask("standard").status_code == 200
            assert ask("critical").status_code == 200
            assert len(seen) == 4
            r = ask("urgent")
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_criticality"
            assert "critical, standard, sheddable" in r.json()["error"]["message"]
            metrics = gw.get("/metrics").text
            assert 'datahall_gateway_requests_total{route="chat",status="503"} 2.0' in metrics


# --- SSE framing --------------------------------------------------------------------------------


def _chunk(**choice) -> dict:
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "finish_reason": None, **choice}],
    }


_CRLF_EVENTS = [
    _chunk(delta={"role": "assistant", "content": ""}),
    _chunk(delta={"content": "Hel"}),
    _chunk(delta={"content": "lo"}),
    _chunk(delta={}, finish_reason="stop"),
    {**_chunk(), "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
]


def _crlf_stream() -> tuple[bytes, list[bytes]]:
    """An OpenAI stream whose events end in CRLF CRLF, LF LF and once CR CR (all three line
    ends the SSE spec allows, mixed), and its cut into chunks that each end inside a line
    end: every CRLF is split between two chunks."""
    ends = [b"\r\n\r\n", b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\n", b"\r\n\r\n"]
    payloads = [json.dumps(e).encode() for e in _CRLF_EVENTS] + [b"[DONE]"]
    events = [b"data: " + p + end for p, end in zip(payloads, ends, strict=True)]
    data = b"".join(events)
    chunks, start = [], 0
    for i, byte in enumerate(data):
        if byte == ord("\r") and data[i + 1 : i + 2] == b"\n":
            chunks.append(data[start : i + 1])
            start = i + 1
    chunks.append(data[start:])
    return data, chunks


class _Chunks:
    """A stand-in for an httpx response that yields given chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def aiter_bytes(self):
        for c in self.chunks:
            yield c


def test_sse_events_split_mixed_line_ends_split_across_chunks():
    data, chunks = _crlf_stream()

    async def events(parts: list[bytes]) -> list[bytes]:
        return [e async for e in _sse_events(_Chunks(parts))]

    expected = asyncio.run(events([data]))
    assert len(expected) == 6 and b"".join(expected) == data  # relayed byte for byte
    assert [e.split(b":", 1)[0] for e in expected] == [b"data"] * 6
    assert expected[-1] == b"data: [DONE]\r\n\r\n"
    assert asyncio.run(events(chunks)) == expected
    assert asyncio.run(events([bytes([b]) for b in data])) == expected  # one byte at a time
    rng = random.Random(6)
    for _ in range(50):  # anywhere else
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 12)))
        parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        assert asyncio.run(events(parts)) == expected, cuts
    # blank lines before an event, and a last event the server closed without its blank line
    assert asyncio.run(events([b"\r\n\ndata: a\r", b"\n\r", b"\ndata: b"])) == [
        b"data: a\r\n\r\n",
        b"data: b",
    ]


def _crlf_backend(seen: list) -> Starlette:
    async def chat_route(request: Request) -> Response:
        seen.append(await request.json())
        _, chunks = _crlf_stream()

        async def body():
            for c in chunks:
                yield c
                await asyncio.sleep(0.005)  # so the chunks leave one by one

        return StreamingResponse(body(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat_route, methods=["POST"])])


def test_a_backend_with_crlf_line_ends_split_across_chunks_streams_and_caches():
    seen: list = []
    with serve_in_thread(_crlf_backend(seen)) as url:
        backend = {"name": "crlf", "url": url, "models": ["m"], "metrics_path": None}
        with gateway(make_config([backend], semantic_cache=EXACT_CACHE)) as gw:
            body = chat(model="m", stream=True, temperature=0)
            r = gw.post("/v1/chat/completions", json=body)
            assert r.status_code == 200 and r.headers["x-cache"] == "miss"
            decoder = SseDecoder()
            data = [d for _, d in decoder.feed(r.content)]
            assert data[-1] == "[DONE]"
            chunks = [json.loads(d) for d in data[:-1]]
            # every event came through on its own; the usage chunk, which the gateway asked
            # for and the client did not, was read and hidden
            assert chunks == _CRLF_EVENTS[:4]
            # the accounting and the store run after the client's last byte: wait for them
            usage = (
                'gen_ai_client_token_usage_sum{gen_ai_operation_name="chat",'
                'gen_ai_request_model="m",gen_ai_token_type="output"} 2.0'
            )
            assert _until(lambda: usage in gw.get("/metrics").text)
            # [DONE] was seen, so the stream was complete and stored
            assert _until(lambda: len(gw.gateway.cache) == 1)
            r = gw.post("/v1/chat/completions", json=body)
            assert r.headers["x-cache"] == "hit" and len(seen) == 1
            text = "".join(
                json.loads(d)["choices"][0]["delta"].get("content") or ""
                for d in sse_data(r.text)[:-1]
            )
            assert text == "Hello"
