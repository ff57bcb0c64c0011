"""What the numbers say, in sentences: the headline table and the interpretation."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from loadtest.report.common import Results, _answer_shares, _count, _fmt, _log_ms, _mark, _ratio
from loadtest.results import disturbed, failed_requests


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
