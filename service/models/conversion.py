"""scikit-learn to ONNX when a model is packaged (`scripts/cluster model add`,
scripts/train_models.py): convert with skl2onnx, then compare with scikit-learn on the
verification rows (service.models.compiled) and the user's own, and keep model.onnx only
if they agree. Probabilities are computed in double where the converter allows it, else
in float32 (a ColumnTransformer mixing types converts only so). A model that does not
convert, or that disagrees, is served by scikit-learn: `runtime_block` says why.

Runs where the model is packaged (a child process of `model add`), never in a replica.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.inputs.columns import Column
from service.models.artifacts import LoadedModel, sha256_of, verify_compiled
from service.models.compiled import OnnxModel, verification_rows, walk

ONNX_ARTIFACT = "model.onnx"
# Input layouts to try, best first: numbers in double, then in float32; named columns as one
# tensor each (what a ColumnTransformer selects by name), else as one matrix when every column
# is a number (a model fitted on a DataFrame of numbers takes a matrix).
LAYOUTS = (("double", "columns"), ("float", "columns"), ("double", "matrix"), ("float", "matrix"))


def version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _initial_types(
    width: int, columns: tuple[Column, ...] | None, precision: str, layout: str
) -> list[tuple[str, Any]]:
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType, Int64TensorType, StringTensorType

    number = DoubleTensorType if precision == "double" else FloatTensorType
    if columns is None or layout == "matrix":
        return [("input", number([None, width]))]
    kinds = {"BYTES": StringTensorType, "INT64": Int64TensorType if precision == "double" else FloatTensorType}
    return [(c.name, kinds.get(c.datatype, number)([None, 1])) for c in columns]


def _final(estimator: Any) -> Any:
    """The last estimator of a Pipeline (the one that classifies), or the estimator itself."""
    last = estimator
    for part, _ in walk(estimator):
        if hasattr(part, "steps"):
            last = part.steps[-1][1]
    return last


def convert(estimator: Any, width: int, columns: tuple[Column, ...] | None, precision: str, layout: str) -> bytes:
    """The model as ONNX bytes (skl2onnx), probabilities as a plain tensor (no ZipMap)."""
    from skl2onnx import convert_sklearn

    options: dict[int, dict[str, Any]] = {}
    if hasattr(_final(estimator), "predict_proba") or hasattr(_final(estimator), "classes_"):
        options[id(_final(estimator))] = {"zipmap": False}
    initial = _initial_types(width, columns, precision, layout)
    onnx_model = convert_sklearn(estimator, initial_types=initial, options=options)
    return onnx_model.SerializeToString()


def runtime_block(
    model: LoadedModel, folder: Path, sample: np.ndarray | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Convert `model` (loaded by scikit-learn from `folder`), verify, and write
    folder/model.onnx if it agrees; model.json's `runtime` block either way."""
    rows = verification_rows(model.estimator, model.width, model.columns, model.example_row)
    if sample is not None and len(sample):
        rows = np.concatenate([rows, sample]) if model.columns is None else np.vstack([rows, sample])
    tools = {"skl2onnx": version_of("skl2onnx"), "onnxruntime": version_of("onnxruntime")}
    if "not installed" in tools.values():
        return {"chosen": "sklearn", "reason": "skl2onnx or onnxruntime is not installed here", **tools}
    reasons = []
    layouts = [(p, lay) for p, lay in LAYOUTS if lay == "columns" or model.columns is not None]
    if model.columns is not None and any(c.datatype == "BYTES" for c in model.columns):
        layouts = [(p, lay) for p, lay in layouts if lay == "columns"]
    for precision, layout in layouts:
        tried = precision if model.columns is None else f"{precision}, {layout}"
        try:
            data = convert(model.estimator, model.width, model.columns, precision, layout)
            compiled = OnnxModel(data, model.columns)
            verification = verify_compiled(model, compiled, rows)
        except Exception as exc:  # noqa: BLE001 - a converter or a session may fail in any way: not compiled
            first_line = (str(exc).strip().splitlines() or [""])[0][:120]
            reasons.append(f"{tried}: {type(exc).__name__}: {first_line}")
            continue
        if not verification.passed:
            reasons.append(f"{tried}: disagrees with scikit-learn ({verification.describe()})")
            continue
        (folder / ONNX_ARTIFACT).write_bytes(data)
        log(f"runtime: ONNX Runtime ({tried} inputs), equal to scikit-learn on {verification.describe()}")
        return {
            "chosen": "onnx",
            "reason": f"converted by skl2onnx and equal to scikit-learn on {verification.describe()}",
            "onnx": {
                "artifact": ONNX_ARTIFACT,
                "sha256": sha256_of(folder / ONNX_ARTIFACT),
                "precision": precision,
                "layout": layout if model.columns is not None else "matrix",
                "verification": verification.to_json(),
            },
            **tools,
        }
    reason = "; ".join(reasons)
    log(f"runtime: scikit-learn ({reason})")
    return {"chosen": "sklearn", "reason": reason, **tools}


MAX_SAMPLE_ROWS = 10_000
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no", ""}


def read_sample(path: Path, model: LoadedModel) -> np.ndarray:
    """The user's own verification rows (`model add --sample rows.csv|.jsonl`), as the model
    takes them: a CSV with a header of the model's input names, or JSON lines, each an object
    by input name or an array in input order. ValueError saying what is wrong."""
    import csv
    import json

    names = model.feature_names
    records: list[Any] = []
    with path.open(encoding="utf-8", newline="") as stream:
        if path.suffix == ".csv":
            reader = csv.DictReader(stream)
            if sorted(reader.fieldnames or []) != sorted(names):
                raise ValueError(f"{path.name}: the header must name the model's inputs: {', '.join(names)}")
            records = [{k: _cell(model, k, v) for k, v in row.items()} for row in reader]
        elif path.suffix in (".jsonl", ".ndjson"):
            records = [json.loads(line) for line in stream if line.strip()]
        else:
            raise ValueError(f"{path.name}: a sample is a .csv or a .jsonl file")
    if not records or len(records) > MAX_SAMPLE_ROWS:
        raise ValueError(f"{path.name}: 1 to {MAX_SAMPLE_ROWS} rows, not {len(records)}")
    cells = []
    for i, record in enumerate(records):
        values = [record.get(n) for n in names] if isinstance(record, dict) else record
        if not isinstance(values, list) or len(values) != len(names) or any(v is None for v in values):
            raise ValueError(f"{path.name} row {i + 1}: a value for each of {', '.join(names)}")
        if model.columns is None:
            cells.append([float(v) for v in values])
        else:
            cells.append(
                [c.check(v, f"{path.name} row {i + 1} {c.name}") for c, v in zip(model.columns, values, strict=True)]
            )
    if model.columns is None:
        return np.asarray(cells, dtype=np.float64)
    from service.inputs.columns import typed_rows

    return typed_rows(cells)


def _cell(model: LoadedModel, name: str, text: str) -> Any:
    """A CSV cell as the input's datatype takes it."""
    column = next((c for c in model.columns or () if c.name == name), None)
    datatype = column.datatype if column is not None else "FP64"
    if datatype == "BYTES":
        return text
    if datatype == "BOOL":
        lowered = text.strip().lower()
        if lowered not in _TRUE | _FALSE:
            raise ValueError(f"{name}: {text!r} is not a boolean")
        return lowered in _TRUE
    return int(text) if datatype == "INT64" else float(text)
