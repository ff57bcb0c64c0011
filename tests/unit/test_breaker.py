"""The circuit breaker, driven by a fake clock."""

import pytest

from service.cache.breaker import CircuitBreaker


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_breaker_opens_probes_once_and_closes():
    clock = FakeClock()
    breaker = CircuitBreaker(1.0, 4.0, clock)
    assert breaker.allow() and not breaker.is_open
    breaker.record_failure()
    assert breaker.is_open and not breaker.allow()
    clock.now += 1.0
    assert breaker.allow(), "after the back-off one caller probes"
    assert not breaker.allow(), "only one probe at a time"
    breaker.record_success()
    assert not breaker.is_open and breaker.allow()


def test_backoff_doubles_up_to_the_ceiling_and_resets():
    clock = FakeClock()
    breaker = CircuitBreaker(1.0, 4.0, clock)
    waits = []
    for _ in range(5):
        breaker.allow()
        breaker.record_failure()
        start = clock.now
        while not breaker.allow():
            clock.now += 0.25
        waits.append(clock.now - start)
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0]
    breaker.record_success()
    breaker.record_failure()
    clock.now += 1.0
    assert breaker.allow()


def test_it_tells_when_it_opens_and_closes_only():
    clock = FakeClock()
    changes = []
    breaker = CircuitBreaker(1.0, 4.0, clock, on_change=changes.append)
    breaker.record_success()
    breaker.record_failure()
    clock.now += 1.0
    breaker.allow()
    breaker.record_failure()  # a failed probe: still open, not a new opening
    clock.now += 2.0
    breaker.allow()
    breaker.record_success()
    breaker.record_success()
    assert changes == [True, False]


@pytest.mark.parametrize(
    "url", ["redis+cluster://127.0.0.1:9,127.0.0.1:10", "redis+sentinel://127.0.0.1:9/name/0", "redis://127.0.0.1:9/0"]
)
def test_an_unreachable_redis_of_any_topology_is_bypassed_never_raised(url):
    from service.cache.results import open_result_cache

    changes = []
    cache = open_result_cache(
        url, ttl_s=5, timeout_ms=100, max_connections=2, backoff_s=60, max_backoff_s=60, on_change=changes.append
    )
    assert cache.get_many(["a", "b"]) is None
    cache.set_many([("a", b"1")])
    assert cache.round_trip_ms() is None
    assert changes == [True], "one opening, then the breaker bypasses without trying again"
