"""Token rate limits and size limits (brief ai-gateway.md §2.5; issue 6 item 6)."""

from __future__ import annotations

import json
import logging

import pytest

from datahall.gateway.ratelimit import (
    RateLimit,
    RedisTokenRateLimiter,
    SizeLimits,
    TokenRateLimiter,
    estimate_prompt_tokens,
    format_duration,
    usage_tokens,
)
from datahall.gateway.transform import PolicyError

KEY = {"key:app": RateLimit(tokens_per_minute=600)}  # refills 10 tokens per second


# --- estimates --------------------------------------------------------------------------------


def test_estimate_counts_texts_in_both_apis_but_not_ids_or_images():
    body = {
        "messages": [
            {"role": "system", "content": "x" * 8},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "y" * 8},
                    {"type": "image_url", "image_url": {"url": "data:" + "A" * 9999}},
                ],
            },
            {
                "role": "assistant",
                "tool_calls": [{"id": "call_123", "function": {"name": "ab", "arguments": "{}"}}],
            },
            {"role": "tool", "tool_call_id": "call_123", "content": "zz"},
        ]
    }
    # 8 + 8 + ("ab" + "{}" = 4) + 2 = 22 chars -> 6 tokens
    assert estimate_prompt_tokens(body) == 6
    anthropic = {
        "system": "s" * 4,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t", "content": "r" * 4}],
            }
        ],
    }
    assert estimate_prompt_tokens(anthropic) == 2
    assert estimate_prompt_tokens({"input": ["abcd", "efgh"]}) == 2
    assert estimate_prompt_tokens({"prompt": [1, 2, 3]}) == 3
    tools = [{"type": "function", "function": {"name": "f"}}]
    # tool definitions count as their JSON text: 49 characters here
    assert len(json.dumps(tools)) == 49
    assert estimate_prompt_tokens({"messages": [], "tools": tools}) == 13
    assert estimate_prompt_tokens({}) == 0


def test_usage_tokens():
    assert usage_tokens({"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}) == 12
    assert usage_tokens({"input_tokens": 7, "output_tokens": 5}) == 12
    assert usage_tokens({}) is None
    assert usage_tokens(None) is None
    assert usage_tokens(9) == 9


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0ms"),
        (0.0004, "1ms"),
        (0.25, "250ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (59.9991, "60s"),
        (60, "1m0s"),
        (90.5, "1m30.5s"),
        (360, "6m0s"),
    ],
)
def test_durations_as_openai_writes_them(seconds, text):
    assert format_duration(seconds) == text


def test_limits_are_positive():
    with pytest.raises(ValueError, match="requests_per_minute"):
        RateLimit(requests_per_minute=-1)


# --- bucket arithmetic under a fake clock -------------------------------------------------------


def test_admit_deny_retry_after_exact_values(clock):
    limiter = TokenRateLimiter(clock=clock)
    first = limiter.acquire(KEY, estimate=500)
    assert first.allowed
    assert first.headers == {
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "100",
        "x-ratelimit-reset-tokens": "50s",  # 500 tokens at 10/s
    }
    denied = limiter.acquire(KEY, estimate=200)  # 100 left: 100 more take 10 s
    assert not denied.allowed and denied.reservation is None
    assert denied.retry_after_s == 10.0
    assert denied.headers == {
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "100",
        "x-ratelimit-reset-tokens": "50s",
        "retry-after": "10",
        "retry-after-ms": "10000",
    }
    error = denied.error()
    assert error.status == 429 and error.headers == denied.headers
    assert error.openai_body() == {
        "error": {
            "message": "rate limit reached for API key 'app': 600 tokens per minute; this request "
            "needs about 200 tokens and 100 are left. Retry after 10 s.",
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    with pytest.raises(PolicyError):
        denied.raise_for_limit()
    clock.now += 9.5  # 195 tokens: still short, 0.5 s to go
    again = limiter.acquire(KEY, estimate=200)
    assert not again.allowed and again.retry_after_s == pytest.approx(0.5)
    assert again.headers["retry-after"] == "1" and again.headers["retry-after-ms"] == "500"
    clock.now += 0.5
    ok = limiter.acquire(KEY, estimate=200)
    assert ok.allowed and ok.headers["x-ratelimit-remaining-tokens"] == "0"
    ok.raise_for_limit()


def test_bucket_refills_to_capacity_and_no_further(clock):
    limiter = TokenRateLimiter(clock=clock)
    limiter.acquire(KEY, estimate=600)
    clock.now += 3600
    assert limiter.acquire(KEY, estimate=1).headers["x-ratelimit-remaining-tokens"] == "599"


def test_reconcile_charges_the_real_usage(clock):
    limiter = TokenRateLimiter(clock=clock)
    taken = limiter.acquire(KEY, estimate=100)
    # 100 estimated, 400 used: 300 more come off the bucket (600 - 400 = 200 left)
    limiter.reconcile(taken.reservation, {"prompt_tokens": 150, "completion_tokens": 250})
    assert limiter.acquire(KEY, estimate=0).headers["x-ratelimit-remaining-tokens"] == "200"
    # a refund: 100 estimated, 20 used
    taken = limiter.acquire(KEY, estimate=100)
    limiter.reconcile(taken.reservation, 20)
    assert limiter.acquire(KEY, estimate=0).headers["x-ratelimit-remaining-tokens"] == "180"
    # unknown usage keeps the estimate; refunds never overfill the bucket
    taken = limiter.acquire(KEY, estimate=100)
    limiter.reconcile(taken.reservation, None)
    assert limiter.acquire(KEY, estimate=0).headers["x-ratelimit-remaining-tokens"] == "80"
    limiter.reconcile(taken.reservation, -10_000)
    assert limiter.acquire(KEY, estimate=0).headers["x-ratelimit-remaining-tokens"] == "600"


def test_debt_after_reconcile_makes_the_next_request_wait(clock):
    limiter = TokenRateLimiter(clock=clock)
    taken = limiter.acquire(KEY, estimate=500)
    limiter.reconcile(taken.reservation, 900)  # 300 in debt
    denied = limiter.acquire(KEY, estimate=100)
    assert denied.headers["x-ratelimit-remaining-tokens"] == "0"
    assert denied.retry_after_s == 40.0  # (100 + 300) / 10
    assert denied.headers["x-ratelimit-reset-tokens"] == "1m30s"  # 900 tokens to full


def test_a_prompt_larger_than_the_budget_runs_once_the_bucket_is_full(clock):
    limiter = TokenRateLimiter(clock=clock)
    assert limiter.acquire(KEY, estimate=1500).allowed  # needs a full bucket, not 1500
    denied = limiter.acquire(KEY, estimate=1500)
    assert denied.retry_after_s == 150.0  # 900 in debt + 600 to fill, at 10/s


def test_requests_per_minute(clock):
    limiter = TokenRateLimiter(clock=clock)
    limits = {"key:app": RateLimit(requests_per_minute=2)}
    a, b, c = (limiter.acquire(limits, estimate=10) for _ in range(3))
    assert a.allowed and b.allowed and not c.allowed
    assert a.headers == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "30s",
    }
    assert c.headers["retry-after"] == "30" and c.unit == "requests"
    assert c.error().openai_body()["error"]["type"] == "requests"
    clock.now += 30
    assert limiter.acquire(limits, estimate=10).allowed


def test_key_and_tenant_are_all_or_nothing(clock):
    limiter = TokenRateLimiter(clock=clock)
    tenant = {"tenant:acme": RateLimit(tokens_per_minute=1000)}
    a = {"key:a": RateLimit(tokens_per_minute=600), **tenant}
    b = {"key:b": RateLimit(tokens_per_minute=600), **tenant}
    assert limiter.acquire(a, estimate=600).allowed
    assert limiter.acquire(b, estimate=300).allowed
    denied = limiter.acquire(b, estimate=200)  # key b has 300, the tenant only 100
    assert not denied.allowed and "tenant 'acme'" in denied.message
    assert denied.retry_after_s == pytest.approx(6.0)  # 100 tokens at 1000/60 per second
    assert denied.headers["retry-after"] == "6"
    # the refusal took nothing from key b, whose own bucket had room
    ok = limiter.acquire({"key:b": RateLimit(tokens_per_minute=600)}, estimate=0)
    assert ok.headers["x-ratelimit-remaining-tokens"] == "300"


def test_unlimited_subjects_send_no_headers():
    decision = TokenRateLimiter().acquire({"key:x": RateLimit()}, estimate=10**9)
    assert decision.allowed and decision.headers == {}


# --- size limits --------------------------------------------------------------------------------


def test_size_limits():
    limits = SizeLimits(max_body_bytes=100, max_messages=2, max_prompt_tokens=5)
    limits.check_body_bytes(100)
    with pytest.raises(PolicyError) as e:
        limits.check_body_bytes(101)
    assert e.value.status == 413 and e.value.code == "request_too_large"
    assert "101 bytes" in e.value.message
    assert limits.check({"messages": [{"role": "user", "content": "x" * 20}]}) == 5
    with pytest.raises(PolicyError) as e:
        limits.check({"messages": [{"role": "user", "content": "x" * 21}]})
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"
    with pytest.raises(PolicyError) as e:
        limits.check({"messages": [{}, {}, {}]})
    assert e.value.code == "too_many_messages"
    SizeLimits().check({"messages": [{}] * 10_000})


# --- Redis ------------------------------------------------------------------------------------


def test_redis_limiter_is_shared_by_two_replicas(redis_server, clock):
    clock.now = 1_700_000_000.0
    a = RedisTokenRateLimiter(redis_server.url, clock=clock, prefix="t1")
    b = RedisTokenRateLimiter(redis_server.url, clock=clock, prefix="t1")
    limits = {"key:app": RateLimit(tokens_per_minute=600, requests_per_minute=100)}
    first = a.acquire(limits, estimate=500)
    assert first.allowed and first.reservation.store == "redis"
    assert first.headers["x-ratelimit-remaining-tokens"] == "100"
    denied = b.acquire(limits, estimate=200)
    assert not denied.allowed
    assert denied.retry_after_s == 10.0 and denied.headers["retry-after"] == "10"
    assert denied.headers["x-ratelimit-remaining-requests"] == "99"  # refusal took nothing
    b.reconcile(first.reservation, 300)  # a's request used less than estimated: 200 back
    assert a.acquire(limits, estimate=300).allowed
    clock.now += 30  # 300 tokens refilled
    assert b.acquire(limits, estimate=0).headers["x-ratelimit-remaining-tokens"] == "300"
    assert a.fallbacks == b.fallbacks == 0


def test_redis_clock_is_used_when_none_is_given(redis_server):
    limiter = RedisTokenRateLimiter(redis_server.url, prefix="t2")
    limits = {"tenant:acme": RateLimit(tokens_per_minute=60)}
    assert limiter.acquire(limits, estimate=60).allowed
    denied = limiter.acquire(limits, estimate=30)
    assert not denied.allowed and 29.0 < denied.retry_after_s <= 30.0


def test_redis_outage_falls_back_to_the_local_bucket_and_logs(redis_server, caplog, clock):
    limiter = RedisTokenRateLimiter(redis_server.url, clock=clock, prefix="t3", retry_s=0)
    assert limiter.acquire(KEY, estimate=100).reservation.store == "redis"
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="datahall.gateway.ratelimit"):
        first = limiter.acquire(KEY, estimate=550)
        second = limiter.acquire(KEY, estimate=100)
    assert first.allowed and first.reservation.store == "local"
    assert not second.allowed and second.retry_after_s == 5.0  # the local bucket: 50 left
    assert limiter.fallbacks == 2
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1  # one per outage, not one per request
    limiter.reconcile(first.reservation, 500)  # goes to the local bucket that took it
    redis_server.start()  # same port, empty: shared again
    with caplog.at_level(logging.WARNING, logger="datahall.gateway.ratelimit"):
        back = limiter.acquire(KEY, estimate=100)
    assert back.reservation.store == "redis"
    assert back.headers["x-ratelimit-remaining-tokens"] == "500"
    assert any("is back" in r.getMessage() for r in caplog.records)


def test_unreachable_redis_is_not_an_error(clock):
    pytest.importorskip("redis")
    limiter = RedisTokenRateLimiter("redis://127.0.0.1:1/0", clock=clock, timeout_s=0.2)
    decision = limiter.acquire(KEY, estimate=600)
    assert decision.allowed and decision.reservation.store == "local"
    assert not limiter.acquire(KEY, estimate=10).allowed  # the local bucket is empty
