"""Admission (service/dataplane/admission.py): CoDel's rule on the queue wait a replica
measures, the client's deadline, and how the fast lane answers them."""

import time

import pytest

from service.app import create_app
from service.dataplane.admission import Admission, timeout_s, waited_s
from service.errors import BadRequest
from service.settings import Settings

V1 = "/v1/models/iris:predict"
ROWS = {"instances": [[5.1, 3.5, 1.4, 0.2]]}


def test_the_wait_is_read_from_the_balancers_stamp_and_an_implausible_one_is_ignored():
    assert waited_s("t=100.250", now=100.5) == pytest.approx(0.25)
    assert waited_s("100.250", now=100.5) == pytest.approx(0.25)
    assert waited_s(None) == 0.0 and waited_s("") == 0.0 and waited_s("t=soon") == 0.0
    assert waited_s("t=101", now=100.0) == 0.0, "a stamp from the future (clock skew) is no wait"
    assert waited_s("t=1", now=100_000.0) == 0.0, "a stamp from long ago is not a wait either"


def test_a_deadline_is_whole_milliseconds_or_the_clients_error():
    assert timeout_s(None) is None and timeout_s("250") == 0.25
    for bad in ("0", "-5", "1.5", "soon", "9" * 12):
        with pytest.raises(BadRequest, match="X-Request-Timeout-Ms"):
            timeout_s(bad)


def test_a_burst_is_admitted_and_a_standing_queue_is_shed_past_its_target():
    admission = Admission(objective_ms=500)  # target 100 ms, interval 125 ms (no service time yet)
    assert (admission.target_s, admission.interval_s) == (0.1, 0.125)
    t = time.monotonic()
    # A burst: a few waits over the target do not make a standing queue; all are served.
    assert not any(admission.refuse(wait, now=t + i / 100) for i, wait in enumerate([0.001, 0.4, 0.3, 0.2]))
    # Waits over the target, request after request: a standing queue; then a request
    # facing more than the target is refused, and one facing less is served.
    decisions = [admission.refuse(0.2, now=t + 0.05 + i / 1000) for i in range(40)]
    assert decisions[-1] and not decisions[0], decisions
    assert not admission.refuse(0.01, now=t + 0.1)
    # The queue drained (short waits again): no longer overloaded.
    for i in range(30):
        admission.refuse(0.005, now=t + 0.11 + i / 1000)
    assert not admission.refuse(0.3, now=t + 0.15)


def test_a_request_retried_with_its_first_stamp_is_served():
    """nginx retries a request that timed out on another replica with the stamp of its
    first try: one long wait on a replica without a queue is not an overload."""
    admission = Admission(objective_ms=500)
    t = time.monotonic()
    for i in range(20):
        admission.refuse(0.002, now=t + i / 100)
    assert not admission.refuse(2.0, now=t + 0.2)
    assert not admission.refuse(0.003, now=t + 0.21)


def test_a_stalled_worker_serves_the_backlog_it_finds():
    admission = Admission(objective_ms=500)
    t = time.monotonic()
    assert not admission.refuse(0.0, now=t)
    # Frozen for 10 s: the requests that arrived meanwhile are served, oldest last.
    assert not any(admission.refuse(10 - i / 10, now=t + 10 + i / 1000) for i in range(30))
    # What arrives after the stall is judged as usual: a standing queue is refused.
    assert any(admission.refuse(0.3, now=t + 10.5 + i / 100) for i in range(30))


def test_an_objective_of_zero_never_refuses():
    admission = Admission(objective_ms=0)
    assert not any(admission.refuse(wait, now=1000.0 + wait) for wait in (0.0, 1.0, 100.0))


def app_client(models_dir, **env):
    settings = Settings.from_env(
        {"SERVICE_MODELS_DIR": str(models_dir), "REDIS_URL": "", "SERVICE_REPLICA_ID": "u", **env}
    )
    return create_app(settings).test_client()


@pytest.fixture
def client(models_dir):
    return app_client(models_dir)


def test_a_prediction_whose_deadline_passed_gets_a_504_and_is_not_computed(models_dir):
    client = app_client(models_dir, SERVICE_LATENCY_OBJECTIVE_MS="0")  # deadlines only
    stamp = f"t={time.time() - 0.3:.3f}"
    late = client.post(V1, json=ROWS, headers={"X-Request-Start": stamp, "X-Request-Timeout-Ms": "200"})
    assert late.status_code == 504 and "deadline passed" in late.json["error"], late.json
    in_time = client.post(V1, json=ROWS, headers={"X-Request-Start": stamp, "X-Request-Timeout-Ms": "5000"})
    assert in_time.status_code == 200
    bad = client.post(V1, json=ROWS, headers={"X-Request-Timeout-Ms": "soon"})
    assert bad.status_code == 400 and "X-Request-Timeout-Ms" in bad.json["error"]


def test_a_standing_queue_gets_json_429s_with_retry_after_and_health_is_never_shed(client):
    def stale() -> dict[str, str]:  # waited 0.3 s: past the target
        return {"X-Request-Start": f"t={time.time() - 0.3:.3f}"}

    # A standing queue: request after request waited past the target.
    started, answers = time.monotonic(), []
    while time.monotonic() - started < 2 and not any(a.status_code == 429 for a in answers):
        answers.append(client.post(V1, json=ROWS, headers=stale()))
        time.sleep(0.02)
    shed = answers[-1]
    assert {a.status_code for a in answers[:-1]} <= {200}, "served until the queue stood"
    assert shed.status_code == 429 and shed.headers["Retry-After"] == "1", shed.headers
    assert shed.json["error"].startswith("overloaded: this request would wait"), shed.json
    # The balancer's first try (X-Shed-Retry: 1): no body, and nginx's named location for
    # one more try on the next replica; the same refusal, counted once more.
    first_try = client.post(V1, json=ROWS, headers={**stale(), "X-Shed-Retry": "1"})
    assert first_try.status_code == 429 and first_try.headers["X-Accel-Redirect"] == "@shed_retry"
    assert first_try.data == b"" and first_try.headers["Content-Length"] == "0"
    for other in ("", "0", "@elsewhere"):  # nginx's retry empties it; nothing else redirects
        again = client.post(V1, json=ROWS, headers={**stale(), "X-Shed-Retry": other})
        assert again.status_code == 429 and "X-Accel-Redirect" not in again.headers and again.json["error"]
    assert client.get("/healthz", headers=stale()).status_code == 200
    assert client.post(V1, json=ROWS).status_code == 200, "no stamp, no wait: admitted"
    metrics = client.get("/metrics").text
    assert 'prediction_requests_not_admitted_total{reason="overloaded"} 5.0' in metrics
    assert f"prediction_queue_wait_seconds_count {len(answers) + 4}.0" in metrics


def test_the_target_is_at_least_the_service_time_the_worker_measures():
    """A model slower than the objective allows still serves its load: a request that
    arrives while one is computed waits that long on an idle replica too."""
    admission = Admission(objective_ms=500)
    first = admission.started()
    admission.finished(first, now=first + 0.3)  # 300 ms of work
    assert admission.service_s == pytest.approx(0.06)  # a fifth of the first sample
    for _ in range(30):
        admission.finished(admission.started(), now=admission._finished_at + 0.3)
    assert admission.service_s == pytest.approx(0.3, rel=0.01)
    assert admission.target_s == pytest.approx(0.3, rel=0.01)
    assert admission.interval_s == pytest.approx(1.2, rel=0.01)


def test_a_burst_arriving_at_once_is_admitted_only_up_to_the_objective():
    """With the loop free to read requests while a prediction computes (service.dataplane.
    compute), a burst reaches the door at once: what it faces is the work admitted ahead."""
    for service_s in (0.002, 0.005, 0.01, 0.02):
        admission = Admission(objective_ms=500)
        admission.service_s = service_s
        t = time.monotonic()
        admitted = 0
        for i in range(400):
            if not admission.refuse(0.0, now=t + i / 100_000):
                admission.started()
                admitted += 1
        assert 0.1 < admitted * service_s < 0.5, (service_s, admitted)
