"""The Flask door's plumbing: the model-name URL converter, JSON responses, the views'
routes from the one route table, and the request envelope (service.web.envelope) wired into
Flask's hooks and error handlers. Views stay parse → call → serialize."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from flask import Blueprint, Flask, Response, current_app, g, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import BaseConverter

from service.dataplane.contract import JSON
from service.dataplane.state import ServiceState
from service.errors import InputError
from service.models.registry import NAME_REGEX
from service.web import envelope
from service.web.routes import ROUTES


class ModelNameConverter(BaseConverter):
    """Model names and versions: no colon, so `iris:predict` splits into name and verb."""

    regex = NAME_REGEX


def state() -> ServiceState:
    """This app's state (app.extensions, never a module global)."""
    return current_app.extensions["prediction"]


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A compact JSON response."""
    return Response(orjson.dumps(payload), status=status, headers=headers, mimetype=JSON)


def request_id() -> str:
    """This request's id (the envelope's)."""
    return str(g.request_id)


def label_model(name: str) -> None:
    """Name the served model in this request's metrics (only names that exist, so the
    label set stays bounded)."""
    g.model_label = name


def add_routes(bp: Blueprint, views: dict[str, Callable[..., Response]]) -> None:
    """Register each view on the routes the table (service.web.routes) gives it."""
    unrouted = set(views) - {route.view for route in ROUTES}
    if unrouted:
        raise LookupError(f"views with no route in service.web.routes: {', '.join(sorted(unrouted))}")
    for route in ROUTES:
        if route.view in views:
            bp.add_url_rule(route.rule, route.view, views[route.view], methods=[route.method])


def install(app: Flask) -> None:
    """The converter, the envelope's hooks and the JSON error handlers; before the
    blueprints are registered (their rules use the converter)."""
    app.url_map.converters["model"] = ModelNameConverter
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.teardown_request(_end_request)
    app.register_error_handler(InputError, _input_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)


def _start_request() -> None:
    current = state()
    g.request_id, g.started = envelope.enter(current, request.headers.get("X-Request-ID", ""))
    envelope.refuse_if_closing(current, request.path)


def _finish_request(response: Response) -> Response:
    current = state()
    for header, value in envelope.replica_headers(current, g.get("request_id", "")):
        response.headers[header] = value
    started = g.get("started")
    if started is not None:
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        envelope.observe(current, g.get("model_label", ""), rule, response.status_code, started)
    return response


def _end_request(_exc: BaseException | None) -> None:
    if g.get("started") is not None:
        envelope.leave(state())


def _error(status: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status=status, headers=headers, mimetype=JSON)


def _input_error(exc: InputError) -> Response:
    return _error(*envelope.error_answer(exc, request.method, request.path), exc.headers)


def _http_error(exc: HTTPException) -> Response:
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    message = {
        404: "not found: no such route",
        405: f"method {request.method} not allowed here",
        413: "request body too large",
    }.get(exc.code or 500, exc.description or exc.name)
    return _error(exc.code or 500, envelope.error_body(message), headers)


def _unexpected_error(exc: Exception) -> Response:
    return _error(*envelope.error_answer(exc, request.method, request.path))
