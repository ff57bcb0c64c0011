"""The errors a request can end in, one class per meaning, each with its HTTP status here
and nowhere else. Raised anywhere below the doors (no Flask, no HTTP); both doors answer
them as `{"error": message}` with `status` (service/web/envelope.py: `error_answer`).

`InputError` is the base: a request that cannot be answered as asked. Code that adds
context to an error (a column, a row) catches `InputError` and raises a `BadRequest`.
"""

from __future__ import annotations

from typing import ClassVar


class InputError(ValueError):
    """The request cannot be answered as asked; `status` is the HTTP status to answer with."""

    status: ClassVar[int] = 400

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}  # e.g. WWW-Authenticate with a 401


class BadRequest(InputError):
    """The body, a parameter or a header is malformed or out of bounds."""

    status = 400


class Unauthorized(InputError):
    """An operator route without the right token (`headers` carry WWW-Authenticate)."""

    status = 401


class NotFound(InputError):
    """No such model, version or model folder."""

    status = 404


class Conflict(InputError):
    """A change the model repository's rules refuse in its present state."""

    status = 409


class TooLarge(InputError):
    """A body over its limit, as sent or once decompressed."""

    status = 413


class UnsupportedMedia(InputError):
    """A Content-Type or Content-Encoding no protocol reads."""

    status = 415


class Refused(InputError):
    """A model version that fails its checks (sha256, model.json, loading) is not served."""

    status = 422


class Unavailable(InputError):
    """This replica cannot answer now (closing, not ready, Redis down): retry elsewhere or later."""

    status = 503


class NotAdmitted(InputError):
    """A prediction refused before any work on it: the replica's queue, the client's deadline."""

    reason: ClassVar[str] = ""


class Overloaded(NotAdmitted):
    """The replica's queue is over its target: refused before the body is read, with
    Retry-After. 429, not 503: the balancer retries a 503 on other replicas and counts it
    against the replica (max_fails), which would amplify the refusals it should spread."""

    status = 429
    reason = "overloaded"


class DeadlinePassed(NotAdmitted):
    """The client's X-Request-Timeout-Ms passed while the request waited: not computed."""

    status = 504
    reason = "deadline"


class ClientGone(NotAdmitted):
    """The client (the balancer) hung up while the request waited: not computed. 499 as
    nginx logs it; nobody reads the answer."""

    status = 499
    reason = "client_gone"
