"""Shared result cache: per-row keys in Redis, one round trip each way, a circuit breaker.

A request's rows are looked up with one MGET; rows that were missing are written back
in one pipelined batch of SETs with a TTL. When Redis fails or is slow the breaker
opens and requests bypass the cache at once, instead of each paying a timeout; after
a back-off one request probes Redis, and caching resumes when the probe succeeds.
This module knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)


def row_keys(prefix: str, model: str, version: str, rows: np.ndarray) -> list[str]:
    """One key per row: model, version and a hash of the row's canonical float64 bytes."""
    # Adding 0.0 turns -0.0 into 0.0, and little-endian float64 makes the bytes (so the
    # key) the same on every replica for numbers that compare equal.
    canonical = np.ascontiguousarray(rows, dtype="<f8") + 0.0
    head = f"{prefix}:{model}:{version}:"
    return [head + hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in canonical]


class CircuitBreaker:
    """Closed → open on failure → one probe after a doubling back-off → closed on success.
    `on_change(is_open)` is told when it opens and when it closes again (metrics)."""

    def __init__(
        self,
        backoff_s: float,
        max_backoff_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._on_change = on_change or (lambda is_open: None)
        self._base_backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._clock = clock
        self._backoff_s = backoff_s
        self._open_until: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        """True while calls are being refused or one probe is under way."""
        return self._open_until is not None

    def allow(self) -> bool:
        """Whether a call may go to the protected service now."""
        if self._open_until is None:
            return True
        if self._probing or self._clock() < self._open_until:
            return False
        self._probing = True  # only this caller probes; the others keep bypassing
        return True

    def record_success(self) -> None:
        """A call succeeded: close."""
        if self._open_until is not None:
            log.warning("result cache reachable again; caching resumes")
            self._on_change(False)
        self._open_until = None
        self._probing = False
        self._backoff_s = self._base_backoff_s

    def record_failure(self) -> None:
        """A call failed: open for the current back-off, and double it for next time."""
        if self._open_until is None:
            log.warning("result cache unavailable; bypassing it for %.1f s", self._backoff_s)
            self._on_change(True)
        self._open_until = self._clock() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, self._max_backoff_s)
        self._probing = False


class ResultCache(Protocol):
    """What the data plane needs of a cache."""

    def get_many(self, keys: Sequence[str]) -> list[bytes | None] | None:
        """Values for keys (None where missing), or None when the cache is unavailable."""

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store values; failures are swallowed (a cache never breaks a request)."""

    def round_trip_ms(self) -> float | None:
        """Time of a trivial command, or None when the cache is unavailable."""


class RedisResultCache:
    """ResultCache on Redis with bounded timeouts and a circuit breaker."""

    def __init__(
        self,
        url: str,
        *,
        ttl_s: int,
        timeout_ms: int,
        max_connections: int,
        breaker: CircuitBreaker,
    ) -> None:
        timeout_s = timeout_ms / 1000
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # No retries: the breaker is the retry policy, and a retry doubles the wait.
            retry=Retry(NoBackoff(), 0),
            max_connections=max_connections,
            health_check_interval=0,
        )
        self._ttl_s = ttl_s
        self.breaker = breaker

    def get_many(self, keys: Sequence[str]) -> list[bytes | None] | None:
        """MGET the keys; None if the breaker is open or Redis fails."""
        if not self.breaker.allow():
            return None
        try:
            values = self._client.mget(keys)
        except (redis.RedisError, OSError) as exc:
            log.debug("cache read failed: %s", exc)
            self.breaker.record_failure()
            return None
        self.breaker.record_success()
        return cast("list[bytes | None]", values)

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """SET each item with the TTL in one pipelined round trip."""
        if not items or not self.breaker.allow():
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for key, value in items:
                pipe.set(key, value, ex=self._ttl_s)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.debug("cache write failed: %s", exc)
            self.breaker.record_failure()
            return
        self.breaker.record_success()

    def round_trip_ms(self, samples: int = 5) -> float | None:
        """Fastest of a few PINGs (what a lookup costs at least, whatever else the worker
        is doing meanwhile), or None if Redis fails."""
        if not self.breaker.allow():
            return None
        times = []
        try:
            for _ in range(samples):
                started = time.perf_counter()
                self._client.ping()
                times.append((time.perf_counter() - started) * 1000)
        except (redis.RedisError, OSError):
            self.breaker.record_failure()
            return None
        self.breaker.record_success()
        return min(times)

    def close(self) -> None:
        """Release the connection pool."""
        self._client.close()
