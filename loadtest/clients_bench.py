"""tritonclient against the cluster: a batch of rows with binary tensor data on and off,
interleaved in one run, several rounds; prints the median and spread of each and the ratio.

    python -m loadtest.clients_bench [--url http://127.0.0.1:8082] [--rows 150] [--seconds 5] [--rounds 3]

Without --url it starts a local cluster of its own (2 replicas, free ports) and stops it
afterwards. Point it at the internal listener of a running cluster, not the public one:
the public listener rate limits (locally loopback is exempt, so either works there).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from importlib import metadata
from pathlib import Path

import numpy as np
import tritonclient.http as triton

from localcluster import Cluster, Ports
from localcluster.settings import DEFAULT_SLOTS


def _rate(url: str, rows: np.ndarray, binary: bool, seconds: float, concurrency: int) -> float:
    """Requests per second of `concurrency` clients for `seconds`, every answer checked."""
    client = triton.InferenceServerClient(urllib.parse.urlsplit(url).netloc, concurrency=concurrency)
    tensor = triton.InferInput("input-0", list(rows.shape), "FP64")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("predict", "predict_proba")]
    try:
        client.infer("iris", [tensor], outputs=outputs)  # connection set-up outside the clock
        done = 0
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()
        while time.perf_counter() < deadline:
            pending = [client.async_infer("iris", [tensor], outputs=outputs) for _ in range(concurrency)]
            for request in pending:
                result = request.get_result()
                if result.as_numpy("predict").shape != (len(rows),):
                    raise RuntimeError("a response without a prediction per row")
            done += concurrency
        return done / (time.perf_counter() - started)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print the comparison."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--url", help="a running cluster (default: start one)")
    parser.add_argument("--rows", type=int, default=150)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(20261122)
    # The same rows for both encodings; under the default `auto` cache policy iris is not
    # cached (its predict costs less than two Redis round trips), so both pay the whole path.
    rows = rng.uniform([4.3, 2.0, 1.0, 0.1], [7.9, 4.4, 6.9, 2.5], size=(args.rows, 4))
    cluster = None
    url = args.url
    if url is None:
        cluster = Cluster(Path(tempfile.mkdtemp(prefix="clients-bench-")) / "run")
        cluster.start(2, Ports.auto(DEFAULT_SLOTS))
        url = cluster.internal_url
    try:
        rates: dict[bool, list[float]] = {True: [], False: []}
        for round_number in range(args.rounds):
            for binary in (True, False) if round_number % 2 == 0 else (False, True):
                rates[binary].append(_rate(url, rows, binary, args.seconds, args.concurrency))
    finally:
        if cluster is not None:
            cluster.stop()
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    version = metadata.version("tritonclient")
    print(
        f"tritonclient {version}, {args.rows}-row iris batches, {args.concurrency} in flight, {args.rounds} rounds "
        f"of {args.seconds:g} s, interleaved; {url}; git {sha}; {os.cpu_count()} cores"
    )
    for binary, label in ((True, "binary data on "), (False, "binary data off")):
        values = rates[binary]
        median = statistics.median(values)
        spread = f"{min(values):.1f}-{max(values):.1f}"
        print(f"  {label}: median {median:7.1f} req/s ({median * args.rows:8.0f} rows/s), min-max {spread}")
    ratios = [on / off for on, off in zip(rates[True], rates[False], strict=True)]
    print(f"  binary / JSON: median {statistics.median(ratios):.2f}x, min-max {min(ratios):.2f}-{max(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
