"""Reading the container files as Docker would: Dockerfile ENV/CMD, compose variables."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import requests

from tests.support import ROOT

COMPOSE = ROOT / "docker-compose.scale.yml"
DOCKERFILES = [ROOT / "service" / "Dockerfile", ROOT / "balancer" / "Dockerfile", ROOT / "loadtest" / "Dockerfile"]


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) of the last build stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            instructions = []
        instructions.append((word.upper(), rest.strip()))
    return instructions


def image_env(dockerfile: Path) -> dict[str, str]:
    """The ENV a container of the final stage starts with (PATH left out)."""
    env: dict[str, str] = {}
    for word, rest in final_stage(dockerfile):
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    env.pop("PATH", None)
    return env


def image_cmd(dockerfile: Path) -> list[str]:
    """The final stage's CMD (exec form)."""
    cmd = [rest for word, rest in final_stage(dockerfile) if word == "CMD"]
    return json.loads(cmd[-1])


def compose_variables() -> set[str]:
    """Every ${VAR...} the compose file reads from the environment ($$ is a literal $)."""
    text = COMPOSE.read_text().replace("$$", "")
    return set(re.findall(r"\$\{([A-Z0-9_]+)", text))


# --- the compose stack on a real engine ------------------------------------------------------


class ComposeEngine:
    """Docker Compose v2 and an engine CLI (docker, or podman) talking to a running engine.

    Settings, from the environment:
      COMPOSE_E2E        auto (default: run if an engine answers, else skip) | required | skip
      COMPOSE_E2E_FILES  extra compose files, `:`-separated (an engine's override file)
      COMPOSE_E2E_HEALTHCHECK_DRIVER  a command to run beside the stack, for engines that
                         schedule no healthchecks themselves (podman without systemd)
    """

    def __init__(self, compose: list[str], cli: str) -> None:
        self.compose = compose
        self.cli = cli

    @classmethod
    def find(cls) -> tuple[ComposeEngine | None, str]:
        """The engine, or None and why not."""
        compose = None
        for argv in (["docker", "compose"], ["docker-compose"]):
            if shutil.which(argv[0]):
                found = subprocess.run([*argv, "version", "--short"], capture_output=True, text=True, timeout=30)
                if found.returncode == 0 and not found.stdout.strip().lstrip("v").startswith("1."):
                    compose = argv
                    break
        if compose is None:
            return None, "no Docker Compose v2 (`docker compose` or `docker-compose` >= 2)"
        cli = shutil.which("docker") or shutil.which("podman")
        if cli is None:
            return None, "no engine CLI (docker or podman)"
        answered = subprocess.run([*compose, "ls"], capture_output=True, text=True, timeout=30)
        if answered.returncode != 0:
            return None, f"no engine answers ({' '.join(compose)} ls: {answered.stderr.strip()[:200]})"
        return cls(compose, cli), ""


class ComposeStack:
    """The project's docker-compose.scale.yml as one compose project on an engine."""

    def __init__(self, engine: ComposeEngine, project: str, env: dict[str, str], log_dir: Path) -> None:
        self.engine = engine
        self.project = project
        self.env = env
        self.log_dir = log_dir
        self.url = ""  # the balancer's published listener, once the stack is up
        extra = [f for f in os.environ.get("COMPOSE_E2E_FILES", "").split(":") if f]
        self.files = [str(COMPOSE), *extra]

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`docker compose -p <project> -f <files> <args>`, output kept in the log folder."""
        argv = [*self.engine.compose, "-p", self.project]
        for file in self.files:
            argv += ["-f", file]
        result = subprocess.run([*argv, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        with (self.log_dir / "compose-commands.log").open("a") as log:
            log.write(f"$ {' '.join(args)}  (exit {result.returncode})\n{result.stdout}{result.stderr}\n")
        if check and result.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The engine's own CLI (docker or podman), for what compose does per service only."""
        result = subprocess.run([self.engine.cli, *args], env=self.env, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"{self.engine.cli} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def containers(self, service: str | None = None, all_states: bool = False) -> list[dict]:
        """`compose ps` rows of one service or all (running ones unless all_states)."""
        args = ["ps", "--format", "json", *(["--all"] if all_states else []), *([service] if service else [])]
        out = self.compose(*args).stdout.strip()
        if not out:
            return []
        # Compose prints one JSON object per line (a JSON array in some older versions).
        rows = json.loads(out) if out.startswith("[") else [json.loads(line) for line in out.splitlines()]
        return sorted(rows, key=lambda row: row["Name"])

    def replica_ids(self) -> dict[str, str]:
        """X-Served-By value (the container's host name: its short id) -> container name."""
        return {row["ID"][:12]: row["Name"] for row in self.containers("api")}

    def addresses(self, container: str) -> set[str]:
        """The container's addresses on every network it is on."""
        template = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
        return set(self.cli("inspect", "-f", template, container).stdout.split())

    def routing(self) -> dict:
        """What the balancer can route to, for a failure message: each replica's addresses,
        what the balancer's resolver answers for `api`, and its error log's last lines."""
        names = {cid: sorted(self.addresses(name)) for cid, name in self.replica_ids().items()}
        dns = self.compose("exec", "-T", "balancer", "getent", "ahostsv4", "api", check=False)
        log = self.compose("logs", "--no-color", "--tail", "40", "balancer", check=False).stdout
        replicas = self.compose("logs", "--no-color", "--tail", "15", "api", check=False).stdout
        return {
            "replicas": names,
            "dns": dns.stdout + dns.stderr,
            "balancer_log": log[-5000:],
            "replica_logs": replicas[-8000:],
        }

    def wait_routed(self, timeout: float = 90) -> float:
        """Wait until the balancer routes to exactly the running replicas and to no
        address that is gone: every replica answers, and a round of 4 requests per replica
        takes no try on a stale address (each under the 0.5 s connect timeout). After a
        scale or a recreate, nginx's resolver and its failed-peer marks take a while to
        follow (RESOLVER_VALID_S, FAIL_TIMEOUT_S; longer under the podman lab's DNS). What
        follows measures the stack as a user finds it settled. Returns the seconds waited."""
        started = time.monotonic()
        while True:
            replicas = set(self.replica_ids())
            served, slow = set(), 0
            for _ in range(4 * len(replicas)):
                # Metadata: answered by a replica (X-Served-By), no cache, no Redis.
                try:
                    answer = requests.get(f"{self.url}/v2/models/iris", timeout=20)
                except requests.RequestException:
                    slow += 1
                    continue
                served.add(answer.headers.get("X-Served-By"))
                slow += answer.status_code != 200 or answer.elapsed.total_seconds() > 0.4
            if served == replicas and not slow:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(
                    f"the balancer did not settle in {timeout} s: served by {served}, replicas {replicas}, "
                    f"{slow} slow or failed: {self.routing()}"
                )
            time.sleep(0.5)

    def health(self, container: str) -> str:
        """healthy | unhealthy | starting | '' (no healthcheck)."""
        template = "{{if .State.Health}}{{.State.Health.Status}}{{end}}"
        return self.cli("inspect", "-f", template, container).stdout.strip()
