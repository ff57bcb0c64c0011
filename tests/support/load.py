"""Paced load from chosen source addresses, and what each request got (`Outcome`)."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from requests.adapters import HTTPAdapter


class SourceAddressAdapter(HTTPAdapter):
    """A requests adapter whose connections leave from `source` (another client, as far
    as the balancer's rate limit can tell)."""

    def __init__(self, source: str) -> None:
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["source_address"] = (self.source, 0)
        return super().init_poolmanager(*args, **kwargs)


@dataclass(frozen=True)
class Outcome:
    """One request of a load: when it started, what came back, and who answered."""

    started: float  # time.monotonic()
    outcome: str  # the status code, or the exception's class name
    served_by: str
    ok: bool
    seconds: float = 0.0
    cache: str = ""  # X-Cache
    body: int = 0  # which of the load's bodies
    version: str = ""  # X-Model-Version


class PacedLoad:
    """A bounded open-ish loop load at about `rate` requests/s over `clients` keep-alive
    connections (http.client: no silent retries or reconnects), for fault tests.

    Every request is recorded: a status other than 200, a body without predictions, or
    any exception is a failure, counted by name (a reset, a refusal and a closed
    connection are told apart); a connection that failed is reopened. Stops by itself
    after `max_seconds`; `stopped_in_time` says whether the test stopped it first, and a
    client thread that died is in `thread_errors`. `source` binds the clients to a local
    address (another client, as far as the balancer can tell). With `bodies`, each client
    sends them in turn (`Outcome.body` says which).
    """

    def __init__(
        self,
        url: str,
        rate: float = 100.0,
        clients: int = 4,
        max_seconds: float = 300.0,
        path: str = "/v1/models/iris:predict",
        body: dict | None = None,
        source: str | None = None,
        bodies: Sequence[dict] = (),
    ) -> None:
        import threading
        import urllib.parse

        parsed = urllib.parse.urlsplit(url)
        self.host, self.port, self.path = parsed.hostname or "127.0.0.1", parsed.port or 80, path
        chosen = bodies or [body or {"instances": [[5.1, 3.5, 1.4, 0.2]]}]
        self.bodies = [json.dumps(item).encode() for item in chosen]
        self.source_address = (source, 0) if source else None
        self.interval_s = clients / rate
        self.max_seconds = max_seconds
        self.results: list[Outcome] = []
        self.thread_errors: list[str] = []
        self.stopped_in_time = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _request(self, connection: http.client.HTTPConnection, body: bytes) -> tuple[str, str, bool, str, str]:
        connection.request("POST", self.path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        ok = response.status == 200 and b'"predictions"' in data
        return (
            str(response.status),
            response.getheader("X-Served-By", ""),
            ok,
            response.getheader("X-Cache", ""),
            response.getheader("X-Model-Version", ""),
        )

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=30, source_address=self.source_address)

    def _client(self) -> None:
        try:
            deadline = time.monotonic() + self.max_seconds
            connection = self._connect()
            next_at = time.monotonic()
            sent = 0
            while not self._stop.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                body = sent % len(self.bodies)
                sent += 1
                try:
                    outcome, served_by, ok, cache, version = self._request(connection, self.bodies[body])
                except (OSError, http.client.HTTPException) as exc:
                    outcome, served_by, ok, cache, version = type(exc).__name__, "", False, "", ""
                    connection.close()
                    connection = self._connect()
                with self._lock:
                    self.results.append(
                        Outcome(started, outcome, served_by, ok, time.monotonic() - started, cache, body, version)
                    )
                next_at += self.interval_s
                self._stop.wait(max(0.0, next_at - time.monotonic()))
            connection.close()
        except Exception as exc:  # noqa: BLE001 - a dead client thread must fail the test, not vanish
            with self._lock:
                self.thread_errors.append(repr(exc))

    def __enter__(self) -> PacedLoad:
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop and wait for every client; notes whether the load was still running."""
        if not self._stop.is_set():
            self.stopped_in_time = time.monotonic() < self.started + self.max_seconds
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in self._threads), "a load client did not stop"

    def since(self, moment: float) -> list[Outcome]:
        """The requests started at or after `moment` (time.monotonic())."""
        with self._lock:
            return [r for r in self.results if r.started >= moment]

    def counts(self, results: list[Outcome] | None = None) -> dict:
        """Sent, failed by outcome, and requests per replica."""
        from collections import Counter

        chosen = self.results if results is None else results
        failed = Counter(r.outcome for r in chosen if not r.ok)
        return {"sent": len(chosen), "failed": dict(failed), "served_by": dict(Counter(r.served_by for r in chosen))}

    def summary(self, fault: str) -> dict:
        """Sent, succeeded, failed by outcome, worst latency; printed as the fault's FAULT line.
        Also fails the test if a client thread died or the load ended before the fault did."""
        assert not self.thread_errors, f"a load client died: {self.thread_errors}"
        assert self.stopped_in_time, f"the load stopped by its own limit ({self.max_seconds} s) before the fault ended"
        counts = self.counts()
        worst = max((r.seconds for r in self.results), default=0.0)
        line = {
            "fault": fault,
            "sent": counts["sent"],
            "succeeded": sum(r.ok for r in self.results),
            "failed": counts["failed"],
            "worst_latency_s": round(worst, 3),
        }
        print(f"FAULT {json.dumps(line)}")
        return line
