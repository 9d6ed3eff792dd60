"""Nodes sharing caches: engines in one process, each with its own cache server on 127.0.0.1,
a real redis-server holding the directory. A cross-variant hit fetched from a peer decodes
exactly as hybrid_kv on one machine; a same-variant fetch exactly as no sharing; a truncated,
corrupted, stalled, mismatched or stale peer is never used; Redis going away leaves each node
its own tier. Then `datahall kvshare serve`: bad input in one line, and two real node
processes sharing a cache. Tiny random models only."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("redis")

from datahall.kvshare.engine import Engine  # noqa: E402
from datahall.kvshare.hybrid import generate, hybrid_kv, prefill  # noqa: E402
from datahall.kvshare.models import Model, architecture, tiny  # noqa: E402
from datahall.kvshare.store import (  # noqa: E402
    MAGIC,
    PREAMBLE,
    VERSION,
    CacheEntry,
    LocalStore,
    RedisStore,
    TieredStore,
)
from datahall.kvshare.transfer import CacheNode, Link, stream_frames  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

L = 4
GROUP = (1, 3)
DOC = [(7 * i) % 251 + 3 for i in range(48)]  # three 16-token blocks
OTHER = [(11 * i) % 241 + 5 for i in range(48)]


def variant(name, seed):
    """A tiny decoder whose weights are scaled to std 0.3, so greedy decoding varies (the 0.02
    init repeats one token) and the token-equality checks below are strong."""
    model = tiny(seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(15)
    return Model(name, model, None, f"tiny:{architecture(model.config)}")


@pytest.fixture(scope="module")
def models():
    return {"a": variant("a", 0), "b": variant("b", 1)}


def node(models, redis_url, names, *, shared="directory", **kw):
    """An engine serving `names`, sharing caches with the other variants through Redis."""
    remote = RedisStore(redis_url, timeout_s=1.0, retry_after_s=0.05, max_retry_after_s=0.1)
    store = TieredStore(LocalStore(64 << 20), remote, shared=shared)
    idle = kw.pop("idle_timeout_s", 2.0)
    cache = CacheNode(store.local, link=kw.pop("link", None), timeout_s=10.0, idle_timeout_s=idle)
    return Engine(
        {n: models[n] for n in names},
        store=store,
        node=cache,
        sharing="droidspeak",
        profiles=lambda sender, receiver: GROUP,
        peers=[v for v in models if v not in names],
        **kw,
    )


def plain(models, name, prompt, n=6):
    """The tokens with no sharing at all."""
    with Engine({name: models[name]}) as e:
        return e.generate(prompt, name, max_new_tokens=n, timeout=30).output


def test_a_cross_variant_hit_from_a_peer_equals_hybrid_kv_locally(models, redis_server):
    with node(models, redis_server.url, ["a"]) as A, node(models, redis_server.url, ["b"]) as B:
        A.generate(DOC + [1, 2, 3], "a", max_new_tokens=2, timeout=30)
        r = B.generate(DOC + [6, 7, 8, 9], "b", max_new_tokens=8, timeout=30)
        st = B.stats()
        b_local = B.store.local
    assert (r.prefill_kind, r.source_variant, r.group, r.cached_tokens) == (
        "cross_variant",
        "a",
        GROUP,
        48,
    )
    with torch.inference_mode():
        kv = hybrid_kv(models["b"].model, prefill(models["a"].model, DOC), GROUP)
    assert r.output == generate(models["b"].model, kv, [6, 7, 8, 9], 8).ids
    assert r.output != plain(models, "b", DOC + [6, 7, 8, 9], 8)  # a's KV really was used
    t = r.transfer
    assert (t.outcome, t.peer, t.variant, t.kind, t.group, t.tokens) == (
        "ok",
        A.node.address,
        "a",
        "cross_variant",
        GROUP,
        48,
    )
    # E-first: the recompute of [1, 3) started once the E cache was in
    assert 0 < t.e_arrived_s <= t.recompute_start_s < t.recompute_end_s <= t.total_s
    assert t.transfer_s <= t.total_s and t.started < t.finished <= r.first_token_time
    # what crossed: ids, E at 1, K/V of layers 0 and 3 (48 tokens, 2 KV heads of 16, fp32)
    assert t.bytes > 4 * 48 * 2 * 16 * 4 + 48 * 64 * 4
    assert st.transfers["ok"] == 1 and st.transfer_bytes == t.bytes
    assert st.prefills == {"full": 0, "same_variant": 0, "cross_variant": 1}
    # the hybrid is stored under no name, and nothing of a's is kept on b's node
    assert len(b_local) == 0


def test_the_recompute_runs_while_the_reused_layers_stream(models, redis_server):
    """Over a slow link (1.6 Mb/s: ~0.2 s for the 37 KB of E cache and K/V) b's group is
    recomputed as soon as the E cache is in, hidden behind the layers still streaming."""
    url = redis_server.url
    with node(models, url, ["a"], link=Link(1.6e6, 0.01)) as A, node(models, url, ["b"]) as B:
        A.generate(DOC + [1], "a", max_new_tokens=2, timeout=30)
        r = B.generate(DOC + [6, 7, 8, 9], "b", max_new_tokens=8, timeout=30)
    t = r.transfer
    assert t.outcome == "ok" and t.transfer_s > 0.15
    assert t.e_arrived_s <= t.recompute_start_s < t.recompute_end_s < t.transfer_s
    assert t.total_s == pytest.approx(t.transfer_s, abs=0.05)  # ≈ max(transfer, compute)
    with torch.inference_mode():
        kv = hybrid_kv(models["b"].model, prefill(models["a"].model, DOC), GROUP)
    assert r.output == generate(models["b"].model, kv, [6, 7, 8, 9], 8).ids


def test_a_same_variant_fetch_equals_no_sharing_and_is_kept(models, redis_server):
    prompt = DOC + [4, 5]
    with node(models, redis_server.url, ["a"]) as A, node(models, redis_server.url, ["a"]) as A2:
        A.generate(DOC + [1, 2, 3], "a", max_new_tokens=2, timeout=30)
        r = A2.generate(prompt, "a", max_new_tokens=8, timeout=30)
        again = A2.generate(DOC + [9], "a", max_new_tokens=2, timeout=30)
        kept = A2.store.local.lookup(DOC, A2.base, "a")
        holder = A2.store.locate(DOC, A2.base, ["a"])["a"]
    assert (r.prefill_kind, r.cached_tokens, r.transfer.outcome, r.transfer.kind) == (
        "same_variant",
        48,
        "ok",
        "same_variant",
    )
    assert r.transfer.e_arrived_s is None and r.transfer.recompute_start_s is None
    assert r.output == plain(models, "a", prompt, 8)
    # the copy is in A2's hot tier, with the E cache that b's group starts at (b is a peer)
    assert kept.n == 48 and kept.entry.e_layers == (1,)
    assert again.prefill_kind == "same_variant" and again.transfer is None
    # and it is not published: the directory still names the node that computed it
    assert holder.address == A.node.address


class FaultyPeer:
    """A cache server that answers every request with `payload`, then waits `stall` seconds
    and closes (plain sockets on a thread: it needs no event loop)."""

    def __init__(self, payload, stall=0.0):
        self.payload, self.stall = payload, stall
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.served = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                with conn:
                    conn.recv(1 << 16)
                    with contextlib.suppress(OSError):
                        conn.sendall(self.payload)
                        self.served += 1
                        time.sleep(self.stall)

    def close(self):
        self.sock.close()


def stream(models, tokens):
    """A well-formed stream of a's cache of `tokens` for GROUP, as frames."""
    with torch.inference_mode():
        sent = prefill(models["a"].model, tokens)
    return [PREAMBLE.pack(MAGIC, VERSION, 0), *stream_frames(sent, GROUP)]


def flip(frame):
    bad = bytearray(frame)
    bad[-3] ^= 0x10
    return bytes(bad)


@pytest.mark.parametrize(
    "fault, outcome",
    [("truncated", "truncated"), ("corrupted", "corrupt"), ("stalled", "timeout"),
     ("other tokens", "corrupt"), ("garbage", "corrupt")],
)  # fmt: skip
def test_a_faulty_peer_is_never_used(models, redis_server, caplog, fault, outcome):
    frames = stream(models, OTHER if fault == "other tokens" else DOC)
    payload, stall = {
        "truncated": (b"".join(frames)[:-100], 0.0),
        "corrupted": (b"".join([*frames[:4], flip(frames[4]), *frames[5:]]), 0.0),
        "stalled": (b"".join(frames[:4]), 2.0),
        "other tokens": (b"".join(frames), 0.0),
        "garbage": (b"HTTP/1.1 400 Bad Request\r\n\r\n" + b"x" * 100, 0.0),
    }[fault]
    peer = FaultyPeer(payload, stall)
    prompt = DOC + [6, 7, 8, 9]
    try:
        with node(models, redis_server.url, ["b"], idle_timeout_s=0.3) as B:
            # a's entry for DOC, said to be held by the faulty peer
            with torch.inference_mode():
                entry = CacheEntry.from_sender(
                    prefill(models["a"].model, DOC), base=B.base, variant="a", e_layers=[1]
                )
            assert B.store.remote.publish(entry, peer.address)
            r = B.generate(prompt, "b", max_new_tokens=8, timeout=30)
            st = B.stats()
    finally:
        peer.close()
    assert peer.served >= 1
    assert r.prefill_kind == "full" and r.cached_tokens == 0 and r.source_variant is None
    assert r.output == plain(models, "b", prompt, 8)
    assert (r.transfer.outcome, r.transfer.peer) == (outcome, peer.address)
    assert st.transfers[outcome] == 1 and sum(st.transfers.values()) == 1
    assert any("prefilling without it" in m and outcome in m for m in caplog.messages)


def test_stale_records_are_refused_and_forgotten(models, redis_server):
    with node(models, redis_server.url, ["a"]) as A, node(models, redis_server.url, ["b"]) as B:
        A.generate(DOC + [1], "a", max_new_tokens=2, timeout=30)
        A.store.local.clear()  # evicted, but the directory still names A
        r = B.generate(DOC + [6, 7], "b", max_new_tokens=4, timeout=30)
        assert (r.prefill_kind, r.transfer.outcome) == ("full", "peer_error")
        assert "no cache here" in r.transfer.error
        assert B.store.locate(DOC, B.base, ["a"]) == {}  # forgotten: nobody is sent there again
        # a node that went away: nothing listens at its address any more
        gone = f"127.0.0.1:{free_port()}"
        with torch.inference_mode():
            sent = prefill(models["a"].model, OTHER)
        entry = CacheEntry.from_sender(sent, base=B.base, variant="a", e_layers=[1])
        B.store.remote.publish(entry, gone)
        r = B.generate(OTHER + [1], "b", max_new_tokens=2, timeout=30)
        assert (r.prefill_kind, r.transfer.outcome, r.transfer.peer) == (
            "full",
            "unreachable",
            gone,
        )
        assert B.store.locate(OTHER, B.base, ["a"]) == {}
        assert B.stats().transfers == dict.fromkeys(B.stats().transfers, 0) | {
            "peer_error": 1,
            "unreachable": 1,
        }


def test_blob_mode_needs_no_cache_server_and_both_prefers_the_local_copy(models, redis_server):
    url = redis_server.url
    with node(models, url, ["a"], shared="both") as A, node(models, url, ["b"], shared="both") as B:
        A.generate(DOC + [1], "a", max_new_tokens=2, timeout=30)
        r = B.generate(DOC + [6, 7], "b", max_new_tokens=4, timeout=30)
    # the blob came through Redis into B's hot tier first: no transfer was needed
    assert r.prefill_kind == "cross_variant" and r.transfer is None
    with pytest.raises(ValueError, match="needs a cache node"):
        Engine(models, store=TieredStore(LocalStore(1 << 20), RedisStore(url), shared="both"))
    with pytest.raises(ValueError, match="hot tier"):
        store = TieredStore(LocalStore(1 << 20))
        Engine(models, store=store, node=CacheNode(LocalStore(1 << 20)), sharing="prefix")


def test_redis_down_serves_from_the_local_tier_and_recovers(models, redis_server, caplog):
    with node(models, redis_server.url, ["a"]) as A, node(models, redis_server.url, ["b"]) as B:
        redis_server.stop()
        first = A.generate(DOC + [1], "a", max_new_tokens=2, timeout=30)
        second = A.generate(DOC + [2], "a", max_new_tokens=2, timeout=30)
        lone = B.generate(DOC + [6, 7], "b", max_new_tokens=4, timeout=30)
        assert [first.prefill_kind, second.prefill_kind, lone.prefill_kind] == [
            "full",
            "same_variant",
            "full",
        ]
        assert lone.transfer is None and lone.output == plain(models, "b", DOC + [6, 7], 4)
        assert any("unavailable" in m for m in caplog.messages)
        redis_server.start()
        time.sleep(0.3)  # past the back-off
        A.generate(OTHER + [1], "a", max_new_tokens=2, timeout=30)
        back = B.generate(OTHER + [6, 7], "b", max_new_tokens=4, timeout=30)
        assert back.prefill_kind == "cross_variant" and back.transfer.outcome == "ok"
    assert any("is back" in m for m in caplog.messages)


def test_transfer_metrics(models, redis_server):
    httpx = pytest.importorskip("httpx")
    import asyncio

    from prometheus_client.parser import text_string_to_metric_families

    from datahall.kvshare.server import ByteTokenizer, create_app

    with node(models, redis_server.url, ["a"]) as A, node(models, redis_server.url, ["b"]) as B:
        A.generate(DOC + [1], "a", max_new_tokens=2, timeout=30)
        r = B.generate(DOC + [6, 7], "b", max_new_tokens=2, timeout=30)

        async def scrape():
            transport = httpx.ASGITransport(app=create_app(B, ByteTokenizer()))
            async with httpx.AsyncClient(transport=transport, base_url="http://n") as client:
                return (await client.get("/metrics")).text

        text = asyncio.run(scrape())
    samples = {
        (s.name, s.labels.get("outcome")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert samples["datahall:transfers_total", "ok"] == 1
    assert samples["datahall:transfers_total", "corrupt"] == 0
    assert samples["datahall:transfer_bytes_total", None] == r.transfer.bytes


# ---- datahall kvshare serve ------------------------------------------------------------------


def one_line_error(code, err, *fragments):
    assert code == 2, err
    assert err.startswith("error:") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_serve_bad_input_is_one_line(cli):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        cases = [
            (["--model", "nosuch", "--port", "0"], ["unknown model 'nosuch'"]),
            (["--model", "tiny-llama", "--port", "0"], ["no tokenizer", "--tokenizer bytes"]),
            (["--model", "tiny-llama", "--port", port], ["cannot listen", port, "--port"]),
            (["--model", "tiny-llama", "--redis", "redis://127.0.0.1:1", "--link", "25Gbit"],
             ["cannot read bandwidth", "25Gbit"]),
            (["--model", "tiny-llama", "--link", "25Gb/s"], ["--link/--latency", "--redis"]),
            (["--model", "tiny-llama", "--sharing", "all"], ["--sharing must be"]),
            (["--model", "tiny-llama", "--model", "tiny-llama"], ["twice"]),
            (["--model", "tiny-llama", "--peer-variant", "b"], ["needs --redis"]),
            (["--model", "tiny-llama", "--kv-cache-bytes", "lots"], ["lots"]),
            (["--model", "tiny-llama", "--model", "tiny-qwen2", "--port", "0"],
             ["different architectures"]),
        ]  # fmt: skip
        for args, fragments in cases:
            one_line_error(*cli("kvshare", "serve", *args)[::2], *fragments)


def free_port():
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def start_node(redis_url, cache_port, tmp_path, name):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    args = [sys.executable, "-c", "from datahall.cli import main; main()", "kvshare", "serve"]
    args += ["--model", "tiny-llama", "--tokenizer", "bytes", "--port", "0", "--redis", redis_url]
    args += ["--cache-port", str(cache_port), "--link", "10Gb/s", "--latency", "50us"]
    log = open(tmp_path / f"{name}.log", "w+b")  # noqa: SIM115 -- owned by the process
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, env=env)
    return proc, log


def read_url(proc, log, deadline):
    line = b""
    while time.monotonic() < deadline and b"\n" not in line:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"serve exited {proc.returncode}: {log.read().decode()[-2000:]}")
        line += os.read(proc.stdout.fileno(), 4096)  # the first line comes when it is ready
    found = re.search(rb"serving tiny-llama on (http://127\.0\.0\.1:\d+)/v1 \(caches for", line)
    assert found, line
    return found[1].decode()


@pytest.mark.slow
def test_two_serve_processes_share_a_cache_through_the_directory(redis_server, tmp_path):
    """Two `datahall kvshare serve` processes (tiny-llama, byte tokenizer, an emulated link):
    node 2 answers a prompt node 1 has seen by fetching node 1's cache, with the same text."""
    httpx = pytest.importorskip("httpx")
    nodes = [start_node(redis_server.url, free_port(), tmp_path, f"n{i}") for i in (1, 2)]
    try:
        deadline = time.monotonic() + 60
        urls = [read_url(proc, log, deadline) for proc, log in nodes]
        body = {"model": "tiny-llama", "prompt": "The shared document. " * 4, "max_tokens": 6}
        body["temperature"] = 0
        answers = [httpx.post(f"{u}/v1/completions", json=body, timeout=30).json() for u in urls]
        assert answers[0]["choices"][0]["text"] == answers[1]["choices"][0]["text"]
        assert answers[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 80
        metrics = httpx.get(f"{urls[1]}/metrics", timeout=10).text
        assert 'datahall:transfers_total{outcome="ok"} 1.0' in metrics
        assert httpx.get(f"{urls[1]}/ready", timeout=10).json()["status"] == "ready"
    finally:
        for proc, _ in nodes:
            proc.send_signal(signal.SIGINT)
        codes = []
        for proc, log in nodes:
            try:
                codes.append(proc.wait(15))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait(5))
            log.close()
    assert codes == [0, 0]
