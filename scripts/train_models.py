#!/usr/bin/env python3
"""Train the demo models deterministically from data sets inside scikit-learn.

    python scripts/train_models.py [--out models] [--force]

Writes models/<name>/<version>/model.joblib and model.json (with the artifact's sha256).
Skips a model whose folder already holds a verified artifact unless --force is given.

iris (linear) and digits (a forest) take plain rows of numbers; churn is a Pipeline fitted on
a DataFrame of named columns of mixed types (a string among them), from a synthetic table
drawn with a fixed seed, so that serving named columns is shown and measured. Its model.json
is written by the same code as `scripts/cluster model add` (service.models.packaging).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.datasets import load_digits, load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from service.models.artifacts import ModelError, load_model
from service.models.conversion import runtime_block, version_of
from service.models.packaging import datatypes_of, describe, write_metadata

SEED = 20261122
VERSION = "1"


def _iris() -> tuple[Any, np.ndarray, np.ndarray, list[str], list[Any], str]:
    data = load_iris()
    labels = np.asarray(data.target_names)[data.target]
    model = LogisticRegression(max_iter=1000, random_state=SEED)
    return model, data.data, labels, list(data.feature_names), list(data.target_names), "iris"


def _digits() -> tuple[Any, np.ndarray, np.ndarray, list[str], list[Any], str]:
    data = load_digits()
    # 200 full-depth trees: one-row predict costs several ms, so caching and batching show.
    model = RandomForestClassifier(n_estimators=200, random_state=SEED, n_jobs=1)
    classes = [int(c) for c in sorted(set(data.target.tolist()))]
    return model, data.data, data.target, list(data.feature_names), classes, "digits"


PLANS = ("basic", "pro", "team")


def churn_table(rows: int, seed: int = SEED) -> tuple[Any, np.ndarray]:
    """A synthetic customer table (plan, age, monthly, support_calls, autopay) and whether
    each customer left: drawn from a fixed seed, the same on every machine."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    plan = rng.choice(PLANS, size=rows, p=[0.5, 0.35, 0.15])
    age = rng.integers(18, 80, size=rows)
    monthly = np.round(rng.gamma(4.0, 8.0, size=rows) + np.select([plan == "pro", plan == "team"], [20, 45], 5), 2)
    calls = rng.poisson(1.5, size=rows)
    autopay = rng.random(rows) < 0.6
    score = -1.0 + 0.45 * calls - 0.03 * (age - 45) + 0.02 * monthly - 0.9 * autopay + 0.6 * (plan == "basic")
    left = rng.random(rows) < 1 / (1 + np.exp(-score))
    table = pd.DataFrame({"plan": plan, "age": age, "monthly": monthly, "support_calls": calls, "autopay": autopay})
    return table, np.where(left, "leaves", "stays")


def _churn() -> tuple[Any, Any, np.ndarray, list[str], list[Any], str]:
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    table, labels = churn_table(4000)
    encode = ColumnTransformer(
        [
            # An unknown plan is refused (handle_unknown="error"): model.json lists the plans,
            # and a request with another gets a 400 naming the column and row.
            ("plan", OneHotEncoder(handle_unknown="error"), ["plan"]),
            ("numbers", StandardScaler(), ["age", "monthly", "support_calls"]),
            ("flags", "passthrough", ["autopay"]),
        ]
    )
    model = Pipeline([("encode", encode), ("classify", LogisticRegression(max_iter=1000, random_state=SEED))])
    return model, table, labels, list(table.columns), sorted(set(labels.tolist())), "churn"


def train(builder: Any, out: Path, force: bool) -> Path:
    """Fit one model, write its artifact and metadata, return its folder."""
    model, x, y, feature_names, classes, name = builder()
    folder = out / name / VERSION
    if not force and (folder / "model.json").exists():
        try:
            loaded = load_model(folder)
            if stale_runtime(json.loads((folder / "model.json").read_text()).get("runtime")):
                compile_to_onnx(folder)  # an earlier version of this script or of the converter
                loaded = load_model(folder)
            print(f"{name}: up to date in {folder} ({loaded.runtime})")
            return folder
        except ModelError as exc:
            print(f"{name}: retraining ({exc})")
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)
    model.fit(x_train, y_train)
    accuracy = float(model.score(x_test, y_test))
    model.fit(x, y)  # serve the model fitted on all data; accuracy above is held-out
    folder.mkdir(parents=True, exist_ok=True)
    artifact = folder / "model.joblib"
    joblib.dump(model, artifact)
    fields = describe(model, datatypes_of(x) if hasattr(x, "dtypes") else None)
    if fields["inputs"].get("columns") is None:  # plain rows: the data set's own feature names
        fields["inputs"]["feature_names"] = feature_names
    assert fields["outputs"]["classes"] == classes, (fields["outputs"], classes)
    dataset = "scripts/train_models.py churn_table" if name == "churn" else f"sklearn.datasets.load_{name}"
    fields["training"] = {
        "dataset": dataset,
        "rows": int(x.shape[0]),
        "seed": SEED,
        "holdout_fraction": 0.25,
        "holdout_accuracy": round(accuracy, 4),
    }
    write_metadata(folder, name, artifact, fields)
    print(f"{name}: trained, held-out accuracy {accuracy:.3f}, written to {folder}")
    held_out = x_test[feature_names].to_numpy(dtype=object) if hasattr(x_test, "columns") else np.asarray(x_test, float)
    compile_to_onnx(folder, held_out)
    return folder


def stale_runtime(block: Any) -> bool:
    """Whether a model.json's runtime block was decided by other converter versions than
    these (or by none): a newer skl2onnx may convert what an older one could not."""
    if not isinstance(block, dict):
        return True
    return any(block.get(tool) != version_of(tool) for tool in ("skl2onnx", "onnxruntime"))


def compile_to_onnx(folder: Path, sample: np.ndarray | None = None) -> None:
    """model.onnx beside the pickle where it converts and agrees with scikit-learn (on the
    verification rows and `sample`), as `scripts/cluster model add` does; model.json says
    which runtime answers and why."""
    meta = json.loads((folder / "model.json").read_text())
    model = load_model(folder, runtime="sklearn")
    meta["runtime"] = runtime_block(model, folder, sample, log=lambda line: print(f"{folder.parent.name}: {line}"))
    (folder / "model.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    load_model(folder)  # as a replica will, checking model.onnx again


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models"), help="models folder")
    parser.add_argument("--force", action="store_true", help="retrain even if up to date")
    args = parser.parse_args(argv)
    for builder in (_iris, _digits, _churn):
        train(builder, args.out, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
