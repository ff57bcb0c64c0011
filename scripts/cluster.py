"""The local cluster: Redis, N api replicas and nginx as processes on this machine.

    scripts/cluster up [--replicas N] [--port P]   start what is not running, wait, summarize
    scripts/cluster status [--json]                each component: pid, port, health
    scripts/cluster scale N                        add or drain-and-remove replicas, no failed request
    scripts/cluster restart --rolling              restart replicas one at a time, no failed request
    scripts/cluster down                           stop everything started, by pid

State (pids, ports) lives in <run dir>/cluster.json, logs in <run dir>/logs/. The run
directory is ./run unless CLUSTER_RUN_DIR says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from balancer.render import BalancerSettings, RenderError, render  # noqa: E402

VENV_BIN = ROOT / ".venv" / "bin"


class ClusterError(RuntimeError):
    """Something the user must fix; printed without a traceback."""


# --- processes ----------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a pid (tells a pid apart from a reused one), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields_after_name = stat.rsplit(")", 1)[1].split()
    if fields_after_name[0] == "Z":  # a zombie has exited
        return None
    return fields_after_name[19]


def _alive(pid: int, start_time: str) -> bool:
    return pid > 0 and _start_time(pid) == start_time


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the direct children of pid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append((int(entry.name), (entry / "cmdline").read_text().replace("\0", " ").strip()))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _wait_until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


def port_free(port: int) -> bool:
    """Nothing listens on this loopback port (TIME_WAIT does not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _http_status(url: str, timeout_s: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def _redis_ping(port: int, password: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if password:
                sock.sendall(f"AUTH {password}\r\n".encode())
                if not sock.recv(64).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _find_binary(name: str, override_env: str) -> str:
    explicit = os.environ.get(override_env)
    if explicit:
        return explicit
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/local/sbin") / name) if p.exists()), None
    )
    if not found:
        raise ClusterError(
            f"{name} is not installed: run `scripts/bootstrap` as root on Debian/Ubuntu, "
            f"install it with your package manager, or set {override_env}"
        )
    return found


# --- state ----------------------------------------------------------------------------------


@dataclass
class Component:
    """One process the cluster started."""

    name: str
    kind: str  # redis | replica | nginx
    port: int
    pid: int = 0
    start_time: str = ""
    log: str = ""

    @property
    def running(self) -> bool:
        """The recorded process is still the one we started, and alive."""
        return _alive(self.pid, self.start_time)


@dataclass
class State:
    """What `up` started, saved between commands."""

    port: int = 8080
    status_port: int = 8081
    internal_port: int = 8082  # the balancer's unlimited listener for load generators and scrapers
    redis_port: int = 6390
    replica_base_port: int = 8001
    bind_host: str = "127.0.0.1"
    slots: int = 0  # replica ports listed in nginx's upstream, running or not
    components: dict[str, Component] = field(default_factory=dict)

    def replicas(self) -> list[Component]:
        """Replica components ordered by number."""
        found = [c for c in self.components.values() if c.kind == "replica"]
        return sorted(found, key=lambda c: int(c.name.rsplit("-", 1)[1]))


class Cluster:
    """Starts, inspects, scales and stops the local cluster under one run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.logs = run_dir / "logs"
        self.state_path = run_dir / "cluster.json"
        self.redis_password = os.environ.get("CLUSTER_REDIS_PASSWORD", "")
        self.state = self._load()

    # state file -------------------------------------------------------------------------
    def _load(self) -> State:
        if not self.state_path.exists():
            return State()
        raw = json.loads(self.state_path.read_text())
        components = {name: Component(**c) for name, c in raw.pop("components", {}).items()}
        return State(**raw, components=components)

    def _save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.state), indent=2))
        tmp.replace(self.state_path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One cluster command at a time per run directory."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / "cluster.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # starting --------------------------------------------------------------------------
    def _spawn(self, component: Component, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{component.name}.log"
        try:
            # A replica killed a moment ago may leave a worker holding the port for ~1 s.
            _wait_until(lambda: port_free(component.port), 5, f"port {component.port}")
        except ClusterError:
            raise ClusterError(
                f"{component.name}: port {component.port} is in use by another program; "
                "choose other ports (see `scripts/cluster up --help`)"
            ) from None
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survives this command; stopped by pid in `down`
            )
        component.pid = process.pid
        component.start_time = _wait_until(lambda: _start_time(process.pid), 5, f"{component.name} to start")
        component.log = str(log_path)
        self.state.components[component.name] = component
        self._save()

    def _check_started(self, component: Component, healthy: Callable[[], bool], timeout_s: float) -> None:
        def ready() -> bool:
            if not component.running:
                tail = Path(component.log).read_text(errors="replace")[-3000:]
                raise ClusterError(f"{component.name} exited during start-up; its log ends:\n{tail}")
            return healthy()

        _wait_until(ready, timeout_s, f"{component.name} on port {component.port} to be ready")

    def _ensure_redis(self) -> None:
        current = self.state.components.get("redis")
        if current and current.running:
            return
        component = Component("redis", "redis", self.state.redis_port)
        data_dir = self.run_dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            _find_binary("redis-server", "CLUSTER_REDIS_BIN"),
            "--port",
            str(component.port),
            "--bind",
            "127.0.0.1",  # local mode: never reachable from other hosts
            "--save",
            "",  # a result cache: nothing worth writing to disk
            "--appendonly",
            "no",
            "--maxmemory",
            os.environ.get("CLUSTER_REDIS_MAXMEMORY", "256mb"),
            "--maxmemory-policy",
            "allkeys-lru",  # evict the least recently used results when full
            "--dir",
            str(data_dir),
        ]
        if self.redis_password:
            argv += ["--requirepass", self.redis_password]
        self._spawn(component, argv)
        self._check_started(component, lambda: _redis_ping(component.port, self.redis_password), 15)

    def _redis_url(self) -> str:
        auth = f":{self.redis_password}@" if self.redis_password else ""
        return f"redis://{auth}127.0.0.1:{self.state.redis_port}/0"

    def _start_replica(self, number: int) -> Component:
        name = f"replica-{number}"
        component = Component(name, "replica", self.state.replica_base_port + number - 1)
        env = {
            "SERVICE_BIND": f"127.0.0.1:{component.port}",
            "SERVICE_REPLICA_ID": name,
            "REDIS_URL": self._redis_url(),
            "SERVICE_METRICS_DIR": str(self.run_dir / "metrics" / name),
            "SERVICE_MODELS_DIR": os.environ.get("SERVICE_MODELS_DIR", str(ROOT / "models")),
        }
        argv = [str(VENV_BIN / "gunicorn"), "-c", "service/gunicorn.conf.py", "service.wsgi:app"]
        self._spawn(component, argv, env)
        return component

    def _replica_ready(self, component: Component) -> bool:
        return _http_status(f"http://127.0.0.1:{component.port}/readyz") == 200

    def _ensure_replicas(self, count: int) -> list[Component]:
        started = []
        for number in range(1, count + 1):
            current = self.state.components.get(f"replica-{number}")
            if current and current.running:
                continue
            started.append(self._start_replica(number))
        for component in started:
            self._check_started(component, functools.partial(self._replica_ready, component), 60)
        return started

    # nginx -------------------------------------------------------------------------------
    def _nginx_paths(self) -> tuple[Path, Path]:
        prefix = self.run_dir / "nginx"
        return prefix, prefix / "nginx.conf"

    def _slot_ports(self) -> list[int]:
        return [self.state.replica_base_port + i for i in range(self.state.slots)]

    def _render_nginx(self) -> Path:
        prefix, conf = self._nginx_paths()
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        # nginx needs a small share of what the replicas need (about 0.1 ms of CPU per request
        # against 0.6 ms): on a small machine one nginx worker leaves the cores to them.
        environ = {"BALANCER_WORKER_PROCESSES": str(max(1, (os.cpu_count() or 1) // 4)), **os.environ}
        try:
            text = render(
                BalancerSettings.from_env(
                    environ,
                    listen=f"{self.state.bind_host}:{self.state.port}",
                    internal_listen=f"127.0.0.1:{self.state.internal_port}",
                    status_listen=f"127.0.0.1:{self.state.status_port}",
                    upstream_servers=" ".join(f"127.0.0.1:{port}" for port in self._slot_ports()),
                    # Every slot once if need be: a request finds a live replica among dead slots.
                    next_upstream_tries=str(self.state.slots),
                    pid_file=str(prefix / "nginx.pid"),
                    error_log=str(self.logs / "nginx-error.log"),
                    access_log=str(self.logs / "access.log"),
                    temp_dir=str(prefix / "tmp"),
                )
            )
        except RenderError as exc:
            raise ClusterError(f"balancer configuration: {exc}") from None
        candidate = conf.with_suffix(".new")
        candidate.write_text(text)
        check = subprocess.run(
            [
                self._nginx(),
                "-t",
                "-q",
                "-p",
                str(prefix),
                "-c",
                str(candidate),
                "-e",
                str(self.logs / "nginx-error.log"),
            ],
            capture_output=True,
            text=True,
        )
        if check.returncode != 0:
            raise ClusterError(f"nginx rejected the rendered configuration {candidate}:\n{check.stderr}")
        candidate.replace(conf)
        return conf

    def _nginx(self) -> str:
        return _find_binary("nginx", "CLUSTER_NGINX_BIN")

    def _balancer_ok(self) -> bool:
        return _http_status(f"http://127.0.0.1:{self.state.port}/readyz") == 200

    def _ensure_nginx(self) -> None:
        prefix, conf_path = self._nginx_paths()
        previous = conf_path.read_text() if conf_path.exists() else ""
        conf = self._render_nginx()
        current = self.state.components.get("nginx")
        if current and current.running:
            if conf.read_text() != previous:
                print(
                    "cluster: balancer configuration changed; reloading nginx (its idle client "
                    "keep-alive connections are closed, clients reconnect)",
                    file=sys.stderr,
                )
                self._reload_nginx(current)
            return
        component = Component("nginx", "nginx", self.state.port)
        argv = [
            self._nginx(),
            "-p",
            str(prefix),
            "-c",
            str(conf),
            "-e",
            str(self.logs / "nginx-error.log"),
            "-g",
            "daemon off;",
        ]
        self._spawn(component, argv)
        self._check_started(component, self._balancer_ok, 15)

    def _reload_nginx(self, nginx: Component) -> None:
        """Graceful reload (what `nginx -s reload` sends); old workers finish their requests."""
        old_workers = {pid for pid, _ in _children(nginx.pid)}
        os.kill(nginx.pid, signal.SIGHUP)

        def old_workers_gone() -> bool:
            current = {pid for pid, _ in _children(nginx.pid)}
            return not (current & old_workers) and bool(current)

        _wait_until(old_workers_gone, 60, "nginx's old workers to finish their requests after reload")

    # commands ------------------------------------------------------------------------------
    def up(
        self,
        replicas: int,
        port: int | None,
        status_port: int | None,
        internal_port: int | None,
        redis_port: int | None,
        replica_base_port: int | None,
        bind_host: str | None,
    ) -> None:
        """Start what is not running; scale to `replicas`; wait until the balancer answers."""
        nginx = self.state.components.get("nginx")
        if port is not None and nginx and nginx.running and port != self.state.port:
            raise ClusterError(f"the cluster already runs on port {self.state.port}; `down` it first")
        if not any(c.running for c in self.state.components.values()):
            self.state = State(
                port=port or self.state.port,
                status_port=status_port or (port + 1 if port else self.state.status_port),
                internal_port=internal_port or (port + 2 if port else self.state.internal_port),
                redis_port=redis_port or self.state.redis_port,
                replica_base_port=replica_base_port or self.state.replica_base_port,
                bind_host=bind_host or self.state.bind_host,
            )
        self._ensure_redis()
        self._scale(replicas)

    def scale(self, replicas: int) -> None:
        """Change the replica count of a running cluster without failing a request."""
        nginx = self.state.components.get("nginx")
        if not (nginx and nginx.running):
            raise ClusterError("the cluster is not running; start it with `scripts/cluster up`")
        self._scale(replicas)

    def _scale(self, replicas: int) -> None:
        """Start replicas 1..N, make sure nginx lists enough slots, drain and stop the rest.

        nginx's upstream lists CLUSTER_UPSTREAM_SLOTS replica ports whether or not a replica
        runs there: a refused connection is retried on the next replica at once and the
        slot is skipped for fail_timeout. So scaling needs no nginx reload, and a reload
        is what would fail requests: it closes clients' idle keep-alive connections.
        """
        self.state.slots = max(self.state.slots, replicas, int(os.environ.get("CLUSTER_UPSTREAM_SLOTS", "8")))
        self._save()
        self._ensure_replicas(replicas)
        self._ensure_nginx()
        extra = [c for c in self.state.replicas() if int(c.name.rsplit("-", 1)[1]) > replicas]
        self._drain_and_stop(extra)

    def restart_rolling(self) -> None:
        """Restart every replica, one at a time, never leaving nginx without a live one."""
        nginx = self.state.components.get("nginx")
        if not (nginx and nginx.running):
            raise ClusterError("the cluster is not running; start it with `scripts/cluster up`")
        count = len(self.state.replicas())
        spare = count == 1
        if spare:  # one replica: bring a second up first, so someone always answers
            self._scale(2)
            self._wait_routed("replica-2")
        for number in range(1, count + 1):
            component = self.state.components[f"replica-{number}"]
            self._stop(component, signal.SIGTERM, 60)
            started = self._start_replica(number)
            self._check_started(started, functools.partial(self._replica_ready, started), 60)
            self._wait_routed(started.name)
        if spare:
            self._scale(1)

    def _wait_routed(self, name: str, timeout_s: float = 30) -> None:
        """Until nginx sends requests to `name` again (it retries a failed slot after fail_timeout)."""
        url = f"http://127.0.0.1:{self.state.port}/v2/health/ready"

        def routed() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return response.headers.get("X-Served-By") == name
            except OSError:
                return False

        _wait_until(routed, timeout_s, f"nginx to route to {name} again")

    def _drain_and_stop(self, replicas: list[Component]) -> None:
        """SIGTERM: a replica finishes in-flight requests and closes idle connections; nginx
        retries anything that races the close on another replica."""
        for component in replicas:
            self._stop(component, signal.SIGTERM, 60)
            shutil.rmtree(self.run_dir / "metrics" / component.name, ignore_errors=True)

    def _stop(self, component: Component, signum: int, timeout_s: float) -> None:
        if component.running:
            os.kill(component.pid, signum)
            try:
                _wait_until(lambda: not component.running, timeout_s, f"{component.name} to stop")
            except ClusterError:
                os.killpg(component.pid, signal.SIGKILL)
                _wait_until(lambda: not component.running, 10, f"{component.name} to die")
        _wait_until(lambda: port_free(component.port), 15, f"port {component.port} to be free")
        self.state.components.pop(component.name, None)
        self._save()

    def down(self) -> None:
        """Stop nginx first (no new requests), then replicas, then Redis."""
        order = {"nginx": 0, "replica": 1, "redis": 2}
        signals = {"nginx": signal.SIGQUIT, "replica": signal.SIGTERM, "redis": signal.SIGTERM}
        for component in sorted(self.state.components.values(), key=lambda c: order[c.kind]):
            self._stop(component, signals[component.kind], 60)
        self.state_path.unlink(missing_ok=True)
        (self.run_dir / "nginx" / "nginx.pid").unlink(missing_ok=True)
        shutil.rmtree(self.run_dir / "metrics", ignore_errors=True)

    def status(self) -> dict[str, Any]:
        """Each component with its pid, port, whether it runs and whether it is healthy."""
        rows = []
        for component in sorted(self.state.components.values(), key=lambda c: (c.kind, c.name)):
            running = component.running
            if component.kind == "redis":
                healthy = running and _redis_ping(component.port, self.redis_password)
                health_url = f"redis://127.0.0.1:{component.port}"
            elif component.kind == "replica":
                healthy = running and self._replica_ready(component)
                health_url = f"http://127.0.0.1:{component.port}/readyz"
            else:
                healthy = running and _http_status(f"http://127.0.0.1:{self.state.status_port}/nginx_status") == 200
                health_url = f"http://127.0.0.1:{self.state.status_port}/nginx_status"
            rows.append({**asdict(component), "running": running, "healthy": healthy, "health": health_url})
        return {
            "run_dir": str(self.run_dir),
            "logs": str(self.logs),
            "balancer": f"http://127.0.0.1:{self.state.port}" if rows else None,
            "internal": f"http://127.0.0.1:{self.state.internal_port}" if rows else None,
            "replicas": len(self.state.replicas()),
            "components": rows,
        }


def _print_status(status: dict[str, Any]) -> None:
    if not status["components"]:
        print(f"nothing running (run dir {status['run_dir']})")
        return
    print(f"{'component':<12} {'pid':>8} {'port':>6}  {'state':<8} health")
    for row in status["components"]:
        state = "healthy" if row["healthy"] else "running" if row["running"] else "stopped"
        print(f"{row['name']:<12} {row['pid']:>8} {row['port']:>6}  {state:<8} {row['health']}")
    print(f"\nbalancer: {status['balancer']}   internal: {status['internal']}   logs: {status['logs']}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="scripts/cluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the cluster (idempotent)")
    up.add_argument("--replicas", type=int, default=int(os.environ.get("REPLICAS", "4")))
    up.add_argument("--port", type=int, help="balancer port (default 8080)")
    up.add_argument("--status-port", type=int, help="stub_status port on loopback (default port+1)")
    up.add_argument("--internal-port", type=int, help="unlimited listener with /metrics, on loopback (default port+2)")
    up.add_argument("--redis-port", type=int, help="Redis port (default 6390)")
    up.add_argument("--replica-base-port", type=int, help="first replica's port (default 8001)")
    up.add_argument("--bind", dest="bind_host", help="balancer address (default 127.0.0.1; 0.0.0.0 for all)")
    status = sub.add_parser("status", help="show each component")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    scale = sub.add_parser("scale", help="change the replica count of a running cluster")
    scale.add_argument("replicas", type=int)
    restart = sub.add_parser("restart", help="restart the replicas (new code, models or settings)")
    restart.add_argument("--rolling", action="store_true", required=True, help="one at a time, no failed request")
    sub.add_parser("down", help="stop everything `up` started")
    args = parser.parse_args(argv)

    cluster = Cluster(Path(os.environ.get("CLUSTER_RUN_DIR", ROOT / "run")).resolve())
    try:
        if args.command in ("up", "scale") and args.replicas < 1:
            raise ClusterError("--replicas must be at least 1")
        if args.command == "status":
            report = cluster.status()
            print(json.dumps(report, indent=2)) if args.json else _print_status(report)
            return 0 if all(r["healthy"] for r in report["components"]) else 1
        with cluster.locked():
            cluster.state = cluster._load()
            if args.command == "up":
                cluster.up(
                    args.replicas,
                    args.port,
                    args.status_port,
                    args.internal_port,
                    args.redis_port,
                    args.replica_base_port,
                    args.bind_host,
                )
                _print_status(cluster.status())
            elif args.command == "scale":
                cluster.scale(args.replicas)
                print(f"scaled to {args.replicas} replica(s)")
            elif args.command == "restart":
                cluster.restart_rolling()
                print("every replica restarted")
            else:
                cluster.down()
                print("cluster stopped")
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
