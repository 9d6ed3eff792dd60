"""The discrete-event chunk simulator: exact where the pipeline model is exact, within a few
percent of the analytic evaluator at large messages, and never faster than the bandwidth term."""

from fractions import Fraction

import pytest

from datahall.collectives.baselines import blink, nccl_double_binary_tree, nccl_ring, one_shot
from datahall.collectives.evaluate import asymptotic_algbw, chunk_limit, chunking, evaluate
from datahall.collectives.plan import plan
from datahall.collectives.schedule import Phase, Schedule, Tree, TreeArc
from datahall.collectives.simulate import simulate
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
    return Schedule(collective, G.graph["name"], tuple(nodes), 1, Fraction(1), Fraction(1), phases)


@pytest.mark.parametrize("link", ["fifo", "ps"])
@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("M", [1000.0, 2**20, 5 * 2**20 + 3, 256 * 2**20])
def test_lone_chain_is_exact(link, window, M):
    # T = M/b + (n−1)(α + c/b) − c/b: a chain of equal hops is a tandem of deterministic queues
    n, b, alpha = 5, 50 * GB, 0.7e-6
    G = ring(n, capacity=50, bidirectional=False)
    s = chain_schedule(G, [f"gpu{i}" for i in range(n)])
    run = simulate(s, G, M, link=link, window=window)
    C, c = chunking(M, max_chunks=chunk_limit(s))
    assert run.time == pytest.approx(M / b + (n - 1) * (alpha + c / b) - c / b, rel=1e-9)
    assert run.time == pytest.approx(evaluate(s, G, M).time, rel=1e-9)
    assert run.transfers == C * (n - 1) and run.chunks == C


def test_lone_reduce_chain_and_step_latency_are_exact():
    G = ring(4, capacity=50)
    up = chain_schedule(G, ["gpu0", "gpu1", "gpu2", "gpu3"], "reduce")
    for step in (0.0, 3e-6):
        ev = evaluate(up, G, 2**22, step_latency=step)
        run = simulate(up, G, 2**22, step_latency=step, window=None)
        assert run.time == pytest.approx(ev.time, rel=1e-9)


@pytest.mark.parametrize("n", [3, 6])
def test_single_ring_allgather_approaches_the_closed_form(n):
    G = ring(n, capacity=50, bidirectional=False)
    s = nccl_ring(G, "allgather", rings=1)
    ev = evaluate(s, G, GiB)
    for link in ("fifo", "ps"):
        run = simulate(s, G, GiB, link=link)
        assert run.time >= ev.bandwidth_time * (1 - 1e-12)  # (N−1)/N·M/b is a hard floor
        assert run.algbw == pytest.approx(n * 50 / (n - 1), rel=0.01)
        assert run.algbw == pytest.approx(ev.algbw, rel=0.02)


def test_nccl_ring_on_two_dgx_a100_at_1gib():
    # brief §1 [derived]: 8 rings, each crossing a 25 GB/s NIC: 16·8·25/15 = 213.33 GB/s
    G = dgx_a100(boxes=2)
    s = nccl_ring(G, "allgather")
    run = simulate(s, G, GiB)
    ev = evaluate(s, G, GiB)
    assert run.algbw <= 640 / 3
    assert run.algbw == pytest.approx(640 / 3, rel=0.01)
    assert run.algbw == pytest.approx(ev.algbw, rel=0.02)
    assert run.busbw == pytest.approx(run.algbw * 15 / 16)


@pytest.mark.parametrize(
    ("name", "build", "link"),
    [
        ("tree", lambda G: nccl_double_binary_tree(G), "fifo"),
        ("blink", lambda G: blink(G, rounds=4), "fifo"),
        ("one-shot", lambda G: one_shot(G), "ps"),
        ("ring-ar", lambda G: nccl_ring(G, "allreduce"), "fifo"),
    ],
)
def test_simulator_agrees_with_evaluator_on_two_dgx_a100(name, build, link):
    G = dgx_a100(boxes=2)
    s = build(G)
    M = GiB if name in ("tree", "ring-ar") else 2**28
    run, ev = simulate(s, G, M, link=link), evaluate(s, G, M)
    assert run.time >= ev.bandwidth_time * (1 - 1e-12)
    assert run.algbw == pytest.approx(ev.algbw, rel=0.03), name


def test_processor_sharing_links_on_rings():
    G = dgx_a100(boxes=2)
    s = nccl_ring(G, "reduce_scatter")
    run = simulate(s, G, 2**28, link="ps")
    ev = evaluate(s, G, 2**28)
    assert run.link == "ps" and run.time >= ev.bandwidth_time
    assert run.algbw == pytest.approx(ev.algbw, rel=0.05)


def test_small_messages_pay_for_tree_height():
    # pitfall 6: same throughput, heights 7 and 1; at 8 KiB the chain is latency-bound
    G = dgx_a100(boxes=1)
    chain, star = nccl_ring(G, "allgather"), one_shot(G, "allgather")
    M = 8 * 2**10
    t_chain, t_star = simulate(chain, G, M), simulate(star, G, M)
    assert t_chain.time > 5 * t_star.time
    assert t_chain.time == pytest.approx(evaluate(chain, G, M).time, rel=0.02)
    assert t_star.time == pytest.approx(evaluate(star, G, M).time, rel=0.05)
    big = 2**28
    assert simulate(chain, G, big).algbw == pytest.approx(simulate(star, G, big).algbw, rel=0.02)


def test_allreduce_pipelines_reduce_into_broadcast():
    # up and down a two-way line: pipelined, the broadcast rides the reverse arcs concurrently
    G = ring(4, capacity=50)
    s = chain_schedule(G, ["gpu0", "gpu1", "gpu2", "gpu3"], "allreduce")
    M = 2**28
    piped = simulate(s, G, M)
    serial = simulate(s, G, M, overlap=False)
    assert piped.time == pytest.approx(M / (50 * GB), rel=0.01)
    assert serial.time == pytest.approx(2 * M / (50 * GB), rel=0.01)
    assert serial.phase_ends[0] < serial.phase_ends[1] == serial.time
    assert piped.time == pytest.approx(evaluate(s, G, M).time, rel=0.01)
    assert serial.time == pytest.approx(evaluate(s, G, M, overlap=False).time, rel=0.01)


def test_allreduce_on_rings_matches_between_modes():
    G = ring(4, capacity=50)
    s = nccl_ring(G, "allreduce", rings=1)
    piped, serial = simulate(s, G, 2**26), simulate(s, G, 2**26, overlap=False)
    assert piped.algbw == pytest.approx(4 * 50 / 6, rel=0.02)
    assert serial.algbw == pytest.approx(4 * 50 / 6, rel=0.02)


def test_flow_control_keeps_a_pipelined_allreduce_interleaved():
    # without credits the FIFO links fill up with reduce chunks and the broadcast starves
    G = dgx_a100(boxes=2)
    s = nccl_double_binary_tree(G)
    bound = 1200 / 7
    with_credits = simulate(s, G, 2**28, max_chunks=64, link="fifo")
    without = simulate(s, G, 2**28, max_chunks=64, window=None, link="fifo")
    assert with_credits.algbw == pytest.approx(bound, rel=0.02)
    assert without.algbw < 0.85 * bound
    # deadlines interleave the two phases on their own: EDF links need no credits
    edf = simulate(s, G, 2**28, max_chunks=64, window=None)
    assert edf.algbw == pytest.approx(bound, rel=0.03)


def test_deadlines_keep_every_tree_at_its_share():
    # ForestColl's allgather on 2x DGX A100 (bound 1040/3 GB/s): EDF links land the last
    # chunks of the deep trees with the rest; FIFO links and processor sharing let some
    # trees run ahead and leave the others' tails for the end
    G = dgx_a100(boxes=2)
    s = plan(G, "allgather")
    bound = 1040 / 3
    runs = {link: simulate(s, G, 2**28, link=link).algbw for link in ("edf", "fifo", "ps")}
    assert runs["edf"] > 1.04 * max(runs["fifo"], runs["ps"])
    assert 0.96 * bound < runs["edf"] < bound


def test_runs_are_deterministic_and_report_costs():
    G = dgx_a100(boxes=1)
    s = one_shot(G, "allreduce")
    a, b = simulate(s, G, 2**24, link="ps"), simulate(s, G, 2**24, link="ps")
    assert a.time == b.time and a.events == b.events
    assert a.transfers > 0 and a.events >= a.transfers and a.wall >= 0
    assert a.collective == "allreduce" and a.N == 8 and a.M == 2**24


def test_bad_arguments():
    G = ring(4)
    s = nccl_ring(G, rings=1)
    with pytest.raises(ValueError, match="link must be one of edf, fifo, ps"):
        simulate(s, G, 100, link="wormhole")
    with pytest.raises(ValueError, match="message size"):
        simulate(s, G, -1)
    with pytest.raises(ValueError, match="window"):
        simulate(s, G, 100, window=0)
    with pytest.raises(ValueError, match="not a link"):
        simulate(s, dgx_a100(boxes=1), 100)


def test_forestcoll_plan_reaches_n_x_star_when_the_planner_is_present():
    # brief §2.7 (3) and §2.8: the evaluator confirms a ForestColl schedule achieves N·x*
    plan = pytest.importorskip("datahall.collectives.plan").plan
    G = dgx_a100(boxes=2)
    s = plan(G, "allgather")
    assert asymptotic_algbw(s, G) == s.algbw == Fraction(16 * 65, 3)
    run = simulate(s, G, GiB)
    assert run.algbw <= 1040 / 3
    assert run.algbw == pytest.approx(evaluate(s, G, GiB).algbw, rel=0.02)
