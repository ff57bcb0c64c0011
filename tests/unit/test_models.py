"""The model registry loads verified artifacts only and reports what it refused."""

import json
import shutil

import numpy as np
import pytest

from service.models import ModelRegistry, UnknownModel


@pytest.fixture
def model_copy(models_dir, tmp_path):
    target = tmp_path / "models"
    shutil.copytree(models_dir / "iris", target / "iris")
    return target


def test_loads_and_predicts_known_iris_rows(model_copy):
    registry = ModelRegistry(model_copy, "iris")
    registry.load()
    assert registry.ready and registry.names() == ["iris"]
    model = registry.get("iris")
    labels, proba = model.predict(np.array([[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]))
    assert labels == ["setosa", "virginica"]
    assert proba is not None and len(proba[0]) == 3 and abs(sum(proba[0]) - 1) < 1e-9


def test_tampered_artifact_is_refused(model_copy, caplog):
    artifact = model_copy / "iris" / "1" / "model.joblib"
    artifact.write_bytes(artifact.read_bytes() + b"\0")
    registry = ModelRegistry(model_copy, "iris")
    registry.load()
    assert not registry.ready
    assert registry.names() == []
    assert any("does not match model.json" in e for e in registry.errors)
    assert "refusing to load" in caplog.text


def test_misplaced_or_missing_models_are_not_ready(model_copy, tmp_path):
    meta_path = model_copy / "iris" / "1" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = "2"
    meta_path.write_text(json.dumps(meta))
    registry = ModelRegistry(model_copy, "iris")
    registry.load()
    assert not registry.ready and "lives in iris/1" in registry.errors[0]

    empty = ModelRegistry(tmp_path / "nothing", "iris")
    empty.load()
    assert not empty.ready and "no models found" in empty.errors[0]


def test_versions_and_unknown_names(model_copy):
    shutil.copytree(model_copy / "iris" / "1", model_copy / "iris" / "10")
    meta_path = model_copy / "iris" / "10" / "model.json"
    meta_path.write_text(meta_path.read_text().replace('"version": "1"', '"version": "10"'))
    registry = ModelRegistry(model_copy, "iris")
    registry.load()
    assert registry.versions("iris") == ["1", "10"]
    assert registry.get("iris").version == "10", "the latest version is the numerically highest"
    assert registry.get("iris", "1").version == "1"
    with pytest.raises(UnknownModel, match="no version '3'"):
        registry.get("iris", "3")
    with pytest.raises(UnknownModel, match="'nope' not found"):
        registry.get("nope")
