"""DroidSpeak goals (issue 4), each printed beside the measured figure.

Per variant pair (sender: the SmolLM2 base; receivers: the packaged LoRA variants, by default
the top-band variants ``*-top``; ``KVSHARE_PAIRS=coder-mid,docs-mid,dict-mid`` or
``KVSHARE_PAIRS=coder,docs,dict`` runs the middle-band or all-layer ones):

1. Profile the pair on the tasks' profile examples and choose the cheapest group that loses
   at most 2% quality there (the profile is also stored in the package, for `--group auto`).
2. Receiver TTFT at 1,024-token contexts on CPU: DroidSpeak (recompute the group from the
   sender's E cache, then the suffix) against the receiver's full prefill, medians over
   contexts, both measured in this run. Goal: >= 3x, with relative quality loss <= 2% on
   every task, on at least two pairs.
3. Quality on the test examples (50 per task by default): full prefill, full reuse and
   DroidSpeak. Goal: full reuse shows a measurable drop on at least one pair.
4. Figures: per-layer sensitivity and the Pareto frontier per pair.

Environment: KVSHARE_EXAMPLES (per task, default 50), KVSHARE_CONTEXT (tokens of the quality
contexts, default 1024), KVSHARE_PAIRS (comma-separated receivers, default
coder-top,docs-top,dict-top). Results go to ``results/kvshare/droidspeak.json`` for the default
pairs, ``droidspeak-<receivers>.json`` otherwise.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from datahall.core.report import new_figure, print_table, save_figure, write_json
from datahall.kvshare.evaluate import evaluate_pair
from datahall.kvshare.hybrid import full_prefill, generate, hybrid_kv, prefill
from datahall.kvshare.models import BASE, load
from datahall.kvshare.profile import PACKAGED, Profile, profile_pair
from datahall.kvshare.tasks import TASKS, build_task, chat_prompt

from ..goals import RESULTS, Goal, report

TTFT_TOKENS = 1024
TTFT_CONTEXTS = 3
MAX_LOSS = 0.02
DEFAULT_PAIRS = "coder-top,docs-top,dict-top"


def say(text: str) -> None:
    """Progress on stderr: the benchmark runs for tens of minutes."""
    print(f"[kvshare {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def every(step: int, label: str):
    """A progress callback, ``(done, total)`` or ``(stage, done, total)``, that reports every
    `step` units of work."""

    def report(*args) -> None:
        *stage, done, total = args
        if done == total or done % step == 0:
            say(f"{label}{''.join(f' {s}' for s in stage)} {done}/{total}")

    return report


def ttft(S, R, group, contexts) -> tuple[float, float]:
    """Median TTFT (s) of the receiver's full prefill and of DroidSpeak over `contexts`."""
    full, ours = [], []
    for prefix, suffix in contexts:
        sent = prefill(S.model, prefix)
        for _ in range(2):  # the second run is the one kept: warm caches, warm allocator
            start = time.perf_counter()
            kv = full_prefill(R.model, prefix)
            t_full = time.perf_counter() - start + generate(R.model, kv, suffix, 1).first_token_s
            start = time.perf_counter()
            kv = hybrid_kv(R.model, sent, group)
            t_ours = time.perf_counter() - start + generate(R.model, kv, suffix, 1).first_token_s
        full.append(t_full)
        ours.append(t_ours)
    return statistics.median(full), statistics.median(ours)


def figures(profile: Profile, group, name: str) -> list[str]:
    fig, ax = new_figure(7, 3.2)
    ax.plot(range(profile.num_layers), profile.sensitivity, marker="o", ms=3)
    ax.axvspan(
        group[0] - 0.5, group[1] - 0.5, alpha=0.2, label=f"chosen group [{group[0]}, {group[1]})"
    )
    ax.set(
        xlabel="layer", ylabel="KL, layer recomputed alone", title=f"{name}: per-layer sensitivity"
    )
    ax.legend()
    out = [str(save_figure(fig, RESULTS / "kvshare" / f"sensitivity-{name}.png"))]
    fig, ax = new_figure(7, 3.2)
    pts = sorted(profile.candidates, key=lambda c: c.layers)
    ax.plot(
        [c.layers for c in pts],
        [c.quality for c in pts],
        "o",
        alpha=0.4,
        label="task-checked groups",
    )
    ax.step(
        [c.layers for c in profile.frontier],
        [c.quality for c in profile.frontier],
        where="post",
        label="Pareto frontier",
    )
    ax.set(
        xlabel="layers recomputed",
        ylabel="quality / full prefill (profile split)",
        title=f"{name}: frontier",
    )
    ax.legend()
    out.append(str(save_figure(fig, RESULTS / "kvshare" / f"frontier-{name}.png")))
    return out


def main() -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    n = int(os.environ.get("KVSHARE_EXAMPLES", "50"))
    context = int(os.environ.get("KVSHARE_CONTEXT", "1024"))
    receivers = os.environ.get("KVSHARE_PAIRS", DEFAULT_PAIRS).split(",")
    S = load(BASE)

    def count(text: str) -> int:
        return len(S.tokenizer.encode(text, add_special_tokens=False))

    profile_tasks = [
        build_task(t, 8, context_tokens=256, count_tokens=count, part="profile") for t in TASKS
    ]
    test_tasks = [
        build_task(t, n, context_tokens=context, count_tokens=count, part="test") for t in TASKS
    ]
    ttft_task = build_task(
        "docs-qa", 5 * TTFT_CONTEXTS, context_tokens=TTFT_TOKENS, count_tokens=count
    )
    seen, ttft_contexts = set(), []
    for ex in ttft_task.examples:
        if ex.context not in seen and len(ttft_contexts) < TTFT_CONTEXTS:
            seen.add(ex.context)
            ttft_contexts.append(chat_prompt(S.tokenizer, ex))

    rows, data, passing, reuse_drops = [], {}, 0, {}
    for name in receivers:
        R = load(name)
        pair = f"{BASE}__{name}"
        t0 = time.perf_counter()
        say(f"{pair}: profiling")
        profile = profile_pair(
            S,
            R,
            profile_tasks,
            probes_per_task=2,
            examples_per_task=6,
            max_group=R.num_layers // 3,
            progress=every(50, f"{pair}:"),
        )
        profile.meta["seconds"] = time.perf_counter() - t0
        profile.save(RESULTS / "kvshare" / f"profile-{pair}.json")
        profile.save(PACKAGED / f"{pair}.json")
        try:
            group = profile.choose(MAX_LOSS).group
            within = True
        except ValueError as e:  # no group within budget: evaluate the best one, pair fails
            say(str(e))
            group = profile.best().group
            within = False
        say(f"{pair}: group [{group[0]}, {group[1]}); timing TTFT")
        t_full, t_ours = ttft(S, R, group, ttft_contexts)
        rep = evaluate_pair(
            S, R, test_tasks, group, limit=n, progress=every(10, f"{pair}: quality examples")
        )
        losses = {t: rep.summary(t, "droidspeak").relative_loss for t in TASKS}
        reuse = {t: rep.summary(t, "full-reuse").relative_loss for t in TASKS}
        speedup = t_full / t_ours
        ok = within and speedup >= 3 and max(losses.values()) <= MAX_LOSS
        passing += ok
        reuse_drops[name] = max(reuse.values())
        rows.append(
            [
                name,
                f"[{group[0]}, {group[1]})",
                f"{t_full:.2f} s",
                f"{t_ours:.2f} s",
                f"{speedup:.2f}x",
            ]
            + [
                f"{losses[t]:+.1%} [{ci[0]:+.0%}, {ci[1]:+.0%}] / {reuse[t]:+.1%}"
                for t in TASKS
                for ci in [rep.summary(t, "droidspeak").loss_ci]
            ]
            + ["yes" if ok else "NO"]
        )
        data[name] = {
            "group": group,
            "profiled_within_budget": within,
            "ttft_full_s": t_full,
            "ttft_droidspeak_s": t_ours,
            "speedup": speedup,
            "droidspeak_loss": losses,
            "full_reuse_loss": reuse,
            "summaries": rep.summaries,
            "profile_seconds": profile.meta["seconds"],
            "figures": figures(profile, group, pair),
        }
        write_json(RESULTS / "kvshare" / f"answers-{pair}.json", rep.answers)
    print_table(
        f"kvshare: per pair (TTFT at {TTFT_TOKENS} tokens; quality at {context} tokens, {n} examples/task; loss = DroidSpeak [95% CI] / full reuse)",
        [
            "receiver",
            "group",
            "TTFT full",
            "TTFT DroidSpeak",
            "speed-up",
            *TASKS,
            "pair meets goal",
        ],
        rows,
    )
    worst = max(reuse_drops.values())
    goals = [
        Goal(
            f"pairs with >= 3x TTFT at {TTFT_TOKENS} tokens and <= 2% loss on every task",
            ">= 2 pairs",
            passing,
            "pairs",
            passing >= 2,
        ),
        Goal(
            "full reuse: largest relative quality drop over pairs and tasks",
            "measurable (> 2%) on >= 1 pair",
            100 * worst,
            "%",
            worst > MAX_LOSS,
        ),
    ]
    for name, d in data.items():
        goals.append(
            Goal(
                f"TTFT {BASE} -> {name}, {TTFT_TOKENS} tokens",
                ">= 3x faster",
                d["ttft_droidspeak_s"],
                "s",
                d["speedup"] >= 3,
                baseline=d["ttft_full_s"],
            )
        )
    name = (
        "droidspeak"
        if receivers == DEFAULT_PAIRS.split(",")
        else "droidspeak-" + "-".join(receivers)
    )
    report("kvshare", name, goals, {"examples": n, "context": context, "pairs": data})


if __name__ == "__main__":
    main()
