"""The balancer spreads refusals, it does not amplify them: a prediction a replica shed
(service/dataplane/admission.py) was never processed, so nginx tries it once on the next
replica (X-Accel-Redirect to @shed_retry, balancer/nginx.conf.template); when that one
sheds it too, its JSON 429 is the answer, at once.

A replica is overloaded here by a closed loop of clients sent to it directly (past the
balancer), while predictions go through the balancer one at a time: those that reach the
overloaded replica are shed there and answered elsewhere. The model is the digits forest
through scikit-learn (about 10 ms a row, as in test_overload.py), each row new."""

from __future__ import annotations

import threading

import pytest
import requests

from loadtest.openloop import capacity, new_rows
from tests.support.access_log import access_log, upstream_attempts

pytestmark = pytest.mark.integration

DIGITS = "/v1/models/digits:predict"


@pytest.fixture(scope="module")
def cluster(start_cluster):
    return start_cluster(2, defaults=True, SERVICE_RUNTIME="digits=sklearn,*=auto", SERVICE_BATCHING="digits=off,*=on")


def flooded(urls: list[str], bodies: list[bytes], seconds: float) -> list[threading.Thread]:
    """A closed loop of 48 clients on each of `urls` for `seconds`, in the background."""

    def flood(url: str, part: list[bytes]) -> None:
        capacity(url, DIGITS, part, clients=48, seconds=seconds)

    threads = [
        threading.Thread(target=flood, args=(url, bodies[i :: len(urls)]), daemon=True) for i, url in enumerate(urls)
    ]
    for thread in threads:
        thread.start()
    return threads


def through_the_balancer(cluster, bodies: list[bytes], seconds: float) -> list[requests.Response]:
    """Predictions one after another through the internal listener, each with its own id."""
    answers, session = [], requests.Session()
    for i, body in enumerate(bodies):
        answer = session.post(
            f"{cluster.internal_url}{DIGITS}",
            data=body,
            headers={"Content-Type": "application/json", "X-Request-ID": f"shed-{seconds}-{i}"},
            timeout=10,
        )
        answers.append(answer)
    return answers


def attempts_of(cluster, prefix: str) -> dict[str, list[str]]:
    """The statuses of each try nginx made on a replica, by request id, for our requests
    (not the empty upstream slots it skips: connection refused, nothing sent)."""
    lines = access_log(cluster.run_dir / "logs" / "access.log")
    ours = [line for line in lines if line["request_id"].startswith(prefix)]
    return {
        line["request_id"]: [status for _, status, connect in upstream_attempts(line) if connect != "-"]
        for line in ours
    }


def replica_url(cluster, n: int) -> str:
    return f"http://127.0.0.1:{cluster.status().component(f'replica-{n}').port}"


def test_a_prediction_one_replica_sheds_is_answered_by_the_next(cluster):
    rows = new_rows("digits", 40_000)
    capacity(cluster.internal_url, DIGITS, rows[:200], clients=8, seconds=1)  # warm up
    flood = flooded([replica_url(cluster, 1)], rows[1_000:30_000], seconds=6)
    answers = through_the_balancer(cluster, rows[30_000:30_150], seconds=1)
    for thread in flood:
        thread.join()
    assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers if a.status_code != 200]
    tries = attempts_of(cluster, "shed-1-")
    retried = [statuses for statuses in tries.values() if statuses[0] == "429"]
    assert retried, f"replica-1 shed none of the balancer's requests: the test proved nothing ({tries})"
    assert all(statuses == ["429", "200"] for statuses in retried), retried


def test_when_every_replica_sheds_the_second_refusal_is_the_answer(cluster):
    rows = new_rows("digits", 60_000)
    flood = flooded([replica_url(cluster, 1), replica_url(cluster, 2)], rows[:50_000], seconds=6)
    answers = through_the_balancer(cluster, rows[50_000:50_150], seconds=2)
    for thread in flood:
        thread.join()
    refused = [a for a in answers if a.status_code == 429]
    assert refused, "neither replica shed: the test proved nothing"
    for answer in refused:
        assert answer.headers["Retry-After"] == "1" and "overloaded" in answer.json()["error"]
    assert {a.status_code for a in answers} <= {200, 429}
    tries = attempts_of(cluster, "shed-2-")
    assert all(len(statuses) <= 2 for statuses in tries.values()), "one retry at most"
    assert any(statuses == ["429", "429"] for statuses in tries.values())
