"""The DroidSpeak mechanism's identities (brief §2.6), exact, on tiny Llama and Qwen2 decoders."""

import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from datahall.kvshare.hybrid import (  # noqa: E402
    check_group,
    full_prefill,
    generate,
    hybrid_kv,
    next_token_logits,
    prefill,
)
from datahall.kvshare.models import Model, ModelError, check_compatible, tiny  # noqa: E402

L = 4
IDS = torch.arange(3, 40).unsqueeze(0) % 250
SUFFIX = [7, 8, 9, 10]


def pair(kind="llama"):
    return tiny(kind, seed=0), tiny(kind, seed=1)


def same(a, b):
    return all(
        torch.equal(x, y)
        for (kx, vx), (ky, vy) in zip(a, b, strict=True)
        for x, y in ((kx, ky), (vx, vy))
    )


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_group_of_all_layers_is_the_receivers_full_prefill(kind):
    S, R = pair(kind)
    kv = hybrid_kv(R, prefill(S, IDS), (0, L))
    assert same(kv, full_prefill(R, IDS))
    assert torch.equal(
        next_token_logits(R, kv, SUFFIX), next_token_logits(R, full_prefill(R, IDS), SUFFIX)
    )


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_empty_group_is_full_reuse_bitwise(kind):
    S, R = pair(kind)
    sent = prefill(S, IDS)
    for group in [None, (0, 0), (2, 2)]:
        kv = hybrid_kv(R, sent, group)
        assert all(k is ks and v is vs for (k, v), (ks, vs) in zip(kv, sent.kv, strict=True))
    assert same(sent.kv, full_prefill(S, IDS))  # the sender's prefill is its own forward


@settings(max_examples=10, deadline=None)
@given(st.integers(0, L), st.integers(0, L))
def test_sender_equal_receiver_gives_full_prefill_for_any_group(a, b):
    S = tiny(seed=3)
    group = (min(a, b), max(a, b))
    assert same(hybrid_kv(S, prefill(S, IDS), group), full_prefill(S, IDS))


def test_recomputed_layers_hold_the_receivers_kv_and_reused_the_senders():
    S, R = pair()
    sent, own = prefill(S, IDS), full_prefill(R, IDS)
    kv = hybrid_kv(R, sent, (0, 2))
    assert same(kv[:2], own[:2])  # s = 0: from R's embeddings, so exactly R's layers
    assert same(kv[2:], sent.kv[2:])
    mid = hybrid_kv(R, sent, (1, 3))
    assert same(mid[:1], sent.kv[:1]) and same(mid[3:], sent.kv[3:])
    assert not torch.equal(mid[1][0], own[1][0])  # from S's E cache, not R's own hidden state
    n = IDS.shape[1]
    assert all(k.shape[2] == n and v.shape[2] == n for k, v in mid)


def test_partial_groups_move_the_output_between_the_two_extremes():
    S, R = pair()
    sent = prefill(S, IDS)
    full = torch.log_softmax(next_token_logits(R, full_prefill(R, IDS), SUFFIX), -1)

    def kl(group):
        p = torch.log_softmax(next_token_logits(R, hybrid_kv(R, sent, group), SUFFIX), -1)
        return float(torch.sum(full.exp() * (full - p)))

    assert kl((0, L)) == 0.0
    assert kl((0, 0)) > 0
    assert kl((0, 2)) < kl((0, 0))


def test_byte_accounting():
    S, _ = pair()
    sent = prefill(S, IDS)
    n, kvh, hd, d = IDS.shape[1], 2, 16, 64
    assert sent.kv_layer_bytes == 2 * kvh * n * hd * 4
    assert sent.e_bytes == n * d * 4
    assert sent.transfer_bytes(None) == L * sent.kv_layer_bytes
    assert sent.transfer_bytes((0, L)) == 0
    assert sent.transfer_bytes((0, 1)) == (L - 1) * sent.kv_layer_bytes  # s = 0 needs no E cache
    assert sent.transfer_bytes((1, 3)) == 2 * sent.kv_layer_bytes + sent.e_bytes


def test_generation_on_the_hybrid_cache_matches_generation_from_scratch():
    S, R = pair()
    kv = hybrid_kv(R, prefill(S, IDS), (0, L))
    ours = generate(R, kv, SUFFIX, max_new_tokens=6)
    full_ids = torch.cat([IDS, torch.tensor([SUFFIX])], dim=1)
    ref = R.generate(full_ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert ours.ids == ref[0, full_ids.shape[1] :].tolist()
    assert ours.first_token_s > 0 and ours.total_s >= ours.first_token_s
    # the cache handed in is not modified by decoding
    assert all(k.shape[2] == IDS.shape[1] for k, _ in kv)


def test_sampling_is_seeded():
    S, R = pair()
    kv = hybrid_kv(R, prefill(S, IDS), (1, 2))
    a = generate(R, kv, SUFFIX, 8, temperature=1.0, top_p=0.9, seed=5).ids
    b = generate(R, kv, SUFFIX, 8, temperature=1.0, top_p=0.9, seed=5).ids
    assert a == b and len(a) == 8


def test_eos_stops_decoding():
    S, R = pair()
    kv = full_prefill(R, IDS)
    first = generate(R, kv, SUFFIX, 4).ids[0]
    assert generate(R, kv, SUFFIX, 4, eos=[first]).ids == []


@pytest.mark.parametrize("group", [(-1, 2), (2, 1), (0, L + 1), ("a", 1), (1,)])
def test_groups_outside_the_layers_are_refused(group):
    with pytest.raises(ValueError, match="recompute group|two layer numbers"):
        check_group(group, L)


def test_incompatible_models_are_refused():
    a = Model("a", tiny("llama"), None, "x")
    b = Model("b", tiny("llama", layers=6), None, "x")
    c = Model("c", tiny("qwen2"), None, "x")
    check_compatible(a, Model("a2", tiny("llama", seed=4), None, "x"))
    with pytest.raises(ModelError, match="different architectures.*num_hidden_layers 4 vs 6"):
        check_compatible(a, b)
    with pytest.raises(ModelError, match="model_type llama vs qwen2"):
        check_compatible(a, c)
    with pytest.raises(ValueError, match="not variants of one base"):
        hybrid_kv(b.model, prefill(a.model, IDS), (0, 1))
