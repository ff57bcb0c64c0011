"""Where a prediction is computed: on the worker's loop, or beside it in one native thread.

A gevent worker serves its requests on one loop. A predict that holds the CPU for
milliseconds (a forest through scikit-learn: 7-15 ms) holds that loop too: while it
runs no request is read, none refused, none answered. Past capacity a replica then
refuses (service.dataplane.admission) only after the refused request waited behind all
the work admitted before it, and its client hears "back off" as late as an answer.

A predict that costs at least OFFLOAD_MS (measured when the model loaded:
LoadedModel.predict_ms) runs in the worker's compute thread instead, and the calling
greenlet waits for it as for I/O. One thread: predictions still run one at a time, as
the admission's service time assumes and as they did on the loop (a second thread would
only contend for the GIL). Meanwhile the loop reads requests, refuses what it cannot
start in time, answers what was computed and talks to Redis: NumPy, scikit-learn's
tree code and ONNX Runtime release the GIL while they compute, and where a model's
Python holds it, Python hands it to the loop every SWITCH_S (the process's switch
interval, 5 ms by default, lowered when the thread is made): past capacity at 3x, a
refusal's p50 went from 30 to 18 ms with it (4 replicas of the digits forest through
scikit-learn, 2 cores; the compute thread's throughput was unchanged within the noise). A cheaper
predict (ONNX Runtime's 0.01 ms) stays on the loop: handing it over costs more than it.

The thread runs only the model's own `predict` (pure computation: no gevent object, no
metric, no log), and is made on first use, in the worker (never in gunicorn's master).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

from gevent.threadpool import ThreadPool

# A predict at least this long (one row, measured at load) is computed off the loop. A
# hand-over costs 0.05-0.1 ms of the worker's CPU; below 1 ms the loop is held briefly.
OFFLOAD_MS = 1.0
# How long the compute thread may hold the GIL while the loop waits for it (seconds).
SWITCH_S = 0.0005

T = TypeVar("T")


class Compute:
    """One worker's compute thread (made on first use, in the process that uses it)."""

    def __init__(self) -> None:
        self._pool: ThreadPool | None = None
        self._pid = 0

    def run(self, predict_ms: float, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)`: in the compute thread when `predict_ms` (its measured cost) is at
        least OFFLOAD_MS, else here. Its exception is raised here either way."""
        if predict_ms < OFFLOAD_MS:
            return fn(*args)
        if self._pool is None or self._pid != os.getpid():
            self._pool, self._pid = ThreadPool(1), os.getpid()
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_S))
        return self._pool.apply(fn, args)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the thread (a worker that exits; tests)."""
        if self._pool is not None:
            self._pool.kill()
            self._pool = None
