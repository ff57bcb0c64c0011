"""Past capacity: a cluster in the defaults, offered open loop three times what it serves,
answers what it can within the latency objective and refuses the rest, each refusal a JSON
429 with Retry-After; no connection is reset or left without an answer. Below capacity
nothing is refused.

The load is open loop (loadtest/openloop.py): each request's send time is fixed before
the run and its latency counts from then, so the generator does not slow down with the
cluster as a closed-loop tool would. The model is the digits forest through scikit-learn,
one row per call (SERVICE_RUNTIME, SERVICE_BATCHING): it stands for a user's model that
ONNX Runtime does not run, about 15 ms a request, so the cluster serves under two hundred
requests/s, three times that is well within what the generator sends on time on 2 shared
cores, and a refusal (0.2 ms of a replica's CPU) costs little beside a prediction (with a
5 ms model, churn's Pipeline, refusals took 10-25 % of the shared cores at 3x, and
goodput fell to 0.7-0.9x). Each request is a row never sent before: no cache answers it.
The bounds are generous (the generator shares the cores); the figures go to the benchmark
(make bench-overload, docs/reliability.md)."""

from __future__ import annotations

import os

import pytest

from loadtest.openloop import capacity, new_rows, open_loop

# Opt in: OVERLOAD_E2E=1 (make test-overload). In `make test` on CI's shared 2 cores the
# 2xx p99 at 3x reached 2.2 s once (0.2-0.9 s in the other runs), and a test that fails
# for the machine's noise sinks the whole run; the benchmark reports the figures.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.overload,
    pytest.mark.skipif(os.environ.get("OVERLOAD_E2E") != "1", reason="opt in with OVERLOAD_E2E=1 (make test-overload)"),
]

OBJECTIVE_S = 0.5  # SERVICE_LATENCY_OBJECTIVE_MS's default
DIGITS = "/v1/models/digits:predict"


def test_three_times_capacity_open_loop_is_served_within_the_objective_and_the_rest_refused(start_cluster):
    expensive = {"SERVICE_RUNTIME": "digits=sklearn,*=auto", "SERVICE_BATCHING": "digits=off,*=on"}
    cluster = start_cluster(4, defaults=True, **expensive)
    url, bodies = cluster.internal_url, new_rows("digits", 20_000)
    capacity(url, DIGITS, bodies[:500], clients=32, seconds=1)  # warm up: connections, the cache policy
    before = capacity(url, DIGITS, bodies[500:3_000], clients=32, seconds=4)
    below = open_loop(url, DIGITS, bodies[3_000:6_000], 0.5 * before, 5, OBJECTIVE_S).summary()
    past = open_loop(url, DIGITS, bodies[6_000:17_000], 3 * before, 8, OBJECTIVE_S).summary()
    after = capacity(url, DIGITS, bodies[17_000:], clients=32, seconds=4)
    # The machine is shared: its capacity drifts. Judged against the lower of the two
    # measurements around the overload (each a closed loop of 32 clients, as the issue's).
    measured = min(before, after)
    print({"capacity_rps": [round(before, 1), round(after, 1)], "half": below, "three_times": past})
    errors = (cluster.run_dir / "logs" / "nginx-error.log").read_text()
    for summary in (below, past):
        # The generator shares the saturated cores: it may send late (p99 2-12 ms in most
        # runs, once 176 ms). Latency counts from the schedule, so lateness only makes the
        # bounds below harder; past this the load offered was not the load planned.
        assert summary["late_p99_ms"] < OBJECTIVE_S * 1000, f"the generator fell behind its schedule: {summary}"
        assert summary["no_answer"] == {} and summary["errors"] == {}, summary
    # Below capacity: (next to) nothing refused; a stall of the shared machine may cost one.
    assert below["refused"] <= 0.005 * below["requests"], below
    # Past it: the work the cluster can do, done in time, and the rest refused, at once.
    # Without admission control the 2xx p99 is the clients' 5 s patience and most requests
    # get no answer; with it, 200-800 ms here (the generator, nginx and 4 replicas share 2
    # cores, and CI machines are noisier): the test allows three times the objective, and
    # the benchmark (make bench-overload) reports the figures. Goodput (2xx within the
    # objective) was 0.75-1.06x of capacity here: refusals cost CPU on the cores the
    # generator shares; the test asks 0.6x.
    assert past["goodput_rps"] >= 0.6 * measured, (measured, past)
    assert past["ok_p99_ms"] <= 3 * OBJECTIVE_S * 1000, past
    # Refusals leave at once: the worker reads requests while a prediction computes
    # (service/dataplane/compute.py), and nginx tries a shed one once more elsewhere; p50
    # 10-25 ms, p99 100-220 ms here. Before, a refusal waited behind the work ahead of it
    # (p99 400-650 ms).
    assert past["refused"] > 0 and past["refused_without_retry_after"] == 0, past
    assert past["refused_p99_ms"] <= OBJECTIVE_S * 1000, past
    assert "worker_connections are not enough" not in errors
