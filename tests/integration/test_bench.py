"""`make bench --quick` end to end against a real local cluster: the report and its data."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from tests.support import ROOT, LocalCluster

pytestmark = pytest.mark.integration


def test_quick_bench_writes_a_complete_report(tmp_path, models_dir):
    cluster = LocalCluster(tmp_path / "run")
    cluster.env.pop("BALANCER_RATE_LIMIT")  # the bench measures the cluster, not the limiter
    cluster.up(replicas=2)
    out = tmp_path / "report"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "loadtest.bench", "--quick", "--out", str(out)],
            cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr[-4000:]
        assert cluster.status()["replicas"] == 2, "a reused cluster is scaled back to where it was"
    finally:
        cluster.run("down", check=False)
    raw = json.loads((out / "results.json").read_text())
    plan = raw["environment"]["plan"]
    expected = len(plan["replicas"]) * len(plan["concurrency"]) * len(plan["hit_ratios"]) * len(plan["models"])
    expected += len(plan["concurrency"]) * len(plan["models"])  # the baseline
    assert len(raw["points"]) == expected
    with (out / "points.csv").open() as stream:
        assert len(list(csv.DictReader(stream))) == expected
    for point in raw["points"]:
        assert point["requests"] > 0 and point["rps"] > 0
        assert point["non_2xx"] == 0 and point["socket_errors"] == 0, point
        if point["kind"] == "cluster":
            assert sum(point["served_by"].values()) == point["requests"]
            expected_cache = "HIT" if point["hit_ratio"] == 1.0 else "MISS"
            assert max(point["cache"], key=point["cache"].get) == expected_cache, point["cache"]
    assert {h["kind"] for h in raw["h2load"]} == {"cluster", "baseline"}
    assert raw["locust"]["exit_code"] == 0 and raw["locust"]["rows"]
    markdown = (out / "report.md").read_text()
    table = markdown.split("## Every point")[1].split("##")[0]
    assert table.count("\n| ") - 1 == expected
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert len(plots) == 4 and all((out / "plots" / p).stat().st_size > 5000 for p in plots)
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 4
    assert (out / "locust.html").exists()
