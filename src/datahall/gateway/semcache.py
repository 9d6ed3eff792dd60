"""The gateway's response cache: an exact tier, a semantic tier, a polarity guard, and replay.

[reconstruction] The brief (``ai-gateway.md`` §2.4) composes it from the anchors' pieces (APIM's
``llm-semantic-cache-lookup``/``-store`` and ``vary-by``, GPTCache's pipeline, Envoy AI
Gateway's exact Redis cache); the composition is ours.

1. **L1 exact**: the key is a hash of the tenant and the canonicalised request body
   (:func:`canonical_body`: sorted-key JSON of every field that changes the answer, the
   ``stream`` flag included).
2. **L2 semantic**: a *partition* (:func:`partition_key`) per tenant + model + system prompt
   (+ the other generation parameters); the last user message, or the whole dialogue as
   ``role: content`` lines, is embedded with all-MiniLM-L6-v2 (:mod:`.embed`) and the best
   entry of the partition is a hit when its **cosine similarity** reaches
   ``min_cosine_similarity`` (a similarity, not a distance: brief §7.1).
3. **Skip rules** (:func:`bypass_reason`, :func:`semantic_skip_reason`): sampled requests
   (temperature > 0) unless allowed, time-sensitive prompts, long dialogues (APIM's
   ``max-message-count``), tools, non-text content, and optionally digits.
4. **Polarity guard** (:func:`polarity_guard`): the threshold alone cannot separate "turn on"
   from "turn off" (0.931, above a true paraphrase at 0.877; brief §3, §7.2), so a semantic
   hit is refused when the two prompts differ in negation, antonyms, numbers or names.
5. **Storage**: only complete answers (:func:`is_complete`: ``finish_reason`` ``stop`` on every
   choice), with TTL and LRU; optionally shared by gateway replicas through plain Redis 7
   (hashes with a TTL, no RediSearch: brief §7.6), the vector index staying in process.
6. **Replay** (:func:`replay_json`, :func:`replay_sse`): a hit is rendered for the request that
   asked, a JSON body for ``stream: false`` and a synthetic SSE stream for ``stream: true``,
   with ``x-cache`` and ``x-cache-similarity`` headers; :func:`assemble_stream` turns a
   streamed answer back into a completion for storing, and refuses incomplete streams.

Typical use in a request handler::

    cache = SemanticCache(CacheConfig(min_cosine_similarity=0.9), redis_url="redis://...")
    found = cache.lookup(body, tenant="acme")
    if found.hit:
        return found.replay()          # media type, chunks and headers
    ...                                # forward upstream
    cache.store(found, completion)     # or cache.store_stream(found, sse_chunks)
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from datahall.core.redis import FAILED, RedisLink
from datahall.gateway.transform import SseDecoder, openai_sse

__all__ = [
    "CacheConfig",
    "CacheLookup",
    "CacheStats",
    "Replay",
    "SemanticCache",
    "assemble_stream",
    "bypass_reason",
    "canonical_body",
    "embedding_text",
    "exact_key",
    "is_complete",
    "partition_key",
    "polarity_guard",
    "replay_json",
    "replay_sse",
    "semantic_skip_reason",
]

log = logging.getLogger(__name__)

EmbedFn = Callable[[Sequence[str]], np.ndarray]


# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheConfig:
    """Settings of :class:`SemanticCache` (brief §2.4).

    `min_cosine_similarity` is the semantic threshold (named so because APIM's
    ``score-threshold`` is a distance: brief §7.1); 0.90 keeps false hits at or under 2% on
    ``data/paraphrases.jsonl`` with the guard (see :func:`.cachedata.evaluate_threshold`).
    `embed` chooses the text embedded: the last user message, or every non-system message
    as ``role: content`` lines (for multi-turn traffic). `max_messages` counts non-system
    messages. `ttl_s` None keeps entries until LRU evicts them.
    """

    min_cosine_similarity: float = 0.90
    ttl_s: float | None = 3600.0
    max_entries: int = 10_000
    semantic: bool = True
    embed: Literal["last_user", "all"] = "last_user"
    max_messages: int = 10
    allow_temperature: bool = False
    default_temperature: float = 1.0  # OpenAI's default when a request names none
    skip_digits: bool = False
    skip_time_sensitive: bool = True
    guard: bool = True
    max_candidates: int = 4  # entries above the threshold tried, best first, past the guard
    sync_interval_s: float = 1.0  # how often a partition's index is merged from Redis

    def __post_init__(self):
        if not 0.0 < self.min_cosine_similarity <= 1.0:
            raise ValueError(
                f"min_cosine_similarity must be in (0, 1], got {self.min_cosine_similarity} "
                "(it is a cosine similarity, not a distance: higher is stricter)"
            )
        if self.ttl_s is not None and self.ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive or None, got {self.ttl_s}")
        if self.max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {self.max_entries}")
        if self.embed not in ("last_user", "all"):
            raise ValueError(f"embed must be 'last_user' or 'all', got {self.embed!r}")
        if self.max_candidates < 1:
            raise ValueError(f"max_candidates must be at least 1, got {self.max_candidates}")


# --- keys and partitions ----------------------------------------------------------------------

# fields that do not change the answer: who asked, bookkeeping, and how usage is streamed
# (replay renders usage itself); everything else is part of the key, so an unknown field can
# only cost hits, never give a wrong one
_NOT_ANSWER_FIELDS = frozenset(
    {"user", "metadata", "store", "stream_options", "service_tier", "safety_identifier"}
)


def _normalise(value: Any) -> Any:
    # 0 and 0.0 are the same temperature; JSON would spell them differently
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    return value


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _digest(text: str, size: int = 16) -> str:
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def canonical_body(body: Mapping[str, Any]) -> str:
    """The fields of a request that change its answer, as sorted-key compact JSON (brief
    §2.4.1): everything but bookkeeping fields, null values dropped, integral floats written
    as integers, and ``stream`` always present.

    >>> canonical_body({"model": "m", "temperature": 0.0, "messages": [], "user": "u1"})
    '{"messages":[],"model":"m","stream":false,"temperature":0}'
    """
    fields = {k: v for k, v in body.items() if k not in _NOT_ANSWER_FIELDS and v is not None}
    fields["stream"] = bool(body.get("stream", False))
    return _json(_normalise(fields))


def exact_key(body: Mapping[str, Any], tenant: str = "") -> str:
    """The L1 key: a hash of `tenant` and :func:`canonical_body`.

    >>> a = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    >>> exact_key(a) == exact_key({**a, "stream": False})
    True
    >>> exact_key(a) == exact_key({**a, "stream": True}), exact_key(a) == exact_key(a, "t2")
    (False, False)
    """
    return _digest(f"{tenant}\x00{canonical_body(body)}")


def _content_text(content: Any) -> str | None:
    """The text of a message's content; None when it holds anything but text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text"):
                return None
            texts.append(str(part.get("text", "")))
        return " ".join(texts)
    return None


def _system_text(messages: Sequence[Any]) -> str:
    return "\n".join(
        _content_text(m.get("content")) or ""
        for m in messages
        if isinstance(m, Mapping) and m.get("role") in ("system", "developer")
    )


def partition_key(body: Mapping[str, Any], tenant: str = "") -> str:
    """The L2 partition of a chat request: tenant, model, a hash of its system prompt(s) and a
    hash of its other generation parameters (APIM's ``vary-by``, brief §2.4.2; the parameter
    hash is our addition, so that e.g. a different ``max_tokens`` or ``response_format``
    never shares answers). Semantic hits never cross partitions.

    >>> b = {"model": "m", "messages": [{"role": "system", "content": "be brief"}]}
    >>> partition_key(b, "acme")[:17]
    '["acme","m","sys:'
    >>> partition_key(b, "acme") == partition_key(b, "other")
    False
    """
    messages = body.get("messages") or []
    params = {
        k: v
        for k, v in body.items()
        if k not in _NOT_ANSWER_FIELDS and k not in ("messages", "model", "stream")
    }
    sys_hash = _digest(_system_text(messages), 8)
    params_hash = _digest(_json(_normalise(params)), 8)
    return _json([tenant, str(body.get("model", "")), f"sys:{sys_hash}", f"params:{params_hash}"])


def embedding_text(
    messages: Sequence[Mapping[str, Any]], mode: Literal["last_user", "all"] = "last_user"
) -> str | None:
    """The text the semantic tier embeds: the last user message, or (``mode="all"``) every
    non-system message as ``role: content`` lines, since the last message alone loses a
    dialogue's context (brief §4). None when there is no user text to embed.

    >>> msgs = [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"},
    ...         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    >>> embedding_text(msgs)
    'bye'
    >>> print(embedding_text(msgs, "all"))
    user: hi
    assistant: hello
    user: bye
    """
    if mode == "last_user":
        for m in reversed(messages):
            if m.get("role") == "user":
                text = _content_text(m.get("content"))
                return text if text and text.strip() else None
        return None
    lines = []
    for m in messages:
        if m.get("role") in ("system", "developer"):
            continue
        text = _content_text(m.get("content"))
        if text is None:
            return None
        lines.append(f"{m.get('role')}: {text}")
    return "\n".join(lines) if any(m.get("role") == "user" for m in messages) else None


# --- skip rules -------------------------------------------------------------------------------

# phrases whose answers go stale, found as whole words in the lower-cased prompt
_TIME_SENSITIVE = (
    "today", "tonight", "tomorrow", "yesterday", "now", "current", "currently", "latest",
    "recent", "recently", "news", "headlines", "weather", "forecast", "stock price",
    "share price", "exchange rate", "live score",
    *(f"this {w}" for w in ("morning", "afternoon", "evening", "week", "month", "year")),
    *(f"{a} {w}" for a in ("next", "last") for w in ("week", "month", "year", "night")),
)  # fmt: skip


def _time_sensitive(text: str) -> str | None:
    """The first of the time-sensitive phrases that `text` holds as whole words, or None.

    One substring search per phrase, then a look at the characters around each find: a regex
    alternation of the phrases tries each of them at every position, which took 2 ms on a
    16 kB prompt, on the path of every request the cache sees."""
    lowered = text.lower()
    for phrase in _TIME_SENSITIVE:
        start = lowered.find(phrase)
        while start >= 0:
            end = start + len(phrase)
            if not (_word_char(lowered, start - 1) or _word_char(lowered, end)):
                return phrase
            start = lowered.find(phrase, start + 1)
    return None


def _word_char(text: str, i: int) -> bool:
    return 0 <= i < len(text) and (text[i].isalnum() or text[i] == "_")


def bypass_reason(body: Mapping[str, Any], config: CacheConfig) -> tuple[str, str] | None:
    """Why neither tier may answer or store `body`, as ``(code, explanation)``; None if they may.

    A sampled request (temperature > 0, or absent: OpenAI's default is 1) asks for a fresh
    answer, and a time-sensitive prompt's answer goes stale (brief §2.4.3).

    >>> cfg = CacheConfig()
    >>> bypass_reason({"messages": [{"role": "user", "content": "hi"}]}, cfg)[0]
    'temperature'
    >>> bypass_reason({"messages": [{"role": "user", "content": "hi"}], "temperature": 0}, cfg)
    >>> bypass_reason({"messages": [{"role": "user", "content": "news today?"}],
    ...                "temperature": 0}, cfg)[0]
    'time-sensitive'
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        return "not-chat", "only chat completions (a messages list) are cached"
    temperature = body.get("temperature")
    if temperature is None:
        temperature = config.default_temperature
    if not isinstance(temperature, int | float):
        return "temperature", f"temperature {temperature!r} is not a number"
    if temperature > 0 and not config.allow_temperature:
        return "temperature", f"temperature {temperature:g} > 0 asks for a sampled answer"
    if config.skip_time_sensitive:
        for m in messages:
            if m.get("role") == "user":
                phrase = _time_sensitive(_content_text(m.get("content")) or "")
                if phrase is not None:
                    return "time-sensitive", f"time-sensitive prompt ({phrase!r})"
    return None


def semantic_skip_reason(body: Mapping[str, Any], config: CacheConfig) -> tuple[str, str] | None:
    """Why the semantic tier may not answer `body` (the exact tier still may), as
    ``(code, explanation)``; None if it may (brief §2.4.3).

    >>> cfg = CacheConfig()
    >>> msgs = [{"role": "user", "content": "weather in Paris?"}]
    >>> semantic_skip_reason({"messages": msgs}, cfg)
    >>> semantic_skip_reason({"messages": msgs, "tools": [{"type": "function"}]}, cfg)[0]
    'tools'
    """
    messages = body["messages"]
    if body.get("tools") or body.get("functions") or body.get("tool_choice"):
        return "tools", "tools or functions in the request"
    dialogue = [m for m in messages if m.get("role") not in ("system", "developer")]
    if any(m.get("role") in ("tool", "function") or m.get("tool_calls") for m in dialogue):
        return "tools", "tool calls in the dialogue"
    if len(dialogue) > config.max_messages:
        return "messages", f"{len(dialogue)} messages > max_messages {config.max_messages}"
    if any(_content_text(m.get("content")) is None for m in messages):
        return "non-text", "non-text content (an image or audio) cannot be embedded"
    text = embedding_text(messages, config.embed)
    if text is None:
        return "no-user-text", "no user text to embed"
    if config.skip_digits and re.search(r"\d", text):
        return "digits", "the prompt contains digits"
    return None


# --- the polarity guard -----------------------------------------------------------------------

_CONTRACTIONS = (
    (re.compile(r"\b(?:can't|cannot|can not)\b"), "can not"),
    (re.compile(r"\bwon't\b"), "will not"),
    (re.compile(r"\bshan't\b"), "shall not"),
    (re.compile(r"n't\b"), " not"),
)
_NEGATIONS = frozenset(
    {"not", "no", "never", "none", "nothing", "nobody", "nowhere", "neither", "nor", "without"}
)

# semantic axes: words that point one way, words that point the other; a pair of prompts in
# which one leans more to the first side and the other more to the second is a flip
_AXES: tuple[tuple[str, str, str], ...] = (
    (
        "on/off",
        r"on|enabl\w*|activat\w*|unmut\w*",
        r"off|disabl\w*|deactivat\w*|mut(?:e|ed|es|ing)",
    ),
    (
        "add/remove",
        r"add|adds|added|adding|insert\w*|creat\w*|includ\w*|attach\w*|install\w*",
        r"remov\w*|delet\w*|drop\w*|eras\w*|exclud\w*|detach\w*|uninstall\w*|destroy\w*",
    ),
    (
        "allow/block",
        r"allow\w*|permit\w*|accept\w*|approv\w*|whitelist\w*|unblock\w*",
        r"den(?:y|ies|ied|ying)|block\w*|forbid\w*|reject\w*|prevent\w*|blacklist\w*|ban|banned",
    ),
    (
        "show/hide",
        r"show\w*|display\w*|reveal\w*|unhid\w*|visible",
        r"hid(?:e|es|den|ing)|conceal\w*",
    ),
    ("lock/unlock", r"lock\w*", r"unlock\w*"),
    ("open/close", r"open\w*", r"clos\w*|shut\w*"),
    (
        "start/stop",
        r"start\w*|begin\w*|launch\w*|resum\w*|run|running|enter|entering",
        r"stop\w*|end|ends|ending|finish\w*|quit\w*|exit\w*|kill\w*|paus\w*|leav\w*",
    ),
    (
        "more/less",
        r"increas\w*|rais\w*|boost\w*|grow\w*|expand\w*|enlarg\w*|maximi\w*|max|maximum|more|"
        r"most|higher|highest|larger|largest|bigger|biggest|faster|fastest|longer|longest|upper\w*",
        r"decreas\w*|reduc\w*|lower\w*|shrink\w*|collaps\w*|minimi\w*|min|minimum|less|least|"
        r"fewer|fewest|smaller|smallest|slower|slowest|shorter|shortest",
    ),
    ("up/down", r"up|upward\w*", r"down|downward\w*"),
    ("upload/download", r"upload\w*", r"download\w*"),
    ("import/export", r"import\w*", r"export\w*"),
    ("push/pull", r"push\w*", r"pull\w*"),
    ("buy/sell", r"buy\w*|purchas\w*|bought", r"sell\w*|sold"),
    ("send/receive", r"send\w*|sent", r"receiv\w*"),
    (
        "in/out",
        r"(?:log|sign|check|opt|zoom|plug|logg?ed|signed|checked|opted|plugged)[ -]?in|login",
        r"(?:log|sign|check|opt|zoom|plug|logg?ed|signed|checked|opted|plugged)[ -]?out|logout",
    ),
    (
        "encode/decode",
        r"encrypt\w*|encod\w*|compress\w*|zip|zipp\w*|seriali[sz]\w*",
        r"decrypt\w*|decod\w*|decompress\w*|unzip\w*|extract\w*|deseriali[sz]\w*",
    ),
    ("before/after", r"before|prior|earl(?:y|ier|iest)", r"after|late|later|afterwards"),
    ("first/last", r"first|beginning", r"last|final"),
    ("new/old", r"new|newer|newest|latest|modern", r"old|older|oldest|legacy|outdated"),
    ("above/below", r"above", r"below|beneath"),
    (
        "good/bad",
        r"best|better|good|pros|advantag\w*|benefit\w*|positive|strength\w*",
        r"worst|worse|bad|cons|disadvantag\w*|drawback\w*|downside\w*|negative|risk\w*|weakness\w*",
    ),
    ("true/false", r"true|correct|valid", r"false|incorrect|wrong|invalid"),
    ("left/right", r"left", r"right"),
    ("win/lose", r"win|wins|winning|won|gain\w*|profit\w*", r"los(?:e|es|ing|t|s|ses)|defeat\w*"),
    ("love/hate", r"love\w*|enjoy\w*", r"hat(?:e|es|ed|ing)|dislik\w*"),
    ("pass/fail", r"succe\w*|pass|passes|passed|passing", r"fail\w*"),
    ("hot/cold", r"hot|warm\w*|heat\w*", r"cold|cool\w*|freez\w*|chill\w*"),
    ("light/dark", r"light|bright\w*", r"dark\w*"),
    ("ascending/descending", r"ascending|asc", r"descending|desc"),
    (
        "public/private",
        r"public|external|remote|outside|outdoors?",
        r"private|internal|local|inside|indoors?",
    ),
    ("online/offline", r"online", r"offline"),
    ("male/female", r"male|males|men|man|boys?", r"female|females|women|woman|girls?"),
    ("cheap/expensive", r"cheap\w*|inexpensive|affordable", r"expensive|costly|pricey"),
    ("safe/dangerous", r"safe|safely|safety|harmless", r"dangerous|harmful|toxic|unsafe|risky"),
    ("easy/difficult", r"eas(?:y|ier|iest|ily)|simple", r"difficult\w*|complicated|hard(?:er|est)"),
    ("forward/backward", r"forward\w*|next", r"backward\w*|previous|prev"),
)
_AXIS_PATTERNS = tuple(
    (name, re.compile(rf"\b(?:{pos})\b"), re.compile(rf"\b(?:{neg})\b")) for name, pos, neg in _AXES
)
# a word and the same word with a negating prefix: install/uninstall, legal/illegal, ...
_NEGATING_PREFIXES = ("un", "dis", "non", "in", "im", "il", "ir", "de", "mis")

_UNITS = {
    "zero": 0, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19,
}  # fmt: skip
# "one" is left out: it is far more often a pronoun ("which one") than a count
_TENS = {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
    "eighty": 80, "ninety": 90,
}  # fmt: skip
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9}
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?|\d+(?:\.\d+)?")
_ENTITY = re.compile(r"\b[A-Za-z][\w+#-]*")


def _normalise_text(text: str) -> str:
    text = text.lower().replace("\u2019", "'")
    for pattern, repl in _CONTRACTIONS:
        text = pattern.sub(repl, text)
    return text


def _numbers(text: str) -> list[str]:
    """The numbers in `text`, digits or words, as canonical strings (sorted)."""
    found = []
    for m in _NUMBER.finditer(text):
        digits = m.group(0).replace(",", "")
        found.append(digits.rstrip("0").rstrip(".") if "." in digits else digits)
    words = re.findall(r"[a-z]+", text)
    i = 0
    while i < len(words):
        w = words[i]
        if w in _TENS or w in _UNITS:
            value = _TENS.get(w, _UNITS.get(w, 0))
            if w in _TENS and i + 1 < len(words) and words[i + 1] in _UNITS:
                value += _UNITS[words[i + 1]]  # "twenty five"
                i += 1
            if i + 1 < len(words) and words[i + 1] in _SCALES:
                value *= _SCALES[words[i + 1]]
                i += 1
            found.append(str(value))
        i += 1
    return sorted(found)


def _entities(text: str) -> set[str]:
    """Capitalised words that do not open a sentence, plus words with inner capitals or digits
    (iPhone, GPT-4, AWS): a cheap stand-in for named entities."""
    out = set()
    for sentence in re.split(r"(?<=[.!?:])\s+|\n+", text.strip()):
        for i, m in enumerate(_ENTITY.finditer(sentence)):
            w = m.group(0).rstrip("-")
            inner = any(c.isupper() or c.isdigit() for c in w[1:])
            if (w[0].isupper() and i > 0 and w != "I") or inner:
                out.add(w.lower().removesuffix("'s"))
    return out


def polarity_guard(query: str, cached: str) -> str | None:
    """Why `query` must not reuse the answer cached for the prompt `cached`, or None if it may.

    A semantic hit is refused when the two prompts differ in (brief §2.4.4, §7.2):

    - **numbers**: the numbers they contain, in digits or words ("5" vs "ten");
    - **negation**: how many negations they hold (not, no, never, without, can't, ...);
    - **antonyms**: one prompt leans to one side of an axis (on, enable, add, increase, ...)
      and the other to the opposite side (off, disable, remove, decrease, ...), or one holds
      a word and the other that word with a negating prefix (install/uninstall,
      legal/illegal);
    - **names**: a capitalised name in one prompt that the other does not mention.

    Each rule is a word-level check, so the reason names the words that differ.

    >>> polarity_guard("How to turn on dark mode?", "How to turn off dark mode?")
    'antonyms on/off: on vs off'
    >>> polarity_guard("How do I reset my password?", "password reset - how?")
    >>> polarity_guard("Is 97 a prime number?", "Is 91 a prime number?")
    'numbers differ: 97 vs 91'
    >>> polarity_guard("Why can't I log in?", "Why can I log in?")
    'negation differs: 1 vs 0'
    >>> polarity_guard("What is the capital of France?", "What is the capital of Spain?")
    "names differ: 'france' vs 'spain'"
    """
    a, b = _normalise_text(query), _normalise_text(cached)
    na, nb = _numbers(a), _numbers(b)
    if na != nb:
        return f"numbers differ: {' '.join(na) or 'none'} vs {' '.join(nb) or 'none'}"
    wa, wb = _WORD.findall(a), _WORD.findall(b)
    neg_a, neg_b = sum(w in _NEGATIONS for w in wa), sum(w in _NEGATIONS for w in wb)
    if neg_a != neg_b:
        return f"negation differs: {neg_a} vs {neg_b}"
    for name, pos, neg in _AXIS_PATTERNS:
        pa, pb = pos.findall(a), pos.findall(b)
        qa, qb = neg.findall(a), neg.findall(b)
        d_pos, d_neg = len(pa) - len(pb), len(qa) - len(qb)
        if d_pos * d_neg < 0:  # one prompt gained a side's words while losing the other's
            ta = " ".join(pa if d_pos > 0 else qa)
            tb = " ".join(pb if d_pos < 0 else qb)
            return f"antonyms {name}: {ta} vs {tb}"
    sa, sb = set(wa), set(wb)
    for w in sorted(sa ^ sb):
        mine, other = (sa, sb) if w in sa else (sb, sa)
        for p in _NEGATING_PREFIXES:
            stem = w[len(p) :]
            if w.startswith(p) and len(stem) >= 4 and stem in other and stem not in mine:
                return (
                    f"antonyms prefix: {w} vs {stem}"
                    if mine is sa
                    else f"antonyms prefix: {stem} vs {w}"
                )
    ea, eb = _entities(query), _entities(cached)
    only_a = sorted(e for e in ea if e not in sb and e not in eb)
    only_b = sorted(e for e in eb if e not in sa and e not in ea)
    if only_a or only_b:
        return f"names differ: {' '.join(map(repr, only_a)) or 'none'} vs " + (
            " ".join(map(repr, only_b)) or "none"
        )
    return None


# --- completeness, replay and reassembly ------------------------------------------------------


def is_complete(completion: Any) -> bool:
    """Whether a chat completion may be stored: at least one choice, every choice finished
    with ``finish_reason`` ``stop`` and holding a text message (never a ``length``-truncated,
    aborted or tool-calling answer; brief §2.4.5).

    >>> ok = {"choices": [{"index": 0, "finish_reason": "stop",
    ...                    "message": {"role": "assistant", "content": "Paris."}}]}
    >>> is_complete(ok)
    True
    >>> is_complete({"choices": [{**ok["choices"][0], "finish_reason": "length"}]})
    False
    """
    if not isinstance(completion, Mapping) or completion.get("error") is not None:
        return False
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for c in choices:
        if not isinstance(c, Mapping) or c.get("finish_reason") != "stop":
            return False
        msg = c.get("message")
        if not isinstance(msg, Mapping) or not isinstance(msg.get("content"), str):
            return False
        if msg.get("tool_calls") or msg.get("function_call"):
            return False
    return True


def replay_json(
    completion: Mapping[str, Any], *, id: str | None = None, created: int | None = None
) -> dict[str, Any]:
    """A stored chat completion as the JSON body of a ``stream: false`` answer, with a fresh
    `id` and `created` when given. Only the top level is new: the nested values are
    `completion`'s own (a lookup already hands out a copy of the stored entry).

    >>> stored = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
    ...           "choices": [{"index": 0, "finish_reason": "stop",
    ...                        "message": {"role": "assistant", "content": "Paris."}}]}
    >>> replay_json(stored, id="chatcmpl-2")["id"], replay_json(stored)["choices"][0]["message"]
    ('chatcmpl-2', {'role': 'assistant', 'content': 'Paris.'})
    """
    body = dict(completion)
    body["object"] = "chat.completion"
    if id is not None:
        body["id"] = id
    if created is not None:
        body["created"] = created
    return body


def _pieces(text: str, words: int) -> list[str]:
    # deltas of a few words each, whitespace kept, so the concatenation is exactly `text`
    tokens = re.findall(r"\s*\S+|\s+", text)
    return ["".join(tokens[i : i + words]) for i in range(0, len(tokens), words)]


def replay_sse(
    completion: Mapping[str, Any],
    *,
    include_usage: bool = False,
    id: str | None = None,
    created: int | None = None,
    words_per_chunk: int = 4,
) -> list[bytes]:
    """A stored chat completion as the SSE events of a ``stream: true`` answer (brief §2.4.6):
    per choice a role chunk, content deltas of `words_per_chunk` words and a finish chunk;
    then, when the client asked for ``stream_options.include_usage``, a usage chunk with no
    choices; then ``data: [DONE]``. :func:`assemble_stream` inverts it.

    >>> stored = {"id": "c1", "created": 1, "model": "m", "usage": {"total_tokens": 9},
    ...           "choices": [{"index": 0, "finish_reason": "stop",
    ...                        "message": {"role": "assistant", "content": "Paris is the capital."}}]}
    >>> events = replay_sse(stored, words_per_chunk=2)
    >>> [json.loads(e[6:])["choices"][0]["delta"] for e in events[:-1]]
    [{'role': 'assistant', 'content': ''}, {'content': 'Paris is'}, {'content': ' the capital.'}, {}]
    >>> events[-1]
    b'data: [DONE]\\n\\n'
    >>> assemble_stream(events)["choices"][0]["message"]["content"]
    'Paris is the capital.'
    """
    head = {
        "id": id if id is not None else completion.get("id", ""),
        "object": "chat.completion.chunk",
        "created": created if created is not None else completion.get("created", 0),
        "model": completion.get("model", ""),
    }
    if completion.get("system_fingerprint") is not None:
        head["system_fingerprint"] = completion["system_fingerprint"]
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish: str | None = None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return openai_sse({**head, "choices": [choice], **extra})

    events = []
    for i, c in enumerate(completion.get("choices", [])):
        index = c.get("index", i)
        msg = c.get("message") or {}
        events.append(chunk(index, {"role": msg.get("role", "assistant"), "content": ""}))
        for k, v in msg.items():  # reasoning_content, refusal, ...: one delta each
            if k not in ("role", "content") and isinstance(v, str) and v:
                events.append(chunk(index, {k: v}))
        for piece in _pieces(msg.get("content") or "", max(1, words_per_chunk)):
            events.append(chunk(index, {"content": piece}))
        events.append(chunk(index, {}, c.get("finish_reason", "stop")))
    if include_usage:
        events.append(openai_sse({**head, "choices": [], "usage": completion.get("usage")}))
    events.append(openai_sse("[DONE]"))
    return events


def assemble_stream(chunks: Iterable[bytes | str]) -> dict[str, Any] | None:
    """Reassemble the chat completion a streamed (SSE) answer carried, so the gateway can
    store it; None unless the stream is complete: it ended with ``data: [DONE]``, every choice
    finished with ``stop``, and it carried no error or tool calls (brief §2.4.5).

    >>> ev = [b'data: {"id":"c","created":1,"model":"m","choices":[{"index":0,',
    ...       b'"delta":{"role":"assistant","content":"Hi"},"finish_reason":null}]}\\n\\n',
    ...       b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\\n\\n']
    >>> assemble_stream(ev) is None   # no [DONE]: the stream may have been cut
    True
    >>> assemble_stream(ev + [b"data: [DONE]\\n\\n"])["choices"][0]["message"]["content"]
    'Hi'
    """
    head: dict[str, Any] = {}
    messages: dict[int, dict[str, Any]] = {}
    finish: dict[int, Any] = {}
    usage = None
    done = False
    decoder = SseDecoder()
    events = (data for chunk in chunks for _, data in decoder.feed(chunk))
    for data in events:
        if data.strip() == "[DONE]":
            done = True
            break
        try:
            event = json.loads(data)
        except ValueError:
            return None
        if not isinstance(event, dict) or event.get("error") is not None:
            return None
        for k in ("id", "created", "model", "system_fingerprint"):
            if k not in head and event.get(k) is not None:
                head[k] = event[k]
        if event.get("usage"):
            usage = event["usage"]
        for c in event.get("choices") or []:
            index = int(c.get("index", 0))
            msg = messages.setdefault(index, {"role": "assistant", "content": ""})
            for k, v in (c.get("delta") or {}).items():
                if k == "role" and v:
                    msg["role"] = v
                elif isinstance(v, str):
                    msg[k] = msg.get(k, "") + v
                elif v is not None and v != []:
                    return None  # tool calls or another structured delta: not cacheable
            if c.get("finish_reason") is not None:
                finish[index] = c["finish_reason"]
    if not done or not messages or any(finish.get(i) != "stop" for i in messages):
        return None
    completion = {
        "id": head.get("id", ""),
        "object": "chat.completion",
        "created": head.get("created", 0),
        "model": head.get("model", ""),
        "choices": [
            {"index": i, "message": messages[i], "logprobs": None, "finish_reason": "stop"}
            for i in sorted(messages)
        ],
    }
    if "system_fingerprint" in head:
        completion["system_fingerprint"] = head["system_fingerprint"]
    if usage is not None:
        completion["usage"] = usage
    return completion


# --- the cache --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replay:
    """A rendered hit: a JSON body (one chunk) or SSE events, with its media type and the
    ``x-cache`` headers."""

    media_type: str
    chunks: tuple[bytes, ...]
    headers: dict[str, str]

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


@dataclass(frozen=True)
class CacheLookup:
    """What :meth:`SemanticCache.lookup` found for one request.

    `hit` and `tier` ("exact" or "semantic") say whether to answer from the cache; on a hit,
    :meth:`replay` renders `completion` the way the request asked (JSON or SSE). On a miss,
    pass this object to :meth:`SemanticCache.store` with the upstream answer: it carries the
    keys and the embedding, so nothing is computed twice. `key` is None when the request
    bypasses the cache (`skip` says why); `similarity` is the best cosine seen in the
    partition (1.0 for an exact hit); `reason` explains a miss in words, for logs.
    """

    hit: bool
    stream: bool
    key: str | None = None
    partition: str | None = None
    tier: Literal["exact", "semantic"] | None = None
    similarity: float | None = None
    completion: dict[str, Any] | None = None
    include_usage: bool = False
    text: str | None = None
    vector: np.ndarray | None = field(default=None, repr=False, compare=False)
    skip: str | None = None
    reason: str = ""

    @property
    def cacheable(self) -> bool:
        return self.key is not None

    @property
    def headers(self) -> dict[str, str]:
        """``x-cache: hit|miss``, and ``x-cache-similarity`` when a similarity was measured,
        ``x-cache-tier`` on a hit and ``x-cache-skip`` when a rule bypassed a tier."""
        h = {"x-cache": "hit" if self.hit else "miss"}
        if self.similarity is not None:
            h["x-cache-similarity"] = f"{self.similarity:.4f}"
        if self.tier is not None:
            h["x-cache-tier"] = self.tier
        if self.skip is not None:
            h["x-cache-skip"] = self.skip
        return h

    def replay(self, *, id: str | None = None, created: int | None = None) -> Replay:
        """The hit rendered for the request: SSE events when it asked ``stream: true``, a JSON
        body otherwise (never the other way round: brief §2.6.5). A fresh ``chatcmpl-`` id and
        the current time are used unless `id` and `created` are given."""
        if not self.hit or self.completion is None:
            raise ValueError("replay() needs a cache hit; this lookup was a miss")
        id = id if id is not None else f"chatcmpl-cache-{uuid.uuid4().hex[:24]}"
        created = created if created is not None else int(time.time())
        if self.stream:
            events = replay_sse(
                self.completion, include_usage=self.include_usage, id=id, created=created
            )
            return Replay("text/event-stream", tuple(events), self.headers)
        body = json.dumps(replay_json(self.completion, id=id, created=created)).encode()
        return Replay("application/json", (body,), self.headers)


@dataclass
class CacheStats:
    """Counters for the gateway's metrics (brief §2.5: cache hits, misses, false hits)."""

    lookups: int = 0
    exact_hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    bypassed: int = 0
    guard_rejections: int = 0  # candidates above the threshold refused by the polarity guard
    stores: int = 0
    incomplete: int = 0  # answers refused for storing because they were not complete
    evictions: int = 0
    expirations: int = 0
    redis_errors: int = 0
    redis_outages: int = 0


@dataclass
class _Entry:
    key: str
    partition: str
    completion: dict[str, Any]
    stored_at: float
    text: str | None = None
    vector: np.ndarray | None = None


class _Index:
    """One partition's vectors, searched by brute force (numpy is fine below ~100k x 384:
    brief §6); removal swaps the last row into the hole."""

    def __init__(self, dim: int):
        self.keys: list[str] = []
        self.rows: dict[str, int] = {}
        self.matrix = np.zeros((8, dim), np.float32)

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, vector: np.ndarray) -> None:
        if key in self.rows:
            self.matrix[self.rows[key]] = vector
            return
        n = len(self.keys)
        if n == len(self.matrix):
            self.matrix = np.concatenate([self.matrix, np.zeros_like(self.matrix)])
        self.matrix[n] = vector
        self.keys.append(key)
        self.rows[key] = n

    def remove(self, key: str) -> None:
        i = self.rows.pop(key, None)
        if i is None:
            return
        last = len(self.keys) - 1
        if i != last:
            moved = self.keys[last]
            self.keys[i], self.matrix[i] = moved, self.matrix[last]
            self.rows[moved] = i
        self.keys.pop()

    def top(self, vector: np.ndarray, k: int) -> list[tuple[str, float]]:
        n = len(self.keys)
        if n == 0:
            return []
        scores = self.matrix[:n] @ vector
        best = np.argsort(-scores)[:k] if n <= 4 * k else np.argpartition(-scores, k)[:k]
        best = sorted(best, key=lambda i: -scores[i])
        return [(self.keys[i], float(scores[i])) for i in best]


# store an entry and, when it has a vector, add it to its partition's index scored by the
# Redis server's clock in microseconds, atomically. The server's clock rather than a counter:
# a restarted Redis (no persistence) would restart a counter below the marks replicas have
# already synced to, and they would never see the new entries.
_PUT_SCRIPT = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[1] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if ARGV[3] == '1' then
  local t = redis.call('TIME')
  local mark = string.format('%d%06d', tonumber(t[1]), tonumber(t[2]))
  redis.call('ZADD', KEYS[2], mark, ARGV[2])
  if ARGV[1] ~= '0' then redis.call('PEXPIRE', KEYS[2], ARGV[1]) end
end
return 1
"""


class _RedisTier:
    """The shared tier (brief §2.4.5): each entry is a hash ``{ns}:e:{key}`` with the entry's
    TTL; each partition has a sorted set ``{ns}:p:{partition hash}`` of its entries' keys,
    scored by the Redis clock (microseconds) when written, so a replica merges only what is
    new. Redis being down never raises (:class:`datahall.core.redis.RedisLink`): the call
    reports failure and the cache serves from process memory."""

    def __init__(
        self, url: str | None, namespace: str, timeout_s: float, retry_s: float, client=None
    ):
        self.link = RedisLink(
            url,
            what="the response cache",
            fallback="process memory serves",
            log=log,
            client=client,
            timeout_s=timeout_s,
            retry_s=retry_s,
        )
        self.ns = namespace
        self._put = self.link.client.register_script(_PUT_SCRIPT)

    def entry_key(self, key: str) -> str:
        return f"{self.ns}:e:{key}"

    def index_key(self, partition: str) -> str:
        return f"{self.ns}:p:{_digest(partition)}"

    def put(self, e: _Entry, ttl_s: float | None) -> bool:
        fields: dict[str, bytes | str] = {
            "key": e.key,
            "partition": e.partition,
            "completion": json.dumps(e.completion, ensure_ascii=False),
            "stored_at": repr(e.stored_at),
        }
        if e.text is not None and e.vector is not None:
            fields["text"] = e.text
            fields["vector"] = np.asarray(e.vector, "<f4").tobytes()
        px = "0" if ttl_s is None else str(max(1, int(ttl_s * 1000)))
        args: list[bytes | str] = [px, e.key, "1" if "vector" in fields else "0"]
        for k, v in fields.items():
            args += [k, v]
        keys = [self.entry_key(e.key), self.index_key(e.partition)]
        return self.link.call(lambda r: self._put(keys=keys, args=args, client=r)) is not FAILED

    def get(self, key: str) -> _Entry | None:
        raw = self.link.call(lambda r: r.hgetall(self.entry_key(key)))
        return None if raw is FAILED else _decode(raw)

    def since(
        self, partition: str, mark: float, held: Container[str] = ()
    ) -> tuple[list[_Entry], float] | None:
        """The entries added to `partition` at or after `mark` (a score of its index) whose
        keys are not in `held`, and the new mark; None when Redis failed. Inclusive, so that
        an entry written in the same microsecond as the last one seen is not skipped."""
        index = self.index_key(partition)
        listed = self.link.call(
            lambda r: r.zrangebyscore(index, f"{mark:.0f}", "+inf", withscores=True)
        )
        if listed is FAILED:
            return None
        if not listed:
            return [], mark
        new_mark = max(s for _, s in listed)
        members = [(m, s) for m, s in listed if m.decode() not in held]
        if not members:
            return [], new_mark

        def fetch(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for m, _ in members:
                pipe.hgetall(self.entry_key(m.decode()))
            return pipe.execute()

        raws = self.link.call(fetch)
        if raws is FAILED:
            return None
        entries, gone = [], []
        for (m, _), raw in zip(members, raws, strict=True):
            e = _decode(raw)
            if e is None:
                gone.append(m)
            else:
                entries.append(e)
        if gone:  # expired entries: drop them from the index too
            self.link.call(lambda r: r.zrem(index, *gone))
        return entries, new_mark


def _decode(raw: Mapping[bytes, bytes] | None) -> _Entry | None:
    if not raw:
        return None
    try:
        vector = None
        if b"vector" in raw:
            vector = np.frombuffer(raw[b"vector"], "<f4").astype(np.float32)
        return _Entry(
            key=raw[b"key"].decode(),
            partition=raw[b"partition"].decode(),
            completion=json.loads(raw[b"completion"]),
            stored_at=float(raw[b"stored_at"]),
            text=raw[b"text"].decode() if b"text" in raw else None,
            vector=vector,
        )
    except (KeyError, ValueError, UnicodeDecodeError) as e:
        log.warning("ignoring a malformed response-cache entry in Redis: %s", e)
        return None


class SemanticCache:
    """The gateway's response cache: exact L1, semantic L2, polarity guard, replay (brief §2.4).

    `embedder` is an :class:`.embed.Embedder` or any function from texts to unit vectors
    (tests pass a small one); by default all-MiniLM-L6-v2 is loaded when the semantic tier is
    on, raising :class:`.embed.EmbedderUnavailable` with the install command if it is
    missing. With `redis_url`, entries are also written to that Redis and each partition's
    index is merged from it every ``config.sync_interval_s``, so gateway replicas share hits;
    when Redis is down the cache logs it and serves from process memory. LRU applies to
    process memory; Redis keeps an entry until its TTL (so give a TTL, or a Redis
    ``maxmemory-policy``, when sharing). `clock` (seconds) is
    used for TTLs, so tests can move time. The instance is thread-safe; :meth:`lookup` and
    :meth:`store` block (an embedding, a Redis round trip), so async servers call them in a
    worker thread.
    """

    def __init__(
        self,
        config: CacheConfig | None = None,
        *,
        embedder: EmbedFn | Any | None = None,
        redis_url: str | None = None,
        namespace: str = "datahall:gateway:cache",
        redis_timeout_s: float = 0.25,
        redis_retry_s: float = 1.0,
        redis_client: Any = None,
        clock: Callable[[], float] = time.time,
    ):
        self.config = config or CacheConfig()
        if embedder is None and self.config.semantic:
            from .embed import Embedder

            embedder = Embedder.load()
        self._embed: EmbedFn | None = getattr(embedder, "embed", embedder)
        self.clock = clock
        self.redis = (
            _RedisTier(
                redis_url,
                namespace,
                redis_timeout_s,
                redis_retry_s,
                redis_client,
            )
            if redis_url is not None or redis_client is not None
            else None
        )
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._indexes: dict[str, _Index] = {}
        self._synced: dict[str, tuple[float, float]] = {}  # partition -> (monotonic, mark)
        self._stats = CacheStats()
        self._lock = threading.RLock()

    # -- bookkeeping

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            s = replace(self._stats)
        if self.redis is not None:
            s.redis_errors, s.redis_outages = self.redis.link.errors, self.redis.link.outages
        return s

    def clear(self) -> None:
        """Forget every entry held in process memory (Redis is left as it is)."""
        with self._lock:
            self._entries.clear()
            self._indexes.clear()
            self._synced.clear()

    def _expired(self, e: _Entry, now: float) -> bool:
        return self.config.ttl_s is not None and now >= e.stored_at + self.config.ttl_s

    def _remove(self, key: str) -> None:
        e = self._entries.pop(key, None)
        if e is not None and e.vector is not None and e.partition in self._indexes:
            index = self._indexes[e.partition]
            index.remove(key)
            if not len(index):
                del self._indexes[e.partition]

    def _insert(self, e: _Entry) -> None:
        self._remove(e.key)
        self._entries[e.key] = e
        if e.vector is not None:
            vector = np.asarray(e.vector, np.float32)
            index = self._indexes.setdefault(e.partition, _Index(len(vector)))
            if index.matrix.shape[1] == len(vector):
                index.add(e.key, vector)
            else:  # a replica with another embedder wrote to this namespace
                log.warning(
                    "not indexing response-cache entry %s: %d dimensions, the index has %d; "
                    "replicas sharing a Redis namespace must use the same embedder",
                    e.key,
                    len(vector),
                    index.matrix.shape[1],
                )
        while len(self._entries) > self.config.max_entries:
            self._remove(next(iter(self._entries)))
            self._stats.evictions += 1

    def purge_expired(self) -> int:
        """Drop the expired entries held in process memory; returns how many."""
        now = self.clock()
        with self._lock:
            dead = [k for k, e in self._entries.items() if self._expired(e, now)]
            for k in dead:
                self._remove(k)
            self._stats.expirations += len(dead)
        return len(dead)

    def _live(self, key: str, now: float) -> _Entry | None:
        e = self._entries.get(key)
        if e is not None and self._expired(e, now):
            self._remove(key)
            self._stats.expirations += 1
            return None
        return e

    def _sync(self, partition: str) -> None:
        """Merge into this process the entries other replicas added to `partition`."""
        if self.redis is None:
            return
        with self._lock:
            last, mark = self._synced.get(partition, (-math.inf, 0.0))
        if time.monotonic() - last < self.config.sync_interval_s:
            return
        found = self.redis.since(partition, mark, self._entries)
        if found is None:
            return
        entries, mark = found
        now = self.clock()
        with self._lock:
            for e in entries:
                fresh = e.key not in self._entries and not self._expired(e, now)
                if fresh and e.partition == partition:
                    self._insert(e)
            self._synced[partition] = (time.monotonic(), mark)

    # -- the API

    def lookup(self, body: Mapping[str, Any], *, tenant: str = "") -> CacheLookup:
        """Look `body` (an OpenAI chat-completions request) up for `tenant`: the exact tier,
        then the semantic tier of its partition. Never raises for a well-formed dict."""
        stream = bool(body.get("stream", False))
        options = body.get("stream_options")
        include_usage = isinstance(options, Mapping) and bool(options.get("include_usage"))
        with self._lock:
            self._stats.lookups += 1
        bypass = bypass_reason(body, self.config)
        if bypass is not None:
            with self._lock:
                self._stats.bypassed += 1
            code, why = bypass
            return CacheLookup(False, stream, include_usage=include_usage, skip=code, reason=why)
        key, partition = exact_key(body, tenant), partition_key(body, tenant)
        base = CacheLookup(False, stream, key, partition, include_usage=include_usage)
        now = self.clock()
        with self._lock:
            entry = self._live(key, now)
            if entry is not None:
                self._entries.move_to_end(key)
        if entry is None and self.redis is not None:
            entry = self.redis.get(key)
            if entry is not None and (entry.key != key or self._expired(entry, now)):
                entry = None
            if entry is not None:
                with self._lock:
                    self._insert(entry)
        if entry is not None:
            with self._lock:
                self._stats.exact_hits += 1
            return replace(
                base,
                hit=True,
                tier="exact",
                similarity=1.0,
                completion=copy.deepcopy(entry.completion),  # the caller may change its copy
                text=entry.text,
            )
        return self._semantic(body, base, now)

    def _semantic(self, body: Mapping[str, Any], base: CacheLookup, now: float) -> CacheLookup:
        skip = semantic_skip_reason(body, self.config) if self.config.semantic else None
        if not self.config.semantic or self._embed is None or skip is not None:
            with self._lock:
                self._stats.misses += 1
            code, why = skip if skip is not None else (None, "semantic tier off")
            return replace(base, skip=code, reason=why)
        text = embedding_text(body["messages"], self.config.embed)
        assert text is not None  # semantic_skip_reason refuses prompts without text
        vector = np.asarray(self._embed([text]), np.float32)[0]
        self._sync(base.partition)
        reasons = []
        best: float | None = None
        with self._lock:
            index = self._indexes.get(base.partition)
            candidates = index.top(vector, self.config.max_candidates) if index else []
            for key, score in candidates:
                best = score if best is None else max(best, score)
                if score < self.config.min_cosine_similarity:
                    break
                entry = self._live(key, now)
                if entry is None or entry.text is None:
                    continue
                why = polarity_guard(text, entry.text) if self.config.guard else None
                if why is not None:
                    self._stats.guard_rejections += 1
                    reasons.append(f"guard refused a {score:.3f} match: {why}")
                    continue
                self._entries.move_to_end(key)
                self._stats.semantic_hits += 1
                return replace(
                    base,
                    hit=True,
                    tier="semantic",
                    similarity=score,
                    completion=copy.deepcopy(entry.completion),
                    text=text,
                    vector=vector,
                )
            self._stats.misses += 1
        if best is None:
            reasons.append("empty partition")
        elif not reasons:
            reasons.append(f"best similarity {best:.3f} < {self.config.min_cosine_similarity}")
        return replace(base, similarity=best, text=text, vector=vector, reason="; ".join(reasons))

    def store(self, lookup: CacheLookup, completion: Mapping[str, Any]) -> bool:
        """Store the upstream answer to the request `lookup` missed; True if stored.

        Refused (False) for a hit, a request that bypassed the cache, or an answer that is
        not complete (:func:`is_complete`: a ``length``-truncated or aborted answer is never
        stored). Storing also writes to Redis when configured; a Redis failure is logged and
        the entry is kept in process memory."""
        if lookup.hit or lookup.key is None or lookup.partition is None:
            return False
        if not is_complete(completion):
            with self._lock:
                self._stats.incomplete += 1
            return False
        entry = _Entry(
            key=lookup.key,
            partition=lookup.partition,
            completion=json.loads(json.dumps(completion)),  # an owned, JSON-clean copy
            stored_at=self.clock(),
            text=lookup.text if lookup.vector is not None else None,
            vector=lookup.vector,
        )
        with self._lock:
            self._insert(entry)
            self._stats.stores += 1
        if self.redis is not None:
            self.redis.put(entry, self.config.ttl_s)
        return True

    def store_stream(self, lookup: CacheLookup, chunks: Iterable[bytes | str]) -> bool:
        """Store a streamed answer from its SSE bytes (:func:`assemble_stream`); an incomplete
        stream (no ``[DONE]``, no ``stop``) is refused."""
        completion = assemble_stream(chunks)
        if completion is None:
            if lookup.cacheable and not lookup.hit:
                with self._lock:
                    self._stats.incomplete += 1
            return False
        return self.store(lookup, completion)
