"""The handlers of the prediction routes: one request, whichever door it came in by.

Look up the model and version, decode the body with the protocol's codec, predict
(service.dataplane.predictor: result cache, batching), encode, and say what the balancer's L1 may
do with the answer (ETag and Cache-Control, or X-Accel-Expires: 0). The fast lane
(service.web.fastlane) and the Flask views (service.web.views) both call `HANDLERS`; a request
reaches this module as a `Call` (service.dataplane.contract). No Flask, no WSGI here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service import __version__
from service.dataplane.contract import JSON, Answer, Call
from service.dataplane.predictor import Prediction
from service.dataplane.protocols import body, shortcut, v1, v2
from service.dataplane.state import ServiceState
from service.errors import NotFound, Unavailable
from service.models.artifacts import LoadedModel
from service.models.registry import UnknownModel

PREDICT_OUTPUT, PROBA_OUTPUT = "predict", "predict_proba"
PLATFORM = "sklearn"
TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "INT64": "TYPE_INT64",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}

# How long past its TTL the balancer's L1 may still serve a kept answer while one request
# refreshes it (Cache-Control stale-while-revalidate): bounded, so an entry whose refresh
# fails, or comes back not reusable (a split began), stops being served.
L1_STALE_S = 5
L1_REUSE = f"stale-while-revalidate={L1_STALE_S}"


def lookup(current: ServiceState, name: str, version: str | None, call: Call | None = None) -> LoadedModel:
    """The model version a request names (a version drawn by the policy when it names none;
    sticky for the routing-key header): a 404, or a 503 while the replica is not ready."""
    registry = current.registry
    try:
        key = call.header(current.settings.models.routing_key_header) if call is not None else None
        model = registry.get(name, version, key)
    except UnknownModel as exc:
        if not registry.ready:
            # Perhaps a model that failed to load: say so rather than "not found".
            raise Unavailable(f"{exc}; replica not ready: {'; '.join(registry.errors)}") from None
        raise NotFound(str(exc)) from None
    if call is not None:
        call.model_name = model.name
    return model


def _body(current: ServiceState, call: Call) -> bytes:
    """The request body as the protocol codecs take it: a content type real clients send,
    decompressed (bounded by the body limit)."""
    body.check_content_type(call.mimetype)
    limit = current.settings.models.max_body_bytes
    return body.decompress(call.raw_body(limit), call.header("Content-Encoding") or "", limit)


def reusable(current: ServiceState, model: LoadedModel, versioned: bool) -> bool:
    """Whether the balancer's L1 may reuse this model's answer: not one whose version was
    drawn for this request (a split between versions), nor one of a model whose caching
    is declared off."""
    return not current.predictor.policy.of(model).declared_off and (versioned or not current.registry.split(model.name))


def answer_etag(model: LoadedModel) -> str:
    """What identifies the answers of a model version to a given request: the bytes of the
    artifact that computes them (model.onnx's when ONNX Runtime answers) and this code's
    encoding of them (the same request, the same answer)."""
    return f'"{model.name}/{model.version}/{model.identity[:16]}/{__version__}"'


def _prediction_headers(
    current: ServiceState, model: LoadedModel, prediction: Prediction, versioned: bool
) -> dict[str, str]:
    current.metrics.count_version(model.name, model.version)
    headers = {"X-Cache": prediction.cache_status, "X-Model-Version": model.version}
    if reusable(current, model, versioned):
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
    if not reusable(current, model, version is not None):
        return None
    wanted = answer_etag(model)
    return model if any(tag.strip() == wanted for tag in if_none_match.split(",")) else None


def output_names(model: LoadedModel) -> tuple[str, ...]:
    """The model's V2 outputs."""
    return (PREDICT_OUTPUT, PROBA_OUTPUT) if model.has_proba else (PREDICT_OUTPUT,)


def v2_inputs(model: LoadedModel) -> list[dict[str, Any]]:
    """The model's V2 inputs: one tensor of rows, or one per named column."""
    if model.columns is None:
        return [{"name": "input-0", "datatype": "FP64", "shape": [-1, model.width]}]
    return [{"name": c.name, "datatype": c.datatype, "shape": [-1, 1]} for c in model.columns]


def v2_outputs(model: LoadedModel) -> list[dict[str, Any]]:
    """The model's V2 outputs: the prediction, and the class probabilities where it has them."""
    outputs: list[dict[str, Any]] = [{"name": PREDICT_OUTPUT, "datatype": model.label_datatype, "shape": [-1]}]
    if model.has_proba:
        outputs.append({"name": PROBA_OUTPUT, "datatype": "FP64", "shape": [-1, len(model.classes)]})
    return outputs


def v2_metadata(current: ServiceState, model: LoadedModel) -> dict[str, Any]:
    """The Open Inference Protocol's model metadata."""
    parameters: dict[str, Any] = {
        "task": "regression" if model.regression else "classification",
        "feature_names": model.feature_names,
        "classes": model.classes,
        "sha256": model.sha256,
        "runtime": model.runtime,
        "runtime_reason": model.runtime_reason,
    }
    if model.runtime == "onnx":
        parameters["onnx_sha256"] = model.identity
    if model.columns is not None:
        parameters["content_type"] = "pd"  # MLServer's marker: one input per DataFrame column
    return {
        "name": model.name,
        "versions": current.registry.versions(model.name),
        "platform": PLATFORM,
        "inputs": v2_inputs(model),
        "outputs": v2_outputs(model),
        "parameters": parameters,
    }


def triton_config(current: ServiceState, model: LoadedModel) -> dict[str, Any]:
    """Triton's model configuration (its extension's JSON form of ModelConfig): what Triton's
    tools read before they send a request. perf_analyzer's model parser takes the shapes
    from the metadata without their first dimension (max_batch_size > 0: the batch), checks
    that every input and output here is in the metadata, and reads `dynamic_batching` and
    `response_cache`."""
    serving = current.predictor.policy.of(model)

    def tensors(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        described = []
        for entry in entries:
            dims = entry["shape"][1:]
            tensor = {"name": entry["name"], "data_type": TRITON_TYPES[entry["datatype"]], "dims": dims or [1]}
            if not dims:  # one value per row: Triton writes a [1] that reshapes to a scalar
                tensor["reshape"] = {"shape": []}
            described.append(tensor)
        return described

    config: dict[str, Any] = {
        "name": model.name,
        "platform": PLATFORM,
        "backend": "",
        "version_policy": {"specific": {"versions": [model.version]}},
        "max_batch_size": current.settings.models.max_batch_rows,
        "input": tensors(v2_inputs(model)),
        "output": tensors(v2_outputs(model)),
        "instance_group": [{"name": model.name, "kind": "KIND_CPU", "count": 1}],
        "response_cache": {"enable": current.predictor.caches(model)},
        "model_transaction_policy": {"decoupled": False},
        "parameters": {"sha256": {"string_value": model.sha256}, "runtime": {"string_value": model.runtime}},
    }
    if serving.batching:
        wait_us = int(serving.batch_max_wait_ms * 1000)
        config["dynamic_batching"] = {"max_queue_delay_microseconds": wait_us}
    return config


def predict_v1(current: ServiceState, call: Call, name: str | None, version: str | None = None) -> Answer:
    """KServe V1 predict: {"instances": [[...]]} → {"predictions": [...], "probabilities": [[...]]}."""
    model = lookup(current, name or "", None, call)
    rows = v1.decode(_body(current, call), model.width, current.settings.models.max_batch_rows, model.columns)
    prediction = current.predictor.predict(model, rows)
    encoded = v1.encode(prediction.labels, prediction.probabilities)
    return encoded, _prediction_headers(current, model, prediction, False), JSON


def predict_shortcut(current: ServiceState, call: Call, name: str | None = None, version: str | None = None) -> Answer:
    """The tutorials' /predict, for the default model."""
    model = lookup(current, current.settings.models.default_model, None, call)
    rows = shortcut.decode(_body(current, call), model.width, current.settings.models.max_batch_rows, model.columns)
    prediction = current.predictor.predict(model, rows)
    encoded = shortcut.encode(model.name, model.version, prediction.labels, prediction.probabilities)
    return encoded, _prediction_headers(current, model, prediction, False), JSON


def predict_v2(current: ServiceState, call: Call, name: str | None, version: str | None = None) -> Answer:
    """Open Inference Protocol infer, with JSON tensors or Triton's binary tensor data."""
    model = lookup(current, name or "", version, call)
    names = output_names(model)
    limits = (model.width, current.settings.models.max_batch_rows, names, model.columns)
    parsed = v2.decode(_body(current, call), call.header(v2.HEADER_LENGTH), *limits)
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


# The prediction routes' handlers, by the view name of service.web.routes' table.
Handler = Callable[[ServiceState, Call, "str | None", "str | None"], Answer]
HANDLERS: dict[str, Handler] = {
    "shortcut_predict": predict_shortcut,
    "v1_predict": predict_v1,
    "v2_infer": predict_v2,
}
