"""The REST layer: parse, validate, call the data plane, serialize. Nothing else.

Routes follow KServe V1, the Open Inference Protocol (V2 REST), and the tutorials'
`/predict` shortcut; errors are always JSON `{"error": ...}`.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, request

from service import __version__
from service.http import json_response, label_model, request_id, state, wire
from service.inference import Prediction
from service.models import LoadedModel, UnknownModel
from service.openapi import openapi_document
from service.protocols import body, shortcut, v1, v2
from service.validation import InputError

SERVER_NAME = "prediction-cluster"
PREDICT_OUTPUT, PROBA_OUTPUT = "predict", "predict_proba"

bp = Blueprint("api", __name__)
wire(bp)  # the converter first: the routes below use it


def _body() -> bytes:
    """The request body as the protocol codecs take it: a content type real clients send,
    decompressed (bounded by the body limit)."""
    body.check_content_type(request.mimetype)
    limit = state().settings.models.max_body_bytes
    return body.decompress(request.get_data(cache=False), request.headers.get("Content-Encoding", ""), limit)


def _model(name: str, version: str | None = None) -> LoadedModel:
    registry = state().registry
    try:
        model = registry.get(name, version)
    except UnknownModel as exc:
        if not registry.ready:
            # Perhaps a model that failed to load: say so rather than "not found".
            raise InputError(f"{exc}; replica not ready: {'; '.join(registry.errors)}", 503) from None
        raise InputError(str(exc), 404) from None
    label_model(model.name)
    return model


def _prediction_headers(model: LoadedModel, prediction: Prediction) -> dict[str, str]:
    return {"X-Cache": prediction.cache_status, "X-Model-Version": model.version}


def _output_names(model: LoadedModel) -> tuple[str, ...]:
    return (PREDICT_OUTPUT, PROBA_OUTPUT) if model.has_proba else (PREDICT_OUTPUT,)


# --- health, metrics, discovery ----------------------------------------------------


@bp.get("/healthz")
def healthz() -> Response:
    """Process alive."""
    return json_response({"status": "alive"})


@bp.get("/readyz")
def readyz() -> Response:
    """Models loaded and not draining."""
    current = state()
    if current.is_ready():
        return json_response({"status": "ready", "models": current.registry.names()})
    if current.draining:
        reason = "draining (shutting down)"
    elif current.registry.ready:
        reason = "another worker of this replica is still loading its models"
    else:
        reason = "; ".join(current.registry.errors)
    return json_response({"error": f"not ready: {reason}"}, 503)


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format, all workers of this replica."""
    return Response(state().metrics.render(), mimetype=None, content_type=state().metrics.content_type)


@bp.get("/openapi.json")
def openapi() -> Response:
    """OpenAPI 3 description of this API."""
    registry = state().registry
    versions = sorted({v for name in registry.names() for v in registry.versions(name)})
    return json_response(openapi_document(__version__, tuple(registry.names()), tuple(versions)))


# --- KServe V1 ------------------------------------------------------------------------


@bp.get("/v1/models")
def v1_models() -> Response:
    """Names of the served models."""
    return json_response({"models": state().registry.names()})


@bp.get("/v1/models/<model:name>")
def v1_model(name: str) -> Response:
    """A model's readiness."""
    model = _model(name)
    return json_response({"name": model.name, "ready": True})


@bp.post("/v1/models/<model:name>:predict")
def v1_predict(name: str) -> Response:
    """{"instances": [[...]]} → {"predictions": [...], "probabilities": [[...]]}."""
    model = _model(name)
    rows = v1.decode(_body(), model.width, state().settings.models.max_batch_rows)
    prediction = state().predictor.predict(model, rows)
    encoded = v1.encode(prediction.labels, prediction.probabilities)
    return Response(encoded, headers=_prediction_headers(model, prediction), mimetype="application/json")


@bp.post("/predict")
def shortcut_predict() -> Response:
    """The tutorials' shortcut for the default model."""
    current = state()
    model = _model(current.settings.models.default_model)
    rows = shortcut.decode(_body(), model.width, current.settings.models.max_batch_rows)
    prediction = current.predictor.predict(model, rows)
    encoded = shortcut.encode(model.name, model.version, prediction.labels, prediction.probabilities)
    return Response(encoded, headers=_prediction_headers(model, prediction), mimetype="application/json")


# --- Open Inference Protocol (V2 REST) --------------------------------------------------


@bp.get("/v2")
def v2_server() -> Response:
    """Server metadata."""
    return json_response({"name": SERVER_NAME, "version": __version__, "extensions": [v2.EXTENSION]})


@bp.get("/v2/health/live")
def v2_live() -> Response:
    """Server live."""
    return json_response({"live": True})


@bp.get("/v2/health/ready")
def v2_ready() -> Response:
    """Server ready: every model loaded."""
    ready = state().is_ready()
    return json_response({"ready": ready}, 200 if ready else 503)


def _v2_metadata(model: LoadedModel) -> dict[str, Any]:
    outputs = [{"name": PREDICT_OUTPUT, "datatype": model.label_datatype, "shape": [-1]}]
    if model.has_proba:
        outputs.append({"name": PROBA_OUTPUT, "datatype": "FP64", "shape": [-1, len(model.classes)]})
    return {
        "name": model.name,
        "versions": state().registry.versions(model.name),
        "platform": "sklearn",
        "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [-1, model.width]}],
        "outputs": outputs,
        "parameters": {
            "feature_names": model.feature_names,
            "classes": model.classes,
            "sha256": model.sha256,
        },
    }


@bp.get("/v2/models/<model:name>")
@bp.get("/v2/models/<model:name>/versions/<model:version>")
def v2_model(name: str, version: str | None = None) -> Response:
    """Model metadata."""
    return json_response(_v2_metadata(_model(name, version)))


@bp.get("/v2/models/<model:name>/ready")
@bp.get("/v2/models/<model:name>/versions/<model:version>/ready")
def v2_model_ready(name: str, version: str | None = None) -> Response:
    """Model ready (a model is served only once loaded)."""
    model = _model(name, version)
    return json_response({"name": model.name, "ready": True})


@bp.post("/v2/models/<model:name>/infer")
@bp.post("/v2/models/<model:name>/versions/<model:version>/infer")
def v2_infer(name: str, version: str | None = None) -> Response:
    """Inference with JSON tensors or Triton's binary tensor data."""
    model = _model(name, version)
    names = _output_names(model)
    parsed = v2.decode(_body(), request.headers.get(v2.HEADER_LENGTH), model.width,
                       state().settings.models.max_batch_rows, names)  # fmt: skip
    prediction = state().predictor.predict(model, parsed.rows)
    count = len(prediction.labels)
    outputs = []
    for output in parsed.outputs or names:
        if output == PREDICT_OUTPUT:
            outputs.append(v2.Tensor(output, model.label_datatype, [count], prediction.labels))
        else:
            flat = [p for row in prediction.probabilities or [] for p in row]
            outputs.append(v2.Tensor(output, "FP64", [count, len(model.classes)], flat))
    call_id = parsed.request_id if parsed.request_id is not None else request_id()
    encoded, headers, content_type = v2.encode(model.name, model.version, call_id, outputs, parsed.binary_outputs)
    return Response(encoded, headers={**headers, **_prediction_headers(model, prediction)}, content_type=content_type)
