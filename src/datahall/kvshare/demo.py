"""The tour's DroidSpeak demo: one variant pair, one shared context, three modes.

The SmolLM2 base prefills a documentation context; the ``docs-top`` variant answers questions
about it with its own full prefill, by reusing the base's KV for every layer, and with
DroidSpeak's recompute group from the pair's packaged profile. Reported: TTFT and token F1.
"""

from __future__ import annotations

from pathlib import Path

from rich.progress import Progress

from ..core.report import DemoResult, new_figure, save_figure, write_json
from .evaluate import MODES, evaluate_pair
from .models import BASE, load
from .profile import Profile, find_profile
from .tasks import build_task

RECEIVER = "docs-top"
CONTEXT_TOKENS = 512
EXAMPLES = 5  # the questions of one shared context


def run(out_dir: Path, progress: Progress) -> DemoResult:
    task = progress.add_task(f"kvshare: {BASE} -> {RECEIVER}", total=EXAMPLES + 1)
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
            f"{summary['full-reuse'].agreement:.2f} (full reuse)"
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
