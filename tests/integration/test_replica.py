"""One real gunicorn (gevent) replica with a real redis-server, on free loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import requests

from tests.support import ROOT, VENV_BIN, start_redis, start_replica, wait_until

pytestmark = pytest.mark.integration

KNOWN_IRIS = [
    ([5.1, 3.5, 1.4, 0.2], "setosa"),
    ([7.0, 3.2, 4.7, 1.4], "versicolor"),
    ([6.3, 3.3, 6.0, 2.5], "virginica"),
]
BREAKER_BACKOFF_S = 0.5
REDIS_TIMEOUT_MS = 100


def _start(servers, models_dir, tmp_path):
    redis_server, redis_port = start_redis(tmp_path)
    servers.append(redis_server)
    replica, url = start_replica(
        tmp_path,
        {
            "SERVICE_MODELS_DIR": str(models_dir),
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "SERVICE_REDIS_TIMEOUT_MS": str(REDIS_TIMEOUT_MS),
            "SERVICE_BREAKER_BACKOFF_S": str(BREAKER_BACKOFF_S),
            "SERVICE_BREAKER_MAX_BACKOFF_S": "1",
            "SERVICE_CACHE_KEY_PREFIX": f"t{redis_port}",
            "SERVICE_CACHE_POLICY": "on",  # iris is cheap: auto would not cache it
        },
    )
    servers.append(replica)
    return url, redis_server, redis_port


@pytest.fixture(scope="module")
def shared(module_servers, models_dir, tmp_path_factory):
    """One Redis and one replica for the tests that leave both running."""
    return _start(module_servers, models_dir, tmp_path_factory.mktemp("shared"))


@pytest.fixture
def redis_and_replica(servers, models_dir, tmp_path):
    """A Redis and a replica of the test's own, for tests that stop or freeze Redis."""
    return _start(servers, models_dir, tmp_path)


def v1(url, rows, **kwargs):
    return requests.post(f"{url}/v1/models/iris:predict", json={"instances": rows}, timeout=5, **kwargs)


def test_three_protocols_give_the_right_labels(shared):
    url, _, _ = shared
    rows = [row for row, _ in KNOWN_IRIS]
    labels = [label for _, label in KNOWN_IRIS]
    assert v1(url, rows).json()["predictions"] == labels
    v2 = requests.post(
        f"{url}/v2/models/iris/infer",
        timeout=5,
        json={"inputs": [{"name": "input-0", "shape": [3, 4], "datatype": "FP32", "data": rows}]},
    )
    assert v2.status_code == 200 and v2.json()["outputs"][0]["data"] == labels
    for row, label in KNOWN_IRIS:
        shortcut = requests.post(f"{url}/predict", json={"features": row}, timeout=5)
        assert shortcut.json()["predictions"] == [label]
        assert shortcut.headers["X-Served-By"].startswith("test-")


def test_miss_then_hit_then_partial(shared):
    url, _, _ = shared
    first = v1(url, [[1.0, 2.0, 3.0, 4.0]])
    second = v1(url, [[1, 2, 3, 4.0]])
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert first.json() == second.json()
    mixed = v1(url, [[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    assert mixed.headers["X-Cache"] == "PARTIAL"
    assert mixed.json()["predictions"][0] == first.json()["predictions"][0]
    assert v1(url, [[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]]).headers["X-Cache"] == "HIT"


def test_redis_down_bypasses_then_caching_resumes(redis_and_replica, tmp_path, servers):
    url, redis_server, redis_port = redis_and_replica
    assert v1(url, [[0.5, 0.5, 0.5, 0.5]]).headers["X-Cache"] == "MISS"
    redis_server.stop()
    slowest = 0.0
    for i in range(40):
        started = time.monotonic()
        response = v1(url, [[float(i), 1.0, 1.0, 1.0]])
        slowest = max(slowest, time.monotonic() - started)
        assert response.status_code == 200
        assert response.headers["X-Cache"] == "BYPASS"
    # Each request waits at most one Redis timeout (refused connections fail at once);
    # the bound is loose on purpose: it catches a retry loop or a default 10 s timeout.
    assert slowest < 1.0 + REDIS_TIMEOUT_MS / 1000, f"a request took {slowest:.2f} s with Redis down"
    restarted, _ = start_redis(tmp_path, port=redis_port)
    servers.append(restarted)
    # Each worker has its own breaker: poll until the row is cached again and read back.
    wait_until(
        lambda: v1(url, [[0.5, 0.5, 0.5, 0.5]]).headers["X-Cache"] == "HIT",
        10,
        "caching to resume after Redis returned",
    )


def test_redis_frozen_opens_the_breaker(redis_and_replica):
    url, redis_server, _ = redis_and_replica
    redis_server.signal(signal.SIGSTOP)
    try:
        statuses = set()
        for i in range(30):
            started = time.monotonic()
            response = v1(url, [[float(i), 2.0, 2.0, 2.0]])
            assert time.monotonic() - started < 1.0 + REDIS_TIMEOUT_MS / 1000
            statuses.add((response.status_code, response.headers["X-Cache"]))
        assert statuses == {(200, "BYPASS")}
    finally:
        redis_server.signal(signal.SIGCONT)
    wait_until(
        lambda: v1(url, [[9.0, 9.0, 9.0, 9.0]]).headers["X-Cache"] in ("HIT", "MISS"),
        10,
        "caching to resume after Redis thawed",
    )


BAD_INPUTS = [
    ("/v1/models/iris:predict", b'{"instances": [[1, 2, 3]]}', "application/json", 400),
    ("/v1/models/iris:predict", b'{"instances": [[1, 2, 3, NaN]]}', "application/json", 400),
    ("/v1/models/iris:predict", b'{"instances": [[1, 2, 3, 1e999]]}', "application/json", 400),
    ("/v1/models/iris:predict", b'{"instances": [[1, 2, 3, "4"]]}', "application/json", 400),
    ("/v1/models/iris:predict", b'{"instances": []}', "application/json", 400),
    ("/v1/models/iris:predict", b"\xc3\x28", "application/json", 400),
    ("/v1/models/iris:predict", b"[" * 50_000, "application/json", 400),
    ("/v1/models/iris:predict", b'{"instances": [[1, 2, 3, 4]]}', "text/plain", 415),
    ("/v1/models/iris:predict", b"x" * 2_000_000, "application/json", 413),
    ("/v1/models/nope:predict", b'{"instances": [[1, 2, 3, 4]]}', "application/json", 404),
    (
        "/v2/models/iris/infer",
        b'{"inputs": [{"name": "a", "shape": [2, 4], "datatype": "FP64", "data": [1, 2, 3, 4]}]}',
        "application/json",
        400,
    ),
    (
        "/v2/models/iris/infer",
        b'{"inputs": [{"name": "a", "shape": [1, 4], "datatype": "FP8", "data": [1, 2, 3, 4]}]}',
        "application/json",
        400,
    ),
]


@pytest.mark.parametrize(("path", "body", "content_type", "status"), BAD_INPUTS)
def test_bad_input_gets_json_4xx_from_the_real_server(shared, path, body, content_type, status):
    url, _, _ = shared
    response = requests.post(f"{url}{path}", data=body, headers={"Content-Type": content_type}, timeout=5)
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/json"
    assert list(response.json()) == ["error"]


def _counter(url: str, needle: str) -> float:
    for line in requests.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(needle):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_aggregate_every_worker(shared):
    url, _, _ = shared
    needle = 'prediction_http_requests_total{model="iris",route="/v1/models/<model:name>:predict",status="200"}'
    before = _counter(url, needle)
    # New connections each time, so both workers answer some of them.
    for i in range(40):
        v1(url, [[float(i), 7.0, 7.0, 7.0]], headers={"Connection": "close"})
    assert _counter(url, needle) == before + 40
    assert _counter(url, 'prediction_cache_rows_total{model="iris",result="miss"}') >= 40
    assert _counter(url, 'prediction_inference_duration_seconds_count{model="iris"}') >= 40


def test_not_ready_until_models_arrive(servers, models_dir, tmp_path):
    empty = tmp_path / "models"
    empty.mkdir()
    replica, url = start_replica(tmp_path, {"SERVICE_MODELS_DIR": str(empty), "REDIS_URL": ""}, wait_ready=False)
    servers.append(replica)
    response = requests.get(f"{url}/readyz", timeout=5)
    assert response.status_code == 503 and "no models found" in response.json()["error"]
    assert requests.post(f"{url}/predict", json={"features": [1, 2, 3, 4]}, timeout=5).status_code == 503
    shutil.copytree(models_dir / "iris", empty / "iris")
    wait_until(
        lambda: requests.get(f"{url}/readyz", timeout=5).status_code == 200,
        15,
        "the replica to load models dropped in later",
    )
    assert requests.post(f"{url}/predict", json={"features": [1, 2, 3, 4]}, timeout=5).status_code == 200


def test_gunicorn_config_checks(models_dir):
    result = subprocess.run(
        [str(VENV_BIN / "gunicorn"), "--check-config", "-c", "service/gunicorn.conf.py", "service.wsgi:app"],
        cwd=ROOT,
        env={**os.environ, "SERVICE_MODELS_DIR": str(models_dir), "REDIS_URL": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_sigterm_does_not_wait_for_idle_keepalive_connections(servers, models_dir, tmp_path):
    replica, url = start_replica(
        tmp_path, {"SERVICE_MODELS_DIR": str(models_dir), "REDIS_URL": "", "SERVICE_GRACEFUL_TIMEOUT_S": "60"}
    )
    servers.append(replica)
    port = int(url.rsplit(":", 1)[1])
    idle = socket.create_connection(("127.0.0.1", port))
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while b'"alive"' not in reply:
        reply += idle.recv(4096)
    assert b"200 OK" in reply
    replica.signal(signal.SIGTERM)
    # An idle connection would otherwise hold the worker for the full 60 s graceful timeout.
    assert replica.process is not None
    replica.process.wait(timeout=20)
    assert idle.recv(4096) == b"", "the idle keep-alive connection was closed by the server"
    idle.close()
