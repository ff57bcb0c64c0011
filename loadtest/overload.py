"""The overload benchmark: a local cluster offered open loop below and past its capacity.

    make bench-overload                        # 3 rounds, admission on and off side by side
    python -m loadtest.overload --rounds 5 --times 0.5,1.5,3 --seconds 10
    python -m loadtest.overload --url http://127.0.0.1:8082 --model iris   # a running cluster

Each round measures the capacity closed loop (32 clients, new rows: what the cluster
serves flat out), then offers `--times` × that open loop (loadtest/openloop.py: every send
time fixed in advance, latency from it) and records, per multiple: useful goodput (2xx
within the latency objective) as a fraction of capacity, p50/p99 of the 2xx, the refusals
(429/503) and their p99, other errors, and requests that got no answer (reset, closed or
given up after 5 s). Without --url it starts two clusters of 4 replicas in the defaults
but for the model (the digits forest through scikit-learn, one row a call: a user's
model ONNX Runtime does not run, as in tests/integration/test_overload.py): one with
admission control (SERVICE_LATENCY_OBJECTIVE_MS's default) and one without (0: what the
cluster did before). Rounds alternate between them, so both see the same noise; each
figure is the median of the rounds [min-max]. Writes reports/overload-<time>/overload.md
and overload.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest.openloop import capacity, new_rows, open_loop
from loadtest.procstat import machine_cpu_seconds
from loadtest.report.document import to_markdown
from loadtest.report.past_capacity import sentence, spread, table_rows
from localcluster import Cluster, Ports
from localcluster.settings import DEFAULT_SLOTS
from service.settings import Settings

if TYPE_CHECKING:
    from loadtest.sweep import Sweep

ROOT = Path(__file__).resolve().parent.parent
EXPENSIVE = {"SERVICE_RUNTIME": "digits=sklearn,*=auto", "SERVICE_BATCHING": "digits=off,*=on"}
SETUPS = {"admission": {}, "no admission": {"SERVICE_LATENCY_OBJECTIVE_MS": "0"}}


def measure(url: str, model: str, times: list[float], seconds: float, objective_s: float, nonce: int) -> dict:
    """One round against `url`: the capacity, then each multiple of it open loop."""
    path = f"/v1/models/{model}:predict"
    bodies = new_rows(model, 60_000, nonce)
    capacity(url, path, bodies[:500], clients=32, seconds=1)  # warm up
    measured = capacity(url, path, bodies[500:5_000], clients=32, seconds=4)
    points = {}
    start = 5_000
    for multiple in times:
        count = int(multiple * measured * seconds) + 1
        run = open_loop(url, path, bodies[start : start + count], multiple * measured, seconds, objective_s)
        start += count
        summary = run.summary()
        summary["goodput_x"] = round(summary["goodput_rps"] / measured, 2) if measured else 0.0
        points[str(multiple)] = summary
    return {"capacity_rps": round(measured, 1), "points": points}


def run_overload(sweep: Sweep, rounds: list[dict[str, Any]]) -> None:
    """The overload point: a cluster of the most replicas in the defaults but for the model
    (the digits forest through scikit-learn, one row a call: EXPENSIVE above,
    a model the open-loop generator can offer 3× of on 2 cores), its capacity closed loop,
    then open loop at the plan's multiples of it; appends this round's result to `rounds`."""
    replicas = max(sweep.plan.replicas)
    environ = {**sweep.cluster.environ, **EXPENSIVE}
    other = Cluster(sweep.out / f"overload-run-{sweep.round + 1}", environ)
    sweep.progress(f"overload: {replicas} replicas, digits through scikit-learn, open loop at "
                   f"{', '.join(f'{t:g}×' for t in sweep.plan.overload)} capacity")  # fmt: skip
    other.start(replicas, Ports.auto(DEFAULT_SLOTS))
    try:
        nonce = (int(time.time()) + sweep.round * 7) % 100_000
        objective_s = objective_ms(environ) / 1000
        times = list(sweep.plan.overload)
        rounds.append(measure(other.internal_url, "digits", times, 8.0, objective_s, nonce))
    finally:
        other.stop()
    sweep.done += 1


def objective_ms(environ: Mapping[str, str]) -> float:
    """The replicas' latency objective as they run (SERVICE_LATENCY_OBJECTIVE_MS)."""
    return float(Settings.from_env(dict(environ)).server.latency_objective_ms)


def wait_quiet(limit_s: float = 30.0) -> float:
    """Until the machine's CPUs are mostly idle (a cluster without admission control goes on
    computing a backlog long after its clients gave up): the seconds waited."""
    started, cores = time.monotonic(), os.cpu_count() or 1
    while time.monotonic() - started < limit_s:
        before = machine_cpu_seconds()["busy"]
        time.sleep(1)
        if (machine_cpu_seconds()["busy"] - before) / cores < 0.2:
            break
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running cluster's internal listener (no clusters started)")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--times", default="0.5,1.5,3", help="multiples of the measured capacity")
    parser.add_argument("--seconds", type=float, default=8.0, help="per multiple")
    parser.add_argument("--objective-ms", type=float, default=500.0, help="the replicas' SERVICE_LATENCY_OBJECTIVE_MS")
    args = parser.parse_args()
    times = [float(t) for t in args.times.split(",")]
    out = ROOT / "reports" / time.strftime("overload-%Y%m%dT%H%M%SZ", time.gmtime())
    out.mkdir(parents=True, exist_ok=True)
    clusters: dict[str, Cluster] = {}
    urls = {"running cluster": args.url} if args.url else {}
    try:
        if not args.url:
            workdir = Path(tempfile.mkdtemp(prefix="overload-", dir=out))
            for name, extra in SETUPS.items():
                cluster = Cluster(workdir / name.replace(" ", "-"), {**EXPENSIVE, **extra})
                print(f"starting the cluster with {name}", flush=True)
                cluster.start(4, Ports.auto(DEFAULT_SLOTS))
                clusters[name], urls[name] = cluster, cluster.internal_url
        results: dict[str, list[dict]] = {name: [] for name in urls}
        for round_ in range(args.rounds):
            for name, url in urls.items():
                nonce = (int(time.time()) + round_ * 7 + len(name)) % 100_000  # rows no earlier run sent
                waited = wait_quiet()
                result = measure(url, args.model, times, args.seconds, args.objective_ms / 1000, nonce)
                result["waited_quiet_s"] = round(waited, 1)
                results[name].append(result)
                print(f"round {round_ + 1}, {name}: {json.dumps(result)}", flush=True)
    finally:
        for cluster in clusters.values():
            cluster.stop()
    first = next(iter(results))
    capacities = {name: spread([r["capacity_rps"] for r in rounds]) for name, rounds in results.items()}
    markdown = to_markdown(
        [
            ("h1", "Past capacity"),
            ("p", sentence(results[first], times, args.objective_ms)),
            (
                "p",
                f"{args.model}, new rows, {args.rounds} rounds, median [min-max]; capacity (closed loop, 32 clients, "
                f"req/s): " + ", ".join(f"{k} {v}" for k, v in capacities.items()) + ".",
            ),
            ("table", *table_rows(results, times)),
        ],
        out,
    )
    (out / "overload.md").write_text(markdown)
    (out / "overload.json").write_text(json.dumps({"times": times, "results": results}, indent=1))
    print(markdown)
    print(f"\nwritten: {out / 'overload.md'}")


if __name__ == "__main__":
    main()
