"""Calls to a Redis that may go away, for the tiers that systems share through Redis (kvshare's
prefix cache, the gateway's response cache and token buckets): while Redis is down they serve
from process memory, log one warning per outage, and leave Redis alone for a back-off."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["FAILED", "RedisLink"]

FAILED = object()
"""What :meth:`RedisLink.call` returns when Redis did not do the operation."""


class RedisLink:
    """A Redis client and the state of its outages.

    :meth:`call` runs ``op(client)`` and returns its result, or :data:`FAILED` when Redis is
    down, backing off, or refused the operation: it never raises a Redis error. When Redis
    cannot be reached, `log` gets one warning naming `what` the link serves and what
    serves instead (`fallback`), and no call reaches Redis for `retry_s` seconds, doubling up
    to `max_retry_s` while the outage lasts; the first call that succeeds again logs that
    Redis is back. A refused operation (e.g. out of memory) is logged and counted, but is no
    outage. `errors` and `outages` count both, for metrics. Thread-safe.
    """

    def __init__(
        self,
        url: str | None,
        *,
        what: str,
        fallback: str,
        log: logging.Logger,
        client: Any = None,
        timeout_s: float = 0.25,
        retry_s: float = 1.0,
        max_retry_s: float = 30.0,
        extra: str = "gateway",
    ) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise ImportError(
                f"{what} needs the redis package: pip install 'datahall[{extra}]'"
            ) from None
        if client is None and url is None:
            raise ValueError("give the Redis url (redis://host:port/db) or a client")
        self.url = url or repr(client)
        # one retry absorbs a pooled socket that died with a restarted server; longer outages
        # are this class's back-off, not the client's
        self.client = client or redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
        )
        self.what, self.fallback, self.log = what, fallback, log
        self.retry_s, self.max_retry_s = retry_s, max_retry_s
        self._outage = (redis.ConnectionError, redis.TimeoutError, OSError)
        self._refused = redis.RedisError
        self._lock = threading.Lock()
        self._backoff = retry_s
        self._down_until = 0.0
        self._down_since: float | None = None
        self.errors = 0
        self.outages = 0

    @property
    def available(self) -> bool:
        """False from the start of an outage until a call succeeds again."""
        return self._down_since is None

    def call(self, op: Callable[[Any], Any]) -> Any:
        """``op(client)``, or :data:`FAILED` when Redis is down, backing off, or refused it."""
        with self._lock:
            if time.monotonic() < self._down_until:
                return FAILED
        try:
            result = op(self.client)
        except self._outage as e:
            with self._lock:
                now = time.monotonic()
                self.errors += 1
                if self._down_since is None:
                    self._down_since = now
                    self.outages += 1
                    self.log.warning(
                        "Redis at %s is unavailable for %s (%s); %s until it is back "
                        "(next try in %.3g s)",
                        self.url,
                        self.what,
                        e,
                        self.fallback,
                        self._backoff,
                    )
                self._down_until = now + self._backoff
                self._backoff = min(self._backoff * 2, self.max_retry_s)
            return FAILED
        except self._refused as e:
            with self._lock:
                self.errors += 1
            self.log.warning("Redis at %s refused an operation for %s: %s", self.url, self.what, e)
            return FAILED
        with self._lock:
            if self._down_since is not None:
                self.log.warning(
                    "Redis at %s is back after %.1f s, for %s",
                    self.url,
                    time.monotonic() - self._down_since,
                    self.what,
                )
                self._down_since, self._down_until, self._backoff = None, 0.0, self.retry_s
        return result
