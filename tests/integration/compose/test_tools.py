"""The compose stack's tools and profiles: the loadtest profile (h2load, Locust headless and
its web UI, the bench service), the Redis Cluster profile, the L1 in the container, and
`down` leaving nothing behind (last)."""

from __future__ import annotations

import json
import time

import pytest
import requests

from loadtest.parsers import parse_h2load
from tests.integration.compose.stack import (
    PROFILES,
    PROJECT,
    access_log,
    post,
    report,
)
from tests.support import wait_until

pytestmark = [pytest.mark.compose]


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


def test_the_l1_micro_cache_answers_repeats_in_the_container(stack):
    # The other checks run with the L1 off (they follow one body to the replicas). Turn it
    # on as users get it: the balancer recreated with the compose file's default. (Before the
    # Redis Cluster check, which recreates the replicas: this one needs them as they are.)
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


def test_the_redis_cluster_profile_caches_over_three_primaries(stack):
    """The README's Redis Cluster recipe: the profile's nodes, its one-shot init, and the
    replicas recreated with API_REDIS_URL pointing at the cluster."""
    started = time.monotonic()
    nodes = ["redis-cluster-1", "redis-cluster-2", "redis-cluster-3"]
    # As docs/containers.md says: the profile on, API_REDIS_URL set; compose starts the
    # nodes, runs the init once they are healthy and recreates the replicas after it.
    stack.env["API_REDIS_URL"] = "redis+cluster://" + ",".join(f"{n}:6379" for n in nodes)
    up = stack.compose(
        "--profile", "redis-cluster", "up", "-d", "--scale", "api=4", "--wait", "--wait-timeout", "300",
        timeout=600, check=False,
    )  # fmt: skip
    init = stack.compose("--profile", "redis-cluster", "logs", "--no-color", "redis-cluster-init").stdout
    assert up.returncode == 0 and "All 16384 slots covered" in init, f"{up.stderr[-2000:]}\ninit:\n{init}"
    rows = [[4.4 + i / 100, 2.9, 1.4, 0.2] for i in range(30)]
    # The replicas were recreated (new addresses): measure once nginx has followed, and once
    # the replicas reach the cluster (the podman lab's DNS can take a while to answer for the
    # recreated nodes). Meanwhile requests are answered without the cache (BYPASS), each
    # within the cache's bounded wait: degraded, never stalled.
    settled_s = stack.wait_routed()
    cache_s, slowest_s = wait_cached(stack)
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
        cache_s=round(cache_s, 1),
        slowest_s=round(slowest_s, 2),
        x_cache=statuses,
        keys=keys,
    )
    assert statuses == ["MISS", "HIT", "HIT"]
    assert sum(keys.values()) == len(rows) and all(keys.values()), "the rows are spread over the three primaries"
    assert slowest_s < 5, "a request waited on the cache longer than its bounded wait"


def wait_cached(stack, timeout_s: float = 120) -> tuple[float, float]:
    """Until every replica answers with its result cache (X-Cache MISS or HIT, not BYPASS):
    the seconds that took, and the slowest answer meanwhile."""
    started, slowest = time.monotonic(), 0.0
    replicas, cached = len(stack.replica_ids()), set()
    for i in range(10_000):
        # digits rows: the iris keys counted below are the test's own.
        answer = post(stack, "/v1/models/digits:predict", {"instances": [[0.0] * 63 + [i / 1000]]})
        slowest = max(slowest, answer.elapsed.total_seconds())
        if answer.status_code == 200 and answer.headers.get("X-Cache") in ("MISS", "HIT"):
            cached.add(answer.headers.get("X-Served-By"))
            if len(cached) == replicas:
                return time.monotonic() - started, slowest
        if time.monotonic() - started > timeout_s:
            break
        time.sleep(0.2)
    raise AssertionError(
        f"{len(cached)} of {replicas} replicas used the Redis Cluster in {timeout_s} s: {stack.routing()}"
    )


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
