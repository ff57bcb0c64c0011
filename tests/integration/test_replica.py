"""One real gunicorn (gevent) replica with a real redis-server, on free loopback ports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from localcluster.processes import children
from service.settings import Settings
from tests.support import ROOT, VENV_BIN, wait_until
from tests.support.servers import start_redis, start_replica

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
    workers = 2  # start_replica's SERVICE_WORKERS
    openings = _counter(url, "prediction_cache_breaker_openings_total")
    redis_server.signal(signal.SIGSTOP)
    try:
        answers, slow = set(), 0
        started_all = time.monotonic()
        for i in range(30):
            started = time.monotonic()
            response = v1(url, [[float(i), 2.0, 2.0, 2.0]])
            took = time.monotonic() - started
            assert took < 1.0 + REDIS_TIMEOUT_MS / 1000
            slow += took >= REDIS_TIMEOUT_MS / 1000
            answers.add((response.status_code, response.headers.get("X-Cache", response.text[:200])))
        elapsed = time.monotonic() - started_all
        assert answers == {(200, "BYPASS")}
        # Only the request that opened a worker's breaker, and one probe per back-off after
        # it, wait for Redis's timeout; every other request bypasses at once.
        assert slow <= workers * (1 + int(elapsed / BREAKER_BACKOFF_S)), (slow, elapsed)
        assert _counter(url, "prediction_cache_breaker_open ") == 1
        assert _counter(url, "prediction_cache_breaker_openings_total") > openings
    finally:
        redis_server.signal(signal.SIGCONT)
    wait_until(
        lambda: v1(url, [[9.0, 9.0, 9.0, 9.0]]).headers["X-Cache"] in ("HIT", "MISS"),
        10,
        "caching to resume after Redis thawed",
    )
    wait_until(
        lambda: (
            all(v1(url, [[9.0, 9.0, 9.0, float(i)]], headers={"Connection": "close"}).ok for i in range(8))
            and _counter(url, "prediction_cache_breaker_open ") == 0
        ),
        10,
        "every worker's breaker to close",
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
    ("/v1/models/iris:predict", b"x" * (Settings.from_env({}).models.max_body_bytes + 1), "application/json", 413),
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


def _requests_per_worker(metrics_dir: Path) -> dict[int, float]:
    """prediction_http_requests_total per worker pid, from the multiprocess files."""
    from prometheus_client.mmap_dict import MmapedDict

    per_pid: dict[int, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[1] == "prediction_http_requests_total":
                per_pid[pid] = per_pid.get(pid, 0.0) + value
    return per_pid


def test_metrics_aggregate_every_worker(shared, module_servers):
    url, _, _ = shared
    replica = next(s for s in module_servers if s.env.get("SERVICE_BIND", "").endswith(url.rsplit(":", 1)[1]))
    needle = 'prediction_http_requests_total{model="iris",route="/v1/models/<model:name>:predict",status="200"}'
    before = _counter(url, needle)
    # New connections each time, so both workers answer some of them.
    for i in range(40):
        v1(url, [[float(i), 7.0, 7.0, 7.0]], headers={"Connection": "close"})
    # A worker writes its counts every metrics.FLUSH_S (the one rendering /metrics, at once).
    after = wait_until(lambda: (n := _counter(url, needle)) == before + 40 and n, 5, "every worker's counts")
    per_worker = _requests_per_worker(Path(replica.env["SERVICE_METRICS_DIR"]))
    assert len([n for n in per_worker.values() if n > 0]) == 2, f"both workers answered: {per_worker}"
    assert after == before + 40, "/metrics sums every worker's requests"
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
    idle = socket.create_connection(("127.0.0.1", port), timeout=10)
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while b'"alive"' not in reply and (chunk := idle.recv(4096)):
        reply += chunk
    assert b"200 OK" in reply
    replica.signal(signal.SIGTERM)
    # An idle connection would otherwise hold the worker for the full 60 s graceful timeout.
    assert replica.process is not None
    replica.process.wait(timeout=20)
    assert idle.recv(4096) == b"", "the idle keep-alive connection was closed by the server"
    idle.close()


def test_a_silent_worker_is_killed_replaced_and_dropped_from_metrics(servers, models_dir, tmp_path):
    timeout_s = 2
    replica, url = start_replica(
        tmp_path, {"SERVICE_MODELS_DIR": str(models_dir), "REDIS_URL": "", "SERVICE_TIMEOUT_S": str(timeout_s)}
    )
    servers.append(replica)
    metrics_dir = Path(replica.env["SERVICE_METRICS_DIR"])
    workers = {pid for pid, _ in children(replica.pid)}
    assert len(workers) == 2
    victim = min(workers)
    assert (metrics_dir / f"gauge_livesum_{victim}.db").exists()
    os.kill(victim, signal.SIGSTOP)  # silent: no heartbeat, as a worker stuck in C code
    try:
        replaced = wait_until(
            lambda: (now := {pid for pid, _ in children(replica.pid)}) and victim not in now and len(now) == 2,
            timeout_s + 15,
            "gunicorn to kill the silent worker and start another",
        )
    finally:
        if victim in {pid for pid, _ in children(replica.pid)}:
            os.kill(victim, signal.SIGCONT)
    assert replaced
    # child_exit marked it dead: its live gauges no longer count in /metrics.
    assert not (metrics_dir / f"gauge_livesum_{victim}.db").exists()
    wait_until(lambda: requests.get(f"{url}/readyz", timeout=2).status_code == 200, 20, "the new worker to be ready")
    answers = [v1(url, [[1.0, 2.0, 3.0, float(i)]], headers={"Connection": "close"}).status_code for i in range(20)]
    assert answers == [200] * 20


def _redis_cli(port: int, *command: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *command], capture_output=True, text=True, timeout=10).stdout


def _calls(port: int) -> dict[str, int]:
    """Commands Redis ran since CONFIG RESETSTAT, by name (INFO/CONFIG, ours, left out)."""
    calls = {}
    for line in _redis_cli(port, "INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, stats = line[len("cmdstat_") :].split(":", 1)
            if name not in ("info", "config|resetstat"):
                calls[name] = int(stats.split(",")[0].split("=")[1])
    return calls


def test_a_request_costs_one_mget_and_one_set_per_missing_row_and_entries_expire(servers, models_dir, tmp_path):
    ttl_s = 2
    redis_server, port = start_redis(tmp_path)
    servers.append(redis_server)
    replica, url = start_replica(
        tmp_path,
        {
            "SERVICE_MODELS_DIR": str(models_dir),
            "REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "SERVICE_CACHE_POLICY": "on",
            "SERVICE_CACHE_TTL_S": str(ttl_s),
        },
    )
    servers.append(replica)
    rows = [[1.5, 2.5, 3.5, float(i)] for i in range(8)]
    _redis_cli(port, "CONFIG", "RESETSTAT")
    assert v1(url, rows).headers["X-Cache"] == "MISS"
    # SET with EX: no separate EXPIRE; the SETs go in one pipeline (one round trip).
    assert _calls(port) == {"mget": 1, "set": 8}
    assert v1(url, rows).headers["X-Cache"] == "HIT"
    assert _calls(port) == {"mget": 2, "set": 8}
    keys = _redis_cli(port, "--scan", "--pattern", "*:iris:*").split()
    assert len(keys) == 8 and all(0 < int(_redis_cli(port, "TTL", key)) <= ttl_s for key in keys)
    wait_until(lambda: not _redis_cli(port, "--scan", "--pattern", "*:iris:*").split(), ttl_s + 3, "entries to expire")
    assert v1(url, rows).headers["X-Cache"] == "MISS"


def test_a_replica_connecting_to_redis_makes_it_count_no_errors(redis_and_replica):
    # Redis before 7.2 refuses CLIENT SETINFO, which redis-py sends on every new
    # connection unless told not to: two errors in errorstats per connection.
    url, _, port = redis_and_replica
    _redis_cli(port, "CONFIG", "RESETSTAT")
    assert v1(url, [[1.1, 2.2, 3.3, 4.4]]).headers["X-Cache"] == "MISS"  # the cache's first connection
    errors = [line for line in _redis_cli(port, "INFO", "errorstats").split() if line.startswith("errorstat_")]
    assert errors == [], errors


@pytest.mark.parametrize(("runtime", "digits_decision"), [("sklearn", "on"), ("auto", "off")])
def test_the_default_cache_policy_decides_per_model_against_a_real_redis(
    servers, models_dir, tmp_path, runtime, digits_decision
):
    """auto caches a model whose predict costs more than a miss's two Redis round trips:
    digits' forest through scikit-learn (milliseconds), not through ONNX Runtime (microseconds)."""
    redis_server, port = start_redis(tmp_path)
    servers.append(redis_server)
    replica, url = start_replica(
        tmp_path,
        {
            "SERVICE_MODELS_DIR": str(models_dir),
            "REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "SERVICE_WORKERS": "1",
            "SERVICE_RUNTIME": runtime,
        },
    )
    servers.append(replica)
    assert "SERVICE_CACHE_POLICY" not in replica.env or replica.env["SERVICE_CACHE_POLICY"] == "auto"
    digits_row = [float((i * 7) % 17) for i in range(64)]
    answers = []
    for model, row in (("digits", digits_row), ("iris", [4.4, 2.2, 1.1, 0.3])):
        path = f"{url}/v1/models/{model}:predict"
        first = requests.post(path, json={"instances": [row]}, timeout=10).headers["X-Cache"]
        second = requests.post(path, json={"instances": [row]}, timeout=10).headers["X-Cache"]
        decision = wait_until(
            lambda m=model: _auto_decision(replica.log_text(), m), 10, f"the auto decision for {model}"
        )
        answers.append((model, decision, first, second))
        # What it decided (logged with the numbers it compared) is what requests get.
        assert (first, second) == (("MISS", "HIT") if decision == "on" else ("OFF", "OFF")), answers
    assert answers[0][1] == digits_decision, answers


def _auto_decision(log: str, model: str) -> str | None:
    for line in log.splitlines():
        if f"cache auto for {model} " in line:
            return line.rsplit("-> ", 1)[1].strip()
    return None


DIGITS_ROWS = [[float((i * 7 + j * 3) % 17) for j in range(64)] for i in range(16)]


@pytest.mark.parametrize("batching", ["on", "off"])
def test_concurrent_requests_in_one_worker_share_a_predict_only_when_batching(servers, models_dir, tmp_path, batching):
    from concurrent.futures import ThreadPoolExecutor

    replica, url = start_replica(
        tmp_path,
        {
            "SERVICE_MODELS_DIR": str(models_dir),
            "REDIS_URL": "",
            "SERVICE_WORKERS": "1",
            "SERVICE_BATCHING": batching,
            "SERVICE_BATCH_MAX_WAIT_MS": "20",
            # scikit-learn's forest takes milliseconds a call, so concurrent requests overlap
            # in it; through ONNX Runtime (microseconds) each is done before the next arrives.
            "SERVICE_RUNTIME": "sklearn",
        },
    )
    servers.append(replica)

    def one(row: list[float]) -> object:
        response = requests.post(f"{url}/v1/models/digits:predict", json={"instances": [row]}, timeout=30)
        return response.json()["predictions"][0]

    alone = [one(row) for row in DIGITS_ROWS]
    calls = 'prediction_inference_duration_seconds_count{model="digits"}'
    before = _counter(url, calls)
    with ThreadPoolExecutor(len(DIGITS_ROWS)) as pool:
        together = list(pool.map(one, DIGITS_ROWS))
    predicts = _counter(url, calls) - before
    assert together == alone, "each request got its own rows' answers"
    if batching == "on":
        # docs/api.md: "16 requests for the price of about one" (a few, on a busy machine)
        assert predicts <= 4, f"{predicts} predict calls for {len(DIGITS_ROWS)} concurrent requests"
    else:
        assert predicts == len(DIGITS_ROWS)
