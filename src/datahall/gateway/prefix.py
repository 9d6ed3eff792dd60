"""Approximate prefix-cache hashes of a prompt, and the index that says which endpoint holds them.

An LLM server keeps the KV cache of the prompts it has prefilled, in blocks, and a new prompt that
starts with the same blocks skips their prefill. A gateway cannot see those blocks, so the Gateway
API Inference Extension's ``prefix-cache-scorer`` approximates them from the request text (brief
§2.3, ``../shared/papers/ai-gateway.md``):

- the prompt's bytes are cut into blocks of 64 (≈ vLLM's 16-token blocks at ~4 characters a
  token), at most 256 of them; a trailing partial block is not hashed, as in GIE's first plugin
  and as a server caches only full blocks (later GIE releases also hash the partial block);
- the blocks are chain-hashed with 64-bit xxhash (seed 0): ``h_0 = xxh64(model ‖ cache_salt)``
  and ``h_i = xxh64(block_i ‖ h_{i-1})`` with ``h_{i-1}`` as 8 little-endian bytes, which is
  GIE's layout (``plugins/multi/prefix/plugin.go``: ``toBytes`` puts the previous hash with
  ``binary.LittleEndian``), so two prompts share hash i exactly when they share model and the
  first i blocks;
- a :class:`PrefixIndex` keeps, per endpoint, an LRU of the 31,250 hashes it served last; the
  score of an endpoint is the longest run of matched blocks from the first one.

Without the ``xxhash`` package the chain uses 8 bytes of BLAKE2b instead (:data:`HASH_NAME`
says which): the invariants hold, but the values then differ from GIE's.

>>> a = prefix_hashes("llama-3", "x" * 200)
>>> len(a), a == prefix_hashes("llama-3", "x" * 192 + "y" * 8)
(3, True)
>>> a[0] == prefix_hashes("gpt-4o", "x" * 200)[0]
False
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

try:  # GIE's hash; optional so that the module works (with other values) without it
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - depends on the environment
    _xxhash = None

__all__ = [
    "BLOCK_CHARS",
    "MAX_BLOCKS",
    "LRU_CAPACITY_PER_ENDPOINT",
    "HASH_NAME",
    "hash64",
    "prefix_hashes",
    "request_text",
    "request_hashes",
    "PrefixIndex",
]

BLOCK_CHARS = 64
"""GIE's default block size: 16 tokens of ~4 characters (brief §2.3)."""
MAX_BLOCKS = 256
"""GIE's default cap on hashed blocks per prompt (16 KiB of text)."""
LRU_CAPACITY_PER_ENDPOINT = 31_250
"""GIE's default number of block hashes remembered per endpoint."""
HASH_NAME = "xxh64" if _xxhash is not None else "blake2b-64"
"""Which 64-bit hash :func:`hash64` is: ``xxh64`` (GIE-compatible) or the fallback."""

K = TypeVar("K", bound=Hashable)


def hash64(data: bytes) -> int:
    """The unsigned 64-bit hash of `data` that the chain uses: xxh64 with seed 0 (as Go's
    ``cespare/xxhash`` in GIE) when ``xxhash`` is installed, else the first 8 bytes of BLAKE2b
    read little-endian.

    >>> 0 <= hash64(b"abc") < 2**64
    True
    """
    if _xxhash is not None:
        return _xxhash.xxh64_intdigest(data)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def prefix_hashes(
    model: str,
    prompt: str | bytes,
    *,
    block_chars: int = BLOCK_CHARS,
    max_blocks: int = MAX_BLOCKS,
    cache_salt: str = "",
) -> list[int]:
    """The chained block hashes of `prompt` for `model` (brief §2.3): one per full block of
    `block_chars` bytes of its UTF-8 text, at most `max_blocks`. Hash i depends on the model,
    the `cache_salt` (vLLM's per-tenant cache isolation, which GIE also hashes) and blocks 0..i,
    and on nothing after them.

    >>> h = prefix_hashes("m", "a" * 64 + "b" * 64 + "c" * 10)
    >>> len(h)  # the 10 trailing characters are no full block
    2
    >>> prefix_hashes("m", "a" * 64 + "B" * 64)[0] == h[0]
    True
    >>> prefix_hashes("m", "short")
    []
    >>> len(prefix_hashes("m", "z" * 1000, block_chars=64, max_blocks=4))
    4
    """
    if block_chars < 1:
        raise ValueError(f"block_chars must be at least 1, not {block_chars}")
    if max_blocks < 0:
        raise ValueError(f"max_blocks must be at least 0, not {max_blocks}")
    data = prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)
    data = data[: block_chars * max_blocks]
    prev = hash64(model.encode("utf-8") + cache_salt.encode("utf-8"))
    out: list[int] = []
    for start in range(0, len(data) - block_chars + 1, block_chars):
        prev = hash64(data[start : start + block_chars] + prev.to_bytes(8, "little"))
        out.append(prev)
    return out


def _content_text(content: Any) -> str:
    """A message's ``content`` as text: a string as is; a list of parts as their texts, other
    parts (images, audio) as compact JSON so that different images make different prefixes."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            if isinstance(part, dict) and part.get("type") == "text"
            else _json(part)
            for part in content
        )
    return _json(content)


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_text(body: Mapping[str, Any]) -> str:
    """The text of an OpenAI request body that is hashed: for ``/v1/chat/completions`` each
    message as ``"role: content\\n"`` in order (tool calls appended as JSON), so a shared system
    prompt is a shared prefix; for ``/v1/completions`` the ``prompt`` (a list of prompts joined
    by newlines; token ids written as decimal numbers). Raises ValueError for a body with neither.

    GIE hashes Go's ``json.Marshal`` of the messages instead; this rendering is ours, and what
    matters is that the gateway and the backend simulator (:mod:`datahall.gateway.simulate`)
    render alike.

    >>> request_text({"messages": [{"role": "system", "content": "Be brief."},
    ...                            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]})
    'system: Be brief.\\nuser: Hi\\n'
    >>> request_text({"prompt": "Once upon a time"})
    'Once upon a time'
    """
    messages = body.get("messages")
    if messages is not None:
        if not isinstance(messages, list):
            raise ValueError("`messages` must be a list of {role, content} objects")
        lines = []
        for m in messages:
            if not isinstance(m, dict):
                raise ValueError("each of `messages` must be an object with `role` and `content`")
            text = _content_text(m.get("content"))
            if m.get("tool_calls"):
                text += _json(m["tool_calls"])
            lines.append(f"{m.get('role', '')}: {text}\n")
        return "".join(lines)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if all(isinstance(p, int) for p in prompt):  # one prompt as token ids
            return " ".join(map(str, prompt))
        return "\n".join(
            p if isinstance(p, str) else " ".join(map(str, p))
            for p in prompt
            if isinstance(p, str | list)
        )
    raise ValueError("the request has neither `messages` (chat) nor `prompt` (completions)")


def request_hashes(
    body: Mapping[str, Any], *, block_chars: int = BLOCK_CHARS, max_blocks: int = MAX_BLOCKS
) -> list[int]:
    """:func:`prefix_hashes` of an OpenAI request body: its ``model``, :func:`request_text` and
    ``cache_salt`` (if any).

    >>> body = {"model": "m", "messages": [{"role": "user", "content": "q" * 100}]}
    >>> request_hashes(body) == prefix_hashes("m", "user: " + "q" * 100 + "\\n")
    True
    """
    return prefix_hashes(
        str(body.get("model", "")),
        request_text(body),
        block_chars=block_chars,
        max_blocks=max_blocks,
        cache_salt=str(body.get("cache_salt") or ""),
    )


class PrefixIndex(Generic[K]):
    """Which endpoints recently served which block hashes: GIE's approximate prefix index
    (brief §2.3). Each endpoint keeps an LRU of at most `capacity_per_endpoint` hashes; the
    gateway :meth:`record` s the hashes of each request on the endpoint it picked, and
    :meth:`match` counts, per endpoint, the blocks matched consecutively from the first.

    >>> index = PrefixIndex(capacity_per_endpoint=100)
    >>> index.record("a", [1, 2, 3])
    >>> index.record("b", [1, 9])
    >>> index.match([1, 2, 3, 4])
    {'a': 3, 'b': 1}
    >>> index.match([5, 2, 3])
    {}
    """

    def __init__(self, capacity_per_endpoint: int = LRU_CAPACITY_PER_ENDPOINT) -> None:
        if capacity_per_endpoint < 0:
            raise ValueError(f"capacity_per_endpoint must be >= 0, not {capacity_per_endpoint}")
        self.capacity_per_endpoint = capacity_per_endpoint
        self._lru: dict[K, OrderedDict[int, None]] = {}

    def record(self, endpoint: K, hashes: Iterable[int]) -> None:
        """Remember that `endpoint` now holds `hashes` (a prompt's chain), evicting its least
        recently recorded hashes beyond the capacity."""
        lru = self._lru.setdefault(endpoint, OrderedDict())
        # Recorded last-to-first so the first blocks are the most recent: eviction then eats a
        # chain from its tail, as vLLM frees a request's blocks tail first, and never leaves a
        # tail that could not be matched without its head.
        for h in reversed(list(hashes)):
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > self.capacity_per_endpoint:
            lru.popitem(last=False)

    def match(self, hashes: Sequence[int]) -> dict[K, int]:
        """For each endpoint, how many of `hashes` it holds in a row from the first; endpoints
        with no match are left out. Matching does not refresh the LRU: only the endpoint that
        serves the request records it."""
        matched = {}
        for endpoint, lru in self._lru.items():  # in first-recorded order
            n = 0
            while n < len(hashes) and hashes[n] in lru:
                n += 1
            if n:
                matched[endpoint] = n
        return matched

    def remove(self, endpoint: K) -> None:
        """Forget `endpoint` (it left the pool, or its server restarted with an empty cache)."""
        self._lru.pop(endpoint, None)

    def endpoints(self) -> list[K]:
        """The endpoints that have recorded hashes."""
        return list(self._lru)

    def size(self, endpoint: K) -> int:
        """How many hashes `endpoint` holds."""
        return len(self._lru.get(endpoint, ()))

    def __len__(self) -> int:
        """The number of distinct hashes held by any endpoint."""
        return len(set().union(*self._lru.values()))
