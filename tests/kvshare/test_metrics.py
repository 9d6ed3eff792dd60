"""Metrics: exact values on hand-computed cases and properties over random text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datahall.kvshare.metrics import (
    METRICS,
    edit_similarity,
    normalize_answer,
    rouge_l,
    token_f1,
)

text = st.text(alphabet=st.sampled_from(list("abcxyz ABC.,!_-\n")), max_size=40)
words = st.lists(
    st.sampled_from(["cat", "dog", "the", "a", "red", "Red", "fox!", "an"]), max_size=8
)


def test_metrics_registry():
    expected = {"token_f1": token_f1, "rouge_l": rouge_l, "edit_similarity": edit_similarity}
    assert expected == METRICS


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("keyword arguments", "keyword arguments", 1.0),
        ("The Keyword-Arguments.", "keywordarguments", 1.0),  # punctuation dropped, not split
        ("a cat", "the cat", 1.0),  # articles dropped
        ("cat dog", "dog cat", 1.0),  # a bag of tokens
        ("cat cat dog", "cat dog dog", 2 * 2 / 6),  # 2 shared of 3 and 3
        ("cat", "cat dog mouse", 2 * 1 / 4),  # P = 1, R = 1/3
        ("cat", "dog", 0.0),
        ("the", "cat", 0.0),  # empty after normalisation
        ("", "", 1.0),
        ("a an the", "!!", 1.0),
    ],
)
def test_token_f1_values(prediction, reference, expected):
    assert token_f1(prediction, reference) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat sat on the mat", 1.0),
        ("The cat, sat!", "the cat sat", 1.0),
        # LCS "a b d" = 3 of 4 and 5: F = 2·3 / 9
        ("a b c d", "a e b f d", 6 / 9),
        # order matters, unlike token_f1: LCS of "x y" and "y x" is 1
        ("x y", "y x", 0.5),
        ("police officer", "a tree", 0.0),
        ("under_score", "under score", 1.0),  # underscores separate words
        ("", "", 1.0),
        ("...", "word", 0.0),
    ],
)
def test_rouge_l_values(prediction, reference, expected):
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("return x + 1", "return x + 1", 1.0),
        ("\n\n   return x + 1   \nmore", "    return x + 1", 1.0),  # first non-empty line
        ("```python\n# comment\nreturn x\n```", "return x", 1.0),  # fences, comments skipped
        ("abcd", "abce", 0.75),
        ("ab", "abcd", 2 * 2 / 6),
        ("xyz", "abc", 0.0),
        ("", "pass", 0.0),
        ("", "", 1.0),
    ],
)
def test_edit_similarity_values(prediction, reference, expected):
    assert edit_similarity(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_normalize_answer():
    assert normalize_answer("  An  Apple, the PIE. ") == "apple pie"


@given(text, text)
def test_range(prediction, reference):
    for metric in METRICS.values():
        assert 0.0 <= metric(prediction, reference) <= 1.0


@given(text)
def test_identity(value):
    assert token_f1(value, value) == 1.0
    assert rouge_l(value, value) == 1.0


@given(st.text(alphabet=st.sampled_from(list("abcxyz (),.=+")), min_size=1, max_size=40))
def test_edit_similarity_identity_on_single_lines(line):
    assert edit_similarity(line, line) == 1.0


@given(text, text)
def test_symmetry(a, b):
    assert token_f1(a, b) == token_f1(b, a)
    assert rouge_l(a, b) == rouge_l(b, a)


@given(words, words)
def test_rouge_l_is_one_iff_token_lists_equal(a, b):
    pred, ref = " ".join(a), " ".join(b)
    same = pred.lower().replace("!", "").split() == ref.lower().replace("!", "").split()
    assert (rouge_l(pred, ref) == 1.0) == same


@given(words, words)
def test_token_f1_is_one_iff_bags_equal(a, b):
    pred, ref = " ".join(a), " ".join(b)
    assert (token_f1(pred, ref) == 1.0) == (
        sorted(normalize_answer(pred).split()) == sorted(normalize_answer(ref).split())
    )


@given(words, words)
def test_rouge_l_at_most_token_f1(a, b):
    """An LCS is a common sub-bag, so ROUGE-L never beats bag F1 (no articles: same tokens)."""
    a = [w for w in a if w not in ("the", "a", "an")]
    b = [w for w in b if w not in ("the", "a", "an")]
    pred, ref = " ".join(a), " ".join(b)
    assert rouge_l(pred, ref) <= token_f1(pred, ref) + 1e-12
