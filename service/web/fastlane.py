"""The fast lane: the prediction routes served straight from the WSGI environ.

A profile of a replica under load (python -m loadtest.profile) put about a third of its
CPU in Flask's request machinery (request contexts, hooks, URL matching, response
objects) and a fifth in the prediction itself. This middleware, wrapped around the Flask
app's `wsgi_app`, answers POSTs to the prediction routes of the route table
(service.web.routes) with the data plane's handlers (service.dataplane.handlers), inside the same
request envelope as Flask's hooks (service.web.envelope). Every other request, and any other
method on these paths, goes to Flask unchanged. No Flask here.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable
from re import Pattern
from typing import Any

from service.dataplane.admission import RETRY_AFTER_S, SHED_RETRY_LOCATION, timeout_s, waited_s
from service.dataplane.contract import JSON
from service.dataplane.handlers import HANDLERS, L1_REUSE, Handler, answer_etag, unchanged
from service.dataplane.state import ServiceState
from service.errors import BadRequest, ClientGone, DeadlinePassed, InputError, NotAdmitted, Overloaded, TooLarge
from service.web import envelope
from service.web.envelope import StartResponse
from service.web.routes import PREDICTION_ROUTES, compiled

WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

# (path pattern, the route's rule: the metrics' route label, its handler)
LANES: list[tuple[Pattern[str], str, Handler]] = [
    (compiled(route), route.rule, HANDLERS[route.view]) for route in PREDICTION_ROUTES
]


class EnvironCall:
    """service.web.envelope.Call from the WSGI environ."""

    def __init__(self, environ: dict[str, Any], request_id: str) -> None:
        self.environ = environ
        self.request_id = request_id
        self.mimetype = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        self.model_name = ""

    def header(self, name: str) -> str | None:
        value = self.environ.get("HTTP_" + name.upper().replace("-", "_"))
        return str(value) if value is not None else None

    def raw_body(self, limit: int) -> bytes:
        body = self._read_body(limit)
        if peer_closed(self.environ):
            raise ClientGone("the client hung up while the request waited: not computed")
        return body

    def _read_body(self, limit: int) -> bytes:
        stream = self.environ["wsgi.input"]
        length = self.environ.get("CONTENT_LENGTH")
        if length:
            try:
                size = int(length)
            except ValueError:
                raise BadRequest("Content-Length is not a number") from None
            if size > limit:
                raise TooLarge("request body too large")
            return bytes(stream.read(size))
        data = bytes(stream.read(limit + 1))  # chunked: read to the end, no further than the limit
        if len(data) > limit:
            raise TooLarge("request body too large")
        return data


def peer_closed(environ: dict[str, Any]) -> bool:
    """Whether the client closed its side of the connection (nginx does when its own client
    gives up): the whole request has been read, so a peek finds the end of the stream."""
    raw: Any = environ.get("gunicorn.socket")
    while hasattr(raw, "_sock"):  # the worker's wrapper, then gevent's socket
        raw = raw._sock
    if not isinstance(raw, socket.socket):
        return False
    try:
        return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # open, nothing more sent
    except OSError:
        return True  # reset


def admit(current: ServiceState, environ: dict[str, Any]) -> None:
    """Refuse, before the body is read, a prediction whose client's deadline has passed or
    that the replica's queue discipline sheds (service.dataplane.admission)."""
    stamp = environ.get("HTTP_X_REQUEST_START")
    wait = waited_s(stamp)
    if stamp is not None:
        current.metrics.queue_wait.observe(wait)
    deadline = timeout_s(environ.get("HTTP_X_REQUEST_TIMEOUT_MS"))
    if deadline is not None and wait >= deadline:
        raise DeadlinePassed(
            f"deadline passed: the request waited {wait * 1000:.0f} ms of the {deadline * 1000:.0f} ms its "
            "X-Request-Timeout-Ms allowed; not computed"
        )
    if current.admission.refuse(wait):
        raise Overloaded(current.admission.describe(wait), {"Retry-After": str(RETRY_AFTER_S)})


class FastLane:
    """WSGI middleware: prediction POSTs here, everything else to `app`."""

    def __init__(self, app: WsgiApp, current: ServiceState) -> None:
        self.app = app
        self.state = current

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        path = environ.get("PATH_INFO", "")
        for pattern, rule, handler in LANES:
            match = pattern.match(path)
            if match is not None:
                groups = match.groupdict()
                name, version = groups.get("name"), groups.get("version")
                if "HTTP_IF_NONE_MATCH" in environ:
                    answered = self._not_modified(environ, start_response, rule, name, version)
                    if answered is not None:
                        return answered
                return self._serve(environ, start_response, rule, handler, name, version)
        return self.app(environ, start_response)

    def _not_modified(
        self, environ: dict[str, Any], start_response: StartResponse, rule: str, name: str | None, version: str | None
    ) -> Iterable[bytes] | None:
        """304 when the answer would carry the ETag the L1 revalidates (dataplane.unchanged);
        the body is never read. None: answer the request in full."""
        current = self.state
        if current.closing:
            return None
        started = time.perf_counter()
        name = name or current.settings.models.default_model
        model = unchanged(current, name, version, environ["HTTP_IF_NONE_MATCH"])
        if model is None:
            return None
        request_id = envelope.request_id_from(environ.get("HTTP_X_REQUEST_ID", ""))
        headers = [
            ("ETag", answer_etag(model)),
            ("Cache-Control", L1_REUSE),
            ("X-Model-Version", model.version),
            *envelope.replica_headers(current, request_id),
        ]
        envelope.observe(current, model.name, rule, 304, started)
        start_response(envelope.status_line(304), headers)
        return []

    def _serve(
        self,
        environ: dict[str, Any],
        start_response: StartResponse,
        rule: str,
        handler: Handler,
        name: str | None,
        version: str | None,
    ) -> Iterable[bytes]:
        current = self.state
        request_id, started = envelope.enter(current, environ.get("HTTP_X_REQUEST_ID", ""))
        call = EnvironCall(environ, request_id)
        admitted_at = None
        try:
            envelope.refuse_if_closing(current, environ.get("PATH_INFO", ""))
            admit(current, environ)
            admitted_at = current.admission.started()
            body, headers, content_type = handler(current, call, name, version)
            status = 200
        except Exception as exc:  # noqa: BLE001 - a JSON error; an unexpected one logged, a 500
            status, body = envelope.error_answer(exc, "POST", environ.get("PATH_INFO", ""))
            headers, content_type = (exc.headers if isinstance(exc, InputError) else {}), JSON
            if isinstance(exc, NotAdmitted):
                current.metrics.not_admitted.labels(exc.reason).inc()
                if isinstance(exc, Overloaded) and environ.get("HTTP_X_SHED_RETRY") == "1":
                    # Never processed: the balancer tries it once on the next replica. No
                    # body, so nginx keeps this keep-alive connection (a body it discards
                    # would close it).
                    body, headers = b"", {**headers, "X-Accel-Redirect": SHED_RETRY_LOCATION}
        finally:
            if admitted_at is not None:
                current.admission.finished(admitted_at)
            envelope.leave(current)
        response_headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            *headers.items(),
            *envelope.replica_headers(current, request_id),
        ]
        envelope.observe(current, call.model_name, rule, status, started)
        start_response(envelope.status_line(status), response_headers)
        return [body]
