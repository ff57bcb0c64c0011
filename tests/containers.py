"""Reading the container files as Docker would: Dockerfile ENV/CMD, compose variables."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

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
