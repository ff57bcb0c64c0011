"""Where a replica's CPU goes: CPU per request of one replica worker against a minimal
Flask app doing the same predict, measured side by side, and a py-spy profile of the
replica under the same load.

    python -m loadtest.profile [--model iris] [--hit-ratio 0] [--seconds 8] [--rounds 2]

Both run as one gunicorn gevent worker on loopback, loaded directly (no nginx) by wrk
with the benchmark's payloads (each request a pool row with probability --hit-ratio, or
a row never sent before); the replica is a real local cluster of one replica with its
Redis. CPU per request is the worker's CPU time (from /proc) over the requests wrk
completed, in a run without the profiler; the profile is a separate run under py-spy
(`make up` installs it; root, or ptrace allowed). Prints a table and the functions with
the most samples; writes the raw stacks (flamegraph.pl or speedscope read them).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from loadtest.generators import write_wrk_payloads, wrk_argv
from loadtest.parsers import parse_wrk
from loadtest.payloads import Mix
from localcluster import Cluster, Ports, free_port
from localcluster.processes import children, wait_until
from localcluster.settings import DEFAULT_SLOTS

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MINIMAL = "minimal Flask + predict"
REPLICA = "replica"

MINIMAL_APP = '''"""The reference: the least a Flask app behind gunicorn's gevent worker does for a prediction."""
import joblib
import numpy as np
from flask import Flask, jsonify, request

model = joblib.load({artifact!r})
classes = {classes!r}
app = Flask(__name__)


@app.post("/v1/models/<name>:predict")
def predict(name):
    rows = np.asarray(request.get_json()["instances"], dtype=float)
    proba = model.predict_proba(rows)
    labels = [classes[i] for i in proba.argmax(axis=1)]
    return jsonify(predictions=labels, probabilities=proba.tolist())


@app.post("/v2/models/<name>/infer")
def infer(name):
    tensor = request.get_json()["inputs"][0]
    rows = np.asarray(tensor["data"], dtype=float).reshape(tensor["shape"])
    labels = [classes[i] for i in model.predict_proba(rows).argmax(axis=1)]
    return jsonify(
        model_name=name,
        outputs=[{{"name": "predict", "datatype": "BYTES", "shape": [len(labels)], "data": labels}}],
    )
'''


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def only_worker(master: int) -> int:
    """The one worker of a gunicorn master."""
    return int(wait_until(lambda: [pid for pid, _ in children(master)], 30, "the gunicorn worker")[0])


def py_spy() -> str:
    """The py-spy command: on PATH, or beside this Python (the virtualenv's)."""
    return shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def measure(
    url: str, worker: int, args: argparse.Namespace, out: Path, tag: str, profile: bool = False
) -> dict[str, Any]:
    """One wrk run against `url`: req/s and the worker's CPU ms per request."""
    mix = Mix(pool_size=1000, hit_ratio=args.hit_ratio, skew="zipf")
    nonce = random.SystemRandom().randint(10**5, 10**6)
    payloads = write_wrk_payloads(out / f"{tag}.lua", args.model, mix, nonce, protocol=args.protocol)
    spy = None
    if profile:
        spy = subprocess.Popen(
            [
                py_spy(),
                "record",
                "-p",
                str(worker),
                "-d",
                str(round(args.seconds)),
                "-r",
                "250",
                "-f",
                "raw",
                "-o",
                str(out / "replica.stacks.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1)
    before = cpu_seconds(worker)
    result = subprocess.run(
        wrk_argv(url, args.connections, args.seconds),
        capture_output=True,
        text=True,
        env={**os.environ, "WRK_PAYLOADS": str(payloads)},
        timeout=args.seconds + 60,
    )
    used = cpu_seconds(worker) - before
    payloads.unlink()
    if spy is not None:
        _, err = spy.communicate(timeout=60)
        if spy.returncode != 0:
            raise SystemExit(f"py-spy failed: {err.strip()}")
    parsed = parse_wrk(result.stdout)
    errors = parsed["non_2xx"] + parsed["socket_errors"]
    if errors:
        raise SystemExit(f"{tag}: {errors} failed requests:\n{result.stdout}")
    return {"rps": parsed["rps"], "cpu_ms": 1000 * used / max(parsed["requests"], 1), "command": " ".join(result.args)}


@contextlib.contextmanager
def side_by_side(out: Path, model: str, environ: Mapping[str, str]) -> Iterator[dict[str, tuple[str, int]]]:
    """The minimal Flask app and a one-replica cluster with one worker (its settings from
    `environ`), each as one gunicorn gevent worker: {name: (url, worker pid)}; stopped after."""
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((ROOT / "models" / model / "1" / "model.json").read_text())
    (out / "minimal_app.py").write_text(
        MINIMAL_APP.format(
            artifact=str(ROOT / "models" / model / "1" / meta["artifact"]), classes=meta["outputs"]["classes"]
        )
    )
    port = free_port()
    minimal = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "gunicorn"),
            "-k",
            "gevent",
            "-w",
            "1",
            "-b",
            f"127.0.0.1:{port}",
            "--keep-alive",
            "75",
            "--chdir",
            str(out),
            "--no-control-socket",
            "minimal_app:app",
        ],
        stdout=(out / "minimal.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    cluster = Cluster(out / "run", {**environ, "SERVICE_WORKERS": "1"})
    try:
        cluster.start(1, Ports.auto(DEFAULT_SLOTS))
        replica = cluster.status().component("replica-1")
        yield {
            MINIMAL: (f"http://127.0.0.1:{port}", only_worker(minimal.pid)),
            REPLICA: (f"http://127.0.0.1:{replica.port}", only_worker(replica.pid)),
        }
    finally:
        cluster.stop()
        os.killpg(minimal.pid, 15)
        minimal.wait(timeout=30)


def top_functions(stacks: Path, count: int = 25) -> list[tuple[str, float, float]]:
    """(function, % of samples on CPU in it, % with it on the stack) from py-spy's raw output."""
    self_time: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in stacks.read_text().splitlines():
        stack, _, weight = line.rpartition(" ")
        if not stack or not weight.isdigit():
            continue
        # "function (file:line)": one entry per function, whichever line was running
        frames = [re.sub(r":\d+\)$", ")", f.strip()) for f in stack.split(";") if f.strip()]
        samples += int(weight)
        self_time[frames[-1]] += int(weight)
        for frame in set(frames):
            total[frame] += int(weight)
    return [(name, 100 * n / samples, 100 * total[name] / samples) for name, n in self_time.most_common(count)]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.profile", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--model", default="iris")
    parser.add_argument("--hit-ratio", type=float, default=0.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="minimal app and replica interleaved, this many times")
    parser.add_argument(
        "--cache-policy",
        default="auto",
        help="the replica's SERVICE_CACHE_POLICY (auto decides "
        "per worker whether Redis pays for this model; off: the compute path alone)",
    )
    parser.add_argument(
        "--protocol",
        choices=("v1", "v2"),
        default="v1",
        help="KServe V1 bodies, or V2 ones (one FP64 tensor, the predict output: the bodies of --peers)",
    )
    parser.add_argument("--no-profile", action="store_true", help="only the CPU per request")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not args.no_profile and not Path(py_spy()).exists():
        parser.error("py-spy is not installed: `.venv/bin/pip install py-spy`, or pass --no-profile")
    out = (args.out or ROOT / "reports" / f"profile-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}").resolve()
    out.mkdir(parents=True, exist_ok=True)

    environ = {**os.environ, "SERVICE_CACHE_POLICY": args.cache_policy}
    with side_by_side(out, args.model, environ) as targets:
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        for round_no in range(args.rounds):
            for name, (url, worker) in targets.items():
                runs[name].append(measure(url, worker, args, out, f"{name.split()[0]}-{round_no}"))
        print(
            f"{args.model} ({args.protocol}), {args.hit_ratio:.0%} hits, cache policy {args.cache_policy}, "
            f"c={args.connections}, "
            "one gevent worker, "
            f"{args.rounds} round(s) of {args.seconds:g} s (median)"
        )
        reference = statistics.median(r["cpu_ms"] for r in runs[MINIMAL])
        for name, results in runs.items():
            cpu = statistics.median(r["cpu_ms"] for r in results)
            rps = statistics.median(r["rps"] for r in results)
            print(f"  {name:<26} {rps:>8,.0f} req/s  {cpu:6.3f} ms CPU/request  {cpu / reference:5.2f}× minimal")
        if not args.no_profile:
            url, worker = targets[REPLICA]
            measure(url, worker, args, out, "replica-profiled", profile=True)
            print("\nreplica, py-spy (self % = samples in the function itself, total % = on the stack):")
            for function, own, inclusive in top_functions(out / "replica.stacks.txt"):
                print(f"  {own:5.1f} {inclusive:5.1f}  {function[:150]}")
            print(f"\nraw stacks: {out / 'replica.stacks.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
