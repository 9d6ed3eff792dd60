"""Fine-tuned receivers of the base model: LoRA variants trained on CPU from offline corpora.

DroidSpeak shares KV caches between fine-tunes of one foundation model. No package ships two
published fine-tunes of one small architecture, so datahall makes its own receivers
(DroidSpeak brief §5 [reconstruction]; the paper's fine-tunes and model pairs are not ours):
SmolLM2-135M-Instruct plus a LoRA adapter on every attention and MLP projection, trained a few
minutes on one domain until reusing the base's KV cache for every layer visibly changes the
receiver's output, which is the premise DroidSpeak's selective recompute answers.

=========  =============================================  ========================================
variant    trained on (train split of :mod:`.corpora`)     chat task
=========  =============================================  ========================================
``coder``  CPython standard-library sources                "Continue this Python code:" → next lines
``docs``   ``pydoc_data.topics`` help texts               passage + cloze / next paragraph / quote
``dict``   WordNet noun glosses                           "Define the word 'X'." / glossary lookup
=========  =============================================  ========================================

Training is seeded (LoRA initialisation, data draw and order) and checkpointed every few steps
(adapter weights, optimizer state, step and RNG states) so an interrupted run resumes where it
stopped and ends with the same weights. The finished adapter is stored in float16 (≈ 5 MB at
r = 8) with a ``datahall.json`` marker holding the spec, the loss and the weights' SHA-256; an
adapter is used only if that hash matches. Trained adapters ship in the package
(``datahall/kvshare/adapters/<name>/``); ``datahall kvshare finetune NAME`` regenerates one into
the cache, which then takes precedence.

As shipped [measured, 2 CPU cores]: 40–60 steps of 4 examples, 6–7 minutes per variant,
r = 8 (4.9 MB); held-out answer loss falls from the base's 3.08 / 2.25 / 1.95 to 2.17 / 1.76 /
0.67 (coder / docs / dict), and full reuse of the base's KV gives the receiver a next-token KL
of 0.11–0.30 nats against its own prefill on 230–300-token eval prompts. The band variants
train in 76–108 s (backward passes stop at the band) into 0.8–1.2 MB adapters.

>>> sorted(VARIANTS)[:4]
['coder', 'coder-mid', 'coder-top', 'dict']
>>> VARIANTS["docs-mid"].layers
(16, 22)
>>> VARIANTS["dict"].target_modules[:3]
('q_proj', 'k_proj', 'v_proj')
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .corpora import Split, dictionary_entries, pydoc_topics, stdlib_sources
from .models import BASE, Model, ModelError, architecture, cache_dir

if TYPE_CHECKING:
    import torch

__all__ = [
    "PROJECTIONS",
    "PACKAGED",
    "Example",
    "VariantSpec",
    "VARIANTS",
    "examples",
    "encode",
    "collate",
    "finetune",
    "save_adapter",
    "verify_adapter",
    "find_adapter",
    "merge_adapter",
    "load_variant",
]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear projection of a Llama/Qwen2 decoder layer: the receiver differs in all of them."""
PACKAGED = Path(__file__).parent / "adapters"
"""Adapters shipped with datahall, one folder per variant."""
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MARKER = "datahall.json"
FORMAT = 1

Example = tuple[str, str]
"""One chat exchange: (the user's message, the assistant's answer)."""
Corpus = Callable[[random.Random, Split, int], Example]
"""Draws one example from a split, sized to about `budget` tokens, with the given generator."""


# --------------------------------------------------------------------------- corpora → chat tasks


def coder_example(rng: random.Random, split: Split, budget: int) -> Example:
    """A chunk of a standard-library module and the lines that follow it (≈ 2.8–3.7
    chars/token: indentation is costly)."""
    sources = stdlib_sources(split)
    for _ in range(100):
        _, text = sources[rng.randrange(len(sources))]
        lines = text.splitlines()
        start = rng.randrange(max(1, len(lines) - 40))
        context_chars = int(budget * rng.uniform(0.5, 0.75) * 2.8)
        answer_chars = int(budget * 0.18 * 2.8)
        context: list[str] = []
        i = start
        while i < len(lines) and sum(len(x) + 1 for x in context) + len(lines[i]) < context_chars:
            context.append(lines[i])
            i += 1
        while i < len(lines) and not lines[i].strip():
            context.append(lines[i])
            i += 1
        answer: list[str] = []
        while (
            i < len(lines)
            and len(answer) < 8
            and sum(len(x) + 1 for x in answer) + len(lines[i]) < answer_chars
        ):
            answer.append(lines[i])
            i += 1
        code = "\n".join(context).strip("\n")
        reply = "\n".join(answer).rstrip()
        if len(code) >= context_chars // 3 and len(reply.strip()) >= 10:
            return f"Continue this Python code:\n```python\n{code}\n```", reply
    raise ValueError("no code chunk fits the budget; raise the sequence length")


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z`\"'(])")


def _paragraphs(text: str) -> list[str]:
    """A help text's paragraphs; prose is unwrapped to one line, indented blocks kept as is."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = [x for x in block.split("\n") if x.strip() and not set(x.strip()) <= set("*=-")]
        block = "\n".join(lines)
        if not block:
            continue
        out.append(block if block.startswith(" ") else " ".join(block.split()))
    return out


def _is_prose(paragraph: str) -> bool:
    return not paragraph.startswith(" ") and len(paragraph) >= 60 and paragraph[-1:] in ".:)"


def docs_example(rng: random.Random, split: Split, budget: int) -> Example:
    """A passage of a pydoc help topic and one of three questions about it: fill in a blanked
    sentence (cloze), say what the next paragraph says, or quote the sentence that mentions a
    word (extractive QA, scored by token F1). About 4.4 chars/token."""
    topics = pydoc_topics(split)
    for _ in range(200):
        topic, text = topics[rng.randrange(len(topics))]
        paras = _paragraphs(text)
        if len(paras) < 3:
            continue
        start = rng.randrange(len(paras) - 1)
        chars = int(budget * rng.uniform(0.5, 0.75) * 4.0)
        passage: list[str] = []
        i = start
        while i < len(paras) and sum(len(p) + 2 for p in passage) + len(paras[i]) < chars:
            passage.append(paras[i])
            i += 1
        if not passage:
            continue
        kind = rng.choice(("cloze", "next", "quote"))
        if kind == "next":
            if i < len(paras) and _is_prose(paras[i]) and len(paras[i]) <= budget * 0.3 * 4.0:
                body = "\n\n".join(passage)
                return (
                    f"Here is the Python documentation on {topic!r}:\n\n{body}\n\n"
                    "Explain what the next paragraph of the documentation says.",
                    paras[i],
                )
            kind = "cloze"
        prose = [j for j, p in enumerate(passage) if _is_prose(p)]
        if not prose:
            continue
        j = rng.choice(prose)
        sentences = [s for s in _SENTENCE.split(passage[j]) if len(s.split()) >= 6]
        if not sentences:
            continue
        sentence = rng.choice(sentences)
        if kind == "cloze":
            blanked = [*passage[:j], passage[j].replace(sentence, "____", 1), *passage[j + 1 :]]
            body = "\n\n".join(blanked)
            return (
                f"{body}\n\nIn this passage from the Python documentation, one sentence was "
                "replaced by ____. What is the missing sentence?",
                sentence,
            )
        body = "\n\n".join(passage)
        words = {w.lower() for w in re.findall(r"[A-Za-z]{5,}", sentence)}
        unique = sorted(w for w in words if body.lower().count(w) == 1)
        if unique:
            word = rng.choice(unique)
            return (
                f"{body}\n\nQuote the sentence of this documentation passage that mentions "
                f'"{word}".',
                sentence,
            )
    raise ValueError("no documentation passage fits the budget; raise the sequence length")


def dict_example(rng: random.Random, split: Split, budget: int) -> Example:
    """A WordNet definition: asked for directly ("Define the word 'X'."), or looked up in a
    glossary of other entries given in the prompt (about 4.4 chars/token)."""
    entries = dictionary_entries(split)
    word, definition = entries[rng.randrange(len(entries))]
    if rng.random() < 0.4:
        return f"Define the word '{word}'.", definition
    chars = int(budget * rng.uniform(0.5, 0.75) * 4.0)
    glossary = [(word, definition)]
    size = len(word) + len(definition) + 3
    while True:
        w, d = entries[rng.randrange(len(entries))]
        if size + len(w) + len(d) + 3 > chars:
            break
        if w != word:
            glossary.append((w, d))
            size += len(w) + len(d) + 3
    rng.shuffle(glossary)
    lines = "\n".join(f"{w}: {d}" for w, d in glossary)
    return f"Glossary:\n{lines}\n\nWhat is the definition of '{word}' in this glossary?", definition


# --------------------------------------------------------------------------------- variant specs


@dataclass(frozen=True)
class VariantSpec:
    """How one receiver is trained: its corpus, seed, optimisation and LoRA shape.

    `corpus` draws one chat example from a split; `steps` × `batch_size` examples are drawn
    once, in order, from ``random.Random(seed)``, so the data slice and order are fixed.
    `lora_alpha` / `r` scales the update; `target_modules` are the projections adapted."""

    name: str
    description: str
    corpus: Corpus
    seed: int = 0
    steps: int = 40
    lr: float = 1e-3
    r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = PROJECTIONS
    layers: tuple[int, int] | None = None
    seq_len: int = 256
    batch_size: int = 4
    warmup: int = 4
    checkpoint_every: int = 5

    def fingerprint(self, steps: int | None = None) -> dict[str, Any]:
        """The spec as JSON-able data (the corpus by name), with the run's step count."""
        return {
            "name": self.name,
            "description": self.description,
            "corpus": getattr(self.corpus, "__name__", repr(self.corpus)),
            "seed": self.seed,
            "steps": steps if steps is not None else self.steps,
            "lr": self.lr,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": list(self.target_modules),
            **({"layers": list(self.layers)} if self.layers else {}),
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "warmup": self.warmup,
        }

    def lr_at(self, step: int, steps: int | None = None) -> float:
        """Learning rate of `step` (0-based): linear warm-up, then linear decay to 10%."""
        total = steps if steps is not None else self.steps
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, total - self.warmup)
        return self.lr * (1.0 - 0.9 * (step - self.warmup) / span)


VARIANTS: dict[str, VariantSpec] = {
    spec.name: spec
    for spec in (
        VariantSpec(
            "coder",
            "code completion: continues CPython standard-library source",
            coder_example,
            seed=1,
            steps=40,
            lr=1e-3,
        ),
        VariantSpec(
            "docs",
            "documentation QA: cloze, next paragraph and quotes over pydoc help topics",
            docs_example,
            seed=2,
            steps=40,
            lr=1e-3,
        ),
        VariantSpec(
            "dict",
            "definitions: WordNet noun glosses, asked directly or looked up in a glossary",
            dict_example,
            seed=3,
            steps=60,
            lr=1e-3,
            seq_len=192,
        ),
    )
}
# Band variants: the same data and seeds, LoRA on a band of consecutive layers only, as when a
# fine-tune freezes the rest of the network. "-top" bands end at the last layer (the common
# freeze-the-lower-layers recipe), "-mid" bands sit in the middle; the bands differ so the
# profiler must find each.
BANDS = {
    "coder-mid": (10, 16),
    "docs-mid": (16, 22),
    "dict-mid": (14, 20),
    "coder-top": (24, 30),
    "docs-top": (25, 30),
    "dict-top": (23, 30),
}
VARIANTS |= {
    name: replace(
        VARIANTS[name.rsplit("-", 1)[0]],
        name=name,
        description=f"{VARIANTS[name.rsplit('-', 1)[0]].description}; LoRA on layers [{a}, {b}) only",
        layers=(a, b),
    )
    for name, (a, b) in BANDS.items()
}
"""The receivers of the base model, by name (DroidSpeak brief §5 [reconstruction])."""


def _spec(name: str) -> VariantSpec:
    if name not in VARIANTS:
        raise ModelError(f"unknown variant {name!r}; the variants are: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def examples(
    name: str, n: int, *, split: Split = "train", seed: int | None = None, budget: int | None = None
) -> list[Example]:
    """`n` chat examples of variant `name` drawn from `split`, reproducibly (the spec's seed
    unless `seed` is given). Each prompt's context takes about 0.5–0.75 × `budget` tokens
    (default budget: the spec's sequence length; direct "Define" questions are short). The
    eval split gives held-out prompts for tasks and profiling."""
    spec = _spec(name)
    rng = random.Random(spec.seed if seed is None else seed)
    return [spec.corpus(rng, split, budget or spec.seq_len) for _ in range(n)]


# ----------------------------------------------------------------------------- tokens and batches


def encode(
    tokenizer, example: Example, seq_len: int | None = None
) -> tuple[list[int], list[int]] | None:
    """Token ids and labels of one exchange in the tokenizer's chat template.

    The prompt (system, user, assistant header) is tokenized as at inference and the answer
    plus the end-of-turn token appended. Labels are -100 on the prompt: the loss is on the
    assistant's tokens only, the usual supervised fine-tuning choice. The gradient still reaches
    every layer's K/V projections through attention over the prompt, so the receiver's prompt
    KV drifts from the base's, which is what makes full reuse lossy; and no capacity goes to
    memorising the fixed system prompt and template. Returns None if it exceeds `seq_len`."""
    user, answer = example
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    head = tokenizer.encode(prompt, add_special_tokens=False)
    tail = tokenizer.encode(answer, add_special_tokens=False) + tokenizer.encode(
        "<|im_end|>", add_special_tokens=False
    )
    if seq_len is not None and len(head) + len(tail) > seq_len:
        return None
    return head + tail, [-100] * len(head) + tail


def collate(
    items: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """A right-padded batch: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on pads)."""
    import torch

    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    for row, (x, y) in enumerate(items):
        ids[row, : len(x)] = torch.tensor(list(x))
        mask[row, : len(x)] = 1
        labels[row, : len(y)] = torch.tensor(list(y))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _batches(spec: VariantSpec, tokenizer, steps: int) -> list[dict[str, torch.Tensor]]:
    """The run's fixed data: steps × batch examples that fit seq_len, drawn in order from the
    spec's seed (examples that do not fit are skipped, deterministically)."""
    rng = random.Random(spec.seed)
    items: list[tuple[list[int], list[int]]] = []
    tries = 0
    while len(items) < steps * spec.batch_size:
        tries += 1
        if tries > 20 * steps * spec.batch_size + 100:
            raise ValueError(f"{spec.name}: too few examples fit {spec.seq_len} tokens")
        item = encode(tokenizer, spec.corpus(rng, "train", spec.seq_len), spec.seq_len)
        if item is not None:
            items.append(item)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    b = spec.batch_size
    return [collate(items[i * b : (i + 1) * b], pad) for i in range(steps)]


# ------------------------------------------------------------------------------------- training


@dataclass
class _Trained:
    model: Any  # the PeftModel
    losses: list[float]
    seconds: float
    resumed_from: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def _lora(model, spec: VariantSpec):
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(spec.target_modules),
        layers_to_transform=list(range(*spec.layers)) if spec.layers else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(spec.seed)  # lora_A's initialisation draws from the global generator
    with _quiet():
        return get_peft_model(model, config)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence peft 0.21's FutureWarning about transformers' renamed gradient-checkpointing
    attribute: it concerns peft's own code and tells our users nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        yield


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.pt.partial"
    torch.save(state, tmp)
    os.replace(tmp, path / "state.pt")


def _load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint in `path` if it belongs to this exact run (spec and step count), else
    None: a stale or unreadable checkpoint is ignored and training starts over."""
    import torch

    file = path / "state.pt"
    if not file.is_file():
        return None
    try:
        state = torch.load(file, weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable checkpoint means: start over
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != json.dumps(
        fingerprint, sort_keys=True
    ):
        return None
    return state


def _train(
    model,
    batches: Sequence[dict[str, torch.Tensor]],
    spec: VariantSpec,
    *,
    checkpoint: Path | None = None,
    resume: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
) -> _Trained:
    """LoRA-train `model` (wrapped in place by peft) on `batches`, one AdamW step per batch.

    Deterministic given `spec.seed`: LoRA initialisation is seeded and the batches are fixed.
    Every `spec.checkpoint_every` steps the adapter weights (float32), the optimizer state, the
    step, the losses and the RNG states go to ``checkpoint/state.pt`` (written atomically); with
    `resume`, a checkpoint of the same run is restored and training continues from its step,
    ending with the same weights as an uninterrupted run. `progress(step, total, loss)` is
    called after each step."""
    import torch

    steps = len(batches)
    fingerprint = {**spec.fingerprint(steps), "batches": _batches_digest(batches)}
    peft_model = _lora(model, spec)
    params = _trainable(peft_model)
    optimizer = torch.optim.AdamW(params.values(), lr=spec.lr, weight_decay=0.0)
    random.seed(spec.seed)
    losses: list[float] = []
    start, seconds = 0, 0.0
    state = _load_checkpoint(checkpoint, fingerprint) if checkpoint is not None and resume else None
    if state is not None:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["lora"][n])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_as_random_state(state["python_rng"]))
        start, losses, seconds = int(state["step"]), list(state["losses"]), float(state["seconds"])
    peft_model.train()
    t0 = time.perf_counter()
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = spec.lr_at(step, steps)
        loss = peft_model(**batches[step]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        done = step + 1
        if checkpoint is not None and (done % spec.checkpoint_every == 0 or done == steps):
            _save_checkpoint(
                checkpoint,
                {
                    "fingerprint": json.dumps(fingerprint, sort_keys=True),
                    "step": done,
                    "lora": {n: p.detach().clone() for n, p in params.items()},
                    "optimizer": optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "python_rng": random.getstate(),
                    "losses": losses,
                    "seconds": seconds + time.perf_counter() - t0,
                },
            )
        if progress is not None:
            progress(done, steps, losses[-1])
    peft_model.eval()
    return _Trained(peft_model, losses, seconds + time.perf_counter() - t0, start)


def _as_random_state(state):
    """random.getstate() comes back from torch.load with lists where tuples were."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _batches_digest(batches: Sequence[dict[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for batch in batches:
        h.update(batch["input_ids"].numpy().tobytes())
        h.update(batch["labels"].numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- adapters on disk


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_adapter(peft_model, out: Path, meta: dict[str, Any], *, dtype: str = "float16") -> Path:
    """Write the adapter's weights (`dtype`: float16 keeps 11 significant bits, ample for
    LoRA factors, and halves the file), ``adapter_config.json`` and, last, the
    ``datahall.json`` marker with `meta` and the weights' SHA-256. A folder without a
    matching marker is never trusted, so an interrupted save is harmless."""
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    state = get_peft_model_state_dict(peft_model)
    cast = getattr(torch, dtype)
    save_file({k: v.detach().to(cast).contiguous() for k, v in state.items()}, str(out / WEIGHTS))
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path = meta.get("base", BASE)
    config.save_pretrained(str(out))
    marker = {
        "format": FORMAT,
        **meta,
        "dtype": dtype,
        "parameters": sum(v.numel() for v in state.values()),
        "bytes": (out / WEIGHTS).stat().st_size,
        "sha256": _sha256(out / WEIGHTS),
    }
    tmp = out / (MARKER + ".partial")
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out / MARKER)
    return out


def verify_adapter(path: Path) -> dict[str, Any]:
    """The marker of the adapter in `path`, after checking it is complete: marker, config
    and weights present and the weights' SHA-256 equal to the marker's. Raises
    :class:`ModelError` saying what is wrong otherwise."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise ModelError(
            f"{path} holds no complete adapter ({MARKER} missing or unreadable: {e})"
        ) from None
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ModelError(f"{path} is incomplete: {CONFIG} or {WEIGHTS} is missing")
    if _sha256(path / WEIGHTS) != marker.get("sha256"):
        raise ModelError(f"{path / WEIGHTS} is corrupted: its SHA-256 does not match {MARKER}")
    return marker


def _discard(path: Path) -> None:
    """Remove a finished adapter's files (not a training checkpoint beside them)."""
    for name in (MARKER, WEIGHTS, CONFIG):
        (path / name).unlink(missing_ok=True)


def find_adapter(name: str) -> tuple[Path, dict[str, Any], str]:
    """(folder, marker, ``"cache"`` or ``"packaged"``) of variant `name`'s adapter.

    The cache (``cache_dir()/adapters/<name>``, written by :func:`finetune`) wins if complete;
    a corrupted cache entry, or one trained under another spec of `name`, is deleted, not
    trusted, and the packaged adapter is used."""
    spec = _spec(name)
    cached = cache_dir() / "adapters" / name
    if (cached / MARKER).exists() or (cached / WEIGHTS).exists():
        try:
            marker = verify_adapter(cached)
            trained = marker.get("spec")
            # an adapter trained under an older spec of this name (other corpus, band or LoRA
            # shape) is stale: same treatment as a corrupted one
            if trained is None or trained == spec.fingerprint(trained.get("steps")):
                return cached, marker, "cache"
        except ModelError:
            pass
        _discard(cached)
    packaged = PACKAGED / name
    try:
        return packaged, verify_adapter(packaged), "packaged"
    except ModelError as e:
        raise ModelError(
            f"no usable adapter for variant {name!r} ({e}); run: datahall kvshare finetune {name}"
        ) from None


def adapter_status(name: str) -> str:
    """One line for ``datahall kvshare models``: where variant `name`'s adapter comes from."""
    try:
        path, meta, source = find_adapter(name)
    except ModelError as e:
        return str(e)
    return f"{source} adapter, {meta.get('steps', '?')} steps, in {path}"


def merge_adapter(model, path: Path):
    """`model` (modified in place) with the adapter in `path` merged into its weights: a plain
    float32 model in eval mode whose every adapted projection differs from the base's."""
    import torch
    from peft import PeftModel

    try:
        with _quiet():
            merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    except Exception as e:  # noqa: BLE001 - peft/safetensors raise many types on bad files
        raise ModelError(f"cannot load the adapter in {path}: {e}") from e
    return merged.to(torch.float32).eval()


# ------------------------------------------------------------------------------- public entries


def finetune(
    name: str,
    *,
    base: str = BASE,
    steps: int | None = None,
    out: Path | None = None,
    resume: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
) -> Path:
    """Train variant `name`'s LoRA adapter on the `base` model and save it; return its folder.

    The finished adapter goes to `out` (default ``cache_dir()/adapters/<name>``, which
    :func:`load_variant` prefers to the packaged copy). Checkpoints go to
    ``cache_dir()/adapters/<name>/checkpoint`` and are removed once the adapter is saved;
    with `resume`, an interrupted run of the same spec and step count continues from its last
    checkpoint. `progress(step, total, loss)` is called after each step. On 2 CPU cores a
    variant takes a few minutes."""
    from . import models

    spec = _spec(name)
    steps = spec.steps if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    out = Path(out) if out is not None else cache_dir() / "adapters" / name
    checkpoint = cache_dir() / "adapters" / name / "checkpoint"
    loaded = models.load(base)
    if loaded.tokenizer is None:
        raise ModelError(f"base {base!r} has no tokenizer; variants are trained on chat text")
    batches = _batches(spec, loaded.tokenizer, steps)
    trained = _train(
        loaded.model, batches, spec, checkpoint=checkpoint, resume=resume, progress=progress
    )
    import peft
    import torch

    meta = {
        "name": name,
        "description": spec.description,
        "spec": spec.fingerprint(steps),
        "base": base,
        "base_architecture": architecture(loaded.model.config),
        "steps": steps,
        "examples": steps * spec.batch_size,
        # per-batch losses are noisy (batches mix task kinds): report means of up to 5 steps
        "final_loss": round(sum(trained.losses[-5:]) / len(trained.losses[-5:]), 4),
        "first_loss": round(sum(trained.losses[:5]) / len(trained.losses[:5]), 4),
        "losses": [round(x, 4) for x in trained.losses],
        "seconds": round(trained.seconds, 1),
        "resumed_from": trained.resumed_from,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),  # float sums may differ with another thread count
        "peft": peft.__version__,
    }
    save_adapter(trained.model, out, meta)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return out


def load_variant(name: str, progress=None) -> Model:
    """Variant `name`: the base with its LoRA adapter merged, float32, eval mode.

    The adapter comes from the cache if :func:`finetune` wrote a complete one there, else from
    the package (:func:`find_adapter`); it must have been trained on this base's architecture.
    `progress(message)` receives a line about slow steps (a first-time base conversion)."""
    from . import models

    spec = _spec(name)
    path, marker, source = find_adapter(name)
    base = models.load(BASE, progress=progress)
    arch = architecture(base.model.config)
    if marker.get("base_architecture", arch) != arch:
        raise ModelError(
            f"the {source} adapter of {name!r} in {path} was trained on another base "
            f"architecture; run: datahall kvshare finetune {name}"
        )
    merged = merge_adapter(base.model, path)
    meta = {
        "variant": name,
        "description": spec.description,
        "adapter": str(path),
        "source": source,
        "sha256": marker.get("sha256"),
        "steps": marker.get("steps"),
        "final_loss": marker.get("final_loss"),
        "r": marker.get("spec", {}).get("r"),
        "path": base.meta.get("path"),
    }
    return Model(name=name, model=merged, tokenizer=base.tokenizer, base=base.base, meta=meta)
