"""The tutorials' set-up, to measure against in the same run: gunicorn sync workers, no
result cache, and nginx proxying without upstream keepalive (HTTP/1.0 to the app)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from balancer.render import TEMPLATE
from loadtest.generators import LOADTEST

ROOT = LOADTEST.parent
BASELINE_WORKERS = 3  # what the tutorials use on a small machine (and what issue 5 measured)

NGINX_CONF = """worker_processes auto;
pid {run}/nginx.pid;
error_log {run}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    {log_format}
    access_log {run}/access.log json_lines;
    client_body_temp_path {run}/tmp;
    proxy_temp_path {run}/tmp;
    fastcgi_temp_path {run}/tmp;
    uwsgi_temp_path {run}/tmp;
    scgi_temp_path {run}/tmp;
    map $http_x_request_id $req_id {{ default $request_id; }}
    upstream app {{ server 127.0.0.1:{app_port}; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_set_header Host $host;
        }}
    }}
}}
"""


def _log_format() -> str:
    """The cluster balancer's JSON log format, so both access logs parse the same way."""
    text = TEMPLATE.read_text()
    start = text.index("log_format json_lines")
    return text[start : text.index(";", start) + 1]


class Baseline:
    """Starts and stops the baseline stack under `run_dir`, on the given ports."""

    def __init__(self, run_dir: Path, port: int, app_port: int, nginx_bin: str) -> None:
        self.run_dir = run_dir
        self.port = port
        self.app_port = app_port
        self.nginx_bin = nginx_bin
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.url = f"http://127.0.0.1:{port}"

    def argv(self) -> dict[str, list[str]]:
        """The exact commands, for the report."""
        return {
            "app": [
                str(Path(sys.executable).parent / "gunicorn"),
                "-c",
                "service/gunicorn.conf.py",
                "--worker-class",
                "sync",
                "--workers",
                str(BASELINE_WORKERS),
                "--keep-alive",
                "2",
                "service.wsgi:app",
            ],
            "nginx": [
                self.nginx_bin,
                "-p",
                str(self.run_dir),
                "-c",
                str(self.run_dir / "nginx.conf"),
                "-e",
                str(self.run_dir / "nginx-error.log"),
                "-g",
                "daemon off;",
            ],
        }

    def start(self) -> None:
        """Start the app and nginx, and wait until a prediction comes back."""
        (self.run_dir / "tmp").mkdir(parents=True, exist_ok=True)
        conf = NGINX_CONF.format(run=self.run_dir, port=self.port, app_port=self.app_port, log_format=_log_format())
        (self.run_dir / "nginx.conf").write_text(conf)
        env = {
            **os.environ,
            "SERVICE_BIND": f"127.0.0.1:{self.app_port}",
            "SERVICE_REPLICA_ID": "baseline",
            "REDIS_URL": "",  # no result cache
            "SERVICE_METRICS_DIR": str(self.run_dir / "metrics"),
            "SERVICE_MODELS_DIR": os.environ.get("SERVICE_MODELS_DIR", str(ROOT / "models")),
        }
        for name, argv in self.argv().items():
            log = (self.run_dir / f"{name}.log").open("ab")
            self.processes[name] = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the baseline did not come up; see {self.run_dir}/*.log")

    def pids(self) -> dict[str, int]:
        """Process tree roots, for CPU accounting."""
        return {f"baseline {name}": process.pid for name, process in self.processes.items()}

    def stop(self) -> None:
        """Stop both, by pid."""
        for name, process in self.processes.items():
            if process.poll() is None:
                process.send_signal(signal.SIGQUIT if name == "nginx" else signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=5)
