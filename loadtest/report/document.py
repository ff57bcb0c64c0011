"""The whole report as blocks (headings, paragraphs, tables, images), and those blocks
written as Markdown and as one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from loadtest.report.capacity import DEFAULT_TARGET_P99_MS, DEFAULT_TARGET_RPS
from loadtest.report.capacity import section as capacity_section
from loadtest.report.common import Block, Results, _app_cpu_ms, _count, _fmt, _l1_share, _mark, _others, _replica_mib
from loadtest.report.findings import _headline, interpretation
from loadtest.report.past_capacity import past_capacity, sentence
from loadtest.report.plots import plots
from loadtest.report.sections import cpu_reference, named_columns, peers, runtimes, topologies
from loadtest.results import disturbed, failed_requests, mostly_refused, refusal_advice, verdict


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
    advice = refusal_advice(list(results.points))
    if advice:
        out.append(("p", advice))
    if not shaken and any("disturbance" in pt for pt in measured):
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
    out.extend(runtimes(results))
    out.extend(peers(results))
    for said in interpretation(results):
        out.append(("p", said))
    past = results.raw.get("overload")
    if past and past["rounds"]:
        out.append(
            (
                "p",
                "Past capacity: " + sentence(past["rounds"], past["times"], past["objective_ms"]),
            )
        )
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
        "refused",
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
                p["kind"] + (" ✗" if mostly_refused(p) else ""),
                str(p["replicas"]),
                str(p["concurrency"]),
                f"{p['hit_ratio']:.0%}",
                p["model"],
                _fmt(p["rps"]),
                _fmt(p["p50_ms"], 1),
                _fmt(p["p90_ms"], 1),
                _fmt(p["p99_ms"], 1),
                _fmt(p["max_ms"], 1),
                str(p.get("refused", 0)),
                str(failed_requests(p) - p.get("refused", 0)),
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
    target = results.raw.get("capacity_target") or {"rps": DEFAULT_TARGET_RPS, "p99_ms": DEFAULT_TARGET_P99_MS}
    out.extend(capacity_section(results.points, env["cores"], results.headline_c, target["rps"], target["p99_ms"]))
    out.extend(past_capacity(results.raw.get("overload")))
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
