"""The OpenAPI 3 document served at /openapi.json (used by clients and by the fuzz tests)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from service.inputs.parsing import V2_DATATYPES
from service.models.registry import NAME_PATTERN
from service.web.routes import ROUTES, openapi_path

V2_DATATYPES_SORTED = sorted(V2_DATATYPES)

_ERROR = {"$ref": "#/components/schemas/Error"}
_PATTERN = NAME_PATTERN.pattern


def _path_parameter(name: str, served: tuple[str, ...]) -> dict[str, Any]:
    # The served names as an enum: clients (and the fuzzer) see what exists here.
    schema = {"type": "string", "enum": list(served)} if served else {"type": "string", "pattern": _PATTERN}
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    texts = {
        400: "Malformed JSON, wrong shape, type or non-finite number",
        401: "Operator route: missing or wrong operator token (Authorization: Bearer; nothing changed)",
        403: "Operator route, refused on the balancer's public listener",
        404: "Unknown model or version",
        409: "The change conflicts with the version policy (nothing changed)",
        422: "The model version failed verification or loading (nothing changed)",
        413: "Body or batch too large",
        415: "Content-Type is not JSON",
        429: "Rate limited (the balancer), or the replica is overloaded (Retry-After says when to retry)",
        503: "Not ready, or shutting down",
        504: "X-Request-Timeout-Ms passed while the request waited (not computed)",
    }
    return {str(c): _json(_ERROR, texts[c]) for c in codes}


_TIMEOUT = {
    "name": "X-Request-Timeout-Ms",
    "in": "header",
    "required": False,
    "schema": {"type": "integer", "minimum": 1, "maximum": 3_600_000},
    "description": "How long the client waits (from the balancer's receipt); past it, not computed (504)",
}
_ANY_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "pattern": _PATTERN}}
_PARAMETERS = {
    "type": "object",
    "properties": {
        "parameters": {
            "type": "object",
            "properties": {"version": {"type": "string"}, "weight": {"type": "integer", "minimum": 0, "maximum": 100}},
        }
    },
}
_POLICY = {
    "type": "object",
    "properties": {
        "default": {"type": "string"},
        "weights": {"type": "object", "additionalProperties": {"type": "integer"}},
    },
}
_CHANGED = {"type": "object", "required": ["generation", "model", "versions"]}


def _operator(
    summary: str, name: dict[str, Any] | None, request: dict[str, Any], response: dict[str, Any]
) -> dict[str, Any]:
    """A model repository route: served on the balancer's internal listener only."""
    op: dict[str, Any] = {
        "summary": f"{summary} (operator route: refused on the balancer's public listener)",
        "requestBody": {"required": False, "content": {"application/json": {"schema": request}}},
        "responses": {"200": _json(response, "OK"), **_errors(400, 401, 403, 404, 409, 422, 503)},
        "security": [{"operator": []}],
    }
    if name:
        op["parameters"] = [name]
    return op


def _get(summary: str, schema: dict[str, Any], *codes: int, params: list[Any] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {"200": _json(schema, "OK"), **_errors(*codes)}}
    if params:
        op["parameters"] = params
    return op


def _post(summary: str, request: str, response: str, params: list[Any] | None = None) -> dict[str, Any]:
    headers = {
        h: {"schema": {"type": "string"}, "description": d}
        for h, d in (
            ("X-Cache", "HIT, MISS, PARTIAL, OFF (not cached by policy) or BYPASS (Redis unavailable)"),
            ("X-Served-By", "replica id"),
            ("X-Request-ID", "the caller's id or a new one"),
            ("X-Model-Version", "model version"),
        )
    }
    ok = _json({"$ref": f"#/components/schemas/{response}"}, "Predictions")
    ok["headers"] = headers
    op: dict[str, Any] = {
        "summary": summary,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}},
        },
        "responses": {"200": ok, **_errors(400, 404, 413, 415, 429, 503, 504)},
    }
    op["parameters"] = [*(params or []), _TIMEOUT]
    return op


_ROW = {"type": "array", "items": {"type": "number"}, "minItems": 1}
# A model of named columns takes an instance as an object by column name, or as an array
# in column order, of strings, numbers and booleans (GET /v2/models/{name} lists them).
# (Cells are left untyped: strings, numbers and booleans, by the model's columns.)
_INSTANCE = {
    "description": "an array of numbers (a model of plain rows), or for a model of named columns an array "
    "in column order or an object by column name",
    "oneOf": [{"type": "array", "minItems": 1}, {"type": "object", "minProperties": 1}],
}
_SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "V1Request": {
        "type": "object",
        "required": ["instances"],
        "properties": {"instances": {"type": "array", "items": _INSTANCE, "minItems": 1}},
    },
    "V1Response": {
        "type": "object",
        "required": ["predictions"],
        "properties": {
            "predictions": {"type": "array", "items": {"oneOf": [{"type": "string"}, {"type": "number"}]}},
            "probabilities": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        },
    },
    "ShortcutRequest": {
        "type": "object",
        "properties": {"features": _INSTANCE, "instances": {"type": "array", "items": _INSTANCE, "minItems": 1}},
        "anyOf": [{"required": ["features"]}, {"required": ["instances"]}],
    },
    "ShortcutResponse": {
        "type": "object",
        "required": ["model", "version", "predictions"],
        "properties": {
            "model": {"type": "string"},
            "version": {"type": "string"},
            "predictions": {"type": "array", "items": {"oneOf": [{"type": "string"}, {"type": "number"}]}},
            "probabilities": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        },
    },
    "Tensor": {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": list(V2_DATATYPES_SORTED)},
            "parameters": {"type": "object"},
            "data": {"type": "array"},
        },
    },
    "OutputTensor": {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"},
            "data": {"type": "array"},
        },
    },
    "V2InferRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/Tensor"}, "minItems": 1},
            "outputs": {
                "type": "array",
                "items": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
            },
        },
    },
    "V2InferResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/OutputTensor"}},
        },
    },
    "TensorMetadata": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "V2ModelMetadata": {
        "type": "object",
        "required": ["name", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
            "outputs": {"type": "array", "items": {"$ref": "#/components/schemas/TensorMetadata"}},
            "parameters": {"type": "object"},
        },
    },
}
_READY = {
    "type": "object",
    "required": ["name", "ready"],
    "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
}
_META = {"$ref": "#/components/schemas/V2ModelMetadata"}
_CONFIG = {"type": "object", "required": ["name", "max_batch_size", "input", "output"]}


def _paths(operations: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The document's paths: every route of the table, none else (KeyError: a route the
    document does not describe)."""
    paths: dict[str, Any] = {}
    for route in ROUTES:
        path = openapi_path(route)
        paths.setdefault(path, {})[route.method.lower()] = operations[path]
    return paths


@lru_cache(maxsize=16)
def openapi_document(version: str, models: tuple[str, ...] = (), versions: tuple[str, ...] = ()) -> dict[str, Any]:
    """The OpenAPI 3.0 document for the served models and versions (built once for each)."""
    _NAME, _VERSION = _path_parameter("name", models), _path_parameter("version", versions)  # noqa: N806
    status = {"type": "object"}
    # Each route of the table (service.web.routes) by its OpenAPI path: an operation for each.
    operations = {
        "/healthz": _get("Process alive", status),
        "/readyz": _get("Models loaded, not draining", status, 503),
        "/metrics": {
            "summary": "Prometheus metrics of every worker",
            "responses": {
                "200": {
                    "description": "Prometheus text",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        },
        "/openapi.json": _get("This document", {"type": "object"}),
        "/predict": _post("Predict with the default model", "ShortcutRequest", "ShortcutResponse"),
        "/v1/models": _get(
            "Served models",
            {
                "type": "object",
                "required": ["models"],
                "properties": {"models": {"type": "array", "items": {"type": "string"}}},
            },
        ),
        "/v1/models/{name}": _get("Model status", _READY, 404, params=[_NAME]),
        "/v1/models/{name}:predict": _post("KServe V1 predict", "V1Request", "V1Response", [_NAME]),
        "/v2": _get("Server metadata", {"type": "object", "required": ["name", "version", "extensions"]}),
        "/v2/health/live": _get("Server live", {"type": "object"}),
        "/v2/health/ready": _get("Server ready", {"type": "object"}, 503),
        "/v2/models/{name}": _get("Model metadata", _META, 404, params=[_NAME]),
        "/v2/models/{name}/versions/{version}": _get("Model version metadata", _META, 404, params=[_NAME, _VERSION]),
        "/v2/models/{name}/config": _get("Triton's model configuration", _CONFIG, 404, params=[_NAME]),
        "/v2/models/{name}/versions/{version}/config": _get(
            "Triton's model configuration of a version", _CONFIG, 404, params=[_NAME, _VERSION]
        ),
        "/v2/models/{name}/ready": _get("Model ready", _READY, 404, params=[_NAME]),
        "/v2/models/{name}/versions/{version}/ready": _get(
            "Model version ready", _READY, 404, params=[_NAME, _VERSION]
        ),
        "/v2/models/{name}/infer": _post("Open Inference Protocol infer", "V2InferRequest", "V2InferResponse", [_NAME]),
        "/v2/models/{name}/versions/{version}/infer": _post(
            "Open Inference Protocol infer on a version", "V2InferRequest", "V2InferResponse", [_NAME, _VERSION]
        ),
        "/v2/repository/index": _operator(
            "Every model version on disk or served, and its state",
            None,
            {"type": "object", "properties": {"ready": {"type": "boolean"}}},
            {"type": "array", "items": {"type": "object"}},
        ),
        "/v2/repository/models/{name}/load": _operator(
            "Load a model (or one version, optionally with a share of unversioned requests) on every replica",
            _ANY_NAME,
            _PARAMETERS,
            _CHANGED,
        ),
        "/v2/repository/models/{name}/unload": _operator(
            "Unload a model (or one version) on every replica", _ANY_NAME, _PARAMETERS, _CHANGED
        ),
        "/v2/repository/models/{name}/policy": _operator(
            "Which version unversioned requests get: a default and weights between versions",
            _ANY_NAME,
            _POLICY,
            _CHANGED,
        ),
        "/v2/repository/status": {
            "summary": "The desired model state and the generation each worker serves (operator route)",
            "responses": {"200": _json({"type": "object"}, "OK"), **_errors(401, 403, 503)},
            "security": [{"operator": []}],
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Prediction cluster API",
            "version": version,
            "description": "KServe V1, Open Inference Protocol (V2 REST) and /predict.",
        },
        "paths": _paths(operations),
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "operator": {"type": "http", "scheme": "bearer", "description": "SERVICE_OPERATOR_TOKEN"}
            },
        },
    }
