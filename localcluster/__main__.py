"""scripts/cluster: the local cluster from the command line.

    scripts/cluster up [--replicas N] [--port P | --ports auto] [--redis single|cluster|sentinel] [...]
    scripts/cluster status [--json]                                    each component: pid, port, health
    scripts/cluster scale N                                            add or drain-and-remove replicas
    scripts/cluster restart --rolling                                  one replica at a time
    scripts/cluster down                                               stop everything started, by pid

State (pids, ports) lives in <run dir>/cluster.json, logs in <run dir>/logs/. The run
directory is ./run unless CLUSTER_RUN_DIR says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from localcluster.cluster import ROOT, Cluster, Status, setting
from localcluster.ports import Ports
from localcluster.processes import ClusterError


def print_status(status: Status) -> None:
    """The human-readable table."""
    if not status.components:
        print(f"nothing running (run dir {status.run_dir})")
        return
    print(f"{'component':<14} {'pid':>8} {'port':>6}  {'state':<8} health")
    for row in status.components:
        state = "healthy" if row.healthy else "running" if row.running else "stopped"
        print(f"{row.name:<14} {row.pid:>8} {row.port:>6}  {state:<8} {row.health}")
    print(f"\nbalancer: {status.balancer}   internal: {status.internal}   logs: {status.logs}")
    print(f"result cache: Redis {status.redis_topology} at {status.redis_url}")


def _ports(args: argparse.Namespace, environ: dict[str, str]) -> Ports | None:
    if args.ports == "auto":
        return Ports.auto(int(setting(environ, "CLUSTER_UPSTREAM_SLOTS")))
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
    up.add_argument("--redis", choices=["single", "cluster", "sentinel"],
                    help="the result cache: one server, a Redis Cluster of 3 primaries, or a primary + replica "
                         "watched by 3 sentinels (default CLUSTER_REDIS_TOPOLOGY, else single)")  # fmt: skip
    status = sub.add_parser("status", help="show each component")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    scale = sub.add_parser("scale", help="change the replica count of a running cluster")
    scale.add_argument("replicas", type=int)
    restart = sub.add_parser("restart", help="restart the replicas (new code, models or settings)")
    restart.add_argument("--rolling", action="store_true", required=True, help="one at a time, no failed request")
    sub.add_parser("down", help="stop everything `up` started")
    args = parser.parse_args(argv)

    environ = dict(os.environ)
    cluster = Cluster(ROOT / setting(environ, "CLUSTER_RUN_DIR"), environ)
    try:
        if args.command == "status":
            report = cluster.status()
            print(json.dumps(report.to_dict(), indent=2)) if args.json else print_status(report)
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
