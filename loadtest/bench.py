"""The benchmark sweep: replicas × concurrency × cache-hit ratio × model against the local
cluster, the tutorials' baseline measured in the same run, an h2load raw-throughput
comparison and a Locust mix; then the report.

    python -m loadtest.bench [--quick] [--out reports/<timestamp>] [...]   (make bench)
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

from balancer.settings import BalancerSettings
from loadtest import environment as ran_with
from loadtest import overload, peers, profile, report
from loadtest import results as results_file
from loadtest.parsers import (
    comma_floats,
    comma_ints,
)
from loadtest.remote import add_capacity_options
from loadtest.results import (
    BATCHING_OFF,
    CLUSTER_V2,
    NAMED_COLUMNS,
    NGINX_FIXED_REPLY,
    SKLEARN_RUNTIME,
    Point,
    Results,
)
from loadtest.settings import BenchSettings
from loadtest.sweep import QUICK, ROOT, Plan, Sweep
from loadtest.targets import evaluate_targets, print_targets
from localcluster import Cluster, Ports
from localcluster.balancer import worker_processes
from localcluster.processes import which
from localcluster.redis_topology import TOPOLOGIES
from localcluster.settings import DEFAULT_SLOTS, ClusterSettings

# The models every peer serves when the plan has them (the cluster is measured on them
# too, in V2 bodies): a linear model, and a forest, whose predict dominates.
PEER_MODELS = ("iris", "digits")

# The runtime comparison: the same cluster with scikit-learn answering every model
# (SERVICE_RUNTIME=sklearn), new rows, against the default (ONNX Runtime where verified).
RUNTIME_MODELS = ("iris", "digits", "churn")

# The topology comparison measures the replicas' result cache: cached for every model, and
# no L1 in front of it (it would answer the repeated hits itself).
TOPOLOGY_ENVIRONMENT = {"SERVICE_CACHE_POLICY": "on", "BALANCER_L1_CACHE": "off"}


def run_on_topology(sweep: Sweep, topology: str) -> None:
    """The cache points (every model and hit ratio, the most replicas, the headline
    concurrency) on a cluster of their own whose result cache runs on `topology`."""
    replicas, concurrency = max(sweep.plan.replicas), sweep.plan.headline_concurrency
    environ = {**sweep.cluster.environ, **TOPOLOGY_ENVIRONMENT, "CLUSTER_REDIS_TOPOLOGY": topology}
    other = Cluster(sweep.out / f"redis-{topology}-run-{sweep.round + 1}", environ)
    sweep.progress(f"starting a cluster on Redis {topology}")
    other.start(replicas, Ports.auto(DEFAULT_SLOTS), redis=topology)
    try:
        url, pids, access_log, status_url = sweep.cluster_components(other)
        for model in sweep.plan.models:
            for hit_ratio in sweep.plan.hit_ratios:
                sweep.progress(f"cache on Redis {topology}: c={concurrency}, hits {hit_ratio:.0%}, {model}")
                point = sweep.measure(
                    f"cache on Redis {topology}",
                    url,
                    pids,
                    access_log,
                    status_url,
                    replicas,
                    concurrency,
                    hit_ratio,
                    model,
                )
                sweep.points.append({**point, "redis": topology})
                sweep.done += 1
    finally:
        other.stop()


def run_without_batching(sweep: Sweep, model: str, hit_ratio: float, concurrency: int, replicas: int) -> None:
    """The cluster where scikit-learn answers (run_runtime_comparison's) with SERVICE_BATCHING=off,
    in a run directory and on ports of its own: batching shares a slow predict between the
    requests of a call; through ONNX Runtime a forest's predict is too cheap for it to pay.
    Admission control off (SERVICE_LATENCY_OBJECTIVE_MS=0): 32 closed-loop clients on 2
    replicas of a 10 ms predict, one call each, stand in a queue of about 240 ms, over its
    100 ms target, and wrk resends a refusal at once: the point measured 94 % refusals
    (2026-12-07), not what batching saves. What admission does past capacity is the overload
    point's (loadtest/overload.py)."""
    environ = {
        **sweep.cluster.environ,
        "SERVICE_BATCHING": "off",
        "SERVICE_RUNTIME": "sklearn",
        "SERVICE_LATENCY_OBJECTIVE_MS": "0",
    }
    other = Cluster(sweep.out / f"nobatch-run-{sweep.round + 1}", environ)
    other.start(replicas, Ports.auto(DEFAULT_SLOTS))
    try:
        sweep.progress(f"cluster without batching: {replicas} replica(s), c={concurrency}, {model}")
        url, pids, access_log, status_url = sweep.cluster_components(other)
        point = sweep.measure(BATCHING_OFF, url, pids, access_log, status_url, replicas, concurrency, hit_ratio, model)
        sweep.points.append(point)
        sweep.done += 1
    finally:
        other.stop()


def run_named_columns(sweep: Sweep) -> None:
    """One point of the demo churn model (a row is an object of named, mixed-type columns,
    predicted as a DataFrame by a ColumnTransformer Pipeline) on the cluster as run_cluster
    left it (the most replicas), new rows at the headline concurrency: next to iris's point
    of the same round (LogisticRegression too, on plain rows), what DataFrame inputs cost."""
    replicas, concurrency = sweep.plan.replicas[-1], sweep.plan.headline_concurrency
    sweep.progress(f"cluster: {replicas} replica(s), c={concurrency}, new rows, churn (named columns)")
    url, pids, access_log, status_url = sweep.cluster_components()
    point = sweep.measure(NAMED_COLUMNS, url, pids, access_log, status_url, replicas, concurrency, 0.0, "churn")
    sweep.points.append(point)
    sweep.done += 1


def peer_models(plan: Plan) -> list[str]:
    """The models the peers serve in this plan."""
    return [m for m in PEER_MODELS if m in plan.models]


def start_peers(sweep: Sweep) -> dict[tuple[str, str], peers.MLServerPeer]:
    """Every peer of the plan for each of its models, installed if missing and started (the
    caller stops them)."""
    started: dict[tuple[str, str], peers.MLServerPeer] = {}
    try:
        for name in sweep.plan.peers:
            for model in peer_models(sweep.plan):
                sweep.progress(f"starting {peers.KNOWN[name]} for {model} (loadtest/peers.py)")
                artifact = ROOT / "models" / model / "1" / "model.joblib"
                # In front of it, an nginx run as the cluster's balancer runs: as many workers,
                # the same scheduling policy (measured: batch neither helps nor hurts MLServer).
                workers = worker_processes(sweep.cluster.environ)
                scheduling = BalancerSettings.from_env(sweep.cluster.environ).scheduling
                nginx = which("nginx") or "nginx"
                peer = peers.MLServerPeer(
                    sweep.out / f"{name}-{model}-run",
                    model,
                    artifact,
                    nginx,
                    nginx_workers=workers,
                    nginx_scheduling=scheduling,
                )
                started[(name, model)] = peer.start()
    except BaseException:
        for peer in started.values():
            peer.stop()
        raise
    return started


def run_peers(sweep: Sweep, started: dict[tuple[str, str], peers.MLServerPeer]) -> None:
    """At each concurrency, for each peer model: the cluster as run_cluster left it (the most
    replicas), then each peer serving the same artifact, new rows, the same V2 bodies: what a
    dedicated model server gives instead."""
    replicas = sweep.plan.replicas[-1]
    for model in peer_models(sweep.plan) if started else []:
        for concurrency in sweep.plan.concurrency:
            sweep.progress(f"cluster, V2: {replicas} replica(s), c={concurrency}, new rows, {model}")
            url, pids, access_log, status_url = sweep.cluster_components()
            point = sweep.measure(
                CLUSTER_V2, url, pids, access_log, status_url, replicas, concurrency, 0.0, model, "v2"
            )
            sweep.points.append(point)
            sweep.done += 1
            for (name, served), peer in started.items():
                if served != model:
                    continue
                sweep.progress(f"{peer.name}: c={concurrency}, new rows, {model}")
                point = sweep.measure(peer.name, peer.url, peer.pids(), None, None, 0, concurrency, 0.0, model, "v2")
                sweep.points.append({**point, "peer": name, "setup": peer.describe()})
                sweep.done += 1


def run_runtime_comparison(sweep: Sweep) -> None:
    """The same cluster with scikit-learn answering every model (SERVICE_RUNTIME=sklearn), in a
    run directory and on ports of its own: new rows of each model at the headline concurrency,
    the most replicas, beside the default cluster's points of the same round."""
    replicas, concurrency = max(sweep.plan.replicas), sweep.plan.headline_concurrency
    environ = {**sweep.cluster.environ, "SERVICE_RUNTIME": "sklearn"}
    other = Cluster(sweep.out / f"sklearn-run-{sweep.round + 1}", environ)
    sweep.progress("starting a cluster where scikit-learn answers every model")
    other.start(replicas, Ports.auto(DEFAULT_SLOTS))
    try:
        url, pids, access_log, status_url = sweep.cluster_components(other)
        for model in RUNTIME_MODELS:
            sweep.progress(f"scikit-learn runtime: {replicas} replica(s), c={concurrency}, new rows, {model}")
            point = sweep.measure(SKLEARN_RUNTIME, url, pids, access_log, status_url, replicas, concurrency, 0.0, model)
            sweep.points.append(point)
            sweep.done += 1
    finally:
        other.stop()


def run_cpu_reference(sweep: Sweep, model: str = "iris") -> None:
    """The replica CPU target's measurement (loadtest.profile): one replica worker and a
    minimal Flask app doing the same predict, each one gunicorn gevent worker loaded
    directly by wrk (all misses, the headline concurrency), one after the other. Absolute
    CPU per request moves between machines; the ratio of the two in one run does not."""
    args = argparse.Namespace(
        model=model,
        protocol="v1",
        hit_ratio=0.0,
        connections=sweep.plan.headline_concurrency,
        seconds=sweep.plan.seconds,
    )
    sweep.progress(f"CPU per request: one replica worker vs a minimal Flask app, {model}")
    with profile.side_by_side(sweep.out / f"cpu-run-{sweep.round + 1}", model, sweep.cluster.environ) as workers:
        for name, (url, worker) in workers.items():
            tag = f"cpu-{name.split()[0]}-round{sweep.round + 1}"
            with sweep.watching({name: worker}) as disturbed:
                measured = profile.measure(url, worker, args, sweep.out / "raw", tag)
            sweep.commands.append(f"WRK_PAYLOADS=raw/{tag}.lua {measured['command']}")
            sweep.cpu_reference.append(
                {
                    "kind": name,
                    "model": model,
                    "hit_ratio": 0.0,
                    "concurrency": args.connections,
                    "rps": measured["rps"],
                    "cpu_ms": measured["cpu_ms"],
                    "disturbance": disturbed,
                    "round": sweep.round,
                }
            )
    sweep.done += 1


def write_csv(points: list[Point], path: Path) -> None:
    """One row per point, flat."""
    columns = [
        "kind",
        "replicas",
        "concurrency",
        "hit_ratio",
        "model",
        "rps",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "requests",
        "non_2xx",
        "socket_errors",
    ]
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow([*columns, "cache", "served_by", "nginx_p50_ms", "upstream_p50_ms", "cpu_cores"])
        for p in points:
            writer.writerow(
                [
                    *(cast(Mapping[str, Any], p)[c] for c in columns),
                    json.dumps(p["cache"]),
                    json.dumps(p["served_by"]),
                    p["access_log"]["nginx_p50_ms"],
                    p["access_log"]["upstream_p50_ms"],
                    json.dumps({k: round(v, 3) for k, v in p["cpu_cores"].items()}),
                ]
            )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    settings = BenchSettings.from_env()
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer points, shorter (< 2 min)")
    parser.add_argument("--replicas", type=comma_ints, help="e.g. 1,2,4")
    parser.add_argument("--concurrency", type=comma_ints, help="e.g. 1,8,32,128")
    parser.add_argument("--hit-ratios", type=comma_floats, help="e.g. 0,0.9,1")
    parser.add_argument("--models", type=lambda s: tuple(s.split(",")), help="e.g. iris,digits")
    parser.add_argument("--seconds", type=float, help="duration of each point")
    parser.add_argument("--no-baseline", action="store_true", help="skip the tutorial baseline")
    parser.add_argument(
        "--rounds",
        type=int,
        help="run the whole plan this many times, cluster and baseline "
        "interleaved in each; targets take the median (default 1; bench-targets 3)",
    )
    parser.add_argument("--out", type=Path, help="report folder (default reports/<UTC timestamp>)")
    parser.add_argument(
        "--redis",
        type=lambda s: tuple(t for t in s.split(",") if t),
        metavar="TOPOLOGIES",
        help="also compare the cache points on these Redis topologies (single, cluster, sentinel), "
        "each in a cluster of its own with the cache on and no L1, in the same rounds; ratios are "
        "against the first: e.g. --redis single,cluster",
    )
    parser.add_argument(
        "--peers",
        type=lambda s: tuple(p for p in s.split(",") if p and p != "none"),
        metavar="PEERS",
        help=f"also measure these dedicated model servers in every round, installed in .peers/ when missing "
        f"({', '.join(peers.KNOWN)}; bench-targets: mlserver; none: no peer): iris, new rows, V2 bodies, beside "
        "the cluster at the most replicas",
    )
    parser.add_argument(
        "--overload",
        type=lambda s: tuple(float(t) for t in s.split(",") if t and t != "none"),
        metavar="MULTIPLES",
        help="the overload point: open loop at these multiples of the measured capacity, on a cluster of its own "
        "(default 1.5,3; --quick and --targets: none; none: skip)",
    )
    parser.add_argument(
        "--targets",
        action="store_true",
        help="only the performance targets' points, then one line per target (make bench-targets)",
    )
    parser.add_argument(
        "--disturbance-cores",
        type=float,
        default=settings.disturbance_cores,
        help="mark a point disturbed when processes the benchmark does not know, or steal time, use more cores "
        "than this meanwhile (default 0.1, env BENCH_DISTURBANCE_CORES)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=settings.wait_quiet_s,
        metavar="SECONDS",
        help="before measuring, wait up to this long for the machine to be quiet (default 0: only warn; env "
        "BENCH_WAIT_QUIET_S)",
    )
    add_capacity_options(parser)
    args = parser.parse_args(argv)

    plan = QUICK if args.quick else Plan()
    if args.targets:
        plan = Plan(
            replicas=(os.cpu_count() or 2,),
            concurrency=(32,),
            hit_ratios=(0.0, 1.0),
            models=("iris", "digits"),
            seconds=8.0,
            locust_seconds=0.0,
            rounds=3,
            overload=(),
        )
    chosen = {
        "replicas": args.replicas,
        "concurrency": args.concurrency,
        "hit_ratios": args.hit_ratios,
        "models": args.models,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "redis_topologies": args.redis,
        "peers": args.peers if args.peers is not None else (("mlserver",) if args.targets else None),
        "overload": args.overload,
    }
    overrides = {k: v for k, v in chosen.items() if v is not None}
    plan = Plan(
        **{
            **asdict(plan),
            **overrides,
            "baseline": not args.no_baseline,
            "disturbance_cores": args.disturbance_cores,
            "wait_quiet_s": args.wait_quiet,
        }
    )
    # Absolute: nginx and gunicorn of the baseline run with their own working directories.
    out = (args.out or ROOT / "reports" / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")).resolve()
    out.mkdir(parents=True, exist_ok=True)

    unknown_peers = set(plan.peers) - set(peers.KNOWN)
    if unknown_peers:
        parser.error(f"--peers: unknown {', '.join(sorted(unknown_peers))}; known: {', '.join(peers.KNOWN)}")
    unknown = set(plan.redis_topologies) - set(TOPOLOGIES)
    if unknown:
        parser.error(f"--redis: unknown topology {', '.join(sorted(unknown))}; one of {', '.join(TOPOLOGIES)}")
    cluster = Cluster(ROOT / ClusterSettings.from_env().run_dir)
    reused = cluster.status().healthy
    before = cluster.status().replicas if reused else None
    if not reused:
        sys.stderr.write("bench: starting the local cluster (scripts/cluster up)\n")
        cluster.start(max(plan.replicas))
    sweep = Sweep(plan, out, cluster, None)
    if args.targets:
        # batching off, the CPU reference, the runtimes; each cluster point's tails open loop
        sweep.total += (2 + len(RUNTIME_MODELS) + len(plan.models) * len(plan.hit_ratios)) * plan.rounds
    baseline_argv = None
    locust = None
    started: dict[tuple[str, str], peers.MLServerPeer] = {}
    overload_rounds: list[dict[str, Any]] = []
    try:
        started = start_peers(sweep)
        peer_pids = {f"{key}:{name}": pid for key, peer in started.items() for name, pid in peer.pids().items()}
        sweep.wait_until_quiet({**sweep.cluster_components()[1], **peer_pids})
        for round_no in range(plan.rounds):
            sweep.round = round_no
            sweep.run_cluster()
            if args.targets:
                sweep.run_open_loop_tails()
            run_named_columns(sweep)
            run_peers(sweep, started)
            if round_no == 0:
                ran = ran_with.what_ran(cluster, out)
            for topology in plan.redis_topologies:
                run_on_topology(sweep, topology)
            url = str(cluster.status().internal)
            sweep.progress("h2load: cluster, iris, all hits, c=32")
            _, pids, _, status_url = sweep.cluster_components()
            sweep.h2load_results.append(sweep.h2load("cluster", url, pids))
            sweep.progress("h2load: nginx's own fixed reply (stub_status), c=32")
            sweep.h2load_results.append(sweep.h2load(NGINX_FIXED_REPLY, status_url, pids, fixed_reply=True))
            if args.targets:
                run_without_batching(sweep, "digits", 0.0, plan.headline_concurrency, max(plan.replicas))
                run_cpu_reference(sweep)
                run_runtime_comparison(sweep)
            if plan.baseline:
                baseline_argv = sweep.run_baseline()
            if plan.overload:
                overload.run_overload(sweep, overload_rounds)
        if plan.locust_seconds > 0:
            sweep.progress("Locust: a realistic mix")
            locust = sweep.run_locust(url)
    finally:
        for peer in started.values():
            peer.stop()
        if reused and before:
            cluster.scale(before)
        elif not reused:
            cluster.stop()
    results: Results = {
        "environment": ran_with.environment(plan, baseline_argv, ran),
        "points": sweep.points,
        "h2load": sweep.h2load_results,
        "locust": locust,
        "cpu_reference": sweep.cpu_reference,
        "commands": sweep.commands,
        "capacity_target": {"rps": args.target_rps, "p99_ms": args.target_p99_ms},
    }
    if overload_rounds:
        results["overload"] = {
            "model": "digits",
            "runtime": overload.EXPENSIVE["SERVICE_RUNTIME"],
            "replicas": max(plan.replicas),
            "objective_ms": overload.objective_ms(cluster.environ),
            "times": list(plan.overload),
            "rounds": overload_rounds,
        }
    if args.targets:
        results["open_loop_tails"] = sweep.tails
        results["targets"] = evaluate_targets(
            sweep.points, sweep.h2load_results, plan.headline_concurrency, sweep.cpu_reference, sweep.tails
        )
    results_file.write(results, out)
    write_csv(sweep.points, out / "points.csv")
    sys.stderr.write("\n")
    paths = report.build(out)
    if args.targets:
        print(print_targets(results.get("targets", [])))
    print(f"report: {paths['md']}\n        {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
