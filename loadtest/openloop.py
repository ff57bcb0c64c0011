"""Open-loop load: every request's send time fixed in advance, whatever the server does.

A closed-loop tool (wrk, h2load, Locust users) sends a request when the previous one is
answered, so it slows down with the server and hides overload: its clients queue in
their own loop, where no latency is counted. Production traffic does not wait. Here the
requests of a run are scheduled before it starts (`rate` per second, evenly), each on an
idle keep-alive connection or a new one (never waiting for one), and each latency counts
from its scheduled time. A client gives up after `give_up_s`: that request got no answer.

One asyncio loop in one process: about 1,500 requests/s on a shared 2-core machine.
`Run.late_p99_ms` says how far behind its schedule the generator itself fell; a run whose
generator fell behind measured the generator, not the server.

    python -m loadtest.openloop --url http://127.0.0.1:8082 --model digits --rate 600 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field

from loadtest.parsers import percentile
from loadtest.payloads import fresh_row

NO_ANSWER = 0  # Outcome.status of a request that got no answer


@dataclass(frozen=True)
class Outcome:
    """One request: when it was due, how late it left, what came back and when."""

    due_s: float  # from the run's start
    late_s: float  # sent this long after it was due
    latency_s: float  # from due to the last byte of the answer (or to giving up)
    status: int  # NO_ANSWER: reset, closed, refused or given up (`failure` says which)
    failure: str = ""
    retry_after: bool = False
    json_body: bool = False


@dataclass
class Run:
    """An open-loop run's outcomes and what they add up to."""

    rate: float
    seconds: float
    objective_s: float
    outcomes: list[Outcome] = field(default_factory=list)

    def _of(self, wanted: set[int] | None = None) -> list[Outcome]:
        return [o for o in self.outcomes if (o.status in wanted if wanted else 200 <= o.status < 300)]

    def summary(self) -> dict:
        """Useful goodput (2xx within the objective, per second of schedule), p50/p99 of the
        2xx, the refusals (429/503) and their p99, the other errors and the requests with no
        answer, and how late the generator sent."""
        ok = self._of()
        refused = self._of({429, 503})
        within = [o for o in ok if o.latency_s <= self.objective_s]
        errors = [o for o in self.outcomes if o.status not in (NO_ANSWER, 429, 503) and not 200 <= o.status < 300]
        failures: dict[str, int] = {}
        for outcome in self.outcomes:
            if outcome.status == NO_ANSWER:
                failures[outcome.failure] = failures.get(outcome.failure, 0) + 1
        return {
            "offered_rps": round(self.rate, 1),
            "requests": len(self.outcomes),
            "goodput_rps": round(len(within) / self.seconds, 1),
            "ok": len(ok),
            "ok_p50_ms": _ms_at([o.latency_s for o in ok], 50),
            "ok_p99_ms": _ms_at([o.latency_s for o in ok], 99),
            "refused": len(refused),
            "refused_p50_ms": _ms_at([o.latency_s for o in refused], 50),
            "refused_p99_ms": _ms_at([o.latency_s for o in refused], 99),
            "refused_without_retry_after": sum(not o.retry_after or not o.json_body for o in refused),
            "errors": {str(s): sum(o.status == s for o in errors) for s in sorted({o.status for o in errors})},
            "no_answer": failures,
            "late_p99_ms": _ms_at([o.late_s for o in self.outcomes], 99),
        }


def _ms_at(values: Sequence[float], q: float) -> float:
    """The q-th percentile of `values` (seconds) in ms; 0 for none (JSON has no NaN)."""
    return round(percentile(values, q) * 1000, 1) if values else 0.0


class _Client:
    """Keep-alive connections to one address: an idle one if there is one, else a new one."""

    def __init__(self, url: str, path: str, headers: dict[str, str]) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        host = f"Host: {self.host}:{self.port}\r\n"
        self.head = f"POST {path} HTTP/1.1\r\n{host}Content-Type: application/json\r\n{extra}"
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def send(self, body: bytes) -> tuple[int, dict[str, str]]:
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(f"{self.head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            await self._body(reader, headers)
        except BaseException:
            writer.close()
            raise
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer))
        return status, headers

    @staticmethod
    async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if "content-length" in headers:
            return await reader.readexactly(int(headers["content-length"]))
        chunks = []
        while (size := int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)) > 0:
            chunks.append(await reader.readexactly(size + 2))
        await reader.readuntil(b"\r\n")
        return b"".join(chunks)

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def _one(client: _Client, body: bytes, due: float, start: float, give_up_s: float) -> Outcome:
    loop = asyncio.get_running_loop()
    late = loop.time() - due
    try:
        status, headers = await asyncio.wait_for(client.send(body), give_up_s - max(0.0, late))
    except TimeoutError:
        return Outcome(due - start, late, loop.time() - due, NO_ANSWER, "gave up")
    except (ConnectionError, asyncio.IncompleteReadError, OSError, ValueError, IndexError) as exc:
        return Outcome(due - start, late, loop.time() - due, NO_ANSWER, type(exc).__name__)
    return Outcome(
        due - start,
        late,
        loop.time() - due,
        status,
        retry_after="retry-after" in headers,
        json_body=headers.get("content-type", "").startswith("application/json"),
    )


async def _open_loop(
    url: str, path: str, bodies: Sequence[bytes], rate: float, seconds: float, give_up_s: float, headers: dict
) -> list[Outcome]:
    client = _Client(url, path, headers)
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.1
    tasks = []
    for i in range(int(rate * seconds)):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(_one(client, bodies[i % len(bodies)], due, start, give_up_s)))
    outcomes = list(await asyncio.gather(*tasks))
    client.close()
    return outcomes


def open_loop(
    url: str,
    path: str,
    bodies: Sequence[bytes],
    rate: float,
    seconds: float,
    objective_s: float,
    give_up_s: float = 5.0,
    headers: dict[str, str] | None = None,
) -> Run:
    """Send `rate` requests/s for `seconds`, each at its scheduled time (cycling `bodies`)."""
    outcomes = asyncio.run(_open_loop(url, path, bodies, rate, seconds, give_up_s, headers or {}))
    return Run(rate, seconds, objective_s, outcomes)


async def _closed_loop(url: str, path: str, bodies: Sequence[bytes], clients: int, seconds: float) -> int:
    ok, sent = 0, 0
    end = asyncio.get_running_loop().time() + seconds

    async def user() -> None:
        nonlocal ok, sent
        client = _Client(url, path, {})
        while asyncio.get_running_loop().time() < end:
            body = bodies[sent % len(bodies)]
            sent += 1
            status, _ = await client.send(body)
            ok += 200 <= status < 300
        client.close()

    await asyncio.gather(*(user() for _ in range(clients)))
    return ok


def capacity(url: str, path: str, bodies: Sequence[bytes], clients: int = 32, seconds: float = 5.0) -> float:
    """2xx per second of `clients` closed-loop users: the rate the cluster serves flat out."""
    return asyncio.run(_closed_loop(url, path, bodies, clients, seconds)) / seconds


def new_rows(model: str, count: int, nonce: int | None = None) -> list[bytes]:
    """`count` request bodies of one row never sent before each (no cache can answer them)."""
    nonce = int(time.time()) % 100_000 if nonce is None else nonce
    return [json.dumps({"instances": [fresh_row(model, nonce, i)]}).encode() for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8082", help="the balancer's internal listener")
    parser.add_argument("--model", default="digits")
    parser.add_argument("--rate", type=float, help="requests/s; default: --times × the measured capacity")
    parser.add_argument("--times", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--objective-ms", type=float, default=500.0)
    args = parser.parse_args()
    path = f"/v1/models/{args.model}:predict"
    bodies = new_rows(args.model, 200_000)
    rate = args.rate
    if rate is None:
        measured = capacity(args.url, path, bodies[:20_000])
        print(json.dumps({"capacity_rps": round(measured, 1)}))
        rate = measured * args.times
    run = open_loop(args.url, path, bodies[20_000:], rate, args.seconds, args.objective_ms / 1000)
    print(json.dumps(run.summary()))


if __name__ == "__main__":
    main()
