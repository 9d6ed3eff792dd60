"""Quality and time to first token of a receiver in three modes: its own full prefill, full
reuse of the sender's KV (naive sharing), and DroidSpeak with a recompute group.

For every example the prefix (chat template + shared context) comes from the sender's prefill
and the receiver answers its own instruction (the suffix) by greedy decoding. Each answer is
scored against the task's reference and, as *agreement*, against the receiver's own
full-prefill answer — DroidSpeak's quality claim is relative to no sharing (brief §1).

TTFT here is compute on this machine: building the prefix cache (the receiver's prefill, the
group's recompute, or nothing for full reuse) plus the suffix pass that yields the first token.
Moving caches between nodes is the serving issue's transfer model; it is not counted here.
Examples that share a context share one prefix build, timed once and charged to each.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from .hybrid import Group, check_group, full_prefill, generate, hybrid_kv, prefill
from .metrics import agreement
from .models import Model, check_compatible
from .tasks import Task, chat_prompt

__all__ = ["MODES", "Answer", "ModeSummary", "PairReport", "evaluate_pair", "loss_interval"]

MODES = ("full-prefill", "full-reuse", "droidspeak")


@dataclass(frozen=True)
class Answer:
    task: str
    example: str
    mode: str
    text: str
    score: float
    agreement: float
    ttft_s: float


@dataclass
class ModeSummary:
    """Means over one task's examples for one mode; `relative_loss` is 1 − score/score of full
    prefill (negative when the mode scored higher) and `loss_ci` its 95% paired-bootstrap
    interval: with 50 examples of a small model the interval is often wider than the 2% budget,
    and a reader should see that."""

    task: str
    mode: str
    score: float
    agreement: float
    ttft_s: float
    relative_loss: float = 0.0
    loss_ci: tuple[float, float] = (0.0, 0.0)


@dataclass
class PairReport:
    sender: str
    receiver: str
    group: Group
    num_layers: int
    summaries: list[ModeSummary]
    answers: list[Answer] = field(default_factory=list)

    def summary(self, task: str, mode: str) -> ModeSummary:
        return next(s for s in self.summaries if s.task == task and s.mode == mode)

    def to_json(self) -> dict:
        return asdict(self)


def _timed(fn: Callable, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def loss_interval(
    base: Sequence[float], other: Sequence[float], *, level: float = 0.95, draws: int = 2000
) -> tuple[float, float]:
    """Percentile bootstrap interval of 1 − mean(other)/mean(base) over paired examples
    (resampled together, seeded, so reports are reproducible).

    >>> loss_interval([0.5, 0.7, 0.9], [0.5, 0.7, 0.9])
    (0.0, 0.0)
    >>> lo, hi = loss_interval([1.0] * 20, [0.5] * 20)
    >>> round(lo, 6), round(hi, 6)
    (0.5, 0.5)
    """
    import numpy as np

    a, b = np.asarray(base, dtype=float), np.asarray(other, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("loss_interval needs two equally long, non-empty score lists")
    rows = np.random.default_rng(0).integers(0, a.size, size=(draws, a.size))
    sa, sb = a[rows].mean(axis=1), b[rows].mean(axis=1)
    losses = 1 - np.divide(sb, sa, out=np.ones_like(sb), where=sa > 0)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(losses, [tail, 100 - tail])
    return float(lo), float(hi)


def evaluate_pair(
    sender: Model,
    receiver: Model,
    tasks: Sequence[Task],
    group: Group,
    *,
    modes: Sequence[str] = MODES,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PairReport:
    """Answer every example of `tasks` (at most `limit` per task) in each of `modes` and score
    them; `progress(done, total)` after each example."""
    check_compatible(sender, receiver)
    L = receiver.num_layers
    group = check_group(group, L)
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown mode(s) {sorted(unknown)}; use {', '.join(MODES)}")
    modes = [m for m in MODES if m in modes]  # full prefill first: the others are scored against it
    eos = [receiver.tokenizer.eos_token_id] if receiver.tokenizer is not None else []
    total = sum(min(len(t.examples), limit or len(t.examples)) for t in tasks)
    done = 0
    answers: list[Answer] = []
    for task in tasks:
        prefixes: dict[tuple[int, ...], dict[str, tuple]] = {}
        for ex in task.examples[:limit]:
            prefix, suffix = chat_prompt(receiver.tokenizer, ex)
            key = tuple(prefix)
            if key not in prefixes:
                sent = prefill(sender.model, prefix)
                builds = {
                    "full-prefill": (full_prefill, receiver.model, prefix),
                    "full-reuse": (lambda s: s.kv, sent),
                    "droidspeak": (hybrid_kv, receiver.model, sent, group),
                }
                prefixes = {key: {m: _timed(*builds[m]) for m in modes}}  # one context at a time
            texts = {}
            for mode in modes:
                kv, build_s = prefixes[key][mode]
                g = generate(receiver.model, kv, suffix, task.max_new_tokens, eos=eos)
                texts[mode] = (receiver.decode(g.ids).strip(), build_s + g.first_token_s)
            own = texts.get("full-prefill", (None,))[0]
            for mode, (text, ttft) in texts.items():
                agree = agreement(task.metric, text, own) if own is not None else float("nan")
                answers.append(
                    Answer(task.name, ex.id, mode, text, task.score(text, ex), agree, ttft)
                )
            done += 1
            if progress:
                progress(done, total)
    summaries = []
    for task in tasks:
        base = None
        for mode in modes:
            rows = [a for a in answers if a.task == task.name and a.mode == mode]
            s = ModeSummary(
                task.name,
                mode,
                statistics.fmean(a.score for a in rows),
                statistics.fmean(a.agreement for a in rows),
                statistics.median(a.ttft_s for a in rows),
            )
            if mode == "full-prefill":
                base = [a.score for a in rows]
            if base and statistics.fmean(base):
                s.relative_loss = 1 - s.score / statistics.fmean(base)
                s.loss_ci = loss_interval(base, [a.score for a in rows])
            summaries.append(s)
    return PairReport(sender.name, receiver.name, group, L, summaries, answers)
