"""A real-model backend behind the gateway (issue 6, item 8): datahall's own kvshare server,
serving two tiny random decoders with a byte-level tokenizer, over real HTTP on 127.0.0.1.

The gateway knows nothing of kvshare: it reaches it as it reaches vLLM, by its OpenAI routes,
its ORCA header (``named_metrics.kv_cache_usage_perc``, ``num_requests_waiting``) and, while no
ORCA report is fresh, its ``/metrics`` page with vLLM's names. The models are tiny, so the file
runs in seconds."""

from __future__ import annotations

import contextlib
import json
import time

import httpx
import pytest

pytest.importorskip("torch", reason="the kvshare backend needs torch (the kvshare extra)")
pytest.importorskip("transformers", reason="the kvshare backend needs transformers")

from datahall.core.http import serve_in_thread  # noqa: E402
from datahall.gateway.config import GatewayConfig  # noqa: E402
from datahall.gateway.resilience import parse_vllm_metrics  # noqa: E402
from datahall.gateway.server import create_app  # noqa: E402
from datahall.kvshare.engine import Engine  # noqa: E402
from datahall.kvshare.models import Model, architecture, tiny  # noqa: E402
from datahall.kvshare.server import ByteTokenizer  # noqa: E402
from datahall.kvshare.server import create_app as kvshare_app  # noqa: E402
from datahall.kvshare.store import LocalStore  # noqa: E402

NAMES = {"alpha": "a", "beta": "b"}  # served name -> the engine's variant
DOC = "A shared document that every question below starts with, as agents do. " * 2


def _variant(name: str, seed: int) -> Model:
    model = tiny(seed=seed, vocab=3 + 256)
    return Model(name, model, None, f"tiny:{architecture(model.config)}")


@pytest.fixture(scope="module")
def kvshare_url():
    """A kvshare server (engine, OpenAI routes, ORCA, vLLM metrics) on a free port."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls run fastest without a thread pool
    models = {"a": _variant("a", 0), "b": _variant("b", 1)}
    engine = Engine(
        models,
        store=LocalStore(64 << 20),
        sharing="droidspeak",
        profiles=lambda sender, receiver: (1, 3),
        max_prompt_tokens=400,
    )
    try:
        with engine, serve_in_thread(kvshare_app(engine, ByteTokenizer(), NAMES)) as url:
            yield url
    finally:
        torch.set_num_threads(threads)


def _config(url: str, policy: str) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "backends": [{"name": "kvshare", "url": url, "models": list(NAMES)}],
            "aliases": {"llama-3": {"pool": "default", "model": "alpha"}},
            "routing": {
                "policy": policy,
                "orca": {"request_format": "text", "scrape_interval_s": 0.05},
            },
            "health_checks": {"enabled": False},
        }
    )


@contextlib.contextmanager
def _gateway(config: GatewayConfig):
    app = create_app(config)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        client.gateway = app.state.gateway
        yield client


def _chat(question: str, **extra) -> dict:
    messages = [{"role": "user", "content": DOC + question}]
    return {"model": "llama-3", "messages": messages, "max_tokens": 8, "temperature": 0, **extra}


def _until(condition, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


@pytest.mark.parametrize("policy", ["kv-aware", "prefix-load"])
def test_whole_and_streamed_answers_pass_through_with_orca(kvshare_url, policy):
    with _gateway(_config(kvshare_url, policy)) as gw:
        r = gw.post("/v1/chat/completions", json=_chat("What is it about?"))
        assert r.status_code == 200, r.text
        whole = r.json()
        assert whole["object"] == "chat.completion" and whole["model"] == "alpha"
        assert r.headers["x-gateway-backend"] == "kvshare"
        assert "endpoint-load-metrics" not in r.headers  # the report is for the gateway
        usage = whole["usage"]
        assert 1 <= usage["completion_tokens"] <= 8
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

        # kvshare's ORCA header reached the router's snapshot
        endpoint = gw.gateway.router.endpoints[0]
        assert endpoint.orca is not None and endpoint.orca_errors == 0
        named = endpoint.orca.named_metrics
        assert set(named) == {"kv_cache_usage_perc", "num_requests_waiting"}
        assert 0 <= named["kv_cache_usage_perc"] <= 1 and named["num_requests_waiting"] >= 0
        snap = gw.gateway.router.snapshot()[0]
        assert snap["load_source"] == "orca" and snap["kv_cache"] == named["kv_cache_usage_perc"]

        # the same question streamed: relayed event by event, the same greedy text
        r = gw.post("/v1/chat/completions", json=_chat("What is it about?", stream=True))
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        # the gateway asked for the usage chunk for its own accounting, and hid it again
        assert all(c["choices"] for c in chunks)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == whole["choices"][0]["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]

        # a text completion and the other variant, by its own name
        r = gw.post("/v1/completions", json={"model": "beta", "prompt": DOC, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["object"] == "text_completion"
        metrics = gw.get("/metrics").text
        output = (
            'gen_ai_client_token_usage_count{gen_ai_operation_name="chat",'
            'gen_ai_request_model="llama-3",gen_ai_token_type="output"} 2.0'
        )
        assert output in metrics  # the streamed answer's usage was read too
        assert 'metric="named_metrics.kv_cache_usage_perc"' in metrics


def test_vllm_metrics_are_scraped_while_no_orca_report_is_fresh(kvshare_url):
    with _gateway(_config(kvshare_url, "kv-aware")) as gw:
        router = gw.gateway.router
        endpoint = router.endpoints[0]
        # no request yet, so no ORCA report: the load comes from kvshare's /metrics page
        assert _until(lambda: endpoint.metrics is not None)
        assert endpoint.orca is None
        scraped = endpoint.metrics
        assert scraped.num_requests_waiting == 0 and scraped.num_requests_running == 0
        assert scraped.kv_cache_usage_perc is not None and 0 <= scraped.kv_cache_usage_perc <= 1
        snap = router.snapshot()[0]
        assert snap["load_source"] == "metrics" and snap["kv_cache"] == scraped.kv_cache_usage_perc
        # what the gateway read is what the page says, under vLLM's names
        page = parse_vllm_metrics(httpx.get(kvshare_url + "/metrics", timeout=10).text)
        assert page.num_requests_waiting == scraped.num_requests_waiting
        assert page.num_requests_running == scraped.num_requests_running
        # an answer brings an ORCA report, which then takes over from the scrape
        assert gw.post("/v1/chat/completions", json=_chat("Why?")).status_code == 200
        assert router.snapshot()[0]["load_source"] == "orca"


def test_unknown_models_and_kvshare_errors_come_back_as_openai_errors(kvshare_url):
    with _gateway(_config(kvshare_url, "prefix-load")) as gw:
        r = gw.post("/v1/chat/completions", json={**_chat("?"), "model": "gamma"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        # too long for the engine: kvshare's own 400 is relayed, not retried
        long = {"model": "alpha", "prompt": "x" * 500, "max_tokens": 2}
        r = gw.post("/v1/completions", json=long)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
