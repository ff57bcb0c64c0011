"""The report of a running deployment (`scripts/bench --url`, loadtest/remote.py): its
points in the same blocks as the local sweep's report, written by the same writers."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from loadtest import results as results_file
from loadtest.report.capacity import DEFAULT_TARGET_P99_MS, DEFAULT_TARGET_RPS, remote_section
from loadtest.report.common import _fmt
from loadtest.report.document import to_html, to_markdown
from loadtest.report.plots import _figure
from loadtest.results import RemotePoint, RemoteResults, failed_requests, mostly_refused, refusal_advice


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _grouped(points: list[RemotePoint], *keys: str) -> dict[tuple, list[RemotePoint]]:
    groups: dict[tuple, list[RemotePoint]] = {}
    for point in points:
        groups.setdefault(tuple(cast(Mapping[str, Any], point)[k] for k in keys), []).append(point)
    return groups


def _shares(counts: dict[str, int]) -> str:
    """`name share %, ...`; a share under 1 % shows as such, not as 0 %."""
    total = sum(counts.values()) or 1
    shares = ((name, 100 * n / total) for name, n in sorted(counts.items()))
    return ", ".join(f"{name} {share:.0f} %" if share >= 1 else f"{name} <1 %" for name, share in shares)


def _order(item: tuple[tuple, Any]) -> tuple:
    """Sort groups by their key, numbers as numbers, `as found` (None) first."""
    return tuple((-1 if value is None else value) for value in item[0])


def _rps_against(
    points: list[RemotePoint], concurrency: int, by: tuple[str, ...], x: str, label: Callable[[tuple], str], scale=1.0
) -> list[tuple[str, list, list, str, list]]:
    """Median req/s at `concurrency` against `x` (times `scale`), one series per `by` group."""
    series = []
    for key, group in sorted(_grouped(points, *by).items(), key=_order):
        at = _grouped([p for p in group if p["concurrency"] == concurrency], x)
        xs = sorted(v for (v,) in at)
        ys = [_median([p["rps"] for p in at[(v,)]]) for v in xs]
        series.append((label(key), [scale * v for v in xs], ys, "-", [None] * len(xs)))
    return series


def blocks(results: RemoteResults, folder: Path) -> list[tuple[Any, ...]]:
    """The report of a remote run, in report.py's blocks (so the same writers render it)."""
    plan, points = results["plan"], results["points"]
    plots = folder / "plots"
    plots.mkdir(exist_ok=True)
    out: list[tuple[Any, ...]] = [
        ("h1", "Throughput report: a running deployment"),
        (
            "p",
            f"Measured from outside, at {plan['url']} (wrk, one thread, {plan['seconds']:g} s a point, "
            f"{plan['rounds']} round(s); medians over rounds). The benchmark did not start, stop or reconfigure the "
            + (
                "deployment."
                if not plan["scale_command"]
                else f"deployment except by the scale command you gave: {plan['scale_command']}."
            ),
        ),
    ]
    advice = refusal_advice(list(points))
    if advice:
        out.append(("p", advice))
    rows = []
    for (replicas, model, hit, conc), group in sorted(
        _grouped(points, "replicas", "model", "hit_ratio", "concurrency").items(), key=_order
    ):
        cache: dict[str, int] = {}
        for point in group:  # answers of every round together
            for state, n in point["cache"].items():
                cache[state] = cache.get(state, 0) + n
        refused = sum(int(p.get("refused") or 0) for p in group)
        rows.append(
            [
                str(replicas or "as found") + (" ✗" if any(mostly_refused(p) for p in group) else ""),
                model,
                f"{hit:.0%}",
                str(conc),
                _fmt(_median([p["rps"] for p in group])),
                _fmt(_median([p["p50_ms"] for p in group]), 2),
                _fmt(_median([p["p99_ms"] for p in group]), 2),
                _shares(cache),
                str(refused),
                str(sum(failed_requests(p) for p in group) - refused),
            ]
        )
    out += [
        ("h2", "Every point"),
        (
            "p",
            "Answers: L1 = the balancer's micro-cache answered (no replica took part); HIT/MISS = the replicas' "
            "Redis result cache; OFF = not cached by the model's policy; BYPASS = Redis unavailable. req/s: 2xx "
            "answers only; refused: 429/503 (rate limited, shed past capacity, closing); ✗: most requests got no "
            "2xx answer.",
        ),
        (
            "table",
            ["replicas", "model", "hits", "c", "req/s", "p50 ms", "p99 ms", "answers", "refused", "errors"],
            rows,
        ),
    ]
    series, latency = [], []
    for (replicas, model, hit), group in sorted(_grouped(points, "replicas", "model", "hit_ratio").items(), key=_order):
        by_c = _grouped(group, "concurrency")
        xs = sorted(c for (c,) in by_c)
        label = f"{model}, hits {hit:.0%}" + (f", {replicas} replicas" if replicas else "")
        series.append((label, xs, [_median([p["rps"] for p in by_c[(c,)]]) for c in xs], "-", [None] * len(xs)))
        for field, style in (("p50_ms", "-"), ("p99_ms", "--")):
            ys = [_median([p[field] for p in by_c[(c,)]]) for c in xs]  # type: ignore[literal-required]
            latency.append((f"{label}, {field[:3]}", xs, ys, style, [None] * len(xs)))
    out += _figure(
        plots,
        "throughput.png",
        "Throughput against concurrency",
        "connections",
        "req/s",
        "Medians over rounds.",
        series,
        logx=True,
    )
    out += _figure(
        plots,
        "latency.png",
        "Latency against concurrency",
        "connections",
        "ms",
        "p50 (solid) and p99 (dashed), client side, every answer (refusals too: see ✗ in the table); medians "
        "over rounds.",
        latency,
        logx=True,
    )
    top = max(plan["concurrency"])
    out += _figure(
        plots,
        "cache.png",
        f"Throughput against cache hits (c={top})",
        "hits %",
        "req/s",
        "What the caches buy: a hit is answered by the balancer's L1 or a replica's Redis result cache.",
        _rps_against(
            points,
            top,
            ("replicas", "model"),
            "hit_ratio",
            lambda k: k[1] + (f", {k[0]} replicas" if k[0] else ""),
            100,
        ),
    )
    if plan["replicas"]:
        scale_series = _rps_against(
            points, top, ("model", "hit_ratio"), "replicas", lambda k: f"{k[0]}, hits {k[1]:.0%}"
        )
        out += _figure(
            plots,
            "replicas.png",
            f"Throughput against replicas (c={top})",
            "replicas",
            "req/s",
            "Each replica count set by the scale command, measured once every replica answered.",
            scale_series,
        )
    spread_rows = []
    for point in points:
        metrics = point["replica_metrics"] or {}
        spread_rows.append(
            [
                str(point["replicas"] or "as found"),
                point["model"],
                f"{point['hit_ratio']:.0%}",
                str(point["concurrency"]),
                _shares(point["served_by"]),
                "; ".join(f"{r} {m['cpu_cores']:.2f} cores" for r, m in metrics.items()) or "not read",
            ]
        )
    out += [
        ("h2", "The spread over replicas"),
        (
            "p",
            "Share of answers by who gave them (X-Served-By; the L1's answers count as nginx). CPU per replica is "
            "read from each replica's prediction_worker_cpu_seconds_total on the internal listener"
            + (" (--internal-url)." if plan["internal_url"] else ": not given, so not read."),
        ),
        ("table", ["replicas", "model", "hits", "c", "answers by", "replica CPU"], spread_rows),
    ]
    target = results.get("capacity_target") or {"rps": DEFAULT_TARGET_RPS, "p99_ms": DEFAULT_TARGET_P99_MS}
    out += remote_section(points, target["rps"], target["p99_ms"])
    cannot = [
        "No baseline: the tutorials' single-replica set-up is measured only by the local sweep (make bench).",
        "No CPU of nginx, Redis or the load generator: their processes are not on this host, or not ours to read.",
        "No access log: nginx's own times per request (total, upstream) and retries are not visible from outside.",
        "No disturbance marks: other load on the deployment's machines cannot be seen from here.",
    ]
    if not plan["internal_url"]:
        cannot.append("No per-replica CPU or request counts: no --internal-url was given.")
    if not plan["replicas"]:
        cannot.append("No scaling curve: the replica count was left as found (give --scale-command and --replicas).")
    out += [("h2", "What this report could not see"), *[("p", f"- {line}") for line in cannot]]
    out += [
        ("h2", "How it ran"),
        ("pre", "\n".join(p["command"] for p in points)),
        ("p", "Raw data: results.json and raw/ beside this report."),
    ]
    return out


def build(folder: Path) -> dict[str, Path]:
    """report.md and report.html from folder/results.json."""
    content = blocks(results_file.read_remote(folder), folder)
    md, page = folder / "report.md", folder / "report.html"
    md.write_text(to_markdown(content, folder))
    page.write_text(to_html(content))
    return {"md": md, "html": page}
