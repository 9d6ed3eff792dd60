"""The compound-AI workload: seeded, every document read by every agent, Poisson arrivals."""

import statistics

import pytest

from datahall.kvshare.workload import compound_workload

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
