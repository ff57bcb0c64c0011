"""The shared cache's Redis processes for each topology the local cluster can run.

    single    one redis-server on the Redis port
    cluster   a Redis Cluster of 3 primaries (no replicas) on the Redis port and the two
              after it, their cluster bus on the three after those; created with
              `redis-cli --cluster create`; a failed primary's slots do not stop the others
    sentinel  a primary (Redis port), one replica (+1) and 3 sentinels (+2..+4) that
              monitor it as SENTINEL_SERVICE and fail over after SENTINEL_DOWN_AFTER_MS

Every topology fits in the ports block Ports reserves for Redis (PORTS_PER_CLUSTER), binds
to loopback, keeps nothing on disk but the cluster's and the sentinels' own state files,
and evicts least-recently-used results beyond CLUSTER_REDIS_MAXMEMORY (per server).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import redis

from localcluster.ports import PORTS_PER_CLUSTER
from localcluster.processes import redis_ping

TOPOLOGIES = ("single", "cluster", "sentinel")
CLUSTER_PRIMARIES = 3
SENTINELS = 3
SENTINEL_SERVICE = "prediction"
SENTINEL_DOWN_AFTER_MS = 1000  # a primary silent this long is down; the failover follows in ~1-3 s
CLUSTER_NODE_TIMEOUT_MS = 2000
# primaries + their bus ports; primary + replica + sentinels
assert max(2 * CLUSTER_PRIMARIES, 2 + SENTINELS) <= PORTS_PER_CLUSTER


@dataclass(frozen=True)
class Server:
    """One redis-server (or sentinel) process of a topology."""

    name: str
    kind: str  # redis | sentinel
    port: int
    args: tuple[str, ...]  # after the binary (the first one is its config file when it has one)
    config: str = ""  # that config file's text, written 0600: it may hold the password


def servers(topology: str, base_port: int, data_dir: Path, maxmemory: str, password: str) -> list[Server]:
    """The processes of `topology`, in start order."""
    common: tuple[str, ...] = (
        "--bind",
        "127.0.0.1",  # local mode: never reachable from other hosts
        "--save",
        "",  # a result cache: nothing worth writing to disk
        "--appendonly",
        "no",
        "--maxmemory",
        maxmemory,
        "--maxmemory-policy",
        "allkeys-lru",  # evict the least recently used results when full
        "--dir",
        str(data_dir),
    )
    # The password goes in a 0600 config file, never on a command line (`ps` shows those to
    # every user); masterauth too: after a failover the old primary replicates from the new one.
    auth = f"requirepass {password}\nmasterauth {password}\n" if password else ""

    def redis_server(name: str, port: int, args: tuple[str, ...]) -> Server:
        if not auth:
            return Server(name, "redis", port, args)
        return Server(name, "redis", port, (str(data_dir / f"{name}.auth.conf"), *args), auth)

    if topology == "single":
        return [redis_server("redis", base_port, ("--port", str(base_port), *common))]
    if topology == "cluster":
        return [
            redis_server(
                f"redis-{n}",
                port,
                (
                    "--port",
                    str(port),
                    *common,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    str(port + CLUSTER_PRIMARIES),
                    "--cluster-config-file",
                    str(data_dir / f"nodes-{port}.conf"),
                    "--cluster-node-timeout",
                    str(CLUSTER_NODE_TIMEOUT_MS),
                    # A failed primary's slots are lost for a while; the others keep serving theirs.
                    "--cluster-require-full-coverage",
                    "no",
                ),
            )
            for n, port in enumerate(range(base_port, base_port + CLUSTER_PRIMARIES), start=1)
        ]
    if topology == "sentinel":
        primary, replica = base_port, base_port + 1
        found = [
            redis_server("redis", primary, ("--port", str(primary), *common)),
            redis_server(
                "redis-replica",
                replica,
                ("--port", str(replica), *common, "--replicaof", "127.0.0.1", str(primary)),
            ),
        ]
        for n in range(1, SENTINELS + 1):
            port = base_port + 1 + n
            conf = data_dir / f"sentinel-{n}.conf"
            lines = [
                f"port {port}",
                "bind 127.0.0.1",
                f"dir {data_dir}",
                f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {primary} 2",
                f"sentinel down-after-milliseconds {SENTINEL_SERVICE} {SENTINEL_DOWN_AFTER_MS}",
                f"sentinel failover-timeout {SENTINEL_SERVICE} 10000",
                f"sentinel parallel-syncs {SENTINEL_SERVICE} 1",
            ]
            if password:
                lines.append(f"sentinel auth-pass {SENTINEL_SERVICE} {password}")
            found.append(Server(f"sentinel-{n}", "sentinel", port, (str(conf), "--sentinel"), "\n".join(lines) + "\n"))
        return found
    raise ValueError(f"unknown Redis topology {topology!r}; one of {', '.join(TOPOLOGIES)}")


def url(topology: str, base_port: int, password: str) -> str:
    """The REDIS_URL the replicas get for `topology`."""
    auth = f":{password}@" if password else ""
    if topology == "cluster":
        nodes = ",".join(f"127.0.0.1:{p}" for p in range(base_port, base_port + CLUSTER_PRIMARIES))
        return f"redis+cluster://{auth}{nodes}"
    if topology == "sentinel":
        nodes = ",".join(f"127.0.0.1:{base_port + 1 + n}" for n in range(1, SENTINELS + 1))
        return f"redis+sentinel://{auth}{nodes}/{SENTINEL_SERVICE}/0"
    return f"redis://{auth}127.0.0.1:{base_port}/0"


def create_cluster_argv(redis_cli: str, base_port: int) -> list[str]:
    """`redis-cli --cluster create` for the fresh primaries (no replicas); the password goes
    in the environment (REDISCLI_AUTH), never on the command line."""
    nodes = [f"127.0.0.1:{p}" for p in range(base_port, base_port + CLUSTER_PRIMARIES)]
    return [redis_cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"]


def _client(port: int, password: str) -> redis.Redis:
    return redis.Redis("127.0.0.1", port, password=password or None, socket_timeout=1, socket_connect_timeout=1)


def ready(topology: str, base_port: int, password: str) -> bool:
    """The topology serves: the cluster's state is ok on every primary; the sentinels
    agree on a primary and have a quorum; the replica follows the primary."""
    try:
        if topology == "cluster":
            for port in range(base_port, base_port + CLUSTER_PRIMARIES):
                with _client(port, password) as node:
                    if node.cluster("INFO").get("cluster_state") != "ok":
                        return False
            return True
        if topology == "sentinel":
            with _client(base_port + 1, password) as replica:
                if replica.info("replication").get("master_link_status") != "up":
                    return False
            for n in range(1, SENTINELS + 1):
                with _client(base_port + 1 + n, "") as sentinel:
                    sentinel.execute_command("SENTINEL", "CKQUORUM", SENTINEL_SERVICE)
                    if len(sentinel.sentinel_sentinels(SENTINEL_SERVICE)) < SENTINELS - 1:
                        return False
            return True
        return redis_ping(base_port, password)
    except (redis.RedisError, OSError):
        return False


def primary_port(base_port: int) -> int | None:
    """Sentinel's current primary (after a failover, the old replica's port), or None."""
    for n in range(1, SENTINELS + 1):
        try:
            with _client(base_port + 1 + n, "") as sentinel:
                address = sentinel.sentinel_get_master_addr_by_name(SENTINEL_SERVICE)
                if address:
                    return int(address[1])
        except (redis.RedisError, OSError):
            continue
    return None
