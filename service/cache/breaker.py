"""The circuit breaker in front of Redis: closed, open on a failure, one probe after a
doubling back-off, closed again on success. Pure logic over a clock (no I/O): the result
caches (service.cache.results) hold one per Redis server or Cluster node."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class CircuitBreaker:
    """Closed → open on failure → one probe after a doubling back-off → closed on success.
    `on_change(is_open)` is told when it opens and when it closes again (metrics)."""

    def __init__(
        self,
        backoff_s: float,
        max_backoff_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
        what: str = "result cache",
    ) -> None:
        self._on_change = on_change or (lambda is_open: None)
        self._what = what
        self._base_backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._clock = clock
        self._backoff_s = backoff_s
        self._open_until: float | None = None
        self._probing = False

    @property
    def backoff_s(self) -> float:
        """The first back-off after a failure."""
        return self._base_backoff_s

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
            log.warning("%s reachable again; caching resumes", self._what)
            self._on_change(False)
        self._open_until = None
        self._probing = False
        self._backoff_s = self._base_backoff_s

    def record_failure(self) -> None:
        """A call failed: open for the current back-off, and double it for next time."""
        if self._open_until is None:
            log.warning("%s unavailable; bypassing it for %.1f s", self._what, self._backoff_s)
            self._on_change(True)
        self._open_until = self._clock() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, self._max_backoff_s)
        self._probing = False
