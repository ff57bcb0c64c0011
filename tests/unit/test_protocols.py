"""The protocol codecs as pure functions: bodies as real clients send them (tritonclient's
own request encoder and response decoder, no network), and every malformed one a 4xx."""

from __future__ import annotations

import gzip
import json
import time
import zlib

import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.http._utils import _get_inference_request

from service.dataplane.protocols import body, shortcut, v1, v2
from service.errors import InputError

OUTPUTS = ("predict", "predict_proba")
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]])


def client_request(rows: np.ndarray, datatype: str, binary: bool, outputs=None, **kwargs) -> tuple[bytes, str | None]:
    """What tritonclient.http puts on the wire for this input (body, Inference-Header-Content-Length)."""
    tensor = triton.InferInput("input-0", list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows.astype(v2.NUMERIC[datatype].newbyteorder("=")), binary_data=binary)
    request, json_size = _get_inference_request(
        [tensor], kwargs.get("request_id", ""), outputs, 0, False, False, 0, None, kwargs.get("parameters")
    )
    return (request if isinstance(request, bytes) else request.encode()), (
        None if json_size is None else str(json_size)
    )


def decode(raw: bytes, header: str | None = None, width: int = 4) -> v2.V2Request:
    return v2.decode(raw, header, width, 16, OUTPUTS)


# --- content types and compression ------------------------------------------------------------


@pytest.mark.parametrize("mimetype", ["", "application/json", "application/octet-stream", "application/vnd.x+json"])
def test_the_types_real_clients_send_are_accepted(mimetype):
    body.check_content_type(mimetype)


@pytest.mark.parametrize("mimetype", ["text/html", "multipart/form-data", "text/plain", "application/xml"])
def test_a_clearly_wrong_type_is_a_415(mimetype):
    with pytest.raises(InputError) as error:
        body.check_content_type(mimetype)
    assert error.value.status == 415


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b, wbits=-15)),
        ("identity", lambda b: b),
        ("", lambda b: b),
    ],
    ids=["gzip", "deflate (zlib)", "deflate (raw)", "identity", "none"],
)
def test_compressed_bodies_round_trip(encoding, compress):
    raw = orjson.dumps({"instances": ROWS.tolist()})
    assert body.decompress(compress(raw), encoding, 1 << 20) == raw


def test_a_zip_bomb_is_a_413_and_fast():
    bomb = gzip.compress(b"\0" * (200 << 20))  # 200 MiB of zeros in ~200 KiB
    started = time.perf_counter()
    with pytest.raises(InputError) as error:
        body.decompress(bomb, "gzip", 1 << 20)
    assert error.value.status == 413 and "decompressed" in str(error.value)
    assert len(bomb) < 1 << 20, "the compressed body itself fits the limit"
    # Fast: refused once the limit is passed, not after inflating 200 MiB (that takes
    # seconds); a generous bound, the time itself is a few ms.
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("data", "encoding", "status"),
    [(gzip.compress(b"{}")[:-6], "gzip", 400), (b"not gzip", "gzip", 400), (b"x", "br", 415), (b"x", "zstd", 415)],
)
def test_bad_compressed_bodies(data, encoding, status):
    with pytest.raises(InputError) as error:
        body.decompress(data, encoding, 1 << 20)
    assert error.value.status == status


# --- V1 and the shortcut ----------------------------------------------------------------------


def test_v1_and_shortcut_decode_and_encode():
    assert v1.decode(orjson.dumps({"instances": ROWS.tolist()}), 4, 16).tolist() == ROWS.tolist()
    assert orjson.loads(v1.encode(["a"], [[1.0]])) == {"predictions": ["a"], "probabilities": [[1.0]]}
    assert orjson.loads(v1.encode([3], None)) == {"predictions": [3]}
    assert shortcut.decode(b'{"features": [1, 2, 3, 4]}', 4, 16).tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert orjson.loads(shortcut.encode("iris", "1", ["a"], None)) == {
        "model": "iris",
        "version": "1",
        "predictions": ["a"],
    }
    with pytest.raises(InputError, match="instances"):
        v1.decode(b"{}", 4, 16)


# --- V2: JSON and binary tensors from tritonclient's own encoder --------------------------------


@pytest.mark.parametrize("datatype", ["FP32", "FP64", "INT32", "INT64"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_requests_decode_to_the_same_rows(datatype, binary):
    rows = ROWS if datatype.startswith("FP") else np.array([[5, 3, 1, 0], [6, 3, 6, 2]])
    raw, header = client_request(rows, datatype, binary)
    assert (header is not None) is binary
    decoded = decode(raw, header)
    expected = rows.astype(np.float32).astype(np.float64) if datatype == "FP32" else rows.astype(np.float64)
    assert decoded.rows.tolist() == expected.tolist()
    # No outputs named: tritonclient asks for every output in binary (binary_data_output).
    assert decoded.outputs is None and decoded.binary_outputs == frozenset(OUTPUTS)


def test_outputs_are_honoured_with_their_binary_flags_and_the_id_is_kept():
    outputs = [
        triton.InferRequestedOutput("predict", binary_data=True),
        triton.InferRequestedOutput("predict_proba", binary_data=False),
    ]
    raw, header = client_request(ROWS, "FP64", False, outputs, request_id="r-7", parameters={"anything": 1})
    decoded = decode(raw, header)
    assert decoded.outputs == OUTPUTS and decoded.binary_outputs == {"predict"} and decoded.request_id == "r-7"
    only = [triton.InferRequestedOutput("predict", binary_data=False)]
    assert decode(*client_request(ROWS, "FP64", False, only)).outputs == ("predict",)
    with pytest.raises(InputError, match="unknown output 'nope'"):
        decode(*client_request(ROWS, "FP64", False, [triton.InferRequestedOutput("nope")]))


@pytest.mark.parametrize("binary", [frozenset(), frozenset(OUTPUTS), frozenset({"predict"})])
@pytest.mark.parametrize("labels", [["setosa", "virginica"], [3, 7]], ids=["BYTES", "INT64"])
def test_responses_decode_in_tritonclient(binary, labels):
    datatype = "BYTES" if isinstance(labels[0], str) else "INT64"
    proba = [[0.9, 0.1], [0.2, 0.8]]
    tensors = [
        v2.Tensor("predict", datatype, [2], labels),
        v2.Tensor("predict_proba", "FP64", [2, 2], [p for row in proba for p in row]),
    ]
    raw, headers, content_type = v2.encode("iris", "1", "r-1", tensors, binary)
    assert (content_type == "application/octet-stream") is bool(binary)
    result = triton.InferResult.from_response_body(
        raw, header_length=headers.get(v2.HEADER_LENGTH) and int(headers[v2.HEADER_LENGTH])
    )
    got = result.as_numpy("predict").tolist()
    assert [g.decode() if isinstance(g, bytes) else g for g in got] == labels
    assert result.as_numpy("predict_proba").tolist() == proba
    assert result.get_response()["id"] == "r-1"


def _binary_request(header: dict, data: bytes) -> tuple[bytes, str]:
    head = orjson.dumps(header)
    return head + data, str(len(head))


def _tensor(size: int, datatype: str = "FP64", shape=(1, 4), **extra) -> dict:
    return {
        "inputs": [
            {
                "name": "input-0",
                "shape": list(shape),
                "datatype": datatype,
                "parameters": {"binary_data_size": size},
                **extra,
            }
        ]
    }


FOUR = np.array([[1.0, 2.0, 3.0, 4.0]]).astype("<f8").tobytes()


@pytest.mark.parametrize(
    ("raw", "header", "message"),
    [
        (*_binary_request(_tensor(32), FOUR)[:1], "9999", "Inference-Header-Content-Length is 9999"),
        (*_binary_request(_tensor(32), FOUR)[:1], "12abc", "must be a byte count"),
        (*_binary_request(_tensor(32), FOUR)[:1], "0", "Inference-Header-Content-Length is 0"),
        (*_binary_request(_tensor(32), FOUR + b"\0"), "33 binary bytes follow .* declare 32"),
        (*_binary_request(_tensor(40), FOUR), "only 32 binary bytes follow"),
        (*_binary_request(_tensor(30), FOUR[:30]), "not a whole number of FP64"),
        (*_binary_request(_tensor(24), FOUR[:24]), "3 FP64 elements but the shape needs 4"),
        (*_binary_request(_tensor(32, "FP16"), FOUR), "FP16 is not supported"),
        (*_binary_request(_tensor(32, "XYZ"), FOUR), "not an Open Inference Protocol datatype"),
        (*_binary_request(_tensor(-1), b""), "non-negative integer"),
        (*_binary_request(_tensor(32, data=[1, 2, 3, 4]), FOUR), "both 'data' and binary_data_size"),
        (orjson.dumps(_tensor(32)), None, "no Inference-Header-Content-Length"),
        (*_binary_request(_tensor(32), np.array([np.nan, 1, 2, 3]).tobytes()), "finite"),
        (*_binary_request({**_tensor(32), "parameters": {"binary_data_output": "yes"}}, FOUR), "true or false"),
    ],
)
def test_every_malformed_binary_request_is_a_400(raw, header, message):
    with pytest.raises(InputError, match=message) as error:
        decode(raw, header)
    assert error.value.status == 400


# --- inputs found by reading, and a fuzz so that the next one is found by a test ----------


@pytest.mark.parametrize("header", ["²", "3²", "٣٢", "9" * 5000, "-32", "+32", "0x20", ""])
def test_a_header_length_that_is_not_ascii_digits_is_a_400(header):
    raw, _ = _binary_request(_tensor(32), FOUR)
    with pytest.raises(InputError) as error:
        decode(raw, header)
    assert error.value.status == 400 and v2.HEADER_LENGTH in str(error.value)


def test_an_integer_of_more_digits_than_python_converts_is_a_400():
    body = b'{"instances": [[' + b"1" * 4301 + b", 1, 1, 1]]}"
    with pytest.raises(InputError, match="too large") as error:
        v1.decode(body, 4, 16)
    assert error.value.status == 400
    wide = b'{"instances": [[' + b"1" * 400 + b", 1, 1, 1]]}"
    with pytest.raises(InputError, match="too large for a 64-bit float"):
        v1.decode(wide, 4, 16)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_TENSOR = st.fixed_dictionaries(
    {"name": st.just("input-0")},
    optional={
        "shape": st.one_of(st.lists(st.integers(-2, 2**40), max_size=3), _JSON_VALUES),
        "datatype": st.one_of(
            st.sampled_from(["FP64", "FP32", "INT64", "INT8", "BYTES", "BOOL", "FP16"]), _JSON_VALUES
        ),
        "parameters": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "binary_data_size": st.one_of(st.integers(-(2**70), 2**70), _JSON_VALUES),
                    "binary_data": _JSON_VALUES,
                },
            ),
            _JSON_VALUES,
        ),
        "data": _JSON_VALUES,
    },
)
_REQUEST = st.fixed_dictionaries(
    {"inputs": st.one_of(st.lists(_TENSOR, max_size=2), _JSON_VALUES)},
    optional={
        "id": _JSON_VALUES,
        "parameters": st.one_of(
            st.dictionaries(st.sampled_from(["binary_data_output", "x"]), _JSON_VALUES), _JSON_VALUES
        ),
        "outputs": st.one_of(
            st.lists(
                st.fixed_dictionaries(
                    {"name": st.one_of(st.sampled_from(["predict", "predict_proba"]), _JSON_VALUES)},
                    optional={
                        "parameters": st.one_of(st.dictionaries(st.just("binary_data"), _JSON_VALUES), _JSON_VALUES)
                    },
                ),
                max_size=3,
            ),
            _JSON_VALUES,
        ),
    },
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    request=_REQUEST,
    binary=st.binary(max_size=64),
    header=st.one_of(
        st.none(),
        st.text(max_size=24),
        st.text(
            st.characters(categories=("Nd", "No")).filter(str.isdigit), min_size=1, max_size=6
        ),  # "²": int() refuses
        st.text("0123456789", min_size=19, max_size=5000),
        st.integers(-5, 400).map(str),
    ),
)
def test_fuzzed_binary_requests_get_an_answer_or_a_4xx_never_another_error(request, binary, header):
    head = json.dumps(request).encode()  # the standard library: integers of any size too
    raw = head + binary
    for length in (header, str(len(head))):
        try:
            decode(raw, length)
        except InputError as error:
            assert 400 <= error.status < 500, error
