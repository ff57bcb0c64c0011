"""The report's optional sections, each from the points of one part of the sweep: Redis
topologies, the CPU reference, named columns, the peers."""

from __future__ import annotations

import collections
import math
import statistics

import matplotlib

matplotlib.use("Agg")

from loadtest.report.common import Block, Results, _app_cpu_ms, _count, _fmt, _mark
from loadtest.results import CLUSTER_V2, NAMED_COLUMNS, SKLEARN_RUNTIME, disturbed


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


def named_columns(results: Results) -> list[Block]:
    """The DataFrame model's point against iris's at the same point of the same round."""
    rows, ratios = [], []
    for named in (p for p in results.points if p["kind"] == NAMED_COLUMNS):
        plain = next(
            (p for p in results.cluster if p["model"] == "iris" and p.get("round", 0) == named.get("round", 0)
             and p["replicas"] == named["replicas"] and p["concurrency"] == named["concurrency"]
             and p["hit_ratio"] == 0.0),
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


def peers(results: Results) -> list[Block]:
    """Each peer's points against the cluster's at the same concurrency of the same round."""
    peer_points = [p for p in results.points if p.get("peer")]
    if not peer_points:
        return []
    out: list[Block] = [("h2", "Beside a dedicated model server")]
    for kind, model in dict.fromkeys((p["kind"], p["model"]) for p in peer_points):
        rows, ratios = [], collections.defaultdict(list)
        for theirs in (p for p in peer_points if p["kind"] == kind and p["model"] == model):
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
        first = next(p for p in peer_points if p["kind"] == kind and p["model"] == model)
        replicas = next(p["replicas"] for p in results.points if p["kind"] == CLUSTER_V2)
        out += [
            ("h3", f"{kind}, {model}"),
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


def runtimes(results: Results) -> list[Block]:
    """Each model's runtime in this run, and new rows of each against scikit-learn answering
    the same model (SERVICE_RUNTIME=sklearn) in the same round."""
    answered = results.env.get("runtimes") or {}
    theirs = [p for p in results.points if p["kind"] == SKLEARN_RUNTIME]
    if not answered and not theirs:
        return []
    out: list[Block] = [("h2", "The model's runtime: ONNX Runtime where a model converts and agrees")]
    if answered:
        out.append(
            (
                "p",
                "Runtime per model in this run (a model.onnx answers only once it agrees with scikit-learn, checked "
                "when packaged and again at each load): "
                + ", ".join(f"{model}: {runtime}" for model, runtime in sorted(answered.items()))
                + ". Under the cache policy `auto` a model is cached only when its predict costs more than a "
                "miss's two Redis round trips: through ONNX Runtime a row costs microseconds, so `auto` caches "
                "none of the compiled models (the L1 still answers repeats; SERVICE_CACHE_POLICY=on caches them).",
            )
        )
    rows, ratios = [], collections.defaultdict(list)
    for sk in theirs:
        kind = NAMED_COLUMNS if sk["model"] == "churn" else "cluster"
        ours = results.find(
            kind, model=sk["model"], hit_ratio=0.0, concurrency=sk["concurrency"], round=sk.get("round", 0)
        )
        if ours is None:
            continue
        ratio = ours["rps"] / sk["rps"] if sk["rps"] else math.nan
        ratios[sk["model"]].append(ratio)
        rows.append(
            [str(sk.get("round", 0) + 1), sk["model"], _fmt(ours["rps"]) + _mark(ours), _fmt(_app_cpu_ms(ours), 3),
             _fmt(sk["rps"]) + _mark(sk), _fmt(_app_cpu_ms(sk), 3), f"{ratio:.2f}×"]
        )  # fmt: skip
    if rows:
        spreads = []
        for model, values in ratios.items():
            finite = sorted(v for v in values if not math.isnan(v))
            if finite:
                spreads.append(f"{model} {statistics.median(finite):.2f}× [{finite[0]:.2f}–{finite[-1]:.2f}]")
        out += [
            (
                "table",
                [
                    "round",
                    "model",
                    "default req/s",
                    "replica CPU ms/req",
                    "scikit-learn req/s",
                    "replica CPU ms/req",
                    "ratio",
                ],
                rows,
            ),
            (
                "p",
                f"New rows at {theirs[0]['replicas']} replica(s), c={theirs[0]['concurrency']}: the default cluster "
                "against one where scikit-learn answers every model, one after the other in each round. Default "
                f"req/s over scikit-learn's, median [min–max]: {'; '.join(spreads)}.",
            ),
        ]
    return out
