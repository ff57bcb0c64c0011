"""What every part of the report shares: the results read back with lookups over them, and
how a number, a ratio and a disturbed point are written."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, cast

from loadtest import results as results_file
from loadtest.results import Point, disturbed

Block = tuple[Any, ...]


def _fmt(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "–"


def _mark(point: Mapping[str, Any] | None) -> str:
    return " ⚠" if disturbed(point) else ""


class Results:
    """Lookups over the points of one sweep."""

    def __init__(self, raw: results_file.Results) -> None:
        self.raw = raw
        self.env = raw["environment"]
        self.plan = self.env["plan"]
        self.points = raw["points"]
        self.cluster = [p for p in self.points if p["kind"] == "cluster"]
        self.baseline = [p for p in self.points if p["kind"] == "baseline"]
        self.max_replicas = max(self.plan["replicas"])
        self.headline_c = min(self.plan["concurrency"], key=lambda c: abs(c - 32))

    def get(self, kind: str, **where: Any) -> Point:
        """Like find, for a point known to exist."""
        point = self.find(kind, **where)
        assert point is not None, (kind, where)
        return point

    def find(self, kind: str, **where: Any) -> Point | None:
        """The one point of `kind` matching every field in `where`."""
        for point in self.points:
            if point["kind"] == kind and all(cast(Mapping[str, Any], point).get(k) == v for k, v in where.items()):
                return point
        return None


def _answer_shares(point: Point) -> dict[str, float]:
    """% of a point's answers from nginx's L1, from the replicas' Redis cache (HIT), and
    computed by a replica (MISS, OFF, BYPASS), as the client counted them."""
    cache = point.get("cache") or {}
    total = sum(cache.values()) or 1
    l1, hit = cache.get("L1", 0), cache.get("HIT", 0)
    return {"L1": 100 * l1 / total, "Redis": 100 * hit / total, "computed": 100 * (total - l1 - hit) / total}


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _log_ms(value: float | None) -> str:
    """A median of nginx's log, which has millisecond resolution: 0 means under 1 ms."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return "under 1 ms" if value < 1 else f"{_fmt(value, 0)} ms"


def _l1_share(point: Point) -> str:
    """Share of the point's requests nginx's L1 micro-cache answered (from the access log)."""
    l1 = point["access_log"].get("l1")
    if not l1:
        return "–"
    total = sum(l1.values())
    return f"{l1.get('HIT', 0) / total:.0%}" if total else "–"


def _others(point: Point) -> str:
    found = point.get("disturbance")
    if not found:
        return "–"
    steal = f", steal {found['steal_cores']:.2f}" if found["steal_cores"] >= 0.01 else ""
    return f"{found['other_cores']:.2f}{steal}{_mark(point)}"


def _app_cpu_ms(point: Point) -> float:
    """CPU ms per request spent in the app processes (replicas, or the baseline's gunicorn)."""
    per_request = point.get("cpu_ms_per_request") or {}
    values = [v for k, v in per_request.items() if (k.startswith("replica") or k == "baseline app") and v is not None]
    return sum(values) if values else math.nan


def _replica_mib(point: Point) -> float:
    """Mean resident memory of one replica (all its processes)."""
    rss = point.get("rss_mb") or {}
    values = [v for k, v in rss.items() if k.startswith("replica") or k == "baseline app"]
    return sum(values) / len(values) if values else math.nan
