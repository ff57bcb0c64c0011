"""The shape of a sweep's results.json, declared once: the sweep (bench.py, sweep.py) writes
it, the report reads it back, at any later time. JSON-native types (TypedDicts), so a
point is written and read with no conversion, and mypy checks every key on both sides.

`FORMAT` is the version of this shape: results.json carries it, and the report refuses a
file of a newer format rather than misreading it. Format 1 (no `format` key) is this shape
with fewer optional keys; it is read as is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NotRequired, TypedDict

FORMAT = 2

# The kinds of points a sweep writes besides "cluster" and "baseline".
CLUSTER_V2 = "cluster, V2"  # the cluster at the peers' points (V2 bodies, new iris rows)
NAMED_COLUMNS = "cluster, named columns"  # the churn model's point
BATCHING_OFF = "cluster, batching off"
SKLEARN_RUNTIME = "cluster, scikit-learn runtime"  # SERVICE_RUNTIME=sklearn: no model compiled
NGINX_FIXED_REPLY = "nginx's own reply (stub_status)"  # h2load's GETs of stub_status: the L1's ceiling


class WrkNumbers(TypedDict):
    """What loadtest/wrk_mix.lua reports of one run (parsers.parse_wrk)."""

    requests: int
    seconds: float
    rps: float  # 2xx answers per second: throughput counts only the work done
    sent_rps: NotRequired[float]  # every answer per second, refusals and errors included
    refused: NotRequired[int]  # 429s and 503s: refusals (rate limited, shed, closing)
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int]
    socket_errors: int
    non_2xx: int
    cache: dict[str, int]  # X-Cache values
    served_by: dict[str, int]  # X-Served-By values


class AccessLog(TypedDict):
    """The balancer's access log over one point (parsers.summarize_access_log)."""

    requests: int
    statuses: dict[str, int]
    served_by: dict[str, int]
    retried: int
    l1: NotRequired[dict[str, int]]
    nginx_p50_ms: float
    nginx_p99_ms: float
    upstream_p50_ms: float
    upstream_p99_ms: float


# Whether processes the benchmark does not know used the CPU during a point (procstat.watching):
# disturbed (bool), other_cores, steal_cores, threshold_cores.
Disturbance = dict[str, Any]


class Point(WrkNumbers):
    """One point of the local sweep: one server, one load, one round."""

    kind: str  # "cluster", "baseline", a peer's name, CLUSTER_V2, NAMED_COLUMNS, ...
    replicas: int
    concurrency: int
    hit_ratio: float
    model: str
    protocol: NotRequired[str]  # "v1" or "v2"
    access_log: AccessLog
    cpu_cores: dict[str, float]  # per process tree, cores busy on average
    stub_status: dict[str, int] | None
    rss_mb: NotRequired[dict[str, float]]
    disturbance: NotRequired[Disturbance]
    round: NotRequired[int]
    cpu_ms_per_request: NotRequired[dict[str, float | None]]
    command: str
    redis: NotRequired[str]  # the Redis topology of the cluster's result cache
    peer: NotRequired[str]
    setup: NotRequired[str]


class H2loadPoint(TypedDict):
    """One h2load run: a hot iris row through the L1, or nginx's stub_status."""

    kind: str
    concurrency: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int]
    total: NotRequired[int]
    started: NotRequired[int]
    done: NotRequired[int]
    succeeded: NotRequired[int]
    failed: NotRequired[int]
    errored: NotRequired[int]
    timeout: NotRequired[int]
    s2xx: NotRequired[int]
    s3xx: NotRequired[int]
    s4xx: NotRequired[int]
    s5xx: NotRequired[int]
    disturbance: NotRequired[Disturbance]
    round: NotRequired[int]
    command: str


class CpuReference(TypedDict):
    """CPU per request of one replica worker and of a minimal Flask app (loadtest.profile)."""

    kind: str
    model: str
    hit_ratio: float
    concurrency: int
    rps: float
    cpu_ms: float
    disturbance: NotRequired[Disturbance]
    round: int


class Target(TypedDict):
    """A performance target judged over the rounds (targets.py)."""

    target: str
    measured: float
    min: float
    max: float
    runs: int
    goal: float
    at_least: bool
    met: bool
    disturbed: bool
    failed_requests: int


class Locust(TypedDict):
    users: int
    exit_code: int
    rows: list[dict[str, Any]]
    cache_mix: str
    command: str


class TailsPoint(TypedDict):
    """A closed-loop point's model and hit ratio offered open loop at half its throughput
    (Sweep.open_loop_tails): the fair-tails targets judge these."""

    model: str
    hit_ratio: float
    concurrency: int
    offered_rps: float
    rps: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]
    disturbance: dict[str, Any]
    round: int


class CapacityTarget(TypedDict):
    """The rate and p99 the report's capacity section plans for (--target-rps, --target-p99-ms)."""

    rps: float
    p99_ms: float


class Overload(TypedDict):
    """The sweep's overload point (bench.run_overload, loadtest/overload.py): a cluster of the
    most replicas serving `model`, its capacity measured closed loop, then offered `times`
    × that open loop; one `overload.measure` result per round."""

    model: str
    runtime: str  # how the model was served (SERVICE_RUNTIME)
    replicas: int
    objective_ms: float
    times: list[float]
    rounds: list[dict[str, Any]]


class Results(TypedDict):
    """A local sweep's results.json."""

    format: NotRequired[int]
    environment: dict[str, Any]  # what ran: versions, plan, settings (bench.environment)
    points: list[Point]
    h2load: list[H2loadPoint]
    locust: Locust | None
    cpu_reference: NotRequired[list[CpuReference]]
    commands: list[str]
    targets: NotRequired[list[Target]]
    overload: NotRequired[Overload | None]
    open_loop_tails: NotRequired[list[TailsPoint]]
    capacity_target: NotRequired[CapacityTarget]


class RemotePoint(WrkNumbers):
    """One point of a running deployment (`--url`): what wrk saw, and each replica's CPU
    and requests from its /metrics when the internal listener answers."""

    replicas: int | None  # None: as found (no scale command)
    concurrency: int
    hit_ratio: float
    model: str
    round: int
    replica_metrics: dict[str, dict[str, float]] | None
    command: str


class RemoteResults(TypedDict):
    """A running deployment's results.json (`--url`)."""

    format: NotRequired[int]
    plan: dict[str, Any]
    finished_utc: str
    wrk: list[str]
    scaled: list[dict[str, Any]]
    points: list[RemotePoint]
    capacity_target: NotRequired[CapacityTarget]


def failed_requests(point: Mapping[str, Any]) -> int:
    """Requests of a point (wrk's or h2load's) that got no 2xx answer: statuses, socket
    errors, timeouts."""
    if "non_2xx" in point:  # wrk's, counted by the parser
        bad = int(point["non_2xx"])
    else:
        bad = sum(count for status, count in (point.get("statuses") or {}).items() if not str(status).startswith("2"))
    return bad + sum(int(point.get(field) or 0) for field in ("socket_errors", "errored", "timeout"))


def mostly_refused(point: Mapping[str, Any]) -> bool:
    """Whether most of a point's requests got no 2xx answer (refused or failed): its
    throughput and latency describe the refusals, not the service."""
    requests = int(point.get("requests") or 0)
    return requests > 0 and failed_requests(point) > requests / 2


def refusal_advice(points: list[Mapping[str, Any]]) -> str | None:
    """What happened, and how to fix it, when points were mostly refused (None if none)."""
    refused = [p for p in points if mostly_refused(p)]
    if not refused:
        return None
    limited = sum(int(p.get("refused") or 0) for p in refused)
    failed = sum(failed_requests(p) for p in refused)
    share = failed / max(1, sum(int(p.get("requests") or 0) for p in refused))
    if limited >= failed / 2:
        cause = (
            "answered 429/503 (refused): the balancer's public listener rate limits every client, loopback too, "
            "and a replica past capacity sheds load. Benchmark the internal listener (BALANCER_INTERNAL_LISTEN, "
            "8082 by default; in compose, from inside the network: the loadtest profile), or exempt the load "
            "generator (BALANCER_RATE_LIMIT_EXEMPT)"
        )
    else:
        cause = "failed (errors or no answer): see the errors column and the raw wrk output in raw/"
    return (
        f"⚠ {len(refused)} of {len(points)} points are marked ✗: {share:.0%} of their requests got no 2xx answer, "
        f"most {cause}. req/s everywhere counts 2xx answers only; their latencies describe the refusals."
    )


def disturbed(point: Mapping[str, Any] | None) -> bool:
    """Whether processes the benchmark did not know (or steal time) used the CPU during it."""
    return bool(point and point.get("disturbance", {}).get("disturbed"))


def verdict(target: Target) -> str:
    """ERRORS when a point it was judged from had failed requests (its numbers count them
    as served), UNSURE when one was disturbed, else MET or MISS."""
    if target.get("failed_requests"):
        return "ERRORS"
    return "UNSURE" if target.get("disturbed") else "MET" if target["met"] else "MISS"


class FormatError(ValueError):
    """A results.json this version cannot read."""


def write(results: Results | RemoteResults, folder: Path) -> Path:
    """folder/results.json, stamped with FORMAT."""
    path = folder / "results.json"
    path.write_text(json.dumps({"format": FORMAT, **results}, indent=1))
    return path


def read_json(folder: Path) -> dict[str, Any]:
    """folder/results.json as written, once its format is one this version reads."""
    path = folder / "results.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: cannot read it ({exc})") from None
    version = raw.get("format", 1) if isinstance(raw, dict) else None
    if not isinstance(version, int) or not 1 <= version <= FORMAT:
        raise FormatError(f"{path}: results format {version!r}; this version reads formats 1 to {FORMAT}")
    return raw


def read(folder: Path) -> Results:
    """A local sweep's results."""
    raw = read_json(folder)
    if "environment" not in raw:
        raise FormatError(f"{folder / 'results.json'}: not a local sweep's results (no environment)")
    return raw  # type: ignore[return-value]  # the shape checked above is the one written


def read_remote(folder: Path) -> RemoteResults:
    """A running deployment's results."""
    raw = read_json(folder)
    if "plan" not in raw:
        raise FormatError(f"{folder / 'results.json'}: not a running deployment's results (no plan)")
    return raw  # type: ignore[return-value]
