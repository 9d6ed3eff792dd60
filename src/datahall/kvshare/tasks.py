"""Offline long-context tasks for measuring what KV reuse does to answer quality.

DroidSpeak reports quality as "F1 scores, Rouge-L or code similarity score" against full
prefill (v4 abstract); those are LongBench's QA, summarisation and code-completion metrics
(brief §1). Its datasets are not public, so these three tasks are our LongBench-style
reconstruction, built only from the ``eval`` split of :mod:`datahall.kvshare.corpora` so that no
fine-tuned variant has trained on them:

- ``docs-qa`` (:func:`~datahall.kvshare.metrics.token_f1`): a chunk of ``pydoc`` help text and
  an extractive question: quote the sentence that mentions a given word (a word found once in
  the chunk);
- ``code`` (:func:`~datahall.kvshare.metrics.edit_similarity`): the beginning of a
  standard-library module, and the next line of code to write;
- ``definitions`` (:func:`~datahall.kvshare.metrics.rouge_l`): a glossary of WordNet
  ``word: definition`` lines, and one word's definition to recall.

Each example is a long shared *context* (what a sender variant prefills and a receiver reuses)
plus a short *instruction*. ``docs-qa`` and ``definitions`` ask up to
:data:`QUESTIONS_PER_CONTEXT` questions about each context, as many agents would about one shared
document; a ``code`` context ends right before its answer, so it serves one question.

Offline profiling (brief §2.3) picks the recomputed layers on one part of a task and reports on
another: ``part="profile"`` and ``part="test"`` draw from disjoint halves of the contexts (of the
source files for ``code``, of the glossary entries for ``definitions``), after a seeded shuffle.

>>> task = build_task("definitions", n=3, context_tokens=128)
>>> task.name, task.metric, len(task.examples)
('definitions', 'rouge_l', 3)
>>> example = task.examples[0]
>>> approx_tokens(example.context) <= 128, example.reference in example.context
(True, True)
>>> task.score(example.reference, example)
1.0
"""

from __future__ import annotations

import io
import random
import re
import tokenize
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from datahall.kvshare.corpora import dictionary_entries, pydoc_topics, stdlib_sources
from datahall.kvshare.metrics import METRICS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "QUESTIONS_PER_CONTEXT",
    "TASKS",
    "Count",
    "Example",
    "Part",
    "Task",
    "approx_tokens",
    "build_task",
    "chat_prompt",
]

TASKS = ("docs-qa", "code", "definitions")
"""The task names :func:`build_task` knows."""
QUESTIONS_PER_CONTEXT = 5
"""At most this many examples share one context."""
MIN_FILL = 0.5
"""A context shorter than this share of ``context_tokens`` is not used (a source ran out)."""
CODE_ROUNDS = 4
"""At most this many ``code`` examples (each with its own context) come from one module."""

Part = Literal["profile", "test"]
Count = Callable[[str], int]
"""Counts the tokens of a text."""
T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One question: the shared ``context``, the receiver's ``instruction`` and the
    ``reference`` answer. ``id`` is unique within a task and names the source."""

    id: str
    context: str
    instruction: str
    reference: str


@dataclass(frozen=True)
class Task:
    """A named set of examples, the metric (a key of :data:`~datahall.kvshare.metrics.METRICS`)
    that scores them, and how many tokens an answer may take."""

    name: str
    metric: str
    max_new_tokens: int
    examples: tuple[Example, ...]

    def score(self, prediction: str, example: Example) -> float:
        """The task's metric of ``prediction`` against ``example.reference``, in [0, 1]."""
        return METRICS[self.metric](prediction, example.reference)


def approx_tokens(text: str) -> int:
    """The default token count: one token per four characters (no tokenizer needed).

    >>> approx_tokens("twelve chars")
    3
    """
    return len(text) // 4


def build_task(
    name: str,
    n: int = 60,
    *,
    seed: int = 0,
    context_tokens: int = 512,
    count_tokens: Count | None = None,
    part: Part = "test",
) -> Task:
    """The first ``n`` examples of task ``name`` for ``part``, deterministic given ``seed``.

    Every context has at most ``context_tokens`` tokens by ``count_tokens`` (default
    :func:`approx_tokens`; pass the model tokenizer's count for exact lengths), cut at a line
    boundary as close to that budget as the source allows, and at least half of it. Raises
    ValueError when the eval data cannot give ``n`` examples.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    if part not in ("profile", "test"):
        raise ValueError(f"part must be 'profile' or 'test', got {part!r}")
    if n < 1 or context_tokens < 1:
        raise ValueError(f"n and context_tokens must be positive, got n={n}, {context_tokens=}")
    count = count_tokens or approx_tokens
    build, metric, max_new_tokens = _BUILDERS[name]
    rng = random.Random(f"datahall.kvshare.tasks:{name}:{seed}")
    examples = build(n, rng, context_tokens, count, part)
    if len(examples) < n:
        raise ValueError(
            f"task {name!r} has only {len(examples)} {part} examples with "
            f"context_tokens={context_tokens} (asked for n={n}); ask for fewer examples or "
            "change context_tokens"
        )
    return Task(name, metric, max_new_tokens, tuple(examples[:n]))


def chat_prompt(
    tokenizer: PreTrainedTokenizerBase, example: Example
) -> tuple[list[int], list[int]]:
    """Token ids ``(prefix, suffix)`` of the chat-templated prompt for ``example``.

    The user turn is ``context + "\\n\\n" + instruction``. ``prefix`` runs from the start of the
    template (system turn, user-turn header) to the end of the context, so it depends only on
    the context: that is the part whose KV cache variants share. ``suffix`` is the instruction,
    the end of the user turn and the assistant header. The two are tokenized separately
    (``add_special_tokens=False``); the cut falls where the template's text has a pre-token
    boundary (before ``"\\n\\n"``), so for byte-level BPE tokenizers such as SmolLM2's their
    concatenation equals the tokenized full prompt.
    """
    content = f"{example.context}\n\n{example.instruction}"
    messages = [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    start = text.find(content)
    if start < 0:
        raise ValueError(
            "the tokenizer's chat template changed the user message, so the context cannot be "
            "cut out of the prompt; use a template that inserts message content verbatim"
        )
    cut = start + len(example.context)
    encode = tokenizer.encode
    return (
        encode(text[:cut], add_special_tokens=False),
        encode(text[cut:], add_special_tokens=False),
    )


# --- shared helpers -----------------------------------------------------------------------


def _fit(items: Sequence[str], start: int, budget: int, count: Count, guess: int = 1) -> int:
    """The largest ``end`` with ``count("\\n".join(items[start:end])) <= budget`` (assuming
    counts grow with appended lines), or ``start`` if even one item is too long.

    Gallops up or down from ``start + guess`` (say, the previous chunk's size), then bisects,
    so a good guess costs a handful of counts rather than two dozen.

    >>> _fit(["aaaa", "bbbb", "cccc"], 0, 9, len)  # "aaaa\\nbbbb" has 9 characters
    2
    """
    size = len(items)

    def fits(end: int) -> bool:
        return count("\n".join(items[start:end]).strip()) <= budget

    # Invariant: fits(lo), and hi is past the end or does not fit.
    probe = min(start + max(guess, 1), size)
    if probe > start and fits(probe):
        lo, step = probe, 1
        while lo + step <= size and fits(lo + step):
            lo, step = lo + step, step * 2
        hi = min(lo + step, size + 1)
    else:
        hi, step = max(probe, start + 1), 1
        while hi - step > start and not fits(hi - step):
            hi, step = hi - step, step * 2
        lo = max(hi - step, start)  # fits, or is start (the empty text)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _half(items: Sequence[T], rng: random.Random, part: Part) -> list[T]:
    """A seeded shuffle of ``items``, then its first half for ``profile``, second for ``test``."""
    order = list(items)
    rng.shuffle(order)
    middle = len(order) // 2
    return order[:middle] if part == "profile" else order[middle:]


# --- docs-qa --------------------------------------------------------------------------------

_STOPWORD_TEXT = """
    a about above after again against all also although always among an and another any are as
    at be because been before being below between both but by can cannot could did do does
    doing done down during each either else even every few first for from further given had has
    have having here how however if in into is it its itself just last least less like made
    make many may might more most much must need never new next no none nor not now number of
    off often on once one only or other otherwise our out over own part per same second see
    several shall should since so some such than that the their them then there therefore
    these they this those though through thus to too two under until up upon us use used uses
    using usually very via was way we well were what when where whether which while who whose
    why will with within without would yet you your"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"*(])")
_WORD = re.compile(r"(?<![\w\"'.-])[A-Za-z][a-z]+(?:-[a-z]+)*(?![\w\"'-])")
_UNDERLINE = re.compile(r"^\s*([*=\-~^#])\1{2,}\s*$")
_LIST_MARKER = re.compile(r"^(?:\*|\d+\.)\s+")


def _docs_contexts(budget: int, count: Count) -> list[tuple[str, str]]:
    """(label, text) chunks of the eval pydoc topics concatenated in name order: each starts
    at a paragraph and takes as many whole lines as fit in ``budget``."""
    lines: list[str] = []
    where: list[str] = []  # "topic:line" of each line, for labels
    for topic, text in pydoc_topics("eval"):
        body = text.strip().splitlines() + [""]
        lines += body
        where += [f"{topic}:{i + 1}" for i in range(len(body))]
    starts = [
        i for i, line in enumerate(lines) if line.strip() and (i == 0 or not lines[i - 1].strip())
    ]
    contexts = []
    start_index, guess = 0, 1
    while start_index < len(starts):
        start = starts[start_index]
        end = _fit(lines, start, budget, count, guess)
        guess = max(end - start, 1)
        text = "\n".join(lines[start:end]).strip()
        if end > start and count(text) >= MIN_FILL * budget:
            contexts.append((where[start], text))
        while start_index < len(starts) and starts[start_index] < max(end, start + 1):
            start_index += 1
    return contexts


def _sentences(context: str) -> list[str]:
    """Prose sentences of a pydoc chunk, each on one line: indented paragraphs (grammar,
    code, nested lists) and headings are skipped."""
    out = []
    for paragraph in re.split(r"\n\s*\n", context):
        rows = paragraph.splitlines()
        if not rows or rows[0][:1].isspace() or any(_UNDERLINE.match(row) for row in rows):
            continue
        text = _LIST_MARKER.sub("", " ".join(row.strip() for row in rows))
        for sentence in _SENTENCE_END.split(text):
            if (
                sentence.endswith(".")
                and 8 <= len(sentence.split()) <= 30
                and ">>>" not in sentence
            ):
                out.append(" ".join(sentence.split()))
    return [s for s in out if out.count(s) == 1]


def _mention(sentence: str, context: str, rng: random.Random) -> str | None:
    """A content word of ``sentence`` (five letters or more, not a stopword) that occurs once
    in the whole ``context``, so it singles the sentence out; None if there is none."""
    lowered = context.lower()
    words = {
        m.group()
        for m in _WORD.finditer(sentence)
        if len(m.group()) >= 5
        and m.group().lower() not in _STOPWORDS
        and len(re.findall(rf"(?<![\w-]){re.escape(m.group().lower())}(?![\w-])", lowered)) == 1
    }
    return rng.choice(sorted(words)) if words else None


def _docs_qa(n: int, rng: random.Random, budget: int, count: Count, part: Part) -> list[Example]:
    examples: list[Example] = []
    for label, context in _half(_docs_contexts(budget, count), rng, part):
        sentences = _sentences(context)
        rng.shuffle(sentences)
        asked = 0
        for sentence in sentences:
            word = _mention(sentence, context, rng)
            if word is None:
                continue
            instruction = f'Quote the sentence of the documentation above that mentions "{word}".'
            examples.append(Example(f"docs-qa/{label}/{asked}", context, instruction, sentence))
            asked += 1
            if asked == QUESTIONS_PER_CONTEXT:
                break
        if len(examples) >= n:
            break
    return examples


# --- code -----------------------------------------------------------------------------------

CODE_INSTRUCTION = "Continue the Python code above. Write only the next line."
CODE_TAIL, CODE_TAIL_MIN = 8, 8
"""A ``code`` context ends in the last eighth (at least 8 lines) of the longest module prefix
that fits the budget, so it stays close to the budget."""
_GENERATED = re.compile(r"generated (by|from)|gencodec", re.IGNORECASE)


def _string_rows(source: str, stop: int) -> set[int]:
    """0-based indices of lines before ``stop`` that lie (partly) inside a multi-line string
    literal (the tokenizer reads no further than needed)."""
    rows: set[int] = set()
    kinds = {tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.start[0] > stop:
            break
        if token.type in kinds and token.start[0] != token.end[0]:
            rows.update(range(token.start[0] - 1, token.end[0]))
    return rows


def _generated(source: str) -> bool:
    """Whether a module says it was generated (codec tables and the like): not code to
    complete."""
    return _GENERATED.search(source[:2000]) is not None


def _code_candidates(
    path: str, source: str, budget: int, count: Count, rng: random.Random
) -> list[Example]:
    """Examples from one module, in seeded order: the context is the module up to a line L in
    the last eighth of the longest prefix that fits, and the reference is the next line, which
    must be code (not blank, a comment or inside a string), at least 8 characters long and
    absent from the context."""
    lines = source.splitlines()
    end = _fit(lines, 0, budget, count)
    try:
        in_string = _string_rows(source, end + 1)
    except (tokenize.TokenError, SyntaxError):
        return []
    out = []
    for i in range(end - 1, end - 1 - max(CODE_TAIL_MIN, end // CODE_TAIL), -1):
        if i + 1 >= len(lines) or i < 0:
            continue
        last, reference = lines[i].strip(), lines[i + 1].strip()
        if not last or last.startswith("#") or i + 1 in in_string:
            continue
        if len(reference) < 8 or reference.startswith("#"):
            continue
        context = "\n".join(lines[: i + 1]).strip()
        if reference in context or count(context) < MIN_FILL * budget:
            continue
        out.append(Example(f"code/{path}:{i + 2}", context, CODE_INSTRUCTION, reference))
    rng.shuffle(out)
    return out


def _code(n: int, rng: random.Random, budget: int, count: Count, part: Part) -> list[Example]:
    """Round-robin over the part's modules (one example each, then a second, ...), so that a
    small task still spans many modules."""
    written = [(path, text) for path, text in stdlib_sources("eval") if not _generated(text)]
    modules = _half(written, rng, part)
    candidates: list[list[Example]] = []
    examples: list[Example] = []
    for path, source in modules:
        candidates.append(_code_candidates(path, source, budget, count, rng))
        if candidates[-1]:
            examples.append(candidates[-1][0])
        if len(examples) >= n:
            return examples
    for rank in range(1, CODE_ROUNDS):
        for found in candidates:
            if len(found) > rank:
                examples.append(found[rank])
            if len(examples) >= n:
                return examples
    return examples


# --- definitions ----------------------------------------------------------------------------


def _definitions(
    n: int, rng: random.Random, budget: int, count: Count, part: Part
) -> list[Example]:
    """Consecutive glossaries of the part's (shuffled) WordNet entries, each filling the
    budget; up to :data:`QUESTIONS_PER_CONTEXT` of its words are asked."""
    entries = _half(dictionary_entries("eval"), rng, part)
    lines = [f"{word}: {definition}" for word, definition in entries]
    examples: list[Example] = []
    start, guess = 0, 1
    while start < len(lines) and len(examples) < n:
        end = _fit(lines, start, budget, count, guess)
        guess = max(end - start, 1)
        if end == start:  # one entry longer than the budget
            start += 1
            continue
        glossary = "\n".join(lines[start:end])
        if count(glossary) < MIN_FILL * budget:
            break
        for i in sorted(rng.sample(range(start, end), min(QUESTIONS_PER_CONTEXT, end - start))):
            word, definition = entries[i]
            instruction = (
                f"According to the glossary above, what is the definition of '{word}'? "
                "Answer with the definition only."
            )
            examples.append(Example(f"definitions/{word}", glossary, instruction, definition))
        start = end
    return examples


_BUILDERS = {
    "docs-qa": (_docs_qa, "token_f1", 56),
    "code": (_code, "edit_similarity", 32),
    "definitions": (_definitions, "rouge_l", 32),
}
