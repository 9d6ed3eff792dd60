"""The tour's gateway demo: four simulated model servers of unequal speed behind the gateway,
the same shared-prefix traffic routed round-robin and by prefix affinity under a load gate, then
the semantic cache answering a paraphrase and refusing a polarity flip.

The traffic is what prefix-aware routing is for (brief §2.3): a few groups of clients, each with
a long system prompt of its own, asking short questions. Round robin spreads every group over
every server, so each server prefills every prompt; the ``prefix-load`` policy keeps a group on
the servers that hold its prefix until the load gate moves it. Reported: TTFT p50/p90 as the
client sees it, and the prefix-cache hits the servers counted.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from pathlib import Path

import httpx
from rich.progress import Progress

from ..core.http import serve_in_thread
from ..core.report import DemoResult, new_figure, save_figure, write_json
from .config import parse_config
from .server import create_app
from .simulate import serve_backends

SPEEDS = (1.0, 1.0, 0.5, 0.25)
GROUPS = 6
REQUESTS = 60
CONCURRENCY = 6
POLICIES = ("round-robin", "prefix-load")
SIM = {
    "models": ["smollm2"],
    "max_running": 4,
    "ttft_base_s": 0.005,
    "prefill_s_per_token": 0.0002,  # a 1,500-token system prompt: 0.3 s to prefill at speed 1
    "itl_s": 0.002,
    "default_max_tokens": 8,
    "response_tokens": 6,  # answers end with "stop" before max_tokens: complete, so cacheable
    "kv_blocks": 2048,
}


def _config(urls: list[str], policy: str, *, cache: bool) -> str:
    backends = "\n".join(
        f"  - {{name: sim-{i}, url: '{url}', models: [smollm2]}}" for i, url in enumerate(urls)
    )
    return (
        f"backends:\n{backends}\n"
        f"routing: {{policy: {policy}}}\n"
        f"semantic_cache: {{enabled: {str(cache).lower()}, min_cosine_similarity: 0.85}}\n"
        "health_checks: {enabled: false}\n"
    )


def _traffic(seed: int = 0) -> list[dict]:
    """`REQUESTS` chat requests: `GROUPS` long system prompts, a short question each."""
    rng = random.Random(seed)
    words = [
        "route",
        "cache",
        "fabric",
        "queue",
        "token",
        "prefix",
        "model",
        "tenant",
        "policy",
        "backend",
    ]
    systems = [
        f"You are agent {g} of team {g * 7}. " + " ".join(rng.choices(words, k=1200))
        for g in range(GROUPS)
    ]
    return [
        {
            "model": "smollm2",
            "messages": [
                {"role": "system", "content": systems[rng.randrange(GROUPS)]},
                {"role": "user", "content": f"Question {i}: which {rng.choice(words)}?"},
            ],
            "max_tokens": 8,
            "stream": True,
        }
        for i in range(REQUESTS)
    ]


async def _replay(url: str, bodies: list[dict], progress, task) -> list[float]:
    """Send `bodies` with `CONCURRENCY` clients; each request's TTFT (first streamed byte of
    content) as the client sees it."""
    queue = list(enumerate(bodies))
    ttfts: list[float] = [0.0] * len(bodies)

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            i, body = queue.pop(0)
            start = time.perf_counter()
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():  # read to the end: the answer completes
                    if not ttfts[i] and line.startswith("data: {") and _content(line[6:]):
                        ttfts[i] = time.perf_counter() - start
            progress.advance(task)

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(CONCURRENCY)))
    return ttfts


def _content(data: str) -> bool:
    """Whether an SSE chunk carries answer text (not the opening role chunk)."""
    return any(c.get("delta", {}).get("content") for c in json.loads(data).get("choices", ()))


def _semantic(url: str) -> dict:
    """Ask, ask a paraphrase, ask the opposite: the cache's answer to each."""
    asks = {
        "first": "How do I turn on dark mode in the settings?",
        "paraphrase": "How can I turn on dark mode in settings?",
        "opposite": "How do I turn off dark mode in the settings?",
    }
    out = {}
    with httpx.Client(base_url=url, timeout=60) as http:
        for name, text in asks.items():
            body = {
                "model": "smollm2",
                "messages": [{"role": "user", "content": text}],
                "temperature": 0,
                "max_tokens": 8,
            }
            r = http.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            out[name] = {
                "prompt": text,
                "x-cache": r.headers.get("x-cache"),
                "similarity": r.headers.get("x-cache-similarity"),
            }
    return out


def run(out_dir: Path, progress: Progress) -> DemoResult:
    task = progress.add_task("gateway: 4 simulated servers", total=len(POLICIES) * REQUESTS + 1)
    bodies = _traffic()
    results: dict[str, dict] = {}
    for policy in POLICIES:
        # fresh servers per policy: no prefix cached by the previous run
        with serve_backends([dict(SIM, speed=s) for s in SPEEDS]) as sims:
            config = parse_config(_config([s.url for s in sims], policy, cache=False))
            with serve_in_thread(create_app(config)) as url:
                ttfts = asyncio.run(_replay(url, bodies, progress, task))
            hits = sum(s.sim.stats().prefix_cache_hits for s in sims)
            queried = sum(s.sim.stats().prefix_cache_queries for s in sims)
        q = statistics.quantiles(ttfts, n=10)
        results[policy] = {
            "ttft_p50_s": statistics.median(ttfts),
            "ttft_p90_s": q[8],
            "prefix_hit_rate": hits / queried if queried else 0.0,
            "ttfts_s": ttfts,
        }
    semantic = None
    try:
        with serve_backends([dict(SIM, speed=1.0)]) as sims:
            config = parse_config(_config([sims[0].url], "round-robin", cache=True))
            with serve_in_thread(create_app(config)) as url:
                semantic = _semantic(url)
    except ValueError as e:  # the embedder's package is not installed: skip that part
        semantic = {"skipped": str(e)}
    progress.advance(task)

    fig, ax = new_figure(7, 3.2)
    for policy in POLICIES:
        ax.ecdf([t * 1e3 for t in results[policy]["ttfts_s"]], label=policy)
    ax.set_xlabel("TTFT (ms), as the client sees it")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{GROUPS} shared system prompts over servers of speeds {list(SPEEDS)}")
    ax.legend()
    figure = save_figure(fig, out_dir / "ttft.png")
    details = {"speeds": SPEEDS, "groups": GROUPS, "requests": REQUESTS, "policies": results}
    details["semantic_cache"] = semantic
    write_json(out_dir / "results.json", details)
    rr, pl = results["round-robin"], results["prefix-load"]
    cache = ""
    if semantic and "first" in semantic:
        cache = (
            f"; semantic cache: paraphrase {semantic['paraphrase']['x-cache']}, "
            f"'turn off' after 'turn on' {semantic['opposite']['x-cache']} (cosine "
            f"{semantic['opposite']['similarity']}, refused by the polarity guard)"
        )
    return DemoResult(
        system="gateway",
        what=(
            f"AI gateway over 4 simulated servers (speeds {', '.join(map(str, SPEEDS))}), "
            f"{REQUESTS} requests from {GROUPS} groups with long system prompts: prefix hit "
            f"rate {pl['prefix_hit_rate']:.0%} with prefix-load routing vs "
            f"{rr['prefix_hit_rate']:.0%} round-robin{cache}"
        ),
        headline="TTFT p90, prefix-load routing",
        value=pl["ttft_p90_s"],
        baseline="round-robin TTFT p90",
        baseline_value=rr["ttft_p90_s"],
        unit="s",
        higher_is_better=False,
        figures=[figure],
        details=details,
    )
