"""The fault matrix: each fault under a bounded load on a real local cluster, every
response counted. Prints one FAULT line per fault: sent, succeeded, failed, worst latency.
(Also covered elsewhere: replica SIGKILL, scale 4→2→4 and Redis killed under h2load in
test_cluster.py; Redis frozen and Redis restarted in test_replica.py.)"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from localcluster.processes import children
from tests.support import VENV_BIN, wait_until
from tests.support.access_log import access_log, dropped_by, upstream_attempts
from tests.support.load import PacedLoad
from tests.support.repository import repository_call

pytestmark = [pytest.mark.integration, pytest.mark.faults]

READ_TIMEOUT_S = 2
CLIENT_TIMEOUT_S = 2
REDIS_PASSWORD = "fault-test-secret"


REPLICAS = 3
# Requests that take a few ms on a replica: a stopping replica always has some in flight.
# (Bigger than the L1's key: the balancer passes each one to a replica.)
BATCH = {"instances": [[5.1 + i / 1000, 3.5, 1.4, 0.2] for i in range(300)]}
# Small bodies, each different, so that with the L1 on they still reach the replicas.
SINGLES = [{"instances": [[4.0 + i / 1000, 3.0, 1.5, 0.2]]} for i in range(3000)]


@pytest.fixture(scope="module")
def cluster(start_cluster):
    # The configuration users run (the L1 on, cache policy auto): the faults hit that. The
    # forest answers through scikit-learn, as a model that does not convert would: its
    # predict costs more than a Redis round trip, so auto caches it and Redis's faults matter
    # (through ONNX Runtime it would not be cached: no demo model would be).
    return start_cluster(
        REPLICAS,
        defaults=True,
        SERVICE_RUNTIME="digits=sklearn,*=auto",
        BALANCER_PROXY_READ_TIMEOUT_S=str(READ_TIMEOUT_S),
        BALANCER_OPERATOR_TIMEOUT_S=str(READ_TIMEOUT_S),
        BALANCER_CLIENT_TIMEOUT_S=str(CLIENT_TIMEOUT_S),
        BALANCER_RATE_LIMIT="20r/s",
        BALANCER_RATE_LIMIT_BURST="10",
        # 127.0.0.1 is the operator (and the tests' load generator); 127.0.0.2 an outside client.
        BALANCER_RATE_LIMIT_EXEMPT="127.0.0.1/32",
        BALANCER_INTERNAL_NETWORKS="127.0.0.1/32",
        SERVICE_DRAIN_DELAY_S="2",
        CLUSTER_REDIS_PASSWORD=REDIS_PASSWORD,
        CLUSTER_REDIS_MAXMEMORY="3mb",
    )


@pytest.fixture
def restored(cluster):
    """The cluster, brought back to every replica running after the test, pass or fail."""
    try:
        yield cluster
    finally:
        cluster.start(REPLICAS)


def _access_log(cluster) -> list[dict]:
    return access_log(cluster.run_dir / "logs" / "access.log")


def _not_ready_because(direct: str) -> str | None:
    """Why a replica's /readyz says it is not ready; None while it says ready."""
    readiness = requests.get(f"{direct}/readyz", timeout=5)
    return readiness.json()["error"] if readiness.status_code == 503 else None


def test_sigterm_drains_gracefully(restored):
    cluster = restored
    victim = cluster.status().component("replica-2")
    direct = f"http://127.0.0.1:{victim.port}"
    log_mark = len(_access_log(cluster))
    with PacedLoad(cluster.url, rate=150, clients=6, body=BATCH) as load:
        time.sleep(1)
        os.kill(victim.pid, signal.SIGTERM)
        # /readyz turns 503 first, while the replica still answers predictions. The signal
        # reaches gunicorn's master and then its workers: a request sent at once can come
        # before, so wait for it (well within the 2 s drain delay).
        reason = wait_until(lambda: _not_ready_because(direct), 1.5, "/readyz to say not ready")
        assert "draining" in reason
        assert requests.post(f"{direct}/predict", json={"features": [1, 2, 3, 4]}, timeout=5).status_code == 200
        wait_until(lambda: not cluster.status().component("replica-2").running, 40, "replica-2 to stop")
        time.sleep(1)
    summary = load.summary("replica SIGTERMed")
    assert summary["sent"] > 300 and summary["failed"] == {}, summary
    # nginx retries a failed POST elsewhere, so the clients would not see a dropped request:
    # the access log does. A refused connection after the replica closed is fine.
    dropped = dropped_by(_access_log(cluster)[log_mark:], {f"127.0.0.1:{victim.port}"})
    assert dropped == [], f"the draining replica dropped requests it had accepted: {dropped[:10]}"


def test_rolling_restart_fails_no_request(restored):
    cluster = restored
    before = {c.name: c.pid for c in cluster.status().components}
    log_mark = len(_access_log(cluster))
    with PacedLoad(cluster.url, rate=150, clients=6, body=BATCH) as load:
        cluster.restart()
    summary = load.summary("rolling restart of every replica")
    assert summary["sent"] > 300 and summary["failed"] == {}, summary
    # docs/reliability.md: worst 0.29 s (a restarting replica answers 503 while it loads,
    # nginx retries elsewhere at once); a generous multiple, not a benchmark.
    assert summary["worst_latency_s"] < 3, summary
    replicas = {f"127.0.0.1:{c.port}" for c in cluster.status().components if c.kind == "replica"}
    dropped = dropped_by(_access_log(cluster)[log_mark:], replicas)
    assert dropped == [], f"a restarting replica dropped requests it had accepted: {dropped[:10]}"
    after = {c.name: c.pid for c in cluster.status().components}
    assert all(after[f"replica-{i}"] != before[f"replica-{i}"] for i in (1, 2, 3))
    assert after["nginx"] == before["nginx"] and after["redis"] == before["redis"]


def test_a_replica_killed_under_load_fails_no_request(restored):
    cluster = restored
    victim = cluster.status().component("replica-1")
    with PacedLoad(cluster.url, rate=150, clients=6, bodies=SINGLES[1::7]) as load:
        time.sleep(1)
        os.killpg(victim.pid, signal.SIGKILL)  # master and worker, as when its host dies
        time.sleep(3)
    summary = load.summary("replica SIGKILLed (the defaults: L1 on, cache policy auto)")
    assert summary["sent"] > 300 and summary["failed"] == {}, summary
    assert "replica-1" not in {r.served_by for r in load.since(time.monotonic() - 1)}


def test_redis_killed_and_restarted_under_load_fails_no_request(restored):
    cluster = restored
    with PacedLoad(cluster.url, rate=150, clients=6, bodies=SINGLES[2::7], path="/v1/models/iris:predict") as load:
        time.sleep(1)
        os.kill(cluster.status().component("redis").pid, signal.SIGKILL)
        time.sleep(2)
        cluster.start(REPLICAS)  # Redis again, empty, on its port
        time.sleep(2)
    summary = load.summary("Redis SIGKILLed and restarted under load (the defaults)")
    assert summary["sent"] > 500 and summary["failed"] == {}, summary


def test_scale_down_and_up_under_load_fails_no_request(restored):
    cluster = restored
    with PacedLoad(cluster.url, rate=150, clients=6, bodies=SINGLES[3::7]) as load:
        time.sleep(1)
        cluster.scale(1)
        cluster.scale(REPLICAS)
        time.sleep(1)
    summary = load.summary(f"scale {REPLICAS} -> 1 -> {REPLICAS} under load (the defaults)")
    assert summary["sent"] > 300 and summary["failed"] == {}, summary


def test_frozen_replica_is_routed_around_within_the_read_timeout(cluster):
    victim = cluster.status().component("replica-3")
    with PacedLoad(cluster.url, rate=150, clients=6, bodies=SINGLES[::7]) as load:
        time.sleep(0.5)
        os.killpg(victim.pid, signal.SIGSTOP)
        try:
            time.sleep(10)
        finally:
            os.killpg(victim.pid, signal.SIGCONT)
        time.sleep(1)
    summary = load.summary("replica frozen (SIGSTOP) 10 s")
    assert summary["failed"] == {}, summary
    # A request caught on the frozen replica waits the read timeout, then another answers.
    assert summary["worst_latency_s"] < READ_TIMEOUT_S + 1.5, summary


def test_an_operator_post_that_reached_a_replica_is_never_sent_to_another(cluster):
    """A model load can take long: retrying it on another replica (on a timeout) would run it
    twice and could answer 504 after it succeeded. The balancer sends it once, and its 504
    is final (no @next_attempt either)."""
    victim = cluster.status().component("replica-3")
    address = f"127.0.0.1:{victim.port}"
    log_mark = len(_access_log(cluster))
    os.killpg(victim.pid, signal.SIGSTOP)
    answers = []
    try:
        # Until one reached the frozen replica (its 504): with two nginx workers, and nginx
        # probing the stopped slots, REPLICAS requests in a row need not visit every replica.
        while len(answers) < 4 * REPLICAS and not any(a.status_code == 504 for a in answers):
            answers.append(repository_call(cluster, "/v2/repository/index", {}))
    finally:
        os.killpg(victim.pid, signal.SIGCONT)

    def logged() -> list[dict]:  # nginx writes a line after its answer: wait for all of them
        lines = [line for line in _access_log(cluster)[log_mark:] if line["uri"] == "/v2/repository/index"]
        return lines if len(lines) >= len(answers) else []

    posts = wait_until(logged, 5, "the access log lines of the operator POSTs")
    frozen = [line for line in posts if address in line["upstream_addr"]]
    assert frozen, f"round-robin over {REPLICAS} replicas sent none of {len(posts)} POSTs to the frozen one: {posts}"
    for line in frozen:
        assert [a for a, _, _ in upstream_attempts(line)] == [address], f"sent to another replica too: {line}"
        assert line["status"] == 504, line
    assert sorted(answer.status_code for answer in answers) == sorted(line["status"] for line in posts)
    assert all(answer.headers["Content-Type"] == "application/json" for answer in answers)


def _redis(cluster, *command: str) -> str:
    port = cluster.status().component("redis").port
    result = subprocess.run(
        ["redis-cli", "-p", str(port), *command],
        env={**os.environ, "REDISCLI_AUTH": REDIS_PASSWORD},
        capture_output=True,
        text=True,
        timeout=10,
    )
    return result.stdout


def test_redis_at_maxmemory_evicts_without_errors(cluster):
    _redis(cluster, "CONFIG", "RESETSTAT")
    answers = []
    # The forest (cached under the default policy, auto, through scikit-learn): 15 000 new rows, several times
    # the 3 MB the cache may hold.
    for batch in range(30):
        rows = [[float(batch), float(i % 17), float(i // 17)] + [1.0] * 61 for i in range(500)]
        response = requests.post(f"{cluster.url}/v1/models/digits:predict", json={"instances": rows}, timeout=30)
        answers.append((response.status_code, response.headers.get("X-Cache")))
    statuses = [status for status, _ in answers]
    # MISS, not BYPASS: the rows went through Redis (an open breaker would bypass it).
    assert set(answers) == {(200, "MISS")}, collections.Counter(answers)
    stats = dict(line.split(":", 1) for line in _redis(cluster, "INFO", "stats").split() if ":" in line)
    assert int(stats["evicted_keys"]) > 0
    errors = [line for line in _redis(cluster, "INFO", "errorstats").split() if line.startswith("errorstat_")]
    assert errors == [], f"Redis refused commands at maxmemory: {errors}"
    line = {
        "fault": "Redis at maxmemory (15 000 rows of the forest)",
        "sent": 30,
        "succeeded": statuses.count(200),
        "evicted_keys": int(stats["evicted_keys"]),
    }
    print(f"FAULT {json.dumps(line)}")


def test_redis_needs_its_password_and_listens_on_loopback_only(cluster):
    port = cluster.status().component("redis").port
    unauthenticated = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True)
    assert "NOAUTH" in unauthenticated.stdout + unauthenticated.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", port), timeout=1).close()
    # The password is on no command line (ps shows those to every user), and every file of
    # the cluster that holds it is the owner's alone.
    redis = cluster.status().component("redis")
    assert REDIS_PASSWORD.encode() not in Path(f"/proc/{redis.pid}/cmdline").read_bytes()
    holding = [f for f in cluster.run_dir.rglob("*") if f.is_file() and REDIS_PASSWORD.encode() in f.read_bytes()]
    assert holding, "the password is somewhere: Redis reads it from a file"
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in holding} == {f.name: "0o600" for f in holding}


def test_nginx_reloads_fail_no_request(cluster):
    nginx = cluster.status().component("nginx")
    clients, reloads = 8, 5
    workers = [{pid for pid, _ in children(nginx.pid)}]
    with PacedLoad(cluster.url, rate=150, clients=clients) as load:
        for _ in range(reloads):
            time.sleep(1)
            os.kill(nginx.pid, signal.SIGHUP)  # what `nginx -s reload` sends
            # A reload starts new workers: wait until a set of workers is there that was not.
            wait_until(lambda: {pid for pid, _ in children(nginx.pid)} - set().union(*workers), 10, "new workers")
            workers.append({pid for pid, _ in children(nginx.pid)})
        time.sleep(1)
    assert all(workers[i] != workers[i + 1] for i in range(reloads)), "nginx really reloaded each time"
    summary = load.summary("nginx reloaded 5 times")
    assert summary["sent"] > 100
    # No request gets an error answer. But nginx's old workers close idle client keep-alive
    # connections when a reload begins, and a client that sends on one gets a broken pipe
    # or a reset (nginx/nginx#437, declined upstream: RFC 9112 9.3.1 leaves the retry to
    # the client; requests' urllib3 retries it silently, http.client here does not). The
    # cluster itself never reloads nginx to scale (see localcluster/cluster.py).
    # Each reload closes each client's idle connection at most once.
    assert set(summary["failed"]) <= {"RemoteDisconnected", "ConnectionResetError", "BrokenPipeError"}, summary
    assert sum(summary["failed"].values()) <= clients * reloads, summary


def test_slow_clients_are_cut_off_and_others_still_served(cluster):
    port = int(cluster.url.rsplit(":", 1)[1])
    slow = []
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        slow.append(sock)
    with PacedLoad(cluster.url, rate=100, clients=4) as load:
        time.sleep(1)
        for sock in slow:  # trickle: one header byte each, well inside the timeout
            sock.sendall(b"X")
        time.sleep(CLIENT_TIMEOUT_S + 1.5)
    summary = load.summary("200 slow clients (slowloris)")
    assert summary["failed"] == {} and summary["worst_latency_s"] < 1.0, summary
    # Cut off means EOF, a 408 or a reset; the client's own timeout is not nginx cutting it off.
    cut_off = 0
    for sock in slow:
        sock.settimeout(1)
        try:
            reply = sock.recv(4096)
            cut_off += reply == b"" or b" 408 " in reply.split(b"\r\n")[0]
        except ConnectionResetError:
            cut_off += 1
        except TimeoutError:
            pass
        sock.close()
    assert cut_off == 200, f"only {cut_off} of 200 slow clients were cut off"


def test_a_client_over_its_rate_limit_does_not_slow_others(cluster):
    with (
        PacedLoad(cluster.url, rate=100, clients=4) as others,
        PacedLoad(cluster.url, rate=200, clients=4, source="127.0.0.2") as hog,
    ):
        time.sleep(4)
    hogged = hog.summary("one client over its rate limit (the limited client)")
    served = others.summary("one client over its rate limit (another client)")
    assert hogged["failed"].get("429", 0) > hogged["succeeded"], hogged
    assert served["failed"] == {} and served["worst_latency_s"] < 1.0, served
    # The internal listener is not rate limited, whoever connects to it.
    internal = PacedLoad(cluster.internal_url, rate=100, clients=4, source="127.0.0.2")
    with internal:
        time.sleep(2)
    unlimited = internal.summary("the same client on the internal listener")
    assert unlimited["sent"] > 60 and unlimited["failed"] == {}, unlimited


def test_malformed_http_gets_a_json_error_from_nginx_and_never_reaches_a_replica(cluster):
    port = int(cluster.url.rsplit(":", 1)[1])
    before = len(_access_log(cluster))
    cases = {
        "garbage request line": (b"\x16\x03\x01 garbage \x00\r\n\r\n", b"400"),
        "oversized header": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", b"400"),
        "invalid chunked body": (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nZZZ\r\n{}\r\n0\r\n\r\n",
            b"400",
        ),
        "TRACE": (b"TRACE /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
        "unsupported HTTP version": (b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", b"505"),
        "over-long URI": (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414"),
    }
    for name, (raw, status) in cases.items():
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(raw)
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
            status_line = reply.split(b"\r\n")[0]
            assert status_line.startswith(b"HTTP/1.1 " + status), (name, status_line)
            assert b"Content-Type: application/json" in reply, (name, reply[:400])
    time.sleep(0.5)
    entries = _access_log(cluster)[before:]
    assert entries and all(entry["upstream_addr"] == "" for entry in entries), entries


def test_metrics_and_stub_status_are_internal_only(cluster):
    outsider = requests.Session()
    from requests.adapters import HTTPAdapter

    class Bound(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            kwargs["source_address"] = ("127.0.0.2", 0)
            return super().init_poolmanager(*args, **kwargs)

    outsider.mount("http://", Bound())
    refused = outsider.get(f"{cluster.url}/metrics", timeout=5)
    assert refused.status_code == 403 and "internal listener" in refused.json()["error"]
    # BALANCER_INTERNAL_NETWORKS (127.0.0.1 here) opens /metrics on the public listener, and
    # only that: the model repository is the internal listener's alone, whoever asks.
    assert requests.get(f"{cluster.url}/metrics", timeout=5).status_code == 200, "BALANCER_INTERNAL_NETWORKS"
    for client in (requests, outsider):
        status = client.get(f"{cluster.url}/v2/repository/status", timeout=5)
        assert status.status_code == 403 and "internal listener" in status.json()["error"]
        unload = client.post(f"{cluster.url}/v2/repository/models/iris/unload", json={}, timeout=5)
        assert unload.status_code == 403, "nothing changed"
    still = requests.post(f"{cluster.url}/v1/models/iris:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
    assert still.status_code == 200, "iris still served"
    assert outsider.get(f"{cluster.internal_url}/metrics", timeout=5).status_code == 200, "trust goes by listener"
    status_port = int(cluster.status().component("nginx").health.split(":")[2].split("/")[0])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", status_port), timeout=1).close()


FUZZ_EXAMPLES = 50


def test_fuzzed_requests_never_get_a_5xx_and_match_the_schema(cluster, tmp_path):
    """schemathesis against /openapi.json through the balancer: every check but one.

    Left out: positive_data_acceptance ("a schema-valid request must succeed"). A row's
    width depends on the model named in the path, which a static schema cannot say, so
    schema-valid rows of the wrong width are rightly refused with 400. And the model
    repository's operator routes: fuzzed, they would unload the models the other tests
    use (their bad input is covered in tests/unit/test_app.py)."""
    log_mark = len(_access_log(cluster))
    result = subprocess.run(
        [
            str(VENV_BIN / "schemathesis"),
            "run",
            f"{cluster.url}/openapi.json",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            str(FUZZ_EXAMPLES),
            # One worker thread: with two, hypothesis parses lambdas' source (ast.parse) in both
            # threads at once, and on this Python (3.11.7) that crashed the fuzzer twice with
            # "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905:
            # seen in threaded programs), in its coverage phase: a crash, not a finding.
            "--workers",
            "1",
            "--seed",
            "20261122",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
            "--exclude-path-regex",
            "^/v2/repository/",
            # A deadline generous enough never to pass: fuzzed, a 1 ms one rightly gets a 504
            # (not computed), which this check would count as a server error. Malformed
            # values are tested in tests/unit/test_admission.py.
            "--header",
            "X-Request-Timeout-Ms: 600000",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # its .schemathesis/ cache stays out of the tree
    )
    tail = result.stdout[-3000:]
    print(tail)
    assert result.returncode == 0, tail
    # Every operation but the five model repository routes.
    assert "Selected: 18/23" in result.stdout and "Tested: 18" in result.stdout, "every other operation was tested"
    failed = [line for line in _access_log(cluster)[log_mark:] if line["status"] >= 500]
    assert failed == [], "no 5xx, from nginx or a replica, during the whole matrix"
