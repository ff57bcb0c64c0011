"""Processes the cluster starts: told apart from reused pids, waited for, stopped by pid."""

from __future__ import annotations

import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ClusterError(RuntimeError):
    """Something the user must fix; the CLI prints it without a traceback."""


def start_time(pid: int) -> str | None:
    """The kernel's start time of a pid (tells a pid apart from a reused one), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields_after_name = stat.rsplit(")", 1)[1].split()
    if fields_after_name[0] == "Z":  # a zombie has exited
        return None
    return fields_after_name[19]


def alive(pid: int, started: str) -> bool:
    """The process `pid` is still the one that started at `started`."""
    return pid > 0 and start_time(pid) == started


def children(pid: int) -> list[tuple[int, str]]:
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


def environ_of(pid: int) -> dict[str, str]:
    """The environment a running process was started with (readable for our own processes)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key: value for key, value in pairs}


def wait_until(
    check: Callable[[], T],
    timeout_s: float,
    what: str,
    *,
    poll_s: float = 0.1,
    tolerate: tuple[type[Exception], ...] = (),
) -> T:
    """Poll `check` every `poll_s` until it returns something truthy; ClusterError after the
    deadline. Errors of the `tolerate` kinds count as "not yet" (the last one is reported)."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except tolerate as exc:
            last_error = exc
        if time.monotonic() > deadline:
            said = f" (last error: {last_error})" if last_error is not None else ""
            raise ClusterError(f"timed out after {timeout_s:.0f} s waiting for {what}{said}")
        time.sleep(poll_s)


def http_status(url: str, timeout_s: float = 1.0) -> int | None:
    """The status of a GET, or None when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def redis_ping(port: int, password: str) -> bool:
    """A Redis on loopback answers PING (after AUTH when it has a password)."""
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


def which(name: str) -> str | None:
    """Where a program is: PATH, then /usr/sbin and /usr/local/sbin (Debian's nginx lives in
    /usr/sbin, off an ordinary user's PATH). The one lookup rule of the runner, the
    benchmarks and the tests (scripts/test applies the same in shell)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def find_binary(name: str, override_env: str, environ: Mapping[str, Any]) -> str:
    """The program to run: `override_env` if set, else where `which` finds it."""
    explicit = environ.get(override_env)
    if explicit:
        return str(explicit)
    found = which(name)
    if not found:
        raise ClusterError(
            f"{name} is not installed: run `scripts/bootstrap` as root on Debian/Ubuntu, "
            f"install it with your package manager, or set {override_env}"
        )
    return found


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it may hold a password): 0600 from creation."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # a file that existed keeps its mode otherwise
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        stream.write(text)


def kill_tree(pid: int, signum: int) -> None:
    """Signal a process group we started (start_new_session), ignoring one already gone."""
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass
