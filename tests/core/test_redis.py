"""RedisLink: failed calls return FAILED, one warning per outage, a back-off, recovery."""

import logging

import pytest

from datahall.core.redis import FAILED, RedisLink

redis = pytest.importorskip("redis")
log = logging.getLogger("tests.core.redis")


def make_link(retry_s):
    return RedisLink(
        None, what="the tests", fallback="memory serves", log=log, client="fake", retry_s=retry_s
    )


def down(client):
    raise redis.ConnectionError("refused")


def test_an_outage_is_logged_once_and_redis_is_left_alone_for_the_back_off(caplog):
    calls = []
    link = make_link(retry_s=60.0)
    with caplog.at_level(logging.WARNING, logger=log.name):
        assert link.call(down) is FAILED
        assert link.call(calls.append) is FAILED  # backing off: the call never reaches Redis
    assert calls == [] and not link.available
    assert (link.errors, link.outages) == (1, 1)
    assert [r.getMessage() for r in caplog.records] == [
        "Redis at 'fake' is unavailable for the tests (refused); memory serves until it is "
        "back (next try in 60 s)"
    ]


def test_a_refused_operation_is_no_outage_and_a_success_ends_one(caplog):
    link = make_link(retry_s=0.0)

    def refused(client):
        raise redis.ResponseError("OOM command not allowed")

    with caplog.at_level(logging.WARNING, logger=log.name):
        assert link.call(refused) is FAILED
        assert link.available and (link.errors, link.outages) == (1, 0)
        assert link.call(down) is FAILED and not link.available
        assert link.call(lambda client: f"{client} answers") == "fake answers"
    assert link.available and (link.errors, link.outages) == (2, 1)
    assert caplog.records[-1].getMessage().startswith("Redis at 'fake' is back after ")
