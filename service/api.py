"""The REST layer: parse, validate, call the data plane, serialize. Nothing else.

Routes follow KServe V1, the Open Inference Protocol (V2 REST), and the tutorials'
`/predict` shortcut; errors are always JSON `{"error": ...}`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol, TypeVar, cast

from flask import Blueprint, Response, g, request

from service import __version__
from service.http import json_response, label_model, request_id, state, wire
from service.inference import Prediction
from service.lifecycle import (
    LATEST,
    SEEN_STALE_S,
    Desired,
    ModelPlan,
    PlanError,
    RecordError,
    RepositoryStore,
    assess,
    check_weights,
    choose_version,
    split_in_effect,
)
from service.models import LoadedModel, ModelError, UnknownModel
from service.openapi import openapi_document
from service.protocols import body, shortcut, v1, v2
from service.redis_client import REDIS_FAILURES
from service.state import ServiceState
from service.validation import InputError, body_object, parse_json

SERVER_NAME = "prediction-cluster"
JSON = "application/json"
PREDICT_OUTPUT, PROBA_OUTPUT = "predict", "predict_proba"

T = TypeVar("T")

bp = Blueprint("api", __name__)
wire(bp)  # the converter first: the routes below use it


class Call(Protocol):
    """One prediction request as the views need it, from Flask's request or (the fast
    lane, service.fastlane) straight from the WSGI environ."""

    request_id: str
    mimetype: str
    model_name: str  # the model the request named, once known (the metrics label)

    def header(self, name: str) -> str | None:
        """A request header, or None."""

    def raw_body(self, limit: int) -> bytes:
        """The body as sent; a 413 InputError beyond `limit` bytes."""


class FlaskCall:
    """The Call of the request Flask is handling."""

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


# What a prediction view returns: the body, its headers and the content type (the model's
# name, the metrics label, is on the Call).
Answer = tuple[bytes, dict[str, str], str]


def _body(current: ServiceState, call: Call) -> bytes:
    """The request body as the protocol codecs take it: a content type real clients send,
    decompressed (bounded by the body limit)."""
    body.check_content_type(call.mimetype)
    limit = current.settings.models.max_body_bytes
    return body.decompress(call.raw_body(limit), call.header("Content-Encoding") or "", limit)


def _model(name: str, version: str | None = None) -> LoadedModel:
    model = _lookup(state(), name, version, None)
    label_model(model.name)
    return model


def _lookup(current: ServiceState, name: str, version: str | None, call: Call | None) -> LoadedModel:
    registry = current.registry
    try:
        key = call.header(current.settings.models.routing_key_header) if call is not None else None
        model = registry.get(name, version, key)
    except UnknownModel as exc:
        if not registry.ready:
            # Perhaps a model that failed to load: say so rather than "not found".
            raise InputError(f"{exc}; replica not ready: {'; '.join(registry.errors)}", 503) from None
        raise InputError(str(exc), 404) from None
    if call is not None:
        call.model_name = model.name
    return model


def _reusable(current: ServiceState, model: LoadedModel, versioned: bool) -> bool:
    """Whether the balancer's L1 may reuse this model's answer: not one whose version was
    drawn for this request (a split between versions), nor one of a model whose caching
    is declared off."""
    return not current.predictor.policy.of(model).declared_off and (versioned or not current.registry.split(model.name))


# How long past its TTL the balancer's L1 may still serve a kept answer while one request
# refreshes it (Cache-Control stale-while-revalidate): bounded, so an entry whose refresh
# fails, or comes back not reusable (a split began), stops being served.
L1_STALE_S = 5
L1_REUSE = f"stale-while-revalidate={L1_STALE_S}"


def answer_etag(model: LoadedModel) -> str:
    """What identifies the answers of a model version to a given request: the model's
    bytes and this code's encoding of them (the same request, the same answer)."""
    return f'"{model.name}/{model.version}/{model.sha256[:16]}/{__version__}"'


def _prediction_headers(
    current: ServiceState, model: LoadedModel, prediction: Prediction, versioned: bool
) -> dict[str, str]:
    current.metrics.count_version(model.name, model.version)
    headers = {"X-Cache": prediction.cache_status, "X-Model-Version": model.version}
    if _reusable(current, model, versioned):
        headers["ETag"] = answer_etag(model)
        headers["Cache-Control"] = L1_REUSE
    else:
        headers["X-Accel-Expires"] = "0"
    return headers


def unchanged(current: ServiceState, name: str, version: str | None, if_none_match: str) -> LoadedModel | None:
    """The model whose answer to a request naming `name` (and `version`) would carry one of
    the ETags in `if_none_match`, or None. The balancer's L1 revalidates an expired answer
    this way (proxy_cache_revalidate): the same request, body included, so an unchanged
    model means an unchanged answer, and a 304 spares parsing and predicting it."""
    try:
        model = current.registry.get(name, version)
    except UnknownModel:
        return None
    if not _reusable(current, model, version is not None):
        return None
    wanted = answer_etag(model)
    return model if any(tag.strip() == wanted for tag in if_none_match.split(",")) else None


def _flask_answer(answer: Answer) -> Response:
    encoded, headers, content_type = answer
    return Response(encoded, headers=headers, content_type=content_type)


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
    return _flask_answer(predict_v1(state(), FlaskCall(), name))


def predict_v1(current: ServiceState, call: Call, name: str) -> Answer:
    """KServe V1 predict (the Flask route and the fast lane)."""
    model = _lookup(current, name, None, call)
    rows = v1.decode(_body(current, call), model.width, current.settings.models.max_batch_rows)
    prediction = current.predictor.predict(model, rows)
    encoded = v1.encode(prediction.labels, prediction.probabilities)
    return encoded, _prediction_headers(current, model, prediction, False), JSON


@bp.post("/predict")
def shortcut_predict() -> Response:
    """The tutorials' shortcut for the default model."""
    return _flask_answer(predict_shortcut(state(), FlaskCall()))


def predict_shortcut(current: ServiceState, call: Call) -> Answer:
    """The tutorials' /predict (the Flask route and the fast lane)."""
    model = _lookup(current, current.settings.models.default_model, None, call)
    rows = shortcut.decode(_body(current, call), model.width, current.settings.models.max_batch_rows)
    prediction = current.predictor.predict(model, rows)
    encoded = shortcut.encode(model.name, model.version, prediction.labels, prediction.probabilities)
    return encoded, _prediction_headers(current, model, prediction, False), JSON


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
    return _flask_answer(predict_v2(state(), FlaskCall(), name, version))


def predict_v2(current: ServiceState, call: Call, name: str, version: str | None) -> Answer:
    """Open Inference Protocol infer (the Flask route and the fast lane)."""
    model = _lookup(current, name, version, call)
    names = _output_names(model)
    parsed = v2.decode(
        _body(current, call), call.header(v2.HEADER_LENGTH), model.width, current.settings.models.max_batch_rows, names
    )
    prediction = current.predictor.predict(model, parsed.rows)
    count = len(prediction.labels)
    outputs = []
    for output in parsed.outputs or names:
        if output == PREDICT_OUTPUT:
            outputs.append(v2.Tensor(output, model.label_datatype, [count], prediction.labels))
        else:
            flat = [p for row in prediction.probabilities or [] for p in row]
            outputs.append(v2.Tensor(output, "FP64", [count, len(model.classes)], flat))
    # The request's own id only (the spec's "if specified, returned"): never X-Request-ID,
    # which differs between requests the balancer's L1 answers with one stored body.
    encoded, headers, content_type = v2.encode(
        model.name, model.version, parsed.request_id, outputs, parsed.binary_outputs
    )
    headers = {**headers, **_prediction_headers(current, model, prediction, version is not None)}
    return encoded, headers, content_type


# --- the model repository (operator routes: the balancer serves them on its internal
# listener only, like /metrics) ----------------------------------------------------------


def _off_loop(work: Callable[[], T]) -> T:
    """Run CPU-bound work (unpickling a model) in an OS thread while this request's
    greenlet waits, so the worker keeps answering other requests meanwhile."""
    try:
        from gevent import monkey

        if monkey.is_module_patched("socket"):
            import gevent

            return cast(T, gevent.get_hub().threadpool.apply(work))
    except ImportError:  # pragma: no cover - gevent is a dependency
        pass
    return work()


def _repository() -> RepositoryStore:
    connect = state().repository
    if connect is None:
        raise InputError(
            "the model repository needs Redis (REDIS_URL) and SERVICE_REPOSITORY_POLL_S > 0: every "
            "replica must hear of a change",
            503,
        )
    try:
        return connect()
    except REDIS_FAILURES as exc:
        raise InputError(f"the model repository is unavailable (Redis: {exc}); nothing changed", 503) from None


def _parameters() -> dict[str, Any]:
    """The optional {"parameters": {...}} of a repository request."""
    raw = request.get_data(cache=False)
    if not raw.strip():
        return {}
    payload = body_object(parse_json(raw))
    parameters = payload.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InputError("parameters must be an object")
    return parameters


def _change(change: Callable[[Desired], Desired], added: list[LoadedModel] | None = None) -> Desired:
    """Store a change of the desired state, then converge this worker on it at once (the
    others within SERVICE_REPOSITORY_POLL_S); `added`: versions this worker already
    loaded for it, served only once the change is stored."""
    store = _repository()
    registry = state().registry  # the worker thread has no app context
    try:
        updated = store.update(change, registry.desired)
    except PlanError as exc:
        raise InputError(str(exc), 409) from None
    except RecordError as exc:
        raise InputError(f"{exc}; nothing changed", 503) from None
    except REDIS_FAILURES as exc:
        raise InputError(f"the model repository is unavailable (Redis: {exc}); nothing changed", 503) from None
    for model in added or []:
        registry.add(model)
    _off_loop(lambda: registry.apply(updated))
    return updated


def _served(name: str) -> list[str]:
    registry = state().registry
    return registry.versions(name) if name in registry.names() else []


def _planned(name: str, plan: ModelPlan) -> list[str]:
    """The versions the desired state serves: those it lists, else those this worker serves
    (every version on disk). Not this worker's alone: it may not have converged yet."""
    return sorted(plan.versions) if plan.versions is not None else _served(name)


def _changed(name: str, desired: Desired) -> Response:
    plan = desired.plan(name)
    return json_response(
        {
            "generation": desired.generation,
            "model": name,
            "versions": _served(name),
            "default": plan.default,
            "weights": dict(plan.weights),
        }
    )


@bp.post("/v2/repository/index")
def repository_index() -> Response:
    """Every model version on disk or served: READY, or UNAVAILABLE with the reason."""
    raw = request.get_data(cache=False)
    ready_only = bool(body_object(parse_json(raw)).get("ready")) if raw.strip() else False
    rows = state().registry.index()
    return json_response([r for r in rows if r["state"] == "READY"] if ready_only else rows)


@bp.post("/v2/repository/models/<model:name>/load")
def repository_load(name: str) -> Response:
    """Load a model's versions from disk on every replica: all of them, or
    {"parameters": {"version": "2", "weight": 10}} (one version, and optionally the
    percent of unversioned requests it gets, the rest staying on today's version)."""
    parameters = _parameters()
    registry = state().registry
    version = parameters.get("version")
    weight = parameters.get("weight")
    if version is not None and not isinstance(version, str | int):
        raise InputError("parameters.version must be a string")
    if weight is not None and (version is None or type(weight) is not int or not 0 <= weight <= 100):
        raise InputError("parameters.weight must be an integer percent, with parameters.version")
    _repository()  # Redis first: a version only this worker knew of would split the replicas
    disk, _ = registry.on_disk()
    versions = [str(version)] if version is not None else sorted(disk.get(name, {}))
    if not versions:
        raise InputError(f"no model folder {name}/<version> under {registry.models_dir}", 404)
    try:  # verify (sha256) and load here first: a version that fails changes nothing anywhere
        loaded = _off_loop(lambda: [registry.load_version(name, v) for v in versions])
    except UnknownModel as exc:
        raise InputError(str(exc), 404) from None
    except ModelError as exc:
        if version is not None:
            registry.version_errors[(name, str(version))] = str(exc)
        raise InputError(f"refused: {exc}", 422) from None

    # The artifacts these versions are from now on: every worker serves exactly these.
    artifacts = {model.version: model.sha256 for model in loaded}

    def change(desired: Desired) -> Desired:
        plan = desired.plan(name)
        plan = replace(plan, artifacts={**plan.artifacts, **artifacts})
        if version is None:
            return desired.with_plan(name, replace(plan, versions=None))
        listed = set(_planned(name, plan)) | {str(version)}
        weights = dict(plan.weights)
        if weight is not None:
            if split_in_effect(plan):
                raise PlanError(
                    f"{name} is already split between versions ({dict(plan.weights)}); set the "
                    "weights with the policy route instead"
                )
            others = [v for v in _planned(name, plan) if v != str(version)]
            base = choose_version(name, replace(plan, weights={}), others, None)
            weights = {str(version): weight, **({base: 100 - weight} if base and weight < 100 else {})}
        return desired.with_plan(name, replace(plan, versions=tuple(sorted(listed)), weights=weights))

    return _changed(name, _change(change, loaded))


@bp.post("/v2/repository/models/<model:name>/unload")
def repository_unload(name: str) -> Response:
    """Unload a model on every replica, or one version of it ({"parameters": {"version": "1"}}):
    refused while unversioned requests are still sent to that version."""
    parameters = _parameters()
    version = parameters.get("version")
    if version is not None and not isinstance(version, str | int):
        raise InputError("parameters.version must be a string")
    if not _served(name) and version is None:
        raise InputError(f"model {name!r} not found", 404)

    def change(desired: Desired) -> Desired:
        plan = desired.plan(name)
        served = _planned(name, plan)
        if version is None:
            return desired.with_plan(name, ModelPlan(versions=()))
        gone = str(version)
        if gone not in served:
            raise PlanError(f"model {name!r} serves no version {gone!r}")
        if plan.weights.get(gone, 0) > 0:
            raise PlanError(
                f"version {gone} still gets {plan.weights[gone]} % of {name}'s unversioned requests; "
                "move them with the policy route first"
            )
        if plan.default == gone:
            raise PlanError(f"version {gone} is {name}'s pinned default; change the policy first")
        remaining = tuple(v for v in served if v != gone)
        weights = {v: w for v, w in plan.weights.items() if v != gone}
        artifacts = {v: a for v, a in plan.artifacts.items() if v != gone}
        return desired.with_plan(name, replace(plan, versions=remaining, weights=weights, artifacts=artifacts))

    return _changed(name, _change(change))


@bp.post("/v2/repository/models/<model:name>/policy")
def repository_policy(name: str) -> Response:
    """Which version unversioned requests get: {"default": "latest" | "<version>",
    "weights": {"1": 90, "2": 10}} (weights over served versions, summing to 100; {} ends
    a split). Explicit version paths always get their version."""
    payload = body_object(parse_json(request.get_data(cache=False)))
    unknown = set(payload) - {"default", "weights"}
    if unknown:
        raise InputError(f"unknown policy fields: {', '.join(sorted(unknown))} (known: default, weights)")
    if not _served(name):
        raise InputError(f"model {name!r} not found", 404)

    def change(desired: Desired) -> Desired:
        plan = desired.plan(name)
        served = set(_planned(name, plan))
        default = str(payload.get("default", plan.default))
        if default != LATEST and default not in served:
            raise PlanError(f"default must be 'latest' or a served version of {name} ({', '.join(sorted(served))})")
        raw = payload.get("weights", plan.weights)
        if not isinstance(raw, dict):
            raise PlanError("weights must be an object of version: percent")
        weights = check_weights({str(k): v for k, v in raw.items()}, served)
        return desired.with_plan(name, replace(plan, default=default, weights=weights))

    return _changed(name, _change(change))


@bp.get("/v2/repository/status")
def repository_status() -> Response:
    """The desired state, what Redis holds of it, and which generation each worker of each
    replica serves. While the record is missing, malformed or older than what this worker
    serves, the state shown is this worker's (the replicas write it back within a poll)."""
    store = _repository()
    current = state()
    try:
        record = store.read()
        workers = store.reports(SEEN_STALE_S + 3 * current.settings.models.repository_poll_s)
    except REDIS_FAILURES as exc:
        raise InputError(f"the model repository is unavailable (Redis: {exc})", 503) from None
    obeyed, record = assess(record, current.registry.desired)
    desired = obeyed if obeyed is not None else current.registry.desired
    behind = sorted(w for w, r in workers.items() if r["generation"] != desired.generation)
    return json_response(
        {
            "generation": desired.generation,
            "models": {name: plan.to_json() for name, plan in desired.models.items()},
            "record": record.describe(),
            "workers": workers,
            "converged": bool(workers) and not behind and obeyed is not None,
            "behind": behind,
        }
    )
