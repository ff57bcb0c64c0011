"""The contract between the data plane and the doors that call it (service/web/): what a
request must offer (`Call`) and what a prediction returns (`Answer`). The data plane
imports nothing from the web side; each door implements `Call` its own way.
"""

from __future__ import annotations

from typing import Protocol

JSON = "application/json"

# What a prediction returns: the body, its headers and the content type.
Answer = tuple[bytes, dict[str, str], str]


class Call(Protocol):
    """One request as the data plane needs it, from Flask's request or (the fast lane)
    straight from the WSGI environ."""

    request_id: str
    mimetype: str
    model_name: str  # the model the request named, once known (the metrics label)

    def header(self, name: str) -> str | None:
        """A request header, or None."""

    def raw_body(self, limit: int) -> bytes:
        """The body as sent; a 413 InputError beyond `limit` bytes."""
