"""Prometheus metrics for one replica, aggregated over its workers in multiprocess mode.

In multiprocess mode (PROMETHEUS_MULTIPROC_DIR set before prometheus_client is
imported, by gunicorn.conf.py) every worker writes its samples to files in that folder
and /metrics merges them; gunicorn's child_exit hook marks dead workers. Without it,
samples live in this object's own registry (tests, a single process).

Writing a sample to its file takes a lock and an mmap write: with about ten samples a
request, a profile put 10 % of a worker's CPU there. So a worker keeps its increments
in memory and writes them every FLUSH_S (and before it renders /metrics, and at exit):
a scrape sees the other workers' counts up to FLUSH_S late, and a worker killed
outright loses at most that much of its counts.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from typing import Any

import gevent
from gevent import monkey
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector

FLUSH_S = 1.0


class PendingWrites:
    """The samples of this worker with increments not yet written to their files."""

    def __init__(self) -> None:
        self.dirty: list[Any] = []
        self.before_flush: Callable[[], None] = lambda: None
        # A real lock (an OS thread, the model loader, may count too), held only to swap lists.
        self._lock = monkey.get_original("_thread", "allocate_lock")()
        self._flusher = gevent.spawn(self._flush_every, FLUSH_S)  # runs once the worker serves

    def add(self, value: Any) -> None:
        with self._lock:
            self.dirty.append(value)

    def flush(self) -> None:
        """Write every pending increment to its file."""
        self.before_flush()
        with self._lock:
            dirty, self.dirty = self.dirty, []
        for value in dirty:
            value.write_pending()

    def _flush_every(self, seconds: float) -> None:
        while True:
            gevent.sleep(seconds)
            self.flush()


def buffered_value_class(pending: PendingWrites) -> type:
    """prometheus_client's multiprocess value, with increments held until `pending` flushes."""
    # The class prometheus_client chose at import when it is the multiprocess one: a second
    # MultiProcessValue() would map the same files again, and two maps of a file corrupt it.
    current: Any = values.ValueClass
    base: Any = getattr(current, "unbuffered", current)
    if not getattr(base, "_multiprocess", False):
        base = values.MultiProcessValue()

    class BufferedValue(base):  # type: ignore[misc, valid-type]
        unbuffered = base

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._pending = 0.0
            self._queued = False
            super().__init__(*args, **kwargs)

        def inc(self, amount: float) -> None:
            self._pending += amount
            if not self._queued:
                self._queued = True
                pending.add(self)

        def write_pending(self) -> None:
            self._queued = False
            amount, self._pending = self._pending, 0.0
            if amount:
                base.inc(self, amount)

        def set(self, value: float, timestamp: float | None = None) -> None:
            self._pending = 0.0
            base.set(self, value, timestamp)

        def get(self) -> float:
            return float(base.get(self)) + self._pending

    return BufferedValue


LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The service's metrics; one instance per app."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, multiprocess_dir: str = "") -> None:
        self._multiprocess_dir = multiprocess_dir
        self._pending: PendingWrites | None = None
        if multiprocess_dir:
            # Every sample created from here on in this worker holds its increments.
            self._pending = PendingWrites()
            values.ValueClass = buffered_value_class(self._pending)
            atexit.register(self._pending.flush)
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "prediction_http_requests",
            "HTTP requests answered, by model, route and status.",
            ["model", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "prediction_http_request_duration_seconds",
            "Time from request received to response ready, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.in_flight = Gauge(
            "prediction_http_requests_in_flight",
            "Requests being handled now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.inference = Histogram(
            "prediction_inference_duration_seconds",
            "Time spent in the model's predict call, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.inference_rows = Histogram(
            "prediction_inference_batch_rows",
            "Rows per predict call, by model.",
            ["model"],
            buckets=ROWS_BUCKETS,
            registry=registry,
        )
        self.batch_requests = Histogram(
            "prediction_batch_requests",
            "Requests that shared one batched predict call, by model.",
            ["model"],
            buckets=ROWS_BUCKETS,
            registry=registry,
        )
        self.cache_rows = Counter(
            "prediction_cache_rows",
            "Rows looked up in the result cache, by outcome.",
            ["model", "result"],
            registry=registry,
        )
        self.breaker_open = Gauge(
            "prediction_cache_breaker_open",
            "1 while a worker's result-cache breaker is open (Redis failing: requests bypass it).",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.breaker_openings = Counter(
            "prediction_cache_breaker_openings",
            "Times a worker's result-cache breaker opened.",
            registry=registry,
        )
        self.predictions = Counter(
            "prediction_model_version_requests",
            "Prediction requests answered, by model and the version that answered.",
            ["model", "version"],
            registry=registry,
        )
        self.cache_undecodable = Counter(
            "prediction_cache_undecodable",
            "Cached rows whose value no replica wrote (undecodable or the wrong shape): a miss, overwritten.",
            ["model"],
            registry=registry,
        )
        self.repository_record_ok = Gauge(
            "prediction_repository_record_ok",
            "1 while the desired-state record a worker last read was good and current; 0 while it was missing, "
            "malformed or older (the worker serves what it has and writes its state back).",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.repository_restores = Counter(
            "prediction_repository_restores",
            "Times a worker wrote its last good desired state back over a missing, malformed or older record.",
            registry=registry,
        )
        self.repository_converger_failures = Counter(
            "prediction_repository_converger_failures",
            "Times a worker's model loader or converger loop failed unexpectedly and was restarted.",
            ["loop"],
            registry=registry,
        )
        # What a benchmark from outside reads per replica (loadtest.remote): its CPU.
        self.cpu = Counter(
            "prediction_worker_cpu_seconds",
            "CPU time (user + system) of this replica's workers, counted every FLUSH_S and at each scrape.",
            registry=registry,
        )
        # Admission (service.dataplane.admission): the wait before a prediction started, and
        # the predictions refused before any work (shed: the queue; dropped: a deadline
        # passed or the client hung up).
        self.queue_wait = Histogram(
            "prediction_queue_wait_seconds",
            "Time a prediction waited in the replica's queue (since the balancer's X-Request-Start).",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.not_admitted = Counter(
            "prediction_requests_not_admitted",
            "Predictions refused before any work: reason overloaded (shed, 429), deadline (504), client_gone.",
            ["reason"],
            registry=registry,
        )
        self._cpu_counted = _cpu_seconds()
        if self._pending is not None:
            self._pending.before_flush = self.count_cpu
        self._version_children: dict[tuple[str, str], Counter] = {}
        self._cache_children: dict[tuple[str, str], Counter] = {}
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe_inference(self, model: str, rows: int, seconds: float) -> None:
        """Record one predict call."""
        self.inference.labels(model).observe(seconds)
        self.inference_rows.labels(model).observe(rows)

    def observe_batch(self, model: str, requests: int) -> None:
        """Record how many requests one batched predict call served."""
        self.batch_requests.labels(model).observe(requests)

    def count_cache(self, model: str, result: str, rows: int) -> None:
        """Count rows that hit, missed or bypassed the cache."""
        if rows:
            child = self._cache_children.get((model, result))
            if child is None:
                child = self._cache_children[(model, result)] = self.cache_rows.labels(model, result.lower())
            child.inc(rows)

    def count_version(self, model: str, version: str) -> None:
        """Count one prediction request answered by this version."""
        child = self._version_children.get((model, version))
        if child is None:
            child = self._version_children[(model, version)] = self.predictions.labels(model, version)
        child.inc()

    def repository_record_read(self, ok: bool) -> None:
        """The converger read the desired-state record: good and current, or not."""
        self.repository_record_ok.set(1 if ok else 0)

    def breaker_changed(self, is_open: bool) -> None:
        """The result cache's breaker opened or closed."""
        self.breaker_open.set(1 if is_open else 0)
        if is_open:
            self.breaker_openings.inc()

    def observe_request(self, model: str, route: str, status: int, seconds: float) -> None:
        """Record one answered HTTP request."""
        key = (model, route, status)
        children = self._request_children.get(key)
        if children is None:  # resolving labels costs more than the increment: do it once
            children = (self.requests.labels(model, route, str(status)), self.latency.labels(route))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def count_cpu(self) -> None:
        """Add this worker's CPU time since the last count."""
        now = _cpu_seconds()
        self.cpu.inc(max(0.0, now - self._cpu_counted))
        self._cpu_counted = now

    def render(self) -> bytes:
        """The Prometheus text exposition of every worker of this replica."""
        if self._pending is None:
            self.count_cpu()
        if self._multiprocess_dir:
            if self._pending is not None:
                self._pending.flush()  # this worker's counts are exact; the others' up to FLUSH_S late
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self._multiprocess_dir)
            return generate_latest(registry)
        return generate_latest(self.registry)


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system
