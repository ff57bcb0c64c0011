"""Shared result cache: per-row keys in Redis, one round trip each way, a circuit breaker.

A request's rows are looked up with one MGET; rows that were missing are written back
in one pipelined batch of SETs with a TTL. When Redis fails or is slow the breaker
opens and requests bypass the cache at once, instead of each paying a timeout; after
a back-off one request probes Redis, and caching resumes when the probe succeeds.

REDIS_URL picks the topology (`parse_redis_url`): one server, a Sentinel-managed primary
(redis-py's Sentinel finds the primary on every new connection, so a failover needs no
restart), or a Redis Cluster (keys grouped by the node that owns their hash slot, one
pipelined round trip per node, the nodes in parallel, a breaker per node).
This module knows nothing of HTTP.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

import numpy as np
import redis
from redis.cluster import ClusterNode, RedisCluster

from service.cache.breaker import CircuitBreaker
from service.cache.client import REDIS_FAILURES, redis_client
from service.cache.fanout import FANOUT_TIMEOUTS, in_parallel
from service.inputs.columns import canonical_bytes
from service.settings.redis_url import parse_redis_url

T = TypeVar("T")

log = logging.getLogger(__name__)


def row_keys(prefix: str, model: str, version: str, artifact: str, rows: np.ndarray) -> list[str]:
    """One key per row: model, version, the artifact (its sha256: a version rewritten with
    another artifact never reads the old answers) and a hash of the row's canonical bytes:
    float64 for plain rows, typed JSON for named columns (service.inputs.columns)."""
    head = f"{prefix}:{model}:{version}:{artifact[:16]}:"
    if rows.dtype == object:
        return [head + hashlib.blake2b(canonical_bytes(row), digest_size=16).hexdigest() for row in rows]
    # Adding 0.0 turns -0.0 into 0.0, and little-endian float64 makes the bytes (so the
    # key) the same on every replica for numbers that compare equal.
    canonical = np.ascontiguousarray(rows, dtype="<f8") + 0.0
    return [head + hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in canonical]


class Unavailable:
    """A row the cache could not look up: the Redis Cluster node that owns it is failing."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNAVAILABLE"


UNAVAILABLE = Unavailable()
Value = bytes | None | Unavailable


class ResultCache(Protocol):
    """What the data plane needs of a cache."""

    def get_many(self, keys: Sequence[str]) -> Sequence[Value] | None:
        """Values for keys (None where missing, UNAVAILABLE where that part of the cache
        failed), or None when the whole cache is unavailable."""

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store values; failures are swallowed (a cache never breaks a request)."""

    def round_trip_ms(self) -> float | None:
        """Time of a trivial command, or None when the cache is unavailable."""


class RedisResultCache:
    """ResultCache on one Redis client (a server, or Sentinel's current primary) with a
    circuit breaker. The client has bounded timeouts and no retries of its own."""

    def __init__(self, client: redis.Redis, *, ttl_s: int, breaker: CircuitBreaker) -> None:
        self._client = client
        self._ttl_s = ttl_s
        self.breaker = breaker

    def get_many(self, keys: Sequence[str]) -> list[bytes | None] | None:
        """MGET the keys; None if the breaker is open or Redis fails."""
        if not self.breaker.allow():
            return None
        try:
            values = self._client.mget(keys)
        except (redis.RedisError, OSError) as exc:
            log.debug("cache read failed: %s", exc)
            self.breaker.record_failure()
            return None
        self.breaker.record_success()
        return cast("list[bytes | None]", values)

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """SET each item with the TTL in one pipelined round trip."""
        if not items or not self.breaker.allow():
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for key, value in items:
                pipe.set(key, value, ex=self._ttl_s)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.debug("cache write failed: %s", exc)
            self.breaker.record_failure()
            return
        self.breaker.record_success()

    def round_trip_ms(self, samples: int = 5) -> float | None:
        """Fastest of a few PINGs (what a lookup costs at least, whatever else the worker
        is doing meanwhile), or None if Redis fails."""
        if not self.breaker.allow():
            return None
        try:
            fastest = _fastest_ping(self._client, samples)
        except (redis.RedisError, OSError):
            self.breaker.record_failure()
            return None
        self.breaker.record_success()
        return fastest

    def close(self) -> None:
        """Release the connection pool."""
        self._client.close()


def _fastest_ping(client: redis.Redis, samples: int) -> float:
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        client.ping()
        times.append((time.perf_counter() - started) * 1000)
    return min(times)


# {node name: (node, {slot: indices of the keys in that slot})}
NodeSlots = dict[str, tuple[ClusterNode, dict[int, list[int]]]]

# Replies that mean "ask again elsewhere" (slots moved), not "this node is failing".
_REDIRECTS = (redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.TryAgainError)


class ClusterResultCache:
    """ResultCache on a Redis Cluster.

    Keys are grouped by the node that owns their hash slot (redis-py's slot map): per
    node one pipeline of MGETs, one per slot, in one round trip; the nodes are asked in
    parallel. Each node has its own breaker, so a failing primary only turns its own
    rows UNAVAILABLE while the live slots keep caching. A redirect (slots moved) or a
    failing node marks the slot map stale; it is fetched again at most once per
    back-off, by the next request. Until the first map is fetched (the cluster may be
    down when the replica starts) `breaker` guards the attempts.
    """

    def __init__(
        self,
        connect: Callable[[], RedisCluster],
        *,
        ttl_s: int,
        breaker: CircuitBreaker,
        node_breaker: Callable[[Callable[[bool], None], str], CircuitBreaker],
        on_change: Callable[[bool], None] | None = None,
        fanout_timeout_s: float | None = None,
    ) -> None:
        self._connect = connect
        self._fanout_timeout_s = fanout_timeout_s
        self._cluster: RedisCluster | None = None
        self._ttl_s = ttl_s
        self.breaker = breaker
        self._node_breaker = node_breaker
        self._on_change = on_change or (lambda is_open: None)
        self._breakers: dict[str, CircuitBreaker] = {}
        self._open: set[str] = set()
        self._stale = False
        self._refresh_after = 0.0

    def _topology(self) -> RedisCluster | None:
        """The cluster client with a usable slot map, or None (cluster unreachable). Making
        the client, and fetching the slot map again, resolve the nodes' names and ask them
        (with redis-py's own ways to wait): both are bounded by the fan-out's budget, so a
        request never waits longer on a cluster that does not answer, or on DNS that is slow
        to know it (seen with container DNS while the nodes are recreated)."""
        if self._cluster is None:
            if not self.breaker.allow():
                return None
            cluster = self._bounded(self._connect, "connecting to the Redis Cluster")
            if cluster is None:
                self.breaker.record_failure()
                return None
            self._cluster = cluster
            self.breaker.record_success()
        elif self._stale and time.monotonic() >= self._refresh_after:
            self._refresh_after = time.monotonic() + self.breaker.backoff_s
            cluster = self._cluster
            if self._bounded(lambda: cluster.nodes_manager.initialize() or cluster, "refreshing the slot map"):
                self._stale = False
        return self._cluster

    def _bounded(self, work: Callable[[], T], what: str) -> T | None:
        """work() within the fan-out's budget; None if it failed or ran out of time."""

        def attempt() -> T | None:
            try:
                return work()
            except REDIS_FAILURES as exc:
                log.debug("%s failed: %s", what, exc)
                return None

        (result,) = in_parallel([attempt], self._fanout_timeout_s)
        if result is None:
            log.debug("%s: no answer within %.2f s", what, self._fanout_timeout_s or 0)
        return result

    def _breaker(self, node: str) -> CircuitBreaker:
        breaker = self._breakers.get(node)
        if breaker is None:

            def changed(is_open: bool, node: str = node) -> None:
                was_open = bool(self._open)
                (self._open.add if is_open else self._open.discard)(node)
                if is_open:
                    self._on_change(True)  # every opening counts
                elif was_open and not self._open:
                    self._on_change(False)

            breaker = self._breakers[node] = self._node_breaker(changed, f"result cache node {node}")
        return breaker

    def _by_node(self, cluster: RedisCluster, keys: Sequence[str]) -> tuple[NodeSlots, list[int]]:
        """{node name: (node, {slot: key indices})}, and the indices of keys whose slot no
        known node serves."""
        nodes: NodeSlots = {}
        orphans = []
        for i, key in enumerate(keys):
            slot = cluster.keyslot(key)
            try:
                node = cluster.nodes_manager.get_node_from_slot(slot)
            except redis.exceptions.SlotNotCoveredError:
                orphans.append(i)
                continue
            nodes.setdefault(node.name, (node, {}))[1].setdefault(slot, []).append(i)
        return nodes, orphans

    def _on_node(self, name: str, node: ClusterNode, work: Callable[[Any], list[Any]]) -> list[Any] | None:
        """`work(pipeline)` on one node, under its breaker; None when it could not run."""
        breaker = self._breaker(name)
        if not breaker.allow():
            return None
        client = node.redis_connection
        if client is None:
            self._stale = True
            return None
        try:
            result = work(client.pipeline(transaction=False))
        except _REDIRECTS as exc:
            log.debug("cache node %s redirected: %s", name, exc)
            self._stale = True
            breaker.record_success()  # it answered: alive, just not the owner any more
            return None
        except REDIS_FAILURES as exc:
            log.debug("cache node %s failed: %s", name, exc)
            self._stale = True
            breaker.record_failure()
            return None
        breaker.record_success()
        return result

    def get_many(self, keys: Sequence[str]) -> list[Value] | None:
        """One pipelined MGET per slot, one round trip per node, nodes in parallel; rows
        whose node fails are UNAVAILABLE; None if no node could be reached."""
        cluster = self._topology()
        if cluster is None:
            return None
        nodes, orphans = self._by_node(cluster, keys)
        if orphans:
            self._stale = True

        def lookup(name: str, node: ClusterNode, slots: dict[int, list[int]]) -> list[Any] | None:
            def work(pipe: Any) -> list[Any]:
                for indices in slots.values():
                    pipe.mget([keys[i] for i in indices])
                return cast("list[Any]", pipe.execute())

            return self._on_node(name, node, work)

        replies = self._fan_out(lookup, nodes)
        values: list[Value] = [UNAVAILABLE] * len(keys)
        answered = False
        for (_node, slots), reply in zip(nodes.values(), replies, strict=True):
            if reply is None:
                continue
            answered = True
            for indices, found in zip(slots.values(), reply, strict=True):
                for i, value in zip(indices, found, strict=True):
                    values[i] = value
        return values if answered else None

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """SET each item with the TTL: one pipeline per node, nodes in parallel; a failing
        node's items are dropped."""
        cluster = self._topology() if items else None
        if cluster is None:
            return
        nodes, _orphans = self._by_node(cluster, [key for key, _ in items])

        def store(name: str, node: ClusterNode, slots: dict[int, list[int]]) -> list[Any] | None:
            def work(pipe: Any) -> list[Any]:
                for indices in slots.values():
                    for i in indices:
                        pipe.set(items[i][0], items[i][1], ex=self._ttl_s)
                return cast("list[Any]", pipe.execute())

            return self._on_node(name, node, work)

        self._fan_out(store, nodes)

    def _fan_out(self, call: Callable[[str, ClusterNode, dict[int, list[int]]], T], nodes: NodeSlots) -> list[T | None]:
        """`call` for every node in parallel, within the fan-out's time budget: a node that
        has not answered by then counts as failing (its breaker, a stale slot map)."""
        finished: set[str] = set()

        def timed(name: str, node: ClusterNode, slots: dict[int, list[int]]) -> T:
            result = call(name, node, slots)
            finished.add(name)
            return result

        replies = in_parallel(
            [functools.partial(timed, name, node, slots) for name, (node, slots) in nodes.items()],
            self._fanout_timeout_s,
        )
        for name in nodes.keys() - finished:
            log.warning("cache node %s did not answer within %.2f s: given up", name, self._fanout_timeout_s or 0)
            self._stale = True
            self._breaker(name).record_failure()
        return replies

    def round_trip_ms(self, samples: int = 5) -> float | None:
        """Fastest of a few PINGs to one primary (a single-row lookup asks one node)."""
        cluster = self._topology()
        if cluster is None:
            return None
        for node in cluster.get_primaries():
            breaker = self._breaker(node.name)
            if node.redis_connection is None or not breaker.allow():
                continue
            try:
                fastest = _fastest_ping(node.redis_connection, samples)
            except REDIS_FAILURES:
                breaker.record_failure()
                continue
            breaker.record_success()
            return fastest
        return None

    def close(self) -> None:
        """Release every node's connection pool."""
        if self._cluster is not None:
            self._cluster.close()


def open_result_cache(
    url: str,
    *,
    ttl_s: int,
    timeout_ms: int,
    max_connections: int,
    backoff_s: float,
    max_backoff_s: float,
    on_change: Callable[[bool], None] | None = None,
) -> RedisResultCache | ClusterResultCache:
    """The result cache REDIS_URL names, connected lazily (Redis may be down at start)."""
    connect = functools.partial(
        redis_client, url, timeout_ms / 1000, max_connections=max_connections, health_check_interval=0
    )
    breaker = CircuitBreaker(backoff_s, max_backoff_s, on_change=on_change)
    if parse_redis_url(url).topology != "cluster":
        return RedisResultCache(connect(), ttl_s=ttl_s, breaker=breaker)
    return ClusterResultCache(
        connect,
        ttl_s=ttl_s,
        breaker=breaker,
        node_breaker=lambda changed, what: CircuitBreaker(backoff_s, max_backoff_s, on_change=changed, what=what),
        on_change=on_change,
        # Every Redis operation has timeout_ms; a node's pipeline takes a few (connect,
        # AUTH, the commands). The budget of the whole fan-out leaves room for a busy
        # worker and still bounds what one request waits on the cache.
        fanout_timeout_s=FANOUT_TIMEOUTS * timeout_ms / 1000,
    )
