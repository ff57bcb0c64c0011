"""The Open Inference Protocol (KServe V2 REST) `infer` call, with JSON tensors and with
Triton's binary tensor data extension (what tritonclient sends by default).

A binary request is a JSON header of `Inference-Header-Content-Length` bytes followed by
the tensors' bytes, in input order; an input says it is binary with the parameter
`binary_data_size`. Outputs come back binary when the request asks (`binary_data_output`
for all, or an output's `binary_data`): little-endian, row major; a BYTES element is a
4-byte little-endian length and the bytes.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from service.inputs.columns import Column, describe, rows_from_matrix, typed_rows
from service.inputs.parsing import (
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
# Fixed-size datatypes as the binary extension lays them out (little-endian).
NUMERIC: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# The datatypes a row of plain features may come in, JSON or binary.
NUMERIC_ROWS = ("FP32", "FP64", "INT32", "INT64")
_INTEGERS = ("INT64", "INT32", "INT16", "INT8", "UINT32", "UINT16", "UINT8")
# What a tensor may be for a named column of each datatype: its own first, then narrower.
ACCEPTED: dict[str, tuple[str, ...]] = {
    "FP64": ("FP64", "FP32", *_INTEGERS),
    "INT64": _INTEGERS,
    "BYTES": ("BYTES",),
    "BOOL": ("BOOL",),
}
_INT_BOUNDS = {name: (int(np.iinfo(NUMERIC[name]).min), int(np.iinfo(NUMERIC[name]).max)) for name in _INTEGERS}


@dataclass(frozen=True)
class V2Request:
    """A validated inference request: the rows (floats, or typed rows of named columns), the
    caller's id, which outputs and how."""

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


def _binary_size(tensor: dict[str, Any], where: str, binary: bytes | None, offset: int) -> int:
    """How many of the binary bytes from `offset` on the tensor declares (and they are there)."""
    size = tensor["parameters"]["binary_data_size"]
    if type(size) is not int or size < 0:
        fail(f"{where}.parameters.binary_data_size must be a non-negative integer")
    if binary is None:
        fail(f"{where} has binary_data_size but the request has no {HEADER_LENGTH} header")
    if "data" in tensor:
        fail(f"{where} has both 'data' and binary_data_size; send one")
    if offset + size > len(binary):
        fail(f"{where}.parameters.binary_data_size is {size} but only {len(binary) - offset} binary bytes follow")
    return size


def _binary_values(where: str, datatype: str, count: int, size: int, binary: bytes, offset: int) -> np.ndarray:
    dtype = NUMERIC[datatype]
    if size % dtype.itemsize:
        fail(f"{where}: {size} bytes is not a whole number of {datatype} elements ({dtype.itemsize} bytes each)")
    if size // dtype.itemsize != count:
        fail(f"{where}: {size // dtype.itemsize} {datatype} elements but the shape needs {count}")
    return np.frombuffer(binary, dtype=dtype, count=count, offset=offset)


def _binary_strings(size: int, where: str, count: int, binary: bytes, offset: int) -> list[str]:
    """BYTES elements in the binary extension: a 4-byte little-endian length, then the bytes."""
    values, position, end = [], offset, offset + size
    for row in range(count):
        if position + 4 > end:
            fail(f"{where}: binary data ends before row {row}'s length")
        (length,) = struct.unpack_from("<I", binary, position)
        position += 4
        if position + length > end:
            fail(f"{where}: row {row}'s string runs past the binary data")
        try:
            values.append(binary[position : position + length].decode("utf-8"))
        except UnicodeDecodeError:
            fail(f"{where} row {row}: the string is not valid UTF-8")
        position += length
    if position != end:
        fail(f"{where}: {end - position} binary bytes beyond its {count} strings")
    return values


def _json_values(tensor: dict[str, Any], where: str, datatype: str, shape: list[int]) -> list[Any]:
    """The tensor's `data`, flattened: as many values of its datatype's JSON kind as `shape` holds."""
    if "data" not in tensor:
        fail(f"{where} is missing 'data'")
    flat = flatten(tensor["data"], f"{where}.data")
    count = math.prod(shape)
    if len(flat) != count:
        fail(f"{where}.data has {len(flat)} values but shape {shape} needs {count}")
    if datatype in ("BYTES", "BOOL"):
        return flat  # the column checks each value (service.inputs.columns)
    integral = datatype in _INT_BOUNDS
    for i, value in enumerate(flat):
        kind = type(value)
        if kind is int:
            if integral:
                low, high = _INT_BOUNDS[datatype]
                if not low <= value <= high:
                    fail(f"{where}.data[{i}] is out of range for {datatype}")
        elif kind is float and not integral:
            continue
        else:
            expected = "an integer" if integral else "a number"
            fail(f"{where}.data[{i}] must be {expected} for {datatype}, got {type_name(value)}")
    return flat


def _float_values(values: Any, where: str, datatype: str) -> np.ndarray:
    floats = to_float64(values, f"{where}.data")
    if datatype == "FP32":
        with np.errstate(over="ignore"):
            narrowed = floats.astype(np.float32)
        if not np.isfinite(narrowed).all():
            fail(f"{where}.data: a number is too large for FP32")
        floats = narrowed.astype(np.float64)
    return floats


def _flag(parameters: Any, name: str, where: str) -> bool | None:
    if parameters is None:
        return None
    if type(parameters) is not dict:
        fail(f"{where}.parameters must be an object")
    value = parameters.get(name)
    if value is not None and type(value) is not bool:
        fail(f"{where}.parameters.{name} must be true or false")
    return value


def _tensor(inputs: list[Any], i: int) -> tuple[dict[str, Any], str, list[int]]:
    """The i-th input checked as a tensor: (itself, its datatype, its shape)."""
    tensor, where = inputs[i], f"inputs[{i}]"
    if type(tensor) is not dict:
        fail(f"{where} must be an object, got {type_name(tensor)}")
    for key in ("name", "shape", "datatype"):
        if key not in tensor:
            fail(f"{where} is missing '{key}'")
    if type(tensor["name"]) is not str:
        fail(f"{where}.name must be a string")
    datatype = tensor["datatype"]
    if type(datatype) is not str or datatype not in V2_DATATYPES:
        fail(f"{where}.datatype {datatype!r} is not an Open Inference Protocol datatype")
    shape = tensor["shape"]
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        fail(f"{where}.shape must be an array of non-negative integers")
    parameters = tensor.get("parameters")
    if parameters is not None and type(parameters) is not dict:
        fail(f"{where}.parameters must be an object")
    return tensor, datatype, shape


def _is_binary(tensor: dict[str, Any]) -> bool:
    return bool(tensor.get("parameters")) and "binary_data_size" in tensor["parameters"]


def _matrix(
    tensor: dict[str, Any], datatype: str, shape: list[int], width: int, max_rows: int, binary: bytes | None
) -> tuple[np.ndarray, int]:
    """The one tensor of a model of plain rows: (an N x width float matrix, binary bytes used)."""
    if datatype not in NUMERIC_ROWS:
        fail(f"inputs[0].datatype {datatype} is not supported; use one of {sorted(NUMERIC_ROWS)}")
    if len(shape) != 2 or shape[1] != width:
        fail(f"inputs[0].shape is {shape}; the model expects [N, {width}]")
    check_rows_count(shape[0], max_rows, "inputs[0]")
    count = shape[0] * width
    if _is_binary(tensor):
        size = _binary_size(tensor, "inputs[0]", binary, 0)
        values = _binary_values("inputs[0]", datatype, count, size, binary or b"", 0).astype(np.float64)
        if not np.isfinite(values).all():
            fail("inputs[0] binary data: numbers must be finite")
        return values.reshape(shape[0], width), size
    values = _float_values(_json_values(tensor, "inputs[0]", datatype, shape), "inputs[0]", datatype)
    return values.reshape(shape[0], width), 0


def _column_values(
    tensor: dict[str, Any], where: str, datatype: str, shape: list[int], binary: bytes | None, offset: int
) -> tuple[list[Any], int]:
    """One column's values as sent, JSON or binary: (the values, binary bytes used)."""
    if not _is_binary(tensor):
        return _json_values(tensor, where, datatype, shape), 0
    rows = shape[0]
    size = _binary_size(tensor, where, binary, offset)
    if datatype == "BYTES":
        return _binary_strings(size, where, rows, binary or b"", offset), size
    return _binary_values(where, datatype, rows, size, binary or b"", offset).tolist(), size


def _by_column(
    inputs: list[Any], columns: tuple[Column, ...], max_rows: int, binary: bytes | None
) -> tuple[np.ndarray, int]:
    """One tensor per named column, in any order: (typed rows, binary bytes used)."""
    known = {c.name: c for c in columns}
    by_name: dict[str, list[Any]] = {}
    rows = -1
    used = 0
    for i in range(len(inputs)):
        tensor, datatype, shape = _tensor(inputs, i)
        name, where = tensor["name"], f"input {tensor['name']!r}"
        column = known.get(name)
        if column is None:
            fail(f"unknown input {name!r}; the model takes one input per column: {describe(columns)}")
        if name in by_name:
            fail(f"{where} is sent twice")
        accepted = ACCEPTED[column.datatype]
        if datatype not in accepted:
            fail(f"{where} must be one of {', '.join(accepted)} (the column is {column.datatype}), got {datatype}")
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            fail(f"{where}.shape is {shape}; a column's shape is [N] or [N, 1]")
        if rows < 0:
            rows = shape[0]
            check_rows_count(rows, max_rows, where)
        elif shape[0] != rows:
            fail(f"{where} has {shape[0]} rows but {inputs[0]['name']!r} has {rows}")
        values, size = _column_values(tensor, where, datatype, shape, binary, used)
        used += size
        by_name[name] = [column.check(value, f"{where} row {r}") for r, value in enumerate(values)]
    missing = [c for c in columns if c.name not in by_name]
    if missing:
        fail(f"input {missing[0].name!r} ({missing[0].datatype}) is missing; the model takes {describe(columns)}")
    return typed_rows([list(row) for row in zip(*(by_name[c.name] for c in columns), strict=True)]), used


def decode(
    body: bytes,
    header_length: str | None,
    width: int,
    max_rows: int,
    output_names: tuple[str, ...],
    columns: tuple[Column, ...] | None = None,
) -> V2Request:
    """Validate an `infer` body, JSON or binary, for a model of `width` features in one
    tensor, or of named `columns` (one tensor per column; MLServer's pandas codec, whose
    `content_type: pd` changes nothing here); InputError if wrong."""
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
    if columns is not None and (len(inputs) > 1 or _names_a_column(inputs[0], columns)):
        rows, used = _by_column(inputs, columns, max_rows, binary)
    else:
        if len(inputs) != 1:
            fail(f"the model takes one input tensor of shape [N, {width}], got {len(inputs)} tensors")
        tensor, datatype, shape = _tensor(inputs, 0)
        rows, used = _matrix(tensor, datatype, shape, width, max_rows, binary)
        if columns is not None:
            rows = rows_from_matrix(rows, columns, "inputs[0]")
    if binary is not None and used != len(binary):
        fail(f"{len(binary)} binary bytes follow the JSON header but the inputs declare {used}")
    selected, binary_outputs = _outputs(payload.get("outputs"), output_names, all_binary)
    return V2Request(rows, request_id, selected, binary_outputs)


def _names_a_column(tensor: Any, columns: tuple[Column, ...]) -> bool:
    """Whether a lone input tensor is one of the named columns (else: all columns in one matrix)."""
    if type(tensor) is not dict:
        return True  # _by_column says what is wrong with it
    name = tensor.get("name")
    return type(name) is not str or any(c.name == name for c in columns)


def _outputs(outputs: Any, output_names: tuple[str, ...], all_binary: bool) -> tuple[tuple[str, ...] | None, frozenset]:
    if outputs is None:
        return None, frozenset(output_names if all_binary else ())
    if type(outputs) is not list or not all(type(o) is dict and type(o.get("name")) is str for o in outputs):
        fail("'outputs' must be an array of objects with a string 'name'")
    names = tuple(o["name"] for o in outputs)
    unknown = [n for n in names if n not in output_names]
    if unknown:
        fail(f"unknown output {unknown[0]!r}; this model has {list(output_names)}")
    # Each output once: the answer is then bounded by the rows and the model's outputs,
    # never multiplied by the request (50 copies of a 1,024-row answer are 3 MB).
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        fail(f"output {repeated[0]!r} is asked for more than once; name each output once")
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
