"""Parsers for what the load generators and nginx print: pure functions, tested on captures."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from loadtest.results import AccessLog, WrkNumbers

H2LOAD_REQUESTS = re.compile(
    r"requests: (?P<total>\d+) total, (?P<started>\d+) started, (?P<done>\d+) done, "
    r"(?P<succeeded>\d+) succeeded, (?P<failed>\d+) failed, (?P<errored>\d+) errored, (?P<timeout>\d+) timeout"
)
H2LOAD_CODES = re.compile(r"status codes: (?P<s2xx>\d+) 2xx, (?P<s3xx>\d+) 3xx, (?P<s4xx>\d+) 4xx, (?P<s5xx>\d+) 5xx")
H2LOAD_FINISHED = re.compile(r"finished in (?P<seconds>[\d.]+)(?P<unit>us|ms|s), (?P<rps>[\d.]+) req/s")
SECONDS_PER_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def parse_h2load(output: str) -> dict[str, Any]:
    """Totals, status classes and throughput from h2load's summary."""
    requests, codes, finished = (p.search(output) for p in (H2LOAD_REQUESTS, H2LOAD_CODES, H2LOAD_FINISHED))
    if not (requests and codes and finished):
        raise ValueError("not an h2load summary (no 'requests:', 'status codes:' or 'finished in' line)")
    seconds = float(finished["seconds"]) * SECONDS_PER_UNIT[finished["unit"]]
    result: dict[str, Any] = {k: int(v) for k, v in {**requests.groupdict(), **codes.groupdict()}.items()}
    result.update(seconds=seconds, rps=float(finished["rps"]))
    return result


def parse_h2load_log(text: str) -> dict[str, Any]:
    """Latency percentiles (ms) and statuses from h2load's --log-file (start µs, status, duration µs)."""
    durations_ms: list[float] = []
    statuses: Counter[str] = Counter()
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        _, status, duration_us = parts
        statuses[status] += 1
        durations_ms.append(int(duration_us) / 1000)
    return {
        "requests": len(durations_ms),
        "statuses": dict(statuses),
        "p50_ms": percentile(durations_ms, 50),
        "p90_ms": percentile(durations_ms, 90),
        "p99_ms": percentile(durations_ms, 99),
        "max_ms": max(durations_ms) if durations_ms else math.nan,
    }


def comma_ints(text: str) -> tuple[int, ...]:
    """A command-line list such as `1,8,32`."""
    return tuple(int(x) for x in text.split(","))


def comma_floats(text: str) -> tuple[float, ...]:
    """A command-line list such as `0,0.9,1`."""
    return tuple(float(x) for x in text.split(","))


# Statuses that say "not now, retry later" (with Retry-After): the rate limiter, a replica
# past capacity, a replica closing.
REFUSALS = ("429", "503")


def parse_wrk(output: str) -> WrkNumbers:
    """The JSON line loadtest/wrk_mix.lua prints, with latencies in ms and requests/s."""
    for line in output.splitlines():
        if line.startswith("WRKJSON "):
            raw = json.loads(line[len("WRKJSON ") :])
            break
    else:
        raise ValueError("no WRKJSON line in wrk's output")
    seconds = raw["duration_us"] / 1e6
    latency = raw["latency_us"]
    statuses = {str(k): v for k, v in raw["statuses"].items()}
    errors = raw["errors"]
    answered = sum(v for k, v in statuses.items() if k.startswith("2"))
    return {
        "requests": raw["requests"],
        "seconds": seconds,
        # Throughput is what was answered: a refusal (a 429 of the rate limiter, a replica
        # shedding load) or an error is no work done, however fast it came back.
        "rps": answered / seconds if seconds else 0.0,
        "sent_rps": raw["requests"] / seconds if seconds else 0.0,
        "refused": sum(v for k, v in statuses.items() if k in REFUSALS),
        "p50_ms": latency["p50"] / 1000,
        "p90_ms": latency["p90"] / 1000,
        "p99_ms": latency["p99"] / 1000,
        "max_ms": latency["max"] / 1000,
        "statuses": statuses,
        "socket_errors": errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        "non_2xx": sum(v for k, v in statuses.items() if not k.startswith("2")),
        "cache": raw["cache"],
        "served_by": raw["served_by"],
    }


def parse_locust_stats(text: str) -> list[dict[str, Any]]:
    """Rows of Locust's <prefix>_stats.csv: name, requests, failures, rps, percentiles (ms)."""
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        rows.append(
            {
                "type": row["Type"],
                "name": row["Name"],
                "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
                "rps": float(row["Requests/s"]),
                "median_ms": float(row["Median Response Time"]),
                "p90_ms": float(row["90%"]),
                "p99_ms": float(row["99%"]),
                "max_ms": float(row["Max Response Time"]),
            }
        )
    return rows


def _float(value: str) -> float | None:
    # nginx joins several upstream tries with ", " and writes "-" for none: take the last.
    last = value.split(",")[-1].strip()
    try:
        return float(last)
    except ValueError:
        return None


def summarize_access_log(lines: Iterable[str]) -> AccessLog:
    """Client time vs upstream time (ms), statuses, X-Cache and replicas from the JSON access log."""
    request_ms: list[float] = []
    upstream_ms: list[float] = []
    statuses: Counter[str] = Counter()
    served: Counter[str] = Counter()
    l1: Counter[str] = Counter()
    retried = 0
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        statuses[str(entry["status"])] += 1
        request_ms.append(float(entry["request_time"]) * 1000)
        upstream = _float(entry.get("upstream_response_time", ""))
        if upstream is not None:
            upstream_ms.append(upstream * 1000)
        served[entry.get("served_by") or "nginx"] += 1
        retried += "," in entry.get("upstream_addr", "")
        l1[entry.get("l1") or "-"] += 1
    return {
        "requests": len(request_ms),
        "statuses": dict(statuses),
        "served_by": dict(served),
        "retried": retried,
        "l1": dict(l1),  # $upstream_cache_status: HIT (nginx answered), MISS, EXPIRED, BYPASS, - (not cached route)
        "nginx_p50_ms": percentile(request_ms, 50),
        "nginx_p99_ms": percentile(request_ms, 99),
        "upstream_p50_ms": percentile(upstream_ms, 50),
        "upstream_p99_ms": percentile(upstream_ms, 99),
    }


def parse_stub_status(text: str) -> dict[str, int]:
    """nginx's stub_status page as numbers."""
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    if len(numbers) != 7:
        raise ValueError("not a stub_status page")
    active, accepts, handled, requests, reading, writing, waiting = numbers
    return {
        "active": active,
        "accepts": accepts,
        "handled": handled,
        "requests": requests,
        "reading": reading,
        "writing": writing,
        "waiting": waiting,
    }
