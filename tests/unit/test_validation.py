"""Every kind of bad input is refused with the right status and a message that says why."""

import json

import numpy as np
import pytest

from service.dataplane.protocols import shortcut, v1, v2
from service.errors import InputError
from service.inputs.parsing import parse_json

WIDTH, MAX_ROWS = 4, 8
OUTPUTS = ("predict", "predict_proba")


# The protocol codecs take bytes: these send the payloads as a client would (the standard
# library's encoder keeps huge integers and writes inf as Infinity).
def rows_from_v1(payload, width, max_rows):
    return v1.decode(json.dumps(payload).encode(), width, max_rows)


def rows_from_shortcut(payload, width, max_rows):
    return shortcut.decode(json.dumps(payload).encode(), width, max_rows)


def parse_v2(payload, width, max_rows, outputs):
    return v2.decode(json.dumps(payload).encode(), None, width, max_rows, outputs)


def v2_body(data, shape=(1, 4), datatype="FP64", **extra):
    return {"inputs": [{"name": "x", "shape": list(shape), "datatype": datatype, "data": data}], **extra}


BAD_JSON = [
    (b"", "empty"),
    (b"{", "malformed JSON"),
    (b"\xff\xfe{}", "UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
]


@pytest.mark.parametrize(("body", "message"), BAD_JSON)
def test_bad_json_is_400(body, message):
    with pytest.raises(InputError) as err:
        parse_json(body)
    assert err.value.status == 400
    assert message in str(err.value)


BAD_V1 = [
    ([], 400, "JSON object"),
    ({}, 400, "missing 'instances'"),
    ({"instances": {}}, 400, "array of rows"),
    ({"instances": []}, 400, "empty"),
    ({"instances": [[1, 2, 3]]}, 400, "expects 4"),
    ({"instances": [[1, 2, 3, 4, 5]]}, 400, "expects 4"),
    ({"instances": [1, 2, 3, 4]}, 400, "must be an array of 4 numbers"),
    ({"instances": [[1, 2, "3", 4]]}, 400, "instances[0][2] must be a number, got string"),
    ({"instances": [[1, 2, None, 4]]}, 400, "got null"),
    ({"instances": [[1, True, 3, 4]]}, 400, "got boolean"),
    ({"instances": [[1, 2, [3], 4]]}, 400, "got array"),
    ({"instances": [[1e308 * 10, 2, 3, 4]]}, 400, "instances[0][0] must be a number, got Infinity"),
    ({"instances": [[1, float("nan"), 3, 4]]}, 400, "instances[0][1] must be a number, got NaN"),
    ({"instances": [[10**400, 2, 3, 4]]}, 400, "too large"),
    ({"instances": [[1, 2, 3, 4]] * (MAX_ROWS + 1)}, 413, "at most 8"),
]


@pytest.mark.parametrize(("payload", "status", "message"), BAD_V1)
def test_bad_v1_bodies(payload, status, message):
    with pytest.raises(InputError) as err:
        rows_from_v1(payload, WIDTH, MAX_ROWS)
    assert (err.value.status, message in str(err.value)) == (status, True), str(err.value)


def test_v1_rows_become_float64():
    rows = rows_from_v1({"instances": [[1, 2.5, 3, 4], [0, 0, 0, 0]]}, WIDTH, MAX_ROWS)
    assert rows.dtype == np.float64
    assert rows.tolist() == [[1.0, 2.5, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]


def test_shortcut_takes_features_or_instances():
    assert rows_from_shortcut({"features": [1, 2, 3, 4]}, WIDTH, MAX_ROWS).shape == (1, 4)
    assert rows_from_shortcut({"instances": [[1, 2, 3, 4]] * 2}, WIDTH, MAX_ROWS).shape == (2, 4)
    with pytest.raises(InputError, match="features"):
        rows_from_shortcut({"rows": []}, WIDTH, MAX_ROWS)
    with pytest.raises(InputError, match="features\\[0\\]\\[1\\] must be a number"):
        rows_from_shortcut({"features": [1, "x", 3, 4]}, WIDTH, MAX_ROWS)


BAD_V2 = [
    ({"inputs": []}, 400, "non-empty array"),
    ({}, 400, "'inputs'"),
    ({"inputs": [{}, {}]}, 400, "one input tensor"),
    ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64"}]}, 400, "missing 'data'"),
    (v2_body([1, 2, 3, 4], datatype="FLOAT"), 400, "not an Open Inference Protocol datatype"),
    (v2_body([1, 2, 3, 4], datatype="BYTES"), 400, "not supported"),
    (v2_body([1, 2, 3], shape=(1, 4)), 400, "has 3 values but shape [1, 4] needs 4"),
    (v2_body([1, 2, 3, 4], shape=(2, 4)), 400, "needs 8"),
    (v2_body([1, 2, 3, 4], shape=(4,)), 400, "expects [N, 4]"),
    (v2_body([1, 2, 3, 4], shape=(1, -4)), 400, "non-negative"),
    (v2_body([1, 2, 3, 4], shape=(0, 4)), 400, "empty"),
    (v2_body([1, 2.5, 3, 4], datatype="INT64"), 400, "must be an integer for INT64"),
    (v2_body([1, 2, 3, 2**40], datatype="INT32"), 400, "out of range for INT32"),
    (v2_body([1, 2, 3, "4"]), 400, "got string"),
    (v2_body([1, 2, 3, 1e300], datatype="FP32"), 400, "too large for FP32"),
    (v2_body([[1, 2, 3, 4]] * (MAX_ROWS + 1), shape=(MAX_ROWS + 1, 4)), 413, "at most 8"),
    (v2_body([1, 2, 3, 4], id=7), 400, "'id' must be a string"),
    (v2_body([1, 2, 3, 4], outputs=[{"name": "logits"}]), 400, "unknown output 'logits'"),
]


@pytest.mark.parametrize(("payload", "status", "message"), BAD_V2)
def test_bad_v2_bodies(payload, status, message):
    with pytest.raises(InputError) as err:
        parse_v2(payload, WIDTH, MAX_ROWS, OUTPUTS)
    assert (err.value.status, message in str(err.value)) == (status, True), str(err.value)


def test_v2_accepts_flat_and_nested_data_of_every_numeric_type():
    flat = parse_v2(v2_body([1, 2, 3, 4, 5, 6, 7, 8], shape=(2, 4)), WIDTH, MAX_ROWS, OUTPUTS)
    nested = parse_v2(v2_body([[1, 2, 3, 4], [5, 6, 7, 8]], shape=(2, 4), datatype="INT32"), WIDTH, MAX_ROWS, OUTPUTS)
    assert flat.rows.tolist() == nested.rows.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    fp32 = parse_v2(
        v2_body([0.1, 2, 3, 4], datatype="FP32", id="abc", outputs=[{"name": "predict"}]), WIDTH, MAX_ROWS, OUTPUTS
    )
    assert fp32.rows[0, 0] == np.float64(np.float32(0.1))
    assert (fp32.request_id, fp32.outputs) == ("abc", ("predict",))
