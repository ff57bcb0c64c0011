"""The Redis Cluster cache's fan-out waits on its slowest node at most its budget: a node
that stalls past it is given up and counted as failing, the others' answers kept."""

import subprocess
import sys
import textwrap
import time

from service.cache.breaker import CircuitBreaker
from service.cache.fanout import in_parallel
from service.cache.results import ClusterResultCache
from tests.support import ROOT


def test_threads_give_up_a_call_past_the_budget():
    started = time.monotonic()
    results = in_parallel([lambda: "fast", lambda: time.sleep(2) or "slow"], timeout_s=0.2)
    assert results == ["fast", None] and time.monotonic() - started < 1.5


def test_greenlets_give_up_and_kill_a_call_past_the_budget():
    code = textwrap.dedent(
        """
        from gevent import monkey; monkey.patch_all()
        import time, gevent
        from service.cache.fanout import in_parallel
        state = {}
        def stalls():
            try:
                gevent.sleep(5)
            except BaseException:
                state["killed"] = True
                raise
        started = time.monotonic()
        results = in_parallel([lambda: "fast", stalls], timeout_s=0.2)
        gevent.sleep(0.05)
        print(results, round(time.monotonic() - started, 1) < 1.0, state.get("killed"))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "['fast', None] True True", done.stdout + done.stderr


def test_a_stalled_node_counts_as_failing_and_the_others_answer():
    cache = ClusterResultCache(
        lambda: None,
        ttl_s=60,
        breaker=CircuitBreaker(1.0, 2.0),
        node_breaker=lambda changed, what: CircuitBreaker(1.0, 2.0, on_change=changed, what=what),
        fanout_timeout_s=0.2,
    )

    def call(name, node, slots):
        if name == "stalls:6379":
            time.sleep(2)
        return [name]

    started = time.monotonic()
    replies = cache._fan_out(call, {"answers:6379": (None, {}), "stalls:6379": (None, {})})
    assert replies == [["answers:6379"], None] and time.monotonic() - started < 1.5
    assert not cache._breaker("stalls:6379").allow() and cache._breaker("answers:6379").allow()
    assert cache._stale, "a stalled node marks the slot map for a refresh"


def test_a_cluster_that_is_slow_to_connect_costs_a_request_the_budget_then_the_breaker_bypasses():
    """Making the cluster client resolves and asks the nodes: when that stalls (container DNS
    while the nodes are recreated, redis-py's own waits), a request waits the fan-out budget,
    not the stall, and the next requests bypass the cache at once until the back-off ends."""
    calls = []

    def connect():
        calls.append(time.monotonic())
        time.sleep(2)
        raise AssertionError("never used: past the budget")

    cache = ClusterResultCache(
        connect,
        ttl_s=60,
        breaker=CircuitBreaker(1.0, 2.0),
        node_breaker=lambda changed, what: CircuitBreaker(1.0, 2.0, on_change=changed, what=what),
        fanout_timeout_s=0.2,
    )
    started = time.monotonic()
    assert cache.get_many(["pred:iris:1:a:b"]) is None
    assert time.monotonic() - started < 1.0
    again = time.monotonic()
    assert cache.get_many(["pred:iris:1:a:b"]) is None and time.monotonic() - again < 0.05
    assert len(calls) == 1, "the open breaker keeps the next request from connecting"
