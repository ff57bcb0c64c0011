"""KServe V1 / TF-Serving rows: {"instances": [[...], ...]} → {"predictions": [...]}; for a
model of named columns an instance may also be an object, {"plan": "pro", "age": 31}."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from service.inputs import columns as named
from service.inputs.columns import Column
from service.inputs.parsing import body_object, fail, parse_json, rows_from_instances


def decode(body: bytes, width: int, max_rows: int, columns: tuple[Column, ...] | None = None) -> np.ndarray:
    """The request's rows, or InputError: a float64 matrix of `width` columns, or for a model
    of named `columns` typed rows, each instance an object by name or an array in order."""
    payload = body_object(parse_json(body))
    if "instances" not in payload:
        fail("missing 'instances': send {\"instances\": [[...], ...]}")
    if columns is not None:
        return named.rows_from_instances(payload["instances"], columns, max_rows, "instances")
    return rows_from_instances(payload["instances"], width, max_rows)


def encode(labels: list[Any], probabilities: list[list[float]] | None) -> bytes:
    """The response body: predictions, and probabilities where the model has them."""
    payload: dict[str, Any] = {"predictions": labels}
    if probabilities is not None:
        payload["probabilities"] = probabilities
    return orjson.dumps(payload)
