"""The benchmark sweep: replicas × concurrency × cache-hit ratio × model against the local
cluster, the tutorials' baseline measured in the same run, an h2load raw-throughput
comparison and a Locust mix; then the report.

    python -m loadtest.bench [--quick] [--out reports/<timestamp>] [...]   (make bench)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from balancer.render import BalancerSettings, access_log_settle_s
from loadtest import peers, profile, report
from loadtest.baseline import BASELINE_WORKERS, Baseline
from loadtest.generators import (
    h2load_argv,
    predict_path,
    write_wrk_payloads,
    wrk_argv,
)
from loadtest.parsers import (
    comma_floats,
    comma_ints,
    parse_h2load,
    parse_h2load_log,
    parse_locust_stats,
    parse_stub_status,
    parse_wrk,
    summarize_access_log,
)
from loadtest.payloads import Mix, pool_row
from loadtest.procstat import busy_cores, memory, snapshot, watching
from loadtest.warmup import warm_caches
from localcluster import Cluster, Ports, free_port
from localcluster.balancer import worker_processes
from localcluster.cluster import DEFAULT_SLOTS, Status, setting
from localcluster.processes import which
from localcluster.redis_topology import TOPOLOGIES
from service.settings import Settings
from service.settings.redis_url import RedisUrlError, parse_redis_url, redact_url

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plan:
    """What the sweep measures."""

    replicas: tuple[int, ...] = (1, 2, 4)
    concurrency: tuple[int, ...] = (1, 8, 32, 128)
    hit_ratios: tuple[float, ...] = (0.0, 0.9, 1.0)
    models: tuple[str, ...] = ("iris", "digits")
    seconds: float = 6.0
    baseline: bool = True
    pool_size: int = 1000
    skew: str = "zipf"
    locust_seconds: float = 15.0
    # Cores that processes the benchmark does not know (or steal time) may use during a
    # point before it is marked disturbed; how long to wait for a quiet machine first.
    disturbance_cores: float = 0.1
    wait_quiet_s: float = 0.0
    # Rounds of the whole plan, cluster and baseline interleaved in each (bench-targets: 3).
    rounds: int = 1
    # Redis topologies (localcluster.redis_topology) to compare the cache points on, each in
    # a cluster of its own, at the most replicas and the headline concurrency.
    redis_topologies: tuple[str, ...] = ()
    # Dedicated model servers (loadtest.peers) measured beside the cluster in every round:
    # iris, new rows, V2 bodies, at each concurrency, against the cluster at the most replicas.
    peers: tuple[str, ...] = ()

    @property
    def headline_concurrency(self) -> int:
        """The concurrency the summary compares at: 32, or the nearest planned."""
        return min(self.concurrency, key=lambda c: abs(c - 32))


QUICK = Plan(
    replicas=(1, 2), concurrency=(8, 32), hit_ratios=(0.0, 1.0), models=("iris",), seconds=3.0, locust_seconds=5.0
)


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)


def _version(argv: list[str]) -> str:
    try:
        result = _run(argv, timeout=10)
    except OSError:
        return "not found"
    text = (result.stdout + result.stderr).strip().splitlines()
    return text[0] if text else "?"


class Sweep:
    """Runs every point and writes raw results; report.py turns them into the report."""

    def __init__(self, plan: Plan, out: Path, cluster: Cluster, port: int | None) -> None:
        self.plan = plan
        self.out = out
        self.cluster = cluster
        self.port = port
        self.points: list[dict[str, Any]] = []
        self.commands: list[str] = []
        self.started = time.monotonic()
        self.done = 0
        self.h2load_results: list[dict[str, Any]] = []
        self.cpu_reference: list[dict[str, Any]] = []  # run_cpu_reference
        self.total = len(plan.replicas) * len(plan.concurrency) * len(plan.hit_ratios) * len(plan.models)
        self.total += 1  # run_named_columns
        if plan.baseline:
            self.total += len(plan.concurrency) * len(plan.models)
        self.total += len(plan.redis_topologies) * len(plan.models) * len(plan.hit_ratios)
        self.total += len(plan.concurrency) * (1 + len(plan.peers)) if plan.peers else 0
        self.total *= plan.rounds
        self.round = 0
        (out / "raw").mkdir(parents=True, exist_ok=True)

    # progress ---------------------------------------------------------------------------
    def progress(self, what: str) -> None:
        """One line: how far, what runs now, and an estimate of what is left."""
        elapsed = time.monotonic() - self.started
        left = (elapsed / self.done) * (self.total - self.done) if self.done else self.total * (self.plan.seconds + 2)
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
        line = f"{bar}  {what}  ~{int(left) // 60}m{int(left) % 60:02d}s left"
        end = "\r" if sys.stderr.isatty() else "\n"
        sys.stderr.write(f"\x1b[2K{line}{end}" if end == "\r" else f"{line}\n")
        sys.stderr.flush()

    # one point --------------------------------------------------------------------------
    def measure(
        self,
        kind: str,
        url: str,
        components: dict[str, int],
        access_log: Path | None,
        status_url: str | None,
        replicas: int,
        concurrency: int,
        hit_ratio: float,
        model: str,
        protocol: str = "v1",
    ) -> dict[str, Any]:
        """Run wrk for one point and collect everything the report shows about it: with KServe
        V1 bodies, or V2 ones (`protocol`); `access_log` None for a server that keeps none."""
        mix = Mix(pool_size=self.plan.pool_size, hit_ratio=hit_ratio, skew=self.plan.skew)
        if hit_ratio > 0:
            warm_caches(url, model, mix)
        nonce = random.SystemRandom().randint(10**5, 10**6 - 1)
        tag = f"{kind}-r{replicas}-c{concurrency}-h{int(hit_ratio * 100)}-{model}".replace(" ", "").replace(",", "-")
        tag += f"-round{self.round + 1}" if self.plan.rounds > 1 else ""
        payloads = write_wrk_payloads(self.out / "raw" / f"{tag}.lua", model, mix, nonce, protocol=protocol)
        argv = wrk_argv(url, concurrency, self.plan.seconds)
        log_offset = access_log.stat().st_size if access_log and access_log.exists() else 0
        stub_before = self._stub(status_url)
        cpu_before = snapshot(components)
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with self.watching(components) as disturbed:
            result = _run(argv, env={**os.environ, "WRK_PAYLOADS": str(payloads)}, timeout=self.plan.seconds + 60)
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_after = snapshot(components)
        rss_mb = memory(components)
        stub_after = self._stub(status_url)
        (self.out / "raw" / f"{tag}.wrk.txt").write_text(result.stdout + result.stderr)
        payloads.unlink()
        parsed = parse_wrk(result.stdout)
        seconds = parsed["seconds"] or self.plan.seconds
        cpu = {name: (cpu_after.get(name, 0.0) - cpu_before.get(name, 0.0)) / seconds for name in cpu_before}
        cpu["load generator"] = (
            children_after.ru_utime + children_after.ru_stime - children_before.ru_utime - children_before.ru_stime
        ) / seconds
        access = summarize_access_log([])
        if access_log is not None:
            time.sleep(access_log_settle_s(self.cluster.environ))  # nginx writes its log in blocks
            with access_log.open("rb") as log:
                log.seek(log_offset)
                access = summarize_access_log(line.decode(errors="replace") for line in log)
        stub = None
        if stub_before and stub_after:
            stub = {k: stub_after[k] - stub_before[k] for k in ("accepts", "handled", "requests")}
            stub["active_after"] = stub_after["active"]
        self.commands.append(f"WRK_PAYLOADS=raw/{tag}.lua " + " ".join(argv))
        return {
            "kind": kind,
            "replicas": replicas,
            "concurrency": concurrency,
            "hit_ratio": hit_ratio,
            "model": model,
            "protocol": protocol,
            **parsed,
            "access_log": access,
            "cpu_cores": cpu,
            "stub_status": stub,
            "rss_mb": rss_mb,
            "disturbance": disturbed,
            "round": self.round,
            "cpu_ms_per_request": {
                name: round(value * seconds * 1000 / parsed["requests"], 3) if parsed["requests"] else None
                for name, value in cpu.items()
            },
            "command": self.commands[-1],
        }

    def watching(self, components: dict[str, int]) -> contextlib.AbstractContextManager[dict[str, Any]]:
        """procstat.watching at this plan's threshold."""
        return watching(components, self.plan.disturbance_cores)

    def wait_until_quiet(self, components: dict[str, int]) -> None:
        """Before measuring: sample the machine for a few seconds; warn if others keep it
        busy, or wait (up to plan.wait_quiet_s) for a quiet moment."""
        deadline = time.monotonic() + self.plan.wait_quiet_s
        while True:
            busy = busy_cores(3.0, components)
            if busy <= self.plan.disturbance_cores:
                return
            if time.monotonic() >= deadline:
                sys.stderr.write(
                    f"\nbench: WARNING: other processes keep {busy:.2f} cores busy (threshold "
                    f"{self.plan.disturbance_cores:g}); points measured now will be marked disturbed. Stop them, "
                    "or pass --wait-quiet SECONDS to wait for a quiet machine.\n"
                )
                return
            sys.stderr.write(f"\nbench: waiting for a quiet machine (others use {busy:.2f} cores)\n")

    def _stub(self, url: str | None) -> dict[str, int] | None:
        if not url:
            return None
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return parse_stub_status(response.read().decode())
        except (OSError, ValueError):
            return None

    # the cluster ------------------------------------------------------------------------
    def cluster_components(self, cluster: Cluster | None = None) -> tuple[str, dict[str, int], Path, str]:
        """The balancer's internal listener (load generators measure the cluster, not the
        public listener's limiter: as in compose), process trees to account CPU to, the
        access log, stub_status URL."""
        status = (cluster or self.cluster).status()
        pids = {c.name: c.pid for c in status.components if c.running}
        assert status.internal is not None, "the cluster is not running"
        return status.internal, pids, Path(status.logs) / "access.log", status.component("nginx").health

    def run_cluster(self) -> None:
        """Every replicas × concurrency × hit ratio × model point."""
        topology = self.cluster.status().redis_topology
        for replicas in self.plan.replicas:
            self.progress(f"scaling the cluster to {replicas} replica(s)")
            self.cluster.scale(replicas)
            self._wait_for_spread(replicas)
            url, pids, access_log, status_url = self.cluster_components()
            for model in self.plan.models:
                for hit_ratio in self.plan.hit_ratios:
                    for concurrency in self.plan.concurrency:
                        self.progress(f"cluster: {replicas} replica(s), c={concurrency}, hits {hit_ratio:.0%}, {model}")
                        point = self.measure(
                            "cluster", url, pids, access_log, status_url, replicas, concurrency, hit_ratio, model
                        )
                        self.points.append({**point, "redis": topology})
                        self.done += 1

    def _wait_for_spread(self, replicas: int) -> None:
        """After scaling up, nginx finds a new replica within fail_timeout: wait for it."""
        url = self.cluster.status().internal
        wanted = {f"replica-{i}" for i in range(1, replicas + 1)}
        deadline = time.monotonic() + 30
        seen: set[str] = set()
        body = json.dumps({"instances": [pool_row("iris", 0)]}).encode()
        while time.monotonic() < deadline and not wanted <= seen:
            request = urllib.request.Request(
                f"{url}{predict_path('iris')}", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                seen.add(response.headers.get("X-Served-By", ""))

    # the baseline -----------------------------------------------------------------------
    def run_baseline(self) -> dict[str, list[str]]:
        """The tutorials' set-up on its own ports, same points at hit ratio 0 (no cache)."""
        nginx = which("nginx") or "nginx"
        baseline = Baseline(self.out / f"baseline-run-{self.round + 1}", free_port(), free_port(), nginx)
        self.progress("starting the baseline (gunicorn sync, no cache, no upstream keepalive)")
        baseline.start()
        try:
            for model in self.plan.models:
                for concurrency in self.plan.concurrency:
                    self.progress(f"baseline: c={concurrency}, {model}")
                    self.points.append(
                        self.measure(
                            "baseline",
                            baseline.url,
                            baseline.pids(),
                            baseline.run_dir / "access.log",
                            None,
                            1,
                            concurrency,
                            0.0,
                            model,
                        )
                    )
                    self.done += 1
            self.progress("h2load: baseline, iris, all hits, c=32")
            raw = self.h2load("baseline", baseline.url, baseline.pids())
        finally:
            baseline.stop()
        self.h2load_results.append(raw)
        return baseline.argv()

    def h2load(
        self, kind: str, url: str, components: dict[str, int], connections: int = 32, fixed_reply: bool = False
    ) -> dict[str, Any]:
        """Raw throughput: h2load, one fixed iris row (all hits on the cluster); or, with
        `fixed_reply`, GETs of `url` itself (nginx's stub_status: what nginx answers fastest)."""
        body: Path | None = None
        if not fixed_reply:
            body = self.out / "raw" / "h2load-body.json"
            body.write_text(json.dumps({"instances": [pool_row("iris", 0)]}))
            url = f"{url}{predict_path('iris')}"
        name = f"h2load-{kind}".replace(" ", "-").replace("'", "")
        name += f"-round{self.round + 1}" if self.plan.rounds > 1 else ""
        log = self.out / "raw" / f"{name}.log"
        argv = h2load_argv(url, body, connections, self.plan.seconds, log)
        with self.watching(components) as disturbed:
            result = _run(argv, timeout=self.plan.seconds + 60)
        (self.out / "raw" / f"{name}.txt").write_text(result.stdout + result.stderr)
        summary = parse_h2load(result.stdout)
        latency = parse_h2load_log(log.read_text())
        self.commands.append(" ".join(argv))
        return {
            "kind": kind,
            "concurrency": connections,
            **summary,
            **latency,
            "disturbance": disturbed,
            "round": self.round,
            "command": " ".join(argv),
        }

    def run_locust(self, url: str) -> dict[str, Any]:
        """A short realistic mix with Locust (its CSV and HTML go into the report folder)."""
        users = 16
        argv = [
            str(Path(sys.executable).parent / "locust"),
            "-f",
            str(ROOT / "loadtest" / "locustfile.py"),
            "--host",
            url,
            "--headless",
            "-u",
            str(users),
            "-r",
            str(users),
            "-t",
            f"{max(1, round(self.plan.locust_seconds))}s",
            "--hit-ratio",
            "0.9",
            "--csv",
            str(self.out / "locust"),
            "--html",
            str(self.out / "locust.html"),
            "--only-summary",
            "MixUser",
        ]
        result = _run(argv, timeout=self.plan.locust_seconds + 120, cwd=ROOT)
        (self.out / "raw" / "locust.txt").write_text(result.stdout + result.stderr)
        self.commands.append(" ".join(argv))
        stats_file = self.out / "locust_stats.csv"
        rows = parse_locust_stats(stats_file.read_text()) if stats_file.exists() else []
        mix = re.search(r"X-Cache mix: (\{.*\})", result.stdout + result.stderr)
        return {
            "users": users,
            "exit_code": result.returncode,
            "rows": rows,
            "cache_mix": mix.group(1) if mix else "",
            "command": " ".join(argv),
        }


# The model every peer serves (the cluster is measured on it too, in V2 bodies).
PEER_MODEL = "iris"

# h2load's GETs of the balancer's stub_status: nginx's fastest answer, the L1's ceiling.
NGINX_FIXED_REPLY = "nginx's own reply (stub_status)"

# The replica CPU target: 0.45 ms per iris request where a minimal Flask app took 0.69.
CPU_VS_MINIMAL = 0.65

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
    """The same cluster with SERVICE_BATCHING=off, in a run directory and on ports of its own."""
    other = Cluster(sweep.out / f"nobatch-run-{sweep.round + 1}", {**sweep.cluster.environ, "SERVICE_BATCHING": "off"})
    other.start(replicas, Ports.auto(DEFAULT_SLOTS))
    try:
        sweep.progress(f"cluster without batching: {replicas} replica(s), c={concurrency}, {model}")
        url, pids, access_log, status_url = sweep.cluster_components(other)
        point = sweep.measure(
            "cluster, batching off", url, pids, access_log, status_url, replicas, concurrency, hit_ratio, model
        )
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
    point = sweep.measure(report.NAMED_COLUMNS, url, pids, access_log, status_url, replicas, concurrency, 0.0, "churn")
    sweep.points.append(point)
    sweep.done += 1


def start_peers(sweep: Sweep) -> dict[str, peers.MLServerPeer]:
    """Every peer of the plan, installed if missing and started (the caller stops them)."""
    started: dict[str, peers.MLServerPeer] = {}
    try:
        for name in sweep.plan.peers:
            sweep.progress(f"starting {peers.KNOWN[name]} (loadtest/peers.py)")
            artifact = ROOT / "models" / PEER_MODEL / "1" / "model.joblib"
            # In front of it, an nginx run as the cluster's balancer runs: as many workers,
            # the same scheduling policy (measured: batch neither helps nor hurts MLServer).
            workers = worker_processes(sweep.cluster.environ)
            scheduling = BalancerSettings.from_env(sweep.cluster.environ).scheduling
            nginx = which("nginx") or "nginx"
            peer = peers.MLServerPeer(
                sweep.out / f"{name}-run",
                PEER_MODEL,
                artifact,
                nginx,
                nginx_workers=workers,
                nginx_scheduling=scheduling,
            )
            started[name] = peer.start()
    except BaseException:
        for peer in started.values():
            peer.stop()
        raise
    return started


def run_peers(sweep: Sweep, started: dict[str, peers.MLServerPeer]) -> None:
    """At each concurrency: the cluster as run_cluster left it (the most replicas), then each
    peer, iris, new rows, the same V2 bodies: what a dedicated model server gives instead."""
    replicas = sweep.plan.replicas[-1]
    for concurrency in sweep.plan.concurrency:
        sweep.progress(f"cluster, V2: {replicas} replica(s), c={concurrency}, new rows, {PEER_MODEL}")
        url, pids, access_log, status_url = sweep.cluster_components()
        point = sweep.measure(
            report.CLUSTER_V2, url, pids, access_log, status_url, replicas, concurrency, 0.0, PEER_MODEL, "v2"
        )
        sweep.points.append(point)
        sweep.done += 1
        for name, peer in started.items():
            sweep.progress(f"{peer.name}: c={concurrency}, new rows, {PEER_MODEL}")
            point = sweep.measure(peer.name, peer.url, peer.pids(), None, None, 0, concurrency, 0.0, PEER_MODEL, "v2")
            sweep.points.append({**point, "peer": name, "setup": peer.describe()})
            sweep.done += 1


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


def evaluate_targets(
    points: list[dict[str, Any]],
    h2load: list[dict[str, Any]],
    concurrency: int,
    cpu_reference: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The performance targets, each judged by the median over the rounds of its value
    measured within one round (cluster and baseline interleaved), with the min-max spread;
    `disturbed` if any point behind it was (then it is neither met nor missed)."""
    rounds = sorted({p.get("round", 0) for p in points})

    def find(items: list[dict[str, Any]], round_no: int, **where: Any) -> dict[str, Any] | None:
        return next(
            (p for p in items if p.get("round", 0) == round_no and all(p.get(k) == v for k, v in where.items())), None
        )

    def point(round_no: int, kind: str, model: str, hit: float | None = None) -> dict[str, Any] | None:
        where = {"kind": kind, "model": model, "concurrency": concurrency}
        return find(points, round_no, **where, **({} if hit is None else {"hit_ratio": hit}))

    targets = []

    def add(name: str, goal: float, at_least: bool, value: Any) -> None:
        """value(round) -> (measured, points used) or None."""
        measured, used = [], []
        for round_no in rounds:
            found = value(round_no)
            if found is not None and found[0] is not None:
                measured.append(found[0])
                used += found[1]
        if not measured:
            return
        median = statistics.median(measured)
        targets.append(
            {
                "target": name,
                "measured": median,
                "min": min(measured),
                "max": max(measured),
                "runs": len(measured),
                "goal": goal,
                "at_least": at_least,
                "met": median >= goal if at_least else median <= goal,
                "disturbed": any(p.get("disturbance", {}).get("disturbed") for p in used),
                "failed_requests": sum(report.failed_requests(p) for p in used),
            }
        )

    def ratio(ours: dict[str, Any] | None, theirs: dict[str, Any] | None, field: str) -> Any:
        if not (ours and theirs and theirs[field]):
            return None
        return ours[field] / theirs[field], [ours, theirs]

    for hit, goal, label in ((1.0, 1.8, "all hits"), (0.0, 2.0, "all misses")):
        add(
            f"iris, {label}: req/s vs baseline",
            goal,
            True,
            lambda r, h=hit: ratio(point(r, "cluster", "iris", h), point(r, "baseline", "iris"), "rps"),
        )
    add(
        "iris, all hits: p99 vs baseline",
        1.0,
        False,
        lambda r: ratio(point(r, "cluster", "iris", 1.0), point(r, "baseline", "iris"), "p99_ms"),
    )
    # The L1's ceiling is nginx's: a hit reads the body, builds the key and reads the cache
    # file, where stub_status only formats counters, on the same nginx and connections.
    add(
        "hot iris row through the L1 (h2load): req/s vs nginx's own fixed reply",
        0.5,
        True,
        lambda r: ratio(find(h2load, r, kind="cluster"), find(h2load, r, kind=NGINX_FIXED_REPLY), "rps"),
    )
    # The same V2 bodies, new rows, at the same concurrency, one after the other in a round.
    add(
        f"iris, new rows (V2): req/s vs {peers.MLSERVER}",
        2.0,
        True,
        lambda r: ratio(point(r, report.CLUSTER_V2, "iris", 0.0), point(r, peers.MLSERVER, "iris", 0.0), "rps"),
    )
    add(
        "hot iris row through the L1 (h2load): req/s vs baseline",
        15.0,
        True,
        lambda r: ratio(find(h2load, r, kind="cluster"), find(h2load, r, kind="baseline"), "rps"),
    )
    # <= 0.45 ms where a minimal Flask app took 0.69 ms (docs/performance.md): judged against
    # that app measured in the same round, since absolute CPU moves between machines.
    add(
        "iris, all misses: replica worker CPU vs a minimal Flask app",
        CPU_VS_MINIMAL,
        False,
        lambda r: ratio(
            find(cpu_reference or [], r, kind=profile.REPLICA),
            find(cpu_reference or [], r, kind=profile.MINIMAL),
            "cpu_ms",
        ),
    )

    def batching(round_no: int, field: str) -> Any:
        return ratio(
            point(round_no, "cluster", "digits", 0.0), point(round_no, "cluster, batching off", "digits", 0.0), field
        )

    add("digits, all misses: req/s, batching on vs off", 5.0, True, lambda r: batching(r, "rps"))
    add("digits, all misses: p99, batching on vs off", 1.0, False, lambda r: batching(r, "p99_ms"))

    def tails(round_no: int, model: str, hit: float) -> Any:
        found = point(round_no, "cluster", model, hit)
        return (found["p99_ms"] / found["p50_ms"], [found]) if found and found["p50_ms"] else None

    for model, hit in sorted({(p["model"], p["hit_ratio"]) for p in points if p["kind"] == "cluster"}):
        add(f"fair tails, {model} {hit:.0%} hits: p99 / p50", 3.0, False, lambda r, m=model, h=hit: tails(r, m, h))
    return targets


def print_targets(targets: list[dict[str, Any]]) -> str:
    """One line per target: verdict, measured, goal."""
    lines = []
    for t in targets:
        sign = ">=" if t["at_least"] else "<="
        measured = f"{t['measured']:.2f}" if t["measured"] is not None else "n/a"
        spread = f"  [{t['min']:.2f}–{t['max']:.2f}, {t['runs']} runs]" if t.get("runs", 1) > 1 else ""
        why = "  (disturbed: other processes used the CPU meanwhile)" if t.get("disturbed") else ""
        if t.get("failed_requests"):
            why += f"  ({t['failed_requests']} requests in its points got no 2xx answer)"
        lines.append(
            f"{report.verdict(t):<6}  {t['target']:<56} {measured:>7}  (target {sign} {t['goal']:g}){spread}{why}"
        )
    return "\n".join(lines)


def _redacted(value: str) -> str:
    """A setting's value, a Redis URL of any topology without its password."""
    try:
        return parse_redis_url(value).redacted
    except RedisUrlError:
        return redact_url(value) if "://" in value else value


def what_ran(cluster: Cluster, out: Path) -> dict[str, Any]:
    """The cluster's settings as it ran, read from it: each replica's effective settings
    (from the environment its process started with) and the nginx.conf nginx runs."""
    conf = cluster.nginx_conf.read_text()
    status = cluster.status()
    (out / "raw").mkdir(parents=True, exist_ok=True)
    (out / "raw" / "nginx.conf").write_text(conf)
    replicas = {
        name: {key: _redacted(value) for key, value in Settings.from_env(environ).flat().items()}
        for name, environ in cluster.replica_environments().items()
    }
    first = next(iter(replicas.values()), {})
    common = {k: v for k, v in first.items() if all(r[k] == v for r in replicas.values())}
    defaults = {key: _redacted(value) for key, value in Settings.from_env({}).flat().items()}
    directives = (
        "worker_processes",
        "limit_req_zone",
        "keepalive ",
        "gzip_min_length",
        "client_max_body_size",
        "proxy_read_timeout",
        "proxy_next_upstream_tries",
        "listen",
    )
    return {
        "service_settings": common,
        "service_non_default": {k: v for k, v in common.items() if defaults.get(k) != v},
        "per_replica": {name: {k: v for k, v in r.items() if k not in common} for name, r in replicas.items()},
        "nginx_conf": "raw/nginx.conf",
        "nginx_directives": [line.strip() for line in conf.splitlines() if line.strip().startswith(directives)]
        + [f"# scheduling policy of nginx's processes: {nginx_scheduling(status)}"],
        "redis_topology": status.redis_topology,
    }


def nginx_scheduling(status: Status) -> str:
    """The Linux scheduling policy the cluster's nginx master runs under (BALANCER_SCHEDULING)."""
    names = {os.SCHED_OTHER: "SCHED_OTHER (normal)", os.SCHED_BATCH: "SCHED_BATCH"}
    try:
        policy = os.sched_getscheduler(status.component("nginx").pid)
    except (OSError, KeyError, ValueError):
        return "unknown"
    return names.get(policy, str(policy))


def environment(plan: Plan, baseline_argv: dict[str, list[str]] | None, ran: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to trust or reproduce the numbers; the settings are what ran."""
    sha = _run(["git", "rev-parse", "HEAD"], cwd=ROOT).stdout.strip() or "unknown"
    dirty = bool(_run(["git", "status", "--porcelain"], cwd=ROOT).stdout.strip())
    cpu_model = "unknown"
    try:
        cpu_model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    nginx = which("nginx") or "nginx"
    return {
        "git_sha": sha + (" (uncommitted changes)" if dirty else ""),
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            "nginx": _version([nginx, "-v"]),
            "redis": _version(["redis-server", "--version"]),
            "gunicorn": _version([str(Path(sys.executable).parent / "gunicorn"), "--version"]),
            "wrk": _version(["wrk", "-v"]),
            "h2load": _version(["h2load", "--version"]),
            "locust": _version([str(Path(sys.executable).parent / "locust"), "--version"]),
        },
        "plan": asdict(plan),
        **ran,
        "baseline": {"workers": BASELINE_WORKERS, "commands": baseline_argv},
    }


def write_csv(points: list[dict[str, Any]], path: Path) -> None:
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
                    *(p[c] for c in columns),
                    json.dumps(p["cache"]),
                    json.dumps(p["served_by"]),
                    p["access_log"]["nginx_p50_ms"],
                    p["access_log"]["upstream_p50_ms"],
                    json.dumps({k: round(v, 3) for k, v in p["cpu_cores"].items()}),
                ]
            )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
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
        "--targets",
        action="store_true",
        help="only the performance targets' points, then one line per target (make bench-targets)",
    )
    parser.add_argument(
        "--disturbance-cores",
        type=float,
        default=float(os.environ.get("BENCH_DISTURBANCE_CORES", "0.1")),
        help="mark a point disturbed when processes the benchmark does not know, or steal time, use more cores "
        "than this meanwhile (default 0.1, env BENCH_DISTURBANCE_CORES)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=float(os.environ.get("BENCH_WAIT_QUIET_S", "0")),
        metavar="SECONDS",
        help="before measuring, wait up to this long for the machine to be quiet (default 0: only warn; env "
        "BENCH_WAIT_QUIET_S)",
    )
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
    cluster = Cluster(ROOT / setting(os.environ, "CLUSTER_RUN_DIR"))
    reused = cluster.status().healthy
    before = cluster.status().replicas if reused else None
    if not reused:
        sys.stderr.write("bench: starting the local cluster (scripts/cluster up)\n")
        cluster.start(max(plan.replicas))
    sweep = Sweep(plan, out, cluster, None)
    if args.targets:
        sweep.total += 2 * plan.rounds  # batching off, and the CPU reference
    baseline_argv = None
    locust = None
    started: dict[str, peers.MLServerPeer] = {}
    try:
        started = start_peers(sweep)
        peer_pids = {name: pid for peer in started.values() for name, pid in peer.pids().items()}
        sweep.wait_until_quiet({**sweep.cluster_components()[1], **peer_pids})
        for round_no in range(plan.rounds):
            sweep.round = round_no
            sweep.run_cluster()
            run_named_columns(sweep)
            run_peers(sweep, started)
            if round_no == 0:
                ran = what_ran(cluster, out)
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
            if plan.baseline:
                baseline_argv = sweep.run_baseline()
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
    results: dict[str, Any] = {
        "environment": environment(plan, baseline_argv, ran),
        "points": sweep.points,
        "h2load": sweep.h2load_results,
        "locust": locust,
        "cpu_reference": sweep.cpu_reference,
        "commands": sweep.commands,
    }
    if args.targets:
        results["targets"] = evaluate_targets(
            sweep.points, sweep.h2load_results, plan.headline_concurrency, sweep.cpu_reference
        )
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_csv(sweep.points, out / "points.csv")
    sys.stderr.write("\n")
    paths = report.build(out)
    if args.targets:
        print(print_targets(results["targets"]))
    print(f"report: {paths['md']}\n        {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
