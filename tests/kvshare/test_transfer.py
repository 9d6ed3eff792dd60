"""Streaming caches between nodes over loopback TCP: exact round trips, E-first order, link
pacing, detection of truncated, corrupted and stalled streams, and the pipelined assembly of
the receiver's hybrid KV (equal to hybrid_kv, bitwise)."""

import asyncio
import contextlib
import time

import pytest

torch = pytest.importorskip("torch")

from datahall.kvshare.hybrid import hybrid_kv, prefill  # noqa: E402
from datahall.kvshare.models import tiny  # noqa: E402
from datahall.kvshare.store import (  # noqa: E402
    FRAME_HEADER_BYTES,
    PREAMBLE,
    VERSION,
    CacheEntry,
    CorruptCache,
    Kind,
)
from datahall.kvshare.transfer import (  # noqa: E402
    CacheServer,
    CorruptTransfer,
    FetchRequest,
    Link,
    PeerError,
    TransferError,
    TransferTimeout,
    TruncatedTransfer,
    fetch,
    fetch_hybrid,
    frame_plan,
    stream_frames,
)

torch.set_num_threads(1)

L = 4
IDS = (torch.arange(64) * 5 % 250 + 1).unsqueeze(0)


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


async def collect(port, group, **kw):
    return [a async for a in fetch(port, FetchRequest(group), **kw)]


def serve(source, link=None, **kw):
    return CacheServer(lambda request: source, link=link, **kw)


def test_frames_round_trip_exactly_over_loopback(sent):
    async def main():
        async with serve(sent) as server:
            return await collect(server.port, (1, 3)), server.served

    arrivals, served = asyncio.run(main())
    assert served == 1
    assert arrivals[0].kind is Kind.META and arrivals[0].meta["n"] == 64
    got = {(a.kind, a.layer): a.tensor for a in arrivals[1:]}
    assert list(got) == frame_plan(L, (1, 3))
    assert torch.equal(got[Kind.IDS, 0], IDS)
    assert torch.equal(got[Kind.E, 1], sent.e_cache[1])
    for i in (0, 3):
        assert torch.equal(got[Kind.K, i], sent.kv[i][0])
        assert torch.equal(got[Kind.V, i], sent.kv[i][1])
    # everything but the END frame (a header and one int64): the preamble and all the frames
    frames = sum(len(f) for f in stream_frames(sent, (1, 3)))
    assert arrivals[-1].wire_bytes == PREAMBLE.size + frames - (FRAME_HEADER_BYTES + 8)


def test_the_e_cache_is_sent_first_then_the_reused_layers_in_order():
    k = lambda *layers: [(kind, i) for i in layers for kind in (Kind.K, Kind.V)]  # noqa: E731
    assert frame_plan(L, (1, 3)) == [(Kind.IDS, 0), (Kind.E, 1), *k(0, 3)]
    assert frame_plan(L, (2, 4)) == [(Kind.IDS, 0), (Kind.E, 2), *k(0, 1)]
    assert frame_plan(L, (0, 2)) == [(Kind.IDS, 0), *k(2, 3)]  # s = 0: R embeds the ids
    assert frame_plan(L, (0, 0)) == [(Kind.IDS, 0), *k(0, 1, 2, 3)]  # full reuse
    assert frame_plan(L, (0, L)) == [(Kind.IDS, 0)]  # full prefill: only the tokens
    with pytest.raises(ValueError, match="outside"):
        frame_plan(L, (3, 5))


@pytest.mark.parametrize(("bits", "latency"), [(1.6e6, 0.05), (None, 0.25)])
def test_pacing_takes_latency_plus_bytes_over_bandwidth(sent, bits, latency):
    # 1.6 Mb/s for ~51 KB of cache: ~0.25 s of serialization plus 50 ms one way
    link = Link(bits, latency)

    async def main():
        async with serve(sent, link) as server:
            t0 = time.perf_counter()
            arrivals = await collect(server.port, (1, 3))
            return arrivals, time.perf_counter() - t0

    arrivals, elapsed = asyncio.run(main())
    expect = link.transfer_s(arrivals[-1].wire_bytes)
    assert 0.2 < expect < 0.5
    assert expect * 0.9 <= elapsed <= expect * 1.35
    # the frames arrive spread out as the bytes do, not in one burst at the end
    t_first = arrivals[0].t
    for a in arrivals[1:]:
        assert a.t - t_first == pytest.approx(
            (a.wire_bytes - arrivals[0].wire_bytes) * 8 / (bits or float("inf")), abs=0.08
        )


def test_link_units_and_model():
    link = Link.parse("25Gb/s", "5us")
    assert link.bandwidth_bps == pytest.approx(25e9) and link.latency_s == pytest.approx(5e-6)
    assert Link(8e6, 0.1).transfer_s(1_000_000) == pytest.approx(1.1)
    assert Link(8e6).chunk_bytes == 1024 and Link(400e9).chunk_bytes == 4 << 20
    with pytest.raises(ValueError, match="positive"):
        Link(0.0)


@contextlib.asynccontextmanager
async def faulty(payload: bytes, stall: float = 0.0):
    """A sender that answers any request with `payload` (then stalls, then closes)."""

    async def handle(reader, writer):
        try:
            await reader.read(1 << 16)
            writer.write(payload)
            await writer.drain()
            await asyncio.sleep(stall)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def good_stream(sent, group=(1, 3)):
    return [PREAMBLE.pack(b"DHKV", VERSION, 0), *stream_frames(sent, group)]


def run_faulty(payload, stall=0.0, **kw):
    async def main():
        async with faulty(payload, stall) as port:
            return await collect(port, (1, 3), **kw)

    return asyncio.run(main())


def test_the_faulty_sender_helper_sends_a_valid_stream_when_unaltered(sent):
    assert len(run_faulty(b"".join(good_stream(sent)))) == 1 + len(frame_plan(L, (1, 3)))


@pytest.mark.parametrize("frames", [1, 2, 3, 5])
@pytest.mark.parametrize("where", ["boundary", "header", "payload"])
def test_a_truncated_stream_is_detected(sent, frames, where):
    parts = good_stream(sent)
    cut = len(b"".join(parts[: frames + 1]))  # preamble + META + ...
    cut += {"boundary": 0, "header": FRAME_HEADER_BYTES // 2, "payload": FRAME_HEADER_BYTES + 3}[
        where
    ]
    with pytest.raises(TruncatedTransfer, match="closed the stream"):
        run_faulty(b"".join(parts)[:cut])


def test_the_end_frame_must_arrive(sent):
    with pytest.raises(TruncatedTransfer):
        run_faulty(b"".join(good_stream(sent)[:-1]))


@pytest.mark.parametrize("frame", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("offset", [0, 9, FRAME_HEADER_BYTES - 1, FRAME_HEADER_BYTES + 5, -1])
def test_a_corrupted_frame_is_detected(sent, frame, offset):
    parts = good_stream(sent)
    bad = bytearray(parts[frame])
    bad[offset] ^= 0x20
    parts[frame] = bytes(bad)
    with pytest.raises(CorruptTransfer) as err:
        run_faulty(b"".join(parts))
    assert isinstance(err.value, TransferError) and isinstance(err.value, CorruptCache)


def test_a_stream_out_of_order_or_of_another_group_is_refused(sent):
    parts = good_stream(sent)
    swapped = [parts[0], parts[1], parts[2], parts[4], parts[3], *parts[5:]]  # K0 before E1
    with pytest.raises(CorruptTransfer, match="expected E of layer 1"):
        run_faulty(b"".join(swapped))
    with pytest.raises(CorruptTransfer, match="asked"):
        run_faulty(b"".join(good_stream(sent, (2, 4))))
    with pytest.raises(CorruptTransfer, match="magic"):
        run_faulty(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 200)


def test_a_stalled_sender_times_out(sent):
    parts = good_stream(sent)
    start = time.perf_counter()
    with pytest.raises(TransferTimeout, match="no cache bytes"):
        run_faulty(b"".join(parts[:3]), stall=5.0, idle_timeout_s=0.3)
    assert time.perf_counter() - start < 2.0
    slow = Link(1.6e6)  # every read is quick, but the whole transfer is past its deadline

    async def main():
        async with serve(sent, slow) as server:
            await collect(server.port, (1, 3), timeout_s=0.1)

    with pytest.raises(TransferTimeout, match="deadline"):
        asyncio.run(main())


def test_the_sender_reports_what_it_cannot_send(sent):
    sparse = CacheEntry.from_sender(sent, base="b", variant="s", e_layers=[2])

    async def main(source, group):
        async with serve(source) as server:
            return await collect(server.port, group)

    with pytest.raises(PeerError, match="no cache here"):
        asyncio.run(main(None, (1, 3)))
    with pytest.raises(PeerError, match=r"layer 1 was not stored \(stored: \[2\]\)"):
        asyncio.run(main(sparse, (1, 3)))
    with pytest.raises(PeerError, match="outside"):
        asyncio.run(main(sent, (2, 9)))
    assert len(asyncio.run(main(sparse, (2, 4)))) == 1 + len(frame_plan(L, (2, 4)))


def test_the_server_survives_a_bad_client_and_serves_the_next(sent):
    async def main():
        async with serve(sent) as server:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"garbage" * 20)
            await writer.drain()
            writer.close()
            return await collect(server.port, (0, 0))

    assert len(asyncio.run(main())) == 1 + len(frame_plan(L, (0, 0)))


@pytest.mark.parametrize("group", [(1, 3), (0, L), (0, 0), (2, 4), (3, 4), (0, 1)])
@pytest.mark.parametrize("pipelined", [True, False])
def test_the_assembled_cache_equals_hybrid_kv(models, sent, group, pipelined):
    S, R = models

    async def main():
        async with serve(sent) as server:
            return await fetch_hybrid(R, server.port, FetchRequest(group), pipelined=pipelined)

    got = asyncio.run(main())
    assert same_kv(got.kv, hybrid_kv(R, sent, group))
    assert torch.equal(got.ids, IDS) and got.group == (group if group[1] > group[0] else (0, 0))


def test_recompute_starts_when_the_e_cache_arrives_and_overlaps_the_transfer(models, sent):
    S, R = models
    link = Link(1.6e6, 0.02)  # ~0.27 s of transfer; the tiny recompute takes milliseconds

    async def main(pipelined):
        async with serve(sent, link) as server:
            return await fetch_hybrid(R, server.port, FetchRequest((1, 3)), pipelined=pipelined)

    piped = asyncio.run(main(True))
    assert piped.e_arrived_s is not None
    assert piped.e_arrived_s <= piped.recompute_start_s <= piped.e_arrived_s + 0.1
    assert piped.recompute_end_s < piped.transfer_s  # hidden behind the KV still streaming
    assert piped.total_s == pytest.approx(piped.transfer_s, abs=0.05)
    serial = asyncio.run(main(False))
    assert serial.recompute_start_s >= serial.transfer_s
    assert serial.total_s >= serial.transfer_s + serial.compute_s
    assert same_kv(piped.kv, serial.kv) and same_kv(piped.kv, hybrid_kv(R, sent, (1, 3)))


def test_a_store_entry_can_be_the_source(models, sent):
    S, R = models
    entry = CacheEntry.from_sender(sent, base="b", variant="s", e_layers=[1])

    async def main(source):
        async with serve(source) as server:
            return await fetch_hybrid(R, server.port, FetchRequest((1, 3), key="k"))

    assert same_kv(asyncio.run(main(entry)).kv, hybrid_kv(R, sent, (1, 3)))
    half = asyncio.run(main(entry.astype(torch.float16)))  # half the bytes, close not equal
    assert half.kv[0][0].dtype == torch.float32
    for (k, v), (k2, v2) in zip(hybrid_kv(R, sent, (1, 3)), half.kv, strict=True):
        torch.testing.assert_close(k2, k, rtol=0, atol=5e-3)
        torch.testing.assert_close(v2, v, rtol=0, atol=5e-3)


def test_a_failed_transfer_raises_for_the_caller_to_recompute(models, sent):
    S, R = models
    parts = good_stream(sent)

    async def main():
        async with faulty(b"".join(parts[:5])) as port:
            await fetch_hybrid(R, port, FetchRequest((1, 3)))

    with pytest.raises(TruncatedTransfer):
        asyncio.run(main())

    async def refused():
        server = serve(sent)
        port = await server.start()
        await server.close()
        await fetch_hybrid(R, port, FetchRequest((1, 3)))

    with pytest.raises(TransferError, match="cannot connect"):
        asyncio.run(refused())
