"""What ran, for the report: versions, the machine, the plan, each replica's effective
settings and the nginx.conf nginx ran (everything needed to trust or reproduce a sweep)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtest.baseline import BASELINE_WORKERS
from loadtest.sweep import ROOT, Plan, _run
from localcluster import Cluster
from localcluster.cluster import Status
from localcluster.processes import which
from service.settings import Settings
from service.settings.redis_url import RedisUrlError, parse_redis_url, redact_url


def _version(argv: list[str]) -> str:
    try:
        result = _run(argv, timeout=10)
    except OSError:
        return "not found"
    text = (result.stdout + result.stderr).strip().splitlines()
    return text[0] if text else "?"


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
        "runtimes": model_runtimes(
            str(status.internal), [p.name for p in sorted(cluster.models_dir.iterdir()) if p.is_dir()]
        ),
    }


def model_runtimes(url: str, models: list[str]) -> dict[str, str]:
    """Which runtime answers each model, as the cluster's V2 model metadata says."""
    found = {}
    for model in models:
        try:
            with urllib.request.urlopen(f"{url}/v2/models/{model}", timeout=10) as response:
                found[model] = json.loads(response.read())["parameters"].get("runtime", "sklearn")
        except (OSError, ValueError, KeyError):
            continue
    return found


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
