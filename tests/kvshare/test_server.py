"""The OpenAI-compatible server: models, chat and text completions (streamed and not), ORCA
headers, Prometheus metrics, errors, disconnects, and the official openai client against a real
uvicorn on 127.0.0.1. Tiny random models and a byte-level fake tokenizer (seconds)."""

import asyncio
import json
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from datahall.core.http import serve_in_thread  # noqa: E402
from datahall.kvshare.engine import Engine  # noqa: E402
from datahall.kvshare.models import Model, architecture, tiny  # noqa: E402
from datahall.kvshare.server import TextStream, create_app  # noqa: E402
from datahall.kvshare.store import LocalStore  # noqa: E402

NAMES = {"alpha": "a", "beta": "b"}
DOC = "The shared document that every agent reads before its own question. " * 2


class ByteTokenizer:
    """Token id = byte + 3 (0 pad, 1 bos, 2 eos), with a trivial chat template."""

    offset, eos_token_id = 3, 2

    def apply_chat_template(self, messages, *, tokenize=False, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text, add_special_tokens=True):
        return [b + self.offset for b in text.encode()]

    def decode(self, ids, skip_special_tokens=True):
        data = bytes(i - self.offset for i in ids if i >= self.offset)
        return data.decode("utf-8", errors="replace")


TOK = ByteTokenizer()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def variant(name, seed):
    model = tiny(seed=seed, vocab=3 + 256)
    return Model(name, model, None, f"tiny:{architecture(model.config)}")


@pytest.fixture(scope="module")
def models():
    return {"a": variant("a", 0), "b": variant("b", 1)}


def new_engine(models, **kw):
    kw.setdefault("store", LocalStore(64 << 20))
    kw.setdefault("sharing", "droidspeak")
    return Engine(models, profiles=lambda s, r: (1, 3), max_prompt_tokens=300, **kw)


@pytest.fixture(scope="module")
def engine(models):
    with new_engine(models) as e:
        yield e


@pytest.fixture(scope="module")
def app(engine):
    return create_app(engine, TOK, NAMES)


def call(app, method, path, **kw):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.wait_for(client.request(method, path, **kw), 30)

    return asyncio.run(go())


def sse(response):
    """The `data:` payloads of an SSE body, checking the framing (blank line after each)."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-1] == ""
    assert all(e.startswith("data: ") for e in events[:-1])
    return [e.removeprefix("data: ") for e in events[:-1]]


CHAT = {"model": "alpha", "messages": [{"role": "user", "content": DOC + "Q1?"}]}


def test_models_health_ready(app, models):
    r = call(app, "GET", "/v1/models")
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["alpha", "beta"]
    assert r.json()["data"][1]["root"] == "b"
    assert call(app, "GET", "/health").json() == {"status": "ok"}
    assert call(app, "GET", "/ready").status_code == 200
    idle = create_app(new_engine(models), TOK, NAMES)  # its engine is not started
    assert call(idle, "GET", "/health").status_code == 200
    r = call(idle, "GET", "/ready")
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
    r = call(idle, "POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 2})
    assert r.status_code == 503 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_chat_streamed_equals_whole_with_usage(app):
    body = {**CHAT, "max_tokens": 12, "temperature": 0}
    whole = call(app, "POST", "/v1/chat/completions", json=body)
    assert whole.status_code == 200
    out = whole.json()
    assert out["object"] == "chat.completion" and out["model"] == "alpha"
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in (
        "stop",
        "length",
    )
    prompt = TOK.encode(TOK.apply_chat_template(CHAT["messages"]))
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(prompt)
    assert 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    streamed = call(
        app,
        "POST",
        "/v1/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert streamed.status_code == 200
    events = sse(streamed)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(
        c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks
    )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *content, final, usage_chunk = chunks
    assert final["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
    assert text == choice["message"]["content"]
    assert usage_chunk["choices"] == []
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [usage_chunk["usage"][k] for k in counts] == [usage[k] for k in counts]
    # the second time, the prompt's whole blocks came from the prefix cache
    cached = usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == len(prompt) // 16 * 16


def test_completions_streamed_and_whole(app):
    body = {"model": "beta", "prompt": DOC, "max_tokens": 8, "temperature": 0}
    whole = call(app, "POST", "/v1/completions", json=body).json()
    assert whole["object"] == "text_completion"
    assert whole["usage"]["prompt_tokens"] == len(TOK.encode(DOC))
    events = sse(call(app, "POST", "/v1/completions", json={**body, "stream": True}))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    ids = call(app, "POST", "/v1/completions", json={**body, "prompt": TOK.encode(DOC)}).json()
    assert ids["choices"][0]["text"] == whole["choices"][0]["text"]


def test_stop_strings_end_the_text():
    stream = TextStream(TOK, stop=["cd"])
    pieces = [stream.add(t) for t in TOK.encode("abcde")]
    assert "".join(pieces) + stream.flush() == "ab" and stream.stopped
    stream = TextStream(TOK)
    euro = TOK.encode("x€")  # a three-byte character arrives a byte at a time
    assert [stream.add(t) for t in euro] == ["x", "", "", "€"]


def test_orca_headers(app, engine):
    r = call(
        app,
        "POST",
        "/v1/completions",
        json={"model": "alpha", "prompt": "hi", "max_tokens": 2},
        headers={"endpoint-load-metrics-format": "text"},
    )
    value = r.headers["endpoint-load-metrics"]
    assert value.startswith("TEXT ")
    pairs = dict(kv.split("=") for kv in value.removeprefix("TEXT ").split(", "))
    assert set(pairs) == {"named_metrics.kv_cache_usage_perc", "named_metrics.num_requests_waiting"}
    assert 0 <= float(pairs["named_metrics.kv_cache_usage_perc"]) <= 1
    assert float(pairs["named_metrics.num_requests_waiting"]) >= 0
    r = call(
        app,
        "POST",
        "/v1/chat/completions",
        json={**CHAT, "max_tokens": 2, "stream": True},
        headers={"endpoint-load-metrics-format": "json"},
    )
    value = r.headers["endpoint-load-metrics"]
    assert value.startswith("JSON ")
    report = json.loads(value.removeprefix("JSON "))
    assert set(report["named_metrics"]) == {"kv_cache_usage_perc", "num_requests_waiting"}
    plain = call(
        app, "POST", "/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 1}
    )
    assert "endpoint-load-metrics" not in plain.headers


def test_metrics_names_and_values(models):
    with new_engine(models) as engine:
        app = create_app(engine, TOK, NAMES)
        prompt_tokens = 0
        for name in ("alpha", "alpha", "beta"):  # full, same-variant hit, cross-variant hit
            body = {"model": name, "prompt": DOC + name, "max_tokens": 4, "temperature": 0}
            out = call(app, "POST", "/v1/completions", json=body).json()
            prompt_tokens += out["usage"]["prompt_tokens"]
        deadline = time.monotonic() + 10
        while engine.stats().running and time.monotonic() < deadline:
            time.sleep(0.01)
        text = call(app, "GET", "/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("vllm:num_requests_running") == 0
    assert value("vllm:num_requests_waiting") == 0
    assert 0 <= value("vllm:kv_cache_usage_perc") <= 1
    assert value("vllm:gpu_cache_usage_perc") == value("vllm:kv_cache_usage_perc")
    assert value("vllm:prefix_cache_queries_total") == prompt_tokens
    assert 0 < value("vllm:prefix_cache_hits_total") < prompt_tokens
    assert (
        value("vllm:prompt_tokens_total", model_name="alpha")
        + value("vllm:prompt_tokens_total", model_name="beta")
        == prompt_tokens
    )
    assert value("vllm:generation_tokens_total", model_name="alpha") >= 2
    assert value("vllm:time_to_first_token_seconds_count", model_name="alpha") == 2
    assert value("vllm:time_to_first_token_seconds_sum", model_name="beta") > 0
    assert ("vllm:inter_token_latency_seconds_count", (("model_name", "alpha"),)) in samples
    assert value("datahall:prefills_total", kind="cross_variant") == 1
    assert value("datahall:prefills_total", kind="same_variant") == 1


@pytest.mark.parametrize(
    "path, body, status, code, param",
    [
        ("/v1/chat/completions", {**CHAT, "model": "nope"}, 404, "model_not_found", "model"),
        (
            "/v1/completions",
            {"model": "alpha", "prompt": "x" * 301},
            400,
            "context_length_exceeded",
            "prompt",
        ),
        (
            "/v1/completions",
            {"model": "alpha", "prompt": "x", "temperature": "hot"},
            400,
            None,
            "temperature",
        ),
        ("/v1/chat/completions", {"model": "alpha", "messages": "hi"}, 400, None, "messages"),
        (
            "/v1/chat/completions",
            {"model": "beta", "messages": [{"role": "user", "content": "x" * 300}]},
            400,
            "context_length_exceeded",
            "messages",
        ),
        ("/v1/completions", {"model": "alpha", "prompt": "x", "n": 2}, 400, None, "n"),
    ],
)
def test_errors_are_openai_json(app, path, body, status, code, param):
    r = call(app, "POST", path, json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert (err["code"], err["param"], err["type"]) == (code, param, "invalid_request_error")
    assert err["message"]
    r = call(app, "POST", path, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def server(engine):
    """A real uvicorn serving the app on 127.0.0.1 in a thread."""
    with serve_in_thread(create_app(engine, TOK, NAMES)) as url:
        yield url


def wait_aborts(engine, n, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = engine.stats()
        if st.finished.get("abort", 0) >= n and st.running == 0:
            return st
        time.sleep(0.01)
    raise AssertionError(f"no abort within {timeout} s: {engine.stats()}")


def test_client_disconnect_cancels(server, engine):
    aborted = engine.stats().finished.get("abort", 0)
    body = {**CHAT, "max_tokens": 3000, "ignore_eos": True, "temperature": 0}
    streaming = {**body, "stream": True}
    with (
        httpx.Client(base_url=server, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=streaming) as r,
    ):
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break  # leaving the block closes the connection mid-stream
    st = wait_aborts(engine, aborted + 1)
    assert st.kv_cache_bytes == 0 and st.waiting == 0
    with httpx.Client(base_url=server, timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
        client.post("/v1/chat/completions", json=body)  # the whole answer, given up on
    wait_aborts(engine, aborted + 2)


def test_official_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=20)
    assert [m.id for m in client.models.list()] == ["alpha", "beta"]
    messages = [{"role": "user", "content": DOC + "What is it about?"}]
    whole = client.chat.completions.create(
        model="beta", messages=messages, max_tokens=10, temperature=0
    )
    assert whole.usage.completion_tokens >= 1 and whole.choices[0].finish_reason in (
        "stop",
        "length",
    )
    stream = client.chat.completions.create(
        model="beta", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == whole.choices[0].message.content
    done = client.completions.create(model="alpha", prompt="hello", max_tokens=5, temperature=0)
    streamed = client.completions.create(
        model="alpha", prompt="hello", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=messages)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="alpha", prompt="x" * 400)
    assert err.value.code == "context_length_exceeded"
