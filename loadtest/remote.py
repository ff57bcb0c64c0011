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
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from loadtest import results as results_file
from loadtest.measure import run_wrk
from loadtest.parsers import comma_floats, comma_ints
from loadtest.payloads import Mix
from loadtest.report.capacity import DEFAULT_TARGET_P99_MS, DEFAULT_TARGET_RPS
from loadtest.report.remote import build
from loadtest.results import RemotePoint, RemoteResults
from loadtest.settings import BenchSettings

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


def rate_limited_listener(url: str) -> str | None:
    """A warning when `url` is the balancer's public listener, which rate limits every
    client (it refuses /metrics, which the internal listener serves); None otherwise."""
    status, _, body = _get(f"{url}/metrics")
    if status != 403 or b"internal listener" not in body:
        return None
    return (
        f"{url} is the balancer's public listener: it rate limits every client, loopback too "
        "(BALANCER_RATE_LIMIT), so unless this load generator is exempt (BALANCER_RATE_LIMIT_EXEMPT) most "
        "requests will be refused with a 429, and the report counts only 2xx answers as throughput. Benchmark "
        "the internal listener instead (BALANCER_INTERNAL_LISTEN, port 8082 by default; in compose, from inside "
        "the network: the loadtest profile's bench service)."
    )


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


class _ReplicaMetrics:
    """Around one point's wrk run: each replica's CPU seconds and requests from /metrics
    on the internal listener, before and after (None when it does not answer)."""

    def __init__(self, internal_url: str | None) -> None:
        self.internal_url = internal_url
        self.before: dict[str, dict[str, float]] | None = None
        self.after: dict[str, dict[str, float]] | None = None

    def __enter__(self) -> _ReplicaMetrics:
        self.before = replica_metrics(self.internal_url) if self.internal_url else None
        return self

    def __exit__(self, *exc: Any) -> None:
        self.after = replica_metrics(self.internal_url) if self.internal_url else None


def measure(
    plan: RemotePlan, out: Path, replicas: int | None, concurrency: int, hit: float, model: str, round_no: int
) -> RemotePoint:
    """One point: wrk from here as the local sweep runs it (sweep.run_wrk), and the
    replicas' metrics around it when we can read them."""
    mix = Mix(pool_size=plan.pool_size, hit_ratio=hit, skew=plan.skew)
    tag = f"r{replicas or 'x'}-c{concurrency}-h{int(hit * 100)}-{model}-round{round_no + 1}"
    around = _ReplicaMetrics(plan.internal_url)
    parsed, command = run_wrk(plan.url, model, mix, concurrency, plan.seconds, out / "raw", tag, around=around)
    before, after = around.before, around.after
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
        "command": command,
    }


def run(plan: RemotePlan, out: Path) -> RemoteResults:
    """Every point, every round; the scale command first for each replica count."""
    (out / "raw").mkdir(parents=True, exist_ok=True)
    status, _, body = _get(f"{plan.url}/v2/health/ready")
    if status != 200:
        raise RemoteError(f"{plan.url}/v2/health/ready answered {status}: {body[:200]!r}; is the deployment up?")
    warning = rate_limited_listener(plan.url)
    if warning:
        sys.stderr.write(f"bench: WARNING: {warning}\n")
    points: list[RemotePoint] = []
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


def add_capacity_options(parser: argparse.ArgumentParser) -> None:
    """--target-rps and --target-p99-ms: what the report's capacity section plans for."""
    parser.add_argument(
        "--target-rps",
        type=float,
        default=DEFAULT_TARGET_RPS,
        help=f"the report's capacity section: replicas and cores for this rate (default {DEFAULT_TARGET_RPS:g})",
    )
    parser.add_argument(
        "--target-p99-ms",
        type=float,
        default=DEFAULT_TARGET_P99_MS,
        help=f"... at this p99 (default {DEFAULT_TARGET_P99_MS:g} ms)",
    )


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
    add_capacity_options(parser)
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
    reports = Path(BenchSettings.from_env().reports_dir or ROOT / "reports")
    out = (args.out or reports / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")).resolve()
    try:
        results = run(plan, out)
    except (RemoteError, OSError) as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    results["capacity_target"] = {"rps": args.target_rps, "p99_ms": args.target_p99_ms}
    results_file.write(results, out)
    paths = build(out)
    print(f"report: {paths['md']}\n        {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
