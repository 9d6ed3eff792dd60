"""The prefix cache store of DroidSpeak serving: caches keyed by token blocks, held in process
memory (LRU by bytes) and shared between nodes through a real Redis.

**Keys.** As in vLLM's automatic prefix caching, a prompt is cut into blocks of
``block_tokens`` tokens and the hash of block i covers its parent's hash and its own tokens, so
one hash names a whole prefix. The chain starts from a root naming the *base-model fingerprint*
and the *producing variant* (brief §2.5, §4): engines that left the model out of the key served
one adapter's cache to another (vLLM #3264, llama.cpp #26207). Here the same tokens produced by
a sibling variant are a different key on purpose; a receiver asks for its own variant's caches
(reuse all layers) or for a sibling's (a cross-variant hit: recompute the pair's group with
:func:`~datahall.kvshare.hybrid.hybrid_kv`). Lookups return the longest cached prefix in whole
blocks, or the whole prompt when exactly that was stored.

**Entries.** A :class:`CacheEntry` holds what a :class:`~datahall.kvshare.hybrid.SenderCache`
holds for a prefix of n tokens: K/V of every layer and the E cache (hidden state entering a
layer) for a chosen set of layers, the group boundaries a receiver may start at. Attention is
causal, so the first m tokens' K/V and E caches are a prefix of the tensors: truncating is a
slice of the token dimension.

**Format** (little-endian), shared with :mod:`datahall.kvshare.transfer`::

    preamble  b"DHKV", version u16, flags u16
    frame     kind u8, dtype u8, layer u16, ndim u8, 3 pad, dims 4×u32, nbytes u64,
              crc32 of the payload, crc32 of the header (those fields and the payload's crc),
              payload
    entry     preamble | META (JSON) | IDS | K0 V0 … K(L−1) V(L−1) | E at each stored layer
              | blake2b-128 of everything before it

A flipped bit or a missing byte anywhere is detected (:class:`CorruptCache`) and nothing of the
entry is returned. Frames carry crc32s, which catch every burst error of up to 32 bits and any
other accidental damage but for one chance in 2³², at about four times blake2b's speed (the
frames are what a transfer streams and checks as they arrive, so their check bounds its rate);
a stored entry adds a blake2b-128 of the whole. Version 1 framed with blake2b-128 per frame and
is refused as a version mismatch. ``dtype=torch.float16`` stores K/V and E in half the bytes: float16 keeps 11
significant bits (relative error ≤ 2⁻¹¹ ≈ 4.9e-4 per value) and overflows past ±65504, so a
receiver's hybrid cache is then close to but no longer bitwise the sender's; an entry with
values out of range is kept in float32 instead. ``bfloat16`` keeps float32's range with 8 bits.

>>> from datahall.kvshare.hybrid import prefill
>>> from datahall.kvshare.models import tiny
>>> ids = list(range(1, 41))
>>> entry = CacheEntry.from_sender(prefill(tiny(), ids), base="tiny", variant="a", e_layers=[1])
>>> store = LocalStore(capacity_bytes=1 << 20)
>>> store.put(entry)
True
>>> store.lookup(ids[:35] + [7, 7], base="tiny", variant="a").n  # two whole blocks of 16
32
>>> store.lookup(ids, base="tiny", variant="b") is None  # another variant's key
True
>>> deserialize(serialize(entry)).e_layers
(1,)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import operator
import struct
import sys
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal

import torch

from ..core.redis import FAILED, RedisLink
from .hybrid import SenderCache

__all__ = [
    "BLOCK_TOKENS",
    "FRAME_HEADER_BYTES",
    "PREAMBLE",
    "CorruptCache",
    "MissingECache",
    "Kind",
    "Frame",
    "FrameHeader",
    "ECache",
    "CacheEntry",
    "Hit",
    "Location",
    "Shared",
    "StoreStats",
    "LocalStore",
    "RedisStore",
    "TieredStore",
    "block_hashes",
    "prefix_key",
    "encode_frame",
    "frame_parts",
    "parse_header",
    "frame_tensor",
    "check_preamble",
    "serialize",
    "deserialize",
]

log = logging.getLogger(__name__)

BLOCK_TOKENS = 16
"""Tokens per hashed block, vLLM's default."""
MAGIC = b"DHKV"
VERSION = 2
PREAMBLE = struct.Struct("<4sHH")
_FIELDS = struct.Struct("<BBHB3x4IQ")
_DIGEST = 16
FRAME_HEADER_BYTES = _FIELDS.size + 8
MAX_FRAME_BYTES = 1 << 34
"""Refuse frames claiming more than 16 GiB: a sane length is checked before it is read."""

_DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float16,
    3: torch.bfloat16,
    4: torch.int64,
    5: torch.uint8,
    6: torch.float64,
}
_CODES = {dt: code for code, dt in _DTYPES.items()}
_HALF = (torch.float16, torch.bfloat16)


class CorruptCache(ValueError):
    """A serialized cache or frame failed its checks (bad magic, version, checksum, length or
    shape); none of it was used. Recompute the prefix, or fetch it again."""


class MissingECache(LookupError):
    """The E cache of a layer was not stored: the entry cannot start a group there."""


class Kind(IntEnum):
    """What a frame carries."""

    META = 1
    IDS = 2
    K = 3
    V = 4
    E = 5
    END = 6
    REQUEST = 7
    ERROR = 8


@dataclass(frozen=True)
class Frame:
    """One decoded frame: its kind, layer and tensor."""

    kind: Kind
    layer: int
    tensor: torch.Tensor


@dataclass(frozen=True)
class FrameHeader:
    """A frame's header, checked: the payload's size is known and sane before it is read."""

    kind: Kind
    dtype: torch.dtype
    layer: int
    shape: tuple[int, ...]
    nbytes: int
    crc: int
    """The payload's crc32."""


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    if sys.byteorder != "little":  # the format is little-endian; no big-endian host is in use
        raise RuntimeError("datahall cache frames are little-endian; this host is big-endian")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def encode_frame(kind: Kind, layer: int, tensor: torch.Tensor) -> bytes:
    """One frame: header (kind, dtype, layer, shape, length, crc32 of the payload, crc32 of
    the header) followed by the tensor's bytes."""
    return b"".join(frame_parts(kind, layer, tensor))


def frame_parts(kind: Kind, layer: int, tensor: torch.Tensor) -> tuple[bytes, memoryview]:
    """A frame as (header, payload): the payload is a view of the tensor's bytes (of a
    contiguous copy if the tensor is not contiguous), so a writer can send it without joining
    the two first."""
    if tensor.dtype not in _CODES:
        raise ValueError(f"cannot frame a {tensor.dtype} tensor; use one of {list(_CODES)}")
    if not 1 <= tensor.dim() <= 4:
        raise ValueError(
            f"frames carry 1- to 4-dimensional tensors, got shape {tuple(tensor.shape)}"
        )
    if not 0 <= layer < 1 << 16:
        raise ValueError(f"layer {layer} does not fit a frame header (0..65535)")
    data = _tensor_bytes(tensor)
    dims = list(tensor.shape) + [0] * (4 - tensor.dim())
    fields = _FIELDS.pack(int(kind), _CODES[tensor.dtype], layer, tensor.dim(), *dims, data.nbytes)
    head = fields + struct.pack("<I", zlib.crc32(data))
    return head + struct.pack("<I", zlib.crc32(head)), data


def parse_header(buf: bytes | memoryview) -> FrameHeader:
    """Check and decode a frame header of :data:`FRAME_HEADER_BYTES` bytes."""
    buf = memoryview(buf)
    if len(buf) != FRAME_HEADER_BYTES:
        raise CorruptCache(f"a frame header is {FRAME_HEADER_BYTES} bytes, got {len(buf)}")
    (crc,) = struct.unpack_from("<I", buf, FRAME_HEADER_BYTES - 4)
    if zlib.crc32(buf[:-4]) != crc:
        raise CorruptCache("a frame header fails its crc32: the stream or entry is corrupted")
    kind, code, layer, ndim, *rest = _FIELDS.unpack_from(buf)
    dims, nbytes = rest[:4], rest[4]
    try:
        kind = Kind(kind)
        dtype = _DTYPES[code]
    except (ValueError, KeyError):
        raise CorruptCache(f"unknown frame kind {kind} or dtype code {code}") from None
    if not 1 <= ndim <= 4 or any(dims[ndim:]):
        raise CorruptCache(f"bad frame shape: ndim {ndim}, dims {dims}")
    shape = tuple(dims[:ndim])
    expect = dtype.itemsize
    for d in shape:
        expect *= d
    if nbytes != expect or nbytes > MAX_FRAME_BYTES:
        raise CorruptCache(f"frame length {nbytes} does not match shape {shape} of {dtype}")
    (payload_crc,) = struct.unpack_from("<I", buf, _FIELDS.size)
    return FrameHeader(kind, dtype, layer, shape, nbytes, payload_crc)


def frame_tensor(
    header: FrameHeader, payload: bytes | bytearray | memoryview, *, owned: bool = False
) -> torch.Tensor:
    """The frame's tensor, after checking the payload against the header's crc32. With
    `owned` (a bytearray the caller hands over and never touches again) the tensor uses the
    payload's memory instead of a copy."""
    view = memoryview(payload)
    if view.nbytes != header.nbytes:
        raise CorruptCache(f"frame payload is {view.nbytes} bytes, header says {header.nbytes}")
    if zlib.crc32(view) != header.crc:
        raise CorruptCache(
            f"{header.kind.name} frame of layer {header.layer} fails its crc32 checksum"
        )
    if header.nbytes == 0:
        return torch.empty(header.shape, dtype=header.dtype)
    if owned and isinstance(payload, bytearray):
        return torch.frombuffer(payload, dtype=header.dtype).reshape(header.shape)
    # a private copy: the tensor must not alias a caller's (possibly reused) buffer
    return torch.frombuffer(bytearray(payload), dtype=header.dtype).reshape(header.shape)


def _json_tensor(obj: Any) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj, sort_keys=True).encode()), dtype=torch.uint8)


def _tensor_json(t: torch.Tensor) -> Any:
    try:
        return json.loads(bytes(t.tolist()).decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptCache(f"a META frame is not JSON: {e}") from None


class ECache:
    """E caches of some layers, indexed by layer like ``SenderCache.e_cache``; a layer that was
    not stored raises :class:`MissingECache` naming those that were."""

    def __init__(self, layers: Mapping[int, torch.Tensor], num_layers: int):
        self.layers = dict(layers)
        self.num_layers = num_layers

    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, layer: int) -> torch.Tensor:
        layer = operator.index(layer)
        if not -self.num_layers <= layer < self.num_layers:
            raise IndexError(f"layer {layer!r} is not in 0..{self.num_layers - 1}")
        layer %= self.num_layers
        if layer not in self.layers:
            raise MissingECache(
                f"the E cache at layer {layer} was not stored (stored: {sorted(self.layers)}); "
                "a receiver can only start its recompute group at a stored layer"
            )
        return self.layers[layer]


def _tokens(tokens: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        return [int(x) for x in tokens.reshape(-1).tolist()]
    return [int(x) for x in tokens]


def _root(base: str, variant: str, block_tokens: int) -> bytes:
    if not base or not variant:
        raise ValueError("a prefix key needs the base fingerprint and the producing variant")
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be positive, got {block_tokens}")
    seed = f"datahall.kvshare.prefix/1\0{base}\0{variant}\0{block_tokens}".encode()
    return hashlib.blake2b(seed, digest_size=_DIGEST).digest()


def _chain(parent: bytes, tag: bytes, tokens: Sequence[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=_DIGEST)
    h.update(tag)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


def block_hashes(
    tokens: Sequence[int] | torch.Tensor,
    base: str,
    variant: str,
    *,
    block_tokens: int = BLOCK_TOKENS,
) -> list[str]:
    """The chained hashes (hex) of `tokens`' whole blocks: hash i covers blocks 0..i, produced
    by `variant` of the base whose fingerprint is `base`. A trailing partial block is not
    hashed (see :func:`prefix_key`).

    >>> a = block_hashes(range(40), "base", "coder")
    >>> len(a), a[0] == block_hashes(range(16), "base", "coder")[0]
    (2, True)
    >>> block_hashes(range(40), "base", "docs")[0] == a[0]
    False
    """
    toks = _tokens(tokens)
    h = _root(base, variant, block_tokens)
    out = []
    for i in range(len(toks) // block_tokens):
        h = _chain(h, b"F", toks[i * block_tokens : (i + 1) * block_tokens])
        out.append(h.hex())
    return out


def _candidates(
    toks: list[int], base: str, variant: str, block_tokens: int, min_tokens: int
) -> list[tuple[str, int]]:
    """(key, prefix length) of every prefix a lookup may hit, longest first: the whole
    sequence, then each whole-block prefix."""
    h = _root(base, variant, block_tokens)
    out = []
    full = len(toks) // block_tokens
    for i in range(full):
        h = _chain(h, b"F", toks[i * block_tokens : (i + 1) * block_tokens])
        out.append((h.hex(), (i + 1) * block_tokens))
    if len(toks) % block_tokens:
        out.append((_chain(h, b"P", toks[full * block_tokens :]).hex(), len(toks)))
    return [c for c in reversed(out) if c[1] >= min_tokens]


def prefix_key(
    tokens: Sequence[int] | torch.Tensor,
    base: str,
    variant: str,
    *,
    block_tokens: int = BLOCK_TOKENS,
) -> str:
    """The key of exactly this token sequence: its last block's chained hash, the trailing
    partial block included (tagged apart from whole blocks)."""
    toks = _tokens(tokens)
    if not toks:
        raise ValueError("an empty prefix has no key")
    return _candidates(toks, base, variant, block_tokens, 1)[0][0]


@dataclass
class CacheEntry:
    """A stored prefix cache: token ids [1, n], K/V of every layer ([1, kv_heads, n, head_dim]
    each) and E caches [1, n, d_model] at the layers in ``e_cache``, produced by `variant` of
    the base whose fingerprint is `base` (``Model.base``, ``Model.name``)."""

    base: str
    variant: str
    ids: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    e_cache: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.ids.shape[-1])

    @property
    def num_layers(self) -> int:
        return len(self.kv)

    @property
    def e_layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.e_cache))

    @property
    def dtype(self) -> torch.dtype:
        return self.kv[0][0].dtype

    @property
    def nbytes(self) -> int:
        """Bytes of its tensors (what the hot tier counts)."""
        ts = [self.ids, *(t for kv in self.kv for t in kv), *self.e_cache.values()]
        return sum(t.numel() * t.element_size() for t in ts)

    def key(self, block_tokens: int = BLOCK_TOKENS) -> str:
        return prefix_key(self.ids, self.base, self.variant, block_tokens=block_tokens)

    @classmethod
    def from_sender(
        cls,
        sent: SenderCache,
        *,
        base: str,
        variant: str,
        e_layers: Iterable[int] | None = None,
        n: int | None = None,
    ) -> CacheEntry:
        """The entry for the first `n` tokens (all by default) of a sender's prefill, with E
        caches at `e_layers` (all layers by default). Tensors are copied: the entry owns
        exactly the bytes it counts."""
        n = sent.n if n is None else n
        if not 1 <= n <= sent.n:
            raise ValueError(f"cannot store {n} tokens of a {sent.n}-token prefix")
        layers = range(sent.num_layers) if e_layers is None else sorted(set(e_layers))
        for i in layers:
            if not 0 <= i < sent.num_layers:
                raise ValueError(f"E layer {i} is outside the model's {sent.num_layers} layers")
        return cls(
            base,
            variant,
            sent.ids[..., :n].reshape(1, n).long().clone(),
            [(k[:, :, :n].clone(), v[:, :, :n].clone()) for k, v in sent.kv],
            {i: sent.e_cache[i][:, :n].clone() for i in layers},
        )

    def truncate(self, n: int) -> CacheEntry:
        """The entry of the first `n` tokens (views: exact, since attention is causal)."""
        if not 1 <= n <= self.n:
            raise ValueError(f"cannot truncate a {self.n}-token entry to {n} tokens")
        if n == self.n:
            return self
        return CacheEntry(
            self.base,
            self.variant,
            self.ids[:, :n],
            [(k[:, :, :n], v[:, :, :n]) for k, v in self.kv],
            {i: e[:, :n] for i, e in self.e_cache.items()},
        )

    def astype(self, dtype: torch.dtype) -> CacheEntry:
        """K/V and E caches in `dtype` (ids stay int64). Raises ValueError when a value does not
        fit (float16 overflows past ±65504) rather than storing infinities."""
        if dtype == self.dtype and all(e.dtype == dtype for e in self.e_cache.values()):
            return self

        def cast(t: torch.Tensor) -> torch.Tensor:
            out = t.to(dtype)
            if not torch.equal(torch.isfinite(out), torch.isfinite(t)):
                raise ValueError(
                    f"a value of magnitude {t.abs().max().item():.3g} does not fit {dtype}; "
                    "store this entry in float32 or bfloat16"
                )
            return out

        return CacheEntry(
            self.base,
            self.variant,
            self.ids,
            [(cast(k), cast(v)) for k, v in self.kv],
            {i: cast(e) for i, e in self.e_cache.items()},
        )

    def to_sender(self, n: int | None = None, *, dtype: torch.dtype = torch.float32) -> SenderCache:
        """A SenderCache of the first `n` tokens for :func:`~datahall.kvshare.hybrid.hybrid_kv`,
        in `dtype` (the models run in float32). Layers without a stored E cache raise
        :class:`MissingECache` when read."""
        e = self.truncate(self.n if n is None else n)
        kv = [(k.to(dtype), v.to(dtype)) for k, v in e.kv]
        stored = {i: h.to(dtype) for i, h in e.e_cache.items()}
        e_cache: Any = (
            [stored[i] for i in range(e.num_layers)]
            if len(stored) == e.num_layers
            else ECache(stored, e.num_layers)
        )
        meta = {"base": e.base, "variant": e.variant, "source": "store"}
        return SenderCache(e.ids, kv, e_cache, 0.0, meta)

    def _owned(self) -> CacheEntry:
        """Itself, or a copy whose tensors own their storage (a view would hold its parent's
        bytes alive while the hot tier counted only the view's)."""

        def own(t: torch.Tensor) -> torch.Tensor:
            full = t.untyped_storage().nbytes() == t.numel() * t.element_size()
            return (
                t if full and t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)
            )

        return CacheEntry(
            self.base,
            self.variant,
            own(self.ids),
            [(own(k), own(v)) for k, v in self.kv],
            {i: own(e) for i, e in self.e_cache.items()},
        )


def _check_entry(entry: CacheEntry) -> None:
    """Shapes that make an entry usable: one n everywhere, K and V alike, one dtype."""
    n, L = entry.n, entry.num_layers
    if L == 0 or n == 0 or tuple(entry.ids.shape) != (1, n):
        raise ValueError(
            f"an entry needs ids [1, n>0] and at least one layer; ids {entry.ids.shape}"
        )
    k0 = entry.kv[0][0]
    for i, (k, v) in enumerate(entry.kv):
        if k.shape != k0.shape or v.shape != k0.shape or k.dim() != 4 or k.shape[2] != n:
            raise ValueError(
                f"layer {i}: K {tuple(k.shape)}, V {tuple(v.shape)}; need [1, h, {n}, d]"
            )
        if k.dtype != k0.dtype or v.dtype != k0.dtype:
            raise ValueError(f"layer {i}: K/V dtypes differ from layer 0's {k0.dtype}")
    for i, e in entry.e_cache.items():
        if not 0 <= i < L or e.dim() != 3 or e.shape[:2] != (1, n) or e.dtype != k0.dtype:
            raise ValueError(f"E cache at layer {i}: {tuple(e.shape)} {e.dtype}; need [1, {n}, d]")


def serialize(entry: CacheEntry) -> bytes:
    """The entry in the checked binary format of this module's docstring."""
    _check_entry(entry)
    meta = {
        "base": entry.base,
        "variant": entry.variant,
        "n": entry.n,
        "num_layers": entry.num_layers,
        "dtype": str(entry.dtype).removeprefix("torch."),
        "kv_shape": list(entry.kv[0][0].shape),
        "e_layers": list(entry.e_layers),
        "e_shape": list(next(iter(entry.e_cache.values())).shape) if entry.e_cache else None,
    }
    frames = [(Kind.META, 0, _json_tensor(meta)), (Kind.IDS, 0, entry.ids)]
    for i, (k, v) in enumerate(entry.kv):
        frames += [(Kind.K, i, k), (Kind.V, i, v)]
    frames += [(Kind.E, i, entry.e_cache[i]) for i in entry.e_layers]
    parts: list[bytes | memoryview] = [PREAMBLE.pack(MAGIC, VERSION, 0)]
    for frame in frames:
        parts += frame_parts(*frame)
    body = b"".join(parts)  # one copy of each payload
    return body + hashlib.blake2b(body, digest_size=_DIGEST).digest()


def check_preamble(buf: bytes | memoryview) -> None:
    """Refuse bytes that do not start like this module's format, version included."""
    magic, version, flags = PREAMBLE.unpack_from(buf)
    if magic != MAGIC:
        raise CorruptCache(f"not a datahall cache: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CorruptCache(f"cache format version {version}; this datahall reads version {VERSION}")
    if flags:
        raise CorruptCache(f"unknown format flags {flags:#x}: written by a newer datahall?")


def deserialize(blob: bytes | bytearray | memoryview) -> CacheEntry:
    """The entry `blob` holds, fully checked; :class:`CorruptCache` on any damage."""
    mv = memoryview(blob).cast("B")
    if mv.nbytes < PREAMBLE.size + _DIGEST:
        raise CorruptCache(
            f"a cache entry is at least {PREAMBLE.size + _DIGEST} bytes, got {mv.nbytes}"
        )
    check_preamble(mv)
    end = mv.nbytes - _DIGEST
    if hashlib.blake2b(mv[:end], digest_size=_DIGEST).digest() != mv[end:]:
        raise CorruptCache("the cache entry fails its whole-entry checksum (truncated or altered)")
    pos = PREAMBLE.size

    def frame(kind: Kind, layer: int) -> torch.Tensor:
        nonlocal pos
        if end - pos < FRAME_HEADER_BYTES:
            raise CorruptCache(f"the entry ends before its {kind.name} frame of layer {layer}")
        head = parse_header(mv[pos : pos + FRAME_HEADER_BYTES])
        if head.kind != kind or head.layer != layer:
            raise CorruptCache(
                f"expected {kind.name} of layer {layer}, found {head.kind.name} of {head.layer}"
            )
        start = pos + FRAME_HEADER_BYTES
        if end - start < head.nbytes:
            raise CorruptCache(f"the entry ends inside its {kind.name} frame of layer {layer}")
        pos = start + head.nbytes
        return frame_tensor(head, mv[start:pos])

    meta = _tensor_json(frame(Kind.META, 0))
    try:
        L, dtype = int(meta["num_layers"]), getattr(torch, meta["dtype"])
        base, variant, e_layers = str(meta["base"]), str(meta["variant"]), list(meta["e_layers"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CorruptCache(f"the entry's META frame lacks {e}") from None
    ids = frame(Kind.IDS, 0)
    kv = [(frame(Kind.K, i), frame(Kind.V, i)) for i in range(L)]
    e_cache = {int(i): frame(Kind.E, int(i)) for i in e_layers}
    if pos != end:
        raise CorruptCache(f"{end - pos} unexpected bytes after the entry's last frame")
    entry = CacheEntry(base, variant, ids, kv, e_cache)
    try:
        _check_entry(entry)
    except ValueError as e:
        raise CorruptCache(f"the entry's tensors are inconsistent: {e}") from None
    if entry.dtype != dtype or entry.n != meta.get("n"):
        raise CorruptCache("the entry's tensors disagree with its META frame")
    return entry


@dataclass
class Hit:
    """A lookup's result: the stored entry, the length of the matched prefix, and the tier
    that had it ("local" or "redis"; "peer" for an entry an engine fetched from a peer
    node)."""

    entry: CacheEntry
    n: int
    tier: str

    @property
    def variant(self) -> str:
        return self.entry.variant

    def prefix(self) -> CacheEntry:
        """The entry of the matched tokens only."""
        return self.entry.truncate(self.n)

    def sender(self, dtype: torch.dtype = torch.float32) -> SenderCache:
        return self.entry.to_sender(self.n, dtype=dtype)


@dataclass
class StoreStats:
    """Counters of a tier. ``usage`` is the hot tier's ``kv_cache_usage_perc`` (a fraction);
    ``hit_rate`` is vLLM's prefix-cache hit rate: hit tokens over queried tokens."""

    hits: int = 0
    misses: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0
    puts: int = 0
    evictions: int = 0
    rejected: int = 0
    errors: int = 0
    corrupt: int = 0
    outages: int = 0
    bytes_used: int = 0
    capacity_bytes: int = 0
    entries: int = 0

    @property
    def usage(self) -> float:
        return self.bytes_used / self.capacity_bytes if self.capacity_bytes else 0.0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


def _to_dtype(entry: CacheEntry, dtype: torch.dtype | None) -> CacheEntry:
    if dtype is None:
        return entry
    try:
        return entry.astype(dtype)
    except ValueError as e:
        log.debug("keeping a prefix cache in %s: %s", entry.dtype, e)
        return entry


def _matches(entry: CacheEntry, toks: list[int], m: int, base: str, variant: str) -> bool:
    # a 128-bit key collision is not expected, but a wrong cache must never be served
    return (
        entry.base == base
        and entry.variant == variant
        and entry.n >= m
        and entry.ids[0, :m].tolist() == toks[:m]
    )


class LocalStore:
    """The hot tier: entries in process memory, least recently used evicted first until the
    bytes held fit `capacity_bytes`. Thread-safe."""

    def __init__(
        self,
        capacity_bytes: int,
        *,
        block_tokens: int = BLOCK_TOKENS,
        dtype: torch.dtype | None = None,
    ):
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = int(capacity_bytes)
        self.block_tokens = block_tokens
        self.dtype = dtype
        self._entries: OrderedDict[str, tuple[CacheEntry, list[str], int]] = OrderedDict()
        self._index: dict[str, dict[str, None]] = {}  # prefix key -> entries holding it
        self._stats = StoreStats(capacity_bytes=self.capacity_bytes)
        self._lock = threading.RLock()

    @property
    def stats(self) -> StoreStats:
        with self._lock:
            return dataclasses.replace(self._stats, entries=len(self._entries))

    @property
    def bytes_used(self) -> int:
        return self._stats.bytes_used

    @property
    def usage(self) -> float:
        return self._stats.usage

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        """Entry keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def put(self, entry: CacheEntry) -> bool:
        """Store `entry` (replacing one of the same key), evicting least recently used entries
        to make room. False, and nothing evicted, if it alone exceeds the capacity."""
        _check_entry(entry)
        entry = _to_dtype(entry, self.dtype)._owned()
        size = entry.nbytes
        cands = _candidates(_tokens(entry.ids), entry.base, entry.variant, self.block_tokens, 1)
        key = cands[0][0]
        with self._lock:
            if size > self.capacity_bytes:
                self._stats.rejected += 1
                return False
            self._remove(key)
            while self._stats.bytes_used + size > self.capacity_bytes:
                self._remove(next(iter(self._entries)))
                self._stats.evictions += 1
            prefixes = [h for h, _ in cands]
            self._entries[key] = (entry, prefixes, size)
            for h in prefixes:
                self._index.setdefault(h, {})[key] = None
            self._stats.bytes_used += size
            self._stats.puts += 1
            return True

    def _remove(self, key: str) -> bool:
        item = self._entries.pop(key, None)
        if item is None:
            return False
        _, prefixes, size = item
        for h in prefixes:
            holders = self._index.get(h)
            if holders is not None:
                holders.pop(key, None)
                if not holders:
                    del self._index[h]
        self._stats.bytes_used -= size
        return True

    def remove(self, key: str) -> bool:
        with self._lock:
            return self._remove(key)

    def clear(self) -> None:
        with self._lock:
            for key in list(self._entries):
                self._remove(key)

    def get(self, key: str) -> CacheEntry | None:
        """The entry stored under exactly `key` (no counters, no recency change)."""
        with self._lock:
            item = self._entries.get(key)
            return item[0] if item else None

    def lookup(
        self,
        tokens: Sequence[int] | torch.Tensor,
        base: str,
        variant: str,
        *,
        min_tokens: int = 1,
    ) -> Hit | None:
        """The longest stored prefix of `tokens` produced by `variant`, at least `min_tokens`
        long; the entry holding it becomes the most recently used."""
        toks = _tokens(tokens)
        cands = _candidates(toks, base, variant, self.block_tokens, max(1, min_tokens))
        with self._lock:
            self._stats.query_tokens += len(toks)
            for h, m in cands:
                for key in reversed(self._index.get(h, {})):
                    entry = self._entries[key][0]
                    if _matches(entry, toks, m, base, variant):
                        self._entries.move_to_end(key)
                        self._stats.hits += 1
                        self._stats.hit_tokens += m
                        return Hit(entry, m, "local")
            self._stats.misses += 1
            return None


Shared = Literal["blob", "directory", "both"]
"""What nodes share through Redis: whole entries (``"blob"``), directory records naming the
node that holds each entry (``"directory"``: the receiver fetches it from that node's cache
server, layer by layer), or both."""

# delete a directory record only if it still is the one a receiver found stale (another node
# may have published the key since)
_FORGET = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)


@dataclass(frozen=True)
class Location:
    """A directory record found for a prompt: peer node `address` ("host:port" of its cache
    server) holds the entry `key` of `variant`, `entry_n` tokens long, whose first `n` tokens
    are the prompt's; it holds E caches at `e_layers`. `record` is the raw record (to forget
    it when the peer turns out not to hold the entry any more)."""

    base: str
    variant: str
    key: str
    n: int
    entry_n: int
    address: str
    e_layers: tuple[int, ...]
    record: bytes = field(repr=False, default=b"")

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


def _location(raw: bytes | None, base: str, variant: str, key: str, m: int) -> Location | None:
    if not raw:
        return None
    try:
        obj = json.loads(raw)
        address, n = str(obj["address"]), int(obj["n"])
        e_layers = tuple(sorted(int(i) for i in obj.get("e_layers", ())))
        int(address.rpartition(":")[2])
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring a malformed directory record for %s: %r", key, raw[:200])
        return None
    if n < m:
        return None
    return Location(base, variant, key, m, n, address, e_layers, raw)


class RedisStore:
    """The shared tier: entries in a Redis server that several nodes use.

    Keys are ``{namespace}:{base}:{variant}:entry:{key}`` (the serialized entry) and
    ``{namespace}:{base}:{variant}:block:{key}`` (the entry key holding that prefix), all with
    the TTL `ttl_s` when given. The *directory* (:meth:`publish`, :meth:`locate`) is the same
    scheme without the bytes: ``...:dir:{key}`` holds a small JSON record naming the node
    that holds the entry (its cache server's ``host:port``), its length and its E layers, and
    ``...:dirblock:{key}`` points each prefix at it, with the same TTL. Redis being down never raises: the operation reports a miss (or
    False for a put), one warning is logged per outage, and Redis is left alone for a back-off
    (`retry_after_s`, doubling to `max_retry_after_s`) after which the next operation tries
    again. An entry that fails its checks is deleted and reported as a miss.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        ttl_s: float | None = None,
        namespace: str = "datahall:kvshare",
        block_tokens: int = BLOCK_TOKENS,
        dtype: torch.dtype | None = None,
        timeout_s: float = 0.5,
        retry_after_s: float = 1.0,
        max_retry_after_s: float = 30.0,
        client: Any = None,
    ):
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.url = url
        self.ttl_s = ttl_s
        self.namespace = namespace
        self.block_tokens = block_tokens
        self.dtype = dtype
        self.link = RedisLink(
            url,
            what="the shared prefix cache",
            fallback="the local tier serves",
            log=log,
            client=client,
            timeout_s=timeout_s,
            retry_s=retry_after_s,
            max_retry_s=max_retry_after_s,
            extra="kvshare",
        )
        self.client = self.link.client
        self._stats = StoreStats()
        self._lock = threading.Lock()

    @property
    def stats(self) -> StoreStats:
        with self._lock:
            stats = dataclasses.replace(self._stats)
        stats.errors, stats.outages = self.link.errors, self.link.outages
        return stats

    @property
    def available(self) -> bool:
        """False while backing off after an outage."""
        return self.link.available

    def _entry_key(self, base: str, variant: str, key: str) -> str:
        return f"{self.namespace}:{base}:{variant}:entry:{key}"

    def _block_key(self, base: str, variant: str, key: str) -> str:
        return f"{self.namespace}:{base}:{variant}:block:{key}"

    def _dir_key(self, base: str, variant: str, key: str) -> str:
        return f"{self.namespace}:{base}:{variant}:dir:{key}"

    def _dir_block_key(self, base: str, variant: str, key: str) -> str:
        return f"{self.namespace}:{base}:{variant}:dirblock:{key}"

    def ping(self) -> bool:
        """Whether Redis answers (an outage is logged once and backed off, as for any call)."""
        return self.link.call(lambda r: r.ping()) is not FAILED

    def put(self, entry: CacheEntry) -> bool:
        """Store `entry` and point each of its prefixes at it; False if Redis is unavailable."""
        entry = _to_dtype(entry, self.dtype)
        blob = serialize(entry)
        cands = _candidates(_tokens(entry.ids), entry.base, entry.variant, self.block_tokens, 1)
        key = cands[0][0]
        px = None if self.ttl_s is None else max(1, int(self.ttl_s * 1000))

        def op(r: Any) -> Any:
            pipe = r.pipeline(transaction=False)
            pipe.set(self._entry_key(entry.base, entry.variant, key), blob, px=px)
            for h, _ in cands:  # after the entry: a pointer never precedes what it names
                pipe.set(self._block_key(entry.base, entry.variant, h), key, px=px)
            return pipe.execute()

        ok = self.link.call(op) is not FAILED
        with self._lock:
            self._stats.puts += ok
        return ok

    def lookup(
        self,
        tokens: Sequence[int] | torch.Tensor,
        base: str,
        variant: str,
        *,
        min_tokens: int = 1,
    ) -> Hit | None:
        """The longest stored prefix of `tokens` produced by `variant`, at least `min_tokens`
        long, or None (also when Redis is unavailable). One round trip for the pointers, one
        per entry read."""
        toks = _tokens(tokens)
        cands = _candidates(toks, base, variant, self.block_tokens, max(1, min_tokens))
        if not cands:  # nothing long enough to ask for: not a query
            return None
        with self._lock:
            self._stats.query_tokens += len(toks)
        hit = self._lookup(toks, cands, base, variant)
        with self._lock:
            if hit is None:
                self._stats.misses += 1
            else:
                self._stats.hits += 1
                self._stats.hit_tokens += hit.n
        return hit

    def _lookup(
        self, toks: list[int], cands: list[tuple[str, int]], base: str, variant: str
    ) -> Hit | None:
        def probe(r: Any) -> Any:
            pipe = r.pipeline(transaction=False)
            pipe.mget([self._block_key(base, variant, h) for h, _ in cands])
            for h, _ in cands:
                pipe.exists(self._entry_key(base, variant, h))
            return pipe.execute()

        found = self.link.call(probe)
        if found is FAILED:
            return None
        pointers, exists = found[0], found[1:]
        tried: set[str] = set()
        for (h, m), pointer, own in zip(cands, pointers, exists, strict=True):
            # an entry of exactly this prefix first; else the longer entry the pointer names
            # (a later put redirects pointers, while the shorter entry may still be stored)
            keys = ([h] if own else []) + ([pointer.decode(errors="replace")] if pointer else [])
            for key in keys:
                if key in tried:
                    continue
                tried.add(key)
                hit = self._read(key, toks, m, base, variant)
                if hit is FAILED:
                    return None
                if hit is not None:
                    return hit
        return None

    def _read(self, key: str, toks: list[int], m: int, base: str, variant: str) -> Any:
        """The hit in entry `key` for the first m tokens, None, or FAILED (Redis down)."""
        name = self._entry_key(base, variant, key)
        blob = self.link.call(lambda r: r.get(name))
        if blob is FAILED or blob is None:  # None: expired or evicted, its pointers live on
            return blob
        try:
            entry = deserialize(blob)
        except CorruptCache as e:
            log.warning("deleting corrupted prefix cache %s from Redis: %s", name, e)
            self.link.call(lambda r: r.delete(name))
            with self._lock:
                self._stats.corrupt += 1
            return None
        return Hit(entry, m, "redis") if _matches(entry, toks, m, base, variant) else None

    def publish(self, entry: CacheEntry, address: str) -> bool:
        """Record in the directory that the node whose cache server is at `address` holds
        `entry` (and so every prefix of it); False if Redis is unavailable."""
        cands = _candidates(_tokens(entry.ids), entry.base, entry.variant, self.block_tokens, 1)
        key = cands[0][0]
        record = json.dumps(
            {"address": address, "n": entry.n, "e_layers": list(entry.e_layers)}, sort_keys=True
        )
        px = None if self.ttl_s is None else max(1, int(self.ttl_s * 1000))

        def op(r: Any) -> Any:
            pipe = r.pipeline(transaction=False)
            pipe.set(self._dir_key(entry.base, entry.variant, key), record, px=px)
            for h, _ in cands:  # after the record: a pointer never precedes what it names
                pipe.set(self._dir_block_key(entry.base, entry.variant, h), key, px=px)
            return pipe.execute()

        return self.link.call(op) is not FAILED

    def locate(
        self,
        tokens: Sequence[int] | torch.Tensor,
        base: str,
        variants: Sequence[str],
        *,
        min_tokens: int = 1,
        exclude: str | None = None,
    ) -> dict[str, Location]:
        """Per variant, the directory record of the longest prefix of `tokens` (at least
        `min_tokens` long) that some node other than `exclude` (an address) holds; two round
        trips for all the variants. Empty when Redis is unavailable."""
        toks = _tokens(tokens)
        cands = {
            v: _candidates(toks, base, v, self.block_tokens, max(1, min_tokens)) for v in variants
        }
        flat = [(v, h, m) for v, cs in cands.items() for h, m in cs]
        if not flat:
            return {}

        def probe(r: Any) -> Any:
            pipe = r.pipeline(transaction=False)
            pipe.mget([self._dir_key(base, v, h) for v, h, _ in flat])
            pipe.mget([self._dir_block_key(base, v, h) for v, h, _ in flat])
            return pipe.execute()

        found = self.link.call(probe)
        if found is FAILED:
            return {}
        exact, pointers = found
        # the records the pointers name, unless already read as an exact record
        records = {(v, h): raw for (v, h, _), raw in zip(flat, exact, strict=True) if raw}
        wanted = []
        for (v, _, _), pointer in zip(flat, pointers, strict=True):
            if pointer and (v, pointer.decode(errors="replace")) not in records:
                wanted.append((v, pointer.decode(errors="replace")))
        wanted = list(dict.fromkeys(wanted))
        if wanted:
            more = self.link.call(lambda r: r.mget([self._dir_key(base, v, k) for v, k in wanted]))
            if more is FAILED:
                return {}
            records.update({w: raw for w, raw in zip(wanted, more, strict=True) if raw})
        out: dict[str, Location] = {}
        for (v, h, m), pointer in zip(flat, pointers, strict=True):
            if v in out:
                continue  # a longer prefix of this variant was found already
            keys = [h] + ([pointer.decode(errors="replace")] if pointer else [])
            for key in keys:
                loc = _location(records.get((v, key)), base, v, key, m)
                if loc is not None and loc.address != exclude:
                    out[v] = loc
                    break
        return out

    def forget(self, location: Location) -> bool:
        """Delete a directory record found stale (the peer no longer holds the entry), unless
        it has been published again since."""
        name = self._dir_key(location.base, location.variant, location.key)
        return self.link.call(lambda r: r.eval(_FORGET, 1, name, location.record)) not in (
            FAILED,
            0,
        )

    def close(self) -> None:
        self.client.close()


class TieredStore:
    """The hot tier in front of the shared tier. With `shared` ``"blob"`` (or ``"both"``) a
    lookup asks the hot tier, then Redis for a longer prefix only, and promotes a Redis hit into
    the hot tier, and a put goes to both. With ``"directory"`` (or ``"both"``) Redis holds
    directory records instead (:meth:`publish`, :meth:`locate`): the node that stored an
    entry serves it from its hot tier over a
    :class:`~datahall.kvshare.transfer.CacheServer`."""

    def __init__(
        self, local: LocalStore, remote: RedisStore | None = None, *, shared: Shared = "blob"
    ):
        if remote is not None and remote.block_tokens != local.block_tokens:
            raise ValueError(
                f"the tiers hash blocks of {local.block_tokens} and {remote.block_tokens} tokens; "
                "use one block size"
            )
        if shared not in ("blob", "directory", "both"):
            raise ValueError(f"shared must be blob, directory or both, got {shared!r}")
        self.local = local
        self.remote = remote
        self.shared: Shared = shared

    @property
    def block_tokens(self) -> int:
        return self.local.block_tokens

    @property
    def blobs(self) -> bool:
        """Whether whole entries go through Redis."""
        return self.remote is not None and self.shared != "directory"

    @property
    def directory(self) -> bool:
        """Whether Redis holds directory records of the entries nodes hold."""
        return self.remote is not None and self.shared != "blob"

    def put(self, entry: CacheEntry) -> bool:
        """Store `entry` in the hot tier (and as a blob in Redis in blob mode); whether the
        hot tier took it."""
        stored = self.local.put(entry)
        if self.blobs:
            self.remote.put(entry)
        return stored

    def publish(self, entry: CacheEntry, address: str) -> bool:
        """In directory mode, record that the node at `address` holds `entry`."""
        return self.directory and self.remote.publish(entry, address)

    def locate(
        self,
        tokens: Sequence[int] | torch.Tensor,
        base: str,
        variants: Sequence[str],
        *,
        min_tokens: int = 1,
        exclude: str | None = None,
    ) -> dict[str, Location]:
        """In directory mode, :meth:`RedisStore.locate`; else nothing."""
        if not self.directory:
            return {}
        return self.remote.locate(tokens, base, variants, min_tokens=min_tokens, exclude=exclude)

    def forget(self, location: Location) -> bool:
        return self.directory and self.remote.forget(location)

    def lookup(self, tokens: Sequence[int] | torch.Tensor, base: str, variant: str) -> Hit | None:
        """The longest prefix of `tokens` that `variant` produced, from the hot tier or (blob
        mode) Redis."""
        toks = _tokens(tokens)
        hit = self.local.lookup(toks, base, variant)
        if not self.blobs:
            return hit
        longer = self.remote.lookup(toks, base, variant, min_tokens=hit.n + 1 if hit else 1)
        if longer is None:
            return hit
        self.local.put(longer.entry)
        return longer

    def lookup_any(
        self, tokens: Sequence[int] | torch.Tensor, base: str, variants: Sequence[str]
    ) -> Hit | None:
        """The longest prefix any of `variants` produced; ties go to the earlier variant (list
        the receiver's own first: a same-variant hit needs no recompute)."""
        toks = _tokens(tokens)
        best: Hit | None = None
        for variant in variants:
            hit = self.lookup(toks, base, variant)
            if hit is not None and (best is None or hit.n > best.n):
                best = hit
        return best
