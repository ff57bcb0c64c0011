"""Turn a fitted model file into a model folder the cluster serves: `scripts/cluster model add`.

    python -m service.models.packaging describe FOLDER [--input COLUMN=DATATYPE ...]   (the child)

`add_model` copies a joblib or pickle file of any scikit-learn-API estimator or Pipeline
into a staging folder under the models folder, and has a child process unpickle it
(unpickling runs the file's code: a crash, an exit or a hang stays in the child), read
what it needs (named columns or a width, column datatypes where an encoder records them,
classes, classifier or regressor), predict one example row, write model.json with the
artifact's sha256 and load the folder exactly as a replica will (service.models.artifacts). Only
then is the folder renamed into place, in one step: the replicas never see half of one,
and a refused file leaves nothing behind. model.json is the contract (docs/models.md), so
a CI pipeline may write it without this module.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.inputs.columns import DATATYPES, Column, example_row, frame, typed_rows
from service.models.artifacts import ModelError, load_model, sha256_of
from service.models.compiled import input_names, walk
from service.models.conversion import read_sample, runtime_block
from service.models.registry import NAME_PATTERN

SUFFIXES = (".joblib", ".pkl", ".pickle")
CHILD_TIMEOUT_S = 300.0
_ENCODERS = ("OneHotEncoder", "OrdinalEncoder")


class PackagingError(Exception):
    """The file is not a model the cluster can serve; nothing was written."""


@dataclass(frozen=True)
class Added:
    """A model folder written in place."""

    name: str
    version: str
    folder: Path
    metadata: dict[str, Any]


# --- the child: what the estimator needs and gives -----------------------------------------


_KINDS = {"b": "BOOL", "i": "INT64", "u": "INT64", "f": "FP64"}  # numpy dtype kinds; anything else: BYTES


def _datatype_of(values: np.ndarray) -> str:
    return _KINDS.get(np.asarray(values).dtype.kind, "BYTES")


def _encoded_columns(estimator: Any, names: list[str]) -> dict[str, Column]:
    """The columns an encoder inside the model was fitted on: their datatype from its
    categories, and the categories themselves when it refuses any other value."""
    found: dict[str, Column] = {}
    for part, selected in walk(estimator):
        if type(part).__name__ not in _ENCODERS or not hasattr(part, "categories_"):
            continue
        inputs = input_names(part, selected, names)
        strict = getattr(part, "handle_unknown", "error") == "error"
        for column, categories in zip(inputs, part.categories_, strict=False):
            if column not in names:
                continue
            datatype = _datatype_of(categories)
            known = [c for c in np.asarray(categories).tolist() if c is not None and c == c]  # no None, NaN
            if datatype == "BYTES":
                known = [str(c) for c in known]
            found[column] = Column(column, datatype, tuple(known) if strict and known else None)
    return found


def _column(name: str, declared: str | None, encoded: Column | None) -> Column:
    """A column as declared (keeping an encoder's categories of that datatype), else as an
    encoder records it, else a number."""
    if declared is None:
        return encoded or Column(name, "FP64")
    same = encoded is not None and encoded.datatype == declared
    return Column(name, declared, encoded.categories if same and encoded is not None else None)


def _task(estimator: Any) -> str:
    from sklearn.base import is_classifier, is_regressor

    if is_classifier(estimator):
        return "classification"
    if is_regressor(estimator):
        return "regression"
    raise PackagingError(
        f"a {type(estimator).__name__} is neither a classifier nor a regressor (scikit-learn's estimator "
        "type); the cluster serves those two"
    )


def describe(estimator: Any, declared: Mapping[str, str] | None = None) -> dict[str, Any]:
    """model.json's fields for a fitted estimator (all but name, version, artifact and
    sha256), after one example predict; PackagingError saying what is wrong."""
    declared = dict(declared or {})
    if not callable(getattr(estimator, "predict", None)):
        raise PackagingError(f"a {type(estimator).__name__} has no predict(): not a model")
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    try:
        check_is_fitted(estimator)
    except NotFittedError:
        raise PackagingError(f"the {type(estimator).__name__} is not fitted: fit it, then save it") from None
    except TypeError:
        pass  # not a scikit-learn estimator (a wrapper of one): the example predict decides
    task = _task(estimator)
    classes: list[Any] = []
    if task == "classification":
        fitted = getattr(estimator, "classes_", None)
        if fitted is None or np.asarray(fitted).ndim != 1:
            raise PackagingError("the classifier has no one-dimensional classes_ (multi-label models are not served)")
        classes = np.asarray(fitted).tolist()
        if not all(type(c) in (str, int, bool) for c in classes):
            raise PackagingError(f"classes {classes[:5]} are not strings or integers")
    names = getattr(estimator, "feature_names_in_", None)
    inputs: dict[str, Any]
    if names is None:
        if declared:
            raise PackagingError("--input names columns, but the model was not fitted on named columns")
        width = getattr(estimator, "n_features_in_", None)
        if not isinstance(width, (int, np.integer)) or width <= 0:
            raise PackagingError(
                "the model says neither its columns (feature_names_in_) nor its width (n_features_in_)"
            )
        inputs = {"width": int(width), "feature_names": [f"x{i}" for i in range(int(width))], "datatype": "FP64"}
        columns = None
        candidates: list[Any] = [[0.0] * int(width), [1.0] * int(width)]
    else:
        names = [str(n) for n in names]
        unknown = sorted(set(declared) - set(names))
        if unknown:
            raise PackagingError(f"--input {unknown[0]}: the model has no such column (it has {', '.join(names)})")
        encoded = _encoded_columns(estimator, names)
        columns = tuple(_column(n, declared.get(n), encoded.get(n)) for n in names)
        inputs = {"width": len(columns), "feature_names": names, "columns": [c.to_json() for c in columns]}
        candidates = [example_row(columns, zero) for zero in (0, 1)]
    inputs["example"], predicted = _first_that_predicts(estimator, task, candidates, columns)
    if predicted.shape != (1,):
        raise PackagingError(f"predict gave shape {list(predicted.shape)} for one row; one value per row is served")
    import sklearn

    return {
        "framework": "scikit-learn",
        "framework_version": sklearn.__version__,
        "estimator": type(estimator).__name__,
        "task": task,
        "inputs": inputs,
        "outputs": {
            "classes": classes,
            "probabilities": task == "classification" and hasattr(estimator, "predict_proba"),
        },
    }


def _first_that_predicts(
    estimator: Any, task: str, candidates: list[Any], columns: tuple[Column, ...] | None
) -> tuple[Any, np.ndarray]:
    """The first example row the model predicts (zeros, then ones: a model may refuse a zero,
    as a log transform does), as model.json keeps it, and its prediction."""
    failure: Exception | None = None
    for row in candidates:
        example = np.asarray([row]) if columns is None else frame(typed_rows([row]), columns)
        try:
            predicted = np.asarray(estimator.predict(example))
            if task == "classification" and hasattr(estimator, "predict_proba"):
                estimator.predict_proba(example)
        except Exception as exc:  # noqa: BLE001 - any failure of the example is the answer
            failure = failure or exc
            continue
        return (row if columns is None else dict(zip([c.name for c in columns], row, strict=True))), predicted
    hint = ""
    if columns is not None:
        hint = f"; the columns were read as {', '.join(f'{c.name}={c.datatype}' for c in columns)}: "
        hint += "say the right ones with --input COLUMN=BYTES|INT64|FP64|BOOL"
    raise PackagingError(f"predict on an example row failed ({type(failure).__name__}: {failure}){hint}")


def datatypes_of(table: Any) -> dict[str, str]:
    """{column: datatype} of a pandas DataFrame the model was fitted on (its dtypes say what
    the model itself cannot: that a column held integers or booleans)."""
    return {str(name): _KINDS.get(getattr(dtype, "kind", "O"), "BYTES") for name, dtype in table.dtypes.items()}


def write_metadata(folder: Path, name: str, artifact: Path, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Write folder/model.json for `artifact` (in the folder) and return it."""
    meta = {"name": name, "version": folder.name, "artifact": artifact.name, "sha256": sha256_of(artifact), **fields}
    (folder / "model.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _child(folder: Path, declared: Mapping[str, str], sample: Path | None = None) -> dict[str, Any]:
    """In the child: load the staged artifact, describe it, write model.json, compile it to
    ONNX where it converts and agrees with scikit-learn (service.models.conversion), then
    load the folder as a replica would."""
    artifacts = [p for p in folder.iterdir() if p.suffix in SUFFIXES]
    import joblib

    try:
        estimator = joblib.load(artifacts[0])
    except Exception as exc:  # noqa: BLE001 - any file that does not unpickle
        raise PackagingError(f"cannot load the file ({type(exc).__name__}: {exc})") from None
    meta = write_metadata(folder, folder.parent.name, artifacts[0], describe(estimator, declared))
    try:
        model = load_model(folder, runtime="sklearn")
        rows = read_sample(sample, model) if sample is not None else None
        meta["runtime"] = runtime_block(model, folder, rows, log=lambda line: print(line, file=sys.stderr))
        (folder / "model.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        load_model(folder)
    except ModelError as exc:
        raise PackagingError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise PackagingError(f"--sample: {exc}") from None
    return meta


# --- the parent: stage, ask the child, move into place ------------------------------------


def parse_inputs(items: list[str]) -> dict[str, str]:
    """`--input plan=BYTES` items as {column: datatype}; PackagingError if malformed."""
    declared = {}
    for item in items:
        column, _, datatype = item.partition("=")
        if not column or datatype.upper() not in DATATYPES:
            raise PackagingError(f"--input {item!r}: write COLUMN=DATATYPE, DATATYPE one of {', '.join(DATATYPES)}")
        declared[column] = datatype.upper()
    return declared


def next_version(models_dir: Path, name: str) -> str:
    """One more than the highest numbered version of `name` on disk, or 1."""
    numbers = [int(p.name) for p in (models_dir / name).glob("*") if p.name.isdigit()]
    return str(max(numbers, default=0) + 1)


def add_model(
    source: Path,
    models_dir: Path,
    name: str,
    version: str | None = None,
    declared: Mapping[str, str] | None = None,
    timeout_s: float = CHILD_TIMEOUT_S,
    sample: Path | None = None,
) -> Added:
    """Package `source` as models_dir/name/version (the next free version when None);
    PackagingError, with nothing written, if it cannot be served."""
    if not NAME_PATTERN.match(name):
        raise PackagingError(f"model name {name!r}: use letters, digits, '_', '.', '-' (at most 64)")
    if version is not None and not NAME_PATTERN.match(version):
        raise PackagingError(f"version {version!r}: use letters, digits, '_', '.', '-' (at most 64)")
    if not source.is_file():
        raise PackagingError(f"{source}: no such file")
    models_dir.mkdir(parents=True, exist_ok=True)
    # Under the models folder (one filesystem: the rename is atomic), two levels deeper than
    # the replicas look (<name>/<version>/model.json), so no replica ever sees it.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=models_dir))
    try:
        folder = staging / name / (version or "staged")
        folder.mkdir(parents=True)
        suffix = source.suffix if source.suffix in SUFFIXES else ".pkl"
        shutil.copyfile(source, folder / f"model{suffix}")
        meta = _run_child(folder, dict(declared or {}), timeout_s, sample)
        return _move_into_place(folder, models_dir, name, version, meta)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run_child(folder: Path, declared: dict[str, str], timeout_s: float, sample: Path | None) -> dict[str, Any]:
    argv = [sys.executable, "-m", "service.models.packaging", "describe", str(folder)]
    argv += [f"--input={c}={t}" for c, t in declared.items()]
    argv += [f"--sample={sample.resolve()}"] if sample is not None else []
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise PackagingError(f"loading and trying the model took longer than {timeout_s:.0f} s") from None
    answer = _last_json(done.stdout)
    if done.returncode == 0 and answer is not None and "metadata" in answer:
        return dict(answer["metadata"])
    if answer is not None and "error" in answer:
        raise PackagingError(str(answer["error"]))
    if done.returncode < 0:
        raise PackagingError(f"the process loading the model was killed by signal {-done.returncode}")
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise PackagingError(f"the process loading the model failed (exit {done.returncode}): {tail}")


def _last_json(stdout: str) -> dict[str, Any] | None:
    """The child's answer: its last line of output (the model's code may print before it)."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        return value if isinstance(value, dict) else None
    return None


def _move_into_place(folder: Path, models_dir: Path, name: str, version: str | None, meta: dict[str, Any]) -> Added:
    (models_dir / name).mkdir(exist_ok=True)
    for _ in range(100):
        chosen = version or next_version(models_dir, name)
        target = models_dir / name / chosen
        if target.exists():
            if version is not None:
                raise PackagingError(
                    f"{target} exists: a version is never rewritten (its identity is its artifact); "
                    "leave --version out for the next free one"
                )
            continue
        meta = {**meta, "version": chosen}
        (folder / "model.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        staged = folder.with_name(chosen)
        if staged != folder:
            folder = folder.rename(staged)
        try:
            folder.rename(target)  # atomic; refused if another add took the version meanwhile
        except OSError:
            if version is not None:
                raise PackagingError(f"{target} appeared meanwhile; nothing written") from None
            continue
        return Added(name, chosen, target, meta)
    raise PackagingError(f"no free version of {name} found")


def main(argv: list[str] | None = None) -> int:
    """The child's entry point: describe and check a staged folder, print JSON."""
    parser = argparse.ArgumentParser(description="describe a staged model folder (run by add_model)")
    sub = parser.add_subparsers(dest="command", required=True)
    child = sub.add_parser("describe")
    child.add_argument("folder", type=Path)
    child.add_argument("--input", action="append", default=[])
    child.add_argument("--sample", type=Path)
    args = parser.parse_args(argv)
    try:
        meta = _child(args.folder, parse_inputs(args.input), args.sample)
    except PackagingError as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    print(json.dumps({"metadata": meta}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
