"""Your own model, served in one command: `scripts/cluster model add` as a user types it,
against a running cluster in the defaults (L1 on, cache policy auto), under load; then the
demo model of named, mixed-type columns (churn) through V1 objects, V2 column tensors,
tritonclient and Triton's model configuration; every bad column a JSON 400.

Answers are compared with the model's own predict on the same rows."""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import requests

from scripts.train_models import churn_table
from service.models.compiled import TOLERANCE
from tests.support import ROOT
from tests.support.load import PacedLoad

pytestmark = pytest.mark.integration

CHURN_ROW = {"plan": "pro", "age": 31, "monthly": 20.5, "support_calls": 2, "autopay": True}


@pytest.fixture(scope="module")
def cluster(start_cluster, models):
    return start_cluster(2, defaults=True, SERVICE_MODELS_DIR=str(models))


def model_add(cluster, *args: str) -> subprocess.CompletedProcess:
    """`scripts/cluster model add ...` as typed, finding the cluster by its run directory
    (and the models folder by what the cluster started with, not by this environment)."""
    env = {k: v for k, v in os.environ.items() if k != "SERVICE_MODELS_DIR"}
    env["CLUSTER_RUN_DIR"] = str(cluster.run_dir)
    return subprocess.run(
        [str(ROOT / "scripts" / "cluster"), "model", "add", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def predict(cluster, path: str, body: dict) -> requests.Response:
    return requests.post(f"{cluster.internal_url}{path}", json=body, timeout=30)


def records(table) -> list[dict]:
    """DataFrame rows as JSON objects, every number exactly (numpy scalars as Python's)."""
    return json.loads(json.dumps(table.to_dict(orient="records"), default=lambda value: value.item()))


def test_models_added_under_load_answer_as_the_models_themselves(cluster, models, tmp_path):
    from sklearn.compose import ColumnTransformer
    from sklearn.datasets import load_diabetes, load_iris
    from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    table, labels = churn_table(600, seed=7)
    plans = Pipeline(
        [
            (
                "encode",
                ColumnTransformer(
                    [("plan", OneHotEncoder(handle_unknown="ignore"), ["plan"])], remainder="passthrough"
                ),
            ),
            ("fit", LogisticRegression(max_iter=2000)),
        ]
    ).fit(table, labels)
    joblib.dump(plans, tmp_path / "plans.joblib")
    diabetes = load_diabetes(as_frame=True)
    regressor = Ridge().fit(diabetes.data, diabetes.target)
    joblib.dump(regressor, tmp_path / "diabetes.joblib")
    iris_x, iris_y = load_iris(return_X_y=True)
    plain = LogisticRegression(max_iter=500, C=0.3).fit(iris_x, iris_y)
    with (tmp_path / "model.pkl").open("wb") as stream:  # a plain pickle, as the tutorials write it
        pickle.dump(plain, stream)
    # Gradient boosting converts to ONNX; skl2onnx 1.20 cannot convert HistGradientBoosting.
    boosted = GradientBoostingClassifier(n_estimators=40, random_state=0).fit(iris_x, iris_y)
    joblib.dump(boosted, tmp_path / "boosted.joblib")
    histogram = HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(iris_x, iris_y)
    joblib.dump(histogram, tmp_path / "histogram.joblib")

    churn_load = PacedLoad(
        cluster.internal_url, rate=40, clients=2, max_seconds=240, path="/v1/models/churn:predict",
        bodies=[{"instances": [CHURN_ROW]}, {"instances": records(table.head(3))}],
    )  # fmt: skip
    iris_load = PacedLoad(cluster.internal_url, rate=40, clients=2, max_seconds=240)
    with churn_load, iris_load:
        added = [
            model_add(
                cluster, tmp_path / "plans.joblib", "--name", "plans", "--input", "age=INT64", "--input", "autopay=BOOL"
            ),
            model_add(cluster, tmp_path / "diabetes.joblib", "--name", "diabetes"),
            model_add(cluster, tmp_path / "model.pkl", "--name", "iris", "--weight", "30"),
            model_add(cluster, tmp_path / "boosted.joblib", "--name", "boosted"),
            model_add(cluster, tmp_path / "histogram.joblib", "--name", "histogram"),
        ]
    for done in added:
        assert done.returncode == 0, done.stderr
        assert "every replica serves" in done.stdout
    # model add says in one line which runtime answers and why.
    runtimes = [next(line for line in done.stdout.splitlines() if line.startswith("runtime: ")) for done in added]
    assert [line.split(":")[1].strip() for line in runtimes] == ["ONNX Runtime"] * 4 + ["scikit-learn"], runtimes
    assert "equal to scikit-learn on" in runtimes[0] and "TreeEnsembleClassifier" in runtimes[4], runtimes
    for name, runtime in (("plans", "onnx"), ("diabetes", "onnx"), ("boosted", "onnx"), ("histogram", "sklearn")):
        metadata = requests.get(f"{cluster.internal_url}/v2/models/{name}", timeout=10).json()["parameters"]
        assert metadata["runtime"] == runtime, (name, metadata)
    for load in (churn_load, iris_load):
        summary = load.summary("model add under load")
        assert summary["failed"] == {} and summary["succeeded"] > 20, summary
    assert sorted(p.name for p in models.iterdir()) == [
        "boosted", "churn", "diabetes", "digits", "histogram", "iris", "plans"
    ]  # fmt: skip
    assert (models / "iris" / "2" / "model.pkl").exists()

    # Every replica answers each as the model itself does, by name and in column order.
    rows = table.sample(20, random_state=1)
    for _ in range(4):  # round-robin over both replicas, twice
        answer = predict(cluster, "/v1/models/plans:predict", {"instances": records(rows)})
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] == plans.predict(rows).tolist()
    in_order = predict(cluster, "/v1/models/plans:predict", {"instances": rows.to_numpy().tolist()})
    assert in_order.json()["predictions"] == plans.predict(rows).tolist()

    sample = diabetes.data.head(15)
    answer = predict(cluster, "/v1/models/diabetes:predict", {"instances": records(sample)})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"predictions": pytest.approx(regressor.predict(sample).tolist(), rel=1e-12)}
    v2_answer = predict(
        cluster,
        "/v2/models/diabetes/infer",
        {"inputs": [{"name": c, "datatype": "FP64", "shape": [15], "data": sample[c].tolist()} for c in sample]},
    ).json()
    assert v2_answer["outputs"][0]["datatype"] == "FP64" and len(v2_answer["outputs"]) == 1  # no predict_proba
    assert v2_answer["outputs"][0]["data"] == pytest.approx(regressor.predict(sample).tolist(), rel=1e-12)

    # The forest of boosted trees, through ONNX Runtime: labels as the model's, probabilities
    # within the verified tolerance; the model that did not convert, scikit-learn's exactly.
    boosted_answer = predict(cluster, "/v1/models/boosted:predict", {"instances": iris_x[::5].tolist()}).json()
    assert boosted_answer["predictions"] == boosted.predict(iris_x[::5]).tolist()
    assert np.allclose(boosted_answer["probabilities"], boosted.predict_proba(iris_x[::5]), atol=1e-5, rtol=0)
    histogram_answer = predict(cluster, "/v1/models/histogram:predict", {"instances": iris_x[::5].tolist()}).json()
    assert histogram_answer["predictions"] == histogram.predict(iris_x[::5]).tolist()
    assert histogram_answer["probabilities"] == histogram.predict_proba(iris_x[::5]).tolist()

    versioned = predict(
        cluster,
        "/v2/models/iris/versions/2/infer",
        {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [150, 4], "data": iris_x.ravel().tolist()}]},
    ).json()
    assert versioned["outputs"][0]["data"] == plain.predict(iris_x).tolist()
    weights = requests.get(
        f"{cluster.internal_url}/v2/repository/status", headers=cluster.operator_headers, timeout=10
    ).json()["models"]["iris"]["weights"]
    assert weights == {"2": 30, "1": 70}

    # A string column keyed as a string: "1" is a plan (unknown to the encoder, which ignores
    # it), 1 is a 400; the replicas' result cache keeps the typed row.
    one = {**CHURN_ROW, "plan": "1"}
    first = predict(cluster, "/v1/models/plans:predict", {"instances": [one]})
    assert first.status_code == 200, first.text
    assert first.json()["predictions"] == plans.predict(pd.DataFrame([one])).tolist()
    assert predict(cluster, "/v1/models/plans:predict", {"instances": [{**one, "plan": 1}]}).status_code == 400


def test_model_add_refuses_what_it_cannot_serve_and_writes_nothing(cluster, models, tmp_path):
    from sklearn.linear_model import LogisticRegression

    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with (tmp_path / "dict.pkl").open("wb") as stream:
        pickle.dump({"coef": [1, 2]}, stream)
    with (tmp_path / "unfitted.pkl").open("wb") as stream:
        pickle.dump(LogisticRegression(), stream)
    before = sorted(str(p.relative_to(models)) for p in models.rglob("*"))
    cases = [
        ((tmp_path / "junk.pkl", "--name", "junk"), "cannot load the file"),
        ((tmp_path / "dict.pkl", "--name", "junk"), "a dict has no predict(): not a model"),
        ((tmp_path / "unfitted.pkl", "--name", "junk"), "the LogisticRegression is not fitted"),
        ((tmp_path / "absent.pkl", "--name", "junk"), "no such file"),
        ((models / "iris" / "1" / "model.joblib", "--name", "iris", "--version", "1"), "a version is never rewritten"),
        ((models / "iris" / "1" / "model.joblib", "--name", "bad/name"), "model name 'bad/name'"),
    ]
    for args, message in cases:
        done = model_add(cluster, *args)
        assert done.returncode == 1, done.stdout
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert message in done.stderr and "nothing written" in done.stderr, done.stderr
    assert sorted(str(p.relative_to(models)) for p in models.rglob("*")) == before


def churn_columns():
    from service.inputs.columns import Column

    meta = json.loads((ROOT / "models" / "churn" / "1" / "model.json").read_text())
    return [Column(c["name"], c["datatype"]) for c in meta["inputs"]["columns"]]


def test_churn_by_v1_objects_v2_column_tensors_and_tritonclient(cluster, models):
    import tritonclient.http as triton

    estimator = joblib.load(models / "churn" / "1" / "model.joblib")
    table, _ = churn_table(12, seed=3)
    expected = estimator.predict(table).tolist()
    proba = estimator.predict_proba(table)

    v1 = predict(cluster, "/v1/models/churn:predict", {"instances": records(table)}).json()
    assert v1["predictions"] == expected
    assert np.allclose(
        v1["probabilities"], proba, rtol=0, atol=TOLERANCE
    )  # the verified tolerance (ONNX Runtime answers)

    tensors = [
        {"name": c.name, "datatype": c.datatype, "shape": [len(table), 1], "data": records(table[[c.name]])}
        for c in churn_columns()
    ]
    for tensor in tensors:
        tensor["data"] = [row[tensor["name"]] for row in tensor["data"]]
    v2 = predict(cluster, "/v2/models/churn/infer", {"parameters": {"content_type": "pd"}, "inputs": tensors})
    assert v2.status_code == 200, v2.text
    assert v2.json()["outputs"][0]["data"] == expected

    host = cluster.internal_url.removeprefix("http://")
    client = triton.InferenceServerClient(host)
    inputs = []
    for column in churn_columns():
        values = table[column.name].to_numpy()
        array = values.astype(object if column.datatype == "BYTES" else values.dtype).reshape(-1, 1)
        tensor = triton.InferInput(column.name, list(array.shape), column.datatype)
        tensor.set_data_from_numpy(array)  # binary, tritonclient's default
        inputs.append(tensor)
    result = client.infer("churn", inputs)
    assert [label.decode() for label in result.as_numpy("predict").ravel()] == expected
    assert np.allclose(
        result.as_numpy("predict_proba"), proba, rtol=0, atol=TOLERANCE
    )  # the verified tolerance (ONNX Runtime answers)


def test_triton_model_configuration_holds_what_its_tools_read(cluster):
    """What perf_analyzer's model parser reads (src/model_parser.cc, InitTriton): the config's
    max_batch_size, its inputs and outputs (each named in the metadata), dynamic_batching and
    response_cache; the shapes it takes from the metadata, less the batch dimension."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(cluster.internal_url.removeprefix("http://"))
    for name in ("iris", "churn", "digits"):
        config = client.get_model_config(name)
        metadata = client.get_model_metadata(name)
        assert config["name"] == name and config["max_batch_size"] > 0
        for key, meta_key in (("input", "inputs"), ("output", "outputs")):
            described = {t["name"]: t for t in metadata[meta_key]}
            assert [t["name"] for t in config[key]] == list(described)
            for tensor in config[key]:
                shape = described[tensor["name"]]["shape"]
                assert shape[0] == -1  # the batch dimension
                assert tensor["dims"] == (shape[1:] or [1])
                assert tensor["data_type"] == "TYPE_" + {"BYTES": "STRING"}.get(
                    described[tensor["name"]]["datatype"], described[tensor["name"]]["datatype"]
                )
        assert isinstance(config["response_cache"]["enable"], bool)
        assert config["model_transaction_policy"] == {"decoupled": False}
    assert client.get_model_config("churn", "1")["input"][0] == {
        "name": "plan",
        "data_type": "TYPE_STRING",
        "dims": [1],
    }
    missing = requests.get(f"{cluster.url}/v2/models/nope/config", timeout=10)
    assert missing.status_code == 404 and "nope" in missing.json()["error"]


BAD_CHURN = [
    ({"instances": [{k: v for k, v in CHURN_ROW.items() if k != "age"}]}, "instances[0] is missing column 'age'"),
    ({"instances": [{**CHURN_ROW, "colour": "red"}]}, "instances[0] has unknown column 'colour'"),
    ({"instances": [CHURN_ROW, {**CHURN_ROW, "age": "31"}]}, "instances[1].age must be an integer (INT64), got string"),
    ({"instances": [{**CHURN_ROW, "monthly": None}]}, "instances[0].monthly is null"),
    ({"instances": [{**CHURN_ROW, "monthly": "20.5"}]}, "instances[0].monthly must be a number (FP64), got string"),
    ({"instances": [{**CHURN_ROW, "plan": "gold"}]}, "instances[0].plan is 'gold', not one of"),
    ({"instances": [{**CHURN_ROW, "autopay": "yes"}]}, "instances[0].autopay must be true or false (BOOL)"),
]


@pytest.mark.parametrize(("body", "message"), BAD_CHURN)
def test_a_bad_column_is_a_json_400_naming_it_through_the_public_listener(cluster, body, message):
    answer = requests.post(f"{cluster.url}/v1/models/churn:predict", json=body, timeout=10)
    assert answer.status_code == 400 and answer.headers["Content-Type"] == "application/json"
    assert message in answer.json()["error"]


def test_a_nan_in_json_is_named_by_column_and_row(cluster):
    body = b'{"instances": [{"plan": "pro", "age": 31, "monthly": NaN, "support_calls": 2, "autopay": true}]}'
    answer = requests.post(
        f"{cluster.url}/v1/models/churn:predict", data=body, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert answer.status_code == 400
    assert answer.json()["error"] == "instances[0].monthly is NaN; numbers must be finite"
    tensors = {"inputs": [{"name": "plan", "datatype": "BYTES", "shape": [1], "data": ["pro"]}]}
    answer = requests.post(f"{cluster.url}/v2/models/churn/infer", json=tensors, timeout=10)
    assert answer.status_code == 400
    assert answer.json()["error"].startswith("input 'age' (INT64) is missing")


def test_locust_sends_named_columns_and_checks_every_answer(cluster, tmp_path):
    """The Locust scenario of the DataFrame model (in MixUser too), pool warmed, checked."""
    locust = Path(sys.executable).parent / "locust"
    argv = [str(locust), "-f", "loadtest/locustfile.py", "--host", cluster.internal_url, "--headless"]
    argv += ["-u", "4", "-r", "4", "-t", "3s", "--hit-ratio", "0.5", "--csv", str(tmp_path / "locust")]
    done = subprocess.run(
        [*argv, "--only-summary", "NamedColumnsUser"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with (tmp_path / "locust_stats.csv").open() as stream:
        named = {row["Name"]: row for row in csv.DictReader(stream)}["v1 churn 1 object"]
    assert int(named["Request Count"]) > 10 and named["Failure Count"] == "0", named


def test_rows_a_model_refuses_are_a_400_for_their_sender_only(cluster, tmp_path):
    """A Pipeline whose log transform turns a negative number into NaN, which its regression
    refuses: that row's sender gets a JSON 400; concurrent senders of good rows, whose rows
    shared a batched predict with it, get their predictions."""
    from concurrent.futures import ThreadPoolExecutor

    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    x, y = load_iris(return_X_y=True)
    logs = Pipeline([("log", FunctionTransformer(np.log)), ("fit", LogisticRegression(max_iter=500))]).fit(x, y)
    joblib.dump(logs, tmp_path / "logs.joblib")
    done = model_add(cluster, tmp_path / "logs.joblib", "--name", "logs")
    assert done.returncode == 0, done.stderr

    rows = [[5.1 + i / 100, 3.5, 1.4, 0.2] if i % 4 else [-1.0 - i, 3.5, 1.4, 0.2] for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda row: predict(cluster, "/v1/models/logs:predict", {"instances": [row]}), rows))
    for row, answer in zip(rows, answers, strict=True):
        if row[0] < 0:
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"].startswith("the model could not predict these rows (ValueError:")
        else:
            assert answer.status_code == 200, answer.text
            assert answer.json()["predictions"] == logs.predict([row]).tolist()
