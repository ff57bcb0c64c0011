"""The compose stack as started (docker-compose.scale.yml, 4 api replicas): health, routing,
what is published, secrets, the rate limit; a replica stopped and the api scaled under load.
The stack is started once for this folder (conftest.py)."""

from __future__ import annotations

import collections
import gzip
import json
import subprocess
import time

import pytest
import requests

from loadtest.generators import h2load_count_argv
from loadtest.parsers import parse_h2load
from localcluster.processes import ClusterError
from tests.integration.compose.stack import (
    FAIL_TIMEOUT_S,
    PROJECT,
    RESOLVER_VALID_S,
    ROW,
    access_log,
    post,
    report,
)
from tests.support import ROOT, wait_until
from tests.support.access_log import dropped_by, upstream_attempts
from tests.support.load import PacedLoad

pytestmark = [pytest.mark.compose]


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
