"""nginx for the local cluster: the balancer template rendered for local ports and paths,
checked with `nginx -t` before it replaces the running configuration."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

from balancer.render import render, scheduling_argv
from balancer.settings import BalancerSettings, RenderError
from localcluster.processes import ClusterError, children, wait_until
from localcluster.state import State


def default_worker_processes(cores: int | None = None) -> int:
    """nginx workers of the local cluster: two (one per core below two), and a quarter of
    the cores above eight. nginx needs a small share of what the replicas need for a
    prediction (about 0.1 ms of CPU against 0.6), so more would only compete with them; but
    one worker caps the L1 at one core while the replicas idle: on 2 cores a hot key ran at
    0.35x nginx's own fixed reply with one worker, 0.52x with two (docs/performance.md)."""
    cores = cores or os.cpu_count() or 1
    return max(min(2, cores), cores // 4)


def worker_processes(environ: Mapping[str, str]) -> str:
    """The nginx workers a local cluster started with `environ` runs: its
    BALANCER_WORKER_PROCESSES, else default_worker_processes()."""
    return environ.get("BALANCER_WORKER_PROCESSES") or str(default_worker_processes())


class LocalBalancer:
    """Paths, rendering and reloads of the cluster's nginx under <run dir>/nginx."""

    def __init__(self, run_dir: Path, environ: Mapping[str, str], nginx: str) -> None:
        self.prefix = run_dir / "nginx"
        self.conf = self.prefix / "nginx.conf"
        self.logs = run_dir / "logs"
        self.environ = environ
        self.nginx = nginx

    def settings(self, state: State) -> BalancerSettings:
        """BALANCER_* settings from the environment; listeners, upstream and paths from the cluster."""
        environ = {**self.environ, "BALANCER_WORKER_PROCESSES": worker_processes(self.environ)}
        slot_ports = [state.ports.replica_base + i for i in range(state.slots)]
        return BalancerSettings.from_env(
            environ,
            listen=f"{state.bind_host}:{state.ports.balancer}",
            status_listen=f"127.0.0.1:{state.ports.status}",
            internal_listen=f"127.0.0.1:{state.ports.internal}",
            upstream_servers=" ".join(f"127.0.0.1:{port}" for port in slot_ports),
            # Every slot once if need be: a request finds a live replica among dead slots.
            next_upstream_tries=str(state.slots),
            pid_file=str(self.prefix / "nginx.pid"),
            error_log=str(self.error_log),
            access_log=str(self.logs / "access.log"),
            temp_dir=str(self.prefix / "tmp"),
        )

    def write_config(self, state: State) -> bool:
        """Render, `nginx -t`, then replace nginx.conf; whether it changed."""
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            text = render(self.settings(state))
        except RenderError as exc:
            raise ClusterError(f"balancer configuration: {exc}") from None
        previous = self.conf.read_text() if self.conf.exists() else ""
        candidate = self.conf.with_suffix(".new")
        candidate.write_text(text)
        check = subprocess.run(
            [self.nginx, "-t", "-q", "-p", str(self.prefix), "-c", str(candidate), "-e", str(self.error_log)],
            capture_output=True,
            text=True,
        )
        if check.returncode != 0:
            raise ClusterError(f"nginx rejected the rendered configuration {candidate}:\n{check.stderr}")
        candidate.replace(self.conf)
        return text != previous

    @property
    def error_log(self) -> Path:
        """nginx's error log."""
        return self.logs / "nginx-error.log"

    def argv(self) -> list[str]:
        """nginx in the foreground on the rendered configuration, under BALANCER_SCHEDULING's
        policy (chrt execs nginx: the pid is nginx's)."""
        try:
            prefix = scheduling_argv(BalancerSettings.from_env(self.environ))
        except RenderError as exc:
            raise ClusterError(f"balancer configuration: {exc}") from None
        if prefix and shutil.which(prefix[0]) is None:
            raise ClusterError(
                f"BALANCER_SCHEDULING=batch needs {prefix[0]} (util-linux): install it, "
                "or set BALANCER_SCHEDULING=normal"
            )
        return [
            *prefix,
            self.nginx,
            "-p",
            str(self.prefix),
            "-c",
            str(self.conf),
            "-e",
            str(self.error_log),
            "-g",
            # Started as root, nginx runs its workers as `nobody`, who cannot reach a run
            # directory under /root (or pytest's 0700 folders), where the L1 cache and temp
            # files live: keep them as the user who started the cluster.
            "daemon off; user root;" if os.geteuid() == 0 else "daemon off;",
        ]

    def reload(self, master_pid: int) -> None:
        """Graceful reload (what `nginx -s reload` sends); old workers finish their requests."""
        old_workers = {pid for pid, _ in children(master_pid)}
        os.kill(master_pid, signal.SIGHUP)

        def old_workers_gone() -> bool:
            current = {pid for pid, _ in children(master_pid)}
            return not (current & old_workers) and bool(current)

        wait_until(old_workers_gone, 60, "nginx's old workers to finish their requests after reload")
