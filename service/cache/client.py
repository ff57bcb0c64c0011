"""The Redis client plumbing every part of a replica shares: one client for the topology
REDIS_URL names (service.settings.redis_url parses it), bounded timeouts, no retries of its own,
and what a failing Redis raises. The result cache (service.cache.results) and the model
repository (service.models.convergence) reach Redis only through here.

Imported only in the workers, after gevent's monkey-patching (never by gunicorn's master,
which checks the settings with service.settings.redis_url alone).
"""

from __future__ import annotations

import inspect
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

from service.settings.redis_url import parse_redis_url

# What a failing Redis raises (redis-py's cluster errors are not RedisErrors).
REDIS_FAILURES = (redis.RedisError, redis.exceptions.RedisClusterException, OSError)

# No CLIENT SETINFO on connect: Redis before 7.2 refuses it, so every new connection would
# count two errors in the server's errorstats, which operators alert on. redis-py 7.1+
# takes driver_info=None for that; older releases lib_name/lib_version=None.
_NO_SETINFO: dict[str, Any] = (
    {"driver_info": None}
    if "driver_info" in inspect.signature(redis.Redis.__init__).parameters
    else {"lib_name": None, "lib_version": None}
)


def redis_client(url: str, timeout_s: float, **pool: Any) -> Any:
    """A client of the Redis REDIS_URL names, any topology: bounded timeouts and no
    retries of its own (the caller's breaker or loop is the retry policy); `pool`: more
    connection-pool options. A Redis Cluster client connects at once: the caller handles
    the failure."""
    target = parse_redis_url(url)
    # No retries: a retry doubles the wait, and the breaker decides when to try again.
    timeouts: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
        **_NO_SETINFO,
    }
    if target.topology == "single":
        return redis.Redis.from_url(url, **timeouts, **pool)
    auth: dict[str, Any] = {"username": target.username, "password": target.password, "ssl": target.tls}
    if target.topology == "sentinel":
        sentinel = Sentinel(list(target.nodes), sentinel_kwargs={**timeouts, "ssl": target.tls})
        return sentinel.master_for(target.service_name, db=target.db, **auth, **timeouts, **pool)
    nodes = [ClusterNode(host, port) for host, port in target.nodes]
    # A failed primary's slots do not stop the others.
    return RedisCluster(startup_nodes=nodes, require_full_coverage=False, **auth, **timeouts, **pool)
