"""Prefix hashes and the prefix index (brief §2.3; invariants of §2.6 item 4)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datahall.gateway.prefix import (
    BLOCK_CHARS,
    HASH_NAME,
    LRU_CAPACITY_PER_ENDPOINT,
    MAX_BLOCKS,
    PrefixIndex,
    hash64,
    prefix_hashes,
    request_hashes,
    request_text,
)

needs_xxhash = pytest.mark.skipif(HASH_NAME != "xxh64", reason="xxhash is not installed")


def test_gie_defaults():
    assert (BLOCK_CHARS, MAX_BLOCKS, LRU_CAPACITY_PER_ENDPOINT) == (64, 256, 31_250)


@needs_xxhash
def test_hash64_is_xxh64_seed_0():
    # the published XXH64 test vector of the empty input with seed 0
    assert hash64(b"") == 0xEF46DB3751D8E999


@needs_xxhash
def test_chain_layout_is_gies():
    import xxhash

    text = "a" * 64 + "b" * 64 + "c" * 5
    h0 = xxhash.xxh64_intdigest(b"llama-3" + b"tenant-7")
    h1 = xxhash.xxh64_intdigest(b"a" * 64 + h0.to_bytes(8, "little"))
    h2 = xxhash.xxh64_intdigest(b"b" * 64 + h1.to_bytes(8, "little"))
    assert prefix_hashes("llama-3", text, cache_salt="tenant-7") == [h1, h2]


def test_blocks_full_only_and_capped():
    assert prefix_hashes("m", "") == []
    assert prefix_hashes("m", "x" * 63) == []
    assert len(prefix_hashes("m", "x" * 64)) == 1
    assert len(prefix_hashes("m", "x" * 127)) == 1
    assert len(prefix_hashes("m", "x" * 64 * 300)) == MAX_BLOCKS
    assert len(prefix_hashes("m", "x" * 100, block_chars=10, max_blocks=3)) == 3
    assert prefix_hashes("m", "x" * 100, max_blocks=0) == []


def test_blocks_are_utf8_bytes():
    # 32 two-byte characters make one 64-byte block, as GIE cuts the body's bytes
    assert len(prefix_hashes("m", "é" * 32)) == 1
    assert prefix_hashes("m", "é" * 32) == prefix_hashes("m", ("é" * 32).encode())


def test_model_and_salt_change_every_hash():
    text = "q" * 64 * 4
    base = prefix_hashes("m", text)
    for other in (prefix_hashes("n", text), prefix_hashes("m", text, cache_salt="s")):
        assert all(a != b for a, b in zip(base, other, strict=True))


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_chars"):
        prefix_hashes("m", "x", block_chars=0)
    with pytest.raises(ValueError, match="max_blocks"):
        prefix_hashes("m", "x", max_blocks=-1)


@settings(max_examples=60, deadline=None)
@given(prefix=st.text(max_size=400), a=st.text(max_size=200), b=st.text(max_size=200))
def test_equal_prefixes_give_equal_chains(prefix, a, b):
    n = len(prefix.encode()) // BLOCK_CHARS
    ha, hb = prefix_hashes("m", prefix + a), prefix_hashes("m", prefix + b)
    assert ha[:n] == hb[:n]
    assert prefix_hashes("m", prefix + a) == ha  # deterministic


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=64, max_size=64 * 8),
    where=st.integers(0, 10**6),
    flip=st.integers(1, 255),
)
def test_one_byte_changes_its_block_and_after_only(data, where, flip):
    pos = where % len(data)
    changed = bytearray(data)
    changed[pos] ^= flip
    before, after = prefix_hashes("m", data), prefix_hashes("m", bytes(changed))
    i = pos // BLOCK_CHARS
    assert len(before) == len(after)
    assert before[:i] == after[:i]
    assert all(x != y for x, y in zip(before[i:], after[i:], strict=True))


def test_request_text_chat():
    body = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image_url", "image_url": {"url": "u"}}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
        ]
    }  # fmt: skip
    assert request_text(body) == (
        "system: You are terse.\n"
        'user: Look: {"image_url":{"url":"u"},"type":"image_url"}\n'
        'assistant: [{"id":"c1"}]\n'
    )


def test_request_text_shared_system_prompt_is_a_shared_prefix():
    system = {"role": "system", "content": "S" * 500}
    one = {"model": "m", "messages": [system, {"role": "user", "content": "first question"}]}
    two = {"model": "m", "messages": [system, {"role": "user", "content": "another one"}]}
    h1, h2 = request_hashes(one), request_hashes(two)
    shared = len("system: " + "S" * 500 + "\n") // BLOCK_CHARS
    assert h1[:shared] == h2[:shared] and len(h1) >= shared


def test_request_text_completions_and_errors():
    assert request_text({"prompt": "abc"}) == "abc"
    assert request_text({"prompt": ["ab", "cd"]}) == "ab\ncd"
    assert request_text({"prompt": [1, 2, 3]}) == "1 2 3"
    assert request_text({"prompt": [[1, 2], [3]]}) == "1 2\n3"
    with pytest.raises(ValueError, match="neither"):
        request_text({"model": "m"})
    with pytest.raises(ValueError, match="list"):
        request_text({"messages": "hi"})


def test_request_hashes_uses_model_and_cache_salt():
    body = {"model": "m", "prompt": "p" * 128}
    assert request_hashes(body) == prefix_hashes("m", "p" * 128)
    salted = request_hashes({**body, "cache_salt": "t1"})
    assert salted == prefix_hashes("m", "p" * 128, cache_salt="t1") != request_hashes(body)


def test_index_counts_consecutive_blocks_from_the_first():
    index: PrefixIndex[str] = PrefixIndex()
    index.record("a", [1, 2, 3, 4])
    index.record("b", [1, 3, 4])  # holds blocks 0, 2 and 3, not 1
    index.record("c", [2, 3])
    assert index.match([1, 2, 3, 4]) == {"a": 4, "b": 1}
    assert index.match([1, 2]) == {"a": 2, "b": 1}
    assert index.match([2, 3]) == {"a": 2, "c": 2}
    assert index.match([9, 1]) == {}
    assert index.match([]) == {}


def test_index_lru_evicts_chain_tails_first():
    index: PrefixIndex[str] = PrefixIndex(capacity_per_endpoint=3)
    index.record("a", [1, 2, 3, 4, 5])
    assert index.size("a") == 3
    assert index.match([1, 2, 3, 4, 5]) == {"a": 3}
    index.record("a", [7, 8])  # the newest chain pushes out the oldest tail
    assert index.match([7, 8]) == {"a": 2}
    assert index.match([1, 2]) == {"a": 1}
    assert len(index) == 3


def test_index_match_does_not_refresh_and_record_does():
    index: PrefixIndex[str] = PrefixIndex(capacity_per_endpoint=2)
    index.record("a", [1])
    index.record("a", [2])
    index.match([1])  # reading is no use: 1 stays the oldest
    index.record("a", [3])
    assert index.match([1]) == {} and index.match([2]) == {"a": 1}
    index.record("a", [2])  # recording again refreshes 2
    index.record("a", [4])
    assert index.match([2]) == {"a": 1} and index.match([3]) == {}


def test_index_remove_and_zero_capacity():
    index: PrefixIndex[tuple[str, int]] = PrefixIndex()
    index.record(("10.0.0.1", 8000), [1, 2])
    index.record(("10.0.0.2", 8000), [1])
    index.remove(("10.0.0.1", 8000))
    assert index.match([1, 2]) == {("10.0.0.2", 8000): 1}
    assert index.endpoints() == [("10.0.0.2", 8000)]
    index.remove(("nowhere", 1))  # unknown: nothing happens
    empty: PrefixIndex[str] = PrefixIndex(capacity_per_endpoint=0)
    empty.record("a", [1, 2])
    assert empty.match([1]) == {} and len(empty) == 0
    with pytest.raises(ValueError, match="capacity"):
        PrefixIndex(capacity_per_endpoint=-1)


@settings(max_examples=40, deadline=None)
@given(
    chains=st.lists(
        st.tuples(st.sampled_from("abc"), st.lists(st.integers(0, 20), max_size=8)), max_size=12
    ),
    query=st.lists(st.integers(0, 20), max_size=8),
)
def test_index_match_agrees_with_a_brute_force_model(chains, query):
    index: PrefixIndex[str] = PrefixIndex(capacity_per_endpoint=10**6)
    held: dict[str, set[int]] = {}
    for endpoint, hashes in chains:
        index.record(endpoint, hashes)
        held.setdefault(endpoint, set()).update(hashes)
    expected = {}
    for endpoint, hashes in held.items():
        n = 0
        while n < len(query) and query[n] in hashes:
            n += 1
        if n:
            expected[endpoint] = n
    assert index.match(query) == expected
