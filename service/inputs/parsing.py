"""Validation shared by every protocol (service/dataplane/protocols/) and by the typed columns:
strict JSON, rows of numbers, bounded batches.

Pure functions with no Flask: what is wrong is raised as an error of service/errors.py
(a BadRequest, a TooLarge), which the doors answer as JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

import numpy as np
import orjson

from service.errors import BadRequest, TooLarge

V2_DATATYPES = {
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
}


def fail(message: str) -> NoReturn:
    """Raise a BadRequest (400)."""
    raise BadRequest(message)


class NonFinite:
    """A NaN, Infinity or -Infinity the body held where JSON allows none: kept as a marker,
    so that the validator that meets it can say where it was (a column and a row)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8 only, bounded nesting, numbers a 64-bit float holds, strings UTF-8
    can carry; a NaN or Infinity becomes a NonFinite marker, which no validator accepts as a
    number. Every value that comes back is one orjson gives: the rest of the service never
    meets an integer of 400 digits or a lone surrogate, whichever parser read the body."""
    if not body:
        fail("request body is empty; send a JSON object")
    try:
        return orjson.loads(body)  # fast, and as strict as we are
    except orjson.JSONDecodeError:
        pass  # bad input is rare: the standard library says precisely what is wrong
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        fail(f"request body is not valid UTF-8 (byte {exc.start})")
    try:
        parsed = json.loads(text, parse_constant=NonFinite, parse_int=_json_int, parse_float=_json_float)
    except RecursionError:
        fail("JSON nested too deeply")
    except json.JSONDecodeError as exc:
        fail(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    _refuse_lone_surrogates(parsed)
    return parsed


# Integers orjson keeps as integers; beyond them it gives a float, as _json_int does.
_INT_RANGE = (-(2**63), 2**64 - 1)
# More digits than any finite float64 has (the largest is 309 digits long).
_MAX_NUMBER_CHARS = 400


def _json_float(text: str) -> float:
    """A JSON number with a fraction or exponent, as orjson reads it: a finite float64."""
    if len(text) > _MAX_NUMBER_CHARS:
        fail(f"a number in the body is too large (over {_MAX_NUMBER_CHARS} characters); send 64-bit floats")
    value = float(text)
    if not math.isfinite(value):
        fail(f"a number in the body is too large for a 64-bit float ({text[:20]}...)")
    return value


def _json_int(text: str) -> int | float:
    """A JSON integer as orjson reads it: an int within 64 bits, else a finite float64."""
    if len(text) > _MAX_NUMBER_CHARS:
        fail(f"a number in the body is too large (over {_MAX_NUMBER_CHARS} characters); send 64-bit floats")
    value = int(text)
    if _INT_RANGE[0] <= value <= _INT_RANGE[1]:
        return value
    return _json_float(text)


def _refuse_lone_surrogates(parsed: Any) -> None:
    """A 400 if a string (or an object's key) holds a UTF-16 surrogate escape without its
    pair ("\\ud800"): JSON's escapes allow one, UTF-8 cannot carry it, so nothing that
    writes it out again (a response, a log, a cache key) could."""
    stack = [parsed]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str:
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as exc:
                    fail(f"a string in the body holds a lone UTF-16 surrogate (\\u{ord(item[exc.start]):04x})")
        elif kind is list:
            stack.extend(item)
        elif kind is dict:
            stack.extend(item)
            stack.extend(item.values())


def type_name(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if type(value) is NonFinite:
        return str(value)
    return {bool: "boolean", str: "string", dict: "object", list: "array"}.get(type(value), type(value).__name__)


def check_rows_count(count: int, max_rows: int, where: str) -> None:
    """At least one row, at most max_rows (413 above)."""
    if count == 0:
        fail(f"{where} is empty; send at least one row")
    if count > max_rows:
        raise TooLarge(f"{where} has {count} rows; at most {max_rows} are allowed")


def to_float64(rows: list[Any], where: str) -> np.ndarray:
    """A float64 array of finite numbers, or a 400."""
    try:
        matrix = np.array(rows, dtype=np.float64)
    except OverflowError:
        fail(f"{where}: a number is too large for a 64-bit float")
    if not np.isfinite(matrix).all():
        fail(f"{where}: numbers must be finite (one is too large for a 64-bit float)")
    return matrix


def rows_from_instances(instances: Any, width: int, max_rows: int, where: str = "instances") -> np.ndarray:
    """Validate a list of rows of `width` numbers and return them as a float64 matrix."""
    if type(instances) is not list:
        fail(f"'{where}' must be an array of rows, got {type_name(instances)}")
    check_rows_count(len(instances), max_rows, f"'{where}'")
    for i, row in enumerate(instances):
        if type(row) is not list:
            fail(f"{where}[{i}] must be an array of {width} numbers, got {type_name(row)}")
        if len(row) != width:
            fail(f"{where}[{i}] has {len(row)} values; the model expects {width}")
        for j, value in enumerate(row):
            kind = type(value)
            if kind is not float and kind is not int:
                fail(f"{where}[{i}][{j}] must be a number, got {type_name(value)}")
    return to_float64(instances, where)


def body_object(payload: Any) -> dict[str, Any]:
    """The request's top-level JSON object."""
    if type(payload) is not dict:
        fail(f"request body must be a JSON object, got {type_name(payload)}")
    return payload


def flatten(data: Any, where: str) -> list[Any]:
    """Row-major flattening of nested arrays (the protocol allows flat or nested data)."""
    flat: list[Any] = []
    stack = [iter([data])]
    depth_limit = 8
    while stack:
        for item in stack[-1]:
            if type(item) is list:
                if len(stack) > depth_limit:
                    fail(f"{where} is nested deeper than {depth_limit} levels")
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat
