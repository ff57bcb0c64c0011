"""nginx's JSON access log: read once complete, and which requests were retried or dropped."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from balancer.render import access_log_settle_s

# nginx writes its access log in blocks (BALANCER_ACCESS_LOG_BUFFER): the log holds a
# request's line this long after its answer.
ACCESS_LOG_SETTLE_S = access_log_settle_s()


def access_log(path: Path) -> list[dict]:
    """nginx's JSON access log once every request answered so far is in it; complete lines
    only (nginx may be writing the last one)."""
    time.sleep(ACCESS_LOG_SETTLE_S)
    text = path.read_text()
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return [json.loads(line) for line in lines]


def upstream_attempts(line: Mapping) -> list[tuple[str, str, str]]:
    """The attempts of one JSON access-log line: (address, status, connect time) each.
    nginx separates attempts with ", " and internal redirects (our @next_attempt) with " : "."""

    def split(value: str) -> list[str]:
        return [part.strip() for part in value.replace(" : ", ", ").split(",")]

    fields = (split(line["upstream_addr"]), split(line["upstream_status"]), split(line["upstream_connect_time"]))
    return list(zip(*fields, strict=False))


def dropped_by(lines: Sequence[Mapping], addresses: set[str]) -> list[Mapping]:
    """Access-log lines whose request reached one of `addresses` (`host:port`) and failed
    there: nginx had connected (a refused connection has connect time "-" and sent nothing)
    and got no answer or a 502/504. A draining replica must never do this; nginx retrying
    such a request elsewhere would hide it from the client."""
    return [
        line
        for line in lines
        if any(
            address in addresses and connect != "-" and status in {"502", "504", "-"}
            for address, status, connect in upstream_attempts(line)
        )
    ]
