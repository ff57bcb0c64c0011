"""The request envelope: what every request gets, whichever door it came in by.

Both doors (Flask's hooks in service.web.http, the fast lane in service.web.fastlane) call these,
so the behaviour is written once: the request id (the caller's X-Request-ID if well
formed, else a new one), the 503 while the replica closes, X-Request-ID and X-Served-By
on every answer, JSON errors, the in-flight gauge and the request metrics. No Flask here.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import orjson

from service.dataplane.state import ServiceState
from service.errors import InputError, Unavailable

log = logging.getLogger(__name__)

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
SHUTTING_DOWN = "replica shutting down: retry on another replica"
INTERNAL_ERROR = "internal error"
REASONS = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}

StartResponse = Callable[..., Any]


def request_id_from(incoming: str) -> str:
    """`incoming` (an X-Request-ID header) if well-formed, else a new id."""
    return incoming if REQUEST_ID_PATTERN.match(incoming) else uuid.uuid4().hex


def enter(current: ServiceState, incoming_request_id: str) -> tuple[str, float]:
    """A request begins: counted in flight (`leave` ends that); its id and start time."""
    current.metrics.in_flight.inc()
    return request_id_from(incoming_request_id), time.perf_counter()


def refuse_if_closing(current: ServiceState, path: str) -> None:
    """After the drain delay every request but /healthz gets a 503: the balancer retries it
    on another replica and stops choosing this one."""
    if current.closing and path != "/healthz":
        raise Unavailable(SHUTTING_DOWN)


def leave(current: ServiceState) -> None:
    """A request is no longer in flight."""
    current.metrics.in_flight.dec()


def observe(current: ServiceState, model: str, rule: str, status: int, started: float) -> None:
    """The request metrics: the model it named (or ""), its route rule, status and time."""
    current.metrics.observe_request(model, rule, status, time.perf_counter() - started)


def replica_headers(current: ServiceState, request_id: str) -> list[tuple[str, str]]:
    """The headers every answer carries: its request id and the replica that answered."""
    return [("X-Request-ID", request_id), ("X-Served-By", current.settings.server.replica_id)]


def error_body(message: str) -> bytes:
    """A JSON error: {"error": message}."""
    return orjson.dumps({"error": message})


def error_answer(exc: BaseException, method: str, path: str) -> tuple[int, bytes]:
    """The status and JSON body of a request that failed: an InputError says its own; any
    other error is a 500 whose stack trace goes to the log only."""
    if isinstance(exc, InputError):
        return exc.status, error_body(str(exc))
    log.error("unhandled error on %s %s", method, path, exc_info=exc)
    return 500, error_body(INTERNAL_ERROR)


def status_line(status: int) -> str:
    """The WSGI status line of `status`."""
    return REASONS.get(status, f"{status} Error")
