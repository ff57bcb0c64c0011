"""Request bodies as clients send them: the content types real clients use, and gzip or
deflate compression bounded by the same byte limit as a plain body."""

from __future__ import annotations

import zlib

from service.errors import BadRequest, TooLarge, UnsupportedMedia

# No Content-Type (tritonclient.http), JSON, octet-stream (tritonclient's aio client, and
# V2 bodies with binary tensors), or a form's type: what `curl -d '{...}' URL` sends
# without -H; the body is read as JSON all the same (as Triton and KServe's Python server
# do), never form-decoded. Nothing is sniffed: anything else is a 415.
ACCEPTED_TYPES = ("", "application/json", "application/octet-stream", "application/x-www-form-urlencoded")


def check_content_type(mimetype: str) -> None:
    """A 415 unless the body's type is one real clients send for predictions."""
    if mimetype in ACCEPTED_TYPES or mimetype.endswith("+json"):
        return
    raise UnsupportedMedia(
        f"Content-Type {mimetype} is not accepted; send application/json (or no Content-Type, "
        "or application/octet-stream for binary tensors)",
    )


def decompress(body: bytes, content_encoding: str, limit: int) -> bytes:
    """The body with its Content-Encoding undone; 413 as soon as it grows past `limit` bytes."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        formats = [16 + zlib.MAX_WBITS]
    elif encoding == "deflate":
        # RFC 9110's deflate is the zlib format (what tritonclient sends); some clients send
        # raw deflate data, so that is tried second.
        formats = [zlib.MAX_WBITS, -zlib.MAX_WBITS]
    else:
        raise UnsupportedMedia(f"Content-Encoding {content_encoding} is not supported; use gzip, deflate or none")
    for wbits in formats:
        inflater = zlib.decompressobj(wbits)
        try:
            # Never more than limit + 1 bytes: a zip bomb costs what the limit allows, no more.
            out = inflater.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit or inflater.unconsumed_tail:
            raise TooLarge(f"request body is larger than {limit} bytes once decompressed")
        if not inflater.eof:
            raise BadRequest(f"{encoding} body is truncated")
        return out
    raise BadRequest(f"request body is not valid {encoding} data")
