"""The model registry loads verified artifacts only and reports what it refused."""

import json
import shutil

import numpy as np
import pytest

from service.models.registry import ModelRegistry, UnknownModel


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


BAD_FIELDS = [
    ("outputs", None, "outputs must be an object, got null"),
    ("outputs", {"classes": "setosa"}, "outputs.classes must be an array, got string"),
    ("outputs", {"classes": [[1]]}, "outputs.classes must be strings or integers"),
    ("inputs", [], "inputs must be an object, got array"),
    ("inputs", {"width": "4", "feature_names": ["a", "b", "c", "d"]}, "inputs.width must be an integer, got string"),
    ("inputs", {"width": 4, "feature_names": "abcd"}, "inputs.feature_names must be an array"),
    ("inputs", {"width": 4, "feature_names": [1, 2, 3, 4]}, "inputs.feature_names must be strings"),
    ("inputs", {"columns": [{"name": ["x"], "datatype": "FP64"}]}, "inputs.columns[0] needs a non-empty string"),
    ("name", ["iris"], "name must be a string, got array"),
    ("version", 1.5, "version must be a string or an integer"),
    ("artifact", None, "artifact must be a string, got null"),
    ("sha256", 12, "sha256 must be a string, got int"),
    ("sha256", "not-hex", "sha256 must be 64 hexadecimal digits"),
    ("task", {"x": 1}, "task must be a string, got object"),
    ("serving", [], "serving must be an object"),
    ("serving", {"cache_policy": {}}, "serving.cache_policy = {} is not allowed"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_FIELDS)
def test_a_wrong_field_in_model_json_is_that_versions_error_naming_the_field(model_copy, field, value, message):
    """model.json is input: a field of the wrong type fails its own version, with the field's
    name, and no absolute path; the other models load, and a later apply() goes on."""
    shutil.copytree(model_copy / "iris" / "1", model_copy / "iris" / "2")
    meta_path = model_copy / "iris" / "2" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["version"] = "2"
    meta[field] = value
    meta_path.write_text(json.dumps(meta))
    registry = ModelRegistry(model_copy, "iris")
    registry.load()
    assert registry.names() == ["iris"] and registry.versions("iris") == ["1"]
    assert registry.ready, "a bad folder of a version nobody listed keeps no replica unready"
    why = registry.unavailable()["iris/2"]
    assert why.startswith("iris/2/model.json: ") and message in why and str(model_copy) not in why
    errors = registry.apply(registry.desired)  # what the converger does after start
    assert registry.versions("iris") == ["1"] and any(message in e for e in errors)


@pytest.mark.parametrize("text", ["", "{", "[]", '"model"', "null", "[" * 100000, '{"name": "\\ud800"}'])
def test_a_model_json_that_is_not_an_object_is_that_versions_error(model_copy, text):
    shutil.copytree(model_copy / "iris" / "1", model_copy / "iris" / "2")
    (model_copy / "iris" / "2" / "model.json").write_text(text, encoding="utf-8", errors="surrogatepass")
    registry = ModelRegistry(model_copy, "iris")
    registry.load()
    assert registry.ready and registry.versions("iris") == ["1"]
    assert registry.unavailable()["iris/2"].startswith("iris/2/model.json: ")


def test_an_unforeseen_error_loading_one_folder_stays_with_that_folder(model_copy, monkeypatch):
    import service.models.registry

    real = service.models.registry.load_model

    def load(folder, runtime="auto"):
        if folder.name == "2":
            raise AttributeError("'NoneType' object has no attribute 'get'")
        return real(folder, runtime)

    monkeypatch.setattr(service.models.registry, "load_model", load)
    shutil.copytree(model_copy / "iris" / "1", model_copy / "iris" / "2")
    registry = ModelRegistry(model_copy, "iris")
    registry.load()
    assert registry.versions("iris") == ["1"]
    assert registry.unavailable() == {"iris/2": "iris/2: cannot be loaded (AttributeError)"}
