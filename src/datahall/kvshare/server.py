"""An OpenAI-compatible HTTP server for the multi-variant :class:`~datahall.kvshare.engine.Engine`.

DroidSpeak serves several fine-tunes of one base behind one API (brief §2.5, issue "DroidSpeak
serving"); the request's ``model`` picks the variant. The API follows OpenAI's, as vLLM serves
it:

- ``GET /v1/models``; ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed as
  server-sent events (``data: {chunk}`` lines with ``choices[0].delta`` or ``.text``, a last
  chunk with ``finish_reason``, then ``data: [DONE]``) or answered whole with ``usage``;
- errors as OpenAI's ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request
  (``context_length_exceeded`` for a prompt that is too long), 404 ``model_not_found``, 503
  while the engine is not running;
- ``/health`` (the process answers) and ``/ready`` (models loaded, engine worker alive);
- ``/metrics``: Prometheus text with vLLM's metric names (``vllm:num_requests_running``,
  ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``, ``vllm:prefix_cache_queries``
  and ``_hits``, ``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds``,
  ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``, ...), so dashboards and
  gateways written for vLLM read it unchanged;
- ORCA load reports as vLLM sends them: a completion request with the header
  ``endpoint-load-metrics-format: text`` (or ``json``) is answered with an
  ``endpoint-load-metrics`` header holding ``named_metrics.kv_cache_usage_perc`` and
  ``named_metrics.num_requests_waiting`` (:func:`orca_report`).

A client that disconnects, mid-stream or while waiting for a whole answer, cancels its request
in the engine, which frees its cache at the next iteration.

The tokenizer is any object with ``apply_chat_template(messages, tokenize=False,
add_generation_prompt=True) -> str``, ``encode(text, add_special_tokens=...) -> list[int]``,
``decode(ids, skip_special_tokens=True) -> str`` and ``eos_token_id``: a Hugging Face tokenizer
for real models. Run the app with uvicorn::

    uvicorn.run(create_app(engine, tokenizer), host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..core.http import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS, unless_disconnected
from .engine import BadRequest, Engine, EngineError, EngineUnavailable, Request, UnknownModel

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "TextStream",
    "create_app",
    "orca_report",
    "ORCA_FORMAT_HEADER",
    "ORCA_HEADER",
]

ORCA_FORMAT_HEADER = "endpoint-load-metrics-format"
ORCA_HEADER = "endpoint-load-metrics"


class Tokenizer(Protocol):
    """What the server needs of a tokenizer (a Hugging Face tokenizer has all of it)."""

    eos_token_id: int | None

    def apply_chat_template(
        self, messages: list[dict], *, tokenize: bool, add_generation_prompt: bool
    ) -> str: ...

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool) -> str: ...


class ByteTokenizer:
    """A byte-level tokenizer for token-id models such as the tiny test decoders (vocabulary of
    at least 256): token id = byte, a plain chat template (``role: content`` lines, then
    ``assistant:``), no end-of-sequence token. A test and debug facility (``datahall kvshare
    serve --tokenizer bytes``), not a real model's tokenizer: the tiny models' answers are
    random bytes.

    >>> t = ByteTokenizer()
    >>> t.encode("hé", add_special_tokens=True), t.decode([104, 195, 169], skip_special_tokens=True)
    ([104, 195, 169], 'hé')
    """

    eos_token_id: int | None = None

    def apply_chat_template(
        self, messages: list[dict], *, tokenize: bool = False, add_generation_prompt: bool = True
    ) -> str:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def orca_report(metrics_format: str, named_metrics: Iterable[tuple[str, float]]) -> dict[str, str]:
    """The ``endpoint-load-metrics`` header in ORCA's ``TEXT`` or ``JSON`` form, as vLLM writes
    it (``vllm/entrypoints/openai/orca_metrics.py``); {} for another format.

    >>> orca_report("text", [("kv_cache_usage_perc", 0.25), ("num_requests_waiting", 2.0)])
    {'endpoint-load-metrics': 'TEXT named_metrics.kv_cache_usage_perc=0.25, named_metrics.num_requests_waiting=2.0'}
    >>> orca_report("json", [("num_requests_waiting", 2.0)])
    {'endpoint-load-metrics': 'JSON {"named_metrics": {"num_requests_waiting": 2.0}}'}
    """
    metrics = [(str(k), float(v)) for k, v in named_metrics]
    fmt = metrics_format.strip().lower()
    if fmt == "text":
        return {ORCA_HEADER: "TEXT " + ", ".join(f"named_metrics.{k}={v}" for k, v in metrics)}
    if fmt == "json":
        return {ORCA_HEADER: "JSON " + json.dumps({"named_metrics": dict(metrics)})}
    return {}


class TextStream:
    """Incremental detokenization: the text each new token adds, holding back what may still
    change (a UTF-8 sequence cut in the middle decodes to U+FFFD) or may turn out to start a
    `stop` string; a stop string ends the text before it, as OpenAI's ``stop`` does."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Take one generated token; the text to send now."""
        self.ids.append(token)
        text = self._decode()
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped = True
            return self._advance(text[: min(found)])
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text[: len(text) - self.hold] if self.hold else text)

    def flush(self) -> str:
        """At the end of generation: whatever was held back."""
        return "" if self.stopped else self._advance(self._decode())

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.text) or not text.startswith(self.text):
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta


def _error_body(e: EngineError) -> dict[str, Any]:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def _error(e: EngineError) -> JSONResponse:
    return JSONResponse(_error_body(e), status_code=e.status)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _EngineCollector:
    """Reads the engine's counters at scrape time (gauges and counters that the engine keeps)."""

    def __init__(self, engine: Engine, label: Mapping[str, str]):
        self.engine, self.label = engine, label

    def collect(self):
        st = self.engine.stats()
        yield GaugeMetricFamily(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            value=st.running,
        )
        yield GaugeMetricFamily(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            value=st.waiting,
        )
        yield GaugeMetricFamily(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            value=st.kv_cache_usage,
        )
        # the name before vLLM 0.10, for scrapers and gateways that still read it
        yield GaugeMetricFamily(
            "vllm:gpu_cache_usage_perc",
            "KV-cache usage (name before vLLM 0.10; this server runs on CPU).",
            value=st.kv_cache_usage,
        )
        yield CounterMetricFamily(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            value=st.prefix_query_tokens,
        )
        yield CounterMetricFamily(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            value=st.prefix_hit_tokens,
        )
        for name, doc, counts in (
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", st.prompt_tokens),
            (
                "vllm:generation_tokens",
                "Number of generation tokens processed.",
                st.generation_tokens,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            for variant, n in counts.items():
                family.add_metric([self.label[variant]], n)
            yield family
        family = CounterMetricFamily(
            "datahall:prefills",
            "Prefills by how the prompt's cache was made: full, same_variant or cross_variant (DroidSpeak).",
            labels=["kind"],
        )
        for kind, n in st.prefills.items():
            family.add_metric([kind], n)
        yield family
        family = CounterMetricFamily(
            "datahall:transfers",
            "Cache fetches from peer nodes by outcome: ok, or why the cache was not used "
            "(truncated, corrupt, timeout, peer_error, unreachable, error).",
            labels=["outcome"],
        )
        for outcome, n in st.transfers.items():
            family.add_metric([outcome], n)
        yield family
        yield CounterMetricFamily(
            "datahall:transfer_bytes",
            "Bytes of caches received from peer nodes.",
            value=st.transfer_bytes,
        )


class _Service:
    def __init__(
        self, engine: Engine, tokenizer: Tokenizer, names: dict[str, str], default_max_tokens: int
    ):
        self.engine, self.tokenizer, self.names = engine, tokenizer, names
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        label = {}
        for name, variant in names.items():
            label.setdefault(variant, name)
        self.label = {v: label.get(v, v) for v in engine.variants}
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, self.label))
        labels = ["model_name"]
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            registry=self.registry,
            buckets=TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            labels,
            registry=self.registry,
            buckets=ITL_BUCKETS,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            labels,
            registry=self.registry,
            buckets=E2E_BUCKETS,
        )
        self.success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=self.registry,
        )
        engine.add_listener(self.observe)

    def observe(self, request: Request) -> None:
        """Latency histograms from a finished request's timings (in the engine's thread)."""
        name = self.label[request.variant]
        if request.ttft is not None:
            self.ttft.labels(name).observe(request.ttft)
        for dt in request.inter_token_latencies:
            self.itl.labels(name).observe(dt)
        if request.finish_time is not None:
            self.e2e.labels(name).observe(request.finish_time - request.arrival)
        if request.finish_reason in ("stop", "length"):
            self.success.labels(name, request.finish_reason).inc()

    # ---- endpoints -------------------------------------------------------------------------

    async def models(self, request: HTTPRequest) -> Response:
        data = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "datahall",
                "root": variant,
                "parent": None,
                "max_model_len": self.engine.max_model_len,
            }
            for name, variant in self.names.items()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: HTTPRequest) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: HTTPRequest) -> Response:
        if self.engine.alive:
            return JSONResponse({"status": "ready", "models": list(self.names)})
        return _error(EngineUnavailable("the engine is not running; the server is not ready"))

    async def metrics(self, request: HTTPRequest) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def orca(self, request: HTTPRequest) -> dict[str, str]:
        fmt = request.headers.get(ORCA_FORMAT_HEADER)
        if not fmt:
            return {}
        st = self.engine.stats()
        return orca_report(
            fmt,
            [
                ("kv_cache_usage_perc", st.kv_cache_usage),
                ("num_requests_waiting", float(st.waiting)),
            ],
        )

    async def chat(self, request: HTTPRequest) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: HTTPRequest) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, http: HTTPRequest, *, chat: bool) -> Response:
        headers = self.orca(http)
        try:
            body = await _json_object(http)
            name, variant = self._model(body)
            prompt = self._chat_prompt(body) if chat else self._text_prompt(body)
            params, stop, stream, usage_chunk = self._params(body, len(prompt), chat)
            if not self.engine.alive:
                raise EngineUnavailable("the engine is not running; retry later")
            req = self.engine.submit(prompt, variant, **params)
        except EngineError as e:
            if chat and e.param == "prompt":
                e.param = "messages"  # the chat API has no `prompt`: name what the client sent
            response = _error(e)
            response.headers.update(headers)
            return response
        text = TextStream(self.tokenizer, stop)
        kind = "chat.completion" if chat else "text_completion"
        ident = ("chatcmpl-" if chat else "cmpl-") + req.id
        if stream:
            events = self._events(req, text, name, ident, kind, chat, usage_chunk)
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        if not await _until_done(req, text, http):
            return Response(status_code=499)  # the client is gone; nobody reads this
        text.flush()
        content = text.text
        finish = "stop" if text.stopped else req.finish_reason
        if finish == "error":
            return _error(_ServerError(f"generation failed: {req.error}"))
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        out = {
            "id": ident,
            "object": kind,
            "created": req.created,
            "model": name,
            "choices": [choice],
            "usage": _usage(req),
        }
        return JSONResponse(out, headers=headers)

    async def _events(
        self,
        req: Request,
        text: TextStream,
        name: str,
        ident: str,
        kind: str,
        chat: bool,
        usage_chunk: bool,
    ) -> AsyncIterator[str]:
        """The SSE stream: a role chunk (chat), one chunk per text delta, the finish chunk, an
        optional usage chunk, ``[DONE]``. Cancelled (client gone) → the request is cancelled."""

        def chunk(delta: dict[str, str], finish: str | None = None) -> str:
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                choice["delta"] = delta
            else:
                choice["text"] = delta.get("content", "")
            return _sse({**head, "choices": [choice]})

        head = {
            "id": ident,
            "object": f"{kind}.chunk" if chat else kind,
            "created": req.created,
            "model": name,
        }
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            async for token in req.stream():
                delta = text.add(token)
                if delta:
                    yield chunk({"content": delta})
                if text.stopped:
                    req.cancel()  # a stop string ended the text: stop generating too
                    break
            rest = text.flush()
            if rest:
                yield chunk({"content": rest})
            if req.finish_reason == "error":
                yield _sse(_error_body(_ServerError(f"generation failed: {req.error}")))
            else:
                yield chunk({}, "stop" if text.stopped else req.finish_reason)
            if usage_chunk:
                yield _sse({**head, "choices": [], "usage": _usage(req)})
            yield "data: [DONE]\n\n"
        finally:
            if not req.done:
                req.cancel()

    # ---- request parsing -------------------------------------------------------------------

    def _model(self, body: dict) -> tuple[str, str]:
        name = body.get("model")
        if not isinstance(name, str):
            raise BadRequest("`model` is required: one of " + ", ".join(self.names), param="model")
        if name not in self.names:
            raise UnknownModel(
                f"The model `{name}` does not exist; this server has {', '.join(self.names)}",
                param="model",
            )
        return name, self.names[name]

    def _chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest(
                "`messages` must be a non-empty list of {role, content} objects", param="messages"
            )
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRequest(f"messages[{i}] needs a string `role`", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: only text is served
                if not all(
                    isinstance(p, dict)
                    and p.get("type") == "text"
                    and isinstance(p.get("text"), str)
                    for p in content
                ):
                    raise BadRequest(
                        f"messages[{i}].content: only text parts are supported", param="messages"
                    )
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise BadRequest(
                    f"messages[{i}].content must be a string or text parts", param="messages"
                )
            clean.append({"role": m["role"], "content": content})
        text = self.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _text_prompt(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            return prompt
        raise BadRequest(
            "`prompt` must be a string or a list of token ids (one prompt per request)",
            param="prompt",
        )

    def _params(
        self, body: dict, prompt_len: int, chat: bool
    ) -> tuple[dict, list[str], bool, bool]:
        if body.get("n", 1) != 1:
            raise BadRequest("only n=1 is supported", param="n")
        if body.get("echo") or body.get("logprobs") or body.get("best_of", 1) != 1:
            raise BadRequest("echo, logprobs and best_of are not supported", param="logprobs")
        default = (
            min(self.default_max_tokens, self.engine.max_model_len - prompt_len) if chat else 16
        )
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = (
            max(default, 1) if max_tokens is None else _number(max_tokens, "max_tokens", int)
        )
        temperature = _number(body.get("temperature", 1.0), "temperature", float)
        top_p = _number(body.get("top_p", 1.0), "top_p", float)
        seed = body.get("seed")
        if seed is not None:
            seed = _number(seed, "seed", int)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("`stop` must be a string or a list of strings", param="stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("`stream` must be true or false", param="stream")
        options = body.get("stream_options") or {}
        usage_chunk = bool(isinstance(options, dict) and options.get("include_usage"))
        eos = getattr(self.tokenizer, "eos_token_id", None)
        stop_ids = [eos] if isinstance(eos, int) and not body.get("ignore_eos", False) else []
        params = dict(
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop_ids,
        )
        return params, stop, stream, usage_chunk


class _ServerError(EngineError):
    type = "server_error"
    status = 500


def _number(value: Any, name: str, kind: type) -> Any:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (kind is int and not float(value).is_integer())
    ):
        raise BadRequest(
            f"`{name}` must be {'an integer' if kind is int else 'a number'}, got {value!r}",
            param=name,
        )
    return kind(value)


def _usage(req: Request) -> dict[str, int]:
    n, m = len(req.prompt), len(req.output)
    return {
        "prompt_tokens": n,
        "completion_tokens": m,
        "total_tokens": n + m,
        "prompt_tokens_details": {"cached_tokens": req.cached_tokens},
    }


async def _json_object(http: HTTPRequest) -> dict:
    try:
        body = json.loads(await http.body())
    except ValueError:
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


async def _until_done(req: Request, text: TextStream, http: HTTPRequest) -> bool:
    """Feed `text` until the request finishes or a stop string ends it; False (and the request
    cancelled) if the client disconnects first — vLLM's ``with_cancellation``."""

    async def consume() -> None:
        async for token in req.stream():
            text.add(token)
            if text.stopped:
                req.cancel()
                return

    try:
        await unless_disconnected(consume(), http.receive)
    except Exception:  # the client went (ClientDisconnected), or the engine's stream failed
        req.cancel()
        return False
    return True


def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    served_names: Mapping[str, str] | Sequence[str] | None = None,
    *,
    default_max_tokens: int = 256,
    manage_engine: bool = True,
) -> Starlette:
    """The Starlette app serving `engine`. `served_names` maps the public model names to the
    engine's variants (a list serves those variants under their own names; default: all).
    With `manage_engine`, the app's lifespan starts the engine if it is not running and stops
    it at shutdown. `default_max_tokens` is a chat completion's length when the request sets
    none (a text completion's is 16, as OpenAI's). Prometheus metrics go to a registry of the
    app's own (``app.state.registry``), so several apps can live in one process."""
    if served_names is None:
        names = {v: v for v in engine.variants}
    elif isinstance(served_names, Mapping):
        names = dict(served_names)
    else:
        names = {v: v for v in served_names}
    unknown = sorted(set(names.values()) - set(engine.variants))
    if unknown:
        raise ValueError(f"served names point at variants the engine lacks: {', '.join(unknown)}")
    service = _Service(engine, tokenizer, names, default_max_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        started = manage_engine and not engine.alive
        if started:
            engine.start()
        try:
            yield
        finally:
            if started:
                await asyncio.to_thread(engine.close)

    routes = [
        Route("/v1/models", service.models, methods=["GET"]),
        Route("/v1/chat/completions", service.chat, methods=["POST"]),
        Route("/v1/completions", service.completions, methods=["POST"]),
        Route("/health", service.health, methods=["GET"]),
        Route("/ready", service.ready, methods=["GET"]),
        Route("/metrics", service.metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.registry = service.registry
    app.state.engine = engine
    return app
