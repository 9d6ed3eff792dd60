"""The DroidSpeak mechanism: sender prefill, the receiver's hybrid prefill, decoding on it.

DroidSpeak (Liu et al., NSDI '26) lets a receiver R reuse a sender S's KV cache for a shared
prefix: R keeps S's K/V for most layers and recomputes one contiguous *recompute group*
[s, e) of layers with its own weights, starting from S's hidden state entering layer s (the
*E cache*). Attention at layer l needs only the earlier tokens' K/V at l, so only the group's
first layer needs a hidden-state input (brief §2.1). Special cases, exact by construction and
tested as such: the group [0, L) is R's full prefill; the empty group is full reuse of S's KV.

Everything here runs a model's decoder layers one at a time with the same calls its own
``forward`` makes (masks computed once on an empty cache, rotary embeddings from the same
positions), so the recomputed K/V are bitwise what R's forward would produce from that input.
Keys are stored after RoPE: the prefix must sit at positions 0..n−1 on both sides.

>>> from datahall.kvshare.models import tiny
>>> import torch
>>> S, R = tiny(seed=0), tiny(seed=1)
>>> ids = torch.arange(1, 17).unsqueeze(0)
>>> sent = prefill(S, ids)
>>> kv = hybrid_kv(R, sent, (1, 3))
>>> torch.equal(kv[0][0], sent.kv[0][0]), torch.equal(kv[1][0], sent.kv[1][0])
(True, False)
>>> sent.transfer_bytes((1, 3)) == 2 * sent.kv_layer_bytes + sent.e_bytes
True
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

__all__ = [
    "Group",
    "SenderCache",
    "Generation",
    "check_group",
    "prefill",
    "full_prefill",
    "hybrid_kv",
    "recompute",
    "to_cache",
    "next_token_logits",
    "generate",
]

Group = tuple[int, int]
"""A recompute group [s, e) of layers; (s, s) is empty (full reuse)."""


def check_group(group: Group | None, num_layers: int) -> Group:
    """`group` as a validated (s, e) pair; None means the empty group."""
    if group is None:
        return (0, 0)
    try:
        s, e = (int(x) for x in group)
    except (TypeError, ValueError):
        raise ValueError(f"a recompute group is two layer numbers [s, e), got {group!r}") from None
    if not 0 <= s <= e <= num_layers:
        raise ValueError(
            f"recompute group [{s}, {e}) is outside the model's layers: need 0 <= s <= e <= {num_layers}"
        )
    return (s, e) if e > s else (0, 0)


@dataclass
class SenderCache:
    """What a sender hands a receiver for a prefix of n tokens: its token ids, K/V per layer
    (each [1, kv_heads, n, head_dim], after RoPE) and the E cache, the hidden state entering
    each layer ([1, n, d_model]; ``e_cache[0]`` is the embedding output)."""

    ids: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    e_cache: list[torch.Tensor]
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.ids.shape[-1])

    @property
    def num_layers(self) -> int:
        return len(self.kv)

    @property
    def kv_layer_bytes(self) -> int:
        """Bytes of one layer's K and V for the whole prefix."""
        k, v = self.kv[0]
        return k.numel() * k.element_size() + v.numel() * v.element_size()

    @property
    def e_bytes(self) -> int:
        """Bytes of one layer's E cache for the whole prefix (larger than a KV layer under GQA)."""
        h = self.e_cache[0]
        return h.numel() * h.element_size()

    def transfer_bytes(self, group: Group | None) -> int:
        """What the receiver must fetch for `group`: the reused layers' KV plus the E cache at
        the group's first layer (none for s = 0: the receiver embeds the tokens itself)."""
        s, e = check_group(group, self.num_layers)
        return (self.num_layers - (e - s)) * self.kv_layer_bytes + (self.e_bytes if s > 0 else 0)


def _decoder(model):
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        raise ValueError(
            f"{type(model).__name__} is not a Llama/Qwen2-style decoder (model.model.layers and "
            "model.model.rotary_emb are needed)"
        )
    return inner


def _layer_masks(model, h: torch.Tensor, positions: torch.Tensor) -> list:
    """Per layer, the attention mask the model's own forward builds for a prefill of h from
    an empty cache (None when sdpa can run causally)."""
    config = model.config
    empty = DynamicCache(config=config)
    kwargs = dict(
        config=config,
        inputs_embeds=h,
        attention_mask=None,
        past_key_values=empty,
        position_ids=positions,
    )
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if "sliding_attention" in types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return [masks[t] for t in types]


def _run(
    model, h: torch.Tensor, layers: range
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run `model`'s decoder layers `layers` over the prefix whose hidden state entering the
    first of them is h; yield (layer, K, V, hidden state entering the layer) as each is done."""
    decoder = _decoder(model)
    positions = torch.arange(h.shape[1]).unsqueeze(0)
    masks = _layer_masks(model, h, positions)
    pe = decoder.rotary_emb(h, positions)
    scratch = DynamicCache(config=model.config)
    for i in layers:
        out = decoder.layers[i](
            h,
            attention_mask=masks[i],
            position_ids=positions,
            past_key_values=scratch,
            use_cache=True,
            position_embeddings=pe,
        )
        layer = scratch.layers[i]
        yield i, layer.keys, layer.values, h
        h = out[0] if isinstance(out, tuple) else out


@torch.inference_mode()
def prefill(model, ids: torch.Tensor | Sequence[int]) -> SenderCache:
    """The sender's prefill of a prefix: K/V of every layer and the E cache at every layer."""
    ids = _ids(ids)
    start = time.perf_counter()
    h = _decoder(model).embed_tokens(ids)
    kv, e_cache = [], []
    for _, k, v, h_in in _run(model, h, range(model.config.num_hidden_layers)):
        kv.append((k, v))
        e_cache.append(h_in)
    return SenderCache(ids, kv, e_cache, time.perf_counter() - start)


@torch.inference_mode()
def recompute(
    receiver, sender: SenderCache, s: int, e: int
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """R's own K/V for layers s..e−1, from S's E cache at s (R's embeddings when s = 0), one
    layer at a time: extending a group by one layer costs one layer."""
    h = _decoder(receiver).embed_tokens(sender.ids) if s == 0 else sender.e_cache[s]
    for i, k, v, _ in _run(receiver, h, range(s, e)):
        yield i, k, v


def hybrid_kv(
    receiver, sender: SenderCache, group: Group | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The receiver's hybrid prefix KV for `group`: S's K/V outside [s, e), R's inside."""
    s, e = check_group(group, sender.num_layers)
    if receiver.config.num_hidden_layers != sender.num_layers:
        raise ValueError(
            f"the sender has {sender.num_layers} layers and the receiver "
            f"{receiver.config.num_hidden_layers}; they are not variants of one base"
        )
    kv = list(sender.kv)
    for i, k, v in recompute(receiver, sender, s, e):
        kv[i] = (k, v)
    return kv


def to_cache(model, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A transformers cache holding `kv`, filled in layer order (later updates append to new
    tensors, so `kv` itself is never modified)."""
    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


@torch.inference_mode()
def full_prefill(
    model, ids: torch.Tensor | Sequence[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The model's own forward over the prefix: its K/V per layer (the no-sharing baseline)."""
    cache = DynamicCache(config=model.config)
    model(_ids(ids), past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.inference_mode()
def next_token_logits(model, kv, suffix: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Logits of the token after prefix + `suffix`, the prefix given as per-layer K/V."""
    out = model(_ids(suffix), past_key_values=to_cache(model, kv), use_cache=True)
    return out.logits[0, -1].float()


@dataclass
class Generation:
    """Decoded tokens, and seconds to the first token and in all (prefix building excluded)."""

    ids: list[int]
    first_token_s: float
    total_s: float


@torch.inference_mode()
def generate(
    model,
    kv,
    suffix: torch.Tensor | Sequence[int],
    max_new_tokens: int = 32,
    *,
    eos: Sequence[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> Generation:
    """Decode after prefix + `suffix`: greedy when ``temperature == 0``, else sampled with
    nucleus `top_p` from a seeded generator."""
    start = time.perf_counter()
    cache = to_cache(model, kv)
    gen = torch.Generator().manual_seed(seed)
    step = _ids(suffix)
    out: list[int] = []
    first = None
    for _ in range(max_new_tokens):
        logits = model(step, past_key_values=cache, use_cache=True).logits[0, -1].float()
        token = _pick(logits, temperature, top_p, gen)
        if first is None:
            first = time.perf_counter() - start
        if token in eos:
            break
        out.append(token)
        step = torch.tensor([[token]])
    return Generation(out, first or 0.0, time.perf_counter() - start)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def _ids(ids) -> torch.Tensor:
    t = ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.long)
    return t.reshape(1, -1).long()
