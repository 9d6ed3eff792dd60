"""Fixtures shared by the gateway's tests."""

import pytest


class FakeClock:
    """A clock the test moves by hand: calling it gives `now`, in seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock at 0 s, for the breakers, buckets, weights and caches that take one; a
    test sets or advances ``clock.now``."""
    return FakeClock()
