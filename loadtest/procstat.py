"""CPU time of process trees from /proc (Linux), for per-component CPU use in the report."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def machine_cpu_seconds() -> dict[str, float]:
    """CPU seconds the whole machine has spent so far, from /proc/stat's `cpu` line:
    `busy` (user, nice, system: what per-process times count too; irq and softirq are
    left out, as the processes' own times leave them out) and `steal` (time a hypervisor
    gave to other guests)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    assert fields[0] == "cpu", fields
    user, nice, system = (int(v) for v in fields[1:4])
    steal = int(fields[8]) if len(fields) > 8 else 0
    return {"busy": (user + nice + system) / CLOCK_TICKS, "steal": steal / CLOCK_TICKS}


def disturbance(
    machine_before: dict[str, float],
    machine_after: dict[str, float],
    known_cpu_s: float,
    wall_s: float,
    threshold_cores: float,
) -> dict[str, Any]:
    """What processes the benchmark does not know used during one measurement, in cores:
    the machine's busy time less the known processes' CPU time, and steal time. Either
    above `threshold_cores` marks the measurement disturbed: its numbers describe a
    machine shared with someone else."""
    wall_s = max(wall_s, 1e-9)
    other = max(0.0, (machine_after["busy"] - machine_before["busy"] - known_cpu_s) / wall_s)
    steal = max(0.0, (machine_after["steal"] - machine_before["steal"]) / wall_s)
    return {
        "other_cores": round(other, 3),
        "steal_cores": round(steal, 3),
        "threshold_cores": threshold_cores,
        "disturbed": other > threshold_cores or steal > threshold_cores,
    }


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children (the load generators)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextlib.contextmanager
def watching(components: dict[str, int], threshold_cores: float) -> Iterator[dict[str, Any]]:
    """Fills the yielded dict with the block's disturbance (see `disturbance`): CPU the
    machine spent beyond this process, its children and the `components` trees."""
    found: dict[str, Any] = {}
    own, machine, known, wall = own_cpu_seconds(), machine_cpu_seconds(), snapshot(components), time.monotonic()
    yield found
    known_after = snapshot(components)
    known_cpu_s = own_cpu_seconds() - own + sum(known_after.get(n, 0.0) - known[n] for n in known)
    found.update(disturbance(machine, machine_cpu_seconds(), known_cpu_s, time.monotonic() - wall, threshold_cores))


def busy_cores(seconds: float, components: dict[str, int] | None = None) -> float:
    """Cores the rest of the machine (not this process, its children or `components`)
    keeps busy, sampled over `seconds`."""
    with watching(components or {}, 0.0) as found:
        time.sleep(seconds)
    return float(found["other_cores"])
