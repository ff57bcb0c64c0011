"""Hostile input through a real cluster (nginx, two replicas, Redis) in the defaults: one
request never costs more than its size, and no bad file or foreign Redis value stops it.

The numbers are issue #38's: each test failed on the main it was written against."""

from __future__ import annotations

import collections
import json
import resource
import shutil
import socket
from pathlib import Path

import pytest
import redis
import requests

from localcluster.processes import children
from tests.support import wait_until
from tests.support.access_log import access_log
from tests.support.load import SourceAddressAdapter
from tests.support.repository import repository_call, repository_status, wait_converged

pytestmark = pytest.mark.integration

IRIS_ROW = [5.1, 3.5, 1.4, 0.2]
CHURN = {"plan": ("BYTES", "pro"), "age": ("INT64", 31), "monthly": ("FP64", 42.5), "support_calls": ("INT64", 2)}


@pytest.fixture(scope="module")
def cluster(start_cluster, models):
    return start_cluster(2, defaults=True, SERVICE_MODELS_DIR=str(models), SERVICE_REPOSITORY_POLL_S="0.5")


def _infer(cluster, model: str, body: bytes | dict) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{cluster.internal_url}/v2/models/{model}/infer", data=data, timeout=30)


def _churn(**replaced: str) -> bytes:
    """A V2 churn request in JSON text, one column's data replaced by raw JSON text."""
    inputs = [
        f'{{"name":"{name}","shape":[1],"datatype":"{datatype}","data":[{replaced.get(name, json.dumps(value))}]}}'
        for name, (datatype, value) in CHURN.items()
    ]
    inputs.append('{"name":"autopay","shape":[1],"datatype":"BOOL","data":[true]}')
    return ('{"inputs":[' + ",".join(inputs) + "]}").encode()


def test_an_output_named_many_times_is_refused_so_the_answer_stays_the_size_of_the_request(cluster):
    rows = [IRIS_ROW] * 1024
    body = {"inputs": [{"name": "input-0", "shape": [1024, 4], "datatype": "FP64", "data": rows}]}
    once = _infer(cluster, "iris", {**body, "outputs": [{"name": "predict"}, {"name": "predict_proba"}]})
    # Bounded by rows x the model's outputs: a label and 3 probabilities, about 70 bytes a row.
    assert once.status_code == 200 and len(once.content) < 1024 * 80, once.text[:300]
    repeated = _infer(cluster, "iris", {**body, "outputs": [{"name": "predict"}] * 50})
    assert repeated.status_code == 400, repeated.text[:200]
    assert repeated.json() == {"error": "output 'predict' is asked for more than once; name each output once"}


@pytest.mark.parametrize(
    ("model", "body", "message"),
    [
        (
            "iris",
            b'{"id":"\\ud800","inputs":[{"name":"input-0","shape":[1,4],"datatype":"FP64","data":[1,2,3,4]}]}',
            "lone UTF-16 surrogate",
        ),
        ("churn", _churn(monthly="1" + "0" * 400), "too large"),
        ("churn", _churn(monthly="-" + "9" * 320), "too large for a 64-bit float"),
        ("churn", b'{"inputs":[{"name":[1],"shape":[1,5],"datatype":"FP64","data":[1,2,3,4,5]}]}', "name"),
        ("churn", b'{"inputs":[{"name":{"a":1},"shape":[1],"datatype":"BYTES","data":["pro"]}]}', "name"),
    ],
)
def test_values_json_allows_but_our_types_do_not_are_a_400(cluster, model, body, message):
    response = _infer(cluster, model, body)
    assert response.status_code == 400, response.text[:300]
    assert message in response.json()["error"]


def test_a_malformed_model_json_stops_no_other_model_and_no_replica(cluster, models):
    bad = models / "broken" / "1"
    shutil.copytree(models / "iris" / "1", bad)
    meta = json.loads((bad / "model.json").read_text())
    (bad / "model.json").write_text(json.dumps({**meta, "name": "broken", "outputs": None}))

    refused = repository_call(cluster, "/v2/repository/models/broken/load", {"parameters": {"version": "1"}})
    assert refused.status_code == 422, refused.text
    assert "broken/1/model.json: outputs must be an object, got null" in refused.json()["error"]
    assert str(models) not in refused.text, "no absolute path in an answer"

    # An unrelated change still goes through, and every worker converges on it.
    generation = repository_status(cluster)["generation"]
    policy = repository_call(cluster, "/v2/repository/models/churn/policy", {"default": "latest"})
    assert policy.status_code == 200, policy.text
    wait_converged(cluster, generation + 1)

    # A replica that starts with the folder on disk loads everything else and says what it left out.
    cluster.scale(3)
    replica = cluster.status().component("replica-3")
    ready = requests.get(f"http://127.0.0.1:{replica.port}/readyz", timeout=5)
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["models"]) == {"iris", "digits", "churn"}
    assert "outputs must be an object" in ready.json()["unavailable"]["broken/1"]
    assert str(models) not in ready.text, "no path of the host in a public answer"

    # Fixed on disk, it loads.
    (bad / "model.json").write_text(json.dumps({**meta, "name": "broken"}))
    fixed = repository_call(cluster, "/v2/repository/models/broken/load", {"parameters": {"version": "1"}})
    assert fixed.status_code == 200, fixed.text
    wait_until(lambda: _infer(cluster, "broken", _iris_body()).status_code == 200, 30, "broken/1 served")
    cluster.scale(2)


def _iris_body() -> dict:
    return {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": IRIS_ROW}]}


def _redis(cluster) -> redis.Redis:
    return redis.Redis(port=cluster.status().component("redis").port, password=cluster.redis_password or None)


def test_a_value_of_another_type_under_the_clusters_own_redis_keys_breaks_nothing(cluster):
    store = _redis(cluster)
    prefix = "pred"
    store.delete(f"{prefix}:repository:seen")
    store.set(f"{prefix}:repository:seen", "not a hash")
    status = requests.get(f"{cluster.internal_url}/v2/repository/status", headers=cluster.operator_headers, timeout=5)
    assert status.status_code == 200, status.text
    # The workers replace the key with their reports within a poll.
    wait_until(lambda: len(repository_status(cluster)["workers"]) >= 2, 20, "the workers to report again")

    # Reports of other shapes are dropped, not shown or failed on.
    for raw in ('"text"', "[1]", '{"generation": "1", "at": 1}', '{"generation": 1, "at": NaN}', "\xff"):
        store.hset(f"{prefix}:repository:seen", "intruder", raw)
        status = repository_status(cluster)
        assert "intruder" not in status["workers"], raw

    # The record itself as a hash: malformed, and written back by the workers that hold a state.
    generation = repository_status(cluster)["generation"]
    store.delete(f"{prefix}:repository")
    store.hset(f"{prefix}:repository", "generation", "99")
    answer = requests.get(f"{cluster.internal_url}/v2/repository/status", headers=cluster.operator_headers, timeout=5)
    assert answer.status_code == 200, answer.text
    if generation > 0:
        wait_until(lambda: store.type(f"{prefix}:repository") == b"string", 20, "the record to be written back")
    assert _infer(cluster, "iris", _iris_body()).status_code == 200


PROXY = "127.0.0.3"  # a trusted proxy in front of the balancer; 127.0.0.2 is anyone else


def _healthz_statuses(cluster, source: str, forwarded_for: str, count: int) -> collections.Counter:
    session = requests.Session()
    session.mount("http://", SourceAddressAdapter(source))
    headers = {"X-Forwarded-For": forwarded_for}
    return collections.Counter(
        session.get(f"{cluster.url}/healthz", headers=headers, timeout=10).status_code for _ in range(count)
    )


def test_behind_named_proxies_each_client_has_its_own_rate_limit_and_nobody_else_is_believed(start_cluster):
    cluster = start_cluster(
        1, BALANCER_REAL_IP_FROM=f"{PROXY}/32", BALANCER_RATE_LIMIT="5r/s", BALANCER_RATE_LIMIT_BURST="5"
    )
    # One busy client behind the proxy is limited; another one behind the same proxy is not.
    busy = _healthz_statuses(cluster, PROXY, "203.0.113.7", 30)
    assert busy[429] >= 15, busy
    other = _healthz_statuses(cluster, PROXY, "203.0.113.8", 5)
    assert other == {200: 5}, other
    # A client that is not a trusted proxy cannot choose its bucket with the header.
    spoofing = _healthz_statuses(cluster, "127.0.0.2", "198.51.100.9", 30)
    assert spoofing[429] >= 15, spoofing
    again = _healthz_statuses(cluster, "127.0.0.2", "198.51.100.10", 5)
    assert again[429] >= 4, again
    clients = collections.Counter(line["client"] for line in access_log(cluster.run_dir / "logs" / "access.log"))
    assert clients["203.0.113.7"] == 30 and clients["203.0.113.8"] == 5 and clients["127.0.0.2"] == 35, clients


def _open_files_limit(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max open files"))
    return int(line.split()[3])


def test_nginx_workers_may_open_two_files_per_connection_whatever_limit_they_were_started_with(start_cluster):
    """worker_rlimit_nofile: gixy flagged its absence; a worker of 4096 connections started
    under the common soft limit of 1024 ran out of descriptors at a quarter of them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * 4096 + 1024:
        pytest.skip(f"the hard limit of open files here is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        cluster = start_cluster(1)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    master = cluster.status().component("nginx").pid
    workers = [pid for pid, command in children(master) if "worker process" in command]
    assert workers and _open_files_limit(master) == 1024
    assert all(_open_files_limit(pid) >= 2 * 4096 for pid in workers), [_open_files_limit(p) for p in workers]


def test_connections_one_address_opens_and_never_uses_cannot_lock_others_out(start_cluster):
    """Idle and not-yet-sent connections are not counted per address (limit_conn counts
    requests): nginx marks them reusable and closes the oldest when its connections run
    out, so 600 of them from one address against 2 x 128 connections leave room for others.
    (A request's header sent slowly is not reusable: client_header_timeout bounds those.)"""
    cluster = start_cluster(1, BALANCER_WORKER_CONNECTIONS="128")
    port = int(cluster.url.rsplit(":", 1)[1])
    idle = []
    try:
        for _ in range(600):
            connection = socket.socket()
            connection.bind(("127.0.0.2", 0))
            connection.connect(("127.0.0.1", port))
            idle.append(connection)
        session = requests.Session()
        session.mount("http://", SourceAddressAdapter("127.0.0.3"))
        statuses = collections.Counter(
            session.get(f"{cluster.url}/healthz", timeout=10, headers={"Connection": "close"}).status_code
            for _ in range(20)
        )
        assert statuses == {200: 20}, statuses
    finally:
        for connection in idle:
            connection.close()
    errors = (cluster.run_dir / "logs" / "nginx-error.log").read_text()
    assert "reusing connections" in errors, "the idle connections did fill nginx's connections"
