"""One sweep of the local cluster: the plan, and the `Sweep` that measures each point of it
(wrk with the benchmark's payloads, the CPU of every process tree, the balancer's access log
and stub_status around it) into the points of results.json (loadtest/results.py).

`run_wrk` is one point's load, shared with the benchmark of a running deployment
(loadtest/remote.py): both measure a point the same way.
"""

from __future__ import annotations

import contextlib
import json
import re
import resource
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from balancer.render import access_log_settle_s
from loadtest.baseline import Baseline
from loadtest.generators import h2load_argv, h2load_paced_argv, predict_path
from loadtest.measure import run_wrk
from loadtest.parsers import (
    parse_h2load,
    parse_h2load_log,
    parse_locust_stats,
    parse_stub_status,
    summarize_access_log,
)
from loadtest.payloads import Mix, pool_row
from loadtest.procstat import busy_cores, memory, snapshot, watching
from loadtest.results import CpuReference, H2loadPoint, Locust, Point, TailsPoint
from localcluster import Cluster, free_port
from localcluster.processes import which

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
    # The overload point (bench.run_overload): open loop at these multiples of the measured
    # capacity, on a cluster of the most replicas serving a model slow enough for the
    # generator to offer 3× what it serves (loadtest/overload.py). Empty: none.
    overload: tuple[float, ...] = (1.5, 3.0)

    @property
    def headline_concurrency(self) -> int:
        """The concurrency the summary compares at: 32, or the nearest planned."""
        return min(self.concurrency, key=lambda c: abs(c - 32))


QUICK = Plan(
    replicas=(1, 2),
    concurrency=(8, 32),
    hit_ratios=(0.0, 1.0),
    models=("iris",),
    seconds=3.0,
    locust_seconds=5.0,
    overload=(),
)


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, **kwargs)


class _Accounted:
    """Around one point's wrk run: the balancer's access log offset, stub_status, each
    process tree's CPU and wrk's own (children) before and after, memory after, and whether
    processes the benchmark does not know used the CPU meanwhile."""

    def __init__(
        self, sweep: Sweep, components: dict[str, int], access_log: Path | None, status_url: str | None
    ) -> None:
        self.sweep, self.components, self.access_log, self.status_url = sweep, components, access_log, status_url

    def __enter__(self) -> _Accounted:
        log = self.access_log
        self.log_offset = log.stat().st_size if log and log.exists() else 0
        self.stub_before = self.sweep._stub(self.status_url)
        self.cpu_before = snapshot(self.components)
        self._children = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._watch = self.sweep.watching(self.components)
        self.disturbance = self._watch.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._watch.__exit__(*exc)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        before = self._children
        self.children_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        self.cpu_after = snapshot(self.components)
        self.rss_mb = memory(self.components)
        self.stub_after = self.sweep._stub(self.status_url)


class Sweep:
    """Runs every point and writes raw results; report.py turns them into the report."""

    def __init__(self, plan: Plan, out: Path, cluster: Cluster, port: int | None) -> None:
        self.plan = plan
        self.out = out
        self.cluster = cluster
        self.port = port
        self.points: list[Point] = []
        self.commands: list[str] = []
        self.started = time.monotonic()
        self.done = 0
        self.h2load_results: list[H2loadPoint] = []
        self.cpu_reference: list[CpuReference] = []  # run_cpu_reference
        self.tails: list[TailsPoint] = []  # open_loop_tails (bench-targets)
        self.total = len(plan.replicas) * len(plan.concurrency) * len(plan.hit_ratios) * len(plan.models)
        self.total += 1  # run_named_columns
        if plan.baseline:
            self.total += len(plan.concurrency) * len(plan.models)
        self.total += len(plan.redis_topologies) * len(plan.models) * len(plan.hit_ratios)
        peer_models = len([m for m in ("iris", "digits") if m in plan.models])  # bench.PEER_MODELS
        self.total += len(plan.concurrency) * (1 + len(plan.peers)) * peer_models if plan.peers else 0
        self.total += 1 if plan.overload else 0
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
    ) -> Point:
        """Run wrk for one point and collect everything the report shows about it: with KServe
        V1 bodies, or V2 ones (`protocol`); `access_log` None for a server that keeps none."""
        mix = Mix(pool_size=self.plan.pool_size, hit_ratio=hit_ratio, skew=self.plan.skew)
        tag = f"{kind}-r{replicas}-c{concurrency}-h{int(hit_ratio * 100)}-{model}".replace(" ", "").replace(",", "-")
        tag += f"-round{self.round + 1}" if self.plan.rounds > 1 else ""
        around = self._accounted(components, access_log, status_url)
        parsed, command = run_wrk(
            url, model, mix, concurrency, self.plan.seconds, self.out / "raw", tag, protocol, around=around
        )
        taken = around  # filled in as wrk ran
        seconds = parsed["seconds"] or self.plan.seconds
        cpu = {
            name: (taken.cpu_after.get(name, 0.0) - taken.cpu_before.get(name, 0.0)) / seconds
            for name in taken.cpu_before
        }
        cpu["load generator"] = taken.children_s / seconds
        access = summarize_access_log([])
        if access_log is not None:
            time.sleep(access_log_settle_s(self.cluster.environ))  # nginx writes its log in blocks
            with access_log.open("rb") as log:
                log.seek(taken.log_offset)
                access = summarize_access_log(line.decode(errors="replace") for line in log)
        stub = None
        if taken.stub_before and taken.stub_after:
            stub = {k: taken.stub_after[k] - taken.stub_before[k] for k in ("accepts", "handled", "requests")}
            stub["active_after"] = taken.stub_after["active"]
        self.commands.append(command)
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
            "rss_mb": taken.rss_mb,
            "disturbance": taken.disturbance,
            "round": self.round,
            "cpu_ms_per_request": {
                name: round(value * seconds * 1000 / parsed["requests"], 3) if parsed["requests"] else None
                for name, value in cpu.items()
            },
            "command": command,
        }

    def _accounted(self, components: dict[str, int], access_log: Path | None, status_url: str | None) -> _Accounted:
        """What is measured around one point's wrk run (see _Accounted)."""
        return _Accounted(self, components, access_log, status_url)

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
    ) -> H2loadPoint:
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
        point = {
            "kind": kind,
            "concurrency": connections,
            **summary,
            **latency,
            "disturbance": disturbed,
            "round": self.round,
            "command": " ".join(argv),
        }
        return cast(H2loadPoint, point)  # parse_h2load's counts and parse_h2load_log's latencies

    def run_open_loop_tails(self) -> None:
        """Each of this round's cluster points at the headline concurrency, its tails judged
        open loop (open_loop_tails), on the cluster as run_cluster left it."""
        url, pids, _, _ = self.cluster_components()
        closed = [
            p
            for p in self.points
            if p["kind"] == "cluster"
            and p.get("round", 0) == self.round
            and p["concurrency"] == self.plan.headline_concurrency
        ]
        for point in closed:
            self.progress(f"open loop tails: {point['model']}, hits {point['hit_ratio']:.0%}, at half its req/s")
            self.tails.append(self.open_loop_tails(url, pids, point))
            self.done += 1

    def open_loop_tails(self, url: str, components: dict[str, int], closed: Point) -> TailsPoint:
        """The latency tails of a closed-loop point's model and hit ratio, judged open loop:
        h2load paced at half the throughput that point measured (generators.h2load_paced_argv).
        All hits: one pool row, answered by the L1. No hits: the same row with `Cache-Control:
        no-cache` (past the L1 to a replica, which computes it: `auto` keeps ONNX Runtime's
        cheap predicts out of Redis)."""
        model, hit = closed["model"], closed["hit_ratio"]
        body = self.out / "raw" / f"tails-body-{model}.json"
        body.write_text(json.dumps({"instances": [pool_row(model, 0)]}))
        rate = closed["rps"] / 2
        name = f"tails-{model}-h{int(hit * 100)}" + (f"-round{self.round + 1}" if self.plan.rounds > 1 else "")
        log = self.out / "raw" / f"{name}.log"
        log.unlink(missing_ok=True)  # h2load appends to its log
        headers = [] if hit >= 1.0 else ["Cache-Control: no-cache"]
        # The point's own connections. h2load fires every connection's timer at once, so its
        # "paced" load comes in bursts of one request per connection; a connection carries one
        # request at a time and falls behind when an answer takes longer than its interval
        # (past the L1: 70-80 % of the rate). More connections reach the rate but bigger
        # bursts: at 146 connections the p50 past the L1 went 15 → 63 ms, 6.6 ms through it.
        connections = closed["concurrency"]
        path = f"{url}{predict_path(model)}"
        argv = h2load_paced_argv(path, body, connections, rate, self.plan.seconds, log, headers)
        with self.watching(components) as disturbed:
            result = _run(argv, timeout=self.plan.seconds + 60)
        (self.out / "raw" / f"{name}.txt").write_text(result.stdout + result.stderr)
        self.commands.append(" ".join(argv))
        latency = parse_h2load_log(log.read_text())
        return {
            "model": model,
            "hit_ratio": hit,
            "concurrency": connections,
            "offered_rps": round(rate, 1),
            "rps": parse_h2load(result.stdout)["rps"],
            "p50_ms": latency["p50_ms"],
            "p99_ms": latency["p99_ms"],
            "statuses": latency["statuses"],
            "disturbance": disturbed,
            "round": self.round,
        }

    def run_locust(self, url: str) -> Locust:
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
