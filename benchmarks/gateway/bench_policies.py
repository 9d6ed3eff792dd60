"""Routing policies over unequal backends (issue 6 goals), printed beside the measured figures.

Setup: four simulated backends (:mod:`datahall.gateway.simulate`) of speeds 1, 1, 0.5 and
0.25 in one process, the gateway in another (one routing policy per run), the load generator
(:mod:`.loadgen`) in this process. Each policy gets fresh processes, so no backend starts with
another run's prefix cache and no router with another run's state.

The simulator's timing model, scaled so that one policy takes about 40 s (times are divided by
the backend's speed; tokens ≈ characters / 4):

- time to first token = 10 ms + 0.25 ms per uncached prompt token: a 1,024-token system
  prompt costs 0.27 s to prefill at speed 1 and 1.08 s at speed 0.25, and ~15-60 ms when its
  blocks are in the backend's prefix cache;
- then one token every 5 ms; at most 4 requests run at once per backend, the rest wait;
- a prefix cache of ``KV_BLOCKS`` = 512 blocks of 16 tokens, LRU: about seven of the 64-block
  system prompts fit in one backend, so it can keep the prompts of a quarter of the groups but
  not of all of them. (The same capacity is the simulator's 100% KV usage; four running
  requests hold about half of it, under the router's 0.8 saturation mark.)

Workload A, **shared prefix** (TTFT and hit rate): ``GROUPS`` = 24 groups, each with its own
~1,024-token system prompt, and short distinct questions (16-token answers, streamed); a
question's group is drawn uniformly; arrivals are Poisson at ``RATE`` = 8 per second for
``DURATION_S`` = 25 s. TTFT is measured by the client, to the first token, over the requests
that arrive after ``A_WARMUP_S`` = 5 s: a run this short would otherwise be dominated by the
first request of each group, a miss under every policy (the whole-run p90 is in the results
too). The hit rate, over the same requests, is the share of prompt tokens the backends served
from their prefix cache (vLLM's ``prefix_cache_hits / prefix_cache_queries``), from the
answers' ``usage``. Round robin spreads
every group over all four backends, so each backend keeps evicting prompts it will need again;
prefix affinity keeps each group's prompt on one backend, behind a load gate.

Workload B, **throughput with unequal backends**: right after A, on the same processes (so the
ORCA weights are past gRFC A58's 10 s blackout), a closed loop of ``CLIENTS`` = 12 clients
sends distinct short prompts (25 tokens in, 32 out, whole answers) for ``B_DURATION_S`` = 15 s;
throughput counts the answers of the last 10 s. Twelve clients are three quarters of the
fleet's 16 slots: round robin sends a quarter of them to the speed-0.25 backend, which then
paces everything, while a load-aware policy can keep the fast ones busy. (With many more
clients the slow backend's queue passes the router's saturation mark, GIE's 5 waiting, and the
router then skips it under every policy, round robin included.)
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from typing import Any

from datahall.core.report import print_table

from ..goals import Goal, report
from .loadgen import RequestSpec, Result, chat_request, closed_loop, open_loop, run
from .servers import backends_process, gateway_process, gateway_yaml

POLICIES = ("round-robin", "least-request", "p2c", "orca-wrr", "kv-aware", "prefix-load")
SPEEDS = (1.0, 1.0, 0.5, 0.25)
KV_BLOCKS = 512
SIM = {
    "ttft_base_s": 0.01,
    "prefill_s_per_token": 0.00025,
    "itl_s": 0.005,
    "max_running": 4,
    "kv_blocks": KV_BLOCKS,
}
GROUPS = 24
SYSTEM_CHARS = 4096  # ~1,024 tokens: 64 blocks of 64 characters
RATE = 8.0
DURATION_S = 25.0
A_WARMUP_S = 5.0
ANSWER_TOKENS = 16
CLIENTS = 12
B_DURATION_S = 15.0
B_WARMUP_S = 5.0
B_ANSWER_TOKENS = 32
SEED = 6

# fmt: off
_WORDS = (
    "account", "policy", "refund", "order", "shipping", "warranty", "invoice", "customer",
    "support", "ticket", "escalation", "priority", "response", "window", "region", "carrier",
    "return", "label", "credit", "balance", "statement", "device", "firmware", "update",
    "reset", "password", "session", "token", "audit", "record", "privacy", "consent",
)
# fmt: on


def system_prompts(groups: int = GROUPS, chars: int = SYSTEM_CHARS) -> list[str]:
    """One long system prompt per group, distinct from their first block on (the group's
    name comes first), seeded so that every run and policy sees the same texts."""
    rng = random.Random(SEED)
    prompts = []
    for g in range(groups):
        words = [f"You are the assistant of team {g:02d}. Follow its handbook:"]
        size = len(words[0])
        while size < chars:
            word = rng.choice(_WORDS)
            words.append(word)
            size += len(word) + 1
        prompts.append(" ".join(words)[:chars])
    return prompts


def shared_prefix_workload(count: int) -> list[RequestSpec]:
    """Workload A's requests, in arrival order: a uniformly drawn group's system prompt and a
    short distinct question."""
    prompts = system_prompts()
    rng = random.Random(SEED + 1)
    specs = []
    for i in range(count):
        g = rng.randrange(len(prompts))
        question = f"Question {i}: what does the handbook say about {rng.choice(_WORDS)}?"
        specs.append(
            chat_request(
                question, system=prompts[g], max_tokens=ANSWER_TOKENS, stream=True, tag=f"g{g}"
            )
        )
    return specs


def throughput_request(i: int) -> RequestSpec:
    """Workload B's request `i`: a distinct ~100-character prompt, a 32-token whole answer."""
    return chat_request(
        f"Request {i:06d}: summarise the {_WORDS[i % len(_WORDS)]} policy in one line.",
        max_tokens=B_ANSWER_TOKENS,
    )


def _shares(result: Result, names: list[str]) -> list[float]:
    counts = Counter(s.headers.get("x-gateway-backend") for s in result.ok)
    total = sum(counts.values()) or 1
    return [counts.get(n, 0) / total for n in names]


def run_policy(policy: str) -> dict[str, Any]:
    """Both workloads through a fresh gateway with `policy` over fresh backends."""
    configs = [{**SIM, "speed": s, "name": f"speed-{s:g}"} for s in SPEEDS]
    specs = shared_prefix_workload(int(RATE * DURATION_S * 2))  # more than the run can use
    with backends_process(configs) as backends:
        names = [f"sim-{i}" for i in range(len(SPEEDS))]
        with gateway_process(gateway_yaml(backends.urls, policy=policy)) as gateway:
            url = gateway.urls[0]
            start = time.perf_counter()
            a = run(
                open_loop(
                    url,
                    specs.__getitem__,
                    RATE,
                    count=len(specs),
                    duration_s=DURATION_S,
                    drain_s=30,
                    seed=SEED,
                )
            )
            a_s = time.perf_counter() - start
            b = run(
                closed_loop(url, throughput_request, CLIENTS, duration_s=B_DURATION_S, warmup=0)
            )
            stats = backends.stats()
    steady = a.after(A_WARMUP_S)
    if a.errors or b.errors:
        bad = next(s for s in a.samples + b.samples if not s.ok)
        raise RuntimeError(
            f"{policy}: {a.errors + b.errors} requests failed (first: {bad.error or bad.status})"
        )
    return {
        "policy": policy,
        "a_requests": len(a.samples),
        "a_measured": len(steady.samples),
        "a_seconds": a_s,
        "ttft_p50_s": steady.ttft(50),
        "ttft_p90_s": steady.ttft(90),
        "ttft_p99_s": steady.ttft(99),
        "ttft_p90_whole_run_s": a.ttft(90),
        "a_e2e_p90_s": steady.e2e(90),
        "a_throughput_rps": len(a.ok) / a.wall_s,
        "hit_rate": steady.cached_token_share(),
        "hit_rate_whole_run": a.cached_token_share(),
        "a_shares": _shares(a, names),
        "b_requests": len(b.samples),
        "b_throughput_rps": b.throughput(B_WARMUP_S, B_DURATION_S),
        "b_tokens_per_s": b.tokens_per_s(B_WARMUP_S, B_DURATION_S),
        "b_e2e_p50_s": b.after(B_WARMUP_S).e2e(50),
        "b_shares": _shares(b.after(B_WARMUP_S), names),
        "backend_requests": [s["requests"] for s in stats],
    }


def _pct(shares: list[float]) -> str:
    return " ".join(f"{100 * x:.0f}" for x in shares)


def main() -> None:
    rows = []
    for policy in POLICIES:
        start = time.perf_counter()
        rows.append(run_policy(policy))
        rows[-1]["seconds"] = time.perf_counter() - start
    print_table(
        f"gateway: policies over backends of speed {', '.join(f'{s:g}' for s in SPEEDS)} "
        f"(A: {GROUPS} groups x {SYSTEM_CHARS // 4}-token system prompt, Poisson {RATE:g}/s "
        f"for {DURATION_S:g} s, measured after {A_WARMUP_S:g} s; B: closed loop of {CLIENTS}, last "
        f"{B_DURATION_S - B_WARMUP_S:g} s)",
        [
            "policy",
            "A TTFT p50",
            "A TTFT p90",
            "A p90 all",
            "A hits",
            "A % by speed",
            "B req/s",
            "B e2e p50",
            "B % by speed",
        ],
        [
            [
                r["policy"],
                f"{r['ttft_p50_s']:.3f} s",
                f"{r['ttft_p90_s']:.3f} s",
                f"{r['ttft_p90_whole_run_s']:.3f} s",
                f"{100 * r['hit_rate']:.0f}%",
                _pct(r["a_shares"]),
                f"{r['b_throughput_rps']:.1f}",
                f"{r['b_e2e_p50_s']:.3f} s",
                _pct(r["b_shares"]),
            ]
            for r in rows
        ],
    )
    by = {r["policy"]: r for r in rows}
    rr, pl, wrr = by["round-robin"], by["prefix-load"], by["orca-wrr"]
    speedup = rr["ttft_p90_s"] / pl["ttft_p90_s"] if pl["ttft_p90_s"] > 0 else math.inf
    gain = wrr["b_throughput_rps"] / rr["b_throughput_rps"]
    goals = [
        Goal(
            "prefix-load (prefix affinity + load gate) TTFT p90 vs round robin",
            ">= 3x better",
            pl["ttft_p90_s"],
            "s",
            speedup >= 3.0,
            baseline=rr["ttft_p90_s"],
        ),
        Goal(
            "orca-wrr throughput vs round robin, unequal backends (closed loop)",
            ">= 1.3x",
            wrr["b_throughput_rps"],
            "req/s",
            gain >= 1.3,
            baseline=rr["b_throughput_rps"],
        ),
    ]
    report(
        "gateway",
        "policies",
        goals,
        {
            "speeds": SPEEDS,
            "sim": SIM,
            "workload_a": {"groups": GROUPS, "system_chars": SYSTEM_CHARS, "rate": RATE},
            "workload_b": {"clients": CLIENTS, "duration_s": B_DURATION_S},
            "policies": rows,
        },
    )


if __name__ == "__main__":
    main()
