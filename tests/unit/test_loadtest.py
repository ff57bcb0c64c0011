"""Load-test logic without servers: payload mixes, parsers on captured output, the report."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from loadtest import report
from loadtest import results as shape
from loadtest import targets as judged
from loadtest.generators import pool_bodies, write_wrk_payloads
from loadtest.parsers import (
    parse_h2load,
    parse_h2load_log,
    parse_locust_stats,
    parse_stub_status,
    parse_wrk,
    percentile,
    summarize_access_log,
)
from loadtest.payloads import FRESH, Mix, fresh_row, pool_row
from loadtest.report import plots

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_mix_draws_the_requested_hit_ratio_and_skew():
    choices = Mix(pool_size=100, hit_ratio=0.9, skew="zipf").choices(20_000)
    fresh = sum(1 for c in choices if c == FRESH) / len(choices)
    assert 0.08 < fresh < 0.12
    picks = [c for c in choices if c != FRESH]
    assert picks.count(0) > 5 * picks.count(50), "zipf favours the first rows"
    uniform = [c for c in Mix(pool_size=100, hit_ratio=1.0, skew="uniform").choices(20_000)]
    assert FRESH not in uniform and uniform.count(0) < 3 * uniform.count(50)
    assert Mix(hit_ratio=0.0).choices(1000) == [FRESH] * 1000


def test_pool_rows_are_distinct_and_fresh_rows_are_not_in_the_pool():
    pool = {tuple(pool_row("iris", i)) for i in range(1000)}
    assert len(pool) == 1000 and all(len(r) == 4 for r in pool)
    assert len(pool_row("digits", 3)) == 64
    assert tuple(fresh_row("iris", 123456, 1)) not in pool
    with pytest.raises(ValueError):
        Mix(hit_ratio=1.5)


def test_wrk_payload_file_is_lua(tmp_path):
    path = write_wrk_payloads(tmp_path / "p.lua", "iris", Mix(pool_size=10, hit_ratio=0.5), nonce=42, choices=100)
    text = path.read_text()
    assert text.startswith("return {") and "/v1/models/iris:predict" in text
    assert text.count("[==[") == 1 + 1 + 10 + 10


def test_v2_payloads_are_the_same_rows_as_one_tensor_and_the_predict_output(tmp_path):
    mix = Mix(pool_size=10, hit_ratio=0.0)
    v1 = [json.loads(body) for body in pool_bodies("iris", mix)]
    v2 = [json.loads(body) for body in pool_bodies("iris", mix, "v2")]
    assert [b["inputs"][0]["data"] for b in v2] == [b["instances"][0] for b in v1]
    assert v2[0]["inputs"][0]["shape"] == [1, 4] and v2[0]["outputs"] == [{"name": "predict"}]
    text = write_wrk_payloads(tmp_path / "p.lua", "iris", mix, nonce=42, choices=10, protocol="v2").read_text()
    assert "/v2/models/iris/infer" in text
    # A fresh row: the head, a number, a tail make a whole V2 body.
    head = text.split("fresh_head = [==[")[1].split("]==]")[0]
    tail = text.split("tails = {[==[")[1].split("]==]")[0]
    fresh = json.loads(head + "1.000000001" + tail)
    assert fresh["inputs"][0]["data"][0] == 421.000000001 and len(fresh["inputs"][0]["data"]) == 4
    with pytest.raises(ValueError, match="named columns"):
        write_wrk_payloads(tmp_path / "c.lua", "churn", mix, nonce=42, choices=10, protocol="v2")


def test_the_peer_venv_is_reused_only_for_the_same_requirements(tmp_path, monkeypatch):
    from loadtest import peers

    bin_dir = tmp_path / "mlserver" / "bin"
    bin_dir.mkdir(parents=True)
    (tmp_path / "mlserver" / "requirements.txt").write_text("a==1\nb==2\n")
    assert peers.ensure_virtualenv("mlserver", ["a==1", "b==2"], root=tmp_path) == bin_dir
    ran = []

    def refused(argv, **kwargs):
        ran.append(argv)
        return subprocess.CompletedProcess(argv, 1, "", "no network")

    monkeypatch.setattr(peers.subprocess, "run", refused)
    with pytest.raises(peers.PeerError, match="could not install mlserver"):
        peers.ensure_virtualenv("mlserver", ["a==1", "b==3"], root=tmp_path)
    assert ran and not (tmp_path / "mlserver").exists(), "no half-made virtualenv is left"
    pins = peers.mlserver_requirements()
    assert "uvloop==0.21.0" in pins and any(p.startswith("scikit-learn==") for p in pins)
    assert peers.mlserver_servers(2) == 2 and peers.mlserver_servers(8) == 8


def test_the_report_puts_each_peer_beside_the_cluster_round_by_round(tmp_path):
    raw = json.loads((FIXTURES / "results.json").read_text())
    template = raw["points"][0]
    for round_no, (ours, theirs) in enumerate(((2000.0, 900.0), (1800.0, 1000.0))):
        raw["points"].append({**template, "kind": shape.CLUSTER_V2, "rps": ours, "round": round_no, "concurrency": 32})
        raw["points"].append(
            {**template, "kind": "MLServer", "rps": theirs, "round": round_no, "concurrency": 32,
             "peer": "mlserver", "setup": "2 × MLServer 1.7.1 behind nginx"}
        )  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(raw))
    markdown = report.build(tmp_path)["md"].read_text()
    section = markdown.split("## Beside a dedicated model server")[1].split("\n## ")[0]
    assert "### MLServer" in section and "2.22×" in section and "1.80×" in section
    assert "c=32: 2.01× [1.80–2.22]" in section and "2 × MLServer 1.7.1 behind nginx" in section


def test_parse_h2load_summary_and_log():
    summary = parse_h2load((FIXTURES / "h2load.txt").read_text())
    assert summary["total"] == summary["s2xx"] == 2000 and summary["failed"] == 0
    assert summary["rps"] > 0 and summary["seconds"] > 0
    log = parse_h2load_log((FIXTURES / "h2load.log").read_text())
    assert log["requests"] == 300 and log["statuses"] == {"200": 300}
    assert 0 < log["p50_ms"] <= log["p90_ms"] <= log["p99_ms"] <= log["max_ms"]
    with pytest.raises(ValueError):
        parse_h2load("nothing here")


def test_parse_wrk_json_line():
    result = parse_wrk((FIXTURES / "wrk.txt").read_text())
    assert result["requests"] == 4891 and result["non_2xx"] == 0 and result["socket_errors"] == 0
    assert result["cache"] == {"MISS": 507, "HIT": 4384}
    assert set(result["served_by"]) == {"replica-1", "replica-2"}
    assert result["p50_ms"] == 9.63 and round(result["rps"]) == 1628


def test_parse_locust_stats():
    rows = parse_locust_stats((FIXTURES / "locust_stats.csv").read_text())
    names = [r["name"] for r in rows]
    assert "Aggregated" in names and "v1 digits 1 row" in names
    total = next(r for r in rows if r["name"] == "Aggregated")
    assert total["requests"] == sum(r["requests"] for r in rows if r["name"] != "Aggregated")
    assert total["failures"] == 0 and total["p99_ms"] >= total["median_ms"]


def test_access_log_and_stub_status():
    summary = summarize_access_log((FIXTURES / "access.log").read_text().splitlines() + ["not json"])
    assert summary["requests"] == 40
    assert summary["upstream_p50_ms"] <= summary["nginx_p50_ms"] + 1
    assert set(summary["served_by"]) <= {"replica-1", "replica-2", "nginx"}
    stub = parse_stub_status((FIXTURES / "stub_status.txt").read_text())
    assert stub["accepts"] >= stub["handled"] > 0 and stub["requests"] >= stub["accepts"]


def test_percentile_nearest_rank():
    assert percentile([1, 2, 3, 4], 50) == 2 and percentile([5], 99) == 5 and percentile(list(range(1, 101)), 99) == 99


def test_report_builds_from_captured_results(tmp_path):
    shutil.copy(FIXTURES / "results.json", tmp_path / "results.json")
    paths = report.build(tmp_path)
    markdown = paths["md"].read_text()
    raw = json.loads((tmp_path / "results.json").read_text())
    assert "## Summary" in markdown and "throughput ×" in markdown and "Scaling:" in markdown
    assert "Past capacity" not in markdown, "no overload point measured: no section"
    every_point = markdown.split("## Every point")[1].split("##")[0]
    assert every_point.count("\n| ") - 1 == len(raw["points"])
    for plot in ("throughput_vs_replicas", "cache_effect", "replica_distribution", "latency_vs_concurrency_iris"):
        assert (tmp_path / "plots" / f"{plot}.png").stat().st_size > 5000
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 4 and "http" not in page.split("<body>")[0]
    assert raw["environment"]["git_sha"][:7] in page


def test_h2load_summaries_in_every_time_unit():
    from loadtest.parsers import parse_h2load

    counts = "requests: 20 total, 0 started, 0 done, 0 succeeded, 20 failed, 20 errored, 0 timeout\n"
    counts += "status codes: 0 2xx, 0 3xx, 0 4xx, 0 5xx\n"
    for line, seconds in (("783us", 0.000783), ("3.73ms", 0.00373), ("2.5s", 2.5)):
        parsed = parse_h2load(f"finished in {line}, 0.00 req/s, 0B/s\n{counts}")
        assert abs(parsed["seconds"] - seconds) < 1e-9 and parsed["errored"] == 20


def test_disturbed_points_are_marked_and_their_targets_unsure(tmp_path):
    raw = json.loads((FIXTURES / "results.json").read_text())
    shaken = raw["points"][0]
    shaken["disturbance"] = {"other_cores": 0.93, "steal_cores": 0.0, "threshold_cores": 0.1, "disturbed": True}
    for point in raw["points"][1:]:
        point["disturbance"] = {"other_cores": 0.01, "steal_cores": 0.0, "threshold_cores": 0.1, "disturbed": False}
    (tmp_path / "results.json").write_text(json.dumps(raw))
    markdown = report.build(tmp_path)["md"].read_text()
    assert f"1 of {len(raw['points']) + len(raw['h2load'])} measurements" in markdown and "0.93 cores" in markdown
    every_point = markdown.split("## Every point")[1].split("##")[0]
    assert every_point.split("\n\n")[1].count("⚠") == 1 and "0.93 ⚠" in every_point
    target = {"target": "t", "measured": 2.0, "goal": 1.8, "at_least": True, "met": True}
    assert shape.verdict(target) == "MET" and shape.verdict({**target, "disturbed": True}) == "UNSURE"
    assert judged.print_targets([{**target, "disturbed": True}]).startswith("UNSURE")


def test_a_plot_of_one_x_value_is_a_table(tmp_path):
    point = {"rps": 1234.0, "disturbance": {"disturbed": False}}
    blocks = plots._figure(
        tmp_path,
        "x.png",
        "Throughput vs replicas",
        "replicas",
        "requests/s",
        "caption",
        [("iris, 100% hits", [2], [1234.0], "-", [point])],
    )
    assert [b[0] for b in blocks] == ["p", "table"] and blocks[1][2] == [["iris, 100% hits", "2", "1,234"]]
    assert not (tmp_path / "x.png").exists()


def test_targets_take_the_median_of_rounds_and_show_the_spread():
    def point(kind: str, model: str, hit: float, rps: float, round_no: int, disturbed: bool = False) -> dict:
        return {
            "kind": kind,
            "model": model,
            "hit_ratio": hit,
            "concurrency": 32,
            "rps": rps,
            "p50_ms": 10.0,
            "p99_ms": 20.0,
            "round": round_no,
            "disturbance": {"disturbed": disturbed},
            "cpu_ms_per_request": {"replica-1": 0.2, "replica-2": 0.2, "nginx": 0.1},
        }

    points = []
    for round_no, ours in enumerate((2100.0, 1500.0, 2400.0)):
        points += [point("cluster", "iris", 0.0, ours, round_no), point("baseline", "iris", 0.0, 1000.0, round_no)]
    for round_no, (ours, theirs) in enumerate(((2000.0, 900.0), (1800.0, 1000.0), (2100.0, 1000.0))):
        points += [
            point(shape.CLUSTER_V2, "iris", 0.0, ours, round_no),
            point("MLServer", "iris", 0.0, theirs, round_no),
        ]
    kinds = (("cluster", 30000.0), ("baseline", 1000.0), (shape.NGINX_FIXED_REPLY, 75000.0))
    h2load = [{"kind": k, "rps": rps, "round": r} for r in range(3) for k, rps in kinds]
    cpu = [
        {"kind": kind, "cpu_ms": ms, "round": r, "disturbance": {"disturbed": False}}
        for r, (ours, minimal) in enumerate(((0.9, 2.0), (0.8, 2.0), (1.4, 2.0)))
        for kind, ms in (("replica", ours), ("minimal Flask + predict", minimal))
    ]
    targets = {t["target"]: t for t in judged.evaluate_targets(points, h2load, 32, cpu)}
    misses = targets["iris, all misses: req/s vs baseline"]
    assert (misses["measured"], misses["min"], misses["max"], misses["runs"]) == (2.1, 1.5, 2.4, 3)
    assert misses["met"] and not misses["disturbed"]
    assert targets["hot iris row through the L1 (h2load): req/s vs baseline"]["measured"] == 30.0
    ceiling = targets["hot iris row through the L1 (h2load): req/s vs nginx's own fixed reply"]
    assert ceiling["measured"] == pytest.approx(0.4) and not ceiling["met"]
    peer = targets["iris, new rows (V2): req/s vs MLServer"]
    assert (peer["measured"], peer["min"], peer["max"]) == pytest.approx((2.1, 1.8, 20 / 9)) and peer["met"]
    share = targets["iris, all misses: replica worker CPU vs a minimal Flask app"]
    assert (share["measured"], share["min"], share["max"]) == pytest.approx((0.45, 0.4, 0.7)) and share["met"]
    points[0]["disturbance"]["disturbed"] = True
    shaken = {t["target"]: t for t in judged.evaluate_targets(points, h2load, 32)}
    assert shape.verdict(shaken["iris, all misses: req/s vs baseline"]) == "UNSURE"
    assert "[1.50–2.40, 3 runs]" in judged.print_targets(list(targets.values()))
    # A point with requests that got no 2xx (nginx's 500s once hid in a new-rows point's
    # req/s) makes its targets ERRORS, whatever their ratio; h2load's failures count too.
    points[0]["disturbance"]["disturbed"] = False
    points[2]["statuses"] = {"200": 47210, "500": 4}
    h2load[0].update({"statuses": {"200": 9}, "errored": 2})
    failing = {t["target"]: t for t in judged.evaluate_targets(points, h2load, 32)}
    assert failing["iris, all misses: req/s vs baseline"]["failed_requests"] == 4
    assert shape.verdict(failing["iris, all misses: req/s vs baseline"]) == "ERRORS"
    assert shape.verdict(failing["hot iris row through the L1 (h2load): req/s vs baseline"]) == "ERRORS"
    assert shape.verdict(failing["iris, new rows (V2): req/s vs MLServer"]) == "MET"
    assert "(4 requests in its points got no 2xx answer)" in judged.print_targets(list(failing.values()))


def test_the_report_never_shows_a_redis_password_whatever_the_topology():
    from loadtest.environment import _redacted

    assert _redacted("redis://:s3cret@127.0.0.1:6390/0") == "redis://:***@127.0.0.1:6390/0"
    assert (
        _redacted("redis+cluster://:s3cret@127.0.0.1:1,127.0.0.1:2") == "redis+cluster://:***@127.0.0.1:1,127.0.0.1:2"
    )
    assert "s3cret" not in _redacted("redis+sentinel://u:s3cret@s1:26379/prediction/0")
    assert _redacted("iris=off,*=auto") == "iris=off,*=auto"


def test_mlservers_nginx_drops_idle_connections_before_uvicorn_does():
    """uvicorn (MLServer keeps its default) closes a connection idle for 5 s; an nginx that
    kept it longer reused one being closed after a pause between points: a reset, and a 502
    in MLServer's column that was not MLServer's doing."""
    from loadtest.peers import NGINX_CONF

    timeout = re.search(r"keepalive_timeout (\d+)s;", NGINX_CONF)
    assert timeout is not None and int(timeout.group(1)) < 5


def test_results_carry_their_format_and_a_newer_one_is_refused_not_misread(tmp_path):
    raw = json.loads((FIXTURES / "results.json").read_text())  # format 1: no "format" key
    assert shape.read(FIXTURES)["points"] == raw["points"]
    shape.write(raw, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["format"] == shape.FORMAT
    (tmp_path / "results.json").write_text(json.dumps({**raw, "format": shape.FORMAT + 1}))
    with pytest.raises(shape.FormatError, match=f"results format {shape.FORMAT + 1}; this version reads"):
        report.build(tmp_path)
    with pytest.raises(shape.FormatError, match="not a running deployment's results"):
        shape.read_remote(FIXTURES)


def test_the_runtime_targets_compare_each_model_with_scikit_learn_in_the_same_round():
    def point(kind, model, rps):
        return {"kind": kind, "model": model, "concurrency": 32, "hit_ratio": 0.0, "rps": rps, "round": 0,
                "p50_ms": 5.0, "p99_ms": 10.0}  # fmt: skip

    points = [
        point("cluster", "iris", 5000.0),
        point("cluster", "digits", 4000.0),
        point(shape.NAMED_COLUMNS, "churn", 5400.0),
        point(shape.SKLEARN_RUNTIME, "iris", 5200.0),
        point(shape.SKLEARN_RUNTIME, "digits", 1000.0),
        point(shape.SKLEARN_RUNTIME, "churn", 1700.0),
        point(shape.BATCHING_OFF, "digits", 150.0),
    ]
    targets = {t["target"]: t for t in judged.evaluate_targets(points, [], 32)}
    digits = targets["digits, new rows: req/s, the default runtime vs scikit-learn"]
    assert (digits["measured"], digits["met"]) == (4.0, True)
    assert targets["iris, new rows: req/s, the default runtime vs scikit-learn"]["met"]  # 0.96 >= 0.9
    assert targets["churn, new rows: req/s, the default runtime vs scikit-learn"]["measured"] == 5400 / 1700
    batching = targets["digits by scikit-learn, all misses: req/s, batching on vs off"]
    assert (batching["measured"], batching["met"]) == (1000 / 150, True)


def test_the_report_says_how_the_cluster_behaves_past_capacity(tmp_path):
    raw = json.loads((FIXTURES / "results.json").read_text())
    point = {
        "offered_rps": 390.0, "requests": 3120, "goodput_rps": 118.0, "ok": 1080, "ok_p50_ms": 118.0,
        "ok_p99_ms": 455.0, "refused": 2040, "refused_p50_ms": 12.0, "refused_p99_ms": 96.0,
        "refused_without_retry_after": 0, "errors": {}, "no_answer": {}, "late_p99_ms": 9.0, "goodput_x": 0.91,
    }  # fmt: skip
    rounds = [{"capacity_rps": 130.0, "points": {"1.5": {**point, "goodput_x": 0.97}, "3.0": point}}]
    raw["overload"] = {
        "model": "digits", "runtime": "digits=sklearn,*=auto", "replicas": 4, "objective_ms": 500.0,
        "times": [1.5, 3.0], "rounds": rounds,
    }  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(raw))
    markdown = report.build(tmp_path)["md"].read_text()
    section = markdown.split("## Past capacity (open loop)")[1].split("\n## ")[0]
    assert section.split("\n\n")[1].startswith(
        "Offered 3× its capacity open loop, the cluster answered 0.91× its capacity within the 500 ms objective "
        "(2xx p99 455 ms) and refused the rest with a JSON 429 and Retry-After (p99 96 ms); 0 of 3120"
    ), section
    assert "| admission | 3× | 0.91 [0.91-0.91] | 118 [118-118] | 455 [455-455] | 65.4 [65.4-65.4] % |" in section


def test_fair_tails_are_judged_open_loop_when_the_sweep_measured_them():
    closed = {"kind": "cluster", "model": "iris", "concurrency": 32, "hit_ratio": 1.0, "rps": 55000.0, "round": 0,
              "p50_ms": 0.4, "p99_ms": 7.3}  # fmt: skip
    tails = [{"model": "iris", "hit_ratio": 1.0, "concurrency": 32, "offered_rps": 27500.0, "rps": 27400.0,
              "p50_ms": 0.5, "p99_ms": 1.2, "statuses": {"200": 160000}, "disturbance": {}, "round": 0}]  # fmt: skip
    before = {t["target"]: t for t in judged.evaluate_targets([closed], [], 32)}
    assert before["fair tails, iris 100% hits, closed loop: p99 / p50"]["measured"] == pytest.approx(18.25)
    after = {t["target"]: t for t in judged.evaluate_targets([closed], [], 32, None, tails)}
    fair = after["fair tails, iris 100% hits, open loop at half capacity: p99 / p50"]
    assert fair["measured"] == pytest.approx(2.4) and fair["met"]
    tails[0]["statuses"] = {"200": 159990, "502": 10}
    failing = {t["target"]: t for t in judged.evaluate_targets([closed], [], 32, None, tails)}
    assert shape.verdict(failing["fair tails, iris 100% hits, open loop at half capacity: p99 / p50"]) == "ERRORS"


def test_every_report_answers_how_many_replicas_and_checks_it_against_the_sweep(tmp_path):
    """The captured sweep measured 1 and 2 replicas: the costs it measured predict both
    within a quarter, and the estimate for the target follows from those costs."""
    from loadtest.report import capacity

    raw = json.loads((FIXTURES / "results.json").read_text())
    raw["capacity_target"] = {"rps": 5000.0, "p99_ms": 80.0}
    (tmp_path / "results.json").write_text(json.dumps(raw))
    markdown = report.build(tmp_path)["md"].read_text()
    section = markdown.split("## Capacity: 5,000 req/s at p99 ≤ 80 ms")[1].split("\n## ")[0]
    assert "Measured here" in section and "Extrapolated" in section
    cost = capacity.costs(raw["points"], "iris", 0.0, 32)
    assert cost is not None and cost.points == 2
    replicas = math.ceil(5000 * cost.replica_ms / 1000 / capacity.UTILIZATION)
    assert f"| iris | 0% | {cost.replica_ms:.3f} / {cost.nginx_ms:.3f} / {cost.redis_ms:.3f} | {replicas} |" in section
    checked = [line for line in section.splitlines() if line.startswith("| iris |") and line.endswith("% |")]
    assert {line.split(" | ")[2] for line in checked} == {"1", "2"}, checked
    for line in checked:
        assert abs(int(line.split(" | ")[-1].strip(" |%+"))) <= 25, line
    # p99 within 80 ms: 1 replica at c=32 (70 ms) yes, 2 replicas at c=32 (133 ms) no.
    assert "up to 32" in section


def test_the_capacity_of_answers_no_replica_computed_is_not_a_division_by_zero():
    """All hits, every answer nginx's L1's: the replicas' CPU per answer reads 0."""
    from loadtest.report import capacity

    cores = {"replica-1": 0.0, "nginx": 0.9, "redis": 0.0, "load generator": 0.4}
    point = {"kind": "cluster", "model": "iris", "hit_ratio": 1.0, "concurrency": 8, "replicas": 1, "rps": 9000.0,
             "p99_ms": 3.0, "cpu_cores": cores}  # fmt: skip
    blocks = capacity.section([point], 2, 8, 10_000.0, 100.0)
    table = next(b for b in blocks if b[0] == "table")
    assert table[2][0][3] == "1", "one replica is enough when the L1 answers everything"
    check = [b for b in blocks if b[0] == "table"][1]
    assert check[2][0][3] == "13,846"  # the machine's 2 cores over nginx's and the generator's 0.144 ms
    nothing = {**point, "cpu_cores": {"replica-1": 0.0, "nginx": 0.0, "redis": 0.0, "load generator": 0.0}}
    assert [b for b in capacity.section([nothing], 2, 8, 10_000.0, 100.0) if b[0] == "table"][1][2] == []
