"""scripts/cluster: the local cluster from the command line.

    scripts/cluster up [--replicas N] [--port P | --ports auto] [--redis single|cluster|sentinel] [...]
    scripts/cluster status [--json]                                    each component: pid, port, health
    scripts/cluster scale N                                            add or drain-and-remove replicas
    scripts/cluster restart --rolling                                  one replica at a time
    scripts/cluster down                                               stop everything started, by pid
    scripts/cluster model add PATH --name N [--version V] [--weight W] [--input COLUMN=TYPE]
                                                                       a fitted model file as a new version
    scripts/cluster model load|unload|policy|index|status ...          model versions on every replica

State (pids, ports) lives in <run dir>/cluster.json, logs in <run dir>/logs/. The run
directory is ./run unless CLUSTER_RUN_DIR says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from localcluster.cluster import ROOT, Cluster
from localcluster.ports import Ports
from localcluster.processes import ClusterError
from localcluster.settings import ClusterSettings
from localcluster.state import Status
from service.models.packaging import PackagingError, add_model, parse_inputs
from service.settings.declare import SettingsError


def print_status(status: Status, models: dict | None = None) -> None:
    """The human-readable table (and the model repository's convergence, if known)."""
    if not status.components:
        print(f"nothing running (run dir {status.run_dir})")
        return
    print(f"{'component':<14} {'pid':>8} {'port':>6}  {'state':<8} health")
    for row in status.components:
        state = "healthy" if row.healthy else "running" if row.running else "stopped"
        print(f"{row.name:<14} {row.pid:>8} {row.port:>6}  {state:<8} {row.health}")
    print(f"\nbalancer: {status.balancer}   internal: {status.internal}   logs: {status.logs}")
    print(f"result cache: Redis {status.redis_topology} at {status.redis_url}")
    if models is not None:
        workers = models["workers"]
        done = sum(1 for r in workers.values() if r["generation"] == models["generation"])
        errors = sorted({e for r in workers.values() for e in r.get("errors", [])})
        print(
            f"models: desired generation {models['generation']}, {done}/{len(workers)} workers converged"
            + record_reading(models["generation"], models.get("record", {}))
            + (f"; errors: {'; '.join(errors)}" if errors else "")
        )


def record_reading(generation: int, record: dict) -> str:
    """What the desired state's record in Redis says, for `status`: nothing when it is as
    it should be. A fresh cluster has none and needs none (no operator change yet); a
    record Redis lost or holds malformed later is read as such: the replicas serve on and
    write it back."""
    state = record.get("state", "ok")
    if state == "ok":
        return ""
    if state == "missing" and generation == 0:
        return "; no operator change yet: every model on disk serves"
    problem = f" ({record['problem']})" if record.get("problem") else ""
    return f"; record in Redis {state}{problem}: the replicas serve on and write it back"


def _ports(args: argparse.Namespace, environ: dict[str, str]) -> Ports | None:
    if args.ports == "auto":
        return Ports.auto(ClusterSettings.from_env(environ).upstream_slots)
    explicit = {
        "balancer": args.port,
        "status": args.status_port,
        "internal": args.internal_port,
        "redis": args.redis_port,
        "replica_base": args.replica_base_port,
    }
    if all(v is None for v in explicit.values()):
        return None
    base = Ports.from_balancer_port(args.port) if args.port else Ports()
    return dataclasses.replace(base, **{k: v for k, v in explicit.items() if v is not None})


def model_request(args: argparse.Namespace) -> tuple[str, str, dict | None]:
    """(method, path, body) of a `model` command."""
    if args.action == "index":
        return "POST", "/v2/repository/index", None
    if args.action == "status":
        return "GET", "/v2/repository/status", None
    path = f"/v2/repository/models/{urllib.parse.quote(args.name)}/{args.action}"
    if args.action == "policy":
        body: dict = {}
        if args.default is not None:
            body["default"] = args.default
        if args.weights is not None:
            pairs = [item.split("=", 1) for item in args.weights.split(",") if item]
            body["weights"] = {version: int(weight) for version, weight in pairs}
        return "POST", path, body
    parameters = {
        k: v for k, v in (("version", args.version), ("weight", getattr(args, "weight", None))) if v is not None
    }
    return "POST", path, {"parameters": parameters} if parameters else None


def call_repository(base: str, method: str, path: str, body: dict | None, operator: Mapping[str, str]) -> Any:
    """One call to the model repository through the balancer's internal listener, with the
    operator's credential (`operator`: its headers): the JSON answer, or ClusterError."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        base + path, data=data, method=method, headers={"Content-Type": "application/json", **operator}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise ClusterError(f"{exc.code}: {exc.read().decode(errors='replace')}") from None


def send_model_request(base: str, args: argparse.Namespace, operator: Mapping[str, str]) -> int:
    """Send a `model` command; print the answer."""
    try:
        print(json.dumps(call_repository(base, *model_request(args), operator), indent=2))
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    return 0


def wait_converged(cluster: Cluster, generation: int, timeout_s: float = 60.0) -> bool:
    """Whether every worker of every replica serves `generation` (or a later one) in time."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = cluster.models() or {}
        workers = status.get("workers", {})
        if workers and all(w.get("generation", -1) >= generation for w in workers.values()):
            return True
        time.sleep(0.2)
    return False


def add_model_command(cluster: Cluster, args: argparse.Namespace) -> int:
    """`model add`: package the file into the replicas' models folder and, when the cluster
    runs, load it on every replica (a canary with --weight). Nothing is left written when
    the file is refused, or when the replicas refuse to load it."""
    running = cluster.running()
    if args.weight is not None and not running:
        print("cluster: model add: --weight routes requests of a running cluster; start it first", file=sys.stderr)
        return 1
    try:
        added = add_model(
            args.path, cluster.models_dir, args.name, args.version, parse_inputs(args.input), sample=args.sample
        )
    except PackagingError as exc:
        print(f"cluster: model add: {exc}; nothing written", file=sys.stderr)
        return 1
    meta = added.metadata
    inputs = meta["inputs"].get("columns") or f"{meta['inputs']['width']} numbers"
    if isinstance(inputs, list):
        inputs = ", ".join(f"{c['name']} ({c['datatype']})" for c in inputs)
    print(f"{added.name} version {added.version}: a {meta['estimator']} ({meta['task']}), inputs {inputs}")
    runtime = meta.get("runtime", {})
    chosen = "ONNX Runtime" if runtime.get("chosen") == "onnx" else "scikit-learn"
    print(f"runtime: {chosen}: {runtime.get('reason', 'not compiled')}")
    print(f"written to {added.folder}")
    if not running:
        print("no cluster runs here: the replicas load it when they start (scripts/cluster up)")
        return 0
    load = argparse.Namespace(action="load", name=added.name, version=added.version, weight=args.weight)
    try:
        answer = call_repository(cluster.internal_url, *model_request(load), cluster.operator_headers)
    except ClusterError as exc:
        shutil.rmtree(added.folder, ignore_errors=True)
        print(f"cluster: model add: the replicas refused it ({exc}); removed {added.folder}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    if not wait_converged(cluster, int(answer["generation"])):
        print(
            "cluster: model add: loaded, but not every replica serves it yet (scripts/cluster status)", file=sys.stderr
        )
        return 1
    print(f"every replica serves {added.name} version {added.version}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="scripts/cluster", description=(__doc__ or "").split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the cluster (idempotent)")
    up.add_argument("--replicas", type=int, default=int(os.environ.get("REPLICAS", "4")))
    up.add_argument("--ports", choices=["auto"], help="auto: free ports for everything (tests, benchmarks)")
    up.add_argument("--port", type=int, help="balancer port (default 8080)")
    up.add_argument("--status-port", type=int, help="stub_status port on loopback (default port+1)")
    up.add_argument("--internal-port", type=int, help="unlimited listener with /metrics (default port+2)")
    up.add_argument("--redis-port", type=int, help="Redis port (default 6390)")
    up.add_argument("--replica-base-port", type=int, help="first replica's port (default 8001)")
    up.add_argument("--bind", dest="bind_host", help="balancer address (default 127.0.0.1; 0.0.0.0 for all)")
    up.add_argument(
        "--redis",
        choices=["single", "cluster", "sentinel"],
        help="the result cache: one server, a Redis Cluster of 3 primaries, or a primary + replica "
        "watched by 3 sentinels (default CLUSTER_REDIS_TOPOLOGY, else single)",
    )
    status = sub.add_parser("status", help="show each component")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    scale = sub.add_parser("scale", help="change the replica count of a running cluster")
    scale.add_argument("replicas", type=int)
    restart = sub.add_parser("restart", help="restart the replicas (new code, models or settings)")
    restart.add_argument("--rolling", action="store_true", required=True, help="one at a time, no failed request")
    sub.add_parser("down", help="stop everything `up` started")
    model = sub.add_parser("model", help="load, unload and route model versions on every replica")
    action = model.add_subparsers(dest="action", required=True)
    add = action.add_parser(
        "add", help="package a fitted model file (joblib or pickle) as a new version; load it if the cluster runs"
    )
    add.add_argument("path", type=Path, help="a joblib or pickle file of a scikit-learn-API estimator or Pipeline")
    add.add_argument("--name", required=True, help="the model's name (in URLs)")
    add.add_argument("--version", help="default: the next free number")
    add.add_argument("--weight", type=int, help="percent of unversioned requests the new version gets (a canary)")
    add.add_argument(
        "--sample",
        type=Path,
        help="rows of your own (.csv with a header of the inputs, or .jsonl) the ONNX Runtime copy must agree on",
    )
    add.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="COLUMN=DATATYPE",
        help="a named column's type (BYTES, INT64, FP64, BOOL) where the model cannot tell; repeatable",
    )
    load = action.add_parser("load", help="load a model (or one version) from the models folder")
    load.add_argument("name")
    load.add_argument("version", nargs="?")
    load.add_argument("--weight", type=int, help="percent of unversioned requests the version gets (a canary)")
    unload = action.add_parser("unload", help="unload a model (or one version)")
    unload.add_argument("name")
    unload.add_argument("version", nargs="?")
    policy = action.add_parser("policy", help="which version unversioned requests get")
    policy.add_argument("name")
    policy.add_argument("--default", help="latest, or a version")
    policy.add_argument("--weights", help="e.g. 1=90,2=10 (summing to 100); '' ends a split")
    action.add_parser("index", help="every version on disk or served, and its state")
    action.add_parser("status", help="the desired state and which generation each worker serves")
    args = parser.parse_args(argv)

    environ = dict(os.environ)
    try:
        settings = ClusterSettings.from_env(environ)
    except SettingsError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 2
    cluster = Cluster(ROOT / settings.run_dir, environ)
    try:
        if args.command == "model" and args.action == "add":
            return add_model_command(cluster, args)
        if args.command == "model":
            cluster._require_running_now()
            return send_model_request(cluster.internal_url, args, cluster.operator_headers)
        if args.command == "status":
            report = cluster.status()
            models = cluster.models() if report.components else None
            if args.json:
                print(json.dumps({**report.to_dict(), "models": models}, indent=2))
            else:
                print_status(report, models)
            return 0 if report.healthy or not report.components else 1
        if args.command == "up":
            print_status(cluster.start(args.replicas, _ports(args, environ), args.bind_host, args.redis))
        elif args.command == "scale":
            cluster.scale(args.replicas)
            print(f"scaled to {args.replicas} replica(s)")
        elif args.command == "restart":
            cluster.restart()
            print("every replica restarted")
        else:
            cluster.stop()
            print("cluster stopped")
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
