"""Model registry: finds models/<name>/<version>/, loads each version (service.models.artifacts
verifies and loads one), and keeps what this worker serves: every version on disk, or
those the desired state (service.models.lifecycle) lists. Adding a model is dropping a folder
with `model.json` and its artifact. This module knows nothing of HTTP.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

from service.models.artifacts import (
    BUSY_BATCH_ROWS,
    ArtifactMismatch,
    LoadedModel,
    ModelError,
    declared_sha256,
    load_model,
)
from service.models.lifecycle import Desired, choose_version, primary_version, split_in_effect
from service.settings import PerModel

log = logging.getLogger(__name__)

# Model names and versions: the URL converter, the OpenAPI document and the folder scan
# all use this one pattern.
NAME_REGEX = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
NAME_PATTERN = re.compile(f"^{NAME_REGEX}$")
RELOAD_INTERVAL_S = 1.0


class UnknownModel(LookupError):
    """No loaded model has this name (or version)."""


def _version_key(version: str) -> tuple[int, int | str]:
    return (0, int(version)) if version.isdigit() else (1, version)


def _load_guarded(folder: Path, runtime: str) -> LoadedModel:
    """load_model, with any error it did not foresee made that version's ModelError: one
    folder never stops the loader, the converger or another model."""
    try:
        return load_model(folder, runtime)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug meeting one odd folder must stay with that folder
        log.error("loading %s/%s failed unexpectedly", folder.parent.name, folder.name, exc_info=exc)
        raise ModelError(f"{folder.parent.name}/{folder.name}: cannot be loaded ({type(exc).__name__})") from None


def _settle_heap(unloaded: bool) -> None:
    """After the models served changed: collect what is garbage, then freeze the rest
    (gc.freeze: the collector no longer scans what is there now). A replica's heap holds
    its models, pandas and scikit-learn: some 150,000 objects that a full collection
    scanned in about 70 ms, a stall of every request of the worker a few times a minute
    under load, which a queue discipline reads as overload. What requests allocate
    afterwards is collected as before. After an unload, the freed heap goes back to the
    OS too (glibc keeps large freed blocks, an ONNX Runtime session's among them, for
    reuse, so a worker's memory would look as if every unloaded version were still held)."""
    gc.unfreeze()
    gc.collect()
    if unloaded:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc: nothing to ask
    gc.freeze()


class ModelRegistry:
    """Every model version found under one folder, or the versions the desired state
    (service.models.lifecycle) lists; not ready until every one of those loaded at start.

    Readers (requests, in the gevent loop) and the loaders (an OS thread) share it: every
    change builds new dicts and swaps them in, so a reader sees one state or the next."""

    def __init__(self, models_dir: Path, default_model: str, runtime: PerModel | None = None) -> None:
        self.models_dir = models_dir
        self.default_model = default_model
        self.runtime = runtime or PerModel("auto")  # SERVICE_RUNTIME: auto or sklearn, per model
        self._models: dict[str, dict[str, LoadedModel]] = {}
        self._latest: dict[str, LoadedModel] = {}
        self.desired = Desired()
        self.errors: list[str] = ["models are still loading"]
        # After start, versions that failed to load: reported, never a reason to be unready.
        self.version_errors: dict[tuple[str, str], str] = {}
        self._started = False
        # Told the (name, version, sha256) of every served model after each change.
        self.listeners: list[Callable[[set[tuple[str, str, str]]], None]] = []

    def on_disk(self) -> tuple[dict[str, dict[str, Path]], list[str]]:
        """{name: {version: folder}} of every model folder, and the folders misnamed."""
        found: dict[str, dict[str, Path]] = {}
        errors = []
        folders = sorted(self.models_dir.glob("*/*/model.json")) if self.models_dir.is_dir() else []
        for meta_path in folders:
            folder = meta_path.parent
            if not (NAME_PATTERN.match(folder.parent.name) and NAME_PATTERN.match(folder.name)):
                errors.append(f"{folder.parent.name!r}/{folder.name!r}: model names and versions are [A-Za-z0-9_.-]")
                continue
            found.setdefault(folder.parent.name, {})[folder.name] = folder
        return found, errors

    def load(self, desired: Desired | None = None) -> None:
        """(Re)load at start: every version on disk, or those `desired` lists; all-or-nothing
        per version, errors logged; not ready while any failed."""
        if desired is not None:
            self.desired = desired
        disk, errors = self.on_disk()
        models: dict[str, dict[str, LoadedModel]] = {}
        for name, versions in disk.items():
            plan = self.desired.plan(name)
            for version, folder in versions.items():
                if plan.versions is not None and version not in plan.versions:
                    continue
                try:
                    model = self._from_disk(name, version, folder, plan.artifacts.get(version))
                except ArtifactMismatch as exc:  # served by no replica until the folder matches again
                    self.version_errors[(name, version)] = str(exc)
                    log.error("model version not served: %s", exc)
                    continue
                except ModelError as exc:
                    # Only what this worker must serve keeps it unready: the default model
                    # (below) and the versions the operator listed. A bad folder of another
                    # model is that version's error, shown in /readyz, the index and status.
                    if plan.versions is not None:
                        errors.append(str(exc))
                    elif self.version_errors.get((name, version)) != str(exc):
                        self.version_errors[(name, version)] = str(exc)
                        log.error("model version not served: %s", exc)
                    continue
                self.version_errors.pop((name, version), None)
                models.setdefault(model.name, {})[model.version] = model
        if not disk:
            errors.append("no models found in the models folder (expected <name>/<version>/model.json)")
        elif self.default_model not in models and self.desired.plan(self.default_model).versions != ():
            failed = [e for (name, _), e in sorted(self.version_errors.items()) if name == self.default_model]
            errors.extend(failed)
            errors.append(f"default model {self.default_model!r} is not among the loaded models")
        for message in errors:
            if message not in self.errors:  # the background rescans repeat only what changed
                log.error("model not served: %s", message)
        self._swap(models)
        self.errors = errors
        self._started = self.ready

    def _loaded(self, name: str, version: str) -> LoadedModel | None:
        return self._models.get(name, {}).get(version)

    def _from_disk(self, name: str, version: str, folder: Path, expected: str | None = None) -> LoadedModel:
        """The version as its folder holds it now: the loaded one while its artifact is the
        one model.json declares, else loaded afresh. `expected`: the sha256 the desired
        state names (ArtifactMismatch if the folder holds another)."""
        loaded = self._loaded(name, version)
        declared = declared_sha256(folder)
        if loaded is not None and loaded.sha256 == declared:
            model = loaded
        elif expected is not None and declared != expected:
            model = None
        else:
            model = _load_guarded(folder, self.runtime.explicit(name) or self.runtime.default)
        if model is None or (expected is not None and model.sha256 != expected):
            raise ArtifactMismatch(
                f"{name}/{version}: holds artifact {declared or 'unreadable'} but the model repository "
                f"serves {name} version {version} as {expected}; load it again to serve "
                "the folder's"
            )
        return model

    def _swap(self, models: dict[str, dict[str, LoadedModel]]) -> None:
        loaded = False
        for name, versions in models.items():
            for version, model in versions.items():
                if self._loaded(name, version) is not model:
                    loaded = True
                    log.info(
                        "loaded model %s version %s (sha256 %s, %s, predict %.3f ms a row, %.3f ms per row of %d)",
                        name,
                        version,
                        model.sha256[:12],
                        "ONNX Runtime" if model.runtime == "onnx" else "scikit-learn",
                        model.predict_ms,
                        model.batch_row_ms,
                        BUSY_BATCH_ROWS,
                    )
        unloaded = False
        for name, versions in self._models.items():
            for version in versions:
                if version not in models.get(name, {}):
                    log.info("unloaded model %s version %s", name, version)
                    unloaded = True
        self._models = {name: versions for name, versions in models.items() if versions}
        self._latest = {name: versions[max(versions, key=_version_key)] for name, versions in self._models.items()}
        served = {(m.name, m.version, m.sha256) for versions in self._models.values() for m in versions.values()}
        for listener in self.listeners:
            listener(served)
        if loaded or unloaded:
            _settle_heap(unloaded)

    def apply(self, desired: Desired) -> list[str]:
        """Converge on `desired` after start (called when it changed, or to look for new
        folders): load listed versions not loaded, unload those no longer listed, and load
        new folders of models whose versions nobody listed. A version that fails to load
        leaves the others serving; the errors are returned."""
        if not self._started:
            return ["models are still loading"]
        self.desired = desired
        disk, _ = self.on_disk()
        models = {name: dict(versions) for name, versions in self._models.items()}
        errors: list[str] = []
        for name in sorted(set(disk) | set(models) | set(desired.models)):
            plan = desired.plan(name)
            if plan.versions is None:  # every version on disk (new folders load on a change, or a scan)
                target = set(models.get(name, {})) | set(disk.get(name, {}))
            else:
                target = set(plan.versions)
            current = models.setdefault(name, {})
            for version in sorted(set(current) - target):
                del current[version]
            # A served version whose artifact is not the one the plan names is replaced.
            stale = {v for v, m in current.items() if plan.artifacts.get(v, m.sha256) != m.sha256}
            for version in sorted((target - set(current)) | stale):
                folder = disk.get(name, {}).get(version)
                current.pop(version, None)
                try:
                    if folder is None:
                        raise ModelError(f"{name}/{version}: no such model folder")
                    current[version] = self._from_disk(name, version, folder, plan.artifacts.get(version))
                    self.version_errors.pop((name, version), None)
                except ModelError as exc:
                    self.version_errors[(name, version)] = str(exc)
                    errors.append(str(exc))
        for message in errors:
            log.error("model version not served: %s", message)
        self._swap(models)
        return errors

    def load_version(self, name: str, version: str) -> LoadedModel:
        """Verify and load one version from disk (not served until added); ModelError if it
        cannot be, UnknownModel if there is no such folder."""
        folder = self.models_dir / name / version
        if not (NAME_PATTERN.match(name) and NAME_PATTERN.match(version)) or not (folder / "model.json").is_file():
            raise UnknownModel(f"no model folder {name}/{version} in the models folder")
        return self._from_disk(name, version, folder)

    def add(self, model: LoadedModel) -> None:
        """Serve one more version (loaded by load_version)."""
        models = {name: dict(versions) for name, versions in self._models.items()}
        models.setdefault(model.name, {})[model.version] = model
        self.version_errors.pop((model.name, model.version), None)
        self._swap(models)

    def unavailable(self) -> dict[str, str]:
        """{"<name>/<version>": why} of every version that failed to load and is not served."""
        return {f"{name}/{version}": why for (name, version), why in sorted(self.version_errors.items())}

    @property
    def ready(self) -> bool:
        """At start: every model to serve loaded, and the default model among them."""
        return bool(self._models) and not self.errors

    def load_until_ready(self, desired: Callable[[], Desired | None] | None = None) -> None:
        """Load now (the versions `desired()` lists, if it can say), then keep rescanning
        until every model has loaded."""
        known = desired() if desired else None
        if known is not None:
            self.desired = known
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

    def split(self, name: str) -> bool:
        """Whether unversioned requests of `name` are split between versions now."""
        return split_in_effect(self.desired.plan(name))

    def get(self, name: str, version: str | None = None, routing_key: str | None = None) -> LoadedModel:
        """The named version, or the one the model's version policy gives an unversioned
        request (`routing_key` keeps a client on one version of a split)."""
        versions = self._models.get(name)
        if version is None:
            if not versions:
                raise UnknownModel(f"model {name!r} not found")
            plan = self.desired.plan(name)
            if not plan.weights and plan.default not in versions:
                return self._latest[name]
            chosen = choose_version(name, plan, sorted(versions, key=_version_key), routing_key)
            return versions[chosen] if chosen else self._latest[name]
        model = (versions or {}).get(version)
        if model is None:
            if not versions:
                raise UnknownModel(f"model {name!r} not found")
            raise UnknownModel(f"model {name!r} has no version {version!r}")
        return model

    def primary(self, name: str) -> str | None:
        """The version that speaks for `name` as a whole (lifecycle.primary_version), or None
        if no version of it is served."""
        versions = self._models.get(name)
        if not versions:
            return None
        return primary_version(name, self.desired.plan(name), sorted(versions, key=_version_key))

    def index(self) -> list[dict[str, str]]:
        """Every version on disk or loaded: READY, or UNAVAILABLE with the reason."""
        disk, _ = self.on_disk()
        rows = []
        for name in sorted(set(disk) | set(self._models)):
            wanted = self.desired.plan(name).versions
            for version in sorted(set(disk.get(name, {})) | set(self._models.get(name, {})), key=_version_key):
                if version in self._models.get(name, {}):
                    rows.append({"name": name, "version": version, "state": "READY", "reason": ""})
                    continue
                reason = self.version_errors.get((name, version)) or (
                    "unloaded" if wanted is not None and version not in wanted else "not loaded"
                )
                rows.append({"name": name, "version": version, "state": "UNAVAILABLE", "reason": reason})
        return rows
