"""How many replicas and cores for a rate at a p99: the report's capacity section.

From the sweep's own measurements, per model and hit ratio: the CPU one answer costs in the
replicas, in nginx and in Redis (cluster points at the headline concurrency, `/proc` CPU
over 2xx answers, the median over replica counts), and the concurrency per replica at which
the p99 stayed within the target. The estimate: replicas enough for the rate at UTILIZATION
of one core each (a replica's worker is one process on at most one core), nginx's and
Redis's cores at the same utilization. Checked against the sweep itself: for each replica
count measured, the throughput the same costs predict on this machine's cores (the replicas'
cores, or the machine's cores shared by everything the sweep ran, whichever binds) beside
the one measured.

Measured: the costs, on this machine. Extrapolated: that cores elsewhere cost the same,
that the balancer spreads evenly, that the network and Redis keep up, and everything past
this machine's core count.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loadtest.report.common import Block, _fmt

DEFAULT_TARGET_RPS = 10_000.0
DEFAULT_TARGET_P99_MS = 100.0
# The share of a core each component is planned at: headroom for bursts and the tail.
UTILIZATION = 0.7


@dataclass(frozen=True)
class Costs:
    """CPU ms one 2xx answer costs in each component, and how many points they came from."""

    replica_ms: float
    nginx_ms: float
    redis_ms: float
    others_ms: float  # the load generator's: it shares this machine's cores, not a deployment's
    points: int


def _ms(point: Mapping[str, Any], component: str) -> float:
    """CPU ms per 2xx answer of the component (`replica`: every replica together)."""
    cores = point.get("cpu_cores") or {}
    used = (
        sum(v for k, v in cores.items() if k.startswith(component))
        if component == "replica"
        else cores.get(component, 0.0)
    )
    return 1000 * used / point["rps"] if point.get("rps") else math.nan


def costs(points: Sequence[Mapping[str, Any]], model: str, hit: float, concurrency: int) -> Costs | None:
    """The costs of `model` at `hit` from the cluster points at `concurrency`."""
    chosen = [
        p
        for p in points
        if p["kind"] == "cluster" and p["model"] == model and p["hit_ratio"] == hit and p["concurrency"] == concurrency
        and p.get("rps") and p.get("cpu_cores")
    ]  # fmt: skip
    if not chosen:
        return None

    def median(component: str) -> float:
        return statistics.median(_ms(p, component) for p in chosen)

    return Costs(median("replica"), median("nginx"), median("redis"), median("load generator"), len(chosen))


def replicas_for(target_rps: float, replica_ms: float) -> int:
    """Replicas of one worker (at most one core each, planned at UTILIZATION) for `target_rps`
    answers of `replica_ms` CPU ms each."""
    return max(1, math.ceil(target_rps * replica_ms / 1000 / UTILIZATION))


def estimate(cost: Costs, target_rps: float) -> dict[str, float]:
    """Replicas (one core each) and cores of nginx and Redis for `target_rps`."""
    return {
        "replicas": replicas_for(target_rps, cost.replica_ms),
        "nginx_cores": target_rps * cost.nginx_ms / 1000 / UTILIZATION,
        "redis_cores": target_rps * cost.redis_ms / 1000 / UTILIZATION,
    }


def predicted_rps(cost: Costs, replicas: int, cores: int) -> float:
    """What `replicas` replicas answer on a machine of `cores` that also runs nginx, Redis
    and the load generator: the replicas' own cores or the machine's, whichever binds."""
    per_answer = cost.replica_ms + cost.nginx_ms + cost.redis_ms + cost.others_ms
    by_replicas = min(replicas, cores) * 1000 / cost.replica_ms if cost.replica_ms > 0 else math.inf
    by_machine = cores * 1000 / per_answer if per_answer > 0 else math.inf
    return min(by_replicas, by_machine)  # inf: nothing measured costs anything (no CPU read)


def within_p99(points: Sequence[Mapping[str, Any]], model: str, hit: float, target_ms: float) -> float | None:
    """The most clients per replica at which a measured cluster point kept its p99 within
    `target_ms` (None: no point did)."""
    fits = [
        p["concurrency"] / p["replicas"]
        for p in points
        if p["kind"] == "cluster" and p["model"] == model and p["hit_ratio"] == hit and p["p99_ms"] <= target_ms
    ]
    return max(fits) if fits else None


def section(
    points: Sequence[Mapping[str, Any]], cores: int, concurrency: int, target_rps: float, target_p99_ms: float
) -> list[Block]:
    """The capacity section: the estimate per model and hit ratio, and its check."""
    pairs = sorted({(p["model"], p["hit_ratio"]) for p in points if p["kind"] == "cluster"})
    rows, checks = [], []
    for model, hit in pairs:
        cost = costs(points, model, hit, concurrency)
        if cost is None or any(math.isnan(v) for v in (cost.replica_ms, cost.nginx_ms, cost.redis_ms)):
            continue
        planned = estimate(cost, target_rps)
        clients = within_p99(points, model, hit, target_p99_ms)
        rows.append(
            [
                model,
                f"{hit:.0%}",
                f"{cost.replica_ms:.3f} / {cost.nginx_ms:.3f} / {cost.redis_ms:.3f}",
                str(planned["replicas"]),
                _fmt(planned["nginx_cores"], 1),
                _fmt(planned["redis_cores"], 2),
                f"up to {clients:g}" if clients is not None else "none measured",
            ]
        )
        for point in points:
            if (point["kind"], point["model"], point["hit_ratio"], point["concurrency"]) != (
                "cluster",
                model,
                hit,
                concurrency,
            ):
                continue
            predicted = predicted_rps(cost, point["replicas"], cores)
            if math.isinf(predicted):
                continue
            error = (predicted - point["rps"]) / point["rps"] if point["rps"] else math.nan
            checks.append(
                [model, f"{hit:.0%}", str(point["replicas"]), _fmt(predicted), _fmt(point["rps"]), f"{error:+.0%}"]
            )
    if not rows:
        return []
    return [
        ("h2", f"Capacity: {_fmt(target_rps)} req/s at p99 ≤ {_fmt(target_p99_ms)} ms"),
        (
            "p",
            f"For {_fmt(target_rps)} req/s of each model and hit ratio (--target-rps, --target-p99-ms): replicas of "
            f"one worker each, planned at {UTILIZATION:.0%} of a core, and the cores nginx and Redis need at the same "
            "share. Measured here: the CPU one answer costs (ms, from /proc, over 2xx answers, the median of the "
            f"cluster points at c = {concurrency}). Extrapolated: everything past this machine's {cores} cores, "
            "and that other cores cost the same, that nginx spreads evenly, that Redis and the network keep up. "
            "Redis is one thread: past about 0.7 of a core, shard it (a Redis Cluster). p99: the most clients "
            "per replica at which a measured point kept its p99 within the target; the estimate holds the p99 "
            "only as long as each replica has no more clients than that.",
        ),
        (
            "table",
            [
                "model",
                "hits",
                "ms per answer: replicas / nginx / Redis",
                "replicas",
                "nginx cores",
                "Redis cores",
                "p99 within target at clients/replica",
            ],
            rows,
        ),  # fmt: skip
        (
            "p",
            f"The check: the same costs predict what each measured replica count answers on this machine's {cores} "
            "cores (shared by the replicas, nginx, Redis and the load generator), beside what was measured.",
        ),
        ("table", ["model", "hits", "replicas", "predicted req/s", "measured req/s", "error"], checks),
    ]


def remote_section(points: Sequence[Mapping[str, Any]], target_rps: float, target_p99_ms: float) -> list[Block]:
    """The capacity section of a running deployment's report: the replicas only, from their
    own CPU counters (--internal-url); nginx's and Redis's CPU cannot be seen from outside."""
    rows = []
    for model, hit in sorted({(p["model"], p["hit_ratio"]) for p in points}):
        samples = [
            1000 * sum(m["cpu_cores"] for m in p["replica_metrics"].values()) / p["rps"]
            for p in points
            if (p["model"], p["hit_ratio"]) == (model, hit) and p.get("replica_metrics") and p.get("rps")
        ]
        fits = [
            p["concurrency"] / p["replicas"] if p.get("replicas") else None
            for p in points
            if (p["model"], p["hit_ratio"]) == (model, hit) and p["p99_ms"] <= target_p99_ms
        ]
        if not samples:
            continue
        replica_ms = statistics.median(samples)
        replicas = replicas_for(target_rps, replica_ms)
        known = [f for f in fits if f is not None]
        within = f"up to {max(known):g}" if known else ("yes (replica count as found)" if fits else "none measured")
        rows.append([model, f"{hit:.0%}", f"{replica_ms:.3f}", str(replicas), within])
    intro = (
        f"For {_fmt(target_rps)} req/s of each model and hit ratio (--target-rps, --target-p99-ms): replicas of one "
        f"worker each, planned at {UTILIZATION:.0%} of a core, from the CPU one answer cost the replicas (their "
        "prediction_worker_cpu_seconds_total over 2xx answers, the median of the points). Not seen from outside: "
        "nginx's and Redis's CPU (the local sweep, make bench, measures them), so no estimate for them, and no "
        "check against this machine's cores. Extrapolated: that other cores cost the same, that the balancer "
        "spreads evenly, that nginx, Redis and the network keep up."
    )
    if not rows:
        intro = "No estimate: the replicas' CPU was not read (give --internal-url, the balancer's internal listener)."
    blocks: list[Block] = [
        ("h2", f"Capacity: {_fmt(target_rps)} req/s at p99 ≤ {_fmt(target_p99_ms)} ms"),
        ("p", intro),
    ]
    if rows:
        headers = ["model", "hits", "replica CPU ms per answer", "replicas", "p99 within target at clients/replica"]
        blocks.append(("table", headers, rows))
    return blocks
