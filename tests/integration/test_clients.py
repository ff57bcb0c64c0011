"""Existing clients, unchanged: NVIDIA's tritonclient (sync and aio, binary data on and off,
request compression) and a plain HTTP client with no Content-Type, against a real replica
and through the balancer."""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.parse

import numpy as np
import pytest
import requests
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio

from tests.support.servers import start_redis, start_replica

pytestmark = pytest.mark.integration

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5], [5.9, 3.0, 4.2, 1.5]])


@pytest.fixture(scope="module")
def replica(module_servers, models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clients")
    redis, redis_port = start_redis(tmp)
    module_servers.append(redis)
    server, url = start_replica(
        tmp, {"SERVICE_MODELS_DIR": str(models_dir), "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    )
    module_servers.append(server)
    return url


@pytest.fixture(scope="module")
def balancer(start_cluster):
    return start_cluster(2).url


@pytest.fixture(params=["replica", "balancer"])
def url(request, replica, balancer):
    return {"replica": replica, "balancer": balancer}[request.param]


def json_labels(url: str, rows: np.ndarray, model: str = "iris") -> list:
    response = requests.post(f"{url}/v1/models/{model}:predict", json={"instances": rows.tolist()}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def as_labels(array: np.ndarray) -> list:
    return [v.decode() if isinstance(v, bytes) else v for v in array.tolist()]


def triton_inputs(rows: np.ndarray, binary: bool, datatype: str = "FP64") -> list:
    tensor = triton.InferInput("input-0", list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows.astype(np.float32 if datatype == "FP32" else np.float64), binary_data=binary)
    return [tensor]


def test_tritonclient_server_and_model_calls(url):
    client = triton.InferenceServerClient(urllib.parse.urlsplit(url).netloc)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        assert client.is_model_ready("iris") and client.is_model_ready("iris", "1")
        metadata = client.get_model_metadata("iris")
        assert metadata["name"] == "iris" and metadata["inputs"][0]["shape"] == [-1, 4]
        assert not client.is_model_ready("nope")
    finally:
        client.close()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_tritonclient_infer_matches_the_json_path(url, binary, compression):
    client = triton.InferenceServerClient(urllib.parse.urlsplit(url).netloc)
    try:
        outputs = [
            triton.InferRequestedOutput("predict", binary_data=binary),
            triton.InferRequestedOutput("predict_proba", binary_data=binary),
        ]
        result = client.infer(
            "iris",
            triton_inputs(ROWS, binary),
            outputs=outputs,
            request_id="t-1",
            request_compression_algorithm=compression,
        )
        assert as_labels(result.as_numpy("predict")) == json_labels(url, ROWS)
        assert result.as_numpy("predict_proba").shape == (3, 3)
        assert result.get_response()["id"] == "t-1"
    finally:
        client.close()


def test_tritonclient_defaults_digits_fp32_and_a_version_path(url):
    client = triton.InferenceServerClient(urllib.parse.urlsplit(url).netloc)
    try:
        # No outputs named: tritonclient asks for all of them in binary.
        result = client.infer("iris", triton_inputs(ROWS, True, "FP32"), model_version="1")
        assert as_labels(result.as_numpy("predict")) == json_labels(url, ROWS)
        digits = np.zeros((2, 64))
        digits_result = client.infer("digits", triton_inputs(digits, True))
        assert digits_result.as_numpy("predict").tolist() == json_labels(url, digits, "digits")
        only = client.infer("iris", triton_inputs(ROWS, True), outputs=[triton.InferRequestedOutput("predict")])
        assert only.as_numpy("predict_proba") is None
    finally:
        client.close()


def test_tritonclient_aio(url):
    async def run() -> tuple[list, bool]:
        client = triton_aio.InferenceServerClient(urllib.parse.urlsplit(url).netloc)
        try:
            live = await client.is_server_live()
            result = await client.infer("iris", triton_inputs(ROWS, True))
            as_json = [triton_aio.InferRequestedOutput("predict", binary_data=False)]
            json_result = await client.infer("iris", triton_inputs(ROWS, False), outputs=as_json)
            assert as_labels(json_result.as_numpy("predict")) == as_labels(result.as_numpy("predict"))
            return as_labels(result.as_numpy("predict")), live
        finally:
            await client.close()

    labels, live = asyncio.run(run())
    assert live and labels == json_labels(url, ROWS)


def test_a_malformed_binary_request_is_a_json_400_through_the_wire(url):
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    header = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "parameters": {"binary_data_size": 32}}]}
    ).encode()
    connection.request(
        "POST", "/v2/models/iris/infer", header + b"\0" * 31, {"Inference-Header-Content-Length": str(len(header))}
    )
    response = connection.getresponse()
    body = json.loads(response.read())
    assert response.status == 400 and "binary bytes follow" in body["error"]
    connection.close()


@pytest.mark.parametrize("path", ["/v1/models/iris:predict", "/predict"])
def test_a_plain_client_without_content_type(url, path):
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    connection.request("POST", path, json.dumps({"instances": ROWS.tolist()}).encode())  # no Content-Type
    response = connection.getresponse()
    assert response.status == 200 and json.loads(response.read())["predictions"] == json_labels(url, ROWS)
    connection.request("POST", path, b"<html></html>", {"Content-Type": "text/html"})
    refused = connection.getresponse()
    assert refused.status == 415 and "Content-Type text/html" in json.loads(refused.read())["error"]
    connection.close()
