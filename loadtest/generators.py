"""Command lines and payload files for the load generators (wrk, h2load, Locust)."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.payloads import Mix, around_first_value, model_width, pool_row

LOADTEST = Path(__file__).resolve().parent
WRK_SCRIPT = LOADTEST / "wrk_mix.lua"


def predict_path(model: str) -> str:
    """The KServe V1 predict path of a model."""
    return f"/v1/models/{model}:predict"


def _lua_string(text: str) -> str:
    assert "]==]" not in text
    return f"[==[{text}]==]"


def v2_path(model: str) -> str:
    """The Open Inference Protocol (V2) infer path of a model."""
    return f"/v2/models/{model}/infer"


# The V2 body around one row: one FP64 tensor of shape [1, width] and the `predict` output
# only, a body MLServer and the cluster answer alike (the same labels, nothing else).
_V2_HEAD = '{{"inputs":[{{"name":"input-0","shape":[1,{width}],"datatype":"FP64","data":'
_V2_TAIL = '}],"outputs":[{"name":"predict"}]}'


def _body_parts(model: str, protocol: str) -> tuple[str, str]:
    """(head, tail) around a row's JSON in a single-row body of `protocol` (v1 or v2)."""
    if protocol == "v1":
        return '{"instances":[', "]}"
    if protocol == "v2":
        return _V2_HEAD.format(width=model_width(model)), _V2_TAIL
    raise ValueError(f"unknown protocol {protocol!r}; v1 or v2")


def write_wrk_payloads(
    path: Path, model: str, mix: Mix, nonce: int, choices: int = 50_000, protocol: str = "v1"
) -> Path:
    """The Lua data file wrk_mix.lua loads: pool bodies, pre-drawn choices, fresh-row
    templates, in KServe V1 (`instances`) or V2 (a tensor) bodies."""
    body_head, body_tail = _body_parts(model, protocol)
    if protocol == "v2" and isinstance(pool_row(model, 0), dict):
        raise ValueError(f"{model}: V2 payloads here are one tensor of numbers, not named columns")
    pool = pool_bodies(model, mix, protocol)
    tails = [around_first_value(pool_row(model, i))[1] + body_tail for i in range(min(mix.pool_size, 64))]
    head = body_head + around_first_value(pool_row(model, 0))[0]
    drawn = mix.choices(choices, seed=nonce)
    lua = [
        "return {",
        f"  path = {_lua_string(predict_path(model) if protocol == 'v1' else v2_path(model))},",
        f"  fresh_head = {_lua_string(head + str(nonce))},",
        "  pool = {" + ",".join(_lua_string(body) for body in pool) + "},",
        "  tails = {" + ",".join(_lua_string(tail) for tail in tails) + "},",
        "  choices = {" + ",".join(str(c) for c in drawn) + "},",
        "}",
    ]
    path.write_text("\n".join(lua) + "\n")
    return path


def pool_bodies(model: str, mix: Mix, protocol: str = "v1") -> list[str]:
    """Each pool row as the exact single-row body wrk sends for it (the L1 keys on the bytes)."""
    head, tail = _body_parts(model, protocol)
    return [head + json.dumps(pool_row(model, i), separators=(",", ":")) + tail for i in range(mix.pool_size)]


def pool_batches(model: str, mix: Mix, batch_rows: int = 500) -> list[str]:
    """The pool as V1 batch bodies, to warm it into the cache before a run."""
    rows = [pool_row(model, i) for i in range(mix.pool_size)]
    return [
        json.dumps({"instances": rows[i : i + batch_rows]}, separators=(",", ":"))
        for i in range(0, len(rows), batch_rows)
    ]


def wrk_argv(url: str, connections: int, seconds: float, timeout_s: float = 10.0) -> list[str]:
    """wrk with one thread (plenty on loopback) and the hit-ratio script."""
    return [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={timeout_s:g}s",
        "-s",
        str(WRK_SCRIPT),
        url,
    ]


def h2load_argv(url: str, body: Path | None, connections: int, seconds: float, log_file: Path) -> list[str]:
    """A time-bounded HTTP/1.1 h2load run with its per-request log: a POST of `body`, or a GET."""
    argv = [
        "h2load",
        "--h1",
        "-c",
        str(connections),
        "-m",
        "1",
        "-D",
        str(max(1, round(seconds))),
        "--warm-up-time",
        "1",
        "-T",
        "10",
        "--log-file",
        str(log_file),
    ]
    if body is not None:
        argv += ["-d", str(body), "-H", "Content-Type: application/json"]
    return [*argv, url]


def h2load_paced_argv(
    url: str, body: Path, connections: int, rate: float, seconds: float, log_file: Path, headers: list[str]
) -> list[str]:
    """h2load sending `rate` requests/s in all, paced (--rps per connection) whatever the
    answers: open loop while each answer comes back within its connection's interval (at
    half the capacity, nearly all); a POST of `body` with `headers`, its per-request log."""
    per_connection = max(1, round(rate / connections))
    argv = ["h2load", "--h1", "-c", str(connections), "-m", "1", "--rps", str(per_connection)]
    argv += ["-D", str(max(1, round(seconds))), "--warm-up-time", "1", "-T", "10", "--log-file", str(log_file)]
    argv += ["-d", str(body), "-H", "Content-Type: application/json"]
    for header in headers:
        argv += ["-H", header]
    return [*argv, url]


def h2load_count_argv(url: str, body: Path | None, requests_total: int, clients: int) -> list[str]:
    """A count-bounded HTTP/1.1 h2load run: `requests_total` requests over `clients` connections."""
    argv = ["h2load", "--h1", "-n", str(requests_total), "-c", str(clients), "-m", "1", "-T", "10"]
    if body is not None:
        argv += ["-d", str(body), "-H", "Content-Type: application/json"]
    return [*argv, url]
