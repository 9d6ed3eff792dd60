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
the store still holds it. With ``pipeline=True`` the agents of a document run as a chain
instead, as in an agent pipeline that hands each agent the same input after the previous one
answered: the first agent's call arrives when the document opens, each next one a think time
after the previous answer. :func:`replay` sends a workload's calls at their times, with any
client.

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

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .tasks import Count, Example, Task, build_task

__all__ = ["Call", "compound_workload", "replay"]

T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """One agent's request: `agent` (the variant), its question `example` about the shared
    `document`, the `task` that scores the answer, and the `arrival` time (s from the start).
    A call with `after` set (the index of another call in the workload) is sent `think`
    seconds after that call's answer, and not before `arrival`."""

    agent: str
    example: Example
    task: Task
    arrival: float
    document: int
    after: int | None = None
    think: float = 0.0


def compound_workload(
    agents: Sequence[str],
    *,
    documents: int,
    rate: float,
    spread: float = 1.0,
    context_tokens: int = 1024,
    count_tokens: Count | None = None,
    seed: int = 0,
    pipeline: bool = False,
    questions: int = 1,
) -> list[Call]:
    """``documents`` shared documents, each asked one question by every agent, as calls sorted
    by arrival: documents open as a seeded Poisson process (``rate`` calls per second overall,
    so ``rate / (len(agents) * questions)`` documents per second) and each agent calls an exponential delay
    of mean ``spread`` seconds after its document opened. With ``pipeline`` the agents of a
    document call in the order given instead: the first when the document opens, each next
    one (``after`` the previous) an exponential think time of mean ``spread`` after the
    previous answer. With ``questions`` > 1 every agent asks that many questions of each
    document, in rounds (all agents' first question, then all agents' second, ...): a
    follow-up turn over the same context, which also gives same-variant prefix hits.

    Raises ValueError for no agents, more agents than a document has questions, or a
    non-positive rate."""
    if not agents:
        raise ValueError("the workload needs at least one agent (a variant name)")
    if rate <= 0 or spread <= 0 or documents < 1 or questions < 1:
        raise ValueError(
            "rate, spread, documents and questions must be positive, got "
            f"{rate=}, {spread=}, {documents=}, {questions=}"
        )
    asks = [agent for _ in range(questions) for agent in agents]  # in rounds
    full: list[list[Example]] = []
    for factor in (2, 4, 8):  # ask for more questions until enough documents have one per agent
        try:
            task = build_task(
                "docs-qa",
                documents * len(asks) * factor,
                seed=seed,
                context_tokens=context_tokens,
                count_tokens=count_tokens,
            )
        except ValueError:  # the eval split has no more questions at this context length
            break
        by_document: dict[str, list[Example]] = {}
        for example in task.examples:
            by_document.setdefault(example.context, []).append(example)
        full = [qs for qs in by_document.values() if len(qs) >= len(asks)][:documents]
        if len(full) == documents:
            break
    if len(full) < documents:
        raise ValueError(
            f"only {len(full)} documents have {len(asks)} questions at "
            f"context_tokens={context_tokens}; use fewer agents, questions or documents"
        )
    rng = random.Random(f"datahall.kvshare.workload:{seed}")
    calls: list[Call] = []
    opened = 0.0
    for d, asked in enumerate(full):
        opened += rng.expovariate(rate / len(asks))
        for i, (agent, example) in enumerate(zip(asks, asked, strict=False)):
            delay = rng.expovariate(1 / spread)
            if not pipeline:
                calls.append(Call(agent, example, task, opened + delay, d))
            elif i == 0:
                calls.append(Call(agent, example, task, opened, d))
            else:  # documents open in order, so the list stays sorted by arrival
                calls.append(Call(agent, example, task, opened, d, len(calls) - 1, delay))
    return calls if pipeline else sorted(calls, key=lambda c: c.arrival)


async def replay(
    calls: Sequence[Call],
    send: Callable[[Call], Awaitable[T]],
    *,
    timeout: float | None = None,
) -> list[T | BaseException]:
    """Send every call with ``await send(call)`` at its time, measured from now (a call with
    ``after`` also waits for that call's answer and its think time, even when that call
    failed), concurrently; the results in the calls' order, an exception in place of a call
    that raised. Calls still unsent or unanswered after ``timeout`` seconds are cancelled and
    get :class:`TimeoutError`, so a run is bounded in time."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: list[asyncio.Task] = []

    async def one(call: Call) -> T:
        if call.after is not None:
            await asyncio.wait([tasks[call.after]])
            await asyncio.sleep(call.think)
        await asyncio.sleep(start + call.arrival - loop.time())
        return await send(call)

    for call in calls:
        if call.after is not None and not 0 <= call.after < len(tasks):
            raise ValueError(f"a call follows call {call.after}, which does not come before it")
        tasks.append(asyncio.ensure_future(one(call)))
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    out: list[T | BaseException] = []
    for task in tasks:
        if task in pending:
            out.append(TimeoutError(f"no answer within the run's {timeout} s"))
        else:
            out.append(task.exception() or task.result())
    return out
