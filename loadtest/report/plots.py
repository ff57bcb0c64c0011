"""The report's plots (matplotlib, PNG files under plots/, inlined in report.html)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loadtest.report.common import Block, Results, _answer_shares, _count, _fmt, _mark
from loadtest.results import disturbed


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
    series: list[tuple[str, list[Any], list[Any], str, list[Any]]] = []
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
    replicas = {n: v for n, v in (point["served_by"] if point else {}).items() if n != "nginx (L1)"}
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
