"""The local cluster's own settings (CLUSTER_* variables), with their defaults; which
variables configure a cluster at all. docs/settings.md is generated from `SETTINGS`."""

from __future__ import annotations

from collections.abc import Mapping

DEFAULT_SLOTS = 8

# The runner's own settings (environment variables), with their defaults; docs/settings.md
# is generated from this table.
SETTINGS: dict[str, tuple[str, str]] = {
    "CLUSTER_RUN_DIR": ("./run", "Where state (cluster.json), logs and the rendered nginx.conf live."),
    "CLUSTER_UPSTREAM_SLOTS": (
        str(DEFAULT_SLOTS),
        "Replica ports nginx lists whether or not a replica runs there: scaling within them needs no reload.",
    ),
    "CLUSTER_REDIS_TOPOLOGY": (
        "single",
        "The result cache's Redis: single (one server), cluster (a Redis Cluster of 3 primaries) or sentinel "
        "(a primary, a replica and 3 sentinels); `up --redis` says the same.",
    ),
    "CLUSTER_REDIS_MAXMEMORY": (
        "256mb",
        "Redis `maxmemory` (per server); least recently used results are evicted beyond it.",
    ),
    "CLUSTER_REDIS_PASSWORD": ("", "Empty: none; else Redis `requirepass`, and the replicas' REDIS_URL carries it."),
    "CLUSTER_NGINX_BIN": ("", "nginx to run instead of the one on PATH (or /usr/sbin)."),
    "CLUSTER_REDIS_BIN": ("", "redis-server to run instead of the one on PATH."),
}


SETTINGS_PREFIXES = ("SERVICE_", "REDIS_", "BALANCER_", "CLUSTER_")
REPLICA_PREFIXES = ("SERVICE_", "REDIS_")


def setting(environ: Mapping[str, str], name: str) -> str:
    """A CLUSTER_* setting from `environ`, or its default."""
    return environ.get(name, SETTINGS[name][0])


def settings_of(environ: Mapping[str, str], prefixes: tuple[str, ...] = SETTINGS_PREFIXES) -> dict[str, str]:
    """The variables of `environ` that configure the cluster (the run directory aside)."""
    return {k: v for k, v in environ.items() if k.startswith(prefixes) and k != "CLUSTER_RUN_DIR"}
