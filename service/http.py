"""The HTTP plumbing the REST blueprint wires into its app: the model-name URL converter,
JSON responses and errors, and the one place that sets the request id, the replica's
headers and the metric labels of every request. Views stay parse → call → serialize."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

import orjson
from flask import Blueprint, Response, current_app, g, request
from flask.sansio.blueprints import BlueprintSetupState
from werkzeug.exceptions import HTTPException
from werkzeug.routing import BaseConverter

from service.models import NAME_REGEX
from service.state import ServiceState
from service.validation import InputError

log = logging.getLogger(__name__)

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class ModelNameConverter(BaseConverter):
    """Model names and versions: no colon, so `iris:predict` splits into name and verb."""

    regex = NAME_REGEX


def state() -> ServiceState:
    """This app's state (app.extensions, never a module global)."""
    return current_app.extensions["prediction"]


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A compact JSON response."""
    return Response(orjson.dumps(payload), status=status, headers=headers, mimetype="application/json")


def request_id() -> str:
    """The caller's X-Request-ID if well-formed, else one made for this request."""
    return str(g.request_id)


def request_id_from(incoming: str) -> str:
    """`incoming` (an X-Request-ID header) if well-formed, else a new id."""
    return incoming if REQUEST_ID_PATTERN.match(incoming) else uuid.uuid4().hex


def label_model(name: str) -> None:
    """Name the served model in this request's metrics (only names that exist, so the
    label set stays bounded)."""
    g.model_label = name


def wire(bp: Blueprint) -> None:
    """Register the converter, hooks and error handlers on `bp`; call before its routes."""
    bp.record_once(_register_converter)
    bp.before_app_request(_start_request)
    bp.after_app_request(_finish_request)
    bp.teardown_app_request(_end_request)
    bp.app_errorhandler(InputError)(_input_error)
    bp.app_errorhandler(HTTPException)(_http_error)
    bp.app_errorhandler(Exception)(_unexpected_error)


def _register_converter(setup: BlueprintSetupState) -> None:
    setup.app.url_map.converters["model"] = ModelNameConverter


def _start_request() -> None:
    g.started = time.perf_counter()
    state().metrics.in_flight.inc()
    g.request_id = request_id_from(request.headers.get("X-Request-ID", ""))
    if state().closing and request.path != "/healthz":
        # The balancer retries a 503 on another replica and stops choosing this one.
        raise InputError("replica shutting down: retry on another replica", 503)


def _finish_request(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.get("request_id", "")
    response.headers["X-Served-By"] = state().settings.server.replica_id
    started = g.get("started")
    if started is not None:
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        elapsed = time.perf_counter() - started
        state().metrics.observe_request(g.get("model_label", ""), rule, response.status_code, elapsed)
    return response


def _end_request(_exc: BaseException | None) -> None:
    if g.get("started") is not None:
        state().metrics.in_flight.dec()


def _input_error(exc: InputError) -> Response:
    return json_response({"error": str(exc)}, exc.status)


def _http_error(exc: HTTPException) -> Response:
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    message = {
        404: "not found: no such route",
        405: f"method {request.method} not allowed here",
        413: "request body too large",
    }.get(exc.code or 500, exc.description or exc.name)
    return json_response({"error": message}, exc.code or 500, headers)


def _unexpected_error(exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.path)
    return json_response({"error": "internal error"}, 500)
