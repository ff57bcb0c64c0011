"""The compute thread (service/dataplane/compute.py): an expensive predict runs beside
the gevent loop, which goes on serving meanwhile; a cheap one stays on the loop."""

from __future__ import annotations

import sys
import threading
import time

import gevent
import numpy as np
import pytest

from service.dataplane.batching import Batcher
from service.dataplane.compute import OFFLOAD_MS, SWITCH_S, Compute


def slow_predict(rows: np.ndarray, seconds: float = 0.3):
    """A predict that holds the CPU without the GIL (as NumPy or a tree's C loop does)."""
    time.sleep(seconds)  # the unpatched sleep: releases the GIL, never yields to gevent
    return rows[:, 0].tolist(), None


def test_an_expensive_predict_leaves_the_loop_free_to_serve_others():
    compute, ticks = Compute(), []

    def other_requests():
        for _ in range(10):
            ticks.append(time.monotonic())
            gevent.sleep(0.01)

    try:
        started = time.monotonic()
        other = gevent.spawn(other_requests)
        labels, _ = compute.run(OFFLOAD_MS, slow_predict, np.array([[1.0], [2.0]]))
        done = time.monotonic()
        other.join()
    finally:
        compute.close()
    assert labels == [1.0, 2.0]
    assert len([t for t in ticks if started <= t < done]) >= 5, "the loop ran while the model computed"
    # A model whose Python holds the GIL hands it to the loop every SWITCH_S, not every 5 ms.
    assert sys.getswitchinterval() <= SWITCH_S


def test_a_cheap_predict_runs_on_the_loop_and_errors_reach_the_caller_either_way():
    compute = Compute()
    try:
        assert compute.run(OFFLOAD_MS / 10, lambda: threading.current_thread().name) == threading.current_thread().name

        def boom():
            raise ValueError("the model refused these rows")

        for cost in (0.0, OFFLOAD_MS):
            with pytest.raises(ValueError, match="refused"):
                compute.run(cost, boom)
    finally:
        compute.close()


def test_callers_arriving_while_a_batch_computes_beside_the_loop_join_the_next_one():
    compute, calls = Compute(), []

    def predict(rows):
        calls.append(len(rows))
        return compute.run(OFFLOAD_MS, slow_predict, rows, 0.1)

    batcher = Batcher(predict, max_rows=64, max_wait_s=0.001, observe=lambda req, rows: None)
    try:
        first = gevent.spawn(batcher.predict, np.array([[0.0]]))
        later = []
        for i in range(1, 6):  # one every 10 ms while the first batch computes (the loop idles)
            gevent.sleep(0.01)
            later.append(gevent.spawn(batcher.predict, np.array([[float(i)]])))
        gevent.joinall([first, *later], raise_error=True)
    finally:
        compute.close()
    assert calls == [1, 5], "the five that came during the first batch share the second"
    assert [job.value[0] for job in later] == [[float(i)] for i in range(1, 6)]
