"""The tour's DroidSpeak demo: one variant pair, one shared context, three modes, then the
same pair behind the serving API.

The SmolLM2 base prefills a documentation context; the ``docs-top`` variant answers questions
about it with its own full prefill, by reusing the base's KV for every layer, and with
DroidSpeak's recompute group from the pair's packaged profile. Reported: TTFT and token F1.
Then both models are served by one OpenAI-compatible server on loopback: the variant asks
about a document no one has read (full prefill), and about one the base has just read (its
cache reused across variants); reported: the TTFT the client saw, and the server's counters.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
from rich.progress import Progress

from ..core.http import serve_in_thread
from ..core.report import DemoResult, new_figure, save_figure, write_json
from .engine import Engine, profiled_groups
from .evaluate import MODES, evaluate_pair
from .models import BASE, Model, load
from .profile import Profile, find_profile
from .server import create_app
from .store import LocalStore
from .tasks import Example, build_task

RECEIVER = "docs-top"
CONTEXT_TOKENS = 512
EXAMPLES = 5  # the questions of one shared context


def run(out_dir: Path, progress: Progress) -> DemoResult:
    task = progress.add_task(f"kvshare: {BASE} -> {RECEIVER}", total=EXAMPLES + 2)
    S, R = load(BASE), load(RECEIVER)
    path = find_profile(BASE, RECEIVER)
    if path is None:
        raise LookupError(
            f"no profile for {BASE} -> {RECEIVER}; run: datahall kvshare profile {BASE} {RECEIVER}"
        )
    profile = Profile.load(path)
    try:
        group = profile.choose().group
    except ValueError:  # no group within 2% on the profile: show the best one
        group = profile.best().group
    progress.advance(task)

    def count(text: str) -> int:
        return len(R.tokenizer.encode(text, add_special_tokens=False))

    qa = build_task("docs-qa", EXAMPLES, context_tokens=CONTEXT_TOKENS, count_tokens=count)
    report = evaluate_pair(
        S,
        R,
        [qa],
        group,
        limit=EXAMPLES,
        progress=lambda d, t: progress.update(task, completed=d + 1),
    )
    summary = {m: report.summary("docs-qa", m) for m in MODES}
    progress.update(task, description=f"kvshare: serving {BASE} and {RECEIVER}")
    more = build_task("docs-qa", 15, context_tokens=CONTEXT_TOKENS, count_tokens=count)
    first_questions: dict[str, Example] = {}
    for example in more.examples:
        first_questions.setdefault(example.context, example)
    serving = serve(S, R, *list(first_questions.values())[:2])
    progress.advance(task)

    fig, ax = new_figure(7, 3.2)
    ax.plot(range(profile.num_layers), profile.sensitivity, marker="o", ms=3)
    ax.axvspan(
        group[0] - 0.5, group[1] - 0.5, alpha=0.2, label=f"recompute group [{group[0]}, {group[1]})"
    )
    ax.set_xlabel("layer")
    ax.set_ylabel("KL when recomputed alone")
    ax.set_title(f"{BASE} -> {RECEIVER}: layer sensitivity (profile)")
    ax.legend()
    figure = save_figure(fig, out_dir / "sensitivity.png")
    details = {
        "sender": BASE,
        "receiver": RECEIVER,
        "group": list(group),
        "num_layers": R.num_layers,
        "context_tokens_target": CONTEXT_TOKENS,
        "modes": {
            m: {"ttft_s": s.ttft_s, "token_f1": s.score, "agreement": s.agreement}
            for m, s in summary.items()
        },
        "answers": report.answers,
        "profile": str(path),
        "serving": serving,
    }
    write_json(out_dir / "results.json", details)
    ds, full = summary["droidspeak"], summary["full-prefill"]
    return DemoResult(
        system="kvshare",
        what=(
            f"DroidSpeak: {RECEIVER} variant reuses {BASE}'s KV for a {CONTEXT_TOKENS}-token context, "
            f"recomputing layers [{group[0]}, {group[1]}) of {R.num_layers}; F1 {ds.score:.2f} vs "
            f"{full.score:.2f} (full prefill), {summary['full-reuse'].score:.2f} (full reuse); "
            f"agreement with full prefill {ds.agreement:.2f} vs "
            f"{summary['full-reuse'].agreement:.2f} (full reuse). Served over HTTP: "
            f"{RECEIVER}'s TTFT {serving['shared']['ttft_s']:.2f} s on a document {BASE} read "
            f"first vs {serving['cold']['ttft_s']:.2f} s on an unread one"
        ),
        headline="DroidSpeak TTFT",
        value=ds.ttft_s,
        baseline="receiver's full prefill TTFT",
        baseline_value=full.ttft_s,
        unit="s",
        higher_is_better=False,
        figures=[figure],
        details=details,
    )


def serve(S: Model, R: Model, unread: Example, shared: Example) -> dict:
    """Serve the sender `S` and receiver `R` on loopback with DroidSpeak sharing; `R` asks
    about the `unread` document, then `S` reads the `shared` one and `R` asks about it. The
    client's TTFT of each call, the server's prefill counters and an ORCA load report."""
    engine = Engine(
        {S.name: S, R.name: R},
        store=LocalStore(1 << 28),
        profiles=profiled_groups(),
        sharing="droidspeak",
        max_batch=4,
    )
    with (
        serve_in_thread(create_app(engine, S.tokenizer)) as url,
        httpx.Client(base_url=url, timeout=300) as client,
    ):
        out = {"cold": _ask(client, R.name, unread), "sender": _ask(client, S.name, shared)}
        out["shared"] = _ask(client, R.name, shared)
        metrics = client.get("/metrics").text
    out["prefills"] = {
        kind: int(float(n))
        for kind, n in re.findall(r'^datahall:prefills_total\{kind="(\w+)"\} (\S+)$', metrics, re.M)
    }
    out["url"] = url
    return out


def _ask(client: httpx.Client, model: str, example: Example) -> dict:
    """One streamed chat completion, as any OpenAI client sends it, asking for an ORCA load
    report; the TTFT is the first streamed token's arrival."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"{example.context}\n\n{example.instruction}"}],
        "max_tokens": 48,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first, text, usage = None, [], {}
    headers = {"endpoint-load-metrics-format": "json"}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        orca = json.loads(r.headers["endpoint-load-metrics"].removeprefix("JSON "))
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                if first is None and (choice["delta"].get("content") or choice["finish_reason"]):
                    first = time.perf_counter()
                text.append(choice["delta"].get("content") or "")
    return {
        "model": model,
        "ttft_s": (first or time.perf_counter()) - start,
        "answer": "".join(text),
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
        "orca": orca,
    }
