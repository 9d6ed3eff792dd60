"""Evaluation tasks: determinism, disjoint parts, sizes, context budgets, answers that are (or
are not) in the context, and the chat-prompt split at the shared context."""

from __future__ import annotations

import re
from collections import defaultdict
from functools import cache

import pytest

from datahall.kvshare.corpora import stdlib_sources
from datahall.kvshare.metrics import METRICS
from datahall.kvshare.tasks import (
    MIN_FILL,
    QUESTIONS_PER_CONTEXT,
    TASKS,
    Task,
    approx_tokens,
    build_task,
    chat_prompt,
)


@cache
def task(
    name: str, n: int = 60, seed: int = 0, context_tokens: int = 512, part: str = "test"
) -> Task:
    return build_task(name, n, seed=seed, context_tokens=context_tokens, part=part)


def by_context(t: Task) -> dict[str, list]:
    groups = defaultdict(list)
    for example in t.examples:
        groups[example.context].append(example)
    return groups


@pytest.mark.parametrize("name", TASKS)
def test_shape(name):
    t = task(name)
    assert t.name == name and t.metric in METRICS and len(t.examples) == 60
    assert t.max_new_tokens == {"docs-qa": 56, "code": 32, "definitions": 32}[name]
    assert len({e.id for e in t.examples}) == 60
    for example in t.examples:
        assert example.context and example.instruction and example.reference
        assert example.reference == example.reference.strip()
        assert t.score(example.reference, example) == 1.0


@pytest.mark.parametrize("name", TASKS)
def test_deterministic_given_seed(name):
    again = build_task(name, 60, seed=0, context_tokens=512)
    assert again == task(name)
    assert task(name, seed=1).examples != task(name).examples


@pytest.mark.parametrize("name", TASKS)
def test_profile_and_test_are_disjoint(name):
    profile, test = task(name, part="profile"), task(name, part="test")
    assert not {e.id for e in profile.examples} & {e.id for e in test.examples}
    assert not {e.context for e in profile.examples} & {e.context for e in test.examples}
    assert not {e.reference for e in profile.examples} & {e.reference for e in test.examples} or (
        name == "docs-qa"  # the same word may be blanked in two different documents
    )


@pytest.mark.parametrize("context_tokens", [256, 512, 1024])
@pytest.mark.parametrize("part", ["profile", "test"])
@pytest.mark.parametrize("name", TASKS)
def test_fifty_examples_within_budget(name, part, context_tokens):
    t = task(name, 50, context_tokens=context_tokens, part=part)
    assert len(t.examples) == 50
    for context in by_context(t):
        assert MIN_FILL * context_tokens <= approx_tokens(context) <= context_tokens
        assert context == context.strip()


def test_count_tokens_is_used():
    def words(text: str) -> int:
        return len(text.split())

    t = build_task("definitions", 20, context_tokens=100, count_tokens=words)
    for context in by_context(t):
        assert 50 <= words(context) <= 100
    assert approx_tokens(t.examples[0].context) > 100  # so the default count was not used


@pytest.mark.parametrize("name", ["docs-qa", "definitions"])
def test_several_questions_per_context(name):
    groups = by_context(task(name))
    assert len(groups) < len(task(name).examples)
    for examples in groups.values():
        assert len(examples) <= QUESTIONS_PER_CONTEXT
        assert len({e.instruction for e in examples}) == len(examples)


def test_docs_qa_quotes_the_one_sentence_that_mentions_the_word():
    for example in task("docs-qa").examples:
        word = re.fullmatch(
            r'Quote the sentence of the documentation above that mentions "(.+)"\.',
            example.instruction,
        ).group(1)
        flat = " ".join(example.context.split())
        assert example.reference in flat
        assert word in example.reference
        assert len(re.findall(rf"(?<![\w-]){word.lower()}(?![\w-])", flat.lower())) == 1
        assert 8 <= len(example.reference.split()) <= 30


def test_code_reference_is_next_line_not_in_context():
    sources = dict(stdlib_sources("eval"))
    for example in task("code").examples:
        path, line = example.id.removeprefix("code/").rsplit(":", 1)
        lines = sources[path].splitlines()
        assert example.context == "\n".join(lines[: int(line) - 1]).strip()
        assert lines[int(line) - 1].strip() == example.reference
        assert example.reference not in example.context
        assert not example.reference.startswith("#")
        assert example.instruction == "Continue the Python code above. Write only the next line."
    assert len({e.id.split(":")[0] for e in task("code").examples}) >= 30  # many modules


def test_definitions_word_is_in_glossary():
    for example in task("definitions").examples:
        word = re.search(r"definition of '(.+)'\?", example.instruction).group(1)
        assert f"{word}: {example.reference}" in example.context.splitlines()
        assert example.id == f"definitions/{word}"


def test_errors_explain():
    with pytest.raises(ValueError, match="unknown task 'qa'"):
        build_task("qa")
    with pytest.raises(ValueError, match="part must be"):
        build_task("code", part="train")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"only \d+ test examples .* ask for fewer"):
        build_task("docs-qa", 10_000, context_tokens=1024)


# --- chat_prompt, with SmolLM2's real tokenizer (no model forward) --------------------------


def test_chat_prompt_splits_the_full_prompt(tokenizer):
    for name in TASKS:
        for example in task(name).examples[:12]:
            prefix, suffix = chat_prompt(tokenizer, example)
            message = {"role": "user", "content": f"{example.context}\n\n{example.instruction}"}
            full = tokenizer.apply_chat_template(
                [message], tokenize=True, add_generation_prompt=True
            )
            full = list(full["input_ids"] if hasattr(full, "keys") else full)
            assert prefix + suffix == full
            assert tokenizer.decode(prefix).endswith(example.context)
            assert tokenizer.decode(suffix) == (
                f"\n\n{example.instruction}<|im_end|>\n<|im_start|>assistant\n"
            )


def test_chat_prompt_prefix_is_shared_per_context(tokenizer):
    for name in ("docs-qa", "definitions"):
        for examples in list(by_context(task(name)).values())[:3]:
            prefixes = {tuple(chat_prompt(tokenizer, e)[0]) for e in examples}
            suffixes = {tuple(chat_prompt(tokenizer, e)[1]) for e in examples}
            assert len(prefixes) == 1 and len(suffixes) == len(examples)


def test_real_token_budget(tokenizer):
    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    for name in ("code", "definitions"):  # docs-qa would tokenize all its chunks (~1 s)
        t = build_task(name, 10, context_tokens=256, count_tokens=count)
        for context in by_context(t):
            assert MIN_FILL * 256 <= count(context) <= 256
