"""Dedicated model servers measured beside the cluster: `scripts/bench --peers mlserver`.

A peer serves the same demo model artifact (models/<name>/<version>/model.joblib) through
the same protocol as the cluster is measured with, on this machine, in the same rounds.

MLServer (Seldon's, https://github.com/SeldonIO/MLServer) runs from a virtualenv of its
own under .peers/, made from PyPI on first use with the scikit-learn this project runs
(the artifact unpickles the same), and uvloop 0.21.0: with uvloop 0.23 its parallel
workers crash ("no current event loop"). Its best set-up on a small machine, measured
here on 2 cores: one MLServer per core (at least two) with `parallel_workers: 0`, the
model in the server's own event loop (parallel workers add a process hop per request),
behind an nginx with upstream keepalive and as many workers as our balancer runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from balancer.render import scheduling_argv
from balancer.settings import BalancerSettings
from loadtest.generators import pool_bodies, v2_path
from loadtest.payloads import Mix
from localcluster.balancer import default_worker_processes
from localcluster.ports import free_port
from localcluster.processes import ClusterError, wait_until

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT / ".peers"
MLSERVER_VERSION = "1.7.1"
MLSERVER = "MLServer"
KNOWN = {"mlserver": MLSERVER}
START_TIMEOUT_S = 120.0


class PeerError(RuntimeError):
    """A peer could not be installed or started (the message says what to do)."""


def _scikit_learn_version() -> str:
    import sklearn

    return str(sklearn.__version__)


def mlserver_requirements() -> list[str]:
    """What MLServer's virtualenv holds: MLServer and its scikit-learn runtime, pinned."""
    return [
        f"mlserver=={MLSERVER_VERSION}",
        f"mlserver-sklearn=={MLSERVER_VERSION}",
        "uvloop==0.21.0",
        f"scikit-learn=={_scikit_learn_version()}",
    ]


def ensure_virtualenv(name: str, requirements: list[str], root: Path = PEERS_DIR) -> Path:
    """The virtualenv .peers/<name>, made and filled from PyPI when missing or made for other
    requirements; its bin folder. A failed install leaves no half-made virtualenv behind."""
    venv = root / name
    marker = venv / "requirements.txt"
    wanted = "\n".join(requirements) + "\n"
    if marker.exists() and marker.read_text() == wanted:
        return venv / "bin"
    shutil.rmtree(venv, ignore_errors=True)
    sys.stderr.write(f"bench: installing {' '.join(requirements)} into {venv} (once; a few minutes)\n")
    # The interpreter this project runs on, not its virtualenv's site-packages.
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", str(venv)], [str(venv / "bin" / "pip"), "install", "--quiet", *requirements]]
    for argv in steps:
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise PeerError(f"could not install {name}: {' '.join(argv[:4])} ... exited {result.returncode}\n{tail}")
    marker.write_text(wanted)
    return venv / "bin"


def mlserver_servers(cores: int | None = None) -> int:
    """How many MLServers the best set-up runs: one per core (each is one process), at least two."""
    return max(2, cores or os.cpu_count() or 2)


NGINX_CONF = """worker_processes {workers};
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {run}/tmp;
    proxy_temp_path {run}/tmp;
    fastcgi_temp_path {run}/tmp;
    uwsgi_temp_path {run}/tmp;
    scgi_temp_path {run}/tmp;
    keepalive_requests 1000000;
    upstream peer {{
{servers}
        keepalive 64;
        keepalive_requests 1000000;
        # Below uvicorn's keep-alive (5 s, which MLServer keeps): nginx must drop an idle
        # connection before the server does, or it reuses one the server is closing (a
        # reset, and a 502: nginx does not retry a POST) after a pause between points.
        keepalive_timeout 4s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://peer;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


class MLServerPeer:
    """MLServer serving one demo model over V2: `servers` processes behind an nginx."""

    name = MLSERVER

    def __init__(
        self,
        run_dir: Path,
        model: str,
        artifact: Path,
        nginx: str,
        servers: int | None = None,
        nginx_workers: str | None = None,
        nginx_scheduling: str | None = None,
    ) -> None:
        """`nginx_workers`, `nginx_scheduling`: as the cluster's balancer runs (default: its
        defaults)."""
        self.run_dir = run_dir
        self.nginx_workers = nginx_workers or str(default_worker_processes())
        self.nginx_scheduling = nginx_scheduling or BalancerSettings().scheduling
        self.model = model
        self.artifact = artifact
        self.nginx = nginx
        self.servers = servers or mlserver_servers()
        self.port = 0
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """Where load generators send requests (the peer's nginx)."""
        return f"http://127.0.0.1:{self.port}"

    def describe(self) -> str:
        """The set-up, for the report."""
        return (
            f"{self.servers} × MLServer {MLSERVER_VERSION} (mlserver-sklearn, parallel_workers 0) behind nginx "
            f"({self.nginx_workers} worker(s), {self.nginx_scheduling} scheduling, upstream keepalive 64)"
        )

    def pids(self) -> dict[str, int]:
        """Process trees to account CPU to."""
        return {name: process.pid for name, process in self.processes.items() if process.poll() is None}

    def start(self) -> MLServerPeer:
        """Install when missing, start every server and the nginx, wait until a prediction
        through the nginx answers."""
        if not self.artifact.exists():
            raise PeerError(f"{self.artifact} is missing: run scripts/bootstrap (it trains the demo models)")
        bin_dir = ensure_virtualenv(f"mlserver-{MLSERVER_VERSION}", mlserver_requirements())
        shutil.rmtree(self.run_dir, ignore_errors=True)
        (self.run_dir / "nginx" / "tmp").mkdir(parents=True)
        ports = []
        try:
            for i in range(1, self.servers + 1):
                folder = self.run_dir / f"mlserver-{i}"
                (folder / self.model).mkdir(parents=True)
                http_port = free_port()
                ports.append(http_port)
                settings = {
                    "host": "127.0.0.1",
                    "http_port": http_port,
                    "grpc_port": free_port(),
                    "metrics_port": free_port(),
                    "parallel_workers": 0,
                    "debug": False,
                }
                (folder / "settings.json").write_text(json.dumps(settings, indent=2))
                model_settings = {
                    "name": self.model,
                    "implementation": "mlserver_sklearn.SKLearnModel",
                    "parameters": {"uri": str(self.artifact.resolve()), "version": "1"},
                }
                (folder / self.model / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
                self._spawn(f"mlserver-{i}", [str(bin_dir / "mlserver"), "start", str(folder)], folder / "log.txt")
            self.port = free_port()
            nginx_dir = self.run_dir / "nginx"
            servers = "\n".join(f"        server 127.0.0.1:{port};" for port in ports)
            conf = NGINX_CONF.format(workers=self.nginx_workers, run=nginx_dir, servers=servers, port=self.port)
            (nginx_dir / "nginx.conf").write_text(conf)
            prefix = scheduling_argv(BalancerSettings(scheduling=self.nginx_scheduling))
            argv = [*prefix, self.nginx, "-p", str(nginx_dir), "-c", str(nginx_dir / "nginx.conf"), "-e"]
            argv += [str(nginx_dir / "nginx-error.log"), "-g", "daemon off;"]
            self._spawn("nginx (MLServer's)", argv, nginx_dir / "log.txt")
            self._wait_ready(ports)
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str], log: Path) -> None:
        with log.open("wb") as out:
            self.processes[name] = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.run_dir
            )

    def _wait_ready(self, ports: list[int]) -> None:
        """Every server ready for the model, then a real prediction through the nginx."""
        body = pool_bodies(self.model, Mix(pool_size=1, hit_ratio=0.0), "v2")[0].encode()
        pending = [f"http://127.0.0.1:{port}/v2/models/{self.model}/ready" for port in ports]
        pending.append(f"{self.url}{v2_path(self.model)}")

        def answered() -> bool:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    log = self.run_dir / (name if name.startswith("mlserver") else "nginx") / "log.txt"
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise PeerError(f"{name} exited with {process.returncode} while starting:\n{tail}")
            while pending:
                data = body if pending[0].endswith("/infer") else None
                request = urllib.request.Request(pending[0], data, {"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status != 200:
                        return False
                pending.pop(0)
            return True

        try:
            wait_until(answered, START_TIMEOUT_S, "MLServer to answer", poll_s=0.5, tolerate=(OSError,))
        except ClusterError as error:
            raise PeerError(f"{error} (logs: {self.run_dir})") from error

    def stop(self) -> None:
        """SIGTERM each process group we started (by pid), SIGKILL what is left after 15 s."""
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        self.processes.clear()

    def __enter__(self) -> MLServerPeer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
