"""The cluster's ports: fixed defaults for `make up`, or free ones picked for tests and benchmarks."""

from __future__ import annotations

import socket
from dataclasses import dataclass


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


@dataclass(frozen=True)
class Ports:
    """Where each component listens; replicas take `replica_base`, `replica_base + 1`, ..."""

    balancer: int = 8080
    status: int = 8081  # stub_status, loopback only
    internal: int = 8082  # the balancer's unlimited listener for load generators and scrapers
    redis: int = 6390
    replica_base: int = 8001

    @classmethod
    def auto(cls, slots: int) -> Ports:
        """Free ports for everything, and a block of `slots` free ones for the replicas."""
        taken: set[int] = set()

        def pick() -> int:
            port = free_port()
            while port in taken:
                port = free_port()
            taken.add(port)
            return port

        balancer, status, internal, redis = pick(), pick(), pick(), pick()
        base = free_port()
        while base + slots > 65535 or any(p in taken or not port_free(p) for p in range(base, base + slots)):
            base = free_port()
        return cls(balancer, status, internal, redis, base)

    @classmethod
    def from_balancer_port(cls, port: int) -> Ports:
        """`--port P`: stub_status on P+1 and the internal listener on P+2, the rest default."""
        return cls(balancer=port, status=port + 1, internal=port + 2)
