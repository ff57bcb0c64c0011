"""KServe V1 / TF-Serving rows: {"instances": [[...], ...]} → {"predictions": [...]}."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from service.validation import body_object, fail, parse_json, rows_from_instances


def decode(body: bytes, width: int, max_rows: int) -> np.ndarray:
    """The request's rows as a float64 matrix of `width` columns, or InputError."""
    payload = body_object(parse_json(body))
    if "instances" not in payload:
        fail("missing 'instances': send {\"instances\": [[...], ...]}")
    return rows_from_instances(payload["instances"], width, max_rows)


def encode(labels: list[Any], probabilities: list[list[float]] | None) -> bytes:
    """The response body: predictions, and probabilities where the model has them."""
    payload: dict[str, Any] = {"predictions": labels}
    if probabilities is not None:
        payload["probabilities"] = probabilities
    return orjson.dumps(payload)
