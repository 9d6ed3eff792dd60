"""Token-based rate limits per API key and per tenant, and request size limits.

[reconstruction] Brief ``ai-gateway.md`` §2.5 follows Azure API Management's ``llm-token-limit``
policy: a budget of tokens per minute per counter key, a 429 with ``Retry-After`` past it,
prompt tokens *estimated* before the request is sent and the real ``usage`` counted after, and
the remaining budget sent back in headers. The arithmetic here is ours:

- each subject (``key:<name>``, ``tenant:<name>``) has a token bucket of ``tokens_per_minute``
  that refills continuously at ``tokens_per_minute / 60`` per second, and a request bucket of
  ``requests_per_minute`` refilled the same way;
- :meth:`TokenRateLimiter.acquire` admits a request when every bucket holds what it needs (the
  estimate, at most a full bucket, so a prompt bigger than the budget still runs once the bucket
  is full), and then takes it from all of them at once: all or nothing;
- otherwise the answer is a 429 whose ``Retry-After`` is the time until the emptiest bucket holds
  enough, ``(need − level) / rate``;
- :meth:`TokenRateLimiter.reconcile` moves the bucket by ``actual − estimate`` once the answer's
  ``usage`` is known (prompt + completion tokens), so the bucket may go below zero: the debt is
  paid back by the refill, and the next request waits. As APIM documents, concurrent requests
  admitted on estimates may exceed the limit transiently.

>>> now = 0.0
>>> limiter = TokenRateLimiter(clock=lambda: now)
>>> limits = {"key:app": RateLimit(tokens_per_minute=600)}
>>> first = limiter.acquire(limits, estimate=500)
>>> first.allowed, first.headers["x-ratelimit-remaining-tokens"]
(True, '100')
>>> limiter.reconcile(first.reservation, {"prompt_tokens": 480, "completion_tokens": 120})
>>> second = limiter.acquire(limits, estimate=100)   # 0 tokens left, 10 refill per second
>>> second.allowed, second.headers["retry-after"], second.retry_after_s
(False, '10', 10.0)

:class:`RedisTokenRateLimiter` keeps the buckets in Redis (one atomic Lua script per decision,
plain Redis 7.0, no modules), so gateway replicas share the limits; while Redis is unreachable it
falls back to a local bucket and logs it. :class:`SizeLimits` checks body bytes, message count and
estimated prompt tokens.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from datahall.core.redis import FAILED, RedisLink
from datahall.gateway.transform import PolicyError

__all__ = [
    "Decision",
    "RateLimit",
    "RedisTokenRateLimiter",
    "Reservation",
    "SizeLimits",
    "TokenRateLimiter",
    "estimate_prompt_tokens",
    "format_duration",
    "usage_tokens",
]

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4
"""The usual pre-check estimate (brief §6): a token is about four characters of English."""
WINDOW_S = 60.0

Unit = Literal["tokens", "requests"]


# --- estimates and usage --------------------------------------------------------------------

# keys whose strings are not prompt text: roles, ids, and image payloads (a base64 image is
# not billed by its length)
_NOT_TEXT = frozenset(
    {"role", "type", "id", "tool_call_id", "tool_use_id", "image_url", "source", "cache_control"}
)


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    if isinstance(value, Mapping):
        return sum(_chars(v) for k, v in value.items() if k not in _NOT_TEXT)
    return 0


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Prompt tokens of a request estimated as characters / 4, rounded up (APIM's
    ``estimate-prompt-tokens``; brief §6). It counts message texts in either API, tool calls and
    results, Anthropic's ``system``, the ``prompt`` of completions and the ``input`` of
    embeddings (token-id lists count one per id), and the tool definitions.

    >>> estimate_prompt_tokens({"messages": [{"role": "user", "content": "x" * 10}]})
    3
    >>> estimate_prompt_tokens({"prompt": [[1, 2, 3], "abcd"]})
    4
    """
    chars = tokens = 0
    for key in ("messages", "system", "prompt", "input"):
        value = body.get(key)
        if key in ("prompt", "input") and isinstance(value, list):
            for item in value:
                if isinstance(item, int):
                    tokens += 1
                elif isinstance(item, list):
                    tokens += sum(1 for t in item if isinstance(t, int))
                else:
                    chars += _chars(item)
        else:
            chars += _chars(value)
    if body.get("tools"):
        chars += len(json.dumps(body["tools"], ensure_ascii=False))
    return tokens + math.ceil(chars / CHARS_PER_TOKEN)


def usage_tokens(usage: Mapping[str, Any] | int | None) -> int | None:
    """Tokens a finished request used: ``total_tokens``, else prompt + completion (OpenAI), else
    input + cache + output (Anthropic); None when unknown.

    >>> usage_tokens({"prompt_tokens": 7, "completion_tokens": 5})
    12
    >>> usage_tokens({"input_tokens": 7, "cache_read_input_tokens": 3, "output_tokens": 5})
    15
    """
    if usage is None or isinstance(usage, int):
        return usage
    if usage.get("total_tokens") is not None:
        return int(usage["total_tokens"])
    keys = (
        "prompt_tokens",
        "completion_tokens",
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "output_tokens",
    )
    if not any(usage.get(k) is not None for k in keys):
        return None
    return sum(int(usage.get(k) or 0) for k in keys)


def format_duration(seconds: float) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers write it.

    >>> format_duration(0.02), format_duration(1), format_duration(8.64), format_duration(360)
    ('20ms', '1s', '8.64s', '6m0s')
    """
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60)
    rest = math.ceil(rest * 1000) / 1000  # never promise a reset earlier than it is
    text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{text}s" if minutes else f"{text}s"


# --- limits, buckets, decisions ---------------------------------------------------------------


@dataclass(frozen=True)
class RateLimit:
    """The limits of one subject (an API key or a tenant); None means unlimited.

    >>> RateLimit(tokens_per_minute=0)
    Traceback (most recent call last):
    ...
    ValueError: tokens_per_minute must be a positive integer or None, got 0
    """

    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None

    def __post_init__(self) -> None:
        for name in ("tokens_per_minute", "requests_per_minute"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


@dataclass(frozen=True)
class _Bucket:
    subject: str
    unit: Unit
    capacity: float
    cost: float

    @property
    def key(self) -> str:
        return f"{self.subject}:{self.unit}"

    @property
    def rate(self) -> float:  # refill per second
        return self.capacity / WINDOW_S

    @property
    def need(self) -> float:
        # a request bigger than the whole budget runs once the bucket is full, rather than never
        return min(self.cost, self.capacity)


def _buckets(limits: Mapping[str, RateLimit], estimate: int) -> list[_Bucket]:
    out = []
    for subject, limit in limits.items():
        if limit.tokens_per_minute is not None:
            out.append(_Bucket(subject, "tokens", float(limit.tokens_per_minute), float(estimate)))
        if limit.requests_per_minute is not None:
            out.append(_Bucket(subject, "requests", float(limit.requests_per_minute), 1.0))
    return out


@dataclass(frozen=True)
class Reservation:
    """The tokens a request took, for :meth:`TokenRateLimiter.reconcile`."""

    buckets: tuple[_Bucket, ...]
    estimate: int
    store: Literal["local", "redis"] = "local"


def _describe(subject: str) -> str:
    kind, _, name = subject.partition(":")
    return {"key": f"API key {name!r}", "tenant": f"tenant {name!r}"}.get(kind, repr(subject))


@dataclass(frozen=True)
class Decision:
    """The answer to :meth:`TokenRateLimiter.acquire`: admitted or not, the headers to send
    either way, and what to reconcile later."""

    allowed: bool
    headers: dict[str, str]
    retry_after_s: float = 0.0
    reservation: Reservation | None = None
    message: str = ""
    unit: Unit | None = None  # which kind of limit refused the request

    def error(self) -> PolicyError:
        """The 429 to send for a refused request (OpenAI's error shape, headers included)."""
        return PolicyError(
            429, self.message, type=self.unit, code="rate_limit_exceeded", headers=self.headers
        )

    def raise_for_limit(self) -> None:
        if not self.allowed:
            raise self.error()


def _retry_after(wait: float) -> int:
    # float noise (10.000000000000002) must not add a whole second
    return max(1, math.ceil(wait - 1e-9))


def _decide(
    buckets: list[_Bucket], levels: list[float], allowed: bool, wait: float, worst: int
) -> Decision:
    """Headers and message from the bucket levels after the decision (`worst`: index of the
    bucket that refused, or -1)."""
    headers: dict[str, str] = {}
    for unit in ("tokens", "requests"):
        mine = [(lv, b) for lv, b in zip(levels, buckets, strict=True) if b.unit == unit]
        if not mine:
            continue
        level, b = min(mine, key=lambda item: item[0] / item[1].capacity)
        headers[f"x-ratelimit-limit-{unit}"] = str(int(b.capacity))
        headers[f"x-ratelimit-remaining-{unit}"] = str(max(0, math.floor(level)))
        headers[f"x-ratelimit-reset-{unit}"] = format_duration((b.capacity - level) / b.rate)
    if allowed:
        return Decision(True, headers)
    retry = _retry_after(wait)
    headers["retry-after"] = str(retry)
    headers["retry-after-ms"] = str(math.ceil(wait * 1000 - 1e-6))
    b, level = buckets[worst], levels[worst]
    per_minute = f"{int(b.capacity)} {b.unit} per minute"
    need = (
        f"this request needs about {math.ceil(b.need)} tokens"
        if b.unit == "tokens"
        else "this request needs 1"
    )
    message = (
        f"rate limit reached for {_describe(b.subject)}: {per_minute}; {need} and "
        f"{max(0, math.floor(level))} are left. Retry after {retry} s."
    )
    return Decision(False, headers, wait, None, message, b.unit)


def _refill(state: tuple[float, float] | None, now: float, b: _Bucket) -> tuple[float, float]:
    """(level, time) of a bucket at `now`; a bucket never seen is full. A clock that went back
    (another replica's, or a test's) refills nothing rather than draining."""
    if state is None:
        return b.capacity, now
    level, ts = state
    if now > ts:
        return min(b.capacity, level + (now - ts) * b.rate), now
    return level, ts


class TokenRateLimiter:
    """In-process token and request buckets (one gateway replica). Thread-safe; `clock` is in
    seconds and injectable for tests.

    Full buckets are forgotten (a missing bucket is full), so the memory held is bounded by the
    subjects active in the last minute.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._state: dict[str, tuple[float, float]] = {}
        self._next_sweep = -math.inf
        self._lock = threading.Lock()

    def acquire(self, limits: Mapping[str, RateLimit], estimate: int) -> Decision:
        """Admit a request of `estimate` prompt tokens against the limits of every subject in
        `limits` (e.g. ``{"key:ci": ..., "tenant:acme": ...}``), taking from all or none."""
        buckets = _buckets(limits, estimate)
        with self._lock:
            now = self.clock()
            states = [_refill(self._state.get(b.key), now, b) for b in buckets]
            wait, worst = 0.0, -1
            for i, (b, (level, _)) in enumerate(zip(buckets, states, strict=True)):
                if level < b.need and (b.need - level) / b.rate > wait:
                    wait, worst = (b.need - level) / b.rate, i
            if worst >= 0:
                return _decide(buckets, [s[0] for s in states], False, wait, worst)
            levels = []
            for b, (level, ts) in zip(buckets, states, strict=True):
                levels.append(level - b.cost)
                self._state[b.key] = (level - b.cost, ts)
            if len(self._state) > 10_000 and now >= self._next_sweep:
                self._forget_full(now)
                self._next_sweep = now + 1.0  # at most one O(n) sweep a second
        tokens = tuple(b for b in buckets if b.unit == "tokens")
        decision = _decide(buckets, levels, True, 0.0, -1)
        return Decision(True, decision.headers, reservation=Reservation(tokens, estimate))

    def reconcile(
        self, reservation: Reservation | None, usage: Mapping[str, Any] | int | None
    ) -> None:
        """Charge the real token count of a finished request (its ``usage``, or an int) in place
        of the estimate; None (usage unknown) keeps the estimate."""
        actual = usage_tokens(usage)
        if reservation is None or actual is None or actual == reservation.estimate:
            return
        delta = actual - reservation.estimate
        with self._lock:
            now = self.clock()
            for b in reservation.buckets:
                level, ts = _refill(self._state.get(b.key), now, b)
                self._state[b.key] = (min(b.capacity, level - delta), ts)

    def _forget_full(self, now: float) -> None:
        # the refill rate is capacity / 60 s, so a bucket without debt that stayed idle for a
        # whole window is full again, which is what a missing bucket reads as
        for key, (level, ts) in list(self._state.items()):
            if level >= 0 and now - ts >= WINDOW_S:
                del self._state[key]


# --- Redis ------------------------------------------------------------------------------------

# One script decides for all buckets of a request atomically, so two replicas cannot both take
# the last tokens. KEYS: one hash {level, ts} per bucket. ARGV[1]: now in seconds, or "" for the
# Redis clock (TIME, allowed in scripts since Redis 5's effects replication; the default in 7).
# ARGV[2]: "acquire" (all or nothing, `need` checked) or "adjust" (reconcile: add -cost).
# Then four numbers per bucket: capacity, refill rate per second, cost, need.
# Returns {allowed (1/0), wait, index of the refusing bucket (1-based, 0 if none), levels...}.
_SCRIPT = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local acquire = ARGV[2] == 'acquire'
local levels, stamps = {}, {}
local wait, worst = 0, 0
for i, key in ipairs(KEYS) do
  local base = 2 + (i - 1) * 4
  local cap, rate = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local need = tonumber(ARGV[base + 4])
  local state = redis.call('HMGET', key, 'level', 'ts')
  local level, ts = tonumber(state[1]), tonumber(state[2])
  if level == nil or ts == nil then level, ts = cap, now end
  if now > ts then
    level = math.min(cap, level + (now - ts) * rate)
    ts = now
  end
  levels[i], stamps[i] = level, ts
  if acquire and level < need and (need - level) / rate > wait then
    wait, worst = (need - level) / rate, i
  end
end
local allowed = 0
if worst == 0 then
  allowed = 1
  for i, key in ipairs(KEYS) do
    local base = 2 + (i - 1) * 4
    local cap, rate = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
    local level = math.min(cap, levels[i] - tonumber(ARGV[base + 3]))
    levels[i] = level
    redis.call('HSET', key, 'level', string.format('%.17g', level),
               'ts', string.format('%.17g', stamps[i]))
    -- an idle bucket refills completely by then; a missing bucket reads as full
    redis.call('PEXPIRE', key, math.ceil((cap - level) / rate * 1000) + 1000)
  end
end
local out = {allowed, string.format('%.17g', wait), worst}
for i = 1, #KEYS do out[3 + i] = string.format('%.17g', levels[i]) end
return out
"""


class RedisTokenRateLimiter:
    """:class:`TokenRateLimiter` with its buckets in Redis, shared by every gateway replica that
    uses the same `url` and `prefix`.

    `clock` None uses the Redis server's clock, so replicas agree on time; pass one to test
    with a fake clock. When Redis cannot be reached, decisions fall back to a local
    :class:`TokenRateLimiter` (each replica then enforces the whole limit on its own, so the
    fleet may admit up to replicas × limit); one warning is logged per outage, and Redis is
    tried again after `retry_s`, doubling up to 30 s while the outage lasts
    (:class:`datahall.core.redis.RedisLink`). `fallbacks` counts the decisions taken locally.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Any = None,
        prefix: str = "datahall:ratelimit",
        clock: Callable[[], float] | None = None,
        timeout_s: float = 0.25,
        retry_s: float = 5.0,
    ) -> None:
        self.link = RedisLink(
            url,
            what="rate limits",
            fallback="each gateway replica limits on its own",
            log=log,
            client=client,
            timeout_s=timeout_s,
            retry_s=retry_s,
        )
        self.prefix, self.clock = prefix, clock
        self.local = TokenRateLimiter(clock=clock or time.time)
        self._script = self.link.client.register_script(_SCRIPT)
        self._lock = threading.Lock()
        self.fallbacks = 0

    def _run(self, buckets: list[_Bucket], mode: str, costs: list[float]) -> list[Any] | None:
        """Run the script, or None when Redis is unavailable (then the caller goes local)."""
        args: list[Any] = ["" if self.clock is None else repr(float(self.clock())), mode]
        for b, cost in zip(buckets, costs, strict=True):
            args += [repr(b.capacity), repr(b.rate), repr(float(cost)), repr(b.need)]
        keys = [f"{self.prefix}:{b.key}" for b in buckets]
        result = self.link.call(lambda r: self._script(keys=keys, args=args, client=r))
        if result is FAILED:
            with self._lock:
                self.fallbacks += 1
            return None
        return result

    def acquire(self, limits: Mapping[str, RateLimit], estimate: int) -> Decision:
        """As :meth:`TokenRateLimiter.acquire`, atomically in Redis."""
        buckets = _buckets(limits, estimate)
        if not buckets:
            return Decision(True, {}, reservation=Reservation((), estimate, "redis"))
        result = self._run(buckets, "acquire", [b.cost for b in buckets])
        if result is None:
            return self.local.acquire(limits, estimate)
        allowed, wait, worst = int(result[0]), float(result[1]), int(result[2]) - 1
        levels = [float(v) for v in result[3:]]
        decision = _decide(buckets, levels, bool(allowed), wait, worst)
        if not allowed:
            return decision
        tokens = tuple(b for b in buckets if b.unit == "tokens")
        return Decision(True, decision.headers, reservation=Reservation(tokens, estimate, "redis"))

    def reconcile(
        self, reservation: Reservation | None, usage: Mapping[str, Any] | int | None
    ) -> None:
        """As :meth:`TokenRateLimiter.reconcile`, in the store that took the reservation."""
        actual = usage_tokens(usage)
        if reservation is None or actual is None or actual == reservation.estimate:
            return
        if reservation.store == "local":
            self.local.reconcile(reservation, actual)
            return
        buckets = list(reservation.buckets)
        if buckets:
            # a failure here loses one correction, which the next minute's refill absorbs
            self._run(buckets, "adjust", [actual - reservation.estimate] * len(buckets))


# --- request size -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SizeLimits:
    """Request size limits (brief §2.5); None means unlimited.

    Check the body's size before parsing it (:meth:`check_body_bytes`, from Content-Length or
    the bytes read), then the parsed body (:meth:`check`):

    >>> SizeLimits(max_messages=2).check({"messages": [{}, {}, {}]})
    Traceback (most recent call last):
    ...
    datahall.gateway.transform.PolicyError: the request has 3 messages; this gateway accepts at most 2
    """

    max_body_bytes: int | None = None
    max_messages: int | None = None
    max_prompt_tokens: int | None = None

    def check_body_bytes(self, size: int) -> None:
        if self.max_body_bytes is not None and size > self.max_body_bytes:
            raise PolicyError(
                413,
                f"the request body is {size} bytes; this gateway accepts at most "
                f"{self.max_body_bytes}",
                code="request_too_large",
            )

    def check(self, body: Mapping[str, Any]) -> int:
        """Raise a 400 :class:`PolicyError` for too many messages or prompt tokens; return the
        prompt-token estimate (for the rate limiter)."""
        messages = body.get("messages")
        count = len(messages) if isinstance(messages, list) else 0
        if self.max_messages is not None and count > self.max_messages:
            raise PolicyError(
                400,
                f"the request has {count} messages; this gateway accepts at most "
                f"{self.max_messages}",
                code="too_many_messages",
                param="messages",
            )
        estimate = estimate_prompt_tokens(body)
        if self.max_prompt_tokens is not None and estimate > self.max_prompt_tokens:
            raise PolicyError(
                400,
                f"the prompt is about {estimate} tokens (characters / {CHARS_PER_TOKEN}); this "
                f"gateway accepts at most {self.max_prompt_tokens}",
                code="context_length_exceeded",
                param="messages",
            )
        return estimate
