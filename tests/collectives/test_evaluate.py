"""The analytic evaluator: loads, the bandwidth term, the pipeline-fill term and nccl-tests
conversions, against closed forms (brief §2.6, §2.8, §4)."""

from fractions import Fraction

import pytest

from datahall.collectives.baselines import nccl_double_binary_tree, nccl_ring, one_shot
from datahall.collectives.evaluate import (
    CHUNK_BUDGET,
    arc_loads,
    asymptotic_algbw,
    busbw,
    check_schedule,
    chunk_limit,
    chunking,
    evaluate,
    tree_share,
)
from datahall.collectives.schedule import Phase, Schedule, Tree, TreeArc
from datahall.core.topologies import dgx_a100, ring
from datahall.core.units import GB

GiB = 2**30


def chain_schedule(G, nodes, collective="broadcast"):
    """One chain nodes[0] → nodes[1] → ... over direct arcs (or its reverse for reduce)."""
    pairs = list(zip(nodes, nodes[1:], strict=False))
    down = Tree(nodes[0], 0, 1, tuple(TreeArc(a, b, (a, b)) for a, b in pairs))
    up = Tree(nodes[0], 0, 1, tuple(TreeArc(a, b, (b, a)) for a, b in pairs))
    phases = {
        "broadcast": (Phase("broadcast", (down,)),),
        "reduce": (Phase("reduce", (up,)),),
        "allreduce": (Phase("reduce", (up,)), Phase("broadcast", (down,))),
    }[collective]
    return Schedule(
        collective="allreduce" if collective == "allreduce" else collective,
        topology=G.graph["name"],
        compute_nodes=tuple(nodes),
        k=1,
        U=Fraction(1),
        x_star=Fraction(1),
        phases=phases,
    )


@pytest.mark.parametrize(
    ("collective", "factor"),
    [
        ("allgather", 15 / 16),
        ("reduce_scatter", 15 / 16),
        ("allreduce", 30 / 16),
        ("broadcast", 1.0),
        ("reduce", 1.0),
    ],
)
def test_busbw_follows_nccl_tests(collective, factor):
    assert busbw(collective, 100.0, 16) == pytest.approx(100.0 * factor)


def test_chunking():
    assert chunking(2**20) == (8, 131072.0)
    assert chunking(2**20, chunk=2**20) == (1, 2**20)
    assert chunking(3 * 2**17 + 1) == (4, (3 * 2**17 + 1) / 4)
    assert chunking(GiB, max_chunks=10) == (10, GiB / 10)
    assert chunking(0) == (0, 0.0)
    with pytest.raises(ValueError, match="chunk"):
        chunking(10, chunk=0)
    with pytest.raises(ValueError, match="max_chunks"):
        chunking(10, max_chunks=0)


def test_chunk_limit_shares_a_budget():
    G = dgx_a100(boxes=2)
    assert chunk_limit(nccl_ring(G, "allgather")) == CHUNK_BUDGET // (128 * 15)
    assert chunk_limit(nccl_ring(G, "allreduce")) == CHUNK_BUDGET // (256 * 15)
    assert chunk_limit(nccl_double_binary_tree(G)) == CHUNK_BUDGET // (32 * 15)


def test_tree_share_matches_tree_bytes():
    s = nccl_double_binary_tree(dgx_a100(boxes=2))
    for phase in s.phases:
        for tree in phase.trees:
            assert tree_share(phase, tree) == Fraction(1, 16)
            assert s.tree_bytes(phase, tree, 1600.0) == pytest.approx(100.0)


@pytest.mark.parametrize("n", [3, 5, 8])
def test_single_ring_allgather_closed_form(n):
    # every arc of a one-way ring carries (N−1)/N·M, so T = (N−1)/N·M/b
    G = ring(n, capacity=50, bidirectional=False)
    s = nccl_ring(G, "allgather", rings=1)
    loads = arc_loads(s, M=GiB)
    assert len(loads) == n
    for load in loads.values():
        assert load == pytest.approx((n - 1) / n * GiB, rel=1e-12)
    assert asymptotic_algbw(s, G) == Fraction(n * 50, n - 1)
    ev = evaluate(s, G, GiB)
    assert ev.bandwidth_time == pytest.approx((n - 1) / n * GiB / (50 * GB), rel=1e-12)
    assert ev.heights == (n - 1,)
    assert ev.algbw < n * 50 / (n - 1) and ev.algbw == pytest.approx(n * 50 / (n - 1), rel=0.01)
    assert ev.busbw == pytest.approx(ev.algbw * (n - 1) / n)


@pytest.mark.parametrize("M", [1000.0, 2**20, 3 * 2**20 + 7, GiB])
def test_lone_chain_is_the_pipeline_formula(M):
    # broadcast down a chain of n−1 equal hops, C chunks of c: T = M/b + (n−1)(α + c/b) − c/b
    n, b, alpha = 5, 50 * GB, 0.7e-6
    G = ring(n, capacity=50, bidirectional=False)
    s = chain_schedule(G, [f"gpu{i}" for i in range(n)])
    C, c = chunking(M, max_chunks=chunk_limit(s))
    ev = evaluate(s, G, M)
    expected = M / b + (n - 1) * (alpha + c / b) - c / b
    assert ev.time == pytest.approx(expected, rel=1e-12)
    assert ev.latency_time == pytest.approx(expected - M / b, rel=1e-9)
    assert ev.algbw == pytest.approx(M / expected / GB, rel=1e-12)


def test_step_latency_adds_one_step_per_tree_arc():
    G = ring(5, capacity=50, bidirectional=False)
    s = chain_schedule(G, [f"gpu{i}" for i in range(5)])
    base = evaluate(s, G, 2**20)
    slow = evaluate(s, G, 2**20, step_latency=5e-6)
    assert slow.time - base.time == pytest.approx(4 * 5e-6, rel=1e-9)


def test_nccl_ring_on_two_dgx_a100_at_large_messages():
    G = dgx_a100(boxes=2)
    s = nccl_ring(G, "allgather")
    ev = evaluate(s, G, GiB)
    assert ev.bandwidth_time == pytest.approx(15 / 16 * GiB / 8 / (25 * GB), rel=1e-12)
    assert ev.algbw == pytest.approx(640 / 3, rel=0.02) and ev.algbw < 640 / 3
    assert ev.busbw == pytest.approx(ev.algbw * 15 / 16)
    assert "nic" in ev.bottleneck[0] or "nic" in ev.bottleneck[1]
    assert ev.heights == (15,)
    ar = evaluate(nccl_ring(G, "allreduce"), G, GiB)
    assert ar.algbw == pytest.approx(320 / 3, rel=0.03)
    assert ar.busbw == pytest.approx(ar.algbw * 30 / 16)


def test_small_message_latency_grows_with_tree_height():
    # pitfall 6: in one DGX A100 box a ring and the one-shot star have the same throughput
    # (N·b/(N−1) = 2400/7) but heights 7 and 1; at 8 KiB the chain pays α at every hop.
    G = dgx_a100(boxes=1)
    chain, star = nccl_ring(G, "allgather"), one_shot(G, "allgather")
    assert chain.algbw == star.algbw == Fraction(2400, 7)
    M = 8 * 2**10
    c = M / 8  # one chunk per tree: each root's shard
    a, b = 0.7e-6, 300 * GB
    ev_chain, ev_star = evaluate(chain, G, M), evaluate(star, G, M)
    assert ev_chain.heights == (7,) and ev_star.heights == (1,)
    assert ev_chain.latency_time == pytest.approx(14 * (a + c / b) - c / b, rel=1e-9)
    assert ev_star.latency_time == pytest.approx(2 * (a + c / b) - c / b, rel=1e-9)
    assert ev_chain.time > 5 * ev_star.time
    # at 1 GiB the difference is a rounding error
    big_chain, big_star = evaluate(chain, G, GiB), evaluate(star, G, GiB)
    assert big_chain.algbw == pytest.approx(big_star.algbw, rel=0.03)


def test_allreduce_phases_overlap_when_they_use_different_arcs():
    # a chain on a two-way line: the reduce flows up the chain, the broadcast down it
    G = ring(4, capacity=50)
    s = chain_schedule(G, ["gpu0", "gpu1", "gpu2", "gpu3"], "allreduce")
    assert asymptotic_algbw(s, G) == 50  # pipelined: max_e over both phases
    assert asymptotic_algbw(s, G, overlap=False) == 25  # the sum over phases
    piped, serial = evaluate(s, G, GiB), evaluate(s, G, GiB, overlap=False)
    assert piped.bandwidth_time == pytest.approx(GiB / (50 * GB))
    assert serial.bandwidth_time == pytest.approx(2 * GiB / (50 * GB))
    assert len(piped.phase_times) == 1 and len(serial.phase_times) == 2
    # on a ring the two phases load the same arcs, and overlap changes nothing
    r = nccl_ring(ring(4, capacity=50), "allreduce", rings=1)
    assert asymptotic_algbw(r, ring(4, capacity=50)) == asymptotic_algbw(
        r, ring(4, capacity=50), overlap=False
    )


def test_message_sizes_and_errors():
    G = ring(4, capacity=50)
    s = nccl_ring(G, "allgather", rings=1)
    assert GiB == evaluate(s, G, "1GiB").M
    with pytest.raises(ValueError, match="message size"):
        evaluate(s, G, 0)
    other = dgx_a100(boxes=1)
    with pytest.raises(ValueError, match="not a link of dgx-a100x1"):
        check_schedule(s, other)
    bad = chain_schedule(G, ["gpu0", "gpu1"])
    flipped = Schedule(
        collective="reduce",
        topology="ring-4",
        compute_nodes=("gpu0", "gpu1"),
        k=1,
        U=Fraction(1),
        x_star=Fraction(1),
        phases=(Phase("reduce", bad.phases[0].trees),),
    )
    with pytest.raises(ValueError, match="must run from gpu1 to gpu0"):
        evaluate(flipped, G, 100)
    empty = Schedule(
        collective="broadcast",
        topology="ring-4",
        compute_nodes=("gpu0",),
        k=1,
        U=Fraction(1),
        x_star=Fraction(1),
        phases=(Phase("broadcast", (Tree("gpu0", 0, 1, ()),)),),
    )
    with pytest.raises(ValueError, match="moves no data"):
        asymptotic_algbw(empty, G)
    assert evaluate(empty, G, 100).time == 0.0
