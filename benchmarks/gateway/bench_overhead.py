"""The gateway's overhead against direct access (issue 6 goal), printed beside the measured
figures.

Setup: one simulated backend (:mod:`datahall.gateway.simulate`) with near-zero service time
(no prefill or decode time, no queue: ``max_running`` 4096, a 4-token answer) in a process of
its own; the gateway (``create_app`` under uvicorn, round-robin policy, cache off, no
transforms, no API keys or limits: the bare proxy path, ORCA parsing included) in a second
process; the load generator (:mod:`.loadgen`, asyncio + httpx) in this process. All three share
this machine's cores, as a gateway shares a host with its clients in any loopback test.

For each number of concurrent clients (1, 4, 16, 64, 100, 256) a closed loop sends the same
non-streamed chat request (each client sends its next request when its last is answered) once
directly to the backend and once through the gateway, twice over in alternation (direct,
gateway, direct, gateway) so that drift on a shared machine hits both alike; the samples of the
two rounds are pooled. The added latency at a percentile is the gateway's latency minus the
direct one at that percentile. Each run is bounded by ``REQUESTS(c)`` requests and
``RUN_LIMIT_S`` seconds, after one unrecorded warm-up request per client.

A closed loop keeps every client busy, so at high concurrency each run saturates its slowest
stage and latency is mostly queueing there (Little's law: latency = clients / throughput); the
table therefore also shows each path's throughput and the gateway process's CPU time per
request (its ``process_time`` over the run, divided by the requests, warm-up included), the
cost behind the added latency. The load generator runs on uvloop when it is installed, and
gives each client a connection of its own (see :class:`.loadgen.ClientPool`), so that it stays
the cheaper side of the comparison.

Streaming: the same comparison for streamed requests (8 tokens, no inter-token delay) at 1, 16
and 100 clients gives the added time to first token.
"""

from __future__ import annotations

import math
import time
from typing import Any

from datahall.core.report import print_table

from ..goals import Goal, report
from .loadgen import Result, chat_request, closed_loop, run
from .servers import Child, backends_process, gateway_process, gateway_yaml

LEVELS = (1, 4, 16, 64, 100, 256)
STREAM_LEVELS = (1, 16, 100)
GOAL_LEVEL = 100
ROUNDS = 2
RUN_LIMIT_S = 4.0
BACKEND = {
    "ttft_base_s": 0.0,
    "prefill_s_per_token": 0.0,
    "itl_s": 0.0,
    "max_running": 4096,
    "kv_blocks": 0,  # no prefix-cache bookkeeping: the backend should cost next to nothing
    "default_max_tokens": 4,
}


def requests_for(concurrency: int) -> int:
    """Requests per run: enough for a p99 at every level, bounded by RUN_LIMIT_S anyway."""
    return max(400, 8 * concurrency)


def _run(url: str, concurrency: int, stream: bool) -> Result:
    spec = chat_request("Say hello to the benchmark.", max_tokens=8 if stream else 4, stream=stream)
    return run(
        closed_loop(
            url,
            lambda i: spec,
            concurrency,
            count=requests_for(concurrency),
            duration_s=RUN_LIMIT_S,
            warmup=1,
        )
    )


def _pooled(results: list[Result]) -> Result:
    return Result(
        [s for r in results for s in r.samples],
        sum(r.wall_s for r in results),
        sum(r.offered for r in results),
    )


def _measure(
    direct_url: str, gateway: Child, backend: Child, concurrency: int, stream: bool
) -> dict[str, Any]:
    """Both paths at one concurrency, ROUNDS times in alternation; the pooled figures."""
    direct, through = [], []
    gw_cpu = be_cpu = 0.0
    gw_requests = 0
    for _ in range(ROUNDS):
        direct.append(_run(direct_url, concurrency, stream))
        cpu0, bcpu0 = gateway.cpu_s(), backend.cpu_s()
        through.append(_run(gateway.urls[0], concurrency, stream))
        gw_cpu += gateway.cpu_s() - cpu0
        be_cpu += backend.cpu_s() - bcpu0
        gw_requests += len(through[-1].samples) + concurrency  # + the warm-up requests
    d, g = _pooled(direct), _pooled(through)
    if d.errors or g.errors:
        bad = next(s for s in (d.samples + g.samples) if not s.ok)
        raise RuntimeError(
            f"{d.errors + g.errors} requests failed at {concurrency} clients "
            f"(first: {bad.error or bad.status})"
        )
    row: dict[str, Any] = {
        "clients": concurrency,
        "stream": stream,
        "requests": [len(d.samples), len(g.samples)],
        "direct_rps": d.throughput(),
        "gateway_rps": g.throughput(),
        "gateway_cpu_ms_per_request": 1e3 * gw_cpu / gw_requests,
        "backend_cpu_ms_per_request": 1e3 * be_cpu / gw_requests,
    }
    metric = Result.ttft if stream else Result.e2e
    for q in (50, 99):
        row[f"direct_p{q}_ms"] = 1e3 * metric(d, q)
        row[f"gateway_p{q}_ms"] = 1e3 * metric(g, q)
        row[f"added_p{q}_ms"] = row[f"gateway_p{q}_ms"] - row[f"direct_p{q}_ms"]
    return row


def _ms(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2f}"


def main() -> None:
    rows: list[dict[str, Any]] = []
    with backends_process([BACKEND]) as backend:
        config = gateway_yaml(backend.urls, policy="round-robin")
        with gateway_process(config) as gateway:
            for c in LEVELS:
                start = time.perf_counter()
                rows.append(_measure(backend.urls[0], gateway, backend, c, stream=False))
                rows[-1]["seconds"] = time.perf_counter() - start
            for c in STREAM_LEVELS:
                start = time.perf_counter()
                rows.append(_measure(backend.urls[0], gateway, backend, c, stream=True))
                rows[-1]["seconds"] = time.perf_counter() - start
    print_table(
        "gateway: overhead vs direct, closed loop, near-zero backend "
        f"(pooled over {ROUNDS} alternating rounds)",
        [
            "clients",
            "kind",
            "direct p50/p99 ms",
            "gateway p50/p99 ms",
            "added p50 ms",
            "added p99 ms",
            "direct / gateway req/s",
            "gateway CPU ms/req",
        ],
        [
            [
                r["clients"],
                "stream TTFT" if r["stream"] else "whole",
                f"{_ms(r['direct_p50_ms'])} / {_ms(r['direct_p99_ms'])}",
                f"{_ms(r['gateway_p50_ms'])} / {_ms(r['gateway_p99_ms'])}",
                _ms(r["added_p50_ms"]),
                _ms(r["added_p99_ms"]),
                f"{r['direct_rps']:.0f} / {r['gateway_rps']:.0f}",
                f"{r['gateway_cpu_ms_per_request']:.2f}",
            ]
            for r in rows
        ],
    )
    at = next(r for r in rows if r["clients"] == GOAL_LEVEL and not r["stream"])
    one = next(r for r in rows if r["clients"] == 1 and not r["stream"])
    goals = [
        Goal(
            f"added p50 latency, {GOAL_LEVEL} concurrent non-streaming (vs direct p50)",
            "<= 1 ms",
            at["added_p50_ms"],
            "ms",
            at["added_p50_ms"] <= 1.0,
            baseline=at["direct_p50_ms"],
        ),
        Goal(
            f"added p99 latency, {GOAL_LEVEL} concurrent non-streaming (vs direct p99)",
            "<= 5 ms",
            at["added_p99_ms"],
            "ms",
            at["added_p99_ms"] <= 5.0,
            baseline=at["direct_p99_ms"],
        ),
        Goal(
            "added p50 latency, 1 client (context: no queueing)",
            "<= 1 ms",
            one["added_p50_ms"],
            "ms",
            one["added_p50_ms"] <= 1.0,
            baseline=one["direct_p50_ms"],
        ),
    ]
    report("gateway", "overhead", goals, {"levels": rows, "backend": BACKEND})


if __name__ == "__main__":
    main()
