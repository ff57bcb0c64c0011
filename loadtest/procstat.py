"""CPU time of process trees from /proc (Linux), for per-component CPU use in the report."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def children_map() -> dict[int, list[int]]:
    """parent pid → child pids, for every process now."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields:
                tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def tree_cpu_seconds(pid: int, tree: dict[int, list[int]]) -> float:
    """User + system CPU seconds of a process and its live descendants."""
    total = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        fields = _stat_fields(current)
        if fields:
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        stack.extend(tree.get(current, []))
    return total


def snapshot(components: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each named process tree."""
    tree = children_map()
    return {name: tree_cpu_seconds(pid, tree) for name, pid in components.items()}


def tree_rss_mb(pid: int, tree: dict[int, list[int]]) -> float:
    """Resident memory (MiB) of a process and its live descendants."""
    total_kb = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            pass
        stack.extend(tree.get(current, []))
    return total_kb / 1024


def memory(components: dict[str, int]) -> dict[str, float]:
    """Resident MiB of each named process tree now."""
    tree = children_map()
    return {name: round(tree_rss_mb(pid, tree), 1) for name, pid in components.items()}
