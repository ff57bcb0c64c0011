"""A gevent worker that stops promptly: idle keep-alive connections close on SIGTERM.

Gunicorn's gevent worker, asked to stop, waits until every connection has closed or
`graceful_timeout` has passed. Idle keep-alive connections (nginx keeps a pool of
them to every replica) never close by themselves before `keepalive`, so every stop,
scale-down or rolling restart would cost the whole graceful timeout. This worker
shuts down the connections that are waiting for their next request; connections
with a request in flight finish it and then close (gunicorn closes them once the
worker is no longer alive). During the drain delay before that, every response closes
its connection, so the balancer has none left pooled to race the close with; and
before the listening socket closes, requests get a 503 until they stop coming (see
_refuse_until_quiet). It also
sends each response in one piece (see _OneSendPerResponse), and makes two of gunicorn's
per-request values once a second instead (see cache_per_second_values).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import gunicorn.http.wsgi
import gunicorn.util
from gunicorn.workers.ggevent import GeventWorker

# After the drain delay: how long no request may arrive before the worker stops accepting.
CLOSING_QUIET_S = 0.2
CLOSING_MAX_S = 1.5


class _PerSecond:
    """`build(second)` at most once per wall-clock second; its value for the rest of it."""

    def __init__(self, build: Any) -> None:
        self._build = build
        self._second = -1
        self._value: Any = None

    def __call__(self) -> Any:
        now = int(time.time())
        if now != self._second:
            self._value, self._second = self._build(now), now
        return self._value


_ORIGINAL_HTTP_DATE = gunicorn.util.http_date
_ORIGINAL_BASE_ENVIRON = gunicorn.http.wsgi.base_environ


def cache_per_second_values(cfg: Any) -> None:
    """gunicorn formats the Date header (email.utils.formatdate) and builds the environ's
    constant part (a new wsgi.errors wrapper, which looks up the error logger's handlers)
    for every request: together about 6 % of a replica worker's CPU per iris request
    (py-spy, docs/performance.md). Both change at most once a second (the Date's
    resolution; a reopened error log's stream shows within a second), so this process
    builds them once a second. Same values, same types."""
    current_date = _PerSecond(_ORIGINAL_HTTP_DATE)
    constant_environ = _PerSecond(lambda _: _ORIGINAL_BASE_ENVIRON(cfg))

    def http_date(timestamp: float | None = None) -> str:
        return current_date() if timestamp is None else _ORIGINAL_HTTP_DATE(timestamp)

    def base_environ(config: Any) -> dict[str, Any]:
        if config is not cfg:
            return _ORIGINAL_BASE_ENVIRON(config)
        return dict(constant_environ())  # gunicorn adds the request's keys to its copy

    gunicorn.util.http_date = http_date
    gunicorn.http.wsgi.base_environ = base_environ


class _OneSendPerResponse:
    """A client socket that holds a response's head until its body is written, so both
    leave in one send. gunicorn writes them separately; a replica frozen between the two
    (a SIGSTOP, a long GC pause) leaves nginx holding a header it has already passed on,
    and the request can then no longer be retried elsewhere. One send makes a response
    all-or-nothing for nginx, and saves a system call."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._head = b""

    def sendall(self, data: bytes, *args: Any) -> None:
        """Send, holding a response head (not 100 Continue) for the body that follows."""
        if not self._head and data[:5] == b"HTTP/" and data.endswith(b"\r\n\r\n") and b" 100 " not in data[:13]:
            self._head = bytes(data)
            return
        if self._head:
            data, self._head = self._head + bytes(data), b""
        if args:
            self._sock.sendall(data, *args)
        else:
            self._send(data)

    def flush(self) -> None:
        """Send a held head whose response had no body."""
        if self._head:
            head, self._head = self._head, b""
            self._send(head)

    def _send(self, data: bytes) -> None:
        # gevent's sendall asks the kernel for the socket's send buffer size (a getsockopt
        # system call, about 4 % of a worker's CPU per iris request) before its first send;
        # a response of a few hundred bytes leaves whole in one send, the rest via sendall.
        sent = self._sock.send(data)
        if sent < len(data):
            self._sock.sendall(memoryview(data)[sent:])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class GracefulGeventWorker(GeventWorker):
    """GeventWorker that closes idle keep-alive connections when told to stop."""

    def init_process(self) -> None:
        """Set up the connection tracking, then run the worker."""
        self._clients: dict[Any, socket.socket] = {}
        self._idle: set[Any] = set()
        self._keepalive_s = self.cfg.keepalive
        self._last_arrival = 0.0
        cache_per_second_values(self.cfg)
        super().init_process()

    def handle(self, listener: Any, client: socket.socket, addr: Any) -> None:
        """Serve one connection, remembering its socket while it is open."""
        current = gevent.getcurrent()
        client = _OneSendPerResponse(client)  # type: ignore[assignment]
        self._clients[current] = client
        try:
            super().handle(listener, client, addr)
        finally:
            self._clients.pop(current, None)
            self._idle.discard(current)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        """Serve one request; send a held response head if no body followed it."""
        self._last_arrival = time.monotonic()
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            if isinstance(sock, _OneSendPerResponse):
                sock.flush()

    @contextmanager
    def timeout_ctx(self) -> Iterator[None]:
        """Wraps the wait for the next request: the connection is idle meanwhile."""
        current = gevent.getcurrent()
        self._idle.add(current)
        try:
            with gevent.Timeout(self._keepalive_s, False):
                yield
        finally:
            self._idle.discard(current)

    def _state(self) -> Any:
        """The app's ServiceState; None while the app is still loading (no self.wsgi yet)."""
        return getattr(getattr(self, "wsgi", None), "extensions", {}).get("prediction")

    def handle_exit(self, sig: int, frame: Any) -> None:
        """SIGTERM: /readyz turns 503 and every response says `Connection: close`, so the
        balancer stops reusing connections to this replica; serve on for the drain delay,
        then stop accepting (gunicorn) and close the connections still idle (here);
        in-flight requests finish."""
        state = self._state()
        delay = 0.0
        if state is not None:
            state.draining = True
            delay = state.settings.server.drain_delay_s
        # gunicorn closes a connection after its response when keepalive is off (our
        # idle wait keeps the value read at start). A connection nginx no longer pools
        # cannot race our close of it below.
        self.cfg.set("keepalive", 0)
        gevent.spawn(self._stop_after, delay, sig, frame)

    def _stop_after(self, delay_s: float, sig: int, frame: Any) -> None:
        if delay_s:
            gevent.sleep(delay_s)
        self._refuse_until_quiet()
        super().handle_exit(sig, frame)
        self._close_idle_connections()

    def _refuse_until_quiet(self) -> None:
        """Answer 503 until no request has come for CLOSING_QUIET_S (at most
        CLOSING_MAX_S). nginx retries each elsewhere and, after max_fails of them, stops
        choosing this replica: when the listening socket closes next, no connection sits
        in its accept queue (the kernel resets those, with the request already sent)."""
        state = self._state()
        if state is None:
            return
        state.closing = True
        started = time.monotonic()
        self._last_arrival = started
        while time.monotonic() - started < CLOSING_MAX_S:
            quiet_for = time.monotonic() - self._last_arrival
            if quiet_for >= CLOSING_QUIET_S:
                return
            gevent.sleep(CLOSING_QUIET_S - quiet_for)

    def _close_idle_connections(self) -> None:
        for greenlet in list(self._idle):
            client = self._clients.get(greenlet)
            if client is None:
                continue
            try:
                # The OS socket under gevent's: gevent's recv would wait, in the greenlet
                # that already waits on this socket.
                raw = client
                while hasattr(raw, "_sock"):  # ours, then gevent's
                    raw = raw._sock
                if raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    continue  # a request arrived and waits to be read: it gets its answer
            except BlockingIOError:
                pass  # nothing arrived: idle
            except OSError:
                continue  # closed by the peer meanwhile
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer
