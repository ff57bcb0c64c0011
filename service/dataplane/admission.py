"""Admission: a replica refuses the prediction it cannot start soon enough, before it reads
the body, rather than queueing it.

How long a request waited. The balancer stamps every request with the time it passed it
on (`X-Request-Start: t=<seconds since the epoch>`, nginx's `$msec`); a replica compares
it with its own clock when the request reaches the data plane, before the body is read.
The difference is the wait in the replica's queue: the socket, the accept queue and
gevent's run queue, where requests pile up when more arrive than the CPU serves. Same
host or clocks kept by NTP: a few milliseconds of error at most, against a target of tens.

The queue goes on inside the worker: a request admitted may wait on Redis, and meanwhile
others are admitted; they then take the CPU in turn. So the wait a request faces is its
own plus the work admitted ahead of it: the requests in flight times the service time the
worker measures (the time between completions while it is busy, a moving average; with
batching, a batch's time shared by its requests).

When to refuse: in the spirit of CoDel (Nichols and Jacobson, 2012), a standing queue,
not a burst: the queue is overloaded when the waits requests face, on average (a moving
average over the last twenty or so), are over TARGET; then a request facing more than TARGET
is refused. Not CoDel's minimum over an interval: gevent's loop (libev) takes the ready
connections of one turn newest first, so fresh requests keep passing under TARGET while
older ones wait behind them. Nor a bound on single waits when not overloaded: a request
nginx retried after another replica timed out carries its first stamp, and is served.
The door reads requests while an expensive prediction computes (service.dataplane.compute):
a request is judged as it arrives, and a refusal leaves at once rather than after the
work queued ahead of it. Not a bound on the work admitted ahead whatever the average
(tried: half or 0.8 of the objective): in a closed loop of 32 clients a moment's noise
in the service time crossed it, and refused a third of a benchmark's requests.
A replica that stalled (no request seen or finished for a second: a frozen process)
serves the backlog it finds, then judges what arrives after. The bound is the wait this
replica measures, never a count tuned to a machine: a replica with a slow model refuses at
a lower rate than one with a fast model, and both keep the wait of what they admit near
TARGET: a fifth of the latency objective (SERVICE_LATENCY_OBJECTIVE_MS), and at least one
service time as the worker measures it (a model slower than the objective allows still
serves its load). A closed-loop benchmark's standing queue stays under TARGET: 32
clients on 2 replicas of a 1 ms model average 20-30 ms, and with a tenth of the objective
as the target, a noisy moment once refused one of them.

Deadlines. A client may say how long it will wait (`X-Request-Timeout-Ms`, milliseconds
from when the balancer received the request, as Envoy's `x-envoy-upstream-rq-timeout-ms`;
relative, so no client clock is trusted). A request that waited longer is dropped with a
504, not computed: its client has stopped listening.

Pure logic, no HTTP: the fast lane (service.web.fastlane) reads the headers and answers.
"""

from __future__ import annotations

import time

from service.errors import BadRequest

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
# A stamp further away than this is not a wait (a wrong clock, a forged header): ignored.
PLAUSIBLE_WAIT_S = 300.0
LONGEST_TIMEOUT_MS = 3_600_000
RETRY_AFTER_S = 1
# The balancer's first try of a prediction carries `X-Shed-Retry: 1`: a replica that sheds
# it answers with no body and `X-Accel-Redirect: @shed_retry` (a named location in
# balancer/nginx.conf.template), and nginx tries it once on the next replica. nginx sets
# the header on every request it passes and empties it on that retry: a client can neither
# make a retry loop nor choose where nginx goes (the location is this constant).
SHED_RETRY_LOCATION = "@shed_retry"
# No request seen or finished for this long: the worker was stalled, not busy.
STALL_S = 1.0
# The weight of each request's wait in the moving average that says "overloaded".
MEAN_WEIGHT = 0.05


def waited_s(stamp: str | None, now: float | None = None) -> float:
    """Seconds since the balancer's `X-Request-Start` stamp ("t=1712345678.123", or the
    bare number); 0 when there is none or it is implausible (the request is admitted as if
    it had not waited: a stamp is advice, never a reason to refuse on its own)."""
    if not stamp:
        return 0.0
    text = stamp[2:] if stamp.startswith("t=") else stamp
    try:
        started = float(text)
    except ValueError:
        return 0.0
    wait = (time.time() if now is None else now) - started
    return wait if 0.0 < wait < PLAUSIBLE_WAIT_S else 0.0


def timeout_s(value: str | None) -> float | None:
    """The client's `X-Request-Timeout-Ms` in seconds; None without one. A malformed one is
    the client's error (400), not silently no deadline."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or not 0 < int(text) <= LONGEST_TIMEOUT_MS:
        raise BadRequest(f"{TIMEOUT_HEADER} must be a whole number of milliseconds from 1 to {LONGEST_TIMEOUT_MS}")
    return int(text) / 1000


class Admission:
    """One worker's queue discipline (a gevent worker serves one queue: its process)."""

    def __init__(self, objective_ms: float) -> None:
        self.enabled = objective_ms > 0
        self._target_s = objective_ms / 5_000
        self._interval_s = objective_ms / 4_000
        self.service_s = 0.0  # the measured time a request holds the worker
        self.in_flight = 0  # admitted, not finished
        self.mean_wait_s = 0.0  # a moving average of what requests face
        self._seen_at = self._finished_at = time.monotonic()
        self._stall_ended_at = 0.0

    @property
    def target_s(self) -> float:
        """A fifth of the objective, and never under one service time: a request that
        arrives while one is computed waits that long on an idle replica too."""
        return max(self._target_s, self.service_s)

    @property
    def interval_s(self) -> float:
        """A quarter of the objective, and never under four service times: a worker that
        neither saw nor finished a request for that long has no queue."""
        return max(self._interval_s, 4 * self.service_s)

    def overloaded(self) -> bool:
        """The requests' waits, on average, are over TARGET: a standing queue."""
        return self.mean_wait_s > self.target_s

    def facing_s(self, wait_s: float) -> float:
        """The wait a request that waited `wait_s` so far faces before it runs: its own and
        the work admitted ahead of it."""
        return wait_s + self.in_flight * self.service_s

    def refuse(self, wait_s: float, now: float | None = None) -> bool:
        """Whether a request that waited `wait_s` is refused (shed) rather than served."""
        if not self.enabled:
            return False
        now = time.monotonic() if now is None else now
        quiet_s = now - max(self._seen_at, self._finished_at)
        self._seen_at = now
        if quiet_s > self.interval_s:
            self.mean_wait_s = 0.0  # the worker neither saw nor finished a request: no queue
        if quiet_s > max(STALL_S, 2 * self.interval_s):
            # A stall (a frozen process, not a busy one): what arrived before now is its
            # backlog, served rather than judged (the balancer has given up on what it
            # would not wait for, and those are dropped as their clients hung up).
            self._stall_ended_at = now
        if now - wait_s < self._stall_ended_at:
            return False
        facing = self.facing_s(wait_s)
        refused = facing > self.target_s and self.overloaded()  # judged by the queue before it
        # One request moves the average by at most a twentieth of 2 targets: one retried after
        # a timeout elsewhere (with its first stamp) is not a standing queue.
        self.mean_wait_s += MEAN_WEIGHT * (min(facing, 2 * self.target_s) - self.mean_wait_s)
        return refused

    def started(self) -> float:
        """An admitted request starts; returns the time to pass to `finished`."""
        self.in_flight += 1
        return time.monotonic()

    def finished(self, started_at: float, now: float | None = None) -> None:
        """An admitted request is done: a sample of the service time (since it started, or
        since the previous one finished if that was later: the worker serves one at a time)."""
        now = time.monotonic() if now is None else now
        self.in_flight -= 1
        self.service_s += 0.2 * (now - max(started_at, self._finished_at) - self.service_s)
        self._finished_at = now

    def describe(self, wait_s: float) -> str:
        """The refusal's message."""
        return (
            f"overloaded: this request would wait {self.facing_s(wait_s) * 1000:.0f} ms in the replica's queue, "
            f"over its {self.target_s * 1000:.0f} ms target; retry after {RETRY_AFTER_S} s"
        )
