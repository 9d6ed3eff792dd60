"""The compound-AI workload of DroidSpeak serving: several agents, each a fine-tuned variant
of one base, asking their own questions about the same long documents, arriving as a Poisson
process.

DroidSpeak's serving case (brief §1, §2.5) is a pipeline of specialised agents reading one
shared context: the context's KV cache made by whichever agent read it first can serve the
others. Here the documents are the ``docs-qa`` task's pydoc contexts (eval split, so no variant
trained on them) and each document's questions go to the agents in turn, so every document is
read by several variants. Documents open as a seeded Poisson process and each agent calls a
random delay after its document opened, so the agents of one document overlap in time, as in
a pipeline of agents handed the same input, and a later agent finds an earlier one's cache if
the store still holds it.

>>> from datahall.kvshare.tasks import approx_tokens
>>> calls = compound_workload(["a", "b"], documents=2, rate=4.0, context_tokens=256)
>>> len(calls), sorted({c.agent for c in calls})
(4, ['a', 'b'])
>>> all(x.arrival <= y.arrival for x, y in zip(calls, calls[1:]))
True
>>> len({c.example.context for c in calls})
2
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from .tasks import Count, Example, Task, build_task

__all__ = ["Call", "compound_workload"]


@dataclass(frozen=True)
class Call:
    """One agent's request: `agent` (the variant), its question `example` about the shared
    document, the `task` that scores the answer, and the `arrival` time (s from the start)."""

    agent: str
    example: Example
    task: Task
    arrival: float
    document: int


def compound_workload(
    agents: Sequence[str],
    *,
    documents: int,
    rate: float,
    spread: float = 1.0,
    context_tokens: int = 1024,
    count_tokens: Count | None = None,
    seed: int = 0,
) -> list[Call]:
    """``documents`` shared documents, each asked one question by every agent, as calls sorted
    by arrival: documents open as a seeded Poisson process (``rate`` calls per second overall,
    so ``rate / len(agents)`` documents per second) and each agent calls an exponential delay
    of mean ``spread`` seconds after its document opened.

    Raises ValueError for no agents, more agents than a document has questions, or a
    non-positive rate."""
    if not agents:
        raise ValueError("the workload needs at least one agent (a variant name)")
    if rate <= 0 or spread <= 0 or documents < 1:
        raise ValueError(
            f"rate, spread and documents must be positive, got {rate=}, {spread=}, {documents=}"
        )
    full: list[list[Example]] = []
    for factor in (2, 4, 8):  # ask for more questions until enough documents have one per agent
        try:
            task = build_task(
                "docs-qa",
                documents * len(agents) * factor,
                seed=seed,
                context_tokens=context_tokens,
                count_tokens=count_tokens,
            )
        except ValueError:  # the eval split has no more questions at this context length
            break
        by_document: dict[str, list[Example]] = {}
        for example in task.examples:
            by_document.setdefault(example.context, []).append(example)
        full = [qs for qs in by_document.values() if len(qs) >= len(agents)][:documents]
        if len(full) == documents:
            break
    if len(full) < documents:
        raise ValueError(
            f"only {len(full)} documents have {len(agents)} questions at "
            f"context_tokens={context_tokens}; use fewer agents or documents"
        )
    rng = random.Random(f"datahall.kvshare.workload:{seed}")
    calls, opened = [], 0.0
    for d, questions in enumerate(full):
        opened += rng.expovariate(rate / len(agents))
        for agent, example in zip(agents, questions, strict=False):
            calls.append(Call(agent, example, task, opened + rng.expovariate(1 / spread), d))
    return sorted(calls, key=lambda c: c.arrival)
