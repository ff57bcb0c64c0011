"""Model registry: finds models/<name>/<version>/, verifies each artifact, loads it.

Adding a model is dropping a folder with `model.json` and its artifact. The artifact's
sha256 must match the metadata before it is unpickled, because unpickling runs code.
This module knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Model names and versions: the URL converter, the OpenAPI document and the folder scan
# all use this one pattern.
NAME_REGEX = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
NAME_PATTERN = re.compile(f"^{NAME_REGEX}$")
RELOAD_INTERVAL_S = 1.0


class ModelError(Exception):
    """A model folder that cannot be served."""


class UnknownModel(LookupError):
    """No loaded model has this name (or version)."""


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _version_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


@dataclass(frozen=True)
class LoadedModel:
    """One version of one model, ready to predict."""

    name: str
    version: str
    width: int
    feature_names: list[str]
    classes: list[Any]
    sha256: str
    metadata: dict[str, Any]
    estimator: Any = field(repr=False)
    predict_ms: float = 0.0  # a one-row predict, measured at load: what a cache hit saves
    serving: dict[str, Any] = field(default_factory=dict)  # model.json's `serving`, checked

    @property
    def has_proba(self) -> bool:
        """Whether the model gives class probabilities."""
        return hasattr(self.estimator, "predict_proba")

    @property
    def label_datatype(self) -> str:
        """Open Inference Protocol datatype of the predicted labels."""
        return "BYTES" if any(isinstance(c, str) for c in self.classes) else "INT64"

    def predict(self, rows: np.ndarray) -> tuple[list[Any], list[list[float]] | None]:
        """Labels (and probabilities where the model has them) for a 2-D float array."""
        if self.has_proba:
            proba = self.estimator.predict_proba(rows)
            # One pass: argmax of the probabilities is what predict() computes anyway.
            labels = [self.classes[i] for i in proba.argmax(axis=1).tolist()]
            return labels, proba.tolist()
        raw = self.estimator.predict(rows).tolist()
        return raw, None


# model.json may say how the model is served; the replica's settings can still override
# each per model (service.settings.Settings.serving_for).
SERVING_OPTIONS: dict[str, Any] = {
    "cache_policy": lambda v: v in ("on", "off", "auto"),
    "batching": lambda v: v in ("on", "off"),
    "batch_max_rows": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    "batch_max_wait_ms": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v >= 0,
}


def serving_options(block: Any, meta_path: Path) -> dict[str, Any]:
    """A model.json `serving` block, checked: {"cache_policy": "off", "batching": "on", ...}."""
    if not isinstance(block, dict):
        raise ModelError(f"{meta_path}: serving must be an object")
    for key, value in block.items():
        if key not in SERVING_OPTIONS:
            raise ModelError(f"{meta_path}: unknown serving option {key!r} (known: {', '.join(SERVING_OPTIONS)})")
        if not SERVING_OPTIONS[key](value):
            raise ModelError(f"{meta_path}: serving.{key} = {value!r} is not allowed")
    return dict(block)


def load_model(folder: Path) -> LoadedModel:
    """Verify and load one `models/<name>/<version>/` folder, or raise ModelError."""
    meta_path = folder / "model.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{meta_path}: unreadable metadata ({exc})") from None
    try:
        name, version = str(meta["name"]), str(meta["version"])
        artifact = folder / str(meta["artifact"])
        expected_sha = str(meta["sha256"]).lower()
        width = int(meta["inputs"]["width"])
        feature_names = [str(n) for n in meta["inputs"]["feature_names"]]
        classes = list(meta["outputs"]["classes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{meta_path}: missing or bad field {exc}") from None
    if name != folder.parent.name or version != folder.name:
        raise ModelError(f"{meta_path}: says {name}/{version} but lives in {folder.parent.name}/{folder.name}")
    if artifact.resolve().parent != folder.resolve():
        raise ModelError(f"{meta_path}: artifact must be a file inside {folder}")
    if len(feature_names) != width or width <= 0:
        raise ModelError(f"{meta_path}: width {width} but {len(feature_names)} feature names")
    serving = serving_options(meta.get("serving", {}), meta_path)
    try:
        actual_sha = sha256_of(artifact)
    except OSError as exc:
        raise ModelError(f"{artifact}: unreadable artifact ({exc})") from None
    if actual_sha != expected_sha:
        raise ModelError(
            f"{artifact}: sha256 {actual_sha} does not match model.json ({expected_sha}); "
            "refusing to load a file that may have been tampered with"
        )
    import joblib  # deferred: importing joblib is slow and unneeded when nothing loads

    try:
        estimator = joblib.load(artifact)
    except Exception as exc:  # noqa: BLE001 - a verified artifact can still be corrupt or incompatible
        raise ModelError(f"{artifact}: failed to load ({type(exc).__name__}: {exc})") from None
    if getattr(estimator, "n_features_in_", width) != width:
        raise ModelError(f"{artifact}: model expects {estimator.n_features_in_} features, not {width}")
    fitted_classes = getattr(estimator, "classes_", None)
    if fitted_classes is not None and list(np.asarray(fitted_classes).tolist()) != classes:
        raise ModelError(f"{meta_path}: classes {classes} differ from the model's {fitted_classes}")
    if hasattr(estimator, "n_jobs"):
        # Threads inside predict fight gevent's monkey-patched threading; one core each.
        estimator.n_jobs = 1
    model = LoadedModel(name, version, width, feature_names, classes, actual_sha, meta, estimator, serving=serving)
    try:
        return replace(model, predict_ms=_one_row_predict_ms(model))
    except Exception as exc:  # noqa: BLE001 - a model that cannot predict one row is not served
        raise ModelError(f"{artifact}: predict on a row of zeros failed ({type(exc).__name__}: {exc})") from None


def _one_row_predict_ms(model: LoadedModel, repeats: int = 5) -> float:
    row = np.zeros((1, model.width))
    model.predict(row)  # the first call pays one-off set-up
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.predict(row)
        samples.append((time.perf_counter() - started) * 1000)
    return min(samples)


class ModelRegistry:
    """Every model version found under one folder; not ready if any failed to load."""

    def __init__(self, models_dir: Path, default_model: str) -> None:
        self.models_dir = models_dir
        self.default_model = default_model
        self._models: dict[str, dict[str, LoadedModel]] = {}
        self._latest: dict[str, LoadedModel] = {}
        self.errors: list[str] = ["models are still loading"]

    def load(self) -> None:
        """(Re)scan the folder; models load all-or-nothing per version, errors are logged."""
        models: dict[str, dict[str, LoadedModel]] = {}
        errors: list[str] = []
        folders = sorted(self.models_dir.glob("*/*/model.json")) if self.models_dir.is_dir() else []
        for meta_path in folders:
            folder = meta_path.parent
            if not (NAME_PATTERN.match(folder.parent.name) and NAME_PATTERN.match(folder.name)):
                errors.append(f"{folder}: model names and versions are [A-Za-z0-9_.-]")
                continue
            try:
                model = load_model(folder)
            except ModelError as exc:
                errors.append(str(exc))
                continue
            models.setdefault(model.name, {})[model.version] = model
            log.info(
                "loaded model %s version %s (sha256 %s, one-row predict %.3f ms)",
                model.name, model.version, model.sha256[:12], model.predict_ms,
            )  # fmt: skip
        if not folders:
            errors.append(f"no models found under {self.models_dir} (expected <name>/<version>/model.json)")
        elif self.default_model not in models:
            errors.append(f"default model {self.default_model!r} is not among the loaded models")
        for message in errors:
            if message not in self.errors:  # the background rescans repeat only what changed
                log.error("model not served: %s", message)
        self._models = models
        self._latest = {name: versions[max(versions, key=_version_key)] for name, versions in models.items()}
        self.errors = errors

    @property
    def ready(self) -> bool:
        """All found models loaded, and the default model among them."""
        return bool(self._models) and not self.errors

    def load_until_ready(self) -> None:
        """Load now, then keep rescanning until every model has loaded."""
        self.load()
        self.retry_until_ready()

    def retry_until_ready(self) -> None:
        """Rescan every RELOAD_INTERVAL_S until every model loads (models may still be
        arriving). Runs beside the requests, never inside one: readiness only reads state."""
        while not self.ready:
            time.sleep(RELOAD_INTERVAL_S)
            self.load()

    def names(self) -> list[str]:
        """Names of the loaded models, sorted."""
        return sorted(self._models)

    def versions(self, name: str) -> list[str]:
        """Loaded versions of one model, oldest first."""
        if name not in self._models:
            raise UnknownModel(f"model {name!r} not found")
        return sorted(self._models[name], key=_version_key)

    def get(self, name: str, version: str | None = None) -> LoadedModel:
        """The named model, its latest version unless one is asked for."""
        if version is None:
            model = self._latest.get(name)
            if model is None:
                raise UnknownModel(f"model {name!r} not found")
            return model
        model = self._models.get(name, {}).get(version)
        if model is None:
            if name not in self._models:
                raise UnknownModel(f"model {name!r} not found")
            raise UnknownModel(f"model {name!r} has no version {version!r}")
        return model
