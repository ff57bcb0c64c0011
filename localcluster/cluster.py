"""The Cluster: start, status, scale, restart and stop Redis, the replicas and nginx."""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from localcluster import redis_topology
from localcluster.balancer import LocalBalancer
from localcluster.ports import Ports, port_free
from localcluster.processes import (
    ClusterError,
    environ_of,
    find_binary,
    http_status,
    kill_tree,
    redis_ping,
    start_time,
    wait_until,
    write_private,
)
from localcluster.settings import REPLICA_PREFIXES, ClusterSettings, settings_of
from localcluster.state import Component, ComponentStatus, State, StateFile, Status

ROOT = Path(__file__).resolve().parent.parent


class Cluster:
    """Starts, inspects, scales and stops the local cluster under one run directory.

    `environ` (default: this process's environment) holds the SERVICE_*, BALANCER_*,
    REDIS_* and CLUSTER_* settings. `start` records them with the cluster; `scale` and an
    idempotent `start` keep using the recorded ones, so any process may drive a running
    cluster without changing how it runs; `restart` takes the replica settings (SERVICE_*,
    REDIS_*) of its caller. Replicas get these plus what the cluster sets for each (bind
    address, replica id, Redis URL, metrics folder).
    """

    def __init__(self, run_dir: Path, environ: Mapping[str, str] | None = None) -> None:
        self.run_dir = run_dir.resolve()
        self.logs = self.run_dir / "logs"
        self.caller_environ = dict(os.environ if environ is None else environ)
        self.state_file = StateFile(self.run_dir)
        self.state = self.state_file.load()
        self._nginx_binary: str | None = None

    # --- commands -------------------------------------------------------------------------
    def start(
        self, replicas: int, ports: Ports | None = None, bind_host: str | None = None, redis: str | None = None
    ) -> Status:
        """Start what is not running, scale to `replicas`, wait until the balancer answers.
        `redis` is the cache's topology (default CLUSTER_REDIS_TOPOLOGY)."""
        if replicas < 1:
            raise ClusterError("--replicas must be at least 1")
        topology = redis or ClusterSettings.from_env(self.caller_environ).redis_topology
        if topology not in redis_topology.TOPOLOGIES:
            raise ClusterError(f"unknown Redis topology {topology!r}: one of {', '.join(redis_topology.TOPOLOGIES)}")
        with self.state_file.locked():
            self.state = self.state_file.load()
            if self.state.any_running():
                if ports is not None and ports.balancer != self.state.ports.balancer:
                    raise ClusterError(f"the cluster already runs on port {self.state.ports.balancer}; stop it first")
                if redis is not None and redis != self.state.redis_topology:
                    running = self.state.redis_topology
                    raise ClusterError(f"the cluster already runs with Redis {running}; stop it first")
            else:
                self.state = State(
                    ports=ports or self.state.ports,
                    bind_host=bind_host or self.state.bind_host,
                    settings=settings_of(self.caller_environ),
                    redis_topology=topology,
                )
            self._ensure_redis()
            self._scale(replicas)
        return self.status()

    def scale(self, replicas: int) -> None:
        """Change the replica count of a running cluster without failing a request."""
        if replicas < 1:
            raise ClusterError("--replicas must be at least 1")
        with self.state_file.locked():
            self.state = self.state_file.load()
            self._require_running()
            self._scale(replicas)

    def restart(self) -> None:
        """Rolling restart: every replica, one at a time, never leaving nginx without a live one."""
        with self.state_file.locked():
            self.state = self.state_file.load()
            self._require_running()
            kept = {k: v for k, v in self.state.settings.items() if not k.startswith(REPLICA_PREFIXES)}
            self.state.settings = kept | settings_of(self.caller_environ, REPLICA_PREFIXES)
            self._save()
            count = len(self.state.replicas())
            spare = count == 1
            if spare:  # one replica: bring a second up first, so someone always answers
                self._scale(2)
                self._wait_routed("replica-2")
            for number in range(1, count + 1):
                self._stop(self.state.components[f"replica-{number}"], signal.SIGTERM, 60)
                started = self._start_replica(number)
                self._check_started(started, functools.partial(self._replica_ready, started), 60)
                self._wait_routed(started.name)
            if spare:
                self._scale(1)

    def stop(self) -> None:
        """Stop nginx first (no new requests), then the replicas, then Redis; forget the state."""
        with self.state_file.locked():
            self.state = self.state_file.load()
            # Sentinels before the servers: no failover while Redis stops.
            order = {"nginx": 0, "replica": 1, "sentinel": 2, "redis": 3}
            signals = {
                "nginx": signal.SIGQUIT,
                "replica": signal.SIGTERM,
                "sentinel": signal.SIGTERM,
                "redis": signal.SIGTERM,
            }
            for component in sorted(self.state.components.values(), key=lambda c: order[c.kind]):
                self._stop(component, signals[component.kind], 60)
            self.state_file.remove()
            (self.run_dir / "nginx" / "nginx.pid").unlink(missing_ok=True)
            # The L1 micro-cache's answers: the next `up` may serve other models.
            shutil.rmtree(self.run_dir / "nginx" / "tmp" / "l1", ignore_errors=True)
            shutil.rmtree(self.run_dir / "metrics", ignore_errors=True)

    def status(self) -> Status:
        """Each component with its pid, port, whether it runs and whether it is healthy."""
        self.state = self.state_file.load()
        ports = self.state.ports
        rows = []
        for component in sorted(self.state.components.values(), key=lambda c: (c.kind, c.name)):
            running = component.running
            if component.kind in ("redis", "sentinel"):
                password = self.redis_password if component.kind == "redis" else ""
                healthy = running and redis_ping(component.port, password)
                health = f"{component.kind}://127.0.0.1:{component.port}"
            elif component.kind == "replica":
                healthy = running and self._replica_ready(component)
                health = f"http://127.0.0.1:{component.port}/readyz"
            else:
                health = f"http://127.0.0.1:{ports.status}/nginx_status"
                healthy = running and http_status(health) == 200
            rows.append(
                ComponentStatus(
                    component.name,
                    component.kind,
                    component.port,
                    component.pid,
                    component.log,
                    running,
                    healthy,
                    health,
                )
            )
        return Status(
            run_dir=str(self.run_dir),
            logs=str(self.logs),
            balancer=f"http://127.0.0.1:{ports.balancer}" if rows else None,
            internal=f"http://127.0.0.1:{ports.internal}" if rows else None,
            replicas=len(self.state.replicas()),
            components=rows,
            redis_topology=self.state.redis_topology,
            redis_url=redis_topology.url(self.state.redis_topology, ports.redis, "***" if self.redis_password else "")
            if rows
            else "",
        )

    def replica_environments(self) -> dict[str, dict[str, str]]:
        """The environment each running replica was started with, read from the process."""
        return {c.name: environ_of(c.pid) for c in self.state_file.load().replicas() if c.running}

    @property
    def environ(self) -> dict[str, str]:
        """The environment components start with: the caller's, with the cluster's recorded
        settings in place of the caller's own."""
        recorded = self.state.settings
        if not recorded:
            return self.caller_environ
        others = {k: v for k, v in self.caller_environ.items() if k not in settings_of(self.caller_environ)}
        return others | recorded

    @property
    def redis_password(self) -> str:
        """Redis's requirepass (empty: none)."""
        return ClusterSettings.from_env(self.environ).redis_password

    @property
    def url(self) -> str:
        """The balancer's public listener."""
        return f"http://127.0.0.1:{self.state_file.load().ports.balancer}"

    @property
    def internal_url(self) -> str:
        """The balancer's internal listener (load generators, /metrics)."""
        return f"http://127.0.0.1:{self.state_file.load().ports.internal}"

    def log_tails(self, chars: int = 3000) -> str:
        """The end of every log under <run dir>/logs, for a failure report."""
        parts = []
        for log in sorted(self.logs.glob("*.log")):
            parts.append(f"----- {log.name} -----\n{log.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    @property
    def nginx_conf(self) -> Path:
        """The rendered nginx.conf the balancer runs."""
        return self.run_dir / "nginx" / "nginx.conf"

    def _require_running_now(self) -> None:
        """ClusterError unless the cluster runs (for commands that talk to it)."""
        self.state = self.state_file.load()
        self._require_running()

    def models(self) -> dict[str, Any] | None:
        """The model repository's status (desired generation, each worker's), or None."""
        request = urllib.request.Request(f"{self.internal_url}/v2/repository/status", headers=self.operator_headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return dict(json.loads(response.read()))
        except (OSError, ValueError):
            return None

    @property
    def models_dir(self) -> Path:
        """The folder the replicas load models from: SERVICE_MODELS_DIR as the cluster
        started with it, else ./models."""
        return Path(self.environ.get("SERVICE_MODELS_DIR", str(ROOT / "models")))

    def running(self) -> bool:
        """Whether the cluster runs now (its balancer does)."""
        try:
            self._require_running_now()
        except ClusterError:
            return False
        return True

    @property
    def operator_token(self) -> str:
        """The operator's credential, which the replicas require on the model repository
        routes: SERVICE_OPERATOR_TOKEN when given, else one made for this cluster and kept
        in its run directory (0600), so that `scripts/cluster model ...` can send it."""
        given = self.environ.get("SERVICE_OPERATOR_TOKEN")
        if given:
            return given
        path = self.run_dir / "operator-token"
        if not path.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_private(path, secrets.token_urlsafe(32) + "\n")
        return path.read_text().strip()

    @property
    def operator_headers(self) -> dict[str, str]:
        """What an operator's request to the model repository carries."""
        return {"Authorization": f"Bearer {self.operator_token}"}

    # --- internals ------------------------------------------------------------------------
    def _require_running(self) -> None:
        nginx = self.state.components.get("nginx")
        if not (nginx and nginx.running):
            raise ClusterError("the cluster is not running; start it with `scripts/cluster up`")

    def _save(self) -> None:
        self.state_file.save(self.state)

    def _spawn(self, component: Component, argv: list[str], env: Mapping[str, str] | None = None) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{component.name}.log"
        try:
            # A replica killed a moment ago may leave a worker holding the port for ~1 s.
            wait_until(lambda: port_free(component.port), 5, f"port {component.port}")
        except ClusterError:
            raise ClusterError(
                f"{component.name}: port {component.port} is in use by another program; "
                "choose other ports (see `scripts/cluster up --help`, or --ports auto)"
            ) from None
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**self.environ, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survives this command; stopped by pid in `stop`
            )
        component.pid = process.pid
        component.start_time = str(wait_until(lambda: start_time(process.pid), 5, f"{component.name} to start"))
        component.log = str(log_path)
        self.state.components[component.name] = component
        self._save()

    def _check_started(self, component: Component, healthy: Callable[[], bool], timeout_s: float) -> None:
        def ready() -> bool:
            if not component.running:
                tail = Path(component.log).read_text(errors="replace")[-3000:]
                raise ClusterError(f"{component.name} exited during start-up; its log ends:\n{tail}")
            return healthy()

        wait_until(ready, timeout_s, f"{component.name} on port {component.port} to be ready")

    def _ensure_redis(self) -> None:
        """Start the topology's servers that are not running; a fresh Redis Cluster is
        created with redis-cli; wait until the topology serves."""
        topology = self.state.redis_topology
        data_dir = self.run_dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        maxmemory = ClusterSettings.from_env(self.environ).redis_maxmemory
        servers = redis_topology.servers(topology, self.state.ports.redis, data_dir, maxmemory, self.redis_password)
        running = {s.name for s in servers if (c := self.state.components.get(s.name)) is not None and c.running}
        if len(running) == len(servers):
            return
        fresh = not running
        if fresh:  # state files of an earlier cluster would make these nodes join it
            for stale in [*data_dir.glob("nodes-*.conf"), *data_dir.glob("sentinel-*.conf")]:
                stale.unlink()
        binary = find_binary("redis-server", "CLUSTER_REDIS_BIN", self.environ)
        started = []
        for server in servers:
            if server.name in running:
                continue
            # Sentinels rewrite their config (written when fresh); a server's holds its password.
            if server.config and (server.kind == "redis" or not Path(server.args[0]).exists()):
                write_private(Path(server.args[0]), server.config)
            component = Component(server.name, server.kind, server.port)
            self._spawn(component, [binary, *server.args])
            password = self.redis_password if server.kind == "redis" else ""
            self._check_started(component, functools.partial(redis_ping, server.port, password), 15)
            started.append(component)
        if topology == "cluster" and fresh:
            cli = Path(binary).with_name("redis-cli")
            argv = redis_topology.create_cluster_argv(str(cli) if cli.exists() else "redis-cli", self.state.ports.redis)
            auth = {"REDISCLI_AUTH": self.redis_password} if self.redis_password else {}
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=60, check=False, env={**os.environ, **auth}
            )
            if done.returncode != 0:
                raise ClusterError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
        wait_until(
            lambda: redis_topology.ready(topology, self.state.ports.redis, self.redis_password),
            60,
            f"the Redis {topology} to serve",
        )

    def _redis_url(self) -> str:
        return redis_topology.url(self.state.redis_topology, self.state.ports.redis, self.redis_password)

    def _start_replica(self, number: int) -> Component:
        name = f"replica-{number}"
        component = Component(name, "replica", self.state.ports.replica_base + number - 1)
        env = {
            "SERVICE_BIND": f"127.0.0.1:{component.port}",
            "SERVICE_REPLICA_ID": name,
            "REDIS_URL": self._redis_url(),
            "SERVICE_METRICS_DIR": str(self.run_dir / "metrics" / name),
            "SERVICE_MODELS_DIR": str(self.models_dir),
            "SERVICE_OPERATOR_TOKEN": self.operator_token,
        }
        gunicorn = str(ROOT / ".venv" / "bin" / "gunicorn")
        self._spawn(component, [gunicorn, "-c", "service/gunicorn.conf.py", "service.wsgi:app"], env)
        return component

    def _replica_ready(self, component: Component | ComponentStatus) -> bool:
        return http_status(f"http://127.0.0.1:{component.port}/readyz") == 200

    def _ensure_replicas(self, count: int) -> None:
        started = []
        for number in range(1, count + 1):
            current = self.state.components.get(f"replica-{number}")
            if not (current and current.running):
                started.append(self._start_replica(number))
        for component in started:
            self._check_started(component, functools.partial(self._replica_ready, component), 60)

    def _balancer(self) -> LocalBalancer:
        if self._nginx_binary is None:
            self._nginx_binary = find_binary("nginx", "CLUSTER_NGINX_BIN", self.environ)
        return LocalBalancer(self.run_dir, self.environ, self._nginx_binary)

    def _ensure_nginx(self) -> None:
        balancer = self._balancer()
        changed = balancer.write_config(self.state)
        current = self.state.components.get("nginx")
        if current and current.running:
            if changed:
                message = "balancer configuration changed; reloading nginx (its idle client keep-alive "
                print(f"cluster: {message}connections are closed, clients reconnect)", file=sys.stderr)
                balancer.reload(current.pid)
            return
        component = Component("nginx", "nginx", self.state.ports.balancer)
        self._spawn(component, balancer.argv())
        url = f"http://127.0.0.1:{self.state.ports.balancer}/readyz"
        self._check_started(component, lambda: http_status(url) == 200, 15)

    def _scale(self, replicas: int) -> None:
        """Start replicas 1..N, make sure nginx lists enough slots, drain and stop the rest.

        nginx's upstream lists CLUSTER_UPSTREAM_SLOTS replica ports whether or not a replica
        runs there: a refused connection is retried on the next replica at once and the
        slot is skipped for fail_timeout. So scaling needs no nginx reload, and a reload
        is what would fail requests: it closes clients' idle keep-alive connections.
        """
        slots = ClusterSettings.from_env(self.environ).upstream_slots
        self.state.slots = max(self.state.slots, replicas, slots)
        self._save()
        self._ensure_replicas(replicas)
        self._ensure_nginx()
        for component in [c for c in self.state.replicas() if c.number > replicas]:
            # SIGTERM: the replica finishes in-flight requests and closes idle connections;
            # nginx retries anything that races the close on another replica.
            self._stop(component, signal.SIGTERM, 60)
            shutil.rmtree(self.run_dir / "metrics" / component.name, ignore_errors=True)

    def _wait_routed(self, name: str, timeout_s: float = 30) -> None:
        """Until nginx sends requests to `name` again (it retries a failed slot after fail_timeout)."""
        url = f"http://127.0.0.1:{self.state.ports.balancer}/v2/health/ready"

        def routed() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return response.headers.get("X-Served-By") == name
            except OSError:
                return False

        wait_until(routed, timeout_s, f"nginx to route to {name} again")

    def _stop(self, component: Component, signum: int, timeout_s: float) -> None:
        if component.running:
            os.kill(component.pid, signum)
            try:
                wait_until(lambda: not component.running, timeout_s, f"{component.name} to stop")
            except ClusterError:
                kill_tree(component.pid, signal.SIGKILL)
                wait_until(lambda: not component.running, 10, f"{component.name} to die")
        wait_until(lambda: port_free(component.port), 15, f"port {component.port} to be free")
        self.state.components.pop(component.name, None)
        self._save()
