"""The benchmark sweep against a deployment that is already running, started by someone
else (the compose stack, a Kubernetes overlay, a local cluster): `scripts/bench --url`.

    python -m loadtest.remote --url http://balancer:8082 [--internal-url URL] [--quick]
        [--concurrency 1,8,32] [--hit-ratios 0,1] [--models iris] [--seconds 8] [--rounds 1]
        [--scale-command 'docker compose up -d --no-recreate --scale api={n}' --replicas 1,2,4]

It never starts, stops or reconfigures the deployment; only a --scale-command the user
gives changes it, once per replica count. Each point is wrk with the sweep's payloads
(concurrency × hit ratio × model), after the same warm-up. What it sees from outside:
throughput, latency percentiles, statuses and errors, where each answer came from
(`X-L1-Cache`, `X-Cache`) and which replica gave it (`X-Served-By`). Given the internal
listener (--internal-url, where /metrics answers), it also reads each replica's CPU and
requests from its metrics before and after each point. The report says what it could not
see: no baseline, no per-process CPU of nginx or Redis, no access log.

In the compose stack it runs as the loadtest profile's `bench` service (the loadtest image
carries wrk and matplotlib, not the local cluster tooling: nothing here imports it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from loadtest.generators import write_wrk_payloads, wrk_argv
from loadtest.parsers import comma_floats, comma_ints, parse_wrk
from loadtest.payloads import Mix
from loadtest.warmup import warm_caches

ROOT = Path(__file__).resolve().parent.parent
# A replica's CPU, and the prediction requests it answered (a model named: not /metrics itself).
METRIC = re.compile(
    r'^(prediction_worker_cpu_seconds_total|prediction_http_requests_total(?=\{model="[^"]))(\{[^}]*\})? ([0-9.eE+-]+)$'
)


@dataclass(frozen=True)
class RemotePlan:
    url: str
    internal_url: str | None = None
    concurrency: tuple[int, ...] = (1, 8, 32)
    hit_ratios: tuple[float, ...] = (0.0, 1.0)
    models: tuple[str, ...] = ("iris",)
    seconds: float = 8.0
    rounds: int = 1
    replicas: tuple[int, ...] = ()
    scale_command: str | None = None
    pool_size: int = 1000
    skew: str = "zipf"


QUICK = {"concurrency": (8, 32), "hit_ratios": (0.0, 1.0), "models": ("iris",), "seconds": 3.0}


class RemoteError(Exception):
    """The deployment cannot be benchmarked as asked (it does not answer, a command failed)."""


def _get(url: str, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def replica_metrics(internal_url: str, tries: int = 40) -> dict[str, dict[str, float]]:
    """Each replica's CPU seconds and answered requests, from /metrics on the internal
    listener: the balancer sends each scrape to one replica (round robin, `X-Served-By`
    says which), so scrape until no new replica shows up for a while."""
    seen: dict[str, dict[str, float]] = {}
    quiet = 0
    for _ in range(tries):
        status, headers, body = _get(f"{internal_url}/metrics")
        if status != 200:
            raise RemoteError(f"{internal_url}/metrics answered {status}: {body[:200]!r}")
        replica = headers.get("X-Served-By", "?")
        values = {"cpu_s": 0.0, "requests": 0.0}
        for line in body.decode(errors="replace").splitlines():
            match = METRIC.match(line)
            if match:
                values["cpu_s" if match[1].startswith("prediction_worker") else "requests"] += float(match[3])
        quiet = quiet + 1 if replica in seen else 0
        seen[replica] = values
        if quiet >= max(6, 2 * len(seen)):
            break
    return seen


def wait_until_spread(url: str, replicas: int, timeout: float = 120) -> set[str]:
    """After a scale command: until `replicas` distinct replicas answer through the
    balancer, and a round of answers comes from exactly that many."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    while time.monotonic() < deadline:
        seen = set()
        for _ in range(4 * replicas):
            status, headers, _ = _get(f"{url}/v2/health/ready", timeout=5)
            if status == 200:
                seen.add(headers.get("X-Served-By", "?"))
        if len(seen) == replicas:
            return seen
        time.sleep(1)
    raise RemoteError(f"after scaling, {len(seen)} replica(s) answered through the balancer, not {replicas}")


def measure(
    plan: RemotePlan, out: Path, replicas: int | None, concurrency: int, hit: float, model: str, round_no: int
) -> dict[str, Any]:
    """One point: wrk from here, and the replicas' metrics around it when we can read them."""
    mix = Mix(pool_size=plan.pool_size, hit_ratio=hit, skew=plan.skew)
    if hit > 0:
        warm_caches(plan.url, model, mix)
    tag = f"r{replicas or 'x'}-c{concurrency}-h{int(hit * 100)}-{model}-round{round_no + 1}"
    nonce = random.SystemRandom().randint(10**5, 10**6 - 1)  # as the local sweep draws it
    payloads = write_wrk_payloads(out / "raw" / f"{tag}.lua", model, mix, nonce)
    argv = wrk_argv(plan.url, concurrency, plan.seconds)
    before = replica_metrics(plan.internal_url) if plan.internal_url else None
    result = subprocess.run(
        argv,
        env={**os.environ, "WRK_PAYLOADS": str(payloads)},
        capture_output=True,
        text=True,
        timeout=plan.seconds + 60,
    )
    after = replica_metrics(plan.internal_url) if plan.internal_url else None
    (out / "raw" / f"{tag}.wrk.txt").write_text(result.stdout + result.stderr)
    payloads.unlink()
    parsed = parse_wrk(result.stdout)
    per_replica = None
    if before is not None and after is not None:
        seconds = parsed["seconds"] or plan.seconds
        per_replica = {
            replica: {
                "cpu_cores": round((values["cpu_s"] - before[replica]["cpu_s"]) / seconds, 3),
                "requests": int(values["requests"] - before[replica]["requests"]),
            }
            for replica, values in sorted(after.items())
            if replica in before
        }
    return {
        "replicas": replicas,
        "concurrency": concurrency,
        "hit_ratio": hit,
        "model": model,
        "round": round_no,
        **parsed,
        "replica_metrics": per_replica,
        "command": f"WRK_PAYLOADS=raw/{tag}.lua " + shlex.join(argv),
    }


def run(plan: RemotePlan, out: Path) -> dict[str, Any]:
    """Every point, every round; the scale command first for each replica count."""
    (out / "raw").mkdir(parents=True, exist_ok=True)
    status, _, body = _get(f"{plan.url}/v2/health/ready")
    if status != 200:
        raise RemoteError(f"{plan.url}/v2/health/ready answered {status}: {body[:200]!r}; is the deployment up?")
    points: list[dict[str, Any]] = []
    scaled: list[dict[str, Any]] = []
    counts: list[int | None] = list(plan.replicas) or [None]
    total = plan.rounds * len(counts) * len(plan.models) * len(plan.hit_ratios) * len(plan.concurrency)
    for round_no in range(plan.rounds):
        for replicas in counts:
            if plan.scale_command and replicas is not None:
                command = plan.scale_command.replace("{n}", str(replicas))
                sys.stderr.write(f"bench: {command}\n")
                started = time.monotonic()
                done = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=900)
                if done.returncode != 0:
                    raise RemoteError(f"the scale command failed ({done.returncode}): {done.stderr[-2000:]}")
                answered = wait_until_spread(plan.url, replicas)
                scaled.append({"replicas": replicas, "seconds": round(time.monotonic() - started, 1)})
                sys.stderr.write(f"bench: {len(answered)} replica(s) answer through the balancer\n")
            for model in plan.models:
                for hit in plan.hit_ratios:
                    for concurrency in plan.concurrency:
                        sys.stderr.write(
                            f"[{len(points) + 1}/{total}] replicas {replicas or 'as found'}, c={concurrency}, "
                            f"hits {hit:.0%}, {model}\n"
                        )
                        points.append(measure(plan, out, replicas, concurrency, hit, model, round_no))
    return {
        "plan": asdict(plan),
        "finished_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "wrk": subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()[:1],
        "scaled": scaled,
        "points": points,
    }


# --- the report -----------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _grouped(points: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for point in points:
        groups.setdefault(tuple(point[k] for k in keys), []).append(point)
    return groups


def _shares(counts: dict[str, int]) -> str:
    """`name share %, ...`; a share under 1 % shows as such, not as 0 %."""
    total = sum(counts.values()) or 1
    shares = ((name, 100 * n / total) for name, n in sorted(counts.items()))
    return ", ".join(f"{name} {share:.0f} %" if share >= 1 else f"{name} <1 %" for name, share in shares)


def _order(item: tuple[tuple, Any]) -> tuple:
    """Sort groups by their key, numbers as numbers, `as found` (None) first."""
    return tuple((-1 if value is None else value) for value in item[0])


def blocks(results: dict[str, Any], folder: Path) -> list[tuple[Any, ...]]:
    """The report of a remote run, in report.py's blocks (so the same writers render it)."""
    from loadtest.report import _figure, _fmt, failed_requests

    plan, points = results["plan"], results["points"]
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    out: list[tuple[Any, ...]] = [
        ("h1", "Throughput report: a running deployment"),
        (
            "p",
            f"Measured from outside, at {plan['url']} (wrk, one thread, {plan['seconds']:g} s a point, "
            f"{plan['rounds']} round(s); medians over rounds). The benchmark did not start, stop or reconfigure the "
            + (
                "deployment."
                if not plan["scale_command"]
                else f"deployment except by the scale command you gave: {plan['scale_command']}."
            ),
        ),
    ]
    rows = []
    for (replicas, model, hit, conc), group in sorted(
        _grouped(points, "replicas", "model", "hit_ratio", "concurrency").items(), key=_order
    ):
        cache: dict[str, int] = {}
        for point in group:  # answers of every round together
            for state, n in point["cache"].items():
                cache[state] = cache.get(state, 0) + n
        rows.append(
            [
                str(replicas or "as found"),
                model,
                f"{hit:.0%}",
                str(conc),
                _fmt(_median([p["rps"] for p in group])),
                _fmt(_median([p["p50_ms"] for p in group]), 2),
                _fmt(_median([p["p99_ms"] for p in group]), 2),
                _shares(cache),
                str(sum(failed_requests(p) for p in group)),
            ]
        )
    out += [
        ("h2", "Every point"),
        (
            "p",
            "Answers: L1 = the balancer's micro-cache answered (no replica took part); HIT/MISS = the replicas' "
            "Redis result cache; OFF = not cached by the model's policy; BYPASS = Redis unavailable.",
        ),
        ("table", ["replicas", "model", "hits", "c", "req/s", "p50 ms", "p99 ms", "answers", "errors"], rows),
    ]
    series = []
    for (replicas, model, hit), group in sorted(_grouped(points, "replicas", "model", "hit_ratio").items(), key=_order):
        by_c = _grouped(group, "concurrency")
        xs = sorted(c for (c,) in by_c)
        ys = [_median([p["rps"] for p in by_c[(c,)]]) for c in xs]
        label = f"{model}, hits {hit:.0%}" + (f", {replicas} replicas" if replicas else "")
        series.append((label, xs, ys, "-", [None] * len(xs)))
    out += _figure(
        plots,
        "throughput.png",
        "Throughput against concurrency",
        "connections",
        "req/s",
        "Medians over rounds.",
        series,
        logx=True,
    )
    if plan["replicas"]:
        top = max(plan["concurrency"])
        scale_series = []
        for (model, hit), group in sorted(_grouped(points, "model", "hit_ratio").items(), key=_order):
            at_top = _grouped([p for p in group if p["concurrency"] == top], "replicas")
            xs = sorted(r for (r,) in at_top)
            ys = [_median([p["rps"] for p in at_top[(r,)]]) for r in xs]
            scale_series.append((f"{model}, hits {hit:.0%}", xs, ys, "-", [None] * len(xs)))
        out += _figure(
            plots,
            "replicas.png",
            f"Throughput against replicas (c={top})",
            "replicas",
            "req/s",
            "Each replica count set by the scale command, measured once every replica answered.",
            scale_series,
        )
    spread_rows = []
    for point in points:
        metrics = point["replica_metrics"] or {}
        spread_rows.append(
            [
                str(point["replicas"] or "as found"),
                point["model"],
                f"{point['hit_ratio']:.0%}",
                str(point["concurrency"]),
                _shares(point["served_by"]),
                "; ".join(f"{r} {m['cpu_cores']:.2f} cores" for r, m in metrics.items()) or "not read",
            ]
        )
    out += [
        ("h2", "The spread over replicas"),
        (
            "p",
            "Share of answers by who gave them (X-Served-By; the L1's answers count as nginx). CPU per replica is "
            "read from each replica's prediction_worker_cpu_seconds_total on the internal listener"
            + (" (--internal-url)." if plan["internal_url"] else ": not given, so not read."),
        ),
        ("table", ["replicas", "model", "hits", "c", "answers by", "replica CPU"], spread_rows),
    ]
    cannot = [
        "No baseline: the tutorials' single-replica set-up is measured only by the local sweep (make bench).",
        "No CPU of nginx, Redis or the load generator: their processes are not on this host, or not ours to read.",
        "No access log: nginx's own times per request (total, upstream) and retries are not visible from outside.",
        "No disturbance marks: other load on the deployment's machines cannot be seen from here.",
    ]
    if not plan["internal_url"]:
        cannot.append("No per-replica CPU or request counts: no --internal-url was given.")
    if not plan["replicas"]:
        cannot.append("No scaling curve: the replica count was left as found (give --scale-command and --replicas).")
    out += [("h2", "What this report could not see"), *[("p", f"- {line}") for line in cannot]]
    out += [
        ("h2", "How it ran"),
        ("pre", "\n".join(p["command"] for p in points)),
        ("p", "Raw data: results.json and raw/ beside this report."),
    ]
    return out


def build(folder: Path) -> dict[str, Path]:
    """report.md and report.html from folder/results.json."""
    from loadtest.report import to_html, to_markdown

    content = blocks(json.loads((folder / "results.json").read_text()), folder)
    md, page = folder / "report.md", folder / "report.html"
    md.write_text(to_markdown(content, folder))
    page.write_text(to_html(content))
    return {"md": md, "html": page}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="scripts/bench --url", description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True, help="where to send the load: the balancer, e.g. http://balancer:8082")
    parser.add_argument("--internal-url", help="the balancer's internal listener, where /metrics answers")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few short points")
    parser.add_argument("--concurrency", type=comma_ints, help="e.g. 1,8,32")
    parser.add_argument("--hit-ratios", type=comma_floats, help="e.g. 0,0.9,1")
    parser.add_argument("--models", type=lambda s: tuple(s.split(",")), help="e.g. iris,digits")
    parser.add_argument("--seconds", type=float, help="duration of each point")
    parser.add_argument("--rounds", type=int, help="run every point this many times (medians in the report)")
    parser.add_argument("--replicas", type=comma_ints, help="replica counts, with --scale-command: e.g. 1,2,4")
    parser.add_argument(
        "--scale-command",
        help="a shell command that sets the replica count {n}, e.g. "
        "'docker compose up -d --no-recreate --scale api={n}'; run from the project folder",
    )
    parser.add_argument(
        "--out", type=Path, help="report folder (default $BENCH_REPORTS_DIR or reports/, then <UTC timestamp>)"
    )
    args = parser.parse_args(argv)
    if bool(args.replicas) != bool(args.scale_command):
        parser.error("--replicas and --scale-command go together")
    if args.scale_command and "{n}" not in args.scale_command:
        parser.error("--scale-command must contain {n}, the replica count")
    plan = RemotePlan(url=args.url.rstrip("/"), internal_url=(args.internal_url or "").rstrip("/") or None)
    if args.quick:
        plan = replace(plan, **QUICK)  # type: ignore[arg-type]
    chosen = {
        "concurrency": args.concurrency,
        "hit_ratios": args.hit_ratios,
        "models": args.models,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "replicas": args.replicas,
        "scale_command": args.scale_command,
    }
    plan = replace(plan, **{k: v for k, v in chosen.items() if v is not None})
    reports = Path(os.environ.get("BENCH_REPORTS_DIR") or ROOT / "reports")
    out = (args.out or reports / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")).resolve()
    try:
        results = run(plan, out)
    except (RemoteError, OSError) as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    (out / "results.json").write_text(json.dumps(results, indent=1))
    paths = build(out)
    print(f"report: {paths['md']}\n        {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
