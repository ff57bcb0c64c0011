"""The local cluster's own settings (CLUSTER_* variables), declared as every setting of the
project is (service/settings/declare.py): checked when read, and docs/settings.md is
generated from them. Also: which variables configure a cluster at all."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from localcluster.redis_topology import TOPOLOGIES
from service.settings.declare import Group, from_env, one_of, positive, setting

DEFAULT_SLOTS = 8


@dataclass(frozen=True)
class ClusterSettings(Group):
    """The runner's settings (`scripts/cluster`, `make up`)."""

    run_dir: str = setting(
        "CLUSTER_RUN_DIR", "./run", "Where state (cluster.json), logs and the rendered nginx.conf live."
    )
    upstream_slots: int = setting(
        "CLUSTER_UPSTREAM_SLOTS",
        DEFAULT_SLOTS,
        "Replica ports nginx lists whether or not a replica runs there: scaling within them needs no reload.",
        check=positive,
    )
    redis_topology: str = setting(
        "CLUSTER_REDIS_TOPOLOGY",
        "single",
        "The result cache's Redis: single (one server), cluster (a Redis Cluster of 3 primaries) or sentinel "
        "(a primary, a replica and 3 sentinels); `up --redis` says the same.",
        check=one_of(*TOPOLOGIES),
    )
    redis_maxmemory: str = setting(
        "CLUSTER_REDIS_MAXMEMORY",
        "256mb",
        "Redis `maxmemory` (per server); least recently used results are evicted beyond it.",
    )
    redis_password: str = setting(
        "CLUSTER_REDIS_PASSWORD",
        "",
        "Empty: none; else Redis `requirepass`, and the replicas' REDIS_URL carries it.",
        secret=True,
    )
    nginx_bin: str = setting("CLUSTER_NGINX_BIN", "", "nginx to run instead of the one on PATH (or /usr/sbin).")
    redis_bin: str = setting("CLUSTER_REDIS_BIN", "", "redis-server to run instead of the one on PATH.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClusterSettings:
        """The settings in `environ` (default: this process's environment); SettingsError if one is bad."""
        return from_env(cls, environ)


SETTINGS_PREFIXES = ("SERVICE_", "REDIS_", "BALANCER_", "CLUSTER_")
REPLICA_PREFIXES = ("SERVICE_", "REDIS_")


def settings_of(environ: Mapping[str, str], prefixes: tuple[str, ...] = SETTINGS_PREFIXES) -> dict[str, str]:
    """The variables of `environ` that configure the cluster (the run directory aside)."""
    return {k: v for k, v in environ.items() if k.startswith(prefixes) and k != "CLUSTER_RUN_DIR"}
