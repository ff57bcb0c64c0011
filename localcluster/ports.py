"""The cluster's ports: fixed defaults for `make up`, or free ones picked for tests and benchmarks."""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass
from pathlib import Path

PORTS_PER_CLUSTER = 6  # Redis: every topology of localcluster.redis_topology fits in these


def port_free(port: int) -> bool:
    """Nothing listens on this loopback port (TIME_WAIT does not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    """The lowest port the kernel picks as a connection's source port."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_block(count: int, taken: set[int]) -> int:
    """The first port of `count` consecutive free ones between 10000 and the ephemeral range."""
    low, high = 10000, _ephemeral_low() - count
    rng = random.SystemRandom()
    for _ in range(2000):
        base = rng.randrange(low, max(high, low + 1))
        block = range(base, base + count)
        if not any(p in taken for p in block) and all(port_free(p) for p in block):
            return base
    raise RuntimeError(f"no {count} free consecutive ports between {low} and {high + count}")


@dataclass(frozen=True)
class Ports:
    """Where each component listens; replicas take `replica_base`, `replica_base + 1`, ..."""

    balancer: int = 8080
    status: int = 8081  # stub_status, loopback only
    internal: int = 8082  # the balancer's unlimited listener for load generators and scrapers
    redis: int = 6390  # the first of the Redis topology's block of ports (6390-6395)
    replica_base: int = 8001

    @classmethod
    def auto(cls, slots: int) -> Ports:
        """Free ports for everything, and a block of `slots` free ones for the replicas, all
        below the kernel's ephemeral range. nginx connects to empty replica slots (and the
        replicas to a stopped Redis): to a port in that range the kernel may pick the same
        port as the source, and the socket connects to itself (TCP simultaneous open) and
        reads back its own request ("upstream sent no valid HTTP/1.0 header", seen here)."""
        taken: set[int] = set()

        def pick(count: int) -> int:
            base = _free_block(count, taken)
            taken.update(range(base, base + count))
            return base

        balancer, status, internal, redis = pick(1), pick(1), pick(1), pick(PORTS_PER_CLUSTER)
        return cls(balancer, status, internal, redis, pick(slots))

    @classmethod
    def from_balancer_port(cls, port: int) -> Ports:
        """`--port P`: stub_status on P+1 and the internal listener on P+2, the rest default."""
        return cls(balancer=port, status=port + 1, internal=port + 2)
