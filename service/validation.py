"""Request validation for every protocol: bytes in, a float64 row matrix out, or InputError.

Pure functions with no Flask: the REST layer maps InputError to a JSON error response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import orjson

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
V2_NUMERIC = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}
_INT_BOUNDS = {"INT32": (-(2**31), 2**31 - 1), "INT64": (-(2**63), 2**63 - 1)}


class InputError(ValueError):
    """The request is wrong; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _fail(message: str) -> NoReturn:
    raise InputError(message)


def _reject_constant(name: str) -> NoReturn:
    _fail(f"{name} is not a valid JSON number; send finite numbers only")


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity, bounded nesting."""
    if not body:
        _fail("request body is empty; send a JSON object")
    try:
        return orjson.loads(body)  # fast, and as strict as we are
    except orjson.JSONDecodeError:
        pass  # bad input is rare: the standard library says precisely what is wrong
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(f"request body is not valid UTF-8 (byte {exc.start})")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        _fail("JSON nested too deeply")
    except json.JSONDecodeError as exc:
        _fail(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", str: "string", dict: "object", list: "array"}.get(type(value), type(value).__name__)


def _check_rows_count(count: int, max_rows: int, where: str) -> None:
    if count == 0:
        _fail(f"{where} is empty; send at least one row")
    if count > max_rows:
        raise InputError(f"{where} has {count} rows; at most {max_rows} are allowed", 413)


def _to_float64(rows: list[Any], where: str) -> np.ndarray:
    try:
        matrix = np.array(rows, dtype=np.float64)
    except OverflowError:
        _fail(f"{where}: a number is too large for a 64-bit float")
    if not np.isfinite(matrix).all():
        _fail(f"{where}: numbers must be finite (one is too large for a 64-bit float)")
    return matrix


def rows_from_instances(instances: Any, width: int, max_rows: int, where: str = "instances") -> np.ndarray:
    """Validate a list of rows of `width` numbers and return them as a float64 matrix."""
    if type(instances) is not list:
        _fail(f"'{where}' must be an array of rows, got {_type_name(instances)}")
    _check_rows_count(len(instances), max_rows, f"'{where}'")
    for i, row in enumerate(instances):
        if type(row) is not list:
            _fail(f"{where}[{i}] must be an array of {width} numbers, got {_type_name(row)}")
        if len(row) != width:
            _fail(f"{where}[{i}] has {len(row)} values; the model expects {width}")
        for j, value in enumerate(row):
            kind = type(value)
            if kind is not float and kind is not int:
                _fail(f"{where}[{i}][{j}] must be a number, got {_type_name(value)}")
    return _to_float64(instances, where)


def body_object(payload: Any) -> dict[str, Any]:
    """The request's top-level JSON object."""
    if type(payload) is not dict:
        _fail(f"request body must be a JSON object, got {_type_name(payload)}")
    return payload


def rows_from_v1(payload: Any, width: int, max_rows: int) -> np.ndarray:
    """KServe V1 / TF-Serving row format: {"instances": [[...], ...]}."""
    body = body_object(payload)
    if "instances" not in body:
        _fail("missing 'instances': send {\"instances\": [[...], ...]}")
    return rows_from_instances(body["instances"], width, max_rows)


def rows_from_shortcut(payload: Any, width: int, max_rows: int) -> np.ndarray:
    """The tutorials' /predict: {"features": [...]} (one row) or {"instances": [[...]]}."""
    body = body_object(payload)
    if "features" in body:
        return rows_from_instances([body["features"]], width, max_rows, "features")
    if "instances" in body:
        return rows_from_instances(body["instances"], width, max_rows)
    _fail('send {"features": [...]} for one row or {"instances": [[...], ...]}')


@dataclass(frozen=True)
class V2Request:
    """A validated Open Inference Protocol inference request."""

    rows: np.ndarray
    request_id: str | None
    outputs: tuple[str, ...] | None


def _flatten(data: Any, where: str) -> list[Any]:
    """Row-major flattening of nested arrays (the protocol allows flat or nested data)."""
    flat: list[Any] = []
    stack = [iter([data])]
    depth_limit = 8
    while stack:
        for item in stack[-1]:
            if type(item) is list:
                if len(stack) > depth_limit:
                    _fail(f"{where} is nested deeper than {depth_limit} levels")
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def parse_v2(payload: Any, width: int, max_rows: int, output_names: tuple[str, ...]) -> V2Request:
    """Validate an Open Inference Protocol `infer` body for a model of `width` features."""
    body = body_object(payload)
    request_id = body.get("id")
    if request_id is not None and type(request_id) is not str:
        _fail(f"'id' must be a string, got {_type_name(request_id)}")
    if "parameters" in body and type(body["parameters"]) is not dict:
        _fail("'parameters' must be an object")
    inputs = body.get("inputs")
    if type(inputs) is not list or not inputs:
        _fail("'inputs' must be a non-empty array of tensors")
    if len(inputs) != 1:
        _fail(f"the model takes one input tensor of shape [N, {width}], got {len(inputs)} tensors")
    tensor = inputs[0]
    if type(tensor) is not dict:
        _fail(f"inputs[0] must be an object, got {_type_name(tensor)}")
    for key in ("name", "shape", "datatype", "data"):
        if key not in tensor:
            _fail(f"inputs[0] is missing '{key}'")
    if type(tensor["name"]) is not str:
        _fail("inputs[0].name must be a string")
    datatype = tensor["datatype"]
    if type(datatype) is not str or datatype not in V2_DATATYPES:
        _fail(f"inputs[0].datatype {datatype!r} is not an Open Inference Protocol datatype")
    if datatype not in V2_NUMERIC:
        _fail(f"inputs[0].datatype {datatype} is not supported; use one of {sorted(V2_NUMERIC)}")
    shape = tensor["shape"]
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        _fail("inputs[0].shape must be an array of non-negative integers")
    if len(shape) != 2 or shape[1] != width:
        _fail(f"inputs[0].shape is {shape}; the model expects [N, {width}]")
    _check_rows_count(shape[0], max_rows, "inputs[0]")
    flat = _flatten(tensor["data"], "inputs[0].data")
    if len(flat) != shape[0] * width:
        _fail(f"inputs[0].data has {len(flat)} values but shape {shape} needs {shape[0] * width}")
    integral = datatype in _INT_BOUNDS
    for i, value in enumerate(flat):
        kind = type(value)
        if kind is int:
            if integral:
                low, high = _INT_BOUNDS[datatype]
                if not low <= value <= high:
                    _fail(f"inputs[0].data[{i}] is out of range for {datatype}")
        elif kind is float and not integral:
            continue
        else:
            expected = "an integer" if integral else "a number"
            _fail(f"inputs[0].data[{i}] must be {expected} for {datatype}, got {_type_name(value)}")
    matrix = _to_float64(flat, "inputs[0].data").reshape(shape[0], width)
    if datatype == "FP32":
        with np.errstate(over="ignore"):
            narrowed = matrix.astype(np.float32)
        if not np.isfinite(narrowed).all():
            _fail("inputs[0].data: a number is too large for FP32")
        matrix = narrowed.astype(np.float64)
    outputs = body.get("outputs")
    names: tuple[str, ...] | None = None
    if outputs is not None:
        if type(outputs) is not list or not all(type(o) is dict and type(o.get("name")) is str for o in outputs):
            _fail("'outputs' must be an array of objects with a string 'name'")
        names = tuple(o["name"] for o in outputs)
        unknown = [n for n in names if n not in output_names]
        if unknown:
            _fail(f"unknown output {unknown[0]!r}; this model has {list(output_names)}")
    return V2Request(matrix, request_id, names)
