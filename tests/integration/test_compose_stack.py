"""The real compose stack, end to end: `docker compose -f docker-compose.scale.yml` builds
the images, starts redis, 4 api replicas and the balancer on whatever engine this machine
has (Docker, or podman through its Docker API), and is loaded only on loopback through
the published port. Numbers are printed as `COMPOSE {...}` lines.

    COMPOSE_E2E=required scripts/test -m compose -s    # run alone, fail if no engine

See tests/containers.py (ComposeEngine) for the settings; `.ci/run` sets them for the
podman lab on machines without Docker.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
import requests

from balancer.render import container_settings
from loadtest.generators import h2load_count_argv
from loadtest.parsers import parse_h2load
from localcluster.processes import ClusterError
from tests.containers import ComposeEngine, ComposeStack
from tests.support import ACCESS_LOG_SETTLE_S, ROOT, PacedLoad, dropped_by, free_port, upstream_attempts, wait_until

pytestmark = [pytest.mark.compose]

PROJECT = "prediction-cluster-e2e"
# The image's default, which docker-compose.scale.yml keeps.
RESOLVER_VALID_S = int(container_settings({}).resolver_valid_s)
FAIL_TIMEOUT_S = int(container_settings({}).fail_timeout_s)
ACCESS_LOG = "/tmp/nginx/access.log"
ROW = {"instances": [[5.1, 3.5, 1.4, 0.2]]}
# Every optional profile, so that `down` removes whatever a test started.
PROFILES = ("--profile", "loadtest", "--profile", "redis-cluster")


def report(what: str, **numbers: object) -> None:
    """One line of the run's numbers, for the closing note and CI's log."""
    print(f"\nCOMPOSE {json.dumps({'check': what, **numbers})}")


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    """Build and start the stack with 4 api replicas; always `down` it afterwards."""
    mode = os.environ.get("COMPOSE_E2E", "auto")
    if mode == "skip":
        pytest.skip("COMPOSE_E2E=skip")
    engine, why_not = ComposeEngine.find()
    if engine is None:
        if mode == "required":
            pytest.fail(f"COMPOSE_E2E=required but {why_not}")
        pytest.skip(f"{why_not}; COMPOSE_E2E=required makes this a failure (.ci/run sets it)")
    log_dir = tmp_path_factory.mktemp("compose")
    reports_dir = f"compose-e2e-{os.getpid()}"
    env = {
        **os.environ,
        "BALANCER_HOST_PORT": str(free_port()),
        "LOCUST_WEB_PORT": str(free_port()),
        "BALANCER_ACCESS_LOG": ACCESS_LOG,
        "LOADTEST_USER": f"{os.getuid()}:{os.getgid()}",
        "REPORTS_SUBDIR": reports_dir,
        # The checks follow one body to the replicas; the L1 has its own check (near the end).
        "BALANCER_L1_CACHE": "off",
    }
    stack = ComposeStack(engine, PROJECT, env, log_dir)
    stack.url = f"http://127.0.0.1:{env['BALANCER_HOST_PORT']}"
    stack.reports_dir = ROOT / "reports" / reports_dir
    driver = None
    if os.environ.get("COMPOSE_E2E_HEALTHCHECK_DRIVER"):
        driver = subprocess.Popen(
            ["sh", "-c", os.environ["COMPOSE_E2E_HEALTHCHECK_DRIVER"]],
            stdout=(log_dir / "healthcheck-driver.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    failed_before = 0
    try:
        stack.compose(*PROFILES, "down", "-v", "--remove-orphans", check=False)  # a previous run's
        started = time.monotonic()
        stack.compose("--profile", "loadtest", "build", timeout=1800)
        report("images built", seconds=round(time.monotonic() - started, 1))
        started = time.monotonic()
        up = stack.compose("up", "-d", "--scale", "api=4", "--wait", "--wait-timeout", "300", timeout=600)
        stack.up_output = up.stdout + up.stderr
        report("stack up and healthy", seconds=round(time.monotonic() - started, 1))
        failed_before = request.session.testsfailed
        yield stack
    finally:
        if request.session.testsfailed > failed_before or not hasattr(stack, "up_output"):
            logs = stack.compose(*PROFILES, "logs", "--no-color", "--tail", "60", check=False)
            print(f"\n----- compose logs -----\n{logs.stdout[-12000:]}\n{logs.stderr[-2000:]}")
        stack.compose(*PROFILES, "down", "-v", "--remove-orphans", check=False)
        shutil.rmtree(ROOT / "reports" / reports_dir, ignore_errors=True)
        if driver is not None:
            os.killpg(driver.pid, signal.SIGTERM)
            driver.wait(timeout=30)


def access_log(stack: ComposeStack) -> list[dict]:
    """The balancer's JSON access log, whole (a file in its tmpfs, not the engine's log), once
    every request answered so far is in it (nginx buffers it)."""
    time.sleep(ACCESS_LOG_SETTLE_S)
    text = stack.compose("exec", "-T", "balancer", "cat", ACCESS_LOG).stdout
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def post(stack: ComposeStack, path: str, body: object, **kwargs: object) -> requests.Response:
    return requests.post(f"{stack.url}{path}", json=body, timeout=30, **kwargs)


# --- the stack as started -----------------------------------------------------------------


def test_services_go_healthy_in_dependency_order(stack):
    lines = [line.strip() for line in stack.up_output.splitlines()]

    def at(container: str, event: str) -> int:
        return next(
            i for i, line in enumerate(lines) if line.startswith(f"Container {container}") and line.endswith(event)
        )

    redis = f"{PROJECT}-redis-1"
    apis = [f"{PROJECT}-api-{n}" for n in range(1, 5)]
    balancer = f"{PROJECT}-balancer-1"
    assert all(at(redis, "Healthy") < at(api, "Starting") for api in apis), stack.up_output
    assert all(at(api, "Healthy") < at(balancer, "Starting") for api in apis), stack.up_output
    health = {row["Name"]: stack.health(row["Name"]) for row in stack.containers()}
    assert set(health) == {redis, *apis, balancer} and set(health.values()) == {"healthy"}, health
    report("healthy in order", containers=health)


def test_predict_v1_and_v2_answer_through_the_published_port(stack):
    shortcut = post(stack, "/predict", {"features": [6.3, 3.3, 6.0, 2.5]})
    assert shortcut.status_code == 200 and shortcut.json()["predictions"] == ["virginica"]
    for header in ("X-Cache", "X-Served-By", "X-Request-ID", "X-Model-Version"):
        assert shortcut.headers.get(header), header
    v1 = post(stack, "/v1/models/iris:predict", ROW)
    assert v1.status_code == 200 and v1.json()["predictions"] == ["setosa"]
    v2_body = {
        "id": "e2e",
        "inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}],
    }
    v2 = post(stack, "/v2/models/iris/infer", v2_body)
    assert v2.status_code == 200 and v2.json()["id"] == "e2e"
    outputs = {o["name"]: o["data"] for o in v2.json()["outputs"]}
    assert outputs["predict"] == ["setosa"]
    ready = requests.get(f"{stack.url}/v2/health/ready", timeout=10)
    assert ready.status_code == 200


def test_the_plain_compose_command_addresses_the_same_stack(stack):
    """`docker compose ...` with no -f (what users type) reads compose.yaml, which includes
    docker-compose.scale.yml: the same services, and the running stack's containers."""
    plain = [*stack.engine.compose, "-p", stack.project]

    def run(*args: str) -> str:
        result = subprocess.run([*plain, *args], cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    explicit = set(stack.compose("config", "--services").stdout.split())
    assert set(run("config", "--services").split()) == explicit >= {"redis", "api", "balancer"}
    running = {row["Name"] for row in stack.containers()}
    out = run("ps", "--format", "json").strip()
    rows = json.loads(out) if out.startswith("[") else [json.loads(line) for line in out.splitlines()]
    listed = {row["Name"] for row in rows}
    assert listed == running and len([n for n in listed if "-api-" in n]) == 4, listed


def test_requests_spread_over_the_four_replicas(stack):
    served = collections.Counter()
    with requests.Session() as session:
        for _ in range(200):
            response = session.post(f"{stack.url}/v1/models/iris:predict", json=ROW, timeout=30)
            assert response.status_code == 200, response.text
            served[response.headers["X-Served-By"]] += 1
    report("spread of 200 requests", served_by=dict(served))
    assert set(served) == set(stack.replica_ids()) and len(served) == 4
    assert min(served.values()) >= 30, served


def test_gzip_and_json_errors(stack):
    rows = [[5.1 + i / 10, 3.5, 1.4, 0.2] for i in range(40)]
    response = post(
        stack, "/v1/models/iris:predict", {"instances": rows}, headers={"Accept-Encoding": "gzip"}, stream=True
    )
    raw = response.raw.read()
    assert response.status_code == 200 and response.headers["Content-Encoding"] == "gzip"
    assert len(json.loads(gzip.decompress(raw))["predictions"]) == 40
    too_large = requests.post(
        f"{stack.url}/v1/models/iris:predict",
        data=b"[" + b"1," * 600_000 + b"1]",
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert too_large.status_code == 413 and "too large" in too_large.json()["error"]
    missing = requests.get(f"{stack.url}/no/such/route", timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()
    unknown_model = post(stack, "/v1/models/nope:predict", ROW)
    assert unknown_model.status_code == 404 and "error" in unknown_model.json()
    report("gzip and errors", gzip_bytes=len(raw), statuses=[413, 404, 404])


def test_only_the_balancers_public_listener_is_published(stack):
    for row in stack.containers("api"):
        assert stack.cli("port", row["Name"]).stdout.strip() == "", f"{row['Name']} publishes a port"
    ports = stack.cli("port", f"{PROJECT}-balancer-1").stdout.split()
    assert ports[0] == "8080/tcp" and "8082/tcp" not in ports, ports
    refused = requests.get(f"{stack.url}/metrics", timeout=10)
    assert refused.status_code == 403 and "internal listener" in refused.json()["error"]
    # The internal listener serves /metrics inside the deployment.
    inside = stack.compose("exec", "-T", "balancer", "wget", "-q", "-O", "-", "http://127.0.0.1:8082/metrics")
    assert "prediction_http_request_duration_seconds" in inside.stdout


def test_the_redis_password_is_in_no_containers_arguments_or_environment(stack):
    """It was on redis-server's command line and in REDIS_URL, both shown by `inspect`.
    The stack runs with the demo secret file, whose password is `change-me`."""
    password = (ROOT / "deploy" / "compose" / "redis-password.demo").read_text().strip()
    for row in stack.containers("redis") + stack.containers("api"):
        inspected = stack.cli("inspect", row["Name"]).stdout
        assert password not in inspected, f"{row['Name']}: the password shows in inspect"
    # Yet Redis requires it and the replicas have it: they cache.
    refused = stack.compose("exec", "-T", "redis", "redis-cli", "get", "x", check=False)
    assert "NOAUTH" in refused.stdout + refused.stderr
    statuses = [post(stack, "/v1/models/iris:predict", {"instances": [[6.1, 2.8, 4.7, 1.2]]}) for _ in range(2)]
    assert [r.headers["X-Cache"] for r in statuses] in (["MISS", "HIT"], ["HIT", "HIT"])


def test_the_published_listener_rate_limits_every_client(stack):
    # h2load (C, 16 connections) drives the one host client well past 200 r/s + burst 400,
    # however slow this machine is today; meanwhile a probe reads a 429 as a client sees it.
    load = subprocess.Popen(
        h2load_count_argv(f"{stack.url}/healthz", None, 4000, 16),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    limited = None
    try:
        with requests.Session() as session:
            deadline = time.monotonic() + 30
            while limited is None and time.monotonic() < deadline and load.poll() is None:
                response = session.get(f"{stack.url}/healthz", timeout=10)
                if response.status_code == 429:
                    limited = response
    finally:
        output, _ = load.communicate(timeout=120)
    counts = parse_h2load(output)
    report("rate limit on the published port", h2load=counts, probe_limited=limited is not None)
    assert counts["s4xx"] > 0 and counts["s2xx"] > 0, counts
    assert counts["s2xx"] + counts["s4xx"] == counts["done"] == 4000, "only 200s and 429s"
    assert limited is not None, "the probe never saw a 429"
    assert limited.headers["Retry-After"] == "1" and "rate limited" in limited.json()["error"]
    wait_until(lambda: requests.get(f"{stack.url}/healthz", timeout=5).status_code == 200, 20, "the limit to pass")


# --- changes under load ---------------------------------------------------------------------


def _retried_or_failed(lines: list[dict], addresses: set[str]) -> dict:
    """Access log lines that touched one of `addresses`: retried elsewhere, dropped there
    (reached it and failed: see dropped_by), or failed for the client."""
    upstreams = {f"{a}:8000" for a in addresses}
    touched = [line for line in lines if any(a in line["upstream_addr"] for a in upstreams)]
    return {
        "requests": len(touched),
        "retried": sum("," in line["upstream_addr"] for line in touched),
        "dropped": len(dropped_by(touched, upstreams)),
        "client_5xx": sum(line["status"] >= 500 for line in touched),
    }


def test_stopping_one_replica_under_load_fails_no_request(stack):
    victim_id, victim = sorted(stack.replica_ids().items())[0]
    addresses = stack.addresses(victim)
    log_mark = len(access_log(stack))
    with PacedLoad(stack.url, rate=100, clients=4, max_seconds=120) as load:
        wait_until(lambda: len(load.results) > 100, 30, "the load to run")
        started = time.monotonic()
        stack.cli("stop", victim)  # SIGTERM: /readyz 503, drain delay, gunicorn's graceful stop
        stopped_s = time.monotonic() - started
        time.sleep(RESOLVER_VALID_S + 2)
    after = load.since(started)
    touched = _retried_or_failed(access_log(stack)[log_mark:], addresses)
    counts = load.counts()
    report(
        "stop one replica under load",
        stop_seconds=round(stopped_s, 1),
        **counts,
        victim_after_stop=sum(r.served_by == victim_id for r in after),
        victim_in_log=touched,
    )
    assert load.stopped_in_time and not load.thread_errors, load.thread_errors
    assert counts["failed"] == {} and counts["sent"] > 500, counts
    assert touched["client_5xx"] == 0 and touched["dropped"] == 0, touched
    stack.compose("up", "-d", "--no-recreate", "--scale", "api=4", "--wait", "--wait-timeout", "300")
    wait_until(lambda: len(stack.replica_ids()) == 4, 60, "four replicas again")
    stack.wait_routed()


def test_scale_4_to_6_to_2_under_load_fails_no_request(stack):
    before = set(stack.replica_ids())
    log_mark = len(access_log(stack))
    phases = {}
    with PacedLoad(stack.url, rate=100, clients=4, max_seconds=400) as load:
        wait_until(lambda: len(load.results) > 100, 30, "the load to run")

        started = time.monotonic()
        stack.compose("up", "-d", "--no-recreate", "--scale", "api=6", "--wait", "--wait-timeout", "300")
        healthy = time.monotonic()
        six = stack.replica_ids()
        added = set(six) - before
        assert len(added) == 2 and len(six) == 6, six

        def served_first() -> dict[str, float]:
            seen: dict[str, float] = {}
            for r in load.since(started):
                if r.served_by in added and r.served_by not in seen:
                    seen[r.served_by] = r.started
            return seen

        def evidence(why: str) -> AssertionError:
            """What nginx sent the added replicas, where they are, and its log."""
            addresses = {a for cid in added for a in stack.addresses(six[cid])}
            fields = ("time", "status", "upstream_addr", "upstream_status", "upstream_connect_time")
            tried = [
                {k: line[k] for k in fields}
                for line in access_log(stack)[log_mark:]
                if any(a.split(":")[0] in addresses for a, _, _ in upstream_attempts(line))
            ]
            served = load.counts(load.since(started))
            errors = stack.compose("logs", "--no-color", "--tail", "80", "balancer", check=False).stdout
            return AssertionError(
                f"{why}: first served, s after healthy: "
                f"{ {cid: round(t - healthy, 1) for cid, t in served_first().items()} }; added {sorted(added)} "
                f"at {sorted(addresses)}; load since the scale-up {served}\nrequests sent to them: "
                f"{tried[:40]}\nbalancer log:\n{errors[-6000:]}"
            )

        try:
            firsts = wait_until(
                lambda: (seen := served_first()) and len(seen) == len(added) and seen,
                RESOLVER_VALID_S + 30,
                "the added replicas to receive traffic",
            )
        except ClusterError as exc:
            raise evidence(str(exc)) from None
        # nginx re-resolves `api` every RESOLVER_VALID_S. A replica it tried while still
        # starting (refused, or 503 while loading) is out for FAIL_TIMEOUT_S, and is tried
        # again after it; 1 s more for the load's pacing.
        bound = RESOLVER_VALID_S + FAIL_TIMEOUT_S + 1
        if max(firsts.values()) - healthy > bound:
            late_s = max(firsts.values()) - healthy
            raise evidence(f"added replicas served {late_s:.1f} s after healthy (bound {bound} s)")
        phases["4->6"] = {
            "up_to_healthy_s": round(healthy - started, 1),
            # <= 0: nginx sent them requests before compose saw them healthy.
            "first_request_after_healthy_s": {k: round(v - healthy, 1) for k, v in firsts.items()},
            **load.counts(load.since(started)),
        }

        upstreams = {cid: {f"{a}:8000" for a in stack.addresses(name)} for cid, name in six.items()}
        started = time.monotonic()
        stack.compose("up", "-d", "--no-recreate", "--scale", "api=2", "--wait", "--wait-timeout", "300")
        stopped = time.monotonic()
        two = stack.replica_ids()
        removed = set(six) - set(two)
        assert len(two) == 2 and len(removed) == 4, two
        time.sleep(RESOLVER_VALID_S + 3)
        late = [r for r in load.since(stopped) if r.served_by in removed]
        last = max((r.started for r in load.since(started) if r.served_by in removed), default=started)
        phases["6->2"] = {
            "down_s": round(stopped - started, 1),
            "last_request_to_removed_after_start_s": round(last - started, 1),
            "served_by_removed_after_stop": len(late),
            **load.counts(load.since(started)),
        }
    lines = access_log(stack)[log_mark:]
    counts = load.counts()
    report(
        "scale under load",
        phases=phases,
        addresses={cid: sorted(a) for cid, a in upstreams.items()},
        total=counts,
        retried=sum("," in line["upstream_addr"] for line in lines),
        dropped=len(dropped_by(lines, set().union(*upstreams.values()))),
        balancer_5xx=sum(line["status"] >= 500 for line in lines),
        failed_in_access_log=[line for line in lines if line["status"] >= 500][:20],
    )
    assert load.stopped_in_time and not load.thread_errors, load.thread_errors
    assert counts["failed"] == {} and counts["sent"] > 1000, counts
    assert late == [], "removed replicas kept receiving traffic"
    assert sum(line["status"] >= 500 for line in lines) == 0
    dropped = dropped_by(lines, set().union(*(upstreams[cid] for cid in removed)))
    assert dropped == [], f"replicas removed by the scale-down dropped requests they had accepted: {dropped[:10]}"
    # Back to 4 for the load-test profile, which measures the stack settled.
    stack.compose("up", "-d", "--no-recreate", "--scale", "api=4", "--wait", "--wait-timeout", "300")
    report("scale back to 4", settled_s=round(stack.wait_routed(), 1))


# --- the loadtest profile -------------------------------------------------------------------


def test_loadtest_profile_h2load_uses_the_unlimited_internal_listener(stack):
    log_mark = len(access_log(stack))
    # --no-deps: `run` would otherwise bring `api` back to one replica.
    result = stack.compose(
        "--profile",
        "loadtest",
        "run",
        "--rm",
        "--no-deps",
        "-e",
        "H2LOAD_ARGS=-n 3000 -c 8 -m 1",
        "h2load",
        timeout=300,
    )
    counts = parse_h2load(result.stdout)
    failed = [line for line in access_log(stack)[log_mark:] if line["status"] >= 300]
    report("loadtest profile: h2load", **counts, failed_in_access_log=failed[:20])
    # 3000 requests from one address within seconds: far past the public limit (200 r/s, burst 400).
    assert counts["succeeded"] == counts["s2xx"] == counts["done"] == 3000, (counts, stack.routing())
    assert counts["failed"] == counts["errored"] == counts["timeout"] == 0, counts


def test_loadtest_profile_headless_locust_keeps_the_replicas_and_writes_reports(stack):
    out = f"/reports/{stack.env['REPORTS_SUBDIR']}"
    stack.env.update(
        {
            "LOCUST_HEADLESS": "true",
            "LOCUST_USERS": "8",
            "LOCUST_SPAWN_RATE": "8",
            "LOCUST_RUN_TIME": "15s",
            "LOCUST_EXPECT_WORKERS": "2",
            "LOCUST_CSV": f"{out}/locust",
            "LOCUST_HTML": f"{out}/locust.html",
        }
    )
    try:
        stack.compose(
            "--profile",
            "loadtest",
            "up",
            "-d",
            "--no-recreate",
            "--scale",
            "api=4",
            "--scale",
            "locust-worker=2",
            "locust-master",
            "locust-worker",
            timeout=300,
        )
        waited = stack.compose("--profile", "loadtest", "wait", "locust-master", timeout=180, check=False)
        master_log = stack.compose("--profile", "loadtest", "logs", "--no-color", "locust-master").stdout
    finally:
        for key in [k for k in stack.env if k.startswith("LOCUST_") and k != "LOCUST_WEB_PORT"]:
            del stack.env[key]
    workers = stack.containers("locust-worker", all_states=True)
    stats = stack.reports_dir / "locust_stats.csv"
    report(
        "loadtest profile: locust",
        exit=waited.returncode,
        workers=len(workers),
        replicas=len(stack.replica_ids()),
        files=sorted(p.name for p in stack.reports_dir.glob("*")),
    )
    assert waited.returncode == 0, waited.stdout + master_log[-4000:]  # `compose wait`: the container's exit code
    assert len(workers) == 2 and len(stack.replica_ids()) == 4, "the profile kept api at 4 replicas"
    assert stats.exists() and (stack.reports_dir / "locust.html").exists(), master_log[-4000:]
    aggregated = [line for line in stats.read_text().splitlines() if ",Aggregated," in line]
    requests_total, failures = (int(x) for x in aggregated[0].split(",")[2:4])
    assert requests_total > 100 and failures == 0, aggregated


def _total(stats: dict) -> dict:
    return next(entry for entry in stats["stats"] if entry["name"] == "Aggregated")


def test_the_locust_web_ui_starts_a_swarm_every_time(stack):
    """The UI's Start button (POST /swarm) with 2 workers connected: users spawn and
    requests flow, every time; Stop (POST /stop) stops them."""
    stack.compose(
        "--profile",
        "loadtest",
        "up",
        "-d",
        "--no-deps",
        "--force-recreate",
        "--scale",
        "locust-worker=2",
        "locust-master",
        "locust-worker",
        timeout=300,
    )
    ui = f"http://127.0.0.1:{stack.env['LOCUST_WEB_PORT']}"

    def stats() -> dict:
        return requests.get(f"{ui}/stats/requests", timeout=5).json()

    try:
        wait_until(lambda: stats().get("worker_count") == 2, 60, "2 Locust workers connected to the master")
        tries = []
        for attempt in range(3):
            started = requests.post(f"{ui}/swarm", data={"user_count": 10, "spawn_rate": 10}, timeout=10)
            assert started.status_code == 200 and started.json().get("success"), started.text
            try:
                running = wait_until(
                    lambda: (s := stats())["user_count"] == 10 and _total(s)["num_requests"] > 0 and s,
                    30,
                    f"try {attempt + 1}: 10 users spawned and requests answered",
                )
            finally:
                requests.post(f"{ui}/stop", timeout=10)
            tries.append({"users": running["user_count"], "requests": _total(running)["num_requests"]})
            wait_until(lambda: stats()["state"] == "stopped", 30, "the swarm to stop")
            requests.post(f"{ui}/stats/reset", timeout=10)
        report("loadtest profile: locust web UI", tries=tries)
    finally:
        stack.compose("--profile", "loadtest", "rm", "-s", "-f", "locust-master", "locust-worker", check=False)


def test_the_bench_service_writes_the_report_on_the_host(stack):
    """`docker compose --profile loadtest run --rm bench`: the sweep from inside the network
    against the balancer's internal listener, a short one here; the report on the host,
    every replica in its spread with its CPU read from /metrics."""
    out = f"/reports/{stack.env['REPORTS_SUBDIR']}/bench"
    before = stack.replica_ids()
    args = ["--concurrency", "8", "--hit-ratios", "0,1", "--seconds", "2", "--out", out]
    result = stack.compose("--profile", "loadtest", "run", "--rm", "--no-deps", "bench", *args, timeout=300)
    folder = stack.reports_dir / "bench"
    results = json.loads((folder / "results.json").read_text())
    points = results["points"]
    miss = next(p for p in points if p["hit_ratio"] == 0)
    report(
        "loadtest profile: bench service",
        points=[{k: p[k] for k in ("hit_ratio", "rps", "p99_ms", "cache", "served_by")} for p in points],
        cpu=miss["replica_metrics"],
    )
    assert stack.replica_ids() == before, "the bench service changed the deployment"
    assert all(p["requests"] > 0 and p["non_2xx"] == 0 and p["socket_errors"] == 0 for p in points), points
    assert set(miss["served_by"]) == set(before), (miss["served_by"], result.stderr[-2000:])
    assert set(miss["replica_metrics"]) == set(before) and all(
        m["cpu_cores"] > 0 for m in miss["replica_metrics"].values()
    ), miss["replica_metrics"]
    markdown = (folder / "report.md").read_text()
    assert "## What this report could not see" in markdown and (folder / "report.html").exists()


def test_the_redis_cluster_profile_caches_over_three_primaries(stack):
    """The README's Redis Cluster recipe: the profile's nodes, its one-shot init, and the
    replicas recreated with API_REDIS_URL pointing at the cluster."""
    started = time.monotonic()
    nodes = ["redis-cluster-1", "redis-cluster-2", "redis-cluster-3"]
    # As docs/containers.md says: the profile on, API_REDIS_URL set; compose starts the
    # nodes, runs the init once they are healthy and recreates the replicas after it.
    stack.env["API_REDIS_URL"] = "redis+cluster://" + ",".join(f"{n}:6379" for n in nodes)
    stack.compose(
        "--profile", "redis-cluster", "up", "-d", "--scale", "api=4", "--wait", "--wait-timeout", "300", timeout=600
    )
    init = stack.compose("--profile", "redis-cluster", "logs", "--no-color", "redis-cluster-init").stdout
    assert "All 16384 slots covered" in init, init
    rows = [[4.4 + i / 100, 2.9, 1.4, 0.2] for i in range(30)]
    # The replicas were recreated (new addresses): measure once nginx has followed.
    settled_s = stack.wait_routed()
    try:
        statuses = [post(stack, "/v1/models/iris:predict", {"instances": rows}).headers["X-Cache"] for _ in range(3)]
    except requests.RequestException as error:
        raise AssertionError(f"{error!r}: {stack.routing()}") from error
    # The iris rows' keys only (the model repository keeps its own records in Redis too).
    keys = {
        n: len(
            stack.compose(
                "exec",
                "-T",
                n,
                "sh",
                "-c",
                'REDISCLI_AUTH="$(cat /run/secrets/redis_password)" exec redis-cli --scan --pattern "pred:iris:*"',
            ).stdout.split()
        )
        for n in nodes
    }
    report(
        "Redis Cluster profile",
        seconds=round(time.monotonic() - started, 1),
        settled_s=round(settled_s, 1),
        x_cache=statuses,
        keys=keys,
    )
    assert statuses == ["MISS", "HIT", "HIT"]
    assert sum(keys.values()) == len(rows) and all(keys.values()), "the rows are spread over the three primaries"


def test_the_l1_micro_cache_answers_repeats_in_the_container(stack):
    # The other checks run with the L1 off (they follow one body to the replicas). Turn it
    # on as users get it: the balancer recreated with the compose file's default.
    stack.env["BALANCER_L1_CACHE"] = "on"
    stack.compose("up", "-d", "--no-deps", "--force-recreate", "--wait", "--wait-timeout", "120", "balancer")
    body = {"instances": [[6.7, 3.0, 5.2, 2.3]]}
    answers = [post(stack, "/v1/models/iris:predict", body) for _ in range(4)]
    report(
        "L1 micro-cache", statuses=[a.status_code for a in answers], l1=[a.headers.get("X-L1-Cache") for a in answers]
    )
    # Stored from the second request on (BALANCER_L1_MIN_USES=2).
    assert [a.headers.get("X-L1-Cache") for a in answers] == ["MISS", "MISS", "HIT", "HIT"]
    assert len({a.content for a in answers}) == 1
    listed = stack.compose("exec", "-T", "balancer", "find", "/tmp/nginx/l1", "-type", "f").stdout.split()
    assert listed, "the answers are kept in the tmpfs (the root filesystem is read-only)"
    # The image's entrypoint started nginx under SCHED_BATCH (policy 3 in /proc/<pid>/stat),
    # and its workers inherited it (BALANCER_SCHEDULING's default).
    stats = stack.compose("exec", "-T", "balancer", "sh", "-c", "cat /proc/[0-9]*/stat").stdout.splitlines()
    policies = {int(line.split()[0]): int(line.rsplit(")", 1)[1].split()[38]) for line in stats if "(nginx)" in line}
    assert len(policies) >= 2 and set(policies.values()) == {3}, policies


def test_down_leaves_nothing_behind(stack):
    stack.compose(*PROFILES, "down", "-v", "--remove-orphans")
    label = f"label=com.docker.compose.project={PROJECT}"
    left = {
        "containers": stack.cli("ps", "-a", "-q", "--filter", label).stdout.split(),
        "networks": stack.cli("network", "ls", "-q", "--filter", label).stdout.split(),
        "volumes": stack.cli("volume", "ls", "-q", "--filter", label).stdout.split(),
    }
    report("down", left=left)
    assert left == {"containers": [], "networks": [], "volumes": []}
