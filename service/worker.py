"""A gevent worker that stops promptly: idle keep-alive connections close on SIGTERM.

Gunicorn's gevent worker, asked to stop, waits until every connection has closed or
`graceful_timeout` has passed. Idle keep-alive connections (nginx keeps a pool of
them to every replica) never close by themselves before `keepalive`, so every stop,
scale-down or rolling restart would cost the whole graceful timeout. This worker
shuts down the connections that are waiting for their next request; connections
with a request in flight finish it and then close (gunicorn closes them once the
worker is no longer alive). The balancer retries a request that races the close.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventWorker


class GracefulGeventWorker(GeventWorker):
    """GeventWorker that closes idle keep-alive connections when told to stop."""

    def init_process(self) -> None:
        """Set up the connection tracking, then run the worker."""
        self._clients: dict[Any, socket.socket] = {}
        self._idle: set[Any] = set()
        super().init_process()

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        """Serve one connection, remembering its socket while it is open."""
        current = gevent.getcurrent()
        self._clients[current] = client
        try:
            super().handle(listener, client, addr)
        finally:
            self._clients.pop(current, None)
            self._idle.discard(current)

    @contextmanager
    def timeout_ctx(self) -> Iterator[None]:
        """Wraps the wait for the next request: the connection is idle meanwhile."""
        current = gevent.getcurrent()
        self._idle.add(current)
        try:
            with gevent.Timeout(self.cfg.keepalive, False):
                yield
        finally:
            self._idle.discard(current)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM: stop accepting (gunicorn) and close idle connections (here)."""
        super().handle_exit(sig, frame)
        gevent.spawn(self._close_idle_connections)

    def _close_idle_connections(self) -> None:
        for greenlet in list(self._idle):
            client = self._clients.get(greenlet)
            if client is None:
                continue
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer
