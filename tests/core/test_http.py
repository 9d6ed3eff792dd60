"""unless_disconnected: the work's result, or its cancellation when the client goes first."""

import asyncio

import pytest

from datahall.core.http import ClientDisconnected, unless_disconnected


def channel(*messages):
    """An ASGI receive channel: `messages` one by one, 10 ms apart, then nothing ever."""
    queue = list(messages)

    async def receive():
        await asyncio.sleep(0.01)
        if not queue:
            await asyncio.Event().wait()
        return queue.pop(0)

    return receive


def test_the_result_of_work_that_ends_first():
    async def work():
        return "answer"

    assert asyncio.run(unless_disconnected(work(), channel())) == "answer"


def test_a_disconnect_cancels_the_work():
    cancelled = []

    async def work():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    receive = channel({"type": "http.request"}, {"type": "http.disconnect"})
    with pytest.raises(ClientDisconnected):
        asyncio.run(asyncio.wait_for(unless_disconnected(work(), receive), 5))
    assert cancelled == [True]


def test_the_error_of_the_work_is_raised():
    async def work():
        raise ValueError("the engine failed")

    with pytest.raises(ValueError, match="engine failed"):
        asyncio.run(unless_disconnected(work(), channel()))
