"""The REST layer through Flask's test client (no Redis): routes, protocols, JSON errors."""

import json

import pytest
from openapi_spec_validator import validate

from service.app import create_app
from service.settings import Settings

SETOSA, VIRGINICA = [5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]
TOKEN = "unit-operator-token"


@pytest.fixture
def client(models_dir, tmp_path):
    settings = Settings.from_env(
        {
            "SERVICE_MODELS_DIR": str(models_dir),
            "REDIS_URL": "",
            "SERVICE_REPLICA_ID": "unit",
            "SERVICE_MAX_BATCH_ROWS": "16",
            "SERVICE_MAX_BODY_BYTES": "4096",
            "SERVICE_OPERATOR_TOKEN": TOKEN,
        }
    )
    return create_app(settings).test_client()


def test_v1_predict_and_headers(client):
    response = client.post(
        "/v1/models/iris:predict", json={"instances": [SETOSA, VIRGINICA]}, headers={"X-Request-ID": "abc-123"}
    )
    assert response.status_code == 200
    assert response.json["predictions"] == ["setosa", "virginica"]
    assert len(response.json["probabilities"]) == 2
    assert response.headers["X-Cache"] == "OFF", "no REDIS_URL: not cached, by configuration"
    assert response.headers["X-Served-By"] == "unit"
    assert response.headers["X-Request-ID"] == "abc-123"
    assert response.headers["X-Model-Version"] == "1"


def test_invalid_request_id_is_replaced(client):
    response = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert response.headers["X-Request-ID"] not in ("", "bad id\twith spaces")


def test_v2_infer_follows_the_open_inference_protocol(client):
    body = {
        "id": "req-1",
        "inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP64", "data": SETOSA + VIRGINICA}],
    }
    response = client.post("/v2/models/iris/versions/1/infer", json=body)
    assert response.status_code == 200
    payload = response.json
    assert (payload["model_name"], payload["model_version"], payload["id"]) == ("iris", "1", "req-1")
    predict, proba = payload["outputs"]
    assert predict == {"name": "predict", "datatype": "BYTES", "shape": [2], "data": ["setosa", "virginica"]}
    assert proba["name"] == "predict_proba" and proba["shape"] == [2, 3] and len(proba["data"]) == 6
    only = client.post(
        "/v2/models/digits/infer",
        json={
            "inputs": [{"name": "x", "shape": [1, 64], "datatype": "INT64", "data": [0] * 64}],
            "outputs": [{"name": "predict"}],
        },
    )
    assert only.status_code == 200 and [o["name"] for o in only.json["outputs"]] == ["predict"]
    assert only.json["outputs"][0]["datatype"] == "INT64"


def test_v2_metadata_and_health(client):
    assert client.get("/v2").json["name"] == "prediction-cluster"
    assert client.get("/v2/health/live").json == {"live": True}
    assert client.get("/v2/health/ready").json == {"ready": True}
    meta = client.get("/v2/models/digits").json
    assert meta["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 64]}]
    assert meta["versions"] == ["1"] and meta["platform"] == "sklearn"
    assert client.get("/v2/models/iris/versions/1/ready").json == {"name": "iris", "ready": True}
    assert client.get("/v2/models/iris/versions/9/ready").status_code == 404


def test_v1_discovery_and_shortcut(client):
    assert client.get("/v1/models").json == {"models": ["churn", "digits", "iris"]}
    assert client.get("/v1/models/digits").json == {"name": "digits", "ready": True}
    response = client.post("/predict", json={"features": SETOSA})
    assert response.json["predictions"] == ["setosa"] and response.json["model"] == "iris"


ERRORS = [
    ("post", "/v1/models/iris:predict", {"data": b"{bad", "content_type": "application/json"}, 400),
    ("post", "/v1/models/iris:predict", {"json": {"instances": [[1, 2]]}}, 400),
    ("post", "/v1/models/iris:predict", {"data": b"{}", "content_type": "text/plain"}, 415),
    ("post", "/v1/models/iris:predict", {"data": b"{}", "content_type": "multipart/form-data"}, 415),
    ("post", "/v2/models/iris/infer", {"data": b"{}", "content_type": "text/html"}, 415),
    ("post", "/predict", {"data": b"{}", "headers": {"Content-Encoding": "br"}}, 415),
    (
        "post",
        "/predict",
        {"data": __import__("gzip").compress(b" " * 5000), "headers": {"Content-Encoding": "gzip"}},
        413,
    ),
    ("post", "/v1/models/iris:predict", {"json": {"instances": [SETOSA] * 17}}, 413),
    ("post", "/v1/models/iris:predict", {"data": b"[" + b" " * 5000 + b"]", "content_type": "application/json"}, 413),
    ("post", "/v1/models/nope:predict", {"json": {"instances": [SETOSA]}}, 404),
    ("post", "/v2/models/iris/versions/7/infer", {"json": {}}, 404),
    ("get", "/v1/models/nope", {}, 404),
    ("get", "/no/such/route", {}, 404),
    ("get", "/v1/models/iris:predict", {}, 405),
    ("delete", "/predict", {}, 405),
    ("post", "/metrics", {}, 405),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), ERRORS)
def test_errors_are_json(client, method, path, kwargs, status):
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == status
    assert response.mimetype == "application/json"
    assert set(response.json) == {"error"} and response.json["error"]


def test_no_content_type_octet_stream_and_compressed_bodies_are_accepted(client):
    import gzip
    import zlib

    body = b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}'
    plain = client.post("/v1/models/iris:predict", data=body)  # no Content-Type, as tritonclient.http
    assert plain.status_code == 200 and plain.json["predictions"] == ["setosa"]
    octet = client.post("/v1/models/iris:predict", data=body, content_type="application/octet-stream")
    assert octet.status_code == 200
    for encoding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress)):
        packed = client.post("/v1/models/iris:predict", data=compress(body), headers={"Content-Encoding": encoding})
        assert packed.status_code == 200 and packed.json["predictions"] == ["setosa"], encoding
    assert "binary_tensor_data" in client.get("/v2").json["extensions"]


def test_405_keeps_allow_header(client):
    assert "POST" in client.get("/predict").headers["Allow"]


def test_metrics_count_requests(client):
    for _ in range(3):
        client.post("/predict", json={"features": SETOSA})
    client.post("/predict", json={"features": [1]})
    text = client.get("/metrics").data.decode()
    assert 'prediction_http_requests_total{model="iris",route="/predict",status="200"} 3.0' in text
    assert 'prediction_http_requests_total{model="iris",route="/predict",status="400"} 1.0' in text
    assert 'prediction_cache_rows_total{model="iris",result="off"} 3.0' in text
    assert 'prediction_inference_duration_seconds_count{model="iris"} 3.0' in text


def test_not_ready_without_models(tmp_path):
    app = create_app(Settings.from_env({"SERVICE_MODELS_DIR": str(tmp_path), "REDIS_URL": ""}))
    client = app.test_client()
    response = client.get("/readyz")
    assert response.status_code == 503 and "no models found" in response.json["error"]
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get("/healthz").status_code == 200
    unavailable = client.post("/predict", json={"features": SETOSA})
    assert unavailable.status_code == 503 and "not ready" in unavailable.json["error"]


def test_openapi_document_is_valid_and_lists_every_route(client):
    document = client.get("/openapi.json").json
    validate(document)
    app_rules = {
        r.rule.replace("<model:name>", "{name}").replace("<model:version>", "{version}")
        for r in client.application.url_map.iter_rules()
        if r.endpoint != "static"
    }
    assert app_rules == set(document["paths"])


def test_an_unexpected_error_is_a_json_500_without_a_stack_trace(models_dir, tmp_path, caplog):
    app = create_app(Settings.from_env({"SERVICE_MODELS_DIR": str(models_dir), "REDIS_URL": ""}))
    assert not app.debug and not app.testing

    def explode():
        raise ZeroDivisionError("secret internals")

    app.add_url_rule("/explode", view_func=explode)
    response = app.test_client().get("/explode")
    assert response.status_code == 500 and response.json == {"error": "internal error"}
    assert b"Traceback" not in response.data and b"secret" not in response.data
    assert "ZeroDivisionError" in caplog.text, "the stack trace goes to the log, not to the client"


def test_models_that_arrive_later_are_loaded_beside_the_requests(models_dir, tmp_path):
    import shutil
    import time

    app = create_app(Settings.from_env({"SERVICE_MODELS_DIR": str(tmp_path), "REDIS_URL": ""}))
    client = app.test_client()
    assert client.get("/readyz").status_code == 503
    for name in ("iris", "digits"):
        shutil.copytree(models_dir / name, tmp_path / name)
    deadline = time.monotonic() + 10
    while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.get("/readyz").status_code == 200, "the background loader found the models"
    assert client.post("/predict", json={"features": SETOSA}).json["predictions"] == ["setosa"]


def test_metric_labels_name_only_served_models(client):
    client.post("/v1/models/nope:predict", json={"instances": [SETOSA]})
    client.post("/v1/models/iris:predict", json={"instances": [SETOSA]})
    text = client.get("/metrics").data.decode()
    assert 'model="nope"' not in text
    assert 'prediction_http_requests_total{model="",route="/v1/models/<model:name>:predict",status="404"} 1.0' in text
    assert (
        'prediction_http_requests_total{model="iris",route="/v1/models/<model:name>:predict",status="200"} 1.0' in text
    )


def test_a_replica_answers_503_at_once_while_its_models_load(models_dir, monkeypatch):
    import threading
    import time

    from service.models.registry import ModelRegistry

    gate, real_load = threading.Event(), ModelRegistry.load

    def slow_load(self):
        gate.wait(10)
        real_load(self)

    monkeypatch.setattr(ModelRegistry, "load", slow_load)
    settings = Settings.from_env({"SERVICE_MODELS_DIR": str(models_dir), "REDIS_URL": ""})
    app = create_app(settings, load_in_background=True)
    client = app.test_client()
    loading = client.get("/readyz")
    assert loading.status_code == 503 and "still loading" in loading.json["error"]
    assert client.post("/predict", json={"features": SETOSA}).status_code == 503
    gate.set()
    deadline = time.monotonic() + 10
    while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.post("/predict", json={"features": SETOSA}).json["predictions"] == ["setosa"]


def test_a_closing_replica_answers_503_except_liveness(client):
    client.application.extensions["prediction"].closing = True
    refused = client.post("/predict", json={"features": SETOSA})
    assert refused.status_code == 503 and "shutting down" in refused.json["error"]
    assert client.get("/healthz").status_code == 200


def test_the_model_repository_routes_need_the_operators_token(client, models_dir):
    routes = [
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/iris/load"),
        ("POST", "/v2/repository/models/iris/unload"),
        ("POST", "/v2/repository/models/iris/policy"),
        ("GET", "/v2/repository/status"),
    ]
    for authorization in (None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer ", TOKEN):
        headers = {"Authorization": authorization} if authorization is not None else {}
        for method, path in routes:
            answer = client.open(path, method=method, headers=headers, json={"default": "latest"})
            assert answer.status_code == 401 and "operator token" in answer.json["error"], (authorization, path)
            assert answer.headers["WWW-Authenticate"].startswith("Bearer"), path
    assert client.post("/v1/models/iris:predict", json={"instances": [SETOSA]}).status_code == 200, "served"
    right = client.post("/v2/repository/index", headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200
    # No token configured: the routes refuse everyone, and say how to set one.
    unset = create_app(Settings.from_env({"SERVICE_MODELS_DIR": str(models_dir), "REDIS_URL": ""})).test_client()
    refused = unset.post("/v2/repository/index", headers={"Authorization": "Bearer "})
    assert refused.status_code == 401 and "SERVICE_OPERATOR_TOKEN" in refused.json["error"]
    assert "***" in str(Settings.from_env({"SERVICE_OPERATOR_TOKEN": TOKEN}).flat()["server.operator_token"])


def test_the_model_repository_routes_answer_json_and_need_redis_to_change_anything(client):
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {TOKEN}"
    index = client.post("/v2/repository/index")
    assert index.status_code == 200
    assert {(r["name"], r["version"], r["state"]) for r in index.json} >= {("iris", "1", "READY")}
    assert client.post("/v2/repository/index", json={"ready": True}).status_code == 200
    # Without Redis no replica could tell the others: refused, nothing loaded or unloaded.
    for path, body in (
        ("/v2/repository/models/iris/load", {"parameters": {"version": "1"}}),
        ("/v2/repository/models/iris/unload", None),
    ):
        refused = client.post(path, json=body)
        assert refused.status_code == 503 and "needs Redis" in refused.json["error"], path
    assert client.get("/v2/repository/status").status_code == 503
    assert client.post("/v1/models/iris:predict", json={"instances": [SETOSA]}).status_code == 200
    bad = [
        ("/v2/repository/models/iris/load", b"{", 400),
        ("/v2/repository/models/iris/load", b'{"parameters": []}', 400),
        ("/v2/repository/models/iris/load", b'{"parameters": {"weight": 10}}', 400),
        ("/v2/repository/models/iris/policy", b'{"weights": {"1": 100}, "colour": "red"}', 400),
        ("/v2/repository/models/nosuch/policy", b'{"default": "latest"}', 404),
        ("/v2/repository/models/nosuch/unload", b"", 404),
    ]
    for path, body, status in bad:
        answer = client.post(path, data=body, content_type="application/json")
        assert answer.status_code == status and "error" in answer.json, (path, body, answer.json)


def test_an_answer_drawn_from_a_split_tells_the_balancer_not_to_reuse_it(client):
    from service.models.lifecycle import Desired, ModelPlan

    registry = client.application.extensions["prediction"].registry
    plain = client.post("/v1/models/iris:predict", json={"instances": [SETOSA]})
    assert "X-Accel-Expires" not in plain.headers
    registry.desired = Desired(1, {"iris": ModelPlan(weights={"1": 50, "0": 50})})
    split = client.post("/v1/models/iris:predict", json={"instances": [SETOSA]})
    assert split.headers["X-Accel-Expires"] == "0"
    pinned = client.post(
        "/v2/models/iris/versions/1/infer",
        json={"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": SETOSA}]},
    )
    assert pinned.status_code == 200 and "X-Accel-Expires" not in pinned.headers


def test_an_unchanged_answer_is_revalidated_with_a_304_without_reading_the_body(client):
    """The L1 revalidates an expired answer with If-None-Match: the ETag names the model
    version's bytes, so while they are the same the replica answers 304 and predicts nothing."""
    from service.models.lifecycle import Desired, ModelPlan

    current = client.application.extensions["prediction"]
    routes = {
        "/v1/models/iris:predict": {"instances": [SETOSA]},
        "/predict": {"features": SETOSA},
        "/v2/models/iris/infer": {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": SETOSA}]},
        "/v2/models/iris/versions/1/infer": {
            "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": SETOSA}]
        },
    }
    for path, body in routes.items():
        first = client.post(path, json=body)
        assert first.status_code == 200 and first.headers["ETag"].startswith('"iris/1/'), path
        # b"never read": were it parsed, the answer would be a 400.
        again = client.post(path, data=b"never read", headers={"If-None-Match": first.headers["ETag"]})
        assert (again.status_code, again.data, again.headers["ETag"]) == (304, b"", first.headers["ETag"]), path
        assert again.headers["X-Model-Version"] == "1" and again.headers["X-Served-By"] == "unit"
        other = client.post(path, json=body, headers={"If-None-Match": '"iris/0/0000000000000000/0"'})
        assert other.status_code == 200 and other.headers["ETag"] == first.headers["ETag"], path
    # A split: the answer depends on the draw, the L1 may not keep it, so no 304 either.
    tag = client.post("/v1/models/iris:predict", json={"instances": [SETOSA]}).headers["ETag"]
    current.registry.desired = Desired(1, {"iris": ModelPlan(weights={"1": 50, "0": 50})})
    split = client.post("/v1/models/iris:predict", json={"instances": [SETOSA]}, headers={"If-None-Match": tag})
    assert split.status_code == 200 and "ETag" not in split.headers and split.headers["X-Accel-Expires"] == "0"
    # An unknown model or a bad body with a matching-looking tag: answered in full (404, 400).
    assert client.post("/v1/models/nope:predict", data=b"{}", headers={"If-None-Match": tag}).status_code == 404


def test_a_json_body_sent_with_a_forms_content_type_is_read_as_json(client):
    """`curl -d '{"instances": ...}' URL` without -H sends application/x-www-form-urlencoded:
    the body is JSON all the same, on every prediction route (never form-decoded)."""
    form = "application/x-www-form-urlencoded"
    v1 = client.post("/v1/models/iris:predict", data=json.dumps({"instances": [SETOSA]}), content_type=form)
    assert v1.status_code == 200 and v1.json["predictions"] == ["setosa"], v1.data
    legacy = client.post("/predict", data=json.dumps({"features": SETOSA}), content_type=form)
    assert legacy.status_code == 200 and legacy.json["predictions"] == ["setosa"], legacy.data
    tensor = {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": SETOSA}
    v2 = client.post("/v2/models/iris/infer", data=json.dumps({"inputs": [tensor]}), content_type=form)
    assert v2.status_code == 200 and v2.json["outputs"][0]["data"] == ["setosa"], v2.data
    broken = client.post("/v1/models/iris:predict", data="instances=1", content_type=form)
    assert broken.status_code == 400 and "error" in broken.json
