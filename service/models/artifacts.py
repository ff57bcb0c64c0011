"""One model version: its folder verified, its artifact loaded, its predict timed.

A folder is `models/<name>/<version>/` with `model.json` and the artifact it names
(docs/models.md has every field). The artifact's sha256 must match model.json before it is
unpickled, because unpickling runs code. A model takes plain rows of `width` numbers, or
named columns of mixed types (`inputs.columns`, service.inputs.columns), predicted as a DataFrame;
it is a classifier (labels, and probabilities where it has them) or a regressor (numbers).
The registry (service.models.registry) finds the folders and keeps what is served. This module
knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from service.errors import InputError
from service.inputs.columns import Column, columns_from_json, example_row, frame, typed_rows
from service.inputs.parsing import type_name
from service.models.compiled import RUNTIMES, OnnxModel, Verification, verification_rows, verify
from service.models.serving import ServingError, ServingOptions

log = logging.getLogger(__name__)

TASKS = ("classification", "regression")


class ModelError(Exception):
    """A model folder that cannot be served."""


class ArtifactMismatch(ModelError):
    """A folder holds another artifact than the one the desired state names for it."""


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def declared_sha256(folder: Path) -> str | None:
    """The sha256 a model folder's model.json declares (None: unreadable), without loading it."""
    try:
        declared = _read_meta(folder / "model.json", "model.json").raw.get("sha256")
    except ModelError:
        return None
    return declared.lower() if type(declared) is str else None


@dataclass(frozen=True)
class LoadedModel:
    """One version of one model, ready to predict."""

    name: str
    version: str
    width: int
    feature_names: list[str]
    classes: list[Any]
    sha256: str
    estimator: Any = field(repr=False)
    predict_ms: float = 0.0  # a one-row predict, measured at load: what a hit saves an idle replica
    batch_row_ms: float = 0.0  # per row of a BUSY_BATCH_ROWS predict: what a hit saves a busy one
    serving: ServingOptions = field(default_factory=ServingOptions)  # model.json's `serving`
    columns: tuple[Column, ...] | None = None  # named inputs (a DataFrame); None: plain float rows
    regression: bool = False  # predicts numbers, not classes
    example_row: tuple[Any, ...] | None = None  # model.json's inputs.example, in column order
    compiled: OnnxModel | None = field(default=None, repr=False)  # ONNX Runtime answers, when verified
    answer_sha256: str = ""  # the artifact that computes the answers: model.onnx's when compiled
    runtime_reason: str = ""  # why this runtime answers (model.json's word, checked at load)

    @property
    def runtime(self) -> str:
        """Which runtime computes the answers: onnx (ONNX Runtime) or sklearn."""
        return "onnx" if self.compiled is not None else "sklearn"

    @property
    def identity(self) -> str:
        """The sha256 of the artifact that computes the answers: what the result cache's keys
        and the L1's ETag name, so answers of two runtimes never share a key."""
        return self.answer_sha256 or self.sha256

    def with_compiled(self, compiled: OnnxModel | None, sha256: str, reason: str) -> LoadedModel:
        """This version answered by `compiled` (None: by scikit-learn)."""
        return replace(self, compiled=compiled, answer_sha256=sha256 if compiled else "", runtime_reason=reason)

    @property
    def has_proba(self) -> bool:
        """Whether the model gives class probabilities."""
        return not self.regression and hasattr(self.estimator, "predict_proba")

    @property
    def label_datatype(self) -> str:
        """Open Inference Protocol datatype of the predictions."""
        if self.regression:
            return "FP64"
        return "BYTES" if any(isinstance(c, str) for c in self.classes) else "INT64"

    def predict(self, rows: np.ndarray) -> tuple[list[Any], list[list[float]] | None]:
        """Labels (and probabilities where the model has them), or a regressor's numbers, for
        rows of floats (a 2-D float array) or typed rows of named columns (service.inputs.columns)."""
        if self.compiled is not None:
            return self._predict_compiled(rows)
        inputs = frame(rows, self.columns) if self.columns is not None else rows
        if self.has_proba:
            proba = self.estimator.predict_proba(inputs)
            # One pass: argmax of the probabilities is what predict() computes anyway.
            labels = [self.classes[i] for i in proba.argmax(axis=1).tolist()]
            return labels, proba.tolist()
        raw = self.estimator.predict(inputs)
        if self.regression:
            return np.asarray(raw, dtype=np.float64).reshape(len(rows)).tolist(), None
        return raw.tolist(), None

    def _predict_compiled(self, rows: np.ndarray) -> tuple[list[Any], list[list[float]] | None]:
        assert self.compiled is not None
        outputs = self.compiled.run(rows)
        if self.regression:
            return np.asarray(outputs[0], dtype=np.float64).reshape(len(rows)).tolist(), None
        if self.has_proba:
            proba = np.asarray(outputs[1], dtype=np.float64)
            return [self.classes[i] for i in proba.argmax(axis=1).tolist()], proba.tolist()
        return [str(v) if isinstance(v, str) else v for v in np.asarray(outputs[0]).tolist()], None

    def example(self, count: int) -> np.ndarray:
        """`count` rows the model takes: model.json's example, else zeros (or a category
        where a column lists them)."""
        if self.columns is None:
            row = self.example_row or (0.0,) * self.width
            return np.array([row] * count, dtype=np.float64)
        return typed_rows([list(self.example_row or example_row(self.columns))] * count)


SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_KIND_NAMES = {str: "a string", int: "an integer", list: "an array", dict: "an object"}


class _Meta:
    """model.json read field by field, each checked against its type: a field that is
    missing or of another type is a ModelError naming it, never a TypeError further on.
    model.json is input like a request body: a copied, hand-edited or half-written file
    must not stop the registry, only its own version."""

    def __init__(self, raw: Any, where: str) -> None:
        self.where = where
        self.raw = self._object(raw, "model.json")

    def fail(self, message: str) -> NoReturn:
        raise ModelError(f"{self.where}: {message}")

    def _object(self, value: Any, field: str) -> dict[str, Any]:
        if type(value) is not dict:
            self.fail(f"{field} must be an object, got {type_name(value)}")
        return value

    def get(self, block: dict[str, Any], key: str, kinds: tuple[type, ...], field: str, default: Any = ...) -> Any:
        """block[key] if it is of one of `kinds` (bool is never an int here)."""
        if key not in block:
            if default is ...:
                self.fail(f"{field} is missing")
            return default
        value = block[key]
        if type(value) not in kinds:
            names = " or ".join(_KIND_NAMES[kind] for kind in kinds)
            self.fail(f"{field} must be {names}, got {type_name(value)}")
        return value

    def text(self, block: dict[str, Any], key: str, field: str, default: Any = ...) -> str:
        value = self.get(block, key, (str,), field, default)
        if value is not default and not value:
            self.fail(f"{field} must not be empty")
        return value

    def block(self, key: str) -> dict[str, Any]:
        return self._object(self.get(self.raw, key, (dict,), key), key)


def _read_meta(meta_path: Path, where: str) -> _Meta:
    """model.json as a checked _Meta; ModelError if unreadable or not an object."""
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{where}: unreadable ({type(exc).__name__})") from None
    except (ValueError, RecursionError) as exc:
        raise ModelError(f"{where}: not valid JSON ({str(exc)[:120]})") from None
    return _Meta(raw, where)


def load_model(folder: Path, runtime: str = "auto") -> LoadedModel:
    """Verify and load one `models/<name>/<version>/` folder, or raise ModelError. Messages
    name the folder as `<name>/<version>`, never an absolute path: they reach /readyz.
    `runtime` auto: a model.onnx model.json names answers once it agrees with scikit-learn
    here; sklearn: scikit-learn answers."""
    label = f"{folder.parent.name}/{folder.name}"
    where = f"{label}/model.json"
    meta = _read_meta(folder / "model.json", where)
    raw = meta.raw
    version_value = meta.get(raw, "version", (str, int), "version")
    name, version = meta.text(raw, "name", "name"), str(version_value)
    artifact_name = meta.text(raw, "artifact", "artifact")
    expected_sha = meta.text(raw, "sha256", "sha256")
    if not SHA256_HEX.match(expected_sha):
        meta.fail("sha256 must be 64 hexadecimal digits")
    expected_sha = expected_sha.lower()
    inputs, outputs = meta.block("inputs"), meta.block("outputs")
    try:
        columns = columns_from_json(inputs["columns"], "inputs.columns") if "columns" in inputs else None
    except ValueError as exc:
        meta.fail(str(exc))
    if columns is None:
        width = meta.get(inputs, "width", (int,), "inputs.width")
        feature_names = meta.get(inputs, "feature_names", (list,), "inputs.feature_names")
        if not all(type(n) is str for n in feature_names):
            meta.fail("inputs.feature_names must be strings")
    else:
        width, feature_names = len(columns), [c.name for c in columns]
    classes = meta.get(outputs, "classes", (list,), "outputs.classes", [])
    if not all(type(c) in (str, int) for c in classes):
        meta.fail("outputs.classes must be strings or integers")
    task = meta.get(raw, "task", (str,), "task", "classification" if classes else "regression")
    try:
        example = _example(inputs.get("example"), width, columns)
    except ValueError as exc:
        meta.fail(str(exc))
    if task not in TASKS:
        meta.fail(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    if task == "classification" and not classes:
        meta.fail("a classifier needs outputs.classes")
    if name != folder.parent.name or version != folder.name:
        meta.fail(f"says {name}/{version} but lives in {label}")
    artifact = folder / artifact_name
    if artifact.resolve().parent != folder.resolve():
        meta.fail(f"artifact must be a file inside {label}")
    if len(feature_names) != width or width <= 0:
        meta.fail(f"width {width} but {len(feature_names)} feature names")
    try:
        serving = ServingOptions.from_json(raw.get("serving", {}))
    except ServingError as exc:
        meta.fail(str(exc))
    shown = f"{label}/{artifact_name}"
    try:
        actual_sha = sha256_of(artifact)
    except OSError as exc:
        raise ModelError(f"{shown}: unreadable artifact ({type(exc).__name__})") from None
    if actual_sha != expected_sha:
        raise ModelError(
            f"{shown}: sha256 {actual_sha} does not match model.json ({expected_sha}); "
            "refusing to load a file that may have been tampered with"
        )
    import joblib  # deferred: importing joblib is slow and unneeded when nothing loads

    try:
        estimator = joblib.load(artifact)
    except Exception as exc:  # noqa: BLE001 - a verified artifact can still be corrupt or incompatible
        # The exception's text (paths of this host, library internals) goes to the log only.
        log.error("%s: failed to load", shown, exc_info=exc)
        raise ModelError(f"{shown}: failed to load ({type(exc).__name__}; the replica's log has the details)") from None
    if not callable(getattr(estimator, "predict", None)):
        raise ModelError(f"{shown}: a {type(estimator).__name__} has no predict(); not a model")
    if getattr(estimator, "n_features_in_", width) != width:
        raise ModelError(f"{shown}: model expects {estimator.n_features_in_} features, not {width}")
    fitted_names = getattr(estimator, "feature_names_in_", None)
    if fitted_names is not None and list(fitted_names) != feature_names:
        meta.fail(f"inputs {feature_names} differ from the columns the model was fitted on")
    if fitted_names is not None and columns is None:
        meta.fail("the model was fitted on named columns; list them in inputs.columns")
    fitted_classes = getattr(estimator, "classes_", None)
    if task == "classification" and fitted_classes is not None:
        if list(np.asarray(fitted_classes).tolist()) != classes:
            meta.fail(f"classes {classes} differ from the model's {fitted_classes}")
    if hasattr(estimator, "n_jobs"):
        # Threads inside predict fight gevent's monkey-patched threading; one core each.
        estimator.n_jobs = 1
    model = LoadedModel(
        name,
        version,
        width,
        feature_names,
        classes,
        actual_sha,
        estimator,
        serving=serving,
        columns=columns,
        regression=task == "regression",
        example_row=example,
    )
    model = _with_runtime(model, meta, folder, label, runtime)
    try:
        return replace(model, predict_ms=_predict_ms(model, 1), batch_row_ms=_predict_ms(model, BUSY_BATCH_ROWS))
    except Exception as exc:  # noqa: BLE001 - a model that cannot predict one row is not served
        log.error("%s: predict on an example row failed", shown, exc_info=exc)
        raise ModelError(
            f"{shown}: predict on an example row failed ({type(exc).__name__}; the replica's log has the details)"
        ) from None


def verify_compiled(model: LoadedModel, compiled: OnnxModel, rows: np.ndarray) -> Verification:
    """scikit-learn (`model` as loaded) against `compiled` on `rows`."""
    return verify(model.predict(rows), model.with_compiled(compiled, "", "").predict(rows), model.regression)


def _with_runtime(model: LoadedModel, meta: _Meta, folder: Path, label: str, runtime: str) -> LoadedModel:
    """`model` answered by the model.onnx model.json's `runtime` block names, when `runtime`
    allows it and it agrees with scikit-learn on the verification rows here; else as is. A
    model.onnx whose sha256 differs from model.json's refuses the version, as the pickle's does."""
    block = meta.get(meta.raw, "runtime", (dict,), "runtime", None)
    if block is None:
        return model.with_compiled(None, "", "no compiled artifact (model.json has no runtime block)")
    chosen = meta.text(block, "chosen", "runtime.chosen")
    reason = meta.get(block, "reason", (str,), "runtime.reason", "")
    if chosen not in RUNTIMES:
        meta.fail(f"runtime.chosen must be one of {', '.join(RUNTIMES)}, not {chosen!r}")
    if chosen == "sklearn":
        return model.with_compiled(None, "", reason)
    onnx = meta.get(block, "onnx", (dict,), "runtime.onnx")
    artifact_name = meta.text(onnx, "artifact", "runtime.onnx.artifact")
    expected = meta.text(onnx, "sha256", "runtime.onnx.sha256")
    if not SHA256_HEX.match(expected):
        meta.fail("runtime.onnx.sha256 must be 64 hexadecimal digits")
    path = folder / artifact_name
    if path.resolve().parent != folder.resolve():
        meta.fail(f"runtime.onnx.artifact must be a file inside {label}")
    if runtime == "sklearn":
        return model.with_compiled(None, "", "SERVICE_RUNTIME says sklearn for this model")
    shown = f"{label}/{artifact_name}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{shown}: unreadable artifact ({type(exc).__name__})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        raise ModelError(
            f"{shown}: sha256 {actual} does not match model.json ({expected.lower()}); "
            "refusing to load a file that may have been tampered with"
        )
    try:
        compiled = OnnxModel(data, model.columns)
        rows = verification_rows(model.estimator, model.width, model.columns, model.example_row)
        verification = verify_compiled(model, compiled, rows)
    except Exception as exc:  # noqa: BLE001 - no ONNX Runtime, or a session that fails: scikit-learn answers
        log.warning("%s: not served by ONNX Runtime (%s: %s); scikit-learn answers", shown, type(exc).__name__, exc)
        return model.with_compiled(None, "", f"model.onnx could not run here ({type(exc).__name__})")
    if not verification.passed:
        log.warning("%s: disagrees with scikit-learn here (%s); scikit-learn answers", shown, verification.describe())
        return model.with_compiled(None, "", f"model.onnx disagrees with scikit-learn here ({verification.describe()})")
    return model.with_compiled(
        compiled, actual, f"ONNX Runtime, equal to scikit-learn here on {verification.describe()}"
    )


def _example(raw: Any, width: int, columns: tuple[Column, ...] | None) -> tuple[Any, ...] | None:
    """model.json's `inputs.example` checked: `width` numbers, or a value for each column
    (ValueError if it is neither)."""
    if raw is None:
        return None
    if columns is None:
        if type(raw) is not list or len(raw) != width or not all(type(v) in (int, float) for v in raw):
            raise ValueError(f"inputs.example must be {width} numbers")
        return tuple(float(v) for v in raw)
    if type(raw) is not dict or set(raw) != {c.name for c in columns}:
        raise ValueError("inputs.example must give a value for each column, by name")
    try:
        return tuple(c.check(raw[c.name], f"inputs.example.{c.name}") for c in columns)
    except InputError as exc:
        raise ValueError(str(exc)) from None


# Rows a busy worker typically predicts in one batched call (32 connections over 2-4
# replicas): a cheap model's cost is mostly per call, and a hit saves a busy worker only
# its row's share of one.
BUSY_BATCH_ROWS = 8


def _predict_ms(model: LoadedModel, rows: int, repeats: int = 5) -> float:
    """Per row of a `rows`-row predict: the fastest of a few (the first pays one-off set-up)."""
    batch = model.example(rows)
    model.predict(batch)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.predict(batch)
        samples.append((time.perf_counter() - started) * 1000)
    return min(samples) / rows
