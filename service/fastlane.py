"""The fast lane: the prediction routes served straight from the WSGI environ.

A profile of a replica under load (python -m loadtest.profile) put about a third of its
CPU in Flask's request machinery (request contexts, hooks, URL matching, response
objects) and a fifth in the prediction itself. This middleware, wrapped around the Flask
app's `wsgi_app`, answers POSTs to the four prediction routes with the same view
functions (service.api's predict_*) and does what the Flask hooks do for them: the
request id, the 503 while the replica closes, X-Served-By, JSON errors, the request
metrics (same labels). Every other request, and any other method on these paths, goes
to Flask unchanged.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

import orjson

from service.api import JSON, L1_REUSE, Answer, answer_etag, predict_shortcut, predict_v1, predict_v2, unchanged
from service.http import request_id_from
from service.models import NAME_REGEX
from service.state import ServiceState
from service.validation import InputError

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

# (path pattern, the Flask rule it stands for: the metrics' route label, the model and
# version a match names, the handler of that model and version)
ROUTES: list[tuple[re.Pattern[str], str, Callable[..., tuple[str, str | None]], Callable[..., Answer]]] = [
    (
        re.compile(f"^/v1/models/({NAME_REGEX}):predict$"),
        "/v1/models/<model:name>:predict",
        lambda st, m: (m.group(1), None),
        lambda st, call, name, version: predict_v1(st, call, name),
    ),
    (
        re.compile(f"^/v2/models/({NAME_REGEX})/infer$"),
        "/v2/models/<model:name>/infer",
        lambda st, m: (m.group(1), None),
        predict_v2,
    ),
    (
        re.compile(f"^/v2/models/({NAME_REGEX})/versions/({NAME_REGEX})/infer$"),
        "/v2/models/<model:name>/versions/<model:version>/infer",
        lambda st, m: (m.group(1), m.group(2)),
        predict_v2,
    ),
    (
        re.compile("^/predict$"),
        "/predict",
        lambda st, m: (st.settings.models.default_model, None),
        lambda st, call, name, version: predict_shortcut(st, call),
    ),
]
REASONS = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}


class EnvironCall:
    """service.api.Call from the WSGI environ."""

    def __init__(self, environ: dict[str, Any], request_id: str) -> None:
        self.environ = environ
        self.request_id = request_id
        self.mimetype = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        self.model_name = ""

    def header(self, name: str) -> str | None:
        value = self.environ.get("HTTP_" + name.upper().replace("-", "_"))
        return str(value) if value is not None else None

    def raw_body(self, limit: int) -> bytes:
        stream = self.environ["wsgi.input"]
        length = self.environ.get("CONTENT_LENGTH")
        if length:
            try:
                size = int(length)
            except ValueError:
                raise InputError("Content-Length is not a number") from None
            if size > limit:
                raise InputError("request body too large", 413)
            return bytes(stream.read(size))
        data = bytes(stream.read(limit + 1))  # chunked: read to the end, no further than the limit
        if len(data) > limit:
            raise InputError("request body too large", 413)
        return data


class FastLane:
    """WSGI middleware: prediction POSTs here, everything else to `app`."""

    def __init__(self, app: WsgiApp, current: ServiceState) -> None:
        self.app = app
        self.state = current

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        path = environ.get("PATH_INFO", "")
        for pattern, rule, names, handler in ROUTES:
            match = pattern.match(path)
            if match is not None:
                name, version = names(self.state, match)
                if "HTTP_IF_NONE_MATCH" in environ:
                    answered = self._not_modified(environ, start_response, rule, name, version)
                    if answered is not None:
                        return answered
                return self._serve(environ, start_response, rule, handler, name, version)
        return self.app(environ, start_response)

    def _not_modified(
        self, environ: dict[str, Any], start_response: StartResponse, rule: str, name: str, version: str | None
    ) -> Iterable[bytes] | None:
        """304 when the answer would carry the ETag the L1 revalidates (service.api.unchanged);
        the body is never read. None: answer the request in full."""
        current = self.state
        if current.closing:
            return None
        started = time.perf_counter()
        model = unchanged(current, name, version, environ["HTTP_IF_NONE_MATCH"])
        if model is None:
            return None
        headers = [
            ("ETag", answer_etag(model)),
            ("Cache-Control", L1_REUSE),
            ("X-Model-Version", model.version),
            ("X-Request-ID", request_id_from(environ.get("HTTP_X_REQUEST_ID", ""))),
            ("X-Served-By", current.settings.server.replica_id),
        ]
        current.metrics.observe_request(model.name, rule, 304, time.perf_counter() - started)
        start_response(REASONS[304], headers)
        return []

    def _serve(
        self,
        environ: dict[str, Any],
        start_response: StartResponse,
        rule: str,
        handler: Callable[..., Answer],
        name: str,
        version: str | None,
    ) -> Iterable[bytes]:
        current = self.state
        started = time.perf_counter()
        metrics = current.metrics
        metrics.in_flight.inc()
        request_id = request_id_from(environ.get("HTTP_X_REQUEST_ID", ""))
        call = EnvironCall(environ, request_id)
        try:
            if current.closing:
                raise InputError("replica shutting down: retry on another replica", 503)
            body, headers, content_type = handler(current, call, name, version)
            status = 200
        except InputError as exc:
            status, body, headers, content_type = exc.status, orjson.dumps({"error": str(exc)}), {}, JSON
        except Exception:  # noqa: BLE001 - a JSON 500, the stack trace in the log only
            log.exception("unhandled error on POST %s", environ.get("PATH_INFO", ""))
            status, body, headers, content_type = 500, orjson.dumps({"error": "internal error"}), {}, JSON
        finally:
            metrics.in_flight.dec()
        response_headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            *headers.items(),
            ("X-Request-ID", request_id),
            ("X-Served-By", current.settings.server.replica_id),
        ]
        metrics.observe_request(call.model_name, rule, status, time.perf_counter() - started)
        start_response(REASONS.get(status, f"{status} Error"), response_headers)
        return [body]
