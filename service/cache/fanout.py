"""Calls side by side with one time budget: the Redis Cluster cache asks its nodes in
parallel (service.cache.results), and a request waits on the slowest node at most the budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")

_threads: ThreadPoolExecutor | None = None

# A Redis Cluster lookup or store across nodes waits at most this many SERVICE_REDIS_TIMEOUT_MS.
FANOUT_TIMEOUTS = 10


def in_parallel(calls: Sequence[Callable[[], T]], timeout_s: float | None = None) -> list[T | None]:
    """Run calls (which must not raise) side by side: greenlets under gevent's
    monkey-patching (the replicas), else a small thread pool. One call runs inline.

    With `timeout_s`, a call that has not finished by then is given up: None in its place
    (a greenlet is killed, and redis-py drops the connection it was using; a thread is
    left to finish on its own). Each Redis operation has its socket timeouts, but a
    request must not wait on the sum of whatever else can stall (a connection's set-up,
    name resolution, a pool): this bounds the whole fan-out."""
    global _threads
    if len(calls) == 1 and timeout_s is None:
        return [calls[0]()]
    try:
        from gevent import monkey

        patched = monkey.is_module_patched("socket")
    except ImportError:
        patched = False
    if patched:
        import gevent

        jobs = [gevent.spawn(call) for call in calls]
        gevent.joinall(jobs, timeout=timeout_s)
        for job in jobs:
            if not job.ready():
                job.kill(block=False)  # a greenlet of ours, past the budget
        return [job.value if job.successful() else None for job in jobs]
    if _threads is None:
        _threads = ThreadPoolExecutor(max_workers=16, thread_name_prefix="cache-node")
    futures = [_threads.submit(call) for call in calls]
    done, _ = wait(futures, timeout=timeout_s)
    return [future.result() if future in done else None for future in futures]
