"""The multi-variant engine: batched decoding equals single decoding, the three sharing modes,
continuous batching, cancellation and bad input. Tiny random models only (seconds)."""

import asyncio
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from datahall.kvshare.engine import (  # noqa: E402
    BadRequest,
    Engine,
    PromptTooLong,
    UnknownModel,
    _Batch,
)
from datahall.kvshare.hybrid import generate, prefill  # noqa: E402
from datahall.kvshare.models import Model, ModelError, architecture, tiny  # noqa: E402
from datahall.kvshare.store import LocalStore, RedisStore, TieredStore  # noqa: E402

L = 4  # layers of the tiny models
DOC = [(7 * i) % 251 + 3 for i in range(48)]  # a shared context of three 16-token blocks


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def variant(name, seed, kind="llama"):
    """A tiny random decoder with weights of std 0.3: the default init (0.02) greedily repeats
    one token, which would make the token-equality checks below weak."""
    model = tiny(kind, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return Model(name, model, None, f"tiny:{architecture(model.config)}")


@pytest.fixture(scope="module")
def models():
    return {"a": variant("a", 0), "b": variant("b", 1)}


def engine_of(models, **kw):
    if kw.get("sharing", "none") != "none":
        kw.setdefault("store", LocalStore(64 << 20))
    return Engine(models, **kw)


def run(engine, max_steps=2000):
    """Step an engine (no worker thread) until nothing is left; bounded."""
    for _ in range(max_steps):
        if not engine.step():
            return
    raise AssertionError("the engine did not drain")


PROMPTS = [DOC[:5], DOC[:17], DOC[:33], DOC[10:40]]


def test_batched_greedy_and_sampled_decoding_equal_single(models):
    params = [dict(max_new_tokens=12), dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)]
    for p in params:
        alone = []
        for prompt in PROMPTS:
            e = engine_of(models, max_batch=1)
            r = e.submit(prompt, "a", **p)
            run(e)
            alone.append(r.output)
        e = engine_of(models, max_batch=4)
        batched = [e.submit(prompt, "a", **p) for prompt in PROMPTS]
        run(e)
        assert [r.output for r in batched] == alone
        assert all(len(r.output) == 12 and r.finish_reason == "length" for r in batched)
        st = e.stats()
        assert st.decode_steps == 11 and st.decode_tokens == 44  # one forward for four rows
        if p.get("temperature", 0) == 0:  # and a lone request gives hybrid.generate's tokens
            assert alone[0] == generate(models["a"].model, [], PROMPTS[0], 12).ids


def test_padding_positions_are_masked_bitwise(models):
    """Junk in the padding instead of zeros leaves the batched logits bitwise unchanged."""
    model = models["a"].model
    e = engine_of(models, max_batch=3)
    reqs = [e.submit(p, "a", max_new_tokens=1) for p in PROMPTS[:3]]
    with torch.inference_mode():
        kvs = []
        for r in reqs:
            cache = prefill(model, r.prompt)
            kvs.append(cache.kv)
            r._length = len(r.prompt)
        logits = []
        for junk in (False, True):
            batch = _Batch(model, reqs, kvs)
            if junk:
                g = torch.Generator().manual_seed(0)
                for layer in batch.cache.layers:
                    for b, r in enumerate(reqs):
                        pad = layer.keys.shape[2] - r._length
                        layer.keys[b, :, :pad] = (
                            torch.randn(layer.keys[b, :, :pad].shape, generator=g) * 50
                        )
                        layer.values[b, :, :pad] = (
                            torch.randn(layer.values[b, :, :pad].shape, generator=g) * 50
                        )
            mask = torch.cat([batch.mask, batch.mask.new_ones(3, 1)], dim=1)
            out = model(
                torch.tensor([[1], [2], [3]]),
                attention_mask=mask,
                position_ids=torch.tensor([[len(r.prompt)] for r in reqs]),
                past_key_values=batch.cache,
                use_cache=True,
            )
            logits.append(out.logits)
    assert torch.equal(logits[0], logits[1])


def profiles_of(group):
    return lambda sender, receiver: group


def three_requests(engine):
    """a reads DOC, a again with another question, then b: kinds by the engine's mode."""
    out = []
    for v, q in (("a", [1, 2, 3]), ("a", [4, 5]), ("b", [6, 7, 8, 9])):
        out.append(engine.submit(DOC + q, v, max_new_tokens=6))
        run(engine)
    return out


@pytest.mark.parametrize(
    "sharing, kinds",
    [
        ("none", ["full", "full", "full"]),
        ("prefix", ["full", "same_variant", "full"]),
        ("droidspeak", ["full", "same_variant", "cross_variant"]),
    ],
)
def test_sharing_modes_prefill_kinds(models, sharing, kinds):
    e = engine_of(models, sharing=sharing, profiles=profiles_of((1, 3)))
    reqs = three_requests(e)
    assert [r.prefill_kind for r in reqs] == kinds
    st = e.stats()
    assert st.prefills == {k: kinds.count(k) for k in ("full", "same_variant", "cross_variant")}
    cached = [48 if k != "full" else 0 for k in kinds]
    assert [r.cached_tokens for r in reqs] == cached
    if sharing == "none":
        assert st.prefix_query_tokens == 0 and st.store is None
    else:
        assert st.prefix_query_tokens == sum(len(r.prompt) for r in reqs)
        assert st.prefix_hit_tokens == sum(cached)
    if sharing == "droidspeak":
        assert reqs[2].source_variant == "a" and reqs[2].group == (1, 3)
        # a's KV outside the group really is used: b's answer changes
        plain = three_requests(engine_of(models, sharing="none"))
        assert reqs[2].output != plain[2].output
        assert reqs[1].output == plain[1].output


def test_prefix_mode_same_tokens_as_no_sharing(models):
    plain = three_requests(engine_of(models, sharing="none"))
    shared = three_requests(engine_of(models, sharing="prefix"))
    assert shared[1].prefill_kind == "same_variant"
    assert [r.output for r in shared] == [r.output for r in plain]


def test_droidspeak_full_group_same_tokens_as_no_sharing(models):
    plain = three_requests(engine_of(models, sharing="none"))
    shared = three_requests(engine_of(models, sharing="droidspeak", profiles=profiles_of((0, L))))
    assert shared[2].prefill_kind == "cross_variant" and shared[2].group == (0, L)
    assert [r.output for r in shared] == [r.output for r in plain]


def test_droidspeak_stores_e_cache_at_group_starts(models):
    store = LocalStore(64 << 20)
    e = engine_of(models, sharing="droidspeak", store=store, profiles=profiles_of((2, 3)))
    r = e.submit(DOC + [1, 2], "a", max_new_tokens=2)
    run(e)
    hit = store.lookup(DOC, e.base, "a")
    assert hit.n == 48 and hit.entry.e_layers == (2,)
    with torch.inference_mode():
        ref = prefill(models["a"].model, r.prompt)
    # the forward's hidden states are the layer-by-layer prefill's, bitwise (same ops, shapes)
    assert torch.equal(hit.entry.e_cache[2], ref.e_cache[2][:, :48])
    assert torch.equal(hit.entry.kv[3][0], ref.kv[3][0][:, :, :48])
    # on a same-variant hit the stored E cache is the reused tokens' plus the new ones'
    longer = e.submit(DOC + DOC[:20], "a", max_new_tokens=2)
    run(e)
    assert longer.prefill_kind == "same_variant"
    hit = store.lookup(DOC + DOC[:16], e.base, "a")
    assert hit.n == 64 and hit.entry.e_layers == (2,)
    with torch.inference_mode():
        ref = prefill(models["a"].model, longer.prompt)
    assert torch.allclose(hit.entry.e_cache[2], ref.e_cache[2][:, :64], atol=1e-5)
    # a hybrid cache is never stored under the receiver's name
    e.submit(DOC + [3], "b", max_new_tokens=2)
    run(e)
    assert store.lookup(DOC, e.base, "b") is None
    # a sibling's entry without the E cache the group needs is not used
    store.clear()
    p = engine_of(models, sharing="prefix", store=store)
    p.submit(DOC + [1], "a", max_new_tokens=1)
    run(p)
    e2 = engine_of(models, sharing="droidspeak", store=store, profiles=profiles_of((2, 3)))
    r = e2.submit(DOC + [4], "b", max_new_tokens=1)
    run(e2)
    assert r.prefill_kind == "full"


def test_two_nodes_share_through_redis(models, redis_server):
    """Node 1 serves a, node 2 serves b; b's prompt reuses a's cache through Redis (the
    serving issue's shared tier) and gives the same tokens as on one node."""

    def node():
        remote = RedisStore(redis_server.url, timeout_s=1.0)
        return TieredStore(LocalStore(64 << 20), remote)

    groups = profiles_of((1, 3))
    one = engine_of(
        {"a": models["a"]}, sharing="droidspeak", store=node(), profiles=groups, peers=["b"]
    )
    one.submit(DOC + [1], "a", max_new_tokens=2)
    run(one)
    two = engine_of(
        {"b": models["b"]}, sharing="droidspeak", store=node(), profiles=groups, peers=["a"]
    )
    remote = two.submit(DOC + [6, 7, 8, 9], "b", max_new_tokens=6)
    run(two)
    assert remote.prefill_kind == "cross_variant" and remote.cached_tokens == 48
    local = three_requests(engine_of(models, sharing="droidspeak", profiles=groups))[2]
    assert remote.output == local.output


def test_no_profile_means_no_cross_variant_sharing(models):
    e = engine_of(models, sharing="droidspeak", profiles=profiles_of(None))
    assert [r.prefill_kind for r in three_requests(e)] == ["full", "same_variant", "full"]


def test_continuous_batching_admits_while_decoding(models):
    e = engine_of(models, max_batch=4)
    a = e.submit(DOC[:20], "a", max_new_tokens=8)
    e.step()  # a: prefill, token 1
    e.step()  # a: token 2
    b = e.submit(DOC[:30], "a", max_new_tokens=3)
    e.step()  # b admitted and prefilled (its token 1) while a decodes its token 3
    assert len(a.output) == 3 and len(b.output) == 1
    assert a.token_times[1] < b.token_times[0] < a.token_times[2]
    steps, rows = e.stats().decode_steps, e.stats().decode_tokens
    e.step()  # one forward pass for both
    st = e.stats()
    assert (st.decode_steps - steps, st.decode_tokens - rows) == (1, 2)
    assert st.running == 2
    run(e)
    assert b.finish_time < a.finish_time and len(a.output) == 8


def test_worker_thread_interleaves_and_streams(models):
    async def main(engine):
        long = engine.submit(DOC[:10], "a", max_new_tokens=300, stop=())
        got = []
        async for token in long.stream():
            got.append(token)
            if len(got) == 3:
                short = engine.submit(DOC[:12], "b", max_new_tokens=3)
                short_tokens = [t async for t in short.stream()]
                break
        return long, got, short, short_tokens

    with engine_of(models, max_batch=4) as engine:
        long, got, short, short_tokens = asyncio.run(asyncio.wait_for(main(engine), 30))
        assert long.wait(10)
    assert short_tokens == short.output and len(short.output) == 3
    assert got == long.output[:3]
    assert long.finish_reason == "abort"  # leaving the stream early cancelled it
    assert short.first_token_time > long.token_times[2]
    assert short.ttft > 0 and len(short.inter_token_latencies) == 2


def test_cancellation_frees_the_cache(models):
    with engine_of(models, max_batch=2) as engine:
        r = engine.submit(DOC[:10], "a", max_new_tokens=3000)
        deadline = time.monotonic() + 10
        while len(r.output) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine.stats().kv_cache_bytes > 0
        r.cancel()
        assert r.wait(10) and r.finish_reason == "abort"
        while engine.stats().kv_cache_bytes and time.monotonic() < deadline:
            time.sleep(0.005)
        st = engine.stats()
        assert (st.running, st.waiting, st.kv_cache_bytes) == (0, 0, 0)
        assert len(r.output) < 3000
    # a request cancelled while waiting is never prefilled
    e = engine_of(models)
    w = e.submit(DOC[:10], "a")
    w.cancel()
    e.step()
    assert w.finish_reason == "abort" and w.prefill_kind is None
    assert e.stats().finished == {"abort": 1}


def test_stop_tokens_and_limits(models):
    e = engine_of(models)
    r = e.submit(DOC[:9], "a", max_new_tokens=10)
    run(e)
    i = next(i for i, t in enumerate(r.output) if i > 0 and t not in r.output[:i])
    s = e.submit(DOC[:9], "a", max_new_tokens=10, stop=[r.output[i]])
    run(e)
    assert s.output == r.output[:i] and s.finish_reason == "stop"
    first = e.submit(DOC[:9], "a", max_new_tokens=10, stop=[r.output[0]])
    run(e)
    # stopped at once: no text, but the first token was still made (TTFT as vLLM counts it)
    assert first.output == [] and first.finish_reason == "stop" and first.ttft > 0


def test_kv_budget_queues_requests(models):
    e = engine_of(models, max_batch=4)
    e = engine_of(models, max_batch=4, kv_cache_bytes=40 * e.kv_bytes_per_token)
    a = e.submit(DOC[:20], "a", max_new_tokens=10)
    b = e.submit(DOC[:20], "a", max_new_tokens=10)
    e.step()
    st = e.stats()
    assert (st.running, st.waiting) == (1, 1) and b.prefill_kind is None
    assert 0 < st.kv_cache_usage <= 1
    run(e)
    assert a.finish_time <= b.first_token_time


def test_bad_input(models):
    e = engine_of(models, max_prompt_tokens=64, max_model_len=80)
    with pytest.raises(UnknownModel) as err:
        e.submit([1, 2], "nope")
    assert (err.value.status, err.value.code) == (404, "model_not_found")
    with pytest.raises(PromptTooLong) as err:
        e.submit(list(range(65)), "a")
    assert (err.value.status, err.value.code, err.value.type) == (
        400,
        "context_length_exceeded",
        "invalid_request_error",
    )
    with pytest.raises(PromptTooLong):
        e.submit(list(range(60)), "a", max_new_tokens=30)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0)):
        with pytest.raises(BadRequest):
            e.submit([1, 2], "a", **bad)
    with pytest.raises(BadRequest):
        e.submit([], "a")
    with pytest.raises(BadRequest):
        e.submit([1, 999], "a")
    with pytest.raises(ValueError, match="store"):
        Engine(models, sharing="prefix")


def test_incompatible_variants_are_refused(models):
    with pytest.raises(ModelError, match="architectures"):
        Engine({"a": models["a"], "q": variant("q", 0, "qwen2")})


def test_profiled_groups_reads_the_pair_profiles(tmp_path, monkeypatch):
    from datahall.kvshare.engine import profiled_groups
    from datahall.kvshare.profile import PACKAGED

    monkeypatch.setenv("DATAHALL_CACHE", str(tmp_path))  # only the packaged profiles
    sender, receiver = next(PACKAGED.glob("*.json")).stem.split("__")
    group = profiled_groups(max_loss=1.0)(sender, receiver)
    assert isinstance(group, tuple) and 0 <= group[0] <= group[1] <= 30  # SmolLM2's layers
    assert profiled_groups()(sender, "no-such-variant") is None
