"""The compound-AI workload: seeded, every document read by every agent, Poisson arrivals."""

import asyncio
import statistics

import pytest

from datahall.kvshare.workload import compound_workload, replay

AGENTS = ["docs-top", "coder-top", "dict-top"]


def test_every_document_is_asked_once_by_every_agent():
    calls = compound_workload(AGENTS, documents=6, rate=2.0, context_tokens=256)
    assert len(calls) == 18
    for d in range(6):
        mine = [c for c in calls if c.document == d]
        assert sorted(c.agent for c in mine) == sorted(AGENTS)
        assert len({c.example.context for c in mine}) == 1  # one shared document
        assert len({c.example.instruction for c in mine}) == 3  # each agent its own question
    assert len({c.example.context for c in calls}) == 6


def test_seeded_and_sorted():
    a = compound_workload(AGENTS, documents=4, rate=1.0, context_tokens=256, seed=3)
    assert a == compound_workload(AGENTS, documents=4, rate=1.0, context_tokens=256, seed=3)
    assert a != compound_workload(AGENTS, documents=4, rate=1.0, context_tokens=256, seed=4)
    assert [c.arrival for c in a] == sorted(c.arrival for c in a)


def test_arrival_rate_is_the_requested_one():
    calls = compound_workload(["x", "y"], documents=40, rate=5.0, spread=0.01, context_tokens=256)
    opened = sorted({min(c.arrival for c in calls if c.document == d) for d in range(40)})
    gaps = [b - a for a, b in zip(opened, opened[1:], strict=False)]
    assert statistics.fmean(gaps) == pytest.approx(2 / 5.0, rel=0.3)  # documents at rate/2


def test_bad_arguments_explain():
    with pytest.raises(ValueError, match="at least one agent"):
        compound_workload([], documents=1, rate=1.0)
    with pytest.raises(ValueError, match="must be positive"):
        compound_workload(["a"], documents=1, rate=0.0)
    with pytest.raises(ValueError, match="questions at context_tokens"):
        compound_workload([str(i) for i in range(9)], documents=1, rate=1.0, context_tokens=256)


def test_pipeline_chains_each_documents_agents_in_order():
    calls = compound_workload(AGENTS, documents=5, rate=2.0, context_tokens=256, pipeline=True)
    assert len(calls) == 15
    for d in range(5):
        mine = [i for i, c in enumerate(calls) if c.document == d]
        assert [calls[i].agent for i in mine] == AGENTS  # in the order given
        first, *rest = mine
        assert calls[first].after is None and calls[first].think == 0
        assert [calls[i].after for i in rest] == mine[:-1]  # each waits for the previous
        assert all(calls[i].think > 0 for i in rest)
        assert len({calls[i].arrival for i in mine}) == 1  # all may go once the document opens
    assert [c.arrival for c in calls] == sorted(c.arrival for c in calls)


def test_replay_keeps_times_and_chains():
    calls = compound_workload(
        ["a", "b"], documents=3, rate=40.0, spread=0.02, context_tokens=256, pipeline=True
    )
    sent: dict[int, tuple[float, float]] = {}

    async def send(call):
        start = asyncio.get_running_loop().time()
        await asyncio.sleep(0.03)
        sent[id(call)] = (start, asyncio.get_running_loop().time())
        if call.agent == "a" and call.document == 1:
            raise RuntimeError("the first agent failed")
        return call.agent

    async def main():
        t0 = asyncio.get_running_loop().time()
        return t0, await replay(calls, send, timeout=5)

    t0, results = asyncio.run(main())
    assert [type(r) if isinstance(r, Exception) else r for r in results] == [
        "a" if c.agent == "a" and c.document != 1 else RuntimeError if c.agent == "a" else "b"
        for c in calls
    ]  # a failed call's follower still runs
    for c in calls:
        start, _ = sent[id(c)]
        assert start - t0 >= c.arrival - 0.005
        if c.after is not None:
            assert start >= sent[id(calls[c.after])][1] + c.think - 0.005


def test_replay_is_bounded_in_time():
    calls = compound_workload(["a"], documents=2, rate=1000.0, context_tokens=256)

    async def send(call):
        await asyncio.sleep(10)

    results = asyncio.run(replay(calls, send, timeout=0.1))
    assert all(isinstance(r, TimeoutError) for r in results)
