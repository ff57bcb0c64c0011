"""The Open Inference Protocol (KServe V2 REST) `infer` call, with JSON tensors and with
Triton's binary tensor data extension (what tritonclient sends by default).

A binary request is a JSON header of `Inference-Header-Content-Length` bytes followed by
the tensors' bytes, in input order; an input says it is binary with the parameter
`binary_data_size`. Outputs come back binary when the request asks (`binary_data_output`
for all, or an output's `binary_data`): little-endian, row major; a BYTES element is a
4-byte little-endian length and the bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from service.validation import (
    V2_DATATYPES,
    body_object,
    check_rows_count,
    fail,
    flatten,
    parse_json,
    to_float64,
    type_name,
)

EXTENSION = "binary_tensor_data"
HEADER_LENGTH = "Inference-Header-Content-Length"
# The input datatypes a row of features may come in, JSON or binary (little-endian).
NUMERIC: dict[str, np.dtype] = {
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
}
_INT_BOUNDS = {"INT32": (-(2**31), 2**31 - 1), "INT64": (-(2**63), 2**63 - 1)}


@dataclass(frozen=True)
class V2Request:
    """A validated inference request: the rows, the caller's id, which outputs and how."""

    rows: np.ndarray
    request_id: str | None
    outputs: tuple[str, ...] | None  # None: every output
    binary_outputs: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Tensor:
    """One output tensor of a response."""

    name: str
    datatype: str
    shape: list[int]
    data: list[Any] = field(repr=False)


def _header_and_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes | None]:
    if header_length is None:
        return body, None
    digits = header_length.strip()
    # ASCII digits only ("²".isdigit() is true, and int() refuses it), and few enough that
    # int() converts them (it refuses more than 4,300 digits).
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 18):
        fail(f"{HEADER_LENGTH} must be a byte count, got {header_length[:40]!r}")
    length = int(digits)
    if not 0 < length <= len(body):
        fail(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes")
    return body[:length], body[length:]


def _binary_values(tensor: dict[str, Any], datatype: str, count: int, binary: bytes | None, offset: int) -> np.ndarray:
    size = tensor["parameters"]["binary_data_size"]
    if type(size) is not int or size < 0:
        fail("inputs[0].parameters.binary_data_size must be a non-negative integer")
    if binary is None:
        fail(f"inputs[0] has binary_data_size but the request has no {HEADER_LENGTH} header")
    if "data" in tensor:
        fail("inputs[0] has both 'data' and binary_data_size; send one")
    if offset + size > len(binary):
        fail(f"inputs[0].parameters.binary_data_size is {size} but only {len(binary) - offset} binary bytes follow")
    dtype = NUMERIC[datatype]
    if size % dtype.itemsize:
        fail(f"inputs[0]: {size} bytes is not a whole number of {datatype} elements ({dtype.itemsize} bytes each)")
    if size // dtype.itemsize != count:
        fail(f"inputs[0]: {size // dtype.itemsize} {datatype} elements but the shape needs {count}")
    values = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).astype(np.float64)
    if not np.isfinite(values).all():
        fail("inputs[0] binary data: numbers must be finite")
    return values


def _json_values(tensor: dict[str, Any], datatype: str, shape: list[int]) -> np.ndarray:
    if "data" not in tensor:
        fail("inputs[0] is missing 'data'")
    flat = flatten(tensor["data"], "inputs[0].data")
    count = shape[0] * shape[1]
    if len(flat) != count:
        fail(f"inputs[0].data has {len(flat)} values but shape {shape} needs {count}")
    integral = datatype in _INT_BOUNDS
    for i, value in enumerate(flat):
        kind = type(value)
        if kind is int:
            if integral:
                low, high = _INT_BOUNDS[datatype]
                if not low <= value <= high:
                    fail(f"inputs[0].data[{i}] is out of range for {datatype}")
        elif kind is float and not integral:
            continue
        else:
            expected = "an integer" if integral else "a number"
            fail(f"inputs[0].data[{i}] must be {expected} for {datatype}, got {type_name(value)}")
    values = to_float64(flat, "inputs[0].data")
    if datatype == "FP32":
        with np.errstate(over="ignore"):
            narrowed = values.astype(np.float32)
        if not np.isfinite(narrowed).all():
            fail("inputs[0].data: a number is too large for FP32")
        values = narrowed.astype(np.float64)
    return values


def _flag(parameters: Any, name: str, where: str) -> bool | None:
    if parameters is None:
        return None
    if type(parameters) is not dict:
        fail(f"{where}.parameters must be an object")
    value = parameters.get(name)
    if value is not None and type(value) is not bool:
        fail(f"{where}.parameters.{name} must be true or false")
    return value


def decode(
    body: bytes, header_length: str | None, width: int, max_rows: int, output_names: tuple[str, ...]
) -> V2Request:
    """Validate an `infer` body for a model of `width` features, JSON or binary; InputError if wrong."""
    header, binary = _header_and_binary(body, header_length)
    payload = body_object(parse_json(header))
    request_id = payload.get("id")
    if request_id is not None and type(request_id) is not str:
        fail(f"'id' must be a string, got {type_name(request_id)}")
    # Unknown parameters are ignored, as the protocol says; only ours are checked.
    all_binary = _flag(payload.get("parameters"), "binary_data_output", "request") or False
    inputs = payload.get("inputs")
    if type(inputs) is not list or not inputs:
        fail("'inputs' must be a non-empty array of tensors")
    if len(inputs) != 1:
        fail(f"the model takes one input tensor of shape [N, {width}], got {len(inputs)} tensors")
    tensor = inputs[0]
    if type(tensor) is not dict:
        fail(f"inputs[0] must be an object, got {type_name(tensor)}")
    for key in ("name", "shape", "datatype"):
        if key not in tensor:
            fail(f"inputs[0] is missing '{key}'")
    if type(tensor["name"]) is not str:
        fail("inputs[0].name must be a string")
    datatype = tensor["datatype"]
    if type(datatype) is not str or datatype not in V2_DATATYPES:
        fail(f"inputs[0].datatype {datatype!r} is not an Open Inference Protocol datatype")
    if datatype not in NUMERIC:
        fail(f"inputs[0].datatype {datatype} is not supported; use one of {sorted(NUMERIC)}")
    shape = tensor["shape"]
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        fail("inputs[0].shape must be an array of non-negative integers")
    if len(shape) != 2 or shape[1] != width:
        fail(f"inputs[0].shape is {shape}; the model expects [N, {width}]")
    check_rows_count(shape[0], max_rows, "inputs[0]")
    count = shape[0] * width
    parameters = tensor.get("parameters")
    if parameters is not None and type(parameters) is not dict:
        fail("inputs[0].parameters must be an object")
    used = 0
    if parameters and "binary_data_size" in parameters:
        values = _binary_values(tensor, datatype, count, binary, 0)
        used = parameters["binary_data_size"]
    else:
        values = _json_values(tensor, datatype, shape)
    if binary is not None and used != len(binary):
        fail(f"{len(binary)} binary bytes follow the JSON header but the inputs declare {used}")
    names, binary_outputs = _outputs(payload.get("outputs"), output_names, all_binary)
    return V2Request(values.reshape(shape[0], width), request_id, names, binary_outputs)


def _outputs(outputs: Any, output_names: tuple[str, ...], all_binary: bool) -> tuple[tuple[str, ...] | None, frozenset]:
    if outputs is None:
        return None, frozenset(output_names if all_binary else ())
    if type(outputs) is not list or not all(type(o) is dict and type(o.get("name")) is str for o in outputs):
        fail("'outputs' must be an array of objects with a string 'name'")
    names = tuple(o["name"] for o in outputs)
    unknown = [n for n in names if n not in output_names]
    if unknown:
        fail(f"unknown output {unknown[0]!r}; this model has {list(output_names)}")
    binary = set()
    for i, output in enumerate(outputs):
        wanted = _flag(output.get("parameters"), "binary_data", f"outputs[{i}]")
        if wanted or (wanted is None and all_binary):
            binary.add(output["name"])
    return names, frozenset(binary)


def _binary(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        parts = []
        for value in tensor.data:
            raw = value if isinstance(value, bytes) else str(value).encode()
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    return np.asarray(tensor.data, dtype=NUMERIC[tensor.datatype]).tobytes()


def encode(
    model: str, version: str, request_id: str | None, outputs: list[Tensor], binary_outputs: frozenset[str]
) -> tuple[bytes, dict[str, str], str]:
    """The response: (body, extra headers, content type). JSON unless an output is binary;
    then the JSON header, its length in Inference-Header-Content-Length, and the bytes."""
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if tensor.name in binary_outputs:
            blob = _binary(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = tensor.data
        described.append(entry)
    head: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id is not None:  # the request's id when it had one (the spec), else none
        head["id"] = request_id
    header = orjson.dumps({**head, "outputs": described})
    if not blobs:
        return header, {}, "application/json"
    return header + b"".join(blobs), {HEADER_LENGTH: str(len(header))}, "application/octet-stream"
