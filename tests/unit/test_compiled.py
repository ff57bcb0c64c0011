"""Compiled models: a model.onnx answers only once it agrees with scikit-learn, at packaging
and again at every load; what computed an answer names its cache keys and ETag."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import joblib
import numpy as np
import pytest

from service.dataplane.handlers import answer_etag
from service.models.artifacts import ModelError, load_model
from service.models.compiled import TOLERANCE, Verification, verification_rows, verify
from service.models.conversion import ONNX_ARTIFACT, read_sample, runtime_block
from service.models.packaging import describe, write_metadata
from tests.support import ROOT


def package(tmp_path: Path, estimator, name: str = "m", declared: dict | None = None) -> Path:
    """A model folder of `estimator` written as `model add` writes it (compiled where it converts)."""
    folder = tmp_path / name / "1"
    folder.mkdir(parents=True)
    joblib.dump(estimator, folder / "model.joblib")
    meta = write_metadata(folder, name, folder / "model.joblib", describe(estimator, declared))
    meta["runtime"] = runtime_block(load_model(folder, runtime="sklearn"), folder, log=lambda line: None)
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


def rows_of(model, count: int = 500) -> np.ndarray:
    return verification_rows(model.estimator, model.width, model.columns, model.example_row, count, seed=11)


@pytest.mark.parametrize("name", ["iris", "digits", "churn"])
def test_the_demo_models_answer_through_onnx_runtime_as_scikit_learn_does(name, tmp_path):
    folder = tmp_path / name / "1"
    shutil.copytree(ROOT / "models" / name / "1", folder)
    meta = json.loads((folder / "model.json").read_text())
    assert meta["runtime"]["chosen"] == "onnx", meta["runtime"]
    compiled, plain = load_model(folder), load_model(folder, runtime="sklearn")
    assert (compiled.runtime, plain.runtime) == ("onnx", "sklearn")
    rows = rows_of(plain)
    expected, got = plain.predict(rows), compiled.predict(rows)
    assert got[0] == expected[0], "labels differ"
    assert np.max(np.abs(np.asarray(got[1]) - np.asarray(expected[1]))) <= TOLERANCE
    assert compiled.identity != plain.identity == plain.sha256 == compiled.sha256
    assert answer_etag(compiled) != answer_etag(plain), "two runtimes' answers under one ETag"
    assert compiled.predict_ms < plain.predict_ms


def test_a_model_that_does_not_convert_is_served_by_scikit_learn_saying_why(tmp_path):
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer

    x, y = load_diabetes(return_X_y=True)
    custom = make_pipeline(FunctionTransformer(np.tanh), Ridge()).fit(x, y)
    folder = package(tmp_path, custom)
    runtime = json.loads((folder / "model.json").read_text())["runtime"]
    assert runtime["chosen"] == "sklearn" and "FunctionTransformer" in runtime["reason"], runtime
    assert not (folder / ONNX_ARTIFACT).exists()
    model = load_model(folder)
    assert model.runtime == "sklearn" and model.predict(x[:3])[0] == pytest.approx(custom.predict(x[:3]).tolist())


def test_gradient_boosting_a_regressor_and_string_categories_convert_and_agree(tmp_path):
    from sklearn.compose import ColumnTransformer
    from sklearn.datasets import load_diabetes, load_iris
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestRegressor
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from scripts.train_models import churn_table

    table, labels = churn_table(500, seed=3)
    encoded = Pipeline(
        [
            ("encode", ColumnTransformer([("plan", OneHotEncoder(), ["plan"]), ("n", StandardScaler(), ["monthly"])])),
            ("fit", LogisticRegression(max_iter=1000)),
        ]
    ).fit(table[["plan", "monthly"]], labels)
    iris_x, iris_y = load_iris(return_X_y=True)
    boosted = GradientBoostingClassifier(n_estimators=30, random_state=0).fit(iris_x, iris_y)
    diabetes_x, diabetes_y = load_diabetes(return_X_y=True)
    forest = RandomForestRegressor(n_estimators=20, random_state=0).fit(diabetes_x, diabetes_y)
    for name, estimator in (("encoded", encoded), ("boosted", boosted), ("forest", forest)):
        folder = package(tmp_path, estimator, name)
        meta = json.loads((folder / "model.json").read_text())
        assert meta["runtime"]["chosen"] == "onnx", (name, meta["runtime"])
        verified = meta["runtime"]["onnx"]["verification"]
        assert verified["labels_equal"] and verified["worst"] <= verified["tolerance"] == TOLERANCE
        compiled, plain = load_model(folder), load_model(folder, runtime="sklearn")
        rows = rows_of(plain, 300)
        check = verify(plain.predict(rows), compiled.predict(rows), plain.regression)
        assert check.passed, (name, check.describe())


def test_a_tampered_model_onnx_refuses_the_version(tmp_path):
    folder = tmp_path / "iris" / "1"
    shutil.copytree(ROOT / "models" / "iris" / "1", folder)
    (folder / ONNX_ARTIFACT).write_bytes((folder / ONNX_ARTIFACT).read_bytes() + b"\0")
    with pytest.raises(ModelError, match="iris/1/model.onnx: sha256 .* does not match model.json"):
        load_model(folder)


def test_a_model_onnx_that_disagrees_here_is_not_trusted_on_model_jsons_word(tmp_path):
    """model.json is input: an ONNX file of another model, its sha256 written in, is checked
    against scikit-learn at load and scikit-learn answers."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    other = package(tmp_path, LogisticRegression(C=0.01, max_iter=500).fit(x, y), "other")
    folder = tmp_path / "iris" / "1"
    shutil.copytree(ROOT / "models" / "iris" / "1", folder)
    shutil.copy(other / ONNX_ARTIFACT, folder / ONNX_ARTIFACT)
    meta = json.loads((folder / "model.json").read_text())
    meta["runtime"]["onnx"]["sha256"] = json.loads((other / "model.json").read_text())["runtime"]["onnx"]["sha256"]
    (folder / "model.json").write_text(json.dumps(meta))
    model = load_model(folder)
    assert model.runtime == "sklearn" and "disagrees with scikit-learn here" in model.runtime_reason


def test_service_runtime_sklearn_keeps_scikit_learn(tmp_path):
    folder = tmp_path / "digits" / "1"
    shutil.copytree(ROOT / "models" / "digits" / "1", folder)
    assert load_model(folder, runtime="sklearn").runtime == "sklearn"
    assert load_model(folder).runtime == "onnx"


def test_verification_fails_on_a_label_or_a_probability_beyond_the_tolerance():
    expected = (["a", "b"], [[0.9, 0.1], [0.2, 0.8]])
    assert verify(expected, (["a", "b"], [[0.9, 0.1], [0.2, 0.8 + 2e-6]]), False).passed
    assert not verify(expected, (["a", "a"], [[0.9, 0.1], [0.2, 0.8]]), False).passed
    assert not verify(expected, (["a", "b"], [[0.9, 0.1], [0.2, 0.8 + 1e-4]]), False).passed
    assert verify(([1000.0], None), ([1000.0 + 5e-3], None), True).passed  # relative beyond 1
    assert not verify(([0.5], None), ([0.5 + 5e-5], None), True).passed
    assert not Verification(0, True, 0.0).passed


def test_a_users_sample_rows_are_read_as_the_model_takes_them(tmp_path):
    churn = load_model(ROOT / "models" / "churn" / "1", runtime="sklearn")
    (tmp_path / "rows.csv").write_text("plan,age,monthly,support_calls,autopay\npro,31,20.5,2,true\nbasic,40,9,0,0\n")
    rows = read_sample(tmp_path / "rows.csv", churn)
    assert rows.tolist() == [["pro", 31, 20.5, 2, True], ["basic", 40, 9.0, 0, False]]
    (tmp_path / "rows.jsonl").write_text(
        '{"plan": "team", "age": 5, "monthly": 1.5, "support_calls": 1, "autopay": false}\n'
    )
    assert read_sample(tmp_path / "rows.jsonl", churn).tolist() == [["team", 5, 1.5, 1, False]]
    (tmp_path / "bad.csv").write_text("plan,age\npro,3\n")
    with pytest.raises(ValueError, match="the header must name the model's inputs"):
        read_sample(tmp_path / "bad.csv", churn)
