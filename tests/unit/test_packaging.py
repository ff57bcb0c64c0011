"""What `model add` reads from a fitted estimator (service.models.packaging.describe), and what it
refuses, before anything is written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_diabetes, load_iris
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder

from service.models.packaging import PackagingError, describe, parse_inputs

TABLE = pd.DataFrame(
    {
        "city": ["oslo", "rome", "oslo", "lima"] * 10,
        "size": [1, 3, 2, 5] * 10,
        "rooms": [1.5, 2.0, 3.5, 1.0] * 10,
        "grade": [1, 2, 1, 3] * 10,
    }
)
LABELS = np.array(["a", "b"] * 20)


def pipeline(handle_unknown="error"):
    encode = ColumnTransformer(
        [
            ("city", OneHotEncoder(handle_unknown=handle_unknown), ["city"]),
            ("grade", OrdinalEncoder(), ["grade"]),
        ],
        remainder="passthrough",
    )
    return Pipeline([("encode", encode), ("fit", LogisticRegression())]).fit(TABLE, LABELS)


def test_a_pipeline_on_named_columns_gives_columns_datatypes_and_categories():
    meta = describe(pipeline())
    assert meta["task"] == "classification"
    assert meta["outputs"] == {"classes": ["a", "b"], "probabilities": True}
    assert meta["inputs"]["columns"] == [
        {"name": "city", "datatype": "BYTES", "categories": ["lima", "oslo", "rome"]},
        {"name": "size", "datatype": "FP64"},  # nothing in the model says it held integers
        {"name": "rooms", "datatype": "FP64"},
        {"name": "grade", "datatype": "INT64", "categories": [1, 2, 3]},
    ]
    assert meta["inputs"]["example"] == {"city": "lima", "size": 0.0, "rooms": 0.0, "grade": 1}


def test_an_encoder_that_ignores_unknown_values_lists_no_categories_and_declared_types_win():
    meta = describe(pipeline("ignore"), parse_inputs(["size=int64", "grade=INT64"]))
    columns = {c["name"]: c for c in meta["inputs"]["columns"]}
    assert columns["city"] == {"name": "city", "datatype": "BYTES"}
    assert columns["size"] == {"name": "size", "datatype": "INT64"}
    assert columns["grade"] == {"name": "grade", "datatype": "INT64", "categories": [1, 2, 3]}


def test_a_regressor_on_a_frame_and_a_classifier_on_plain_rows():
    data = load_diabetes(as_frame=True)
    meta = describe(Ridge().fit(data.data, data.target))
    assert meta["task"] == "regression" and meta["outputs"] == {"classes": [], "probabilities": False}
    assert [c["name"] for c in meta["inputs"]["columns"]] == list(data.data.columns)
    x, y = load_iris(return_X_y=True)
    meta = describe(LogisticRegression(max_iter=500).fit(x, y))
    assert meta["inputs"] == {
        "width": 4,
        "feature_names": ["x0", "x1", "x2", "x3"],
        "datatype": "FP64",
        "example": [0.0, 0.0, 0.0, 0.0],
    }
    assert meta["outputs"]["classes"] == [0, 1, 2]


@pytest.mark.parametrize(
    ("estimator", "message"),
    [
        ({"weights": [1, 2]}, "a dict has no predict(): not a model"),
        (LogisticRegression(), "the LogisticRegression is not fitted"),
        (KMeans(n_clusters=2, n_init=1).fit(np.eye(4)), "a KMeans is neither a classifier nor a regressor"),
        (LinearRegression().fit(np.eye(3), np.eye(3)), "predict gave shape [1, 3] for one row"),
    ],
)
def test_what_is_not_a_servable_model_is_refused(estimator, message):
    with pytest.raises(PackagingError) as err:
        describe(estimator)
    assert message in str(err.value)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")
def test_the_example_is_a_row_the_model_takes_and_the_replica_tries_it(tmp_path):
    from sklearn.preprocessing import FunctionTransformer

    from service.models.artifacts import load_model
    from service.models.packaging import write_metadata

    x, y = load_iris(return_X_y=True)
    logs = Pipeline([("log", FunctionTransformer(np.log)), ("fit", LogisticRegression(max_iter=500))]).fit(x, y)
    meta = describe(logs)  # log(0) is -inf, which the regression refuses: ones it is
    assert meta["inputs"]["example"] == [1.0, 1.0, 1.0, 1.0]
    folder = tmp_path / "logs" / "1"
    folder.mkdir(parents=True)
    import joblib

    joblib.dump(logs, folder / "model.joblib")
    write_metadata(folder, "logs", folder / "model.joblib", meta)
    model = load_model(folder)
    assert model.example(2).tolist() == [[1.0] * 4] * 2 and model.predict_ms > 0


def test_declared_types_are_checked():
    with pytest.raises(PackagingError, match="the model has no such column"):
        describe(pipeline(), {"nope": "FP64"})
    with pytest.raises(PackagingError, match="COLUMN=DATATYPE"):
        parse_inputs(["city:BYTES"])
    with pytest.raises(PackagingError, match="predict on an example row failed .* say the right ones with --input"):
        describe(pipeline("ignore"), {"city": "INT64"})
