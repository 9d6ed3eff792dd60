"""The simulated OpenAI-compatible backend (brief §5): timing model, queue, prefix cache, LoRA
slots, vLLM metrics, ORCA headers, SSE format and injected faults. Servers listen on 127.0.0.1
with tiny timings; every loop is bounded."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from datahall.gateway.simulate import (
    BACKEND_HEADER,
    Faults,
    ServiceTimes,
    SimConfig,
    cached_tokens,
    count_tokens,
    fake_embedding,
    itl_seconds,
    prefill_seconds,
    run_backends,
    serve_backends,
    service_times,
)

FAST = {"ttft_base_s": 0.001, "prefill_s_per_token": 0.0, "itl_s": 0.001}


@pytest.fixture(scope="module")
def backend():
    """One fast simulator shared by the tests that leave no state behind."""
    cfg = SimConfig(**FAST, models=["sim-llm", "llama-3"], response_tokens=6, kv_blocks=64)
    with serve_backends([cfg]) as (b,):
        yield b


@pytest.fixture
def client(backend):
    backend.sim.faults = Faults()
    with httpx.Client(base_url=backend.url, timeout=10) as c:
        yield c
    backend.sim.faults = Faults()


def chat(content: str, **extra) -> dict:
    return {"model": "sim-llm", "messages": [{"role": "user", "content": content}], **extra}


def metrics(c: httpx.Client) -> dict[str, list]:
    """Prometheus samples by metric family name."""
    r = c.get("/metrics")
    assert r.status_code == 200
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def value(samples: list, name: str, **labels) -> float:
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {name} {labels}")


def wait_until(check, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: ") :] for e in events]


# ---- the timing model ----------------------------------------------------------------------


def test_service_times_exact_values():
    # binary fractions, so the values are exact
    cfg = SimConfig(ttft_base_s=0.25, prefill_s_per_token=0.125, itl_s=0.5, speed=2.0)
    assert prefill_seconds(cfg, 0) == 0.125
    assert prefill_seconds(cfg, 8) == 0.625
    assert itl_seconds(cfg, 1) == 0.25
    assert service_times(cfg, prompt_tokens=10, cached_tokens=0, completion_tokens=1) == (
        ServiceTimes(ttft_s=0.75, itl_s=0.25, e2e_s=0.75)
    )
    assert service_times(cfg, prompt_tokens=10, cached_tokens=8, completion_tokens=5) == (
        ServiceTimes(ttft_s=0.25, itl_s=0.25, e2e_s=1.25)
    )
    growing = SimConfig(itl_s=0.5, itl_growth=0.5)
    assert [itl_seconds(growing, n) for n in (0, 1, 2, 5)] == [0.5, 0.5, 0.75, 1.5]
    slow = SimConfig(ttft_base_s=0.5, prefill_s_per_token=0.0, itl_s=0.25, speed=0.5)
    assert service_times(slow, prompt_tokens=3, completion_tokens=3).e2e_s == 2.0


def test_tokens_and_cached_tokens():
    assert [count_tokens("x" * n) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    assert count_tokens("x" * 9, chars_per_token=3) == 3
    assert cached_tokens(100, 2, 16) == 32
    assert cached_tokens(32, 2, 16) == 31  # the last prompt token is always computed
    assert cached_tokens(1, 5, 16) == 0


def test_config_is_validated():
    with pytest.raises(ValidationError, match="multiple of chars_per_token"):
        SimConfig(block_chars=62)
    with pytest.raises(ValidationError, match="both as a model and an adapter"):
        SimConfig(models=["m"], lora_adapters=["m"])
    with pytest.raises(ValidationError):
        SimConfig(speed=0)
    with pytest.raises(ValidationError):
        SimConfig(typo=1)
    faults = Faults()
    with pytest.raises(ValidationError):
        faults.error_rate = 2.0
    assert SimConfig().block_tokens == 16


# ---- answers -------------------------------------------------------------------------------


def test_whole_chat_completion(client, backend):
    prompt = "How do I reset my password?"
    r = client.post("/v1/chat/completions", json=chat(prompt, max_tokens=4))
    assert r.status_code == 200, r.text
    assert r.headers[BACKEND_HEADER] == backend.name == "sim-0"
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "sim-llm"
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 4
    assert choice["finish_reason"] == "length"
    text = f"user: {prompt}\n"
    assert out["usage"] == {
        "prompt_tokens": count_tokens(text),
        "completion_tokens": 4,
        "total_tokens": count_tokens(text) + 4,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    again = client.post("/v1/chat/completions", json=chat(prompt, max_tokens=4)).json()
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]
    other = client.post(
        "/v1/chat/completions", json={**chat(prompt, max_tokens=4), "model": "llama-3"}
    )
    assert other.json()["model"] == "llama-3"


def test_whole_completion_stops_at_the_natural_length(client):
    r = client.post(
        "/v1/completions", json={"model": "sim-llm", "prompt": "Once", "max_tokens": 50}
    )
    out = r.json()
    assert out["object"] == "text_completion"
    assert out["choices"][0]["finish_reason"] == "stop"  # response_tokens=6 < 50
    assert len(out["choices"][0]["text"].split()) == 6 == out["usage"]["completion_tokens"]
    forced = {"model": "sim-llm", "prompt": "Once", "max_tokens": 8, "ignore_eos": True}
    assert client.post("/v1/completions", json=forced).json()["usage"]["completion_tokens"] == 8
    default = client.post("/v1/completions", json={"model": "sim-llm", "prompt": "Once"}).json()
    assert default["choices"][0]["finish_reason"] == "stop"


def test_chat_stream_sse_format(client):
    body = chat(
        "Tell me a story", max_tokens=3, stream=True, stream_options={"include_usage": True}
    )
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = chunks[1:4]
    assert [c["choices"][0]["finish_reason"] for c in deltas] == [None] * 3
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in deltas)
    assert chunks[4]["choices"][0] == {
        "index": 0,
        "logprobs": None,
        "finish_reason": "length",
        "delta": {},
    }
    assert chunks[5]["choices"] == [] and chunks[5]["usage"]["completion_tokens"] == 3
    assert len(chunks) == 6
    whole = client.post("/v1/chat/completions", json=chat("Tell me a story", max_tokens=3)).json()
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks[:4])
    assert text == whole["choices"][0]["message"]["content"]


def test_completion_stream_without_usage(client):
    body = {"model": "sim-llm", "prompt": "abc", "max_tokens": 2, "stream": True}
    events = sse_events(client.post("/v1/completions", json=body).text)
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and len(chunks) == 3
    assert all(c["object"] == "text_completion" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert chunks[2]["choices"][0]["text"] == ""
    assert all("usage" not in c for c in chunks)


def test_models_health_and_bad_requests(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["sim-llm", "llama-3"]
    assert client.get("/health").status_code == 200
    r = client.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/chat/completions", json={**chat("hi"), "model": "gpt-9"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"
    no_messages, messages_not_a_list = {"model": "sim-llm"}, {"model": "sim-llm", "messages": "hi"}
    empty_messages = {"model": "sim-llm", "messages": []}
    for bad in (
        chat("hi", max_tokens=0),
        chat("hi", n=2),
        no_messages,
        messages_not_a_list,
        empty_messages,
    ):
        assert client.post("/v1/chat/completions", json=bad).status_code == 400, bad
    empty = client.post("/v1/completions", json={"model": "sim-llm", "prompt": ""})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "prompt"
    long = client.post("/v1/completions", json={"model": "sim-llm", "prompt": "x" * 200_000})
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"


def test_embeddings(client):
    body = {"model": "sim-llm", "input": ["a cat", "a dog", "a cat"], "dimensions": 16}
    out = client.post("/v1/embeddings", json=body).json()
    vectors = [d["embedding"] for d in out["data"]]
    assert [d["index"] for d in out["data"]] == [0, 1, 2]
    assert vectors[0] == vectors[2] != vectors[1]
    assert all(len(v) == 16 and math.isclose(sum(x * x for x in v), 1.0) for v in vectors)
    assert out["usage"]["prompt_tokens"] == 3 * 2
    encoded = client.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    raw = base64.b64decode(encoded["data"][1]["embedding"])
    assert struct.unpack("<16f", raw) == pytest.approx(vectors[1], rel=1e-6)
    assert vectors[1] == fake_embedding("sim-llm", "a dog", 16)
    assert client.post("/v1/embeddings", json={"model": "sim-llm", "input": []}).status_code == 400


# ---- the queue, the cache, LoRA slots and metrics ------------------------------------------


async def _timed_posts(url: str, bodies: list[dict], t0: float | None = None) -> list[float]:
    """Post `bodies` at once; the seconds from `t0` (default: now) until each answer."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        t0 = time.monotonic() if t0 is None else t0

        async def one(body: dict) -> float:
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return time.monotonic() - t0

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def test_k_plus_first_request_waits_and_metrics_show_it():
    t = 0.25
    cfg = SimConfig(max_running=2, ttft_base_s=t, prefill_s_per_token=0.0, itl_s=0.0, kv_blocks=100)
    body = {"model": "sim-llm", "prompt": "x" * 64, "max_tokens": 1}  # 16 tokens: one block
    with serve_backends([cfg]) as (b,), httpx.Client(base_url=b.url) as c:
        seen = {}

        def watch() -> bool:
            st = b.sim.stats()
            if (st.running, st.waiting) == (2, 1):
                seen.update(metrics(c))
                return True
            return False

        async def main() -> list[float]:
            posts = asyncio.ensure_future(_timed_posts(b.url, [body] * 3))
            await asyncio.to_thread(wait_until, watch)
            return await posts

        ends = sorted(asyncio.run(main()))
        assert ends[1] < 2 * t  # the first two ran side by side
        assert ends[2] >= 2 * t  # the third waited for a slot, then prefilled
        assert value(seen["vllm:num_requests_running"], "vllm:num_requests_running") == 2
        assert value(seen["vllm:num_requests_waiting"], "vllm:num_requests_waiting") == 1
        assert value(seen["vllm:kv_cache_usage_perc"], "vllm:kv_cache_usage_perc") == 0.02
        after = metrics(c)
        assert value(after["vllm:num_requests_running"], "vllm:num_requests_running") == 0
        assert value(after["vllm:kv_cache_usage_perc"], "vllm:kv_cache_usage_perc") == 0
        assert value(after["vllm:generation_tokens"], "vllm:generation_tokens_total") == 3
        assert value(after["vllm:prompt_tokens"], "vllm:prompt_tokens_total") == 3 * 16
        ttft = after["vllm:time_to_first_token_seconds"]
        assert value(ttft, "vllm:time_to_first_token_seconds_count", model_name="sim-llm") == 3
        # two prefills of t, and the third's wait (less than t: it came a little after the
        # first two) plus its own prefill
        assert value(ttft, "vllm:time_to_first_token_seconds_sum") > 3 * t
        assert (
            value(
                after["vllm:request_success"],
                "vllm:request_success_total",
                finished_reason="length",
            )
            == 3
        )


def test_prefix_hit_makes_the_second_request_faster():
    cfg = SimConfig(ttft_base_s=0.005, prefill_s_per_token=0.0004, itl_s=0.0, kv_blocks=1000)
    body = chat("You are a helpful assistant. " * 40, max_tokens=1)  # ~1200 characters
    with serve_backends([cfg]) as (b,), httpx.Client(base_url=b.url) as c:
        times, outs = [], []
        for _ in range(2):
            t0 = time.monotonic()
            outs.append(c.post("/v1/chat/completions", json=body).json())
            times.append(time.monotonic() - t0)
        first, second = (o["usage"] for o in outs)
        assert first["prompt_tokens_details"]["cached_tokens"] == 0
        cached = second["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0 and cached % 16 in (0, 15) and cached < second["prompt_tokens"]
        assert times[0] >= 0.005 + 0.0004 * first["prompt_tokens"]
        assert times[1] < times[0] / 2
        m = metrics(c)
        queries = value(m["vllm:prefix_cache_queries"], "vllm:prefix_cache_queries_total")
        hits = value(m["vllm:prefix_cache_hits"], "vllm:prefix_cache_hits_total")
        assert (queries, hits) == (2 * first["prompt_tokens"], cached)
        # another cache_salt (tenant) shares no blocks, even with the same text
        other = c.post(
            "/v1/chat/completions", json={**body, "model": "sim-llm", "cache_salt": "t2"}
        )
        assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_prefix_cache_capacity_evicts():
    cfg = SimConfig(**FAST, kv_blocks=4)
    first = {"model": "sim-llm", "prompt": "a" * 64 * 4, "max_tokens": 1}
    second = {"model": "sim-llm", "prompt": "b" * 64 * 4, "max_tokens": 1}
    with serve_backends([cfg]) as (b,), httpx.Client(base_url=b.url) as c:
        for body in (first, second, first):
            out = c.post("/v1/completions", json=body).json()
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_lora_slots_and_info_metric():
    t = 0.25
    cfg = SimConfig(
        lora_adapters=["sql-lora", "chat-lora"],
        max_lora=1,
        max_running=4,
        ttft_base_s=t,
        prefill_s_per_token=0.0,
        itl_s=0.0,
    )
    with serve_backends([cfg]) as (b,), httpx.Client(base_url=b.url) as c:
        models = {m["id"]: m["parent"] for m in c.get("/v1/models").json()["data"]}
        assert models == {"sim-llm": None, "sql-lora": "sim-llm", "chat-lora": "sim-llm"}
        seen = {}

        def watch() -> bool:
            st = b.sim.stats()
            if st.running_lora_adapters == ("sql-lora",) and st.waiting_lora_adapters:
                seen.update(metrics(c))
                return True
            return False

        bodies = [
            {"model": "sql-lora", "prompt": "select", "max_tokens": 1},
            {"model": "chat-lora", "prompt": "hello", "max_tokens": 1},
            {"model": "sim-llm", "prompt": "base", "max_tokens": 1},
        ]

        async def main() -> list[float]:
            t0 = time.monotonic()
            posts = asyncio.ensure_future(_timed_posts(b.url, bodies[:1], t0))
            await asyncio.to_thread(wait_until, lambda: b.sim.stats().running == 1)
            rest = asyncio.ensure_future(_timed_posts(b.url, bodies[1:], t0))
            await asyncio.to_thread(wait_until, watch)
            return [*(await posts), *(await rest)]

        sql, chat_lora, base = asyncio.run(main())
        assert sql >= t
        assert base < 2 * t  # the base model needs no adapter slot: it passes the waiting one
        assert chat_lora >= 2 * t  # waited for the other adapter to finish
        (sample,) = seen["vllm:lora_requests_info"]
        assert sample.labels == {
            "max_lora": "1",
            "running_lora_adapters": "sql-lora",
            "waiting_lora_adapters": "chat-lora",
        }
        assert sample.value == pytest.approx(time.time(), abs=60)


def test_client_disconnect_frees_the_slot():
    cfg = SimConfig(ttft_base_s=0.0, prefill_s_per_token=0.0, itl_s=0.05, max_running=1)
    body = {"model": "sim-llm", "prompt": "p", "max_tokens": 200, "stream": True}
    with serve_backends([cfg]) as (b,), httpx.Client(base_url=b.url, timeout=10) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()  # kept: dropping the iterator would close the connection
            next(lines)
            assert b.sim.stats().running == 1
        wait_until(lambda: b.sim.stats().running == 0)
        whole = c.post("/v1/completions", json={"model": "sim-llm", "prompt": "p", "max_tokens": 1})
        assert whole.status_code == 200


# ---- ORCA ----------------------------------------------------------------------------------


def test_orca_header_only_when_asked(client):
    orca = pytest.importorskip("datahall.gateway.orca")
    plain = client.post("/v1/chat/completions", json=chat("hi", max_tokens=1))
    assert "endpoint-load-metrics" not in plain.headers
    for fmt in ("text", "JSON", "bin"):
        r = client.post(
            "/v1/chat/completions",
            json=chat("hi", max_tokens=1),
            headers={"endpoint-load-metrics-format": fmt},
        )
        assert r.headers["endpoint-load-metrics"].startswith(fmt.upper() + " ")
        report = orca.parse_orca(r.headers)
        assert set(report.named_metrics) == {"kv_cache_usage_perc", "num_requests_waiting"}
        assert report.named_metrics["num_requests_waiting"] == 0.0
    unknown = client.post(
        "/v1/completions",
        json={"model": "sim-llm", "prompt": "hi", "max_tokens": 1},
        headers={"endpoint-load-metrics-format": "xml"},
    )
    assert unknown.status_code == 200 and "endpoint-load-metrics" not in unknown.headers


def test_orca_stream_snapshot_at_response_start():
    orca = pytest.importorskip("datahall.gateway.orca")
    cfg = SimConfig(**FAST, max_running=4, kv_blocks=10)
    body = {"model": "sim-llm", "prompt": "x" * 64, "max_tokens": 2, "stream": True}
    with serve_backends([cfg]) as (b,), httpx.Client(base_url=b.url) as c:
        r = c.post("/v1/completions", json=body, headers={"endpoint-load-metrics-format": "text"})
        report = orca.parse_orca(r.headers)
        # the stream's own request was running when its headers went out
        assert report.application_utilization == 0.25
        assert report.named_metrics == {"kv_cache_usage_perc": 0.1, "num_requests_waiting": 0.0}


# ---- faults --------------------------------------------------------------------------------


def test_forced_429_with_retry_after_then_recovery(client, backend):
    backend.sim.faults = Faults(status=429, status_count=1, retry_after_s=1.5)
    r = client.post("/v1/chat/completions", json=chat("hi", max_tokens=1))
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2" and r.headers["retry-after-ms"] == "1500"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert client.post("/v1/chat/completions", json=chat("hi", max_tokens=1)).status_code == 200
    assert backend.sim.faults.status_count == 0


def test_forced_503_error_rate_and_down(client, backend):
    backend.sim.faults.status = 503
    for _ in range(2):
        assert (
            client.post("/v1/completions", json={"model": "sim-llm", "prompt": "p"}).status_code
            == 503
        )
    assert client.post("/v1/embeddings", json={"model": "sim-llm", "input": "p"}).status_code == 503
    backend.sim.faults = Faults(error_rate=1.0, error_status=500)
    r = client.post("/v1/completions", json={"model": "sim-llm", "prompt": "p"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    backend.sim.faults = Faults(down=True)
    for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("GET", "/metrics")):
        assert client.request(method, path).status_code == 503
    backend.sim.faults.down = False
    assert client.get("/health").status_code == 200


def test_error_rate_is_a_rate():
    cfg = SimConfig(**FAST, faults=Faults(error_rate=0.5), seed=3)
    with serve_backends([cfg]) as (b,), httpx.Client(base_url=b.url) as c:
        codes = [
            c.post(
                "/v1/completions", json={"model": "sim-llm", "prompt": "p", "max_tokens": 1}
            ).status_code
            for _ in range(40)
        ]
    assert set(codes) == {200, 500} and 8 <= codes.count(500) <= 32


def test_disconnect_mid_stream_after_k_chunks(client, backend):
    backend.sim.faults.disconnect_after_chunks = 2
    body = chat("hi", max_tokens=5, stream=True)
    got = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        client.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                got.append(line)
    assert len(got) == 2 and all(line.startswith("data: {") for line in got)
    wait_until(lambda: backend.sim.stats().running == 0)


# ---- several backends ----------------------------------------------------------------------


def test_serve_and_run_several_backends():
    configs = [SimConfig(**FAST), {"speed": 4.0, **FAST}, SimConfig(**FAST, name="big")]
    with serve_backends(configs) as backends, httpx.Client(timeout=5) as c:
        assert [b.name for b in backends] == ["sim-0", "sim-1", "big"]
        assert len({b.url for b in backends}) == 3
        assert all(b.url.startswith("http://127.0.0.1:") for b in backends)
        assert backends[1].sim.config.speed == 4.0
        for b in backends:
            r = c.post(
                b.url + "/v1/completions", json={"model": "sim-llm", "prompt": "p", "max_tokens": 1}
            )
            assert r.headers[BACKEND_HEADER] == b.name
    lines: list[str] = []
    run_backends([SimConfig(**FAST)], duration_s=0.05, echo=lines.append)
    assert len(lines) == 1 and lines[0].startswith("sim-0 http://127.0.0.1:")


def test_the_openai_client_reads_the_simulator(backend):
    openai = pytest.importorskip("openai")
    backend.sim.faults = Faults()
    client = openai.OpenAI(base_url=backend.url + "/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="sim-llm", messages=messages, max_tokens=3)
    assert whole.usage.completion_tokens == 3 and whole.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model="sim-llm",
        messages=messages,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == whole.choices[0].message.content
    emb = client.embeddings.create(model="sim-llm", input=["a", "b"])
    assert [len(d.embedding) for d in emb.data] == [384, 384]
    assert [m.id for m in client.models.list()] == ["sim-llm", "llama-3"]
