"""The throughput report: report.md and a self-contained report.html with plots, built
from the raw results of a sweep (so it can be rebuilt at any time).

    python -m loadtest.report reports/<timestamp>
"""

from __future__ import annotations

import base64
import collections
import html
import json
import math
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Block = tuple[Any, ...]


def _fmt(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "–"


def verdict(target: dict[str, Any]) -> str:
    """ERRORS when a point it was judged from had failed requests (its numbers count them
    as served), UNSURE when one was disturbed, else MET or MISS."""
    if target.get("failed_requests"):
        return "ERRORS"
    return "UNSURE" if target.get("disturbed") else "MET" if target["met"] else "MISS"


def failed_requests(point: dict[str, Any]) -> int:
    """Requests of a point (wrk's or h2load's) that got no 2xx answer: statuses, socket
    errors, timeouts."""
    if "non_2xx" in point:  # wrk's, counted by the parser
        bad = int(point["non_2xx"])
    else:
        bad = sum(count for status, count in (point.get("statuses") or {}).items() if not str(status).startswith("2"))
    return bad + sum(int(point.get(field) or 0) for field in ("socket_errors", "errored", "timeout"))


def disturbed(point: dict[str, Any] | None) -> bool:
    """Whether processes the benchmark did not know (or steal time) used the CPU during it."""
    return bool(point and point.get("disturbance", {}).get("disturbed"))


def _mark(point: dict[str, Any] | None) -> str:
    return " ⚠" if disturbed(point) else ""


class Results:
    """Lookups over the points of one sweep."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.env = raw["environment"]
        self.plan = self.env["plan"]
        self.points = raw["points"]
        self.cluster = [p for p in self.points if p["kind"] == "cluster"]
        self.baseline = [p for p in self.points if p["kind"] == "baseline"]
        self.max_replicas = max(self.plan["replicas"])
        self.headline_c = min(self.plan["concurrency"], key=lambda c: abs(c - 32))

    def get(self, kind: str, **where: Any) -> dict[str, Any]:
        """Like find, for a point known to exist."""
        point = self.find(kind, **where)
        assert point is not None, (kind, where)
        return point

    def find(self, kind: str, **where: Any) -> dict[str, Any] | None:
        """The one point of `kind` matching every field in `where`."""
        for point in self.points:
            if point["kind"] == kind and all(point[k] == v for k, v in where.items()):
                return point
        return None


def _plot(
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    series: Iterable[tuple[str, list, list, str]],
    bar: bool = False,
    logx: bool = False,
    marked: Iterable[tuple[list, list]] = (),
) -> Path:
    """A line (or bar) plot; `marked` (xs, ys) are drawn over as disturbed points."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    series = list(series)
    if bar:
        labels, values = series[0][1], series[0][2]
        ax.bar([str(x) for x in labels], values, color="#4c72b0")
    else:
        for label, xs, ys, style in series:
            ax.plot(xs, ys, style, label=label, marker="o" if "--" not in style else None)
        marked = [(xs, ys) for xs, ys in marked if xs]
        for i, (xs, ys) in enumerate(marked):
            ax.plot(
                xs,
                ys,
                linestyle="none",
                marker="X",
                markersize=11,
                color="#d62728",
                label="disturbed (others used the CPU)" if i == 0 else None,
            )
        ax.legend(fontsize=8)
    if logx:
        ax.set_xscale("log", base=2)
    if not bar:
        ticks = sorted({x for _, xs, _, _ in series for x in xs})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _figure(
    folder: Path,
    name: str,
    title: str,
    xlabel: str,
    ylabel: str,
    caption: str,
    series: list[tuple[str, list, list, str, list]],
    logx: bool = False,
) -> list[Block]:
    """A plot of `series` (label, xs, ys, style, the points behind ys), or, when they have
    a single x value, the same numbers as a table: a plot of one x carries no shape."""
    xs_all = sorted({x for _, xs, _, _, _ in series for x in xs})
    if len(xs_all) <= 1:
        rows = [
            [label, f"{xs[0]:g}", _fmt(ys[0]) + _mark(points[0] if points else None)]
            for label, xs, ys, _, points in series
            if xs
        ]
        return [
            ("p", f"{title}: one {xlabel} value only, so a table. {caption}"),
            ("table", ["series", xlabel, ylabel], rows),
        ]
    marked = []
    for _, xs, ys, _, points in series:
        flagged = [(x, y) for x, y, pt in zip(xs, ys, points, strict=True) if disturbed(pt)]
        marked.append(([x for x, _ in flagged], [y for _, y in flagged]))
    path = _plot(
        folder / name,
        title,
        xlabel,
        ylabel,
        [(label, xs, ys, style) for label, xs, ys, style, _ in series],
        logx=logx,
        marked=marked,
    )
    if any(xs for xs, _ in marked):
        caption += " Red crosses: points measured while other processes used the CPU; do not trust them."
    return [("img", path, caption)]


def plots(results: Results, folder: Path) -> list[Block]:
    """Every plot of the report (or a table where a plot would have one x value)."""
    folder.mkdir(exist_ok=True)
    made: list[Block] = []
    c, rmax = results.headline_c, results.max_replicas
    series = []
    for model in results.plan["models"]:
        for hit in results.plan["hit_ratios"]:
            found = [
                results.find("cluster", model=model, hit_ratio=hit, concurrency=c, replicas=r)
                for r in results.plan["replicas"]
            ]
            points = [pt for pt in found if pt]
            series.append(
                (
                    f"{model}, {hit:.0%} hits",
                    [pt["replicas"] for pt in points],
                    [pt["rps"] for pt in points],
                    "-",
                    points,
                )
            )
        base = results.find("baseline", model=model, concurrency=c)
        if base:
            xs = list(results.plan["replicas"])
            series.append((f"{model}, tutorial baseline", xs, [base["rps"]] * len(xs), "--", [base] * len(xs)))
    made += _figure(
        folder,
        "throughput_vs_replicas.png",
        f"Throughput vs replicas (c={c})",
        "replicas",
        "requests/s",
        f"Requests/s against the number of replicas at {c} connections; dashed: the "
        "tutorials' set-up measured in the same run.",
        series,
    )

    for model in results.plan["models"]:
        hit = min(results.plan["hit_ratios"])
        series = []
        found = [
            results.find("cluster", model=model, hit_ratio=hit, concurrency=cc, replicas=rmax)
            for cc in results.plan["concurrency"]
        ]
        points = [pt for pt in found if pt]
        for q in ("p50_ms", "p90_ms", "p99_ms"):
            series.append(
                (f"cluster {q[:3]}", [pt["concurrency"] for pt in points], [pt[q] for pt in points], "-", points)
            )
        bases = [
            b for cc in results.plan["concurrency"] if (b := results.find("baseline", model=model, concurrency=cc))
        ]
        if bases:
            series.append(
                ("baseline p99", [b["concurrency"] for b in bases], [b["p99_ms"] for b in bases], "--", bases)
            )
        made += _figure(
            folder,
            f"latency_vs_concurrency_{model}.png",
            f"Latency vs concurrency ({model}, {hit:.0%} hits, {_count(rmax, 'replica')})",
            "connections",
            "ms",
            f"Latency percentiles of {model} against concurrency, {_count(rmax, 'replica')}, {hit:.0%} cache hits.",
            series,
            logx=True,
        )

    series = []
    for model in results.plan["models"]:
        found = [
            results.find("cluster", model=model, hit_ratio=h, concurrency=c, replicas=rmax)
            for h in results.plan["hit_ratios"]
        ]
        points = [pt for pt in found if pt]
        series.append((model, [pt["hit_ratio"] * 100 for pt in points], [pt["rps"] for pt in points], "-", points))
    made += _figure(
        folder,
        "cache_effect.png",
        f"What the cache buys ({_count(rmax, 'replica')}, c={c})",
        "cache-hit ratio (%)",
        "requests/s",
        "Requests/s against the share of requests whose row is already cached: nginx's L1 and the "
        "replicas' Redis cache together. The table below shows which of them answered.",
        series,
    )
    rows = []
    for model in results.plan["models"]:
        for h in results.plan["hit_ratios"]:
            pt = results.find("cluster", model=model, hit_ratio=h, concurrency=c, replicas=rmax)
            if pt:
                shares = _answer_shares(pt)
                rows.append(
                    [model, f"{h:.0%}", _fmt(pt["rps"]), *(f"{shares[k]:.0f} %" for k in ("L1", "Redis", "computed"))]
                )
    made += [
        ("p", f"Who answered ({_count(rmax, 'replica')}, c={c}), as the client counted the responses' headers:"),
        ("table", ["model", "cache hits", "req/s", "nginx L1", "Redis HIT", "computed by a replica"], rows),
    ]

    # The fewest hits: every request reaches a replica (the L1 answers repeats itself).
    point = results.find(
        "cluster",
        model=results.plan["models"][0],
        hit_ratio=min(results.plan["hit_ratios"]),
        concurrency=c,
        replicas=rmax,
    )
    replicas = {n: v for n, v in (point or {}).get("served_by", {}).items() if n != "nginx (L1)"}
    if point and len(replicas) > 1:
        names = sorted(replicas)
        caption = "How evenly nginx spread one point's requests over the replicas."
        made.append(
            (
                "img",
                _plot(
                    folder / "replica_distribution.png",
                    f"Requests per replica ({_count(rmax, 'replica')}, c={c})",
                    "replica",
                    "requests",
                    [("", names, [replicas[n] for n in names], "")],
                    bar=True,
                ),
                caption,
            )
        )
    return made


def _headline(results: Results) -> tuple[list[str], list[list[str]]]:
    headers = [
        "model",
        "cache hits",
        "cluster req/s",
        "baseline req/s",
        "throughput ×",
        "cluster p99 ms",
        "baseline p99 ms",
        "p99 ×",
    ]
    rows = []
    for model in results.plan["models"]:
        base = results.find("baseline", model=model, concurrency=results.headline_c)
        for hit in results.plan["hit_ratios"]:
            point = results.find(
                "cluster", model=model, hit_ratio=hit, concurrency=results.headline_c, replicas=results.max_replicas
            )
            if not point:
                continue
            rows.append(
                [
                    model + _mark(point) + ("" if disturbed(point) else _mark(base)),
                    f"{hit:.0%}",
                    _fmt(point["rps"]),
                    _fmt(base["rps"]) if base else "–",
                    _ratio(point["rps"], base["rps"]) if base else "–",
                    _fmt(point["p99_ms"], 1),
                    _fmt(base["p99_ms"], 1) if base else "–",
                    _ratio(point["p99_ms"], base["p99_ms"]) if base else "–",
                ]
            )
    return headers, rows


def interpretation(results: Results) -> list[str]:
    """A few sentences on what the numbers mean, computed from them."""
    sentences = []
    cores = results.env["cores"]
    c, rmax = results.headline_c, results.max_replicas
    model = results.plan["models"][0]
    hit = max(results.plan["hit_ratios"])
    one = results.find("cluster", model=model, hit_ratio=hit, concurrency=c, replicas=min(results.plan["replicas"]))
    top = results.find("cluster", model=model, hit_ratio=hit, concurrency=c, replicas=rmax)
    if one and top and one["rps"] and one is not top:
        sentences.append(
            f"Scaling: {model} at {hit:.0%} hits goes from {_fmt(one['rps'])} req/s with "
            f"{one['replicas']} replica(s) to {_fmt(top['rps'])} with {rmax} ({top['rps'] / one['rps']:.2f}×) on "
            f"{cores} cores; replicas beyond the core count share the same CPUs, so more of them add "
            "resilience and smoother tails rather than throughput here."
        )
    # The replicas' story from the fastest point they answered: at a point the L1 answers,
    # no replica takes part, and nginx's times say nothing about them.
    answered = [p for p in results.cluster if _answer_shares(p)["L1"] < 50]
    busiest = max(answered, key=lambda p: p["rps"], default=None)
    if busiest:
        cpu = busiest["cpu_cores"]
        replicas_cpu = sum(v for k, v in cpu.items() if k.startswith("replica"))
        parts = {
            "replicas": replicas_cpu,
            "nginx": cpu.get("nginx", 0.0),
            "redis": cpu.get("redis", 0.0),
            "load generator": cpu.get("load generator", 0.0),
        }
        total = sum(parts.values())
        verdict = "CPU-bound" if total > 0.85 * cores else "not CPU-bound (look at latency and connections)"
        shares = ", ".join(f"{name} {value:.2f}" for name, value in sorted(parts.items(), key=lambda kv: -kv[1]))
        sentences.append(
            f"Where the time goes: at the fastest point the replicas answered ({busiest['model']}, "
            f"{_count(busiest['replicas'], 'replica')}, c={busiest['concurrency']}, {busiest['hit_ratio']:.0%} hits, "
            f"{_fmt(busiest['rps'])} req/s) the machine is {verdict}: cores used — {shares} of {cores}. The replicas "
            "(gunicorn, gevent, Flask, the model) are the bottleneck when they take most of it; nginx's own share "
            "shows what balancing costs."
        )
        access = busiest["access_log"]
        sentences.append(
            f"nginx vs replicas at that point: the median of nginx's total time per request was "
            f"{_log_ms(access['nginx_p50_ms'])}, the median of the replica's part (upstream time) "
            f"{_log_ms(access['upstream_p50_ms'])}: medians of two distributions logged in whole milliseconds, so "
            f"they compare roughly; the client measured {_fmt(busiest['p50_ms'], 2)} ms."
        )
    l1_points = [p for p in results.cluster if _answer_shares(p)["L1"] >= 50]
    l1_best = max(l1_points, key=lambda p: p["rps"], default=None)
    if l1_best:
        sentences.append(
            f"The L1: at its fastest point ({l1_best['model']}, c={l1_best['concurrency']}, "
            f"{l1_best['hit_ratio']:.0%} hits) nginx answered {_answer_shares(l1_best)['L1']:.0f} % of "
            f'{_fmt(l1_best["rps"])} req/s from its micro-cache, no replica taking part; the table "Who answered" '
            "separates it from the replicas' Redis cache."
        )
    for model in results.plan["models"]:
        low, high = min(results.plan["hit_ratios"]), max(results.plan["hit_ratios"])
        miss = results.find("cluster", model=model, hit_ratio=low, concurrency=c, replicas=rmax)
        hits = results.find("cluster", model=model, hit_ratio=high, concurrency=c, replicas=rmax)
        if miss and hits and low != high and miss["rps"]:
            total = sum(hits["cache"].values())
            if hits["cache"].get("OFF", 0) > total / 2:
                sentences.append(
                    f"The cache, {model}: off for this model by policy (X-Cache: OFF; under `auto` the replicas "
                    f"found a predict cheaper than two Redis round trips), so the {high:.0%}-hit and {low:.0%}-hit "
                    f"points ({_fmt(hits['rps'])} and {_fmt(miss['rps'])} req/s) differ by their rows, not by "
                    "the cache."
                )
                continue
            if hits["cache"].get("BYPASS", 0) > total / 2:
                sentences.append(
                    f"The cache, {model}: Redis was unavailable for most of the {high:.0%}-hit point "
                    "(X-Cache: BYPASS): its numbers say nothing about the cache; look at the errors and the logs."
                )
                continue
            gain = hits["rps"] / miss["rps"]
            meaning = (
                "the cache pays for itself"
                if gain > 1.1
                else "a cache lookup costs about what the prediction does"
                if gain > 0.9
                else "for this model a prediction is cheaper than a cache round trip"
            )
            sentences.append(
                f"The cache, {model}: {high:.0%} hits give {_fmt(hits['rps'])} req/s against "
                f"{_fmt(miss['rps'])} at {low:.0%} ({gain:.2f}×): {meaning}."
            )
    failures = sum(failed_requests(p) for p in results.points)
    sentences.append(
        "Errors: none in any point."
        if not failures
        else f"Errors: {failures} non-2xx or socket errors in all; see the table."
    )
    return sentences


def _answer_shares(point: dict[str, Any]) -> dict[str, float]:
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


def _l1_share(point: dict[str, Any]) -> str:
    """Share of the point's requests nginx's L1 micro-cache answered (from the access log)."""
    l1 = point["access_log"].get("l1")
    if not l1:
        return "–"
    total = sum(l1.values())
    return f"{l1.get('HIT', 0) / total:.0%}" if total else "–"


def _others(point: dict[str, Any]) -> str:
    found = point.get("disturbance")
    if not found:
        return "–"
    steal = f", steal {found['steal_cores']:.2f}" if found["steal_cores"] >= 0.01 else ""
    return f"{found['other_cores']:.2f}{steal}{_mark(point)}"


def _app_cpu_ms(point: dict[str, Any]) -> float:
    """CPU ms per request spent in the app processes (replicas, or the baseline's gunicorn)."""
    per_request = point.get("cpu_ms_per_request") or {}
    values = [v for k, v in per_request.items() if (k.startswith("replica") or k == "baseline app") and v is not None]
    return sum(values) if values else math.nan


def _replica_mib(point: dict[str, Any]) -> float:
    """Mean resident memory of one replica (all its processes)."""
    rss = point.get("rss_mb") or {}
    values = [v for k, v in rss.items() if k.startswith("replica") or k == "baseline app"]
    return sum(values) / len(values) if values else math.nan


def topologies(results: Results) -> list[Block]:
    """The cache points on each Redis topology; each ratio against the first topology is
    taken within one round, the median (and spread) over the rounds."""
    points = [p for p in results.points if p["kind"].startswith("cache on Redis ")]
    if not points:
        return []
    order = list(dict.fromkeys(p["redis"] for p in points))
    first = order[0]
    rows = []
    for model, hit in sorted({(p["model"], p["hit_ratio"]) for p in points}):
        for topology in order:
            chosen = [p for p in points if (p["model"], p["hit_ratio"], p["redis"]) == (model, hit, topology)]
            if not chosen:
                continue
            ratios = []
            for point in chosen:
                ref = next(
                    (
                        r
                        for r in points
                        if (r["model"], r["hit_ratio"], r["redis"], r.get("round", 0))
                        == (model, hit, first, point.get("round", 0))
                    ),
                    None,
                )
                if ref and ref["rps"]:
                    ratios.append(point["rps"] / ref["rps"])
            spread = f" [{min(ratios):.2f}–{max(ratios):.2f}]" if len(ratios) > 1 else ""
            shaken = " ⚠" if any(disturbed(p) for p in chosen) else ""
            rows.append(
                [
                    model,
                    f"{hit:.0%}",
                    topology + shaken,
                    _fmt(statistics.median(p["rps"] for p in chosen)),
                    _fmt(statistics.median(p["p50_ms"] for p in chosen), 1),
                    _fmt(statistics.median(p["p99_ms"] for p in chosen), 1),
                    " ".join(f"{k}:{v}" for k, v in sorted(chosen[-1]["cache"].items())),
                    f"{statistics.median(ratios):.2f}×{spread}" if ratios else "–",
                ]
            )
    return [
        (
            "h2",
            f"The result cache on each Redis topology ({_count(points[0]['replicas'], 'replica')}, "
            f"c={points[0]['concurrency']})",
        ),
        ("table", ["model", "hits", "Redis", "req/s", "p50 ms", "p99 ms", "X-Cache", f"vs {first}"], rows),
        (
            "p",
            "Each topology ran in a cluster of its own (SERVICE_CACHE_POLICY=on, BALANCER_L1_CACHE=off: the "
            "replicas' result cache answers every repeat), one after the other in each round; each ratio is "
            f"taken within one round, the median over {results.plan['rounds']} round(s) with the min–max in "
            "brackets. X-Cache: the last round's.",
        ),
    ]


def cpu_reference(results: Results) -> list[Block]:
    """One replica worker against a minimal Flask app, CPU per request (bench --targets)."""
    measured = results.raw.get("cpu_reference") or []
    if not measured:
        return []
    # Here, not at the top: the profile's module needs the local cluster tooling, which the
    # loadtest image (the compose bench service, loadtest.remote) does not carry.
    from loadtest.profile import MINIMAL

    rows = []
    for round_no in sorted({m["round"] for m in measured}):
        pair = {m["kind"]: m for m in measured if m["round"] == round_no}
        reference = pair.get(MINIMAL)
        for kind, m in sorted(pair.items()):
            share = f"{m['cpu_ms'] / reference['cpu_ms']:.2f}×" if reference and reference["cpu_ms"] else "–"
            rows.append([str(round_no + 1), kind + _mark(m), _fmt(m["rps"]), _fmt(m["cpu_ms"], 3), share])
    return [
        ("h2", "Replica CPU per request vs a minimal Flask app"),
        ("table", ["round", "server (one gunicorn gevent worker)", "req/s", "CPU ms/request", "× minimal"], rows),
        (
            "p",
            "Both loaded directly by wrk (no nginx), iris, all misses, one after the other in each round; the "
            "minimal app parses the JSON, calls predict_proba and answers, nothing else. The target (replica "
            "≤ 0.45 ms where the minimal app took 0.69 ms) is judged by the ratio, since CPU per request "
            "moves between machines.",
        ),
    ]


# The kind of the sweep's point of a model of named columns (loadtest.bench.run_named_columns).
NAMED_COLUMNS = "cluster, named columns"


def named_columns(results: Results) -> list[Block]:
    """The DataFrame model's point against iris's at the same point of the same round."""
    rows, ratios = [], []
    for named in (p for p in results.points if p["kind"] == NAMED_COLUMNS):
        where = {"replicas": named["replicas"], "concurrency": named["concurrency"], "hit_ratio": 0.0}
        plain = next(
            (p for p in results.cluster if p["model"] == "iris" and p.get("round", 0) == named.get("round", 0)
             and all(p[k] == v for k, v in where.items())),
            None,
        )  # fmt: skip
        if plain is None:
            continue
        ratios.append(_app_cpu_ms(named) / _app_cpu_ms(plain))
        for model, point in (("churn, named columns (DataFrame)", named), ("iris, plain rows", plain)):
            rows.append(
                [str(named.get("round", 0) + 1), model + _mark(point), _fmt(point["rps"]), _fmt(point["p50_ms"], 1),
                 _fmt(_app_cpu_ms(point), 3)]
            )  # fmt: skip
    if not rows:
        return []
    finite = sorted(r for r in ratios if not math.isnan(r))
    spread = f"{statistics.median(finite):.2f}× [{finite[0]:.2f}–{finite[-1]:.2f}]" if finite else "–"
    first = next(p for p in results.points if p["kind"] == NAMED_COLUMNS)
    return [
        ("h2", "A model of named columns: what DataFrame inputs cost"),
        ("table", ["round", "model", "req/s", "p50 ms", "replica CPU ms/request"], rows),
        (
            "p",
            f"New rows at {first['replicas']} replica(s), c={first['concurrency']}, one after the other in each "
            "round. churn's rows are objects of five named columns, a string among them, predicted as a pandas "
            "DataFrame by a ColumnTransformer Pipeline; iris's are four numbers in a matrix. Both end in a "
            f"LogisticRegression. Replica CPU per request, churn against iris: {spread} (median [min–max] "
            "over the rounds): the DataFrame and the Pipeline's per-column work cost a fixed amount per "
            "predict call, which batching shares between the requests of a call.",
        ),
    ]


# The kind of the cluster's points measured beside the peers (loadtest.bench.run_peers).
CLUSTER_V2 = "cluster, V2"


def peers(results: Results) -> list[Block]:
    """Each peer's points against the cluster's at the same concurrency of the same round."""
    peer_points = [p for p in results.points if p.get("peer")]
    if not peer_points:
        return []
    out: list[Block] = [("h2", "Beside a dedicated model server")]
    for kind in dict.fromkeys(p["kind"] for p in peer_points):
        rows, ratios = [], collections.defaultdict(list)
        for theirs in (p for p in peer_points if p["kind"] == kind):
            ours = results.find(
                CLUSTER_V2, concurrency=theirs["concurrency"], model=theirs["model"], round=theirs.get("round", 0)
            )
            if ours is None:
                continue
            ratio = ours["rps"] / theirs["rps"] if theirs["rps"] else math.nan
            ratios[theirs["concurrency"]].append(ratio)
            rows.append(
                [str(theirs.get("round", 0) + 1), str(theirs["concurrency"]),
                 _fmt(ours["rps"]) + _mark(ours), _fmt(ours["p50_ms"], 1), _fmt(ours["p99_ms"], 1),
                 _fmt(theirs["rps"]) + _mark(theirs), _fmt(theirs["p50_ms"], 1), _fmt(theirs["p99_ms"], 1),
                 f"{ratio:.2f}×"]
            )  # fmt: skip
        if not rows:
            continue
        spreads = []
        for concurrency, values in sorted(ratios.items()):
            finite = sorted(v for v in values if not math.isnan(v))
            if finite:
                spreads.append(f"c={concurrency}: {statistics.median(finite):.2f}× [{finite[0]:.2f}–{finite[-1]:.2f}]")
        first = next(p for p in peer_points if p["kind"] == kind)
        replicas = next(p["replicas"] for p in results.points if p["kind"] == CLUSTER_V2)
        out += [
            ("h3", kind),
            (
                "table",
                ["round", "c", "cluster req/s", "p50 ms", "p99 ms", f"{kind} req/s", "p50 ms", "p99 ms", "ratio"],
                rows,
            ),
            (
                "p",
                f"The same {first['model']} model file, the same V2 bodies (one FP64 row, the `predict` output), "
                f"rows never sent before, wrk from the same machine, one after the other in each round: the "
                f"cluster ({_count(replicas, 'replica')}, defaults) against {first.get('setup', kind)}. Cluster "
                f"req/s over {kind}'s, median [min–max] over the rounds: {'; '.join(spreads)}. New rows are "
                "the fair comparison: a peer has no cache, and the cluster answers a repeated row from its L1.",
            ),
        ]
    return out


def blocks(results: Results, folder: Path) -> list[Block]:
    """The report's content, rendered to Markdown and HTML alike."""
    env = results.env
    out: list[Block] = [("h1", "Throughput report")]
    out.append(("p", f"{env['date_utc']} UTC · git {env['git_sha']} · {env['cpu_model']} · {env['cores']} cores"))
    measured = [*results.points, *(results.raw.get("h2load") or []), *(results.raw.get("cpu_reference") or [])]
    shaken = [pt for pt in measured if disturbed(pt)]
    if shaken:
        worst = max(max(pt["disturbance"]["other_cores"], pt["disturbance"]["steal_cores"]) for pt in shaken)
        out.append(
            (
                "p",
                f"⚠ Do not trust this report as it stands: {len(shaken)} of {len(measured)} measurements "
                "ran while processes the benchmark does not know (or the hypervisor, as steal time) used "
                f"the CPU, up to {worst:.2f} cores (threshold "
                f"{shaken[0]['disturbance']['threshold_cores']:g}). They are marked ⚠ in the tables and "
                "with red crosses in the plots, and targets judged from them say UNSURE. Run it again "
                "on a quiet machine (--wait-quiet SECONDS waits for one).",
            )
        )
    elif any("disturbance" in pt for pt in measured):
        out.append(
            (
                "p",
                "Quiet machine: during every measurement, processes the benchmark does not know used "
                "less than the threshold of CPU, and there was no steal time above it.",
            )
        )
    out.append(
        (
            "h2",
            f"Summary: cluster ({_count(results.max_replicas, 'replica')}) vs the tutorials' set-up, "
            f"c={results.headline_c}",
        )
    )
    out.append(
        (
            "p",
            "Both measured side by side in this run on this machine; absolute numbers on shared "
            "machines drift, the ratios are what to compare. Baseline: gunicorn sync workers "
            f"({env['baseline']['workers']}), no result cache, "
            "nginx without upstream keepalive.",
        )
    )
    out.append(("table", *_headline(results)))
    if results.raw.get("targets"):
        out.append(("h2", "Performance targets"))
        rows = [
            [
                verdict(t),
                t["target"],
                _fmt(t["measured"], 2),
                f"{_fmt(t['min'], 2)}–{_fmt(t['max'], 2)} ({t['runs']})" if "runs" in t else "–",
                f"{'≥' if t['at_least'] else '≤'} {t['goal']:g}",
            ]
            for t in results.raw["targets"]
        ]
        out.append(("table", ["", "target", "median", "min–max (runs)", "goal"], rows))
        out.append(
            (
                "p",
                "Each target's value is measured within one round (cluster and baseline interleaved); "
                "the verdict goes by the median over the rounds. UNSURE: a point behind it was "
                "disturbed. ERRORS: requests in a point behind it got no 2xx answer (see Every point).",
            )
        )
    out.extend(cpu_reference(results))
    out.extend(named_columns(results))
    out.extend(peers(results))
    for sentence in interpretation(results):
        out.append(("p", sentence))
    if results.raw.get("h2load"):
        out.append(("h2", "Raw throughput (h2load, one iris row, all hits, c=32)"))
        rows = [
            [
                h["kind"] + _mark(h),
                _fmt(h["rps"]),
                _fmt(h["p50_ms"], 1),
                _fmt(h["p90_ms"], 1),
                _fmt(h["p99_ms"], 1),
                _fmt(h["max_ms"], 1),
                str(h["s2xx"]),
                str(h["failed"] + h["errored"]),
            ]
            for h in results.raw["h2load"]
        ]
        out.append(("table", ["set-up", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "2xx", "failed"], rows))
        if any(h["kind"].startswith("nginx's own reply") for h in results.raw["h2load"]):
            out.append(
                (
                    "p",
                    "nginx's own reply: GETs of the balancer's stub_status, on the same nginx and connections, "
                    "right after the cluster's run: the fastest nginx answers at all, so the ceiling of what "
                    "its L1 can serve. An L1 hit also reads the body, builds the key and reads the cached file.",
                )
            )
    out.extend(topologies(results))
    out.append(("h2", "Plots"))
    out.extend(plots(results, folder / "plots"))
    out.append(("h2", "Every point"))
    headers = [
        "set-up",
        "replicas",
        "c",
        "hits",
        "model",
        "req/s",
        "p50",
        "p90",
        "p99",
        "max",
        "errors",
        "X-Cache",
        "L1 hits",
        "per replica",
        "nginx p50",
        "upstream p50",
        "app CPU ms/req",
        "MiB/replica",
        "cores used",
        "others' cores",
    ]
    rows = []
    for p in results.points:
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in sorted(p["cpu_cores"].items()) if v >= 0.01)
        rows.append(
            [
                p["kind"],
                str(p["replicas"]),
                str(p["concurrency"]),
                f"{p['hit_ratio']:.0%}",
                p["model"],
                _fmt(p["rps"]),
                _fmt(p["p50_ms"], 1),
                _fmt(p["p90_ms"], 1),
                _fmt(p["p99_ms"], 1),
                _fmt(p["max_ms"], 1),
                str(failed_requests(p)),
                " ".join(f"{k}:{v}" for k, v in sorted(p["cache"].items())),
                _l1_share(p),
                " ".join(str(v) for _, v in sorted(p["served_by"].items())),
                _fmt(p["access_log"]["nginx_p50_ms"], 2),
                _fmt(p["access_log"]["upstream_p50_ms"], 2),
                _fmt(_app_cpu_ms(p), 3),
                _fmt(_replica_mib(p)),
                cpu,
                _others(p),
            ]
        )
    out.append(("table", headers, rows))
    out.append(
        (
            "p",
            "X-Cache: the replicas' result cache as the client saw it (L1: answered by nginx's L1 "
            "micro-cache, BALANCER_L1_CACHE). L1 hits: the share nginx answered itself, from its access log. "
            "Latencies in ms, measured by the client (wrk). nginx/upstream p50: from nginx's access log "
            "($request_time vs $upstream_response_time). App CPU ms/req: CPU time of the replicas (or the "
            "baseline's gunicorn) per request. MiB/replica: resident memory of one replica's processes, "
            "each worker holding the models once. Cores used: CPU seconds per second of each process "
            "tree, from /proc. Others' cores: what the rest of the machine used meanwhile (its busy time "
            "in /proc/stat less the processes above, the load generator and the benchmark itself; + "
            "steal time); ⚠ above the threshold.",
        )
    )
    locust = results.raw.get("locust")
    if locust and locust.get("rows"):
        out.append(("h2", f"A realistic mix (Locust, {locust['users']} users, 90 % hits)"))
        rows = [
            [
                r["name"],
                str(r["requests"]),
                str(r["failures"]),
                _fmt(r["rps"]),
                _fmt(r["median_ms"]),
                _fmt(r["p90_ms"]),
                _fmt(r["p99_ms"]),
                _fmt(r["max_ms"]),
            ]
            for r in locust["rows"]
        ]
        out.append(("table", ["request", "count", "failures", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms"], rows))
        out.append(
            ("p", f"X-Cache mix: {locust['cache_mix']}. Locust's own report: locust.html; its CSV: locust_stats.csv.")
        )
    out.append(("h2", "Environment"))
    versions = ", ".join(f"{k}: {v}" for k, v in env["versions"].items())
    out.append(("p", f"{env['platform']}. {versions}."))
    out.append(
        (
            "p",
            "Settings as they ran, read from the running cluster: each replica's effective settings "
            "(from the environment its process started with) and the nginx.conf nginx ran "
            f"({env['nginx_conf']}).",
        )
    )
    changed = env["service_non_default"]
    out.append(
        (
            "p",
            "Replica settings changed from their defaults: "
            + (", ".join(f"{k}={v}" for k, v in sorted(changed.items())) or "none")
            + ".",
        )
    )
    out.append(("pre", "\n".join(env["nginx_directives"])))
    out.append(
        (
            "pre",
            json.dumps(
                {
                    "plan": env["plan"],
                    "replica settings (common)": env["service_settings"],
                    "replica settings (per replica)": env["per_replica"],
                    "baseline": env["baseline"],
                },
                indent=1,
            ),
        )
    )
    out.append(("h2", "Commands"))
    out.append(("pre", "\n".join(results.raw["commands"])))
    out.append(
        (
            "p",
            "Rebuild this report from its raw data: python -m loadtest.report <this folder>. "
            "Raw data: results.json, points.csv, raw/.",
        )
    )
    return out


def to_markdown(content: list[Block], folder: Path) -> str:
    """Markdown, plots as files beside it."""
    lines = []
    for block in content:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines.append(f"{'#' * int(kind[1])} {block[1]}\n")
        elif kind == "p":
            lines.append(f"{block[1]}\n")
        elif kind == "pre":
            lines.append(f"```\n{block[1]}\n```\n")
        elif kind == "img":
            lines.append(f"![{block[2]}]({block[1].relative_to(folder)})\n\n{block[2]}\n")
        elif kind == "table":
            headers, rows = block[1], block[2]
            lines.append("| " + " | ".join(headers) + " |")
            lines.append("|" + "---|" * len(headers))
            lines.extend("| " + " | ".join(row) + " |" for row in rows)
            lines.append("")
    return "\n".join(lines)


def to_html(content: list[Block]) -> str:
    """One self-contained HTML file: styles inline, plots embedded as data URIs."""
    body = []
    for block in content:
        kind = block[0]
        if kind in ("h1", "h2", "h3", "p"):
            body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "pre":
            body.append(f"<pre>{html.escape(block[1])}</pre>")
        elif kind == "img":
            data = base64.b64encode(block[1].read_bytes()).decode()
            body.append(
                f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(block[2])}</figcaption></figure>"
            )
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:3px 6px;text-align:right}th{background:#f3f3f3}pre{background:#f7f7f7;padding:1em;"
        "overflow:auto;font-size:12px}img{max-width:100%}figcaption{font-size:13px;color:#555}"
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Throughput report</title>'
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def build(folder: Path) -> dict[str, Path]:
    """Write report.md, report.html and plots/ from folder/results.json."""
    results = Results(json.loads((folder / "results.json").read_text()))
    content = blocks(results, folder)
    md, page = folder / "report.md", folder / "report.html"
    md.write_text(to_markdown(content, folder))
    page.write_text(to_html(content))
    return {"md": md, "html": page}


def main(argv: list[str] | None = None) -> int:
    """Rebuild a report from its folder."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / "results.json").exists():
        print("usage: python -m loadtest.report reports/<timestamp>  (a folder with results.json)", file=sys.stderr)
        return 2
    paths = build(Path(args[0]))
    print(f"report: {paths['md']}\n        {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
