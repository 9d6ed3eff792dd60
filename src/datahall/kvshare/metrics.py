"""Answer-quality metrics for DroidSpeak's evaluation tasks, in pure Python.

DroidSpeak reports quality "in F1 scores, Rouge-L or code similarity score" against full prefill
(v4 abstract). Those are LongBench's metrics for QA, summarisation and code completion, so each
function here follows LongBench's (or SQuAD's) definition; the brief §1 notes that the paper's
exact datasets are not public. Every metric maps ``(prediction, reference)`` to a score in [0, 1]
where 1.0 means a perfect answer.

>>> sorted(METRICS)
['edit_similarity', 'rouge_l', 'token_f1']
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from difflib import SequenceMatcher

__all__ = [
    "METRICS",
    "Metric",
    "agreement",
    "edit_similarity",
    "normalize_answer",
    "rouge_l",
    "token_f1",
]

Metric = Callable[[str, str], float]

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_WORD = re.compile(r"[^\W_]+")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop ASCII punctuation and the articles
    a/an/the, collapse whitespace.

    >>> normalize_answer("The  __init__() method, an   Example!")
    'init method example'
    """
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the bag-of-tokens overlap after :func:`normalize_answer` (SQuAD, LongBench's
    ``qa_f1_score``): precision and recall count shared tokens with multiplicity.

    Empty answers (after normalisation) score 0, unless both are empty (1.0).

    >>> token_f1("the keyword argument", "keyword arguments")
    0.5
    >>> token_f1("a b c", "b c d e")  # 'a' is an article: 2 shared of 2 and 4
    0.6666666666666666
    >>> token_f1("The Raise!", "raise")
    1.0
    """
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    return 2 * common / (len(pred) + len(ref))  # = 2PR / (P + R)


def _words(text: str) -> list[str]:
    """Lowercase alphanumeric word tokens (like ``rouge-score``'s tokenizer, but Unicode)."""
    return _WORD.findall(text.lower())


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, by the classic O(len(a)·len(b)) DP kept to
    one row."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, 1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) on lowercase word tokens: with ``lcs`` the length of the
    longest common subsequence, P = lcs/len(prediction), R = lcs/len(reference), F = 2PR/(P+R)
    (Lin 2004; LongBench's ``rouge_score``).

    Empty token lists score 0, unless both are empty (1.0).

    >>> rouge_l("a person who sells goods", "a person who buys and sells goods")
    0.8333333333333334
    >>> rouge_l("Living things, collectively.", "living things collectively")
    1.0
    >>> rouge_l("police", "a tree")
    0.0
    """
    pred, ref = _words(prediction), _words(reference)
    if not pred or not ref:
        return float(pred == ref)
    return 2 * _lcs_length(pred, ref) / (len(pred) + len(ref))  # = 2PR / (P + R)


def _first_code_line(prediction: str) -> str:
    """The first line that is not blank, a Markdown fence or a pure comment, stripped."""
    for line in prediction.splitlines():
        line = line.strip()
        if line and not line.startswith(("```", "#")):
            return line
    return ""


def edit_similarity(prediction: str, reference: str) -> float:
    """LongBench's ``code_sim_score`` for next-line code completion: the first line of the
    prediction (stripped; blank lines, Markdown fences and comment-only lines are skipped, as
    LongBench skips lines with a backtick or ``#``) against the stripped reference, by
    ``difflib.SequenceMatcher(None, a, b).ratio()`` (LongBench uses fuzzywuzzy's ratio, which
    is the same quantity computed by Levenshtein's C library).

    >>> edit_similarity("```python\\nreturn x + 1\\n```", "  return x + 1")
    1.0
    >>> edit_similarity("abcd", "abce")  # 3 matching characters of 8
    0.75
    >>> edit_similarity("", "pass")
    0.0
    """
    return SequenceMatcher(None, _first_code_line(prediction), reference.strip()).ratio()


METRICS: dict[str, Metric] = {
    "token_f1": token_f1,
    "rouge_l": rouge_l,
    "edit_similarity": edit_similarity,
}
"""The metrics by name; a :class:`~datahall.kvshare.tasks.Task` names one of these keys."""


def agreement(metric: str, prediction: str, answer: str) -> float:
    r"""How close `prediction` is to another model's `answer` under `metric`: the answer is
    reduced the way a prediction is (for code, its first line), so an answer agrees fully
    with itself.

    >>> agreement("edit_similarity", "x = 1\ny = 2", "x = 1\ny = 2")
    1.0
    """
    reference = _first_code_line(answer) if metric == "edit_similarity" else answer
    return METRICS[metric](prediction, reference)
