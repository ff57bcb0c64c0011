"""scripts/bench --url: the sweep against a deployment someone else started, here a local
cluster in the defaults, through the command a user types."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.support import ROOT

pytestmark = pytest.mark.integration


def _state(cluster) -> dict[str, int]:
    """Every component and its pid: what a benchmark that changes nothing leaves as it was."""
    return {c.name: c.pid for c in cluster.status().components if c.running}


def _bench(out, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["scripts/bench", *args, "--out", str(out)]
    return subprocess.run(argv, cwd=ROOT, env=env or dict(os.environ), capture_output=True, text=True, timeout=600)


def test_bench_url_measures_a_running_cluster_and_leaves_it_as_it_was(start_cluster, tmp_path):
    cluster = start_cluster(2, defaults=True)
    internal = cluster.status().internal
    before = _state(cluster)
    out = tmp_path / "report"
    result = _bench(out, "--url", internal, "--internal-url", internal, "--quick", "--seconds", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert _state(cluster) == before, "the benchmark changed the deployment"

    results = json.loads((out / "results.json").read_text())
    points = results["points"]
    assert {(p["concurrency"], p["hit_ratio"]) for p in points} == {(8, 0.0), (32, 0.0), (8, 1.0), (32, 1.0)}
    assert all(p["requests"] > 0 and p["non_2xx"] == 0 and p["socket_errors"] == 0 for p in points), points
    misses = [p for p in points if p["hit_ratio"] == 0]
    for point in misses:  # all misses: both replicas answered, and each one's CPU was read
        assert set(point["served_by"]) == {"replica-1", "replica-2"}, point["served_by"]
        assert set(point["replica_metrics"]) == {"replica-1", "replica-2"}, point["replica_metrics"]
        assert all(m["cpu_cores"] > 0.05 and m["requests"] > 0 for m in point["replica_metrics"].values())
    hits = [p for p in points if p["hit_ratio"] == 1]
    assert all(p["cache"].get("L1", 0) > 0.9 * p["requests"] for p in hits), [p["cache"] for p in hits]

    markdown = (out / "report.md").read_text()
    for plot in ("throughput", "latency", "cache"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 5000 and f"plots/{plot}.png" in markdown
    spread = markdown.split("## The spread over replicas")[1].split("##")[0]
    assert "replica-1 50 %" in spread and "replica-2 50 %" in spread and "cores" in spread
    cannot = markdown.split("## What this report could not see")[1].split("##")[0]
    assert "No baseline" in cannot and "No scaling curve" in cannot and "per-replica CPU" not in cannot
    planned = markdown.split("## Capacity: 10,000 req/s at p99 ≤ 100 ms")[1].split("##")[0]
    assert "| iris | 0% |" in planned and "| iris | 100% |" in planned, planned
    assert "<table>" in (out / "report.html").read_text()


def test_bench_url_with_a_scale_command_draws_throughput_against_replicas(start_cluster, tmp_path):
    cluster = start_cluster(2, defaults=True)
    internal = cluster.status().internal
    out = tmp_path / "report"
    env = {**os.environ, "CLUSTER_RUN_DIR": str(cluster.run_dir)}
    args = ["--url", internal, "--concurrency", "8", "--hit-ratios", "0", "--seconds", "2", "--replicas", "1,2"]
    result = _bench(out, *args, "--scale-command", "scripts/cluster scale {n}", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    points = json.loads((out / "results.json").read_text())["points"]
    assert [(p["replicas"], sorted(p["served_by"])) for p in points] == [
        (1, ["replica-1"]),
        (2, ["replica-1", "replica-2"]),
    ]
    markdown = (out / "report.md").read_text()
    assert (out / "plots" / "replicas.png").exists() and "plots/replicas.png" in markdown
    cannot = markdown.split("## What this report could not see")[1].split("##")[0]
    assert "No per-replica CPU" in cannot and "No scaling curve" not in cannot
    assert cluster.status().replicas == 2


def test_bench_url_says_plainly_when_nothing_answers(tmp_path):
    result = _bench(tmp_path / "report", "--url", "http://127.0.0.1:9", "--quick")
    assert result.returncode == 1 and "bench:" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_bench_url_on_the_public_listener_warns_and_counts_only_answers(start_cluster, tmp_path):
    """The README's URL is the public listener, which rate limits every client: the
    benchmark warns before it runs, and its report says in its first lines that most
    requests were refused, with req/s of 2xx answers only."""
    cluster = start_cluster(2, defaults=True)
    out = tmp_path / "report"
    result = _bench(out, "--url", cluster.url, "--quick", "--seconds", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" in result.stderr and "public listener" in result.stderr and "8082" in result.stderr
    points = json.loads((out / "results.json").read_text())["points"]
    refused = [p for p in points if p["refused"] > p["requests"] / 2]
    assert refused, "the rate limiter refused nothing: the test proved nothing"
    for point in points:
        answered = sum(n for status, n in point["statuses"].items() if status.startswith("2"))
        assert point["rps"] == pytest.approx(answered / point["seconds"]), point
    top = (out / "report.md").read_text().split("## Every point")[0]
    assert "points are marked ✗" in top and "rate limits every client" in top and "internal listener" in top
