"""Locust scenarios against the cluster, with a controlled cache-hit ratio.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8082                 # web UI
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8082 --headless \\
        -u 32 -r 32 -t 30s --hit-ratio 0.9 --csv reports/x/locust --html reports/x/locust.html \\
        SingleRowUser

One idea per user class (pick classes by name, or tasks by tag): SingleRowUser (V1, one
iris row), BatchUser (V1, --batch-rows rows), V2InferUser (Open Inference Protocol),
HeavyUser (digits, the forest), NamedColumnsUser (churn: an object of named, mixed-type
columns, predicted as a DataFrame), MixUser (a realistic mix of all five). Rows come from a
pool that is warmed into the cache at start; --hit-ratio of the requests reuse a pool row
(--skew zipf or uniform), the rest send rows never seen before. Every response is
checked (status, JSON shape, X-Cache); thresholds (--max-fail-ratio, --max-p95-ms,
--min-rps) set the exit code. A refusal (429 or 503 with Retry-After) is one failure kind
per status, and its user waits the Retry-After out. Load shapes: loadtest/shapes.py.
"""

from __future__ import annotations

import collections
import json
import random
import time
from typing import Any

from locust import FastHttpUser, events, tag, task
from locust.env import Environment
from locust.runners import WorkerRunner

from loadtest.payloads import FRESH, Mix, around_first_value, model_width, pool_row

MODELS = ("iris", "digits", "churn")

CACHE_STATES = {"HIT", "MISS", "PARTIAL", "OFF", "BYPASS"}
cache_mix: collections.Counter[str] = collections.Counter()


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    # Each option also reads LOCUST_<OPTION> (as Locust's own do), so compose can set them.
    group = parser.add_argument_group("prediction cluster")
    group.add_argument(
        "--hit-ratio",
        type=float,
        default=0.9,
        env_var="LOCUST_HIT_RATIO",
        help="share of requests that reuse a pool row",
    )
    group.add_argument(
        "--pool-size", type=int, default=1000, env_var="LOCUST_POOL_SIZE", help="rows in the warmed pool"
    )
    group.add_argument(
        "--skew", choices=["zipf", "uniform"], default="zipf", env_var="LOCUST_SKEW", help="how pool rows are chosen"
    )
    group.add_argument(
        "--batch-rows", type=int, default=32, env_var="LOCUST_BATCH_ROWS", help="rows per BatchUser request"
    )
    group.add_argument(
        "--max-fail-ratio",
        type=float,
        default=0.01,
        env_var="LOCUST_MAX_FAIL_RATIO",
        help="exit 1 above this failure ratio",
    )
    group.add_argument(
        "--max-p95-ms", type=float, default=0.0, env_var="LOCUST_MAX_P95_MS", help="exit 1 above this p95 (0: no limit)"
    )
    group.add_argument(
        "--min-rps",
        type=float,
        default=0.0,
        env_var="LOCUST_MIN_RPS",
        help="exit 1 below this throughput (0: no limit)",
    )


class Payloads:
    """Request bodies prepared once per run: pool bodies, and templates for fresh rows."""

    def __init__(self, mix: Mix, batch_rows: int) -> None:
        self.mix = mix
        self.batch_rows = batch_rows
        self.nonce = random.SystemRandom().randint(10**6, 10**7)
        self.counter = 0
        self.choices = mix.choices(100_000, seed=self.nonce)
        self.position = 0
        self.pool = {model: [pool_row(model, i) for i in range(mix.pool_size)] for model in MODELS}
        self.pool_json = {m: [json.dumps(r, separators=(",", ":")) for r in rows] for m, rows in self.pool.items()}
        # A fresh row is a pool row with its first value replaced: "<nonce>.<counter>".
        self.fresh = {m: [around_first_value(r) for r in rows] for m, rows in self.pool.items()}

    def row_json(self, model: str) -> str:
        """One row as JSON text: a pool row, or one never sent before."""
        choice = self.choices[self.position]
        self.position = (self.position + 1) % len(self.choices)
        if choice != FRESH:
            return self.pool_json[model][choice]
        self.counter += 1
        head, tail = self.fresh[model][self.counter % self.mix.pool_size]
        return f"{head}{self.nonce}.{self.counter:09d}{tail}"

    def v1(self, model: str, rows: int = 1) -> str:
        """A KServe V1 body."""
        return '{"instances":[' + ",".join(self.row_json(model) for _ in range(rows)) + "]}"

    def v2(self, model: str) -> str:
        """An Open Inference Protocol body with one row."""
        width = model_width(model)
        return (
            f'{{"inputs":[{{"name":"input-0","shape":[1,{width}],"datatype":"FP64","data":[{self.row_json(model)}]}}]}}'
        )


payloads: Payloads | None = None


@events.test_start.add_listener
def _prepare(environment: Environment, **_: Any) -> None:
    """Build the payloads (every process) and warm the pool into the cache (so pool rows
    are hits) once, where the run starts: the master, or the only process.

    A worker fires test_start inside its message loop, when the master's spawn message
    arrives: a worker busy warming there reports its users late, and the master gives up
    waiting ("not all reports received from workers ... 0 total users"), which the web UI's
    Start button showed as a swarm that never ran."""
    global payloads
    options = environment.parsed_options
    assert options is not None
    mix = Mix(pool_size=options.pool_size, hit_ratio=options.hit_ratio, skew=options.skew)
    payloads = Payloads(mix, options.batch_rows)
    if environment.host and mix.hit_ratio > 0 and not isinstance(environment.runner, WorkerRunner):
        warm_pool(environment.host, payloads)


def warm_pool(host: str, prepared: Payloads) -> None:
    """POST every pool row once, in batches, so that choosing one later is a hit."""
    from geventhttpclient import URL, HTTPClient

    url = URL(host)
    client = HTTPClient(url.host, port=url.port, connection_timeout=10, network_timeout=30)
    try:
        for model, rows in prepared.pool.items():
            for start in range(0, len(rows), 500):
                body = json.dumps({"instances": rows[start : start + 500]})
                client.post(f"/v1/models/{model}:predict", body=body, headers={"Content-Type": "application/json"})
    finally:
        client.close()


def retry_after_s(value: str | None) -> float:
    """A Retry-After in seconds (a number; a date or nothing: 1 s)."""
    try:
        return min(max(float(value or 1), 0.0), 60.0)
    except ValueError:
        return 1.0


class _PredictUser(FastHttpUser):
    abstract = True
    # A refusal's Retry-After: this user waits it out before its next request, as a
    # well-behaved client does (no other wait: each user sends as fast as it is answered).
    backing_off_s = 0.0

    def wait_time(self) -> float:
        wait, self.backing_off_s = self.backing_off_s, 0.0
        return wait

    def _post(self, path: str, body: str, name: str, rows: int, v2: bool = False) -> None:
        assert payloads is not None
        with self.client.post(
            path, data=body, headers={"Content-Type": "application/json"}, name=name, catch_response=True
        ) as response:
            if response.status_code in (429, 503) and response.headers.get("Retry-After"):
                # Past capacity (or rate limited): one failure kind per status, whatever the
                # message's numbers, so a step shape shows when refusals start and how many.
                response.failure(f"refused: {response.status_code} with Retry-After")
                self.backing_off_s = retry_after_s(response.headers.get("Retry-After"))
                return
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            cache = response.headers.get("X-Cache", "")
            cache_mix[cache] += 1
            if cache not in CACHE_STATES:
                response.failure(f"X-Cache is {cache!r}")
                return
            try:
                payload = response.json()
                count = payload["outputs"][0]["shape"][0] if v2 else len(payload["predictions"])
            except (ValueError, KeyError, IndexError, TypeError):
                response.failure("response is not the expected JSON")
                return
            if count != rows:
                response.failure(f"{count} predictions for {rows} rows")


class SingleRowUser(_PredictUser):
    """One iris row per request, KServe V1."""

    @tag("single")
    @task
    def single(self) -> None:
        """V1 predict, one row."""
        assert payloads is not None
        self._post("/v1/models/iris:predict", payloads.v1("iris"), "v1 iris 1 row", 1)


class BatchUser(_PredictUser):
    """--batch-rows iris rows per request, KServe V1."""

    @tag("batch")
    @task
    def batch(self) -> None:
        """V1 predict, a batch."""
        assert payloads is not None
        rows = payloads.batch_rows
        self._post("/v1/models/iris:predict", payloads.v1("iris", rows), f"v1 iris {rows} rows", rows)


class V2InferUser(_PredictUser):
    """One iris row per request, Open Inference Protocol."""

    @tag("v2")
    @task
    def infer(self) -> None:
        """V2 infer, one row."""
        assert payloads is not None
        self._post("/v2/models/iris/infer", payloads.v2("iris"), "v2 iris infer", 1, v2=True)


class HeavyUser(_PredictUser):
    """One digits row per request: the 200-tree forest."""

    @tag("heavy")
    @task
    def heavy(self) -> None:
        """V1 predict on the heavy model."""
        assert payloads is not None
        self._post("/v1/models/digits:predict", payloads.v1("digits"), "v1 digits 1 row", 1)


class NamedColumnsUser(_PredictUser):
    """One churn row per request, as an object by column name: a Pipeline on a DataFrame."""

    @tag("named")
    @task
    def named(self) -> None:
        """V1 predict with an object instance (named, mixed-type columns)."""
        assert payloads is not None
        self._post("/v1/models/churn:predict", payloads.v1("churn"), "v1 churn 1 object", 1)


class MixUser(_PredictUser):
    """A realistic mix: mostly single rows, some batches, V2 clients, the heavy model, a
    model of named columns."""

    # Locust documents a {task: weight} dict here; its type annotation only names the list form.
    tasks = {  # type: ignore[assignment]
        SingleRowUser.single: 6,
        BatchUser.batch: 1,
        V2InferUser.infer: 2,
        HeavyUser.heavy: 1,
        NamedColumnsUser.named: 1,
    }


@events.quitting.add_listener
def _thresholds(environment: Environment, **_: Any) -> None:
    """Fail the run (exit code 1) when a threshold is crossed; print the X-Cache mix."""
    options = environment.parsed_options
    assert options is not None
    total = environment.stats.total
    problems = []
    if total.num_requests and total.fail_ratio > options.max_fail_ratio:
        problems.append(f"failure ratio {total.fail_ratio:.3%} > {options.max_fail_ratio:.3%}")
    p95 = total.get_response_time_percentile(0.95) or 0
    if options.max_p95_ms and p95 > options.max_p95_ms:
        problems.append(f"p95 {p95:.0f} ms > {options.max_p95_ms:.0f} ms")
    elapsed = max(time.time() - total.start_time, 1e-9)
    rps = total.num_requests / elapsed
    if options.min_rps and rps < options.min_rps:
        problems.append(f"{rps:.0f} requests/s < {options.min_rps:.0f}")
    print(f"X-Cache mix: {dict(cache_mix)}")
    for problem in problems:
        print(f"threshold crossed: {problem}")
    if problems:
        environment.process_exit_code = 1
