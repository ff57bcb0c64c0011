"""Property-based fuzzing of a real replica's whole HTTP surface: no request gets a 500.

One real gunicorn (gevent) replica with a real Redis, serving the demo models (plain rows,
a forest, and churn's named columns). Every route of the route table is fuzzed, so both
doors are: the fast lane answers the prediction routes, Flask every other. Bodies are
valid requests with one part replaced by a hostile JSON value (lone surrogates, integers
of hundreds of digits, NaN, duplicate keys, deep nesting), or hostile JSON as a whole,
or Triton binary tensors with a wrong layout. An answer must be a status below 500 (or a
503 the replica means) with a JSON error body.

The search is derandomized, so CI runs the same examples every time; FUZZ_EXAMPLES raises
the budget and FUZZ_SEED draws other examples, for a longer hunt by hand.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from service.web.routes import ROUTES
from tests.support.servers import start_redis, start_replica

pytestmark = pytest.mark.integration

TOKEN = "fuzz-operator-token"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "250"))
SEED = int(os.environ.get("FUZZ_SEED", "0"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=SEED == 0,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
MODELS = ("iris", "digits", "churn")
CHURN_ROW = {"plan": "pro", "age": 31, "monthly": 42.5, "support_calls": 2, "autopay": True}


class Raw:
    """JSON text written as is: NaN, a 400-digit number, an object with a key twice."""

    def __init__(self, text: str) -> None:
        self.text = text


def dumps(value: Any) -> str:
    """JSON text of a value that may hold Raw parts (json.dumps writes lone surrogates as escapes)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
texts = st.text(st.one_of(st.characters(codec="utf-8"), surrogates), max_size=12) | st.sampled_from(
    ["setosa", "pro", "input-0", "predict", "predict_proba", "plan", "age", "FP64", "BYTES", "iris", "1"]
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(
        ["NaN", "Infinity", "-Infinity", "1e400", "-1e309", "1" + "0" * 400, "1" * 5000, "-0.0", "1E-400"]
    ).map(Raw),
)
deep = st.integers(min_value=9, max_value=3000).map(lambda depth: Raw("[" * depth + "1" + "]" * depth))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)


def _object_with_twice(pairs: list[tuple[str, Any]]) -> Raw:
    doubled = pairs + pairs[:1]
    return Raw("{" + ",".join(f"{json.dumps(k)}:{dumps(v)}" for k, v in doubled) + "}")


values = st.recursive(
    scalars | deep,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(texts, children, max_size=4),
        st.lists(st.tuples(texts, children), min_size=1, max_size=3).map(_object_with_twice),
    ),
    max_leaves=12,
)


def _templates(protocol: str, model: str) -> list[Any]:
    """Valid bodies of one protocol for `model`: what the mutations start from."""
    if model == "churn":
        v1 = [{"instances": [CHURN_ROW]}, {"instances": [list(CHURN_ROW.values())]}, {"features": CHURN_ROW}]
        columns = [
            {"name": name, "shape": [1], "datatype": datatype, "data": [CHURN_ROW[name]]}
            for name, datatype in (
                ("plan", "BYTES"),
                ("age", "INT64"),
                ("monthly", "FP64"),
                ("support_calls", "INT64"),
                ("autopay", "BOOL"),
            )
        ]
        one_tensor = {"name": "input-0", "shape": [1, 5], "datatype": "FP64", "data": [[1, 31, 42.5, 2, 1]]}
        v2 = [
            {"id": "a", "inputs": columns, "outputs": [{"name": "predict"}], "parameters": {}},
            {"inputs": [one_tensor]},
        ]
    else:
        width = 4 if model == "iris" else 64
        row = [0.5] * width
        v1 = [{"instances": [row, row]}, {"features": row}]
        v2 = [
            {
                "id": "a",
                "inputs": [{"name": "input-0", "shape": [1, width], "datatype": "FP64", "data": [row]}],
                "outputs": [{"name": "predict", "parameters": {"binary_data": False}}, {"name": "predict_proba"}],
                "parameters": {"binary_data_output": False},
            }
        ]
    return v2 if protocol == "v2" else v1


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            found += _paths(child, (*prefix, i))
    return found


def _replace(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(value[path[0]], path[1:], new)
    return copy


# Values of each kind the types refuse; the mutations draw them as often as everything else.
HOSTILE_VALUES = [
    "\ud800",
    "a\udfff",
    Raw("1" + "0" * 400),
    Raw("-" + "9" * 330),
    Raw("1e400"),
    Raw("NaN"),
    Raw("-Infinity"),
    2**64,
    -(2**63) - 1,
    [1],
    {"name": "predict"},
    None,
    True,
    "",
    1.5,
    -1,
    Raw("[" * 2000 + "]" * 2000),
]
hostile = st.sampled_from(HOSTILE_VALUES)


@st.composite
def near_valid(draw: st.DrawFn, protocol: str, model: str) -> str:
    """A valid body of one protocol for `model`, with a few parts replaced by hostile values."""
    body = draw(st.sampled_from(_templates(protocol, model)))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        path = draw(st.sampled_from(_paths(body)))
        if draw(st.booleans()) and path and isinstance(path[-1], str):
            # Replace the key instead: a tensor named by an array, an output named twice.
            parent = body
            for step in path[:-1]:
                parent = parent[step]
            renamed = {(draw(texts) if k == path[-1] else k): v for k, v in parent.items()}
            body = _replace(body, path[:-1], renamed)
        else:
            body = _replace(body, path, draw(hostile | values))
    if draw(st.integers(min_value=0, max_value=9)) == 0 and isinstance(body, dict) and "outputs" in body:
        body = _replace(body, ("outputs",), [{"name": "predict"}] * draw(st.integers(min_value=2, max_value=5000)))
    return dumps(body)


@st.composite
def binary_request(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A Triton binary-tensor request whose sizes, header length and bytes may disagree."""
    model = draw(st.sampled_from(MODELS))
    if model == "churn":
        name, datatype, shape = draw(st.sampled_from([("plan", "BYTES", [1]), ("age", "INT64", [1])]))
    else:
        name, datatype, shape = "input-0", draw(st.sampled_from(["FP32", "FP64", "INT32", "BYTES"])), [1, 4]
    blob = draw(st.binary(max_size=80))
    if datatype == "BYTES" and draw(st.booleans()):
        text = draw(st.binary(max_size=20))
        blob = struct.pack("<I", draw(st.sampled_from([len(text), 2**32 - 1, 0]))) + text
    size = draw(st.sampled_from([len(blob), 0, 2**40, -1])) if draw(st.booleans()) else len(blob)
    header = dumps(
        {
            "inputs": [{"name": name, "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}}],
            "parameters": {"binary_data_output": draw(st.booleans())},
        }
    ).encode()
    length = draw(st.sampled_from([str(len(header)), "0", "²", "9" * 30, str(len(header) + 1), "-1"]))
    return header + blob, {"Inference-Header-Content-Length": length, "Content-Type": "application/octet-stream"}


def _url(route_rule: str, name: str, version: str) -> str:
    return route_rule.replace("<model:name>", name).replace("<model:version>", version)


@pytest.fixture(scope="module")
def replica(module_servers, models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    redis_server, redis_port = start_redis(tmp)
    module_servers.append(redis_server)
    server, url = start_replica(
        tmp,
        {
            "SERVICE_MODELS_DIR": str(models_dir),
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "SERVICE_OPERATOR_TOKEN": TOKEN,
            "SERVICE_CACHE_KEY_PREFIX": f"fuzz{redis_port}",
        },
    )
    module_servers.append(server)
    session = requests.Session()
    yield url, session
    session.close()


def _check(response: requests.Response, what: str) -> None:
    assert response.status_code < 500 or response.status_code == 503, (
        f"{what} -> {response.status_code} {response.text[:300]}"
    )
    if response.status_code >= 400:
        assert response.headers.get("Content-Type", "").startswith("application/json"), what
        assert isinstance(response.json().get("error"), str), what


def _post(replica, path: str, body: bytes, headers: dict[str, str]) -> None:
    url, session = replica
    response = session.post(url + path, data=body, headers=headers, timeout=30)
    _check(response, f"POST {path} {headers} {body[:300]!r}")


PREDICTION_RULES = sorted({route.rule for route in ROUTES if route.prediction})
GET_RULES = sorted({route.rule for route in ROUTES if route.method == "GET"})
OPERATOR_POST_RULES = sorted({route.rule for route in ROUTES if route.operator and route.method == "POST"})
names = st.one_of(st.sampled_from([*MODELS, "absent", "1", "x" * 64]), st.from_regex(r"\A[A-Za-z0-9_.-]{1,70}\Z"))
# What HTTP lets a header carry (gunicorn itself refuses control characters, before the app).
header_text = st.text(
    st.one_of(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E), st.characters(min_codepoint=0xA0, max_codepoint=0xFF)
    ),
    max_size=200,
).filter(lambda text: text == text.strip())  # requests refuses a value that starts with a space
request_ids = st.one_of(st.none(), header_text)


def _single_mutations(protocol: str, model: str) -> list[str]:
    """Every valid body of the protocol with one node replaced by one hostile value, or one
    key renamed to a lone surrogate, or written twice."""
    bodies = []
    for template in _templates(protocol, model):
        for path in _paths(template):
            bodies += [dumps(_replace(template, path, value)) for value in HOSTILE_VALUES]
            if path and isinstance(path[-1], str):
                parent = template
                for step in path[:-1]:
                    parent = parent[step]
                renamed = {("\ud800" if k == path[-1] else k): v for k, v in parent.items()}
                bodies.append(dumps(_replace(template, path[:-1], renamed)))
                bodies.append(dumps(_replace(template, path[:-1], _object_with_twice(list(parent.items())))))
    return bodies


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("rule", PREDICTION_RULES)
def test_no_single_hostile_value_in_a_valid_request_gets_a_500(replica, rule, model):
    protocol = "v2" if rule.startswith("/v2/") else "v1"
    path = _url(rule, model, "1")
    url, session = replica
    failures = []
    for body in _single_mutations(protocol, model):
        response = session.post(url + path, data=body.encode("utf-8", "surrogatepass"), timeout=30)
        try:
            _check(response, body[:200])
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} bodies on {path}:\n" + "\n".join(failures[:10])


@FUZZ
@seed(SEED)
@given(
    rule=st.sampled_from(PREDICTION_RULES),
    model=st.sampled_from(MODELS),
    version=st.sampled_from(["1", "1", "1", "2"]),
    body=st.data(),
    content_type=st.sampled_from(["application/json"] * 4 + ["", "application/octet-stream", "text/plain", "a/b+json"]),
    request_id=request_ids,
)
def test_no_prediction_request_gets_a_500(replica, rule, model, version, body, content_type, request_id):
    protocol = "v2" if rule.startswith("/v2/") else "v1"
    text = body.draw(st.one_of(near_valid(protocol, model), near_valid(protocol, model), values.map(dumps)))
    headers = {"Content-Type": content_type}
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    _post(replica, _url(rule, model, version), text.encode("utf-8", "surrogatepass"), headers)


@FUZZ
@seed(SEED)
@given(request=binary_request(), version=st.sampled_from(["", "/versions/1"]))
def test_no_binary_tensor_request_gets_a_500(replica, request, version):
    body, headers = request
    model = "churn" if b'"plan"' in body or b'"age"' in body else "iris"
    _post(replica, f"/v2/models/{model}{version}/infer", body, headers)


@FUZZ
@seed(SEED)
@given(rule=st.sampled_from(GET_RULES), name=names, version=names)
def test_no_read_route_gets_a_500(replica, rule, name, version):
    url, session = replica
    headers = {"Authorization": f"Bearer {TOKEN}"}
    response = session.get(url + _url(rule, name, version), headers=headers, timeout=30)
    _check(response, f"GET {rule} {name} {version}")


@FUZZ
@seed(SEED)
@given(rule=st.sampled_from(OPERATOR_POST_RULES), name=names, body=values.map(dumps), token=st.booleans())
def test_no_operator_request_gets_a_500(replica, rule, name, body, token):
    """Last in the module: a fuzzed unload or policy may stop a demo model serving."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {TOKEN}"
    _post(replica, _url(rule, name, "1"), body.encode("utf-8", "surrogatepass"), headers)
