"""Offline profiling of a (sender, receiver) pair and the online choice of a recompute group.

DroidSpeak profiles every model pair offline with an O(L²) search over contiguous layer groups
and picks a configuration online to meet latency SLOs (brief §2.3: the reported design). The
procedure below is our reconstruction; the thresholds are ours:

1. **Sensitivity.** For every layer l, the divergence when only l is recomputed: the
   "critical layers" plot (brief: about 11% of layers critical, reported).
2. **Proxy search.** For every group [s, e) of at most `max_group` layers, the mean KL
   divergence between the receiver's token distributions with its own full prefill and with
   the hybrid cache, teacher-forced over the receiver's own greedy answer. Extending a group by
   one layer costs one layer of recompute (:func:`~.hybrid.recompute` is incremental), so the
   sweep costs about L·max_group layers plus one short suffix pass per group.
3. **Task check.** Per group size the best groups by KL are answered on the tasks' *profile*
   examples and scored: against the references, and against the receiver's full-prefill
   answers (agreement).
4. **Frontier.** The Pareto frontier of (layers recomputed, quality), each point with its
   compute fraction and bytes to transfer, stored as JSON per pair; :meth:`Profile.choose`
   picks the cheapest point within a quality budget and a TTFT target.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .hybrid import (
    Group,
    SenderCache,
    full_prefill,
    generate,
    hybrid_kv,
    prefill,
    recompute,
    to_cache,
)
from .metrics import agreement
from .models import Model, cache_dir, check_compatible
from .tasks import Task, chat_prompt

__all__ = [
    "Config",
    "Profile",
    "profile_pair",
    "layer_sensitivity",
    "group_divergence",
    "profile_path",
]

Progress = Callable[[str, int, int], None]


@dataclass
class Config:
    """One profiled recompute group. `quality` is the smallest over tasks of score / score of
    the receiver's full prefill (1.0 = no loss); `agreement` the mean over tasks of the
    answers' similarity to the full-prefill answers; bytes are per prefix token."""

    group: Group
    kl: float
    quality: float
    agreement: float
    scores: dict[str, float]
    compute_fraction: float
    transfer_bytes_per_token: float

    @property
    def layers(self) -> int:
        return self.group[1] - self.group[0]


@dataclass
class Profile:
    """A pair's profile: sensitivity per layer, KL per group, the task-checked candidates, the
    Pareto frontier and the timings that :meth:`choose` estimates TTFT with."""

    sender: str
    receiver: str
    base: str
    num_layers: int
    sensitivity: list[float]
    divergence: dict[Group, float]
    candidates: list[Config]
    frontier: list[Config]
    full_scores: dict[str, float]
    timing: dict[str, float]
    kv_bytes_per_token_layer: float
    e_bytes_per_token: float
    meta: dict = field(default_factory=dict)

    def estimate_ttft(self, config: Config, n_tokens: int, bandwidth: float | None = None) -> float:
        """TTFT (s) for an n-token prefix: the group's recompute and the suffix pass, and with
        a link of `bandwidth` bytes/s the transfer, pipelined E cache first (brief §2.4):
        max(E transfer + recompute, reused-KV transfer) + suffix."""
        compute = config.layers * self.timing["layer_s_per_token"] * n_tokens
        suffix = self.timing["suffix_s"]
        if not bandwidth:
            return compute + suffix
        s, e = config.group
        e_s = (self.e_bytes_per_token * n_tokens if s > 0 and e > s else 0) / bandwidth
        kv_s = (
            (self.num_layers - config.layers) * self.kv_bytes_per_token_layer * n_tokens / bandwidth
        )
        return max(e_s + compute, kv_s) + suffix

    def choose(
        self,
        max_loss: float = 0.02,
        *,
        ttft_target: float | None = None,
        n_tokens: int = 1024,
        bandwidth: float | None = None,
    ) -> Config:
        """The frontier point with the lowest estimated TTFT whose quality loss is at most
        `max_loss` (and whose TTFT meets `ttft_target`, if given)."""
        ok = [c for c in self.frontier if 1 - c.quality <= max_loss + 1e-12]
        if ttft_target is not None:
            ok = [c for c in ok if self.estimate_ttft(c, n_tokens, bandwidth) <= ttft_target]
        if not ok:
            best = self.best()
            raise ValueError(
                f"no profiled group of {self.sender} -> {self.receiver} loses at most {max_loss:.0%} "
                + (f"within {ttft_target:g} s " if ttft_target is not None else "")
                + f"(best: {list(best.group)} with {1 - best.quality:.1%} loss); "
                "relax the budget or profile more groups (--max-group)"
            )
        return min(ok, key=lambda c: (self.estimate_ttft(c, n_tokens, bandwidth), -c.quality))

    def best(self) -> Config:
        """The frontier point of highest quality (the fewest layers among equals)."""
        return max(self.frontier, key=lambda c: (c.quality, -c.layers))

    def to_json(self) -> dict:
        d = asdict(self)
        d["divergence"] = [[s, e, kl] for (s, e), kl in self.divergence.items()]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Profile:
        def config(c: dict) -> Config:
            return Config(**{**c, "group": tuple(c["group"])})

        return cls(
            **{
                **d,
                "divergence": {(s, e): kl for s, e, kl in d["divergence"]},
                "candidates": [config(c) for c in d["candidates"]],
                "frontier": [config(c) for c in d["frontier"]],
            }
        )

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> Profile:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path} is not a readable kvshare profile ({e}); re-run the profile"
            ) from e


PACKAGED = Path(__file__).parent / "profiles"
"""Profiles of the packaged variant pairs, made by ``make bench SYSTEM=kvshare``."""


def profile_path(sender: str, receiver: str) -> Path:
    """Where ``datahall kvshare profile`` stores a pair's profile (the user cache)."""
    safe = [Path(x).name or x for x in (sender, receiver)]
    return cache_dir() / "profiles" / f"{safe[0]}__{safe[1]}.json"


def find_profile(sender: str, receiver: str) -> Path | None:
    """The pair's profile: the user's own if there is one, else the packaged one, else None."""
    for path in (profile_path(sender, receiver), PACKAGED / profile_path(sender, receiver).name):
        if path.is_file():
            return path
    return None


@dataclass
class _Probe:
    sent: SenderCache
    tokens: torch.Tensor  # suffix + the receiver's own answer
    answer: int  # answer length
    reference: torch.Tensor  # the receiver's log-probs over those positions, full prefill


@torch.inference_mode()
def _logp(model, kv, probe: _Probe) -> torch.Tensor:
    logits = model(probe.tokens, past_key_values=to_cache(model, kv), use_cache=True).logits[0]
    return torch.log_softmax(logits[-probe.answer - 1 :].float(), dim=-1)


def _kl(probe: _Probe, logp: torch.Tensor) -> float:
    ref = probe.reference
    return float((ref.exp() * (ref - logp)).sum(-1).mean())


@torch.inference_mode()
def _probes(
    sender: Model,
    receiver: Model,
    prompts: Sequence[tuple[list[int], list[int]]],
    answer_tokens: int,
) -> list[_Probe]:
    out = []
    for prefix, suffix in prompts:
        sent = prefill(sender.model, prefix)
        own = full_prefill(receiver.model, prefix)
        answer = generate(receiver.model, own, suffix, answer_tokens).ids
        tokens = torch.tensor([list(suffix) + answer])
        probe = _Probe(sent, tokens, len(answer), torch.empty(0))
        probe.reference = _logp(receiver.model, own, probe)
        out.append(probe)
    return out


def layer_sensitivity(receiver: Model, probes: Sequence[_Probe]) -> list[float]:
    """Mean KL when only layer l is recomputed, for every layer."""
    L = receiver.num_layers
    return [
        statistics.fmean(
            _kl(p, _logp(receiver.model, hybrid_kv(receiver.model, p.sent, (i, i + 1)), p))
            for p in probes
        )
        for i in range(L)
    ]


def group_divergence(
    receiver: Model, probes: Sequence[_Probe], max_group: int, progress: Progress | None = None
) -> dict[Group, float]:
    """Mean KL for every group [s, e) with 1 <= e − s <= `max_group`, plus the empty group."""
    L = receiver.num_layers
    total: dict[Group, float] = {}
    steps = len(probes) * L
    for n, p in enumerate(probes):
        total[(0, 0)] = total.get((0, 0), 0.0) + _kl(p, _logp(receiver.model, p.sent.kv, p))
        for s in range(L):
            kv = list(p.sent.kv)
            for i, k, v in recompute(receiver.model, p.sent, s, min(L, s + max_group)):
                kv[i] = (k, v)
                total[(s, i + 1)] = total.get((s, i + 1), 0.0) + _kl(
                    p, _logp(receiver.model, kv, p)
                )
            if progress:
                progress("divergence", n * L + s + 1, steps)
    return {g: kl / len(probes) for g, kl in total.items()}


def profile_pair(
    sender: Model,
    receiver: Model,
    tasks: Sequence[Task],
    *,
    probes_per_task: int = 2,
    examples_per_task: int = 6,
    max_group: int | None = None,
    candidates_per_size: int = 1,
    sizes: Sequence[int] | None = None,
    answer_tokens: int = 8,
    progress: Progress | None = None,
) -> Profile:
    """Profile `receiver` reusing `sender`'s caches on the tasks' profile examples (steps 1–4 of
    the module docstring). `max_group` defaults to L/3: larger groups cannot give the 3x
    prefill speed-up this system is for."""
    check_compatible(sender, receiver)
    L = receiver.num_layers
    max_group = max(1, min(L, max_group or L // 3))
    tok = receiver.tokenizer
    prompts = [chat_prompt(tok, ex) for t in tasks for ex in t.examples[:probes_per_task]]
    probes = _probes(sender, receiver, prompts, answer_tokens)
    sensitivity = layer_sensitivity(receiver, probes)
    if progress:
        progress("sensitivity", 1, 1)
    divergence = group_divergence(receiver, probes, max_group, progress)
    by_size: dict[int, list[Group]] = {}
    for g in sorted(divergence, key=divergence.get):
        by_size.setdefault(g[1] - g[0], []).append(g)
    sizes = sorted(set(sizes or range(0, max_group + 1)) & set(by_size))
    chosen = [g for m in sizes for g in by_size[m][:candidates_per_size]]

    # task check: the receiver's full-prefill answers once, then each candidate group
    examples = [
        (t, ex, *chat_prompt(tok, ex))
        for t in tasks
        for ex in t.examples[probes_per_task : probes_per_task + examples_per_task]
    ]
    eos = [tok.eos_token_id]
    own: list[str] = []
    sents: list[SenderCache] = []
    t_full = t_layers = t_suffix = 0.0
    tokens = 0
    for t, _, prefix, suffix in examples:
        start = time.perf_counter()
        kv = full_prefill(receiver.model, prefix)
        t_full += time.perf_counter() - start
        tokens += len(prefix)
        g = generate(receiver.model, kv, suffix, t.max_new_tokens, eos=eos)
        t_suffix += g.first_token_s
        own.append(receiver.decode(g.ids).strip())
        sents.append(prefill(sender.model, prefix))
    full_scores = {
        t.name: statistics.fmean(
            t.score(a, ex) for (tt, ex, _, _), a in zip(examples, own, strict=True) if tt is t
        )
        for t in tasks
    }
    configs = []
    for n, group in enumerate(chosen):
        scores: dict[str, list[float]] = {}
        agree: dict[str, list[float]] = {}
        for (t, ex, _, suffix), sent, mine in zip(examples, sents, own, strict=True):
            start = time.perf_counter()
            kv = hybrid_kv(receiver.model, sent, group)
            t_layers += time.perf_counter() - start
            text = receiver.decode(
                generate(receiver.model, kv, suffix, t.max_new_tokens, eos=eos).ids
            ).strip()
            scores.setdefault(t.name, []).append(t.score(text, ex))
            agree.setdefault(t.name, []).append(agreement(t.metric, text, mine))
        means = {k: statistics.fmean(v) for k, v in scores.items()}
        quality = min((means[k] / full_scores[k] if full_scores[k] else 1.0) for k in means)
        configs.append(
            Config(
                group,
                divergence[group],
                min(quality, 1.0),
                statistics.fmean(statistics.fmean(v) for v in agree.values()),
                means,
                (group[1] - group[0]) / L,
                sents[0].transfer_bytes(group) / sents[0].n,
            )
        )
        if progress:
            progress("task check", n + 1, len(chosen))
    frontier, best = [], -1.0
    for c in sorted(configs, key=lambda c: (c.layers, -c.quality)):
        if c.quality > best + 1e-12:
            frontier.append(c)
            best = c.quality
    n_layers_run = sum(c.layers for c in configs) * len(examples)
    sent = sents[0]
    return Profile(
        sender.name,
        receiver.name,
        receiver.base,
        L,
        sensitivity,
        divergence,
        configs,
        frontier,
        full_scores,
        {
            "layer_s_per_token": t_full / max(tokens * L, 1),
            "suffix_s": t_suffix / max(len(examples), 1),
            "recompute_layer_s": t_layers / max(n_layers_run, 1),
        },
        sent.kv_layer_bytes / sent.n,
        sent.e_bytes / sent.n,
        {
            "probes": len(probes),
            "examples": len(examples),
            "max_group": max_group,
            "prefix_tokens_mean": tokens / max(len(examples), 1),
        },
    )
