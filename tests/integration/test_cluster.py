"""The local cluster (localcluster, behind scripts/cluster): real redis-server, gunicorn replicas and nginx."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from requests.adapters import HTTPAdapter

from balancer.render import size_bytes
from balancer.settings import BalancerSettings
from loadtest.generators import h2load_count_argv
from loadtest.parsers import parse_h2load
from localcluster import free_port, port_free
from localcluster.processes import children
from tests.support import ROOT, VENV_BIN, wait_until
from tests.support.access_log import ACCESS_LOG_SETTLE_S, access_log, dropped_by
from tests.support.load import SourceAddressAdapter

pytestmark = pytest.mark.integration

REPLICAS = 4
SETOSA = [5.1, 3.5, 1.4, 0.2]


@pytest.fixture(scope="module")
def cluster(start_cluster):
    # 127.0.0.1 is exempt (the tests' load generator); 127.0.0.2 is an ordinary client.
    return start_cluster(
        REPLICAS, BALANCER_RATE_LIMIT_EXEMPT="127.0.0.1/32", BALANCER_RATE_LIMIT="5r/s", BALANCER_RATE_LIMIT_BURST="5"
    )


def predict(url: str, rows, session=None, **kwargs):
    return (session or requests).post(f"{url}/v1/models/iris:predict", json={"instances": rows}, timeout=10, **kwargs)


def test_status_reflects_the_running_cluster(cluster):
    status = cluster.status()
    names = sorted(c.name for c in status.components)
    assert names == ["nginx", "redis"] + [f"replica-{i}" for i in range(1, REPLICAS + 1)]
    assert all(c.running and c.healthy for c in status.components)
    assert status.balancer == cluster.url
    for component in status.components:
        os.kill(component.pid, 0)


def test_requests_spread_evenly_and_keepalive_is_honoured(cluster):
    session = requests.Session()
    session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=1))
    served = collections.Counter()
    for i in range(200):
        response = predict(cluster.url, [[float(i), 1.0, 1.0, 1.0]], session)
        assert response.status_code == 200
        served[response.headers["X-Served-By"]] += 1
    assert sorted(served) == [f"replica-{i}" for i in range(1, REPLICAS + 1)]
    assert max(served.values()) - min(served.values()) <= 4, served
    # One client connection carried every request: the access log counts them on it.
    lines = access_log(cluster.run_dir / "logs" / "access.log")
    assert max(line["connection_requests"] for line in lines) >= 200


def test_a_row_cached_through_one_replica_hits_through_another(cluster):
    row = [[3.3, 2.2, 1.1, 0.123]]
    first = predict(cluster.url, row)
    assert first.headers["X-Cache"] == "MISS"
    seen = {first.headers["X-Served-By"]}
    for _ in range(REPLICAS):
        again = predict(cluster.url, row)
        assert again.headers["X-Cache"] == "HIT"
        seen.add(again.headers["X-Served-By"])
    assert len(seen) > 1, "round-robin sent the repeats to other replicas"


def test_gzip_for_large_json_only_when_accepted(cluster):
    rows = [[float(i % 7), 1.0, 2.0, 3.0] for i in range(500)]
    gzipped = predict(cluster.url, rows, headers={"Accept-Encoding": "gzip"})
    assert gzipped.headers.get("Content-Encoding") == "gzip"
    assert "Accept-Encoding" in gzipped.headers.get("Vary", "")
    assert len(gzipped.json()["predictions"]) == 500
    plain = predict(cluster.url, rows, headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers
    small = predict(cluster.url, [SETOSA], headers={"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in small.headers, "tiny bodies are not worth compressing"


def test_nginx_errors_are_json(cluster):
    limit = size_bytes(BalancerSettings.from_env(cluster.environ).max_body_size)
    too_big = requests.post(
        f"{cluster.url}/predict", data=b"x" * (limit + 1), headers={"Content-Type": "application/json"}, timeout=10
    )
    assert too_big.status_code == 413 and "too large" in too_big.json()["error"]
    unknown = requests.get(f"{cluster.url}/no/such/path", timeout=10)
    assert unknown.status_code == 404 and unknown.headers["Content-Type"] == "application/json"
    assert "error" in unknown.json()
    # One trust rule in every mode: loopback is a client like any other on the public listener.
    refused = requests.get(f"{cluster.url}/metrics", timeout=10)
    assert refused.status_code == 403 and "internal listener" in refused.json()["error"]
    unload = requests.post(f"{cluster.url}/v2/repository/models/iris/unload", json={}, timeout=10)
    assert unload.status_code == 403 and "internal listener" in unload.json()["error"]
    assert requests.get(f"{cluster.internal_url}/metrics", timeout=10).status_code == 200


def test_request_ids_reach_the_replica_passed_through_or_made(cluster):
    # The access log holds the id nginx sent upstream; a replica answers with the id it
    # received. A V2 body says only the request's own `id` (the L1 stores bodies).
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": SETOSA}]}

    def infer(headers: dict[str, str]) -> requests.Response:
        return requests.post(f"{cluster.url}/v2/models/iris/infer", json=body, headers=headers, timeout=10)

    mine = infer({"X-Request-ID": "trace-42"})
    assert mine.headers["X-Request-ID"] == "trace-42" and "id" not in mine.json()
    made = infer({})
    assert len(made.headers["X-Request-ID"]) == 32
    replaced = infer({"X-Request-ID": "bad id with spaces"})
    assert len(replaced.headers["X-Request-ID"]) == 32, "nginx's own id, not one the replica made"
    sent_upstream = {line["request_id"] for line in access_log(cluster.run_dir / "logs" / "access.log")}
    assert {"trace-42", made.headers["X-Request-ID"], replaced.headers["X-Request-ID"]} <= sent_upstream
    replica = f"http://127.0.0.1:{cluster.status().component('replica-1').port}"
    direct = requests.post(f"{replica}/v2/models/iris/infer", json=body, headers={"X-Request-ID": "d-1"}, timeout=10)
    assert direct.headers["X-Request-ID"] == "d-1"
    with_id = requests.post(f"{replica}/v2/models/iris/infer", json={**body, "id": "own"}, timeout=10)
    assert with_id.json()["id"] == "own"
    assert made.headers.get("Server") == "nginx", "no version in Server"


def test_rate_limit_answers_429_json_but_not_for_exempt_networks(cluster):
    limited = requests.Session()
    limited.mount("http://", SourceAddressAdapter("127.0.0.2"))
    statuses = collections.Counter()
    retry_after = None
    for _ in range(30):
        response = limited.get(f"{cluster.url}/healthz", timeout=10)
        statuses[response.status_code] += 1
        if response.status_code == 429:
            retry_after = response.headers.get("Retry-After")
            assert response.json()["error"].startswith("rate limited")
            assert response.headers["Content-Type"] == "application/json"
    assert statuses[429] >= 15 and statuses[200] >= 5, statuses
    assert retry_after == "1"
    exempt = collections.Counter(requests.get(f"{cluster.url}/healthz", timeout=10).status_code for _ in range(30))
    assert exempt == {200: 30}


_LOADS: list[subprocess.Popen[str]] = []


def _bounded_load(cluster, tmp_path: Path, total: int, clients: int = 16) -> subprocess.Popen[str]:
    """h2load sending `total` requests; stopped by `restored` if the test fails before _finish."""
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"instances": [SETOSA]}))
    argv = h2load_count_argv(f"{cluster.url}/v1/models/iris:predict", body, total, clients)
    load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _LOADS.append(load)
    return load


def _access_lines(cluster, settled: bool = True) -> int:
    """Lines in the access log: with `settled`, every request answered so far has its own."""
    if settled:
        time.sleep(ACCESS_LOG_SETTLE_S)
    with (cluster.run_dir / "logs" / "access.log").open("rb") as log:
        return sum(1 for _ in log)


def _finish(load: subprocess.Popen[str]) -> dict[str, int]:
    output, _ = load.communicate(timeout=180)
    counts = parse_h2load(output)
    print(f"h2load: {counts}")
    return counts


@pytest.fixture
def restored(cluster):
    """The cluster, with every replica and Redis running again after the test, pass or fail,
    and no load of the test's left running."""
    try:
        yield cluster
    finally:
        while _LOADS:
            load = _LOADS.pop()
            if load.poll() is None:
                load.kill()
                load.communicate(timeout=30)
        cluster.start(REPLICAS)  # idempotent: restarts only what is missing


def test_sigkilled_replica_fails_no_request(restored, tmp_path):
    cluster = restored
    start = _access_lines(cluster)
    load = _bounded_load(cluster, tmp_path, 9000)
    wait_until(lambda: _access_lines(cluster, settled=False) - start > 1000, 60, "load to get going")
    victim = cluster.status().component("replica-2")
    # The whole replica, master and worker, as when its container or host dies.
    os.killpg(victim.pid, signal.SIGKILL)
    killed_at = _access_lines(cluster)
    counts = _finish(load)
    assert counts["succeeded"] == counts["s2xx"] == 9000, counts
    assert counts["failed"] == counts["errored"] == counts["timeout"] == 0
    lines = access_log(cluster.run_dir / "logs" / "access.log")[killed_at + 50 :]
    served_after = collections.Counter(line["served_by"] for line in lines)
    assert "replica-2" not in served_after and len(served_after) == REPLICAS - 1, served_after
    assert not cluster.status().component("replica-2").running
    cluster.start(REPLICAS)  # restarts only what is missing
    restarted = cluster.status().component("replica-2")
    assert restarted.running and restarted.pid != victim.pid


def test_scale_down_and_up_under_load_fails_no_request(restored, tmp_path):
    cluster = restored
    before = {c.name: c.pid for c in cluster.status().components}
    # A reload keeps the master and replaces every worker: the workers say it never happened.
    nginx_workers = set(children(before["nginx"]))
    replicas = [c for c in cluster.status().components if c.kind == "replica"]
    stopped = {f"127.0.0.1:{c.port}" for c in replicas if int(c.name.split("-")[1]) > 2}
    start = _access_lines(cluster)
    load = _bounded_load(cluster, tmp_path, 12000)
    wait_until(lambda: _access_lines(cluster, settled=False) - start > 500, 60, "load to get going")
    cluster.scale(2)
    assert cluster.status().replicas == 2
    cluster.scale(REPLICAS)
    counts = _finish(load)
    assert counts["succeeded"] == counts["s2xx"] == 12000, counts
    lines = access_log(cluster.run_dir / "logs" / "access.log")[start:]
    dropped = dropped_by(lines, stopped)
    assert dropped == [], f"a replica stopped by the scale-down dropped requests it had accepted: {dropped[:10]}"
    status = cluster.status()
    assert status.replicas == REPLICAS and status.healthy
    after = {c.name: c.pid for c in status.components}
    assert after["replica-1"] == before["replica-1"] and after["nginx"] == before["nginx"]
    assert set(children(after["nginx"])) == nginx_workers, "nginx was reloaded (its workers were replaced)"
    assert after["replica-4"] != before["replica-4"], "replica-4 was drained, stopped and started again"


def test_redis_killed_during_load_means_bypass_not_errors(restored, tmp_path):
    cluster = restored
    start = _access_lines(cluster)
    load = _bounded_load(cluster, tmp_path, 3000)
    wait_until(lambda: _access_lines(cluster) - start > 300, 60, "load to get going")
    os.kill(cluster.status().component("redis").pid, signal.SIGKILL)
    during = [predict(cluster.url, [[float(i), 9.0, 9.0, 9.0]]) for i in range(20)]
    counts = _finish(load)
    assert counts["s5xx"] == 0 and counts["s2xx"] == 3000, counts
    assert {(r.status_code, r.headers["X-Cache"]) for r in during} == {(200, "BYPASS")}
    cluster.start(REPLICAS)
    row = [[8.8, 8.8, 8.8, 8.8]]
    wait_until(
        lambda: all(predict(cluster.url, row).headers["X-Cache"] == "HIT" for _ in range(REPLICAS)),
        30,
        "every replica to cache again after Redis returned",
    )


def test_no_replica_answering_is_a_json_502_not_an_html_page(start_cluster):
    lone = start_cluster(1)
    os.killpg(lone.status().component("replica-1").pid, signal.SIGKILL)
    response = predict(lone.url, [SETOSA])
    assert response.status_code == 502 and response.headers["Content-Type"] == "application/json"
    assert "no replica could answer" in response.json()["error"]


def test_every_replica_frozen_is_a_json_504_within_the_retry_bound(start_cluster):
    read_timeout_s, next_upstream_timeout_s = 1, 2
    frozen = start_cluster(
        2,
        BALANCER_PROXY_READ_TIMEOUT_S=str(read_timeout_s),
        BALANCER_NEXT_UPSTREAM_TIMEOUT_S=str(next_upstream_timeout_s),
    )
    replicas = [c for c in frozen.status().components if c.kind == "replica"]
    for replica in replicas:
        os.killpg(replica.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = predict(frozen.url, [SETOSA])
        took = time.monotonic() - started
    finally:
        for replica in replicas:
            os.killpg(replica.pid, signal.SIGCONT)
    assert response.status_code == 504 and response.headers["Content-Type"] == "application/json", response.text
    assert "error" in response.json()
    # Tries stop at BALANCER_NEXT_UPSTREAM_TIMEOUT_S; the one fresh attempt after them
    # (@next_attempt, see balancer/nginx.conf.template) can take as long again.
    assert read_timeout_s <= took <= 2 * next_upstream_timeout_s + 1, took


def test_scaling_past_the_upstream_slots_rerenders_and_reloads_nginx(start_cluster):
    small = start_cluster(1, CLUSTER_UPSTREAM_SLOTS="2")
    nginx = small.status().component("nginx")
    workers_before = {pid for pid, _ in children(nginx.pid)}
    assert small.nginx_conf.read_text().count(" max_fails=") == 2
    small.scale(3)
    assert small.nginx_conf.read_text().count(" max_fails=") == 3, "one upstream slot per replica"
    assert small.status().component("nginx").pid == nginx.pid, "reloaded, not restarted"
    wait_until(lambda: not workers_before & {pid for pid, _ in children(nginx.pid)}, 15, "nginx's new workers")
    wait_until(
        lambda: (
            {predict(small.url, [SETOSA]).headers["X-Served-By"] for _ in range(12)}
            == {"replica-1", "replica-2", "replica-3"}
        ),
        30,
        "traffic on all three replicas",
    )


def test_the_cli_starts_scales_changes_restarts_and_stops_a_cluster_leaving_nothing_running(tmp_path, models_dir):
    env = {**os.environ, "CLUSTER_RUN_DIR": str(tmp_path / "run")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["scripts/cluster", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
        )

    try:
        up = cli("up", "--replicas", "1", "--ports", "auto")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "replica-1" in up.stdout and "healthy" in up.stdout
        status = json.loads(cli("status", "--json").stdout)
        assert {c["name"] for c in status["components"]} == {"nginx", "redis", "replica-1"}
        # nginx, its workers and cache processes under SCHED_BATCH (BALANCER_SCHEDULING's default).
        nginx = next(c["pid"] for c in status["components"] if c["name"] == "nginx")
        for pid in [nginx, *(child for child, _ in children(nginx))]:
            assert os.sched_getscheduler(pid) == os.SCHED_BATCH, Path(f"/proc/{pid}/cmdline").read_text()
        # The other commands, as a user types them.
        scaled = cli("scale", "2")
        assert scaled.returncode == 0 and "scaled to 2" in scaled.stdout, scaled.stderr
        policy = cli("model", "policy", "iris", "--default", "1")
        assert policy.returncode == 0 and json.loads(policy.stdout)["default"] == "1", policy.stderr
        generation = json.loads(policy.stdout)["generation"]
        wait_until(lambda: json.loads(cli("model", "status").stdout)["converged"], 30, "both replicas to converge")
        refused = cli("model", "unload", "iris", "9")
        assert refused.returncode == 1 and "serves no version '9'" in refused.stderr, refused.stderr
        restarted = cli("restart", "--rolling")
        assert restarted.returncode == 0 and "every replica restarted" in restarted.stdout, restarted.stderr
        status = json.loads(cli("status", "--json").stdout)
        assert {c["name"] for c in status["components"]} == {"nginx", "redis", "replica-1", "replica-2"}
        assert all(c["healthy"] for c in status["components"]) and status["models"]["generation"] == generation
        pids, ports = [c["pid"] for c in status["components"]], [c["port"] for c in status["components"]]
    finally:
        down = cli("down")
    assert down.returncode == 0 and "cluster stopped" in down.stdout, down.stderr
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
    assert all(port_free(port) for port in ports)
    assert json.loads(cli("status", "--json").stdout)["components"] == []
    assert not list((tmp_path / "run").rglob("*.pid")) and not (tmp_path / "run" / "cluster.json").exists()


def test_h2load_scenario_writes_output_and_percentiles(cluster, tmp_path):
    result = subprocess.run(
        ["loadtest/h2load.sh", "iris-single", "--url", cluster.url, "-n", "400", "-c", "8", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "400 succeeded" in (tmp_path / "h2load.txt").read_text()
    assert len((tmp_path / "requests.log").read_text().splitlines()) == 400
    assert "latency ms: p50" in result.stdout


def test_h2load_scenario_fails_loudly_when_every_request_fails(tmp_path):
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run(
        ["loadtest/h2load.sh", "healthz", "--url", nobody, "-n", "20", "-c", "2", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "all 20 requests failed" in result.stderr, result.stdout + result.stderr
    assert "nan" not in result.stdout


@pytest.mark.parametrize(("min_rps", "exit_code"), [(1, 0), (10**9, 1)])
def test_locust_thresholds_set_the_exit_code(cluster, tmp_path, min_rps, exit_code):
    result = subprocess.run(
        [
            str(VENV_BIN / "locust"),
            "-f",
            "loadtest/locustfile.py",
            "--host",
            cluster.url,
            "--headless",
            "-u",
            "4",
            "-r",
            "4",
            "-t",
            "3s",
            "--hit-ratio",
            "0.5",
            "--min-rps",
            str(min_rps),
            "--csv",
            str(tmp_path / "locust"),
            "--only-summary",
            "MixUser",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == exit_code, result.stdout[-2000:] + result.stderr[-2000:]
    stats = (tmp_path / "locust_stats.csv").read_text()
    assert "v1 iris 1 row" in stats and "v2 iris infer" in stats
    assert "X-Cache mix:" in result.stdout + result.stderr
