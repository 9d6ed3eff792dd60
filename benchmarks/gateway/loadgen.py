"""The gateway benchmarks' load generator: asyncio + httpx, loopback only, always bounded.

The brief (``ai-gateway.md`` §6) asks for a load generator of our own that measures what an LLM
client feels: for a streamed answer the time to first token (TTFT, to the first server-sent
event that carries text), the inter-token latencies (ITL, the gaps between such events) and the
end-to-end time to ``[DONE]``; for a whole answer the end-to-end time. Two arrival processes:

- :func:`closed_loop`: `concurrency` clients, each sending its next request as soon as its
  last one is answered (a saturating load when `concurrency` is high);
- :func:`open_loop`: requests arrive as a Poisson process of `rate` per second, whatever the
  server's state (an open loop, so a slow server builds a queue instead of slowing the load).

Both stop at `count` requests or after `duration_s`, whichever comes first, and an open loop
waits at most `drain_s` for the last answers (brief §7.8: bounded request counts and durations).
Requests go only to loopback addresses, to servers the benchmark itself started.

Times are ``time.perf_counter`` seconds; each :class:`Sample` keeps its start relative to the
run's start, so a benchmark can drop a warm-up period (:meth:`Result.after`).

>>> spec = chat_request("Hello", max_tokens=4, stream=True)
>>> spec.path, spec.stream, spec.content[:10]
('/v1/chat/completions', True, b'{"model": ')
>>> percentile([1.0, 2.0, 3.0, 4.0], 50)
2.5
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import random
import ssl
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

__all__ = [
    "RequestSpec",
    "Result",
    "Sample",
    "chat_request",
    "check_loopback",
    "closed_loop",
    "ClientPool",
    "make_client",
    "open_loop",
    "percentile",
    "run",
    "send",
]

T = TypeVar("T")

KEPT_HEADERS = ("x-cache", "x-cache-similarity", "x-gateway-backend", "x-sim-backend")
"""Response headers a sample keeps (cache outcome, which backend answered)."""


@dataclass(frozen=True)
class RequestSpec:
    """One request: the API path, the JSON body (serialised once, here), extra headers, and a
    `tag` that groups samples in the results."""

    path: str
    body: Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)
    tag: str = ""
    content: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # serialised once: the load generator's CPU is not what a benchmark measures
        object.__setattr__(self, "content", json.dumps(self.body).encode())

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True


def chat_request(
    user: str,
    *,
    system: str | None = None,
    model: str = "sim-llm",
    max_tokens: int = 16,
    stream: bool = False,
    tag: str = "",
    **fields: Any,
) -> RequestSpec:
    """A ``/v1/chat/completions`` request; a stream asks for the usage chunk, so that the
    sample records the backend's prompt, cached and completion tokens."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    body.update(fields)
    return RequestSpec("/v1/chat/completions", body, tag=tag)


@dataclass
class Sample:
    """What one request measured. `status` 0 is a transport error (`error` says which).
    `ttft` and `itl` exist for streams only; `e2e` is from sending to the last byte."""

    tag: str
    start: float
    status: int
    e2e: float
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    usage: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def end(self) -> float:
        return self.start + self.e2e


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile with linear interpolation (numpy's default); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Result:
    """The samples of one run and its wall time (from the first send to the last answer)."""

    samples: list[Sample]
    wall_s: float
    offered: int = 0
    """Requests started (including any cut off at the end of an open loop)."""

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.ok]

    @property
    def errors(self) -> int:
        return len(self.samples) - len(self.ok)

    def after(self, t: float) -> Result:
        """The samples that started at `t` seconds into the run or later (drops a warm-up)."""
        kept = [s for s in self.samples if s.start >= t]
        return Result(kept, max(0.0, self.wall_s - t), len(kept))

    def e2e(self, q: float) -> float:
        return percentile([s.e2e for s in self.ok], q)

    def ttft(self, q: float) -> float:
        return percentile([s.ttft for s in self.ok if s.ttft is not None], q)

    def itl(self, q: float) -> float:
        return percentile([g for s in self.ok for g in s.itl], q)

    def throughput(self, start: float = 0.0, end: float | None = None) -> float:
        """Answers completed per second in the window [start, end] of the run (default: the
        whole run)."""
        end = self.wall_s if end is None else end
        if end <= start:
            return math.nan
        done = sum(1 for s in self.ok if start <= s.end <= end)
        return done / (end - start)

    def tokens_per_s(self, start: float = 0.0, end: float | None = None) -> float:
        """Completion tokens (from ``usage``, else counted events) per second in the window."""
        end = self.wall_s if end is None else end
        if end <= start:
            return math.nan
        tokens = sum(_completion_tokens(s) for s in self.ok if start <= s.end <= end)
        return tokens / (end - start)

    def cached_token_share(self) -> float:
        """Prompt tokens the backends served from their prefix cache, over all prompt tokens
        (vLLM's ``prefix_cache_hits / prefix_cache_queries``), from the answers' ``usage``."""
        prompt = cached = 0
        for s in self.ok:
            if s.usage:
                prompt += s.usage.get("prompt_tokens") or 0
                details = s.usage.get("prompt_tokens_details") or {}
                cached += details.get("cached_tokens") or 0
        return cached / prompt if prompt else math.nan

    def summary(self) -> dict[str, Any]:
        """The run's figures as plain data (seconds), for the JSON results."""
        out: dict[str, Any] = {
            "requests": len(self.samples),
            "errors": self.errors,
            "wall_s": self.wall_s,
            "throughput_rps": self.throughput(),
        }
        for q in (50, 90, 99):
            out[f"e2e_p{q}_s"] = self.e2e(q)
        if any(s.ttft is not None for s in self.ok):
            for q in (50, 90, 99):
                out[f"ttft_p{q}_s"] = self.ttft(q)
            out["itl_p50_s"], out["itl_p99_s"] = self.itl(50), self.itl(99)
        first_error = next((s.error or f"HTTP {s.status}" for s in self.samples if not s.ok), None)
        if first_error:
            out["first_error"] = first_error
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def _completion_tokens(s: Sample) -> int:
    if s.usage and isinstance(s.usage.get("completion_tokens"), int):
        return s.usage["completion_tokens"]
    return s.tokens


def check_loopback(url: str) -> str:
    """`url` without a trailing slash, if its host is a loopback address; else ValueError.
    The benchmarks load only servers they started themselves (brief §7.8)."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"the load generator targets only loopback servers that the benchmark starts, "
            f"not {url!r}"
        )
    return url.rstrip("/")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a load coroutine to completion on a fresh event loop: uvloop's when installed (the
    gateway's extra brings it with ``uvicorn[standard]``), since every CPU cycle the load
    generator saves is left to the servers it shares the machine with."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


_SSL: ssl.SSLContext | None = None


def make_client(connections: int = 1) -> httpx.AsyncClient:
    """An HTTP/1.1 client with up to `connections` kept-alive connections, no proxy from the
    environment, and no timeout short enough to cut a slow answer of a bounded run."""
    global _SSL
    if _SSL is None:  # one context for all clients: building one costs ~20 ms
        _SSL = ssl.create_default_context()
    return httpx.AsyncClient(
        limits=httpx.Limits(
            max_connections=connections,
            max_keepalive_connections=connections,
            keepalive_expiry=60.0,
        ),
        timeout=httpx.Timeout(120.0, connect=10.0),
        trust_env=False,
        verify=_SSL,
    )


class ClientPool:
    """Single-connection clients, one per request in flight, reused once free.

    Why not one client with a large pool: httpcore's pool matches every queued request with
    every connection on each request, so at a few hundred requests in flight the load
    generator itself becomes the bottleneck (measured: a direct closed loop fell from ~1,200 to
    ~100 requests/s between 4 and 64 clients). A client per request in flight is also what N
    independent users are: N connections."""

    def __init__(self) -> None:
        self.idle: list[httpx.AsyncClient] = []
        self.all: list[httpx.AsyncClient] = []

    def acquire(self) -> httpx.AsyncClient:
        if self.idle:
            return self.idle.pop()
        client = make_client(1)
        self.all.append(client)
        return client

    def release(self, client: httpx.AsyncClient) -> None:
        self.idle.append(client)

    async def send(self, base_url: str, spec: RequestSpec, t0: float) -> Sample:
        client = self.acquire()
        try:
            return await send(client, base_url, spec, t0)
        finally:
            self.release(client)

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.all), return_exceptions=True)
        self.all.clear()
        self.idle.clear()


_JSON_HEADERS = {"content-type": "application/json"}


async def send(client: httpx.AsyncClient, base_url: str, spec: RequestSpec, t0: float) -> Sample:
    """Send `spec` to `base_url` and measure it; never raises for an HTTP failure (the sample
    carries the status or the transport error). `t0` is the run's start."""
    url = base_url + spec.path
    headers = {**_JSON_HEADERS, **spec.headers} if spec.headers else _JSON_HEADERS
    start = time.perf_counter()
    sample = Sample(spec.tag, start - t0, 0, 0.0)
    try:
        if spec.stream:
            async with client.stream("POST", url, content=spec.content, headers=headers) as r:
                sample.status = r.status_code
                sample.headers = {h: r.headers[h] for h in KEPT_HEADERS if h in r.headers}
                if r.status_code != 200:
                    sample.error = (await r.aread()).decode("utf-8", "replace")[:300]
                else:
                    await _read_stream(r, sample, start)
        else:
            r = await client.post(url, content=spec.content, headers=headers)
            sample.status = r.status_code
            sample.headers = {h: r.headers[h] for h in KEPT_HEADERS if h in r.headers}
            if r.status_code != 200:
                sample.error = r.text[:300]
            else:
                body = r.json()
                sample.usage = body.get("usage")
    except (httpx.HTTPError, ValueError) as e:
        sample.error = f"{type(e).__name__}: {e}"
    sample.e2e = time.perf_counter() - start
    return sample


async def _read_stream(r: httpx.Response, sample: Sample, start: float) -> None:
    """Read an SSE answer: TTFT at the first event with text, ITL between such events."""
    buffer = b""
    last: float | None = None
    done = False
    async for chunk in r.aiter_bytes():
        now = time.perf_counter()  # every event in this chunk arrived now
        buffer += chunk
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            data = event.removeprefix(b"data:").strip()
            if data == b"[DONE]":
                done = True
                continue
            if not data:
                continue
            obj = json.loads(data)
            if "error" in obj:
                sample.error = f"error event: {obj['error']}"
                continue
            if obj.get("usage"):
                sample.usage = obj["usage"]
            for choice in obj.get("choices") or ():
                text = (choice.get("delta") or {}).get("content") or choice.get("text")
                if text:
                    sample.tokens += 1
                    if last is None:
                        sample.ttft = now - start
                    else:
                        sample.itl.append(now - last)
                    last = now
    if not done and sample.error is None:
        sample.error = "the stream ended without [DONE]"


async def closed_loop(
    base_url: str,
    make: Callable[[int], RequestSpec],
    concurrency: int,
    *,
    count: int | None = None,
    duration_s: float | None = None,
    warmup: int = 0,
) -> Result:
    """`concurrency` clients, each with its own connection, sending ``make(i)`` (i = 0, 1, ...
    across all clients) as soon as its previous answer is in, until `count` requests were sent
    or `duration_s` passed. Each client first sends `warmup` requests that are not recorded
    (``make`` gets negative indices for them): they open the connections."""
    if count is None and duration_s is None:
        raise ValueError("give count or duration_s: a load run must be bounded")
    base_url = check_loopback(base_url)
    clients = [make_client(1) for _ in range(concurrency)]
    try:
        t = time.perf_counter()
        for w in range(warmup):
            await asyncio.gather(
                *(
                    send(c, base_url, make(-1 - w * concurrency - i), t)
                    for i, c in enumerate(clients)
                )
            )
        samples: list[Sample] = []
        issued = 0
        t0 = time.perf_counter()
        deadline = math.inf if duration_s is None else t0 + duration_s
        limit = math.inf if count is None else count

        async def worker(client: httpx.AsyncClient) -> None:
            nonlocal issued
            while issued < limit and time.perf_counter() < deadline:
                i = issued
                issued += 1
                samples.append(await send(client, base_url, make(i), t0))

        await asyncio.gather(*(worker(c) for c in clients))
        return Result(samples, time.perf_counter() - t0, issued)
    finally:
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)


async def open_loop(
    base_url: str,
    make: Callable[[int], RequestSpec],
    rate: float,
    *,
    count: int | None = None,
    duration_s: float | None = None,
    drain_s: float = 60.0,
    seed: int = 0,
    pool: ClientPool | None = None,
) -> Result:
    """Poisson arrivals at `rate` requests per second (exponential gaps from a generator
    seeded with `seed`, on an absolute schedule so that a late wake-up does not thin the
    load) until `count` requests or `duration_s`; then waits up to `drain_s` for the answers
    still open, and records the ones it had to cut as errors. Each request in flight has a
    connection of its own (:class:`ClientPool`; pass one to keep its connections open across
    runs)."""
    if count is None and duration_s is None:
        raise ValueError("give count or duration_s: a load run must be bounded")
    if not rate > 0:
        raise ValueError(f"rate must be positive, not {rate}")
    base_url = check_loopback(base_url)
    own = pool is None
    pool = pool or ClientPool()
    rng = random.Random(seed)
    tasks: list[asyncio.Task[Sample]] = []
    try:
        t0 = time.perf_counter()
        end = math.inf if duration_s is None else t0 + duration_s
        limit = math.inf if count is None else count
        at = t0
        while len(tasks) < limit:
            at += rng.expovariate(rate)
            if at > end:
                break
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(pool.send(base_url, make(len(tasks)), t0)))
        if tasks:
            await asyncio.wait(tasks, timeout=drain_s)
        samples = []
        for i, task in enumerate(tasks):
            if task.done():
                samples.append(task.result())
            else:
                task.cancel()
                tag = make(i).tag
                samples.append(Sample(tag, 0.0, 0, math.nan, error="cut: not answered in drain_s"))
        return Result(samples, time.perf_counter() - t0, len(tasks))
    finally:
        for task in tasks:
            task.cancel()
        if own:
            await pool.aclose()
