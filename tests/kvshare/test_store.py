"""The prefix cache store: block-hash keys, exact entries, checked serialization, the LRU hot
tier by bytes, and the shared Redis tier between two nodes (outage and corruption included)."""

import hashlib
import logging
import time
from collections import OrderedDict

import pytest

torch = pytest.importorskip("torch")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from datahall.kvshare.hybrid import hybrid_kv, prefill  # noqa: E402
from datahall.kvshare.models import tiny  # noqa: E402
from datahall.kvshare.store import (  # noqa: E402
    FRAME_HEADER_BYTES,
    CacheEntry,
    CorruptCache,
    Kind,
    LocalStore,
    MissingECache,
    RedisStore,
    TieredStore,
    block_hashes,
    deserialize,
    encode_frame,
    frame_tensor,
    parse_header,
    prefix_key,
    serialize,
)

torch.set_num_threads(1)

L = 4
BASE = "tiny-llama:test"
IDS = (torch.arange(40) * 7 % 250 + 3).unsqueeze(0)  # 2 whole blocks and 8 tokens


@pytest.fixture(scope="module")
def models():
    return tiny(seed=0), tiny(seed=1)


@pytest.fixture(scope="module")
def sent(models):
    return prefill(models[0], IDS)


def same_kv(a, b):
    return len(a) == len(b) and all(
        torch.equal(x, y) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True)
    )


def same_entry(a, b):
    return (
        (a.base, a.variant, a.e_layers) == (b.base, b.variant, b.e_layers)
        and torch.equal(a.ids, b.ids)
        and same_kv(a.kv, b.kv)
        and all(torch.equal(a.e_cache[i], b.e_cache[i]) for i in a.e_layers)
    )


def synthetic(n=3, layers=2, heads=1, d=4, dm=6, e_layers=(1,), dtype=torch.float32, seed=0,
              variant="a", first=1):  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[first] + [(first * 31 + i) % 1000 for i in range(1, n)]])
    kv = [
        (
            torch.randn(1, heads, n, d, generator=g).to(dtype),
            torch.randn(1, heads, n, d, generator=g).to(dtype),
        )
        for _ in range(layers)
    ]
    e = {i: torch.randn(1, n, dm, generator=g).to(dtype) for i in e_layers}
    return CacheEntry(BASE, variant, ids, kv, e)


# --- entries -------------------------------------------------------------------------------


def test_entry_round_trips_a_sender_cache_exactly(models, sent):
    entry = CacheEntry.from_sender(sent, base=BASE, variant="s")
    assert entry.e_layers == tuple(range(L)) and entry.n == 40
    back = entry.to_sender()
    assert torch.equal(back.ids, sent.ids) and same_kv(back.kv, sent.kv)
    assert all(torch.equal(back.e_cache[i], sent.e_cache[i]) for i in range(L))
    assert back.transfer_bytes((1, 3)) == sent.transfer_bytes((1, 3))
    R = models[1]
    for group in [(0, 0), (0, L), (1, 3), (2, 4)]:
        assert same_kv(hybrid_kv(R, back, group), hybrid_kv(R, sent, group))


def test_entry_keeps_only_the_requested_e_layers(models, sent):
    entry = CacheEntry.from_sender(sent, base=BASE, variant="s", e_layers=[2])
    assert entry.e_layers == (2,)
    full = CacheEntry.from_sender(sent, base=BASE, variant="s")
    assert entry.nbytes == full.nbytes - 3 * sent.e_bytes
    back = entry.to_sender()
    R = models[1]
    assert same_kv(hybrid_kv(R, back, (2, 4)), hybrid_kv(R, sent, (2, 4)))
    assert same_kv(hybrid_kv(R, back, (0, 2)), hybrid_kv(R, sent, (0, 2)))  # s = 0: no E
    with pytest.raises(MissingECache, match=r"layer 1 was not stored \(stored: \[2\]\)"):
        hybrid_kv(R, back, (1, 3))
    with pytest.raises(ValueError, match="outside"):
        CacheEntry.from_sender(sent, base=BASE, variant="s", e_layers=[L])


def test_truncation_slices_the_token_dimension(models, sent):
    entry = CacheEntry.from_sender(sent, base=BASE, variant="s", e_layers=[0, 2])
    short = entry.truncate(16)
    assert short.n == 16 and torch.equal(short.ids, IDS[:, :16])
    for (k, v), (sk, sv) in zip(sent.kv, short.kv, strict=True):
        assert torch.equal(sk, k[:, :, :16]) and torch.equal(sv, v[:, :, :16])
    assert torch.equal(short.e_cache[2], sent.e_cache[2][:, :16])
    # causal attention: the first 16 tokens' caches are those of a 16-token prefill
    alone = prefill(models[0], IDS[:, :16])
    for (k, v), (sk, sv) in zip(alone.kv, short.to_sender().kv, strict=True):
        torch.testing.assert_close(sk, k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sv, v, rtol=1e-5, atol=1e-5)
    stored = CacheEntry.from_sender(sent, base=BASE, variant="s", e_layers=[0, 2], n=16)
    assert same_entry(stored, short.truncate(16)) and stored.nbytes == short.nbytes
    assert same_kv(entry.to_sender(16).kv, short.kv)
    for bad in (0, 41):
        with pytest.raises(ValueError):
            entry.truncate(bad)


# --- keys --------------------------------------------------------------------------------


def test_a_change_in_a_block_changes_its_hash_and_every_later_one():
    toks = list(range(100, 164))  # 4 blocks
    ref = block_hashes(toks, BASE, "a")
    assert len(ref) == 4 and len(set(ref)) == 4
    first = block_hashes([toks[0] + 1, *toks[1:]], BASE, "a")
    assert all(x != y for x, y in zip(first, ref, strict=True))
    third = list(toks)
    third[40] += 1
    h = block_hashes(third, BASE, "a")
    assert h[:2] == ref[:2] and all(x != y for x, y in zip(h[2:], ref[2:], strict=True))
    assert block_hashes(toks[:33], BASE, "a") == ref[:2]  # a partial block is not hashed


def test_keys_name_the_base_and_the_producing_variant():
    toks = list(range(32))
    ref = block_hashes(toks, BASE, "coder")
    assert set(block_hashes(toks, BASE, "docs")).isdisjoint(ref)
    assert set(block_hashes(toks, "other-base", "coder")).isdisjoint(ref)
    assert set(block_hashes(toks, BASE, "coder", block_tokens=8)).isdisjoint(ref)
    assert prefix_key(toks, BASE, "coder") == ref[-1]
    assert prefix_key(toks[:20], BASE, "coder") not in ref  # the tail is tagged apart
    assert prefix_key(torch.tensor([toks]), BASE, "coder") == ref[-1]
    with pytest.raises(ValueError, match="producing variant"):
        block_hashes(toks, BASE, "")
    with pytest.raises(ValueError, match="empty"):
        prefix_key([], BASE, "a")


def test_lookup_returns_the_longest_cached_prefix_in_whole_blocks(sent):
    store = LocalStore(1 << 22)
    entry = CacheEntry.from_sender(sent, base=BASE, variant="s", e_layers=[1])
    assert store.put(entry)
    toks = IDS[0].tolist()
    assert store.lookup(toks, BASE, "s").n == 40  # the whole prompt, as stored
    assert store.lookup(toks + [9, 9], BASE, "s").n == 32  # a non-aligned entry: whole blocks
    assert store.lookup(toks[:32], BASE, "s").n == 32
    assert store.lookup(toks[:35] + [1] * 20, BASE, "s").n == 32
    assert store.lookup(toks[:20], BASE, "s").n == 16
    diverge = list(toks)
    diverge[17] += 1
    assert store.lookup(diverge, BASE, "s").n == 16
    diverge[3] += 1
    assert store.lookup(diverge, BASE, "s") is None
    assert store.lookup(toks[:15], BASE, "s") is None  # shorter than a block, not stored
    assert store.lookup(toks, BASE, "r") is None and store.lookup(toks, "b2", "s") is None
    hit = store.lookup(toks[:20], BASE, "s")
    assert hit.tier == "local" and hit.prefix().n == 16
    assert same_kv(hit.sender().kv, entry.truncate(16).kv)
    st_ = store.stats
    assert (st_.hits, st_.misses) == (7, 4)
    assert st_.hit_tokens == 40 + 32 + 32 + 32 + 16 + 16 + 16
    assert st_.hit_rate == pytest.approx(st_.hit_tokens / st_.query_tokens)


def test_a_prefix_stays_reachable_through_any_entry_holding_it(sent):
    store = LocalStore(1 << 22)
    long = CacheEntry.from_sender(sent, base=BASE, variant="s", e_layers=[])
    short = long.truncate(32)
    store.put(short)
    store.put(long)
    assert len(store) == 2
    assert store.remove(long.key())
    assert store.lookup(IDS[0].tolist(), BASE, "s").n == 32
    store.put(long)
    assert store.remove(short.key())
    assert store.lookup(IDS[0, :32].tolist(), BASE, "s").n == 32
    store.clear()
    assert len(store) == 0 and store.bytes_used == 0
    assert store.lookup(IDS[0].tolist(), BASE, "s") is None


# --- the hot tier: LRU by bytes ------------------------------------------------------------


def test_lru_evicts_by_bytes_least_recently_used_first():
    a, b, c = (synthetic(n=5, first=f) for f in (1, 2, 3))
    size = a.nbytes
    store = LocalStore(2 * size + size // 2)
    assert store.put(a) and store.put(b)
    assert store.bytes_used == 2 * size and store.usage == pytest.approx(2 / 2.5)
    assert store.lookup(a.ids, BASE, "a") is not None  # a becomes the most recent
    assert store.put(c)
    assert a.key() in store and c.key() in store and b.key() not in store
    assert store.stats.evictions == 1 and store.bytes_used == 2 * size
    assert store.keys() == [a.key(), c.key()]
    assert store.put(a)  # a replacement: counted once
    assert store.bytes_used == 2 * size and store.keys() == [c.key(), a.key()]
    big = synthetic(n=20, first=9)
    assert big.nbytes > store.capacity_bytes
    assert not store.put(big)  # refused, and nothing evicted for it
    assert len(store) == 2 and store.stats.rejected == 1


def test_entries_from_views_are_charged_their_own_bytes(sent):
    full = CacheEntry.from_sender(sent, base=BASE, variant="s")
    view = full.truncate(16)  # views of the 40-token tensors
    store = LocalStore(1 << 22)
    store.put(view)
    held = store.get(view.key())
    assert held.nbytes == view.nbytes == store.bytes_used
    for t in (t for kv in held.kv for t in kv):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    assert same_entry(held, view)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["put", "get"]), st.integers(1, 8), st.integers(1, 30)),
        max_size=40,
    ),
    capacity=st.integers(400, 4000),
)
def test_lru_matches_a_reference_model_and_never_exceeds_capacity(ops, capacity):
    store = LocalStore(capacity)
    ref: OrderedDict[str, int] = OrderedDict()
    made: dict[int, CacheEntry] = {}
    for op, ident, n in ops:
        if op == "put":
            entry = made[ident] = synthetic(n=n, layers=1, e_layers=(), first=ident)
            size, key = entry.nbytes, entry.key()
            if size <= capacity:
                ref.pop(key, None)
                while sum(ref.values()) + size > capacity:
                    ref.popitem(last=False)
                ref[key] = size
            assert store.put(entry) == (size <= capacity)
        elif ident in made:
            key = made[ident].key()
            hit = store.lookup(made[ident].ids, BASE, "a")
            assert (hit is not None) == (key in ref)
            if key in ref:
                ref.move_to_end(key)
        assert store.keys() == list(ref)
        assert store.bytes_used == sum(ref.values()) <= capacity


# --- serialization -------------------------------------------------------------------------


def test_serialization_round_trips_exactly(sent):
    entry = CacheEntry.from_sender(sent, base=BASE, variant="s", e_layers=[1, 3])
    blob = serialize(entry)
    assert same_entry(deserialize(blob), entry)
    assert same_entry(deserialize(bytearray(blob)), entry)
    assert same_entry(deserialize(memoryview(blob)), entry)
    overhead = len(blob) - entry.nbytes
    assert 0 < overhead < 1500  # headers and checksums only: a compact format
    none = CacheEntry.from_sender(sent, base=BASE, variant="s", e_layers=[])
    assert deserialize(serialize(none)).e_layers == ()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 6),
    layers=st.integers(1, 4),
    heads=st.integers(1, 3),
    d=st.integers(1, 5),
    dm=st.integers(1, 7),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_serialize_deserialize_is_the_identity(n, layers, heads, d, dm, dtype, seed, data):
    e_layers = data.draw(st.sets(st.integers(0, layers - 1)))
    entry = synthetic(n, layers, heads, d, dm, tuple(e_layers), dtype, seed)
    back = deserialize(serialize(entry))
    assert same_entry(back, entry) and back.dtype == dtype


def tiny_blob():
    return serialize(synthetic(n=2, layers=2, heads=1, d=3, dm=4, e_layers=(1,)))


def test_every_flipped_byte_and_every_truncation_is_refused():
    blob = tiny_blob()
    for pos in range(len(blob)):
        bad = bytearray(blob)
        bad[pos] ^= 0x10
        with pytest.raises(CorruptCache):
            deserialize(bytes(bad))
    for cut in range(len(blob)):
        with pytest.raises(CorruptCache):
            deserialize(blob[:cut])
    with pytest.raises(CorruptCache, match="checksum"):
        deserialize(blob + b"\0")


def test_frame_checks_catch_damage_even_under_a_recomputed_outer_checksum():
    # a writer that altered a frame and re-sealed the entry: the frame's own checks refuse it
    blob = tiny_blob()
    body = blob[:-16]
    for pos in range(len(body)):
        bad = bytearray(body)
        bad[pos] ^= 0x01
        resealed = bytes(bad) + hashlib.blake2b(bad, digest_size=16).digest()
        with pytest.raises(CorruptCache):
            deserialize(resealed)


def test_corruption_messages_say_what_is_wrong():
    blob = tiny_blob()
    with pytest.raises(CorruptCache, match="not a datahall cache"):
        deserialize(b"XXXX" + blob[4:])
    with pytest.raises(CorruptCache, match="version 7"):
        deserialize(blob[:4] + b"\x07\x00" + blob[6:])
    with pytest.raises(CorruptCache, match="at least"):
        deserialize(b"DHKV")
    with pytest.raises(CorruptCache, match="whole-entry checksum"):
        deserialize(blob[:-1])


def test_a_frame_header_and_payload_are_each_checked():
    t = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    frame = encode_frame(Kind.E, 5, t)
    head = parse_header(frame[:FRAME_HEADER_BYTES])
    assert (head.kind, head.layer, head.shape, head.dtype) == (Kind.E, 5, (1, 3, 4), t.dtype)
    assert torch.equal(frame_tensor(head, frame[FRAME_HEADER_BYTES:]), t)
    for pos in range(FRAME_HEADER_BYTES):
        bad = bytearray(frame[:FRAME_HEADER_BYTES])
        bad[pos] ^= 0x80
        with pytest.raises(CorruptCache):
            parse_header(bytes(bad))
    for pos in range(FRAME_HEADER_BYTES, len(frame)):
        bad = bytearray(frame)
        bad[pos] ^= 0x80
        with pytest.raises(CorruptCache, match="crc32"):
            frame_tensor(head, bytes(bad[FRAME_HEADER_BYTES:]))
    with pytest.raises(CorruptCache, match="payload"):
        frame_tensor(head, frame[FRAME_HEADER_BYTES:-1])


# --- half precision ------------------------------------------------------------------------


def test_float16_halves_the_bytes_within_its_precision(models, sent):
    entry = CacheEntry.from_sender(sent, base=BASE, variant="s", e_layers=[1])
    half = entry.astype(torch.float16)
    b32, b16 = len(serialize(entry)), len(serialize(half))
    assert b16 < 0.52 * b32
    back = deserialize(serialize(half)).to_sender()
    assert back.kv[0][0].dtype == torch.float32  # the models run in float32
    for (k, v), (k16, v16) in zip(sent.kv, back.kv, strict=True):
        for x, y in ((k, k16), (v, v16)):
            assert not torch.equal(x, y)  # not bitwise any more: the stated trade-off
            # round to nearest: relative error at most 2^-11, absolute 2^-25 for subnormals
            assert torch.all((x - y).abs() <= x.abs() * 2**-11 + 2**-25)
    R = models[1]
    ref, got = hybrid_kv(R, sent, (1, 3)), hybrid_kv(R, back, (1, 3))
    for (k, v), (k2, v2) in zip(ref, got, strict=True):
        torch.testing.assert_close(k2, k, rtol=0, atol=5e-3)
        torch.testing.assert_close(v2, v, rtol=0, atol=5e-3)


def test_values_beyond_float16_are_kept_in_float32():
    entry = synthetic()
    entry.kv[0][0][0, 0, 0, 0] = 1e6
    with pytest.raises(ValueError, match="does not fit torch.float16"):
        entry.astype(torch.float16)
    assert entry.astype(torch.bfloat16).dtype == torch.bfloat16
    store = LocalStore(1 << 20, dtype=torch.float16)
    store.put(entry)
    assert store.get(entry.key()).dtype == torch.float32
    store.put(synthetic(first=5))
    assert store.get(synthetic(first=5).key()).dtype == torch.float16


# --- the shared tier: Redis between two nodes ----------------------------------------------


def node(url, capacity=1 << 22, **kw):
    kw = {"retry_after_s": 0.2, "max_retry_after_s": 0.4, "timeout_s": 0.3, **kw}
    return TieredStore(LocalStore(capacity), RedisStore(url, **kw))


def test_two_nodes_share_caches_through_redis(redis_server, sent):
    a, b = node(redis_server.url), node(redis_server.url)
    entry = CacheEntry.from_sender(sent, base=BASE, variant="s", e_layers=[1])
    a.put(entry)
    toks = IDS[0].tolist()
    hit = b.lookup(toks + [5] * 10, BASE, "s")
    assert hit.tier == "redis" and hit.n == 32
    assert same_entry(hit.entry, entry)
    assert b.lookup(toks + [5] * 10, BASE, "s").tier == "local"  # promoted
    assert b.lookup(toks, BASE, "other") is None
    # namespaced keys: base / variant / entry or block / hash
    keys = {k.decode() for k in a.remote.client.keys("*")}
    assert f"datahall:kvshare:{BASE}:s:entry:{entry.key()}" in keys
    assert {f"datahall:kvshare:{BASE}:s:block:{h}" for h in block_hashes(toks, BASE, "s")} <= keys
    assert len(keys) == 4 and a.remote.client.pttl(next(iter(keys))) == -1  # no TTL asked


def test_the_shared_tier_serves_a_longer_prefix_than_the_hot_tier(redis_server, sent):
    a, b = node(redis_server.url), node(redis_server.url)
    full = CacheEntry.from_sender(sent, base=BASE, variant="s", e_layers=[])
    b.put(full.truncate(16))
    a.put(full)
    toks = IDS[0].tolist()
    hit = b.lookup(toks, BASE, "s")
    assert (hit.tier, hit.n) == ("redis", 40)
    assert b.lookup_any(toks, BASE, ["r", "s"]).n == 40
    assert b.lookup_any(toks, BASE, ["r", "q"]) is None


def test_entries_expire_with_their_ttl(redis_server, sent):
    a = node(redis_server.url, ttl_s=0.3)
    entry = CacheEntry.from_sender(sent, base=BASE, variant="s", e_layers=[])
    a.put(entry)
    client = a.remote.client
    assert all(0 < client.pttl(k) <= 300 for k in client.keys("*"))
    time.sleep(0.5)
    assert client.keys("*") == []
    assert a.remote.lookup(IDS[0].tolist(), BASE, "s") is None


def test_a_redis_outage_serves_the_local_tier_and_recovers(redis_server, sent, caplog):
    caplog.set_level(logging.INFO, logger="datahall.kvshare.store")
    a, b = node(redis_server.url), node(redis_server.url)
    e1 = CacheEntry.from_sender(sent, base=BASE, variant="s", e_layers=[])
    e2 = CacheEntry.from_sender(sent, base=BASE, variant="t", e_layers=[])
    a.put(e1)
    toks = IDS[0].tolist()
    redis_server.stop()
    assert a.lookup(toks, BASE, "t") is None  # a miss, not an error
    for _ in range(3):  # past the back-off each time, so Redis is really tried again
        hit = a.lookup(toks + [1] * 16, BASE, "s")  # Redis is asked for a longer prefix
        assert (hit.tier, hit.n) == ("local", 32)
        a.put(e2)  # kept locally, not raised
        time.sleep(0.45)
    assert a.lookup(toks, BASE, "t").tier == "local"
    assert not a.remote.put(e2) and not a.remote.available
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert a.remote.stats.errors >= 4  # tried again after each back-off, warned once
    assert b.lookup(toks, BASE, "s") is None  # the other node: a miss, not an error
    redis_server.start()  # same port, empty (no persistence)
    time.sleep(0.45)
    a.put(e2)
    assert a.remote.available and a.remote.stats.outages == 1
    assert any("is back" in r.getMessage() for r in caplog.records)
    deadline = time.monotonic() + 5
    while (hit := b.lookup(toks, BASE, "t")) is None and time.monotonic() < deadline:
        time.sleep(0.1)  # b is still backing off from its own failed try
    assert hit is not None and hit.tier == "redis" and same_entry(hit.entry, e2)


def test_a_corrupted_entry_in_redis_is_deleted_and_missed(redis_server, sent, caplog):
    a, b = node(redis_server.url), node(redis_server.url)
    entry = CacheEntry.from_sender(sent, base=BASE, variant="s", e_layers=[1])
    a.put(entry)
    client = a.remote.client
    name = f"datahall:kvshare:{BASE}:s:entry:{entry.key()}"
    blob = bytearray(client.get(name))
    blob[len(blob) // 2] ^= 0x04
    client.set(name, bytes(blob))
    with caplog.at_level(logging.WARNING, logger="datahall.kvshare.store"):
        assert b.lookup(IDS[0].tolist(), BASE, "s") is None
    assert client.exists(name) == 0 and b.remote.stats.corrupt == 1
    assert any("deleting corrupted" in r.getMessage() for r in caplog.records)
    a.remote.put(entry)
    client.set(name, client.get(name)[:-100])  # truncated
    assert b.remote.lookup(IDS[0].tolist(), BASE, "s") is None and client.exists(name) == 0


def test_a_shorter_entry_survives_the_loss_of_a_longer_one(redis_server, sent):
    a, b = node(redis_server.url), node(redis_server.url)
    full = CacheEntry.from_sender(sent, base=BASE, variant="s", e_layers=[])
    a.put(full.truncate(32))
    a.put(full)  # now every block pointer names the 40-token entry
    client = a.remote.client
    client.delete(f"datahall:kvshare:{BASE}:s:entry:{full.key()}")
    hit = b.lookup(IDS[0].tolist(), BASE, "s")
    assert (hit.tier, hit.n) == ("redis", 32)
