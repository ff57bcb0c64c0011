"""The report's section on the overload point (results.json `overload`, loadtest/overload.py):
one sentence for how the cluster behaves past capacity, and a table per multiple. Kept
apart from the benchmark that measures it: the loadtest image's report carries no cluster."""

from __future__ import annotations

import statistics

from loadtest.report.common import Block
from loadtest.results import Overload


def spread(values: list[float], digits: int = 1) -> str:
    """median [min-max]"""
    if not values:
        return "-"
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def table_rows(results: dict[str, list[dict]], times: list[float]) -> tuple[list[str], list[list[str]]]:
    """One row per setup and multiple: its header and rows."""
    header = [
        "setup", "offered", "goodput ÷ capacity", "2xx p50 ms", "2xx p99 ms", "refused", "refused p50 ms",
        "refused p99 ms", "other errors", "no answer",
    ]  # fmt: skip
    rows = []
    for setup, rounds in results.items():
        for multiple in times:
            points = [r["points"][str(multiple)] for r in rounds]
            share = [p["refused"] / max(1, p["requests"]) * 100 for p in points]
            errors = [sum(p["errors"].values()) for p in points]
            lost = [sum(p["no_answer"].values()) / max(1, p["requests"]) * 100 for p in points]
            rows.append(
                [
                    setup,
                    f"{multiple:g}×",
                    spread([p["goodput_x"] for p in points], 2),
                    spread([p["ok_p50_ms"] for p in points], 0),
                    spread([p["ok_p99_ms"] for p in points], 0),
                    f"{spread(share, 1)} %",
                    spread([p.get("refused_p50_ms", 0.0) for p in points], 0),
                    spread([p["refused_p99_ms"] for p in points], 0),
                    spread(errors, 0),
                    f"{spread(lost, 1)} %",
                ]
            )
    return header, rows


def sentence(rounds: list[dict], times: list[float], objective_ms: float) -> str:
    """How the cluster behaves past capacity, in one sentence (the largest multiple)."""
    top = max(times)
    points = [r["points"][str(top)] for r in rounds]
    lost = sum(sum(p["no_answer"].values()) for p in points)
    return (
        f"Offered {top:g}× its capacity open loop, the cluster answered "
        f"{statistics.median(p['goodput_x'] for p in points):.2f}× its capacity within the {objective_ms:.0f} ms "
        f"objective (2xx p99 {statistics.median(p['ok_p99_ms'] for p in points):.0f} ms) and refused the rest "
        f"with a JSON 429 and Retry-After (p99 {statistics.median(p['refused_p99_ms'] for p in points):.0f} ms); "
        f"{lost} of {sum(p['requests'] for p in points)} requests got no answer."
    )


def past_capacity(measured: Overload | None) -> list[Block]:
    """The overload point: one sentence, then goodput, the answers' and refusals' tails."""
    if not measured or not measured["rounds"]:
        return []
    times, rounds = measured["times"], measured["rounds"]
    capacities = [r["capacity_rps"] for r in rounds]
    return [
        ("h2", "Past capacity (open loop)"),
        ("p", sentence(rounds, times, measured["objective_ms"])),
        (
            "p",
            f"{measured['model']} ({measured['runtime']}, new rows), {measured['replicas']} replicas in the defaults, "
            f"{len(rounds)} round(s), median [min-max]. Capacity: 2xx/s of 32 closed-loop clients, "
            f"{spread(capacities)} req/s. Then every send time fixed in advance at each multiple of it, "
            "latency from the schedule, clients giving up after 5 s (loadtest/openloop.py). Goodput: 2xx within the "
            "latency objective. A closed-loop tool slows down with the cluster and would hide all this.",
        ),
        ("table", *table_rows({"admission": rounds}, times)),
    ]
