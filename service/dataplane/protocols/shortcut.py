"""The tutorials' POST /predict for the default model: {"features": [...]} (one row) or
{"instances": [[...]]} → {"model", "version", "predictions", "probabilities"}."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from service.inputs import columns as named
from service.inputs.columns import Column
from service.inputs.parsing import body_object, fail, parse_json, rows_from_instances


def decode(body: bytes, width: int, max_rows: int, columns: tuple[Column, ...] | None = None) -> np.ndarray:
    """The request's rows (floats, or typed rows of named `columns`), or InputError."""
    payload = body_object(parse_json(body))
    if columns is not None:
        for key, rows in (("features", [payload.get("features")]), ("instances", payload.get("instances"))):
            if key in payload:
                return named.rows_from_instances(rows, columns, max_rows, key)
    elif "features" in payload:
        return rows_from_instances([payload["features"]], width, max_rows, "features")
    elif "instances" in payload:
        return rows_from_instances(payload["instances"], width, max_rows)
    fail('send {"features": [...]} for one row or {"instances": [[...], ...]}')


def encode(model: str, version: str, labels: list[Any], probabilities: list[list[float]] | None) -> bytes:
    """The response body."""
    payload: dict[str, Any] = {"model": model, "version": version, "predictions": labels}
    if probabilities is not None:
        payload["probabilities"] = probabilities
    return orjson.dumps(payload)
