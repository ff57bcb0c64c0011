"""Load shapes for Locust. Pick one with LOAD_SHAPE and add this file to -f:

    LOAD_SHAPE=step locust -f loadtest/locustfile.py,loadtest/shapes.py --headless --host ...
    LOAD_SHAPE=spike SPIKE_USERS=200 locust -f loadtest/locustfile.py,loadtest/shapes.py ...

step: STEP_USERS more users every STEP_SECONDS, STEPS times, then stop.
spike: SPIKE_BASE_USERS users, jumping to SPIKE_USERS at SPIKE_AT_S for SPIKE_LENGTH_S,
then back, stopping at SHAPE_DURATION_S.
"""

from __future__ import annotations

from locust import LoadTestShape

from loadtest.settings import ShapeSettings


class StepLoadShape(LoadTestShape):
    """Users rise in equal steps: where does latency start to climb?"""

    abstract = ShapeSettings.from_env().shape != "step"

    def tick(self) -> tuple[int, float] | None:
        """(users, spawn rate) now, or None to stop."""
        s = ShapeSettings.from_env()
        step_users, step_s, steps = s.step_users, s.step_seconds, s.steps
        step = int(self.get_run_time() // step_s)
        if step >= steps:
            return None
        return int(step_users * (step + 1)), step_users


class SpikeShape(LoadTestShape):
    """A steady load with one sudden spike: does the cluster recover, and how fast?"""

    abstract = ShapeSettings.from_env().shape != "spike"

    def tick(self) -> tuple[int, float] | None:
        """(users, spawn rate) now, or None to stop."""
        s = ShapeSettings.from_env()
        base, peak = int(s.spike_base_users), int(s.spike_users)
        at, length, duration = s.spike_at_s, s.spike_length_s, s.duration_s
        now = self.get_run_time()
        if now >= duration:
            return None
        if at <= now < at + length:
            return peak, float(peak)
        return base, float(peak)
