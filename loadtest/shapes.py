"""Load shapes for Locust. Pick one with LOAD_SHAPE and add this file to -f:

    LOAD_SHAPE=step locust -f loadtest/locustfile.py,loadtest/shapes.py --headless --host ...
    LOAD_SHAPE=spike SPIKE_USERS=200 locust -f loadtest/locustfile.py,loadtest/shapes.py ...

step: STEP_USERS more users every STEP_SECONDS, STEPS times, then stop.
spike: SPIKE_BASE_USERS users, jumping to SPIKE_USERS at SPIKE_AT_S for SPIKE_LENGTH_S,
then back, stopping at SHAPE_DURATION_S.
"""

from __future__ import annotations

import os

from locust import LoadTestShape


def _number(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


class StepLoadShape(LoadTestShape):
    """Users rise in equal steps: where does latency start to climb?"""

    abstract = os.environ.get("LOAD_SHAPE", "step") != "step"

    def tick(self) -> tuple[int, float] | None:
        """(users, spawn rate) now, or None to stop."""
        step_users, step_s, steps = _number("STEP_USERS", 8), _number("STEP_SECONDS", 10), _number("STEPS", 6)
        step = int(self.get_run_time() // step_s)
        if step >= steps:
            return None
        return int(step_users * (step + 1)), step_users


class SpikeShape(LoadTestShape):
    """A steady load with one sudden spike: does the cluster recover, and how fast?"""

    abstract = os.environ.get("LOAD_SHAPE") != "spike"

    def tick(self) -> tuple[int, float] | None:
        """(users, spawn rate) now, or None to stop."""
        base, peak = int(_number("SPIKE_BASE_USERS", 8)), int(_number("SPIKE_USERS", 128))
        at, length, duration = _number("SPIKE_AT_S", 10), _number("SPIKE_LENGTH_S", 10), _number("SHAPE_DURATION_S", 40)
        now = self.get_run_time()
        if now >= duration:
            return None
        if at <= now < at + length:
            return peak, float(peak)
        return base, float(peak)
