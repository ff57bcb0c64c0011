"""The Flask door's serving views: health, metrics, discovery, KServe V1, the Open
Inference Protocol (V2 REST) and the tutorials' `/predict`. Errors are always JSON
`{"error": ...}`.

Each view parses, calls and serializes; a prediction is the data plane's
(service.dataplane.handlers), the same handler the fast lane calls. Which view answers which path
is the route table's (service.web.routes); the operator's routes are service.web.operator.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g, request

from service import __version__
from service.dataplane.contract import Answer
from service.dataplane.handlers import HANDLERS, lookup, triton_config, v2_metadata
from service.dataplane.protocols import v2
from service.models.artifacts import LoadedModel
from service.web.http import add_routes, json_response, label_model, request_id, state
from service.web.openapi import openapi_document

SERVER_NAME = "prediction-cluster"

bp = Blueprint("api", __name__)


class FlaskCall:
    """The service.web.envelope.Call of the request Flask is handling."""

    def __init__(self) -> None:
        self.request_id = request_id()
        self.mimetype = request.mimetype

    @property
    def model_name(self) -> str:
        return str(g.get("model_label", ""))

    @model_name.setter
    def model_name(self, name: str) -> None:
        label_model(name)

    def header(self, name: str) -> str | None:
        return request.headers.get(name)

    def raw_body(self, limit: int) -> bytes:
        return request.get_data(cache=False)  # MAX_CONTENT_LENGTH: a 413 beyond it


def _model(name: str, version: str | None = None) -> LoadedModel:
    """The version a metadata request names, else the one that speaks for the model: never
    one drawn at random by a split, so that its metadata and configuration agree."""
    current = state()
    model = lookup(current, name, version or current.registry.primary(name))
    label_model(model.name)
    return model


def _answer(view: str, name: str | None = None, version: str | None = None) -> Response:
    answer: Answer = HANDLERS[view](state(), FlaskCall(), name, version)
    encoded, headers, content_type = answer
    return Response(encoded, headers=headers, content_type=content_type)


# --- health, metrics, discovery ----------------------------------------------------


def healthz() -> Response:
    """Process alive."""
    return json_response({"status": "alive"})


def readyz() -> Response:
    """Models loaded and not draining."""
    current = state()
    unavailable = current.registry.unavailable()
    if current.is_ready():
        answer: dict[str, Any] = {"status": "ready", "models": current.registry.names()}
        if unavailable:  # versions whose folder failed to load: served by no worker here
            answer["unavailable"] = unavailable
        return json_response(answer)
    if current.draining:
        reason = "draining (shutting down)"
    elif current.registry.ready:
        reason = "another worker of this replica is still loading its models"
    else:
        reason = "; ".join(current.registry.errors)
    return json_response({"error": f"not ready: {reason}", "unavailable": unavailable}, 503)


def metrics() -> Response:
    """Prometheus text format, all workers of this replica."""
    return Response(state().metrics.render(), mimetype=None, content_type=state().metrics.content_type)


def openapi() -> Response:
    """OpenAPI 3 description of this API."""
    registry = state().registry
    versions = sorted({v for name in registry.names() for v in registry.versions(name)})
    return json_response(openapi_document(__version__, tuple(registry.names()), tuple(versions)))


# --- KServe V1 and the tutorials' shortcut --------------------------------------------


def v1_models() -> Response:
    """Names of the served models."""
    return json_response({"models": state().registry.names()})


def v1_model(name: str) -> Response:
    """A model's readiness."""
    model = _model(name)
    return json_response({"name": model.name, "ready": True})


def v1_predict(name: str) -> Response:
    """{"instances": [[...]]} → {"predictions": [...], "probabilities": [[...]]}."""
    return _answer("v1_predict", name)


def shortcut_predict() -> Response:
    """The tutorials' shortcut for the default model."""
    return _answer("shortcut_predict")


# --- Open Inference Protocol (V2 REST) --------------------------------------------------


def v2_server() -> Response:
    """Server metadata."""
    return json_response({"name": SERVER_NAME, "version": __version__, "extensions": [v2.EXTENSION]})


def v2_live() -> Response:
    """Server live."""
    return json_response({"live": True})


def v2_ready() -> Response:
    """Server ready: every model loaded."""
    ready = state().is_ready()
    return json_response({"ready": ready}, 200 if ready else 503)


def v2_model(name: str, version: str | None = None) -> Response:
    """Model metadata."""
    return json_response(v2_metadata(state(), _model(name, version)))


def v2_model_config(name: str, version: str | None = None) -> Response:
    """Triton's model configuration extension: what Triton's own tools read first."""
    return json_response(triton_config(state(), _model(name, version)))


def v2_model_ready(name: str, version: str | None = None) -> Response:
    """Model ready (a model is served only once loaded)."""
    model = _model(name, version)
    return json_response({"name": model.name, "ready": True})


def v2_infer(name: str, version: str | None = None) -> Response:
    """Inference with JSON tensors or Triton's binary tensor data."""
    return _answer("v2_infer", name, version)


add_routes(
    bp,
    {
        view.__name__: view
        for view in (
            healthz,
            readyz,
            metrics,
            openapi,
            v1_models,
            v1_model,
            v1_predict,
            shortcut_predict,
            v2_server,
            v2_live,
            v2_ready,
            v2_model,
            v2_model_config,
            v2_model_ready,
            v2_infer,
        )
    },
)
