"""What `start` started, kept in <run dir>/cluster.json between commands: written atomically,
one command at a time per run directory."""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from localcluster.ports import Ports
from localcluster.processes import alive


@dataclass
class Component:
    """One process the cluster started."""

    name: str
    kind: str  # redis | sentinel | replica | nginx
    port: int
    pid: int = 0
    start_time: str = ""
    log: str = ""

    @property
    def running(self) -> bool:
        """The recorded process is still the one we started, and alive."""
        return alive(self.pid, self.start_time)

    @property
    def number(self) -> int:
        """A replica's number (replica-3 → 3)."""
        return int(self.name.rsplit("-", 1)[1])


@dataclass
class State:
    """Ports, the upstream slots nginx lists, and the components."""

    ports: Ports = field(default_factory=Ports)
    bind_host: str = "127.0.0.1"
    slots: int = 0  # replica ports listed in nginx's upstream, running or not
    redis_topology: str = "single"  # see localcluster.redis_topology
    # The SERVICE_*, REDIS_*, BALANCER_* and CLUSTER_* variables the cluster started with:
    # every later command starts replicas and renders nginx with these, whoever runs it.
    settings: dict[str, str] = field(default_factory=dict)
    components: dict[str, Component] = field(default_factory=dict)

    def replicas(self) -> list[Component]:
        """Replica components ordered by number."""
        return sorted((c for c in self.components.values() if c.kind == "replica"), key=lambda c: c.number)

    def any_running(self) -> bool:
        """Whether anything recorded still runs."""
        return any(c.running for c in self.components.values())


class StateFile:
    """<run dir>/cluster.json and the lock beside it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "cluster.json"

    def load(self) -> State:
        """The saved state, or a fresh one."""
        if not self.path.exists():
            return State()
        raw = json.loads(self.path.read_text())
        components = {name: Component(**c) for name, c in raw.pop("components", {}).items()}
        return State(ports=Ports(**raw.pop("ports")), components=components, **raw)

    def save(self, state: State) -> None:
        """Write atomically (a reader never sees half a file), readable by its owner only:
        the settings may hold the Redis password."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.touch(mode=0o600)
        tmp.write_text(json.dumps(asdict(state), indent=2))
        tmp.replace(self.path)

    def remove(self) -> None:
        """Forget the cluster (after `stop`)."""
        self.path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One cluster command at a time per run directory."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / "cluster.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


@dataclass(frozen=True)
class ComponentStatus:
    """One component as `status` sees it."""

    name: str
    kind: str
    port: int
    pid: int
    log: str
    running: bool
    healthy: bool
    health: str  # where health is checked


@dataclass(frozen=True)
class Status:
    """The whole cluster as `status` sees it."""

    run_dir: str
    logs: str
    balancer: str | None  # the public listener's URL
    internal: str | None  # the internal listener's URL (load generators, /metrics)
    replicas: int
    components: list[ComponentStatus]
    redis_topology: str = "single"
    redis_url: str = ""  # what the replicas use, without the password

    @property
    def healthy(self) -> bool:
        """Something runs and every component is healthy."""
        return bool(self.components) and all(c.healthy for c in self.components)

    def component(self, name: str) -> ComponentStatus:
        """One component by name (KeyError if absent)."""
        found = next((c for c in self.components if c.name == name), None)
        if found is None:
            raise KeyError(name)
        return found

    def to_dict(self) -> dict[str, Any]:
        """Plain data (`status --json`)."""
        return asdict(self)
