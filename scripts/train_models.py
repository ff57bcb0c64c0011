#!/usr/bin/env python3
"""Train the demo models deterministically from data sets inside scikit-learn.

    python scripts/train_models.py [--out models] [--force]

Writes models/<name>/<version>/model.joblib and model.json (with the artifact's sha256).
Skips a model whose folder already holds a verified artifact unless --force is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import sklearn
from sklearn.datasets import load_digits, load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from service.artifacts import ModelError, load_model, sha256_of

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


def train(builder: Any, out: Path, force: bool) -> Path:
    """Fit one model, write its artifact and metadata, return its folder."""
    model, x, y, feature_names, classes, name = builder()
    folder = out / name / VERSION
    if not force and (folder / "model.json").exists():
        try:
            load_model(folder)
            print(f"{name}: up to date in {folder}")
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
    meta = {
        "name": name,
        "version": VERSION,
        "framework": "scikit-learn",
        "framework_version": sklearn.__version__,
        "estimator": type(model).__name__,
        "artifact": artifact.name,
        "sha256": sha256_of(artifact),
        "inputs": {"width": x.shape[1], "feature_names": feature_names, "datatype": "FP64"},
        "outputs": {"classes": classes, "probabilities": hasattr(model, "predict_proba")},
        "training": {
            "dataset": f"sklearn.datasets.load_{name}",
            "rows": int(x.shape[0]),
            "seed": SEED,
            "holdout_fraction": 0.25,
            "holdout_accuracy": round(accuracy, 4),
        },
    }
    (folder / "model.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"{name}: trained, held-out accuracy {accuracy:.3f}, written to {folder}")
    return folder


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models"), help="models folder")
    parser.add_argument("--force", action="store_true", help="retrain even if up to date")
    args = parser.parse_args(argv)
    for builder in (_iris, _digits):
        train(builder, args.out, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
