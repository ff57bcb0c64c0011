"""The REST layer: parse, validate, call the data plane, serialize. Nothing else.

Routes follow KServe V1, the Open Inference Protocol (V2 REST), and the tutorials'
`/predict` shortcut; errors are always JSON `{"error": ...}`.
"""

from __future__ import annotations

from typing import Any

import orjson
from flask import Blueprint, Response, current_app, request
from werkzeug.routing import BaseConverter

from service import __version__
from service.inference import Prediction
from service.models import LoadedModel, UnknownModel
from service.openapi import openapi_document
from service.state import ServiceState
from service.validation import (
    InputError,
    parse_json,
    parse_v2,
    rows_from_shortcut,
    rows_from_v1,
)

SERVER_NAME = "prediction-cluster"
PREDICT_OUTPUT, PROBA_OUTPUT = "predict", "predict_proba"

bp = Blueprint("api", __name__)


class ModelNameConverter(BaseConverter):
    """Model names and versions: no colon, so `iris:predict` splits into name and verb."""

    regex = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"


def _state() -> ServiceState:
    return current_app.extensions["prediction"]


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A compact JSON response."""
    return Response(orjson.dumps(payload), status=status, headers=headers, mimetype="application/json")


def _json_body() -> Any:
    mimetype = request.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise InputError(f"Content-Type must be application/json, got {mimetype or 'none'}", 415)
    return parse_json(request.get_data(cache=False))


def _model(name: str, version: str | None = None) -> LoadedModel:
    registry = _state().registry
    try:
        return registry.get(name, version)
    except UnknownModel as exc:
        if not registry.reload_if_not_ready():
            # Perhaps a model that failed to load: say so rather than "not found".
            raise InputError(f"{exc}; replica not ready: {'; '.join(registry.errors)}", 503) from None
        raise InputError(str(exc), 404) from None


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
    state = _state()
    if state.is_ready():
        return json_response({"status": "ready", "models": state.registry.names()})
    reason = "draining (shutting down)" if state.draining else "; ".join(state.registry.errors)
    return json_response({"error": f"not ready: {reason}"}, 503)


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text format, all workers of this replica."""
    return Response(_state().metrics.render(), mimetype=None, content_type=_state().metrics.content_type)


@bp.get("/openapi.json")
def openapi() -> Response:
    """OpenAPI 3 description of this API."""
    registry = _state().registry
    versions = sorted({v for name in registry.names() for v in registry.versions(name)})
    return json_response(openapi_document(__version__, tuple(registry.names()), tuple(versions)))


# --- KServe V1 ------------------------------------------------------------------------


@bp.get("/v1/models")
def v1_models() -> Response:
    """Names of the served models."""
    return json_response({"models": _state().registry.names()})


@bp.get("/v1/models/<model:name>")
def v1_model(name: str) -> Response:
    """A model's readiness."""
    model = _model(name)
    return json_response({"name": model.name, "ready": True})


@bp.post("/v1/models/<model:name>:predict")
def v1_predict(name: str) -> Response:
    """{"instances": [[...]]} → {"predictions": [...], "probabilities": [[...]]}."""
    model = _model(name)
    rows = rows_from_v1(_json_body(), model.width, _state().settings.max_batch_rows)
    prediction = _state().predictor.predict(model, rows)
    payload: dict[str, Any] = {"predictions": prediction.labels}
    if prediction.probabilities is not None:
        payload["probabilities"] = prediction.probabilities
    return json_response(payload, headers=_prediction_headers(model, prediction))


@bp.post("/predict")
def shortcut_predict() -> Response:
    """The tutorials' shortcut for the default model."""
    state = _state()
    model = _model(state.settings.default_model)
    rows = rows_from_shortcut(_json_body(), model.width, state.settings.max_batch_rows)
    prediction = state.predictor.predict(model, rows)
    payload: dict[str, Any] = {
        "model": model.name,
        "version": model.version,
        "predictions": prediction.labels,
    }
    if prediction.probabilities is not None:
        payload["probabilities"] = prediction.probabilities
    return json_response(payload, headers=_prediction_headers(model, prediction))


# --- Open Inference Protocol (V2 REST) --------------------------------------------------


@bp.get("/v2")
def v2_server() -> Response:
    """Server metadata."""
    return json_response({"name": SERVER_NAME, "version": __version__, "extensions": []})


@bp.get("/v2/health/live")
def v2_live() -> Response:
    """Server live."""
    return json_response({"live": True})


@bp.get("/v2/health/ready")
def v2_ready() -> Response:
    """Server ready: every model loaded."""
    ready = _state().is_ready()
    return json_response({"ready": ready}, 200 if ready else 503)


def _v2_metadata(model: LoadedModel) -> dict[str, Any]:
    outputs = [{"name": PREDICT_OUTPUT, "datatype": model.label_datatype, "shape": [-1]}]
    if model.has_proba:
        outputs.append({"name": PROBA_OUTPUT, "datatype": "FP64", "shape": [-1, len(model.classes)]})
    return {
        "name": model.name,
        "versions": _state().registry.versions(model.name),
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
    """Inference with JSON tensors."""
    model = _model(name, version)
    names = _output_names(model)
    parsed = parse_v2(_json_body(), model.width, _state().settings.max_batch_rows, names)
    prediction = _state().predictor.predict(model, parsed.rows)
    wanted = parsed.outputs or names
    count = len(prediction.labels)
    outputs = []
    for output in wanted:
        if output == PREDICT_OUTPUT:
            outputs.append(
                {"name": output, "datatype": model.label_datatype, "shape": [count], "data": prediction.labels}
            )
        else:
            proba = prediction.probabilities or []
            outputs.append(
                {
                    "name": output,
                    "datatype": "FP64",
                    "shape": [count, len(model.classes)],
                    "data": [p for row in proba for p in row],
                }
            )
    payload = {
        "model_name": model.name,
        "model_version": model.version,
        "id": parsed.request_id if parsed.request_id is not None else request.environ["prediction.request_id"],
        "outputs": outputs,
    }
    return json_response(payload, headers=_prediction_headers(model, prediction))
