"""Named, mixed-type inputs: every codec reads them by column, every bad cell is a 400 that
names its column and row, and the cache keys a typed row exactly."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from service.cache.results import row_keys
from service.dataplane.protocols import shortcut, v1, v2
from service.errors import InputError
from service.inputs.columns import Column, columns_from_json, frame

COLUMNS = (
    Column("plan", "BYTES", ("basic", "pro", "team")),
    Column("age", "INT64"),
    Column("monthly", "FP64"),
    Column("autopay", "BOOL"),
    Column("note", "BYTES"),
)
ROW = {"plan": "pro", "age": 31, "monthly": 20.5, "autopay": True, "note": "1"}
OUTPUTS = ("predict", "predict_proba")


def decode_v1(payload, max_rows=8):
    return v1.decode(json.dumps(payload).encode(), len(COLUMNS), max_rows, COLUMNS)


def column_tensors(rows, **override):
    tensors = []
    for column in COLUMNS:
        values = [row[column.name] for row in rows]
        tensor = {"name": column.name, "datatype": column.datatype, "shape": [len(rows), 1], "data": values}
        tensors.append({**tensor, **override.get(column.name, {})})
    return tensors


def decode_v2(payload, header_length=None, body=None):
    raw = body if body is not None else json.dumps(payload).encode()
    return v2.decode(raw, header_length, len(COLUMNS), 8, OUTPUTS, COLUMNS)


def test_v1_objects_and_rows_in_column_order_give_the_same_typed_rows():
    by_name = decode_v1({"instances": [ROW, {**ROW, "age": 40.0}]})
    in_order = decode_v1({"instances": [list(ROW.values()), ["pro", 40, 20.5, True, "1"]]})
    assert by_name.tolist() == in_order.tolist() == [["pro", 31, 20.5, True, "1"], ["pro", 40, 20.5, True, "1"]]
    assert type(by_name[1, 1]) is int  # 40.0 in an INT64 column is the integer 40
    assert type(by_name[0, 2]) is float  # and 20 in an FP64 column would be 20.0


def test_the_shortcut_takes_one_object_as_features():
    rows = shortcut.decode(json.dumps({"features": ROW}).encode(), len(COLUMNS), 8, COLUMNS)
    assert rows.tolist() == [["pro", 31, 20.5, True, "1"]]


BAD_CELLS = [
    ({"plan": "gold"}, "instances[1].plan is 'gold', not one of the values the model was fitted on: basic, pro, team"),
    ({"plan": 1}, "instances[1].plan must be a string (BYTES), got int"),
    ({"note": 1}, "instances[1].note must be a string (BYTES), got int"),
    ({"age": "31"}, "instances[1].age must be an integer (INT64), got string"),
    ({"age": 31.5}, "instances[1].age must be an integer (INT64), got float"),
    ({"age": True}, "instances[1].age must be an integer (INT64), got boolean"),
    ({"monthly": "20.5"}, "instances[1].monthly must be a number (FP64), got string"),
    ({"monthly": None}, "instances[1].monthly is null; every column needs a value"),
    ({"monthly": float("nan")}, "instances[1].monthly is NaN; numbers must be finite"),
    ({"monthly": float("inf")}, "instances[1].monthly is Infinity; numbers must be finite"),
    ({"autopay": 1}, "instances[1].autopay must be true or false (BOOL), got int"),
    ({"extra": 1}, "instances[1] has unknown column 'extra'"),
]


@pytest.mark.parametrize(("change", "message"), BAD_CELLS)
def test_v1_a_bad_cell_is_a_400_naming_its_column_and_row(change, message):
    with pytest.raises(InputError) as err:
        decode_v1({"instances": [ROW, {**ROW, **change}]})
    assert err.value.status == 400
    assert message in str(err.value)


def test_v1_a_missing_column_is_named_with_what_the_model_takes():
    row = {k: v for k, v in ROW.items() if k != "age"}
    with pytest.raises(InputError, match=r"instances\[0\] is missing column 'age'; the model takes plan \(BYTES\)"):
        decode_v1({"instances": [row]})
    with pytest.raises(InputError, match=r"instances\[0\] has 4 values; the model takes 5"):
        decode_v1({"instances": [["pro", 31, 20.5, True]]})
    with pytest.raises(InputError) as err:
        decode_v1({"instances": [ROW] * 9})
    assert err.value.status == 413


def test_v2_one_tensor_per_column_in_any_order_with_the_pandas_codec_marker():
    tensors = column_tensors([ROW, {**ROW, "plan": "team"}])
    payload = {"parameters": {"content_type": "pd"}, "inputs": tensors[::-1]}
    assert decode_v2(payload).rows.tolist() == [["pro", 31, 20.5, True, "1"], ["team", 31, 20.5, True, "1"]]
    flat = [{**t, "shape": [2]} for t in tensors]  # [N] as well as [N, 1]
    assert decode_v2({"inputs": flat}).rows.tolist() == decode_v2(payload).rows.tolist()


BAD_TENSORS = [
    ({"age": {"data": [31, "x"]}}, "input 'age'.data[1] must be an integer for INT64, got string"),
    ({"age": {"datatype": "FP64", "data": [31.0, 2.0]}}, "input 'age' must be one of INT64"),
    ({"plan": {"datatype": "FP64"}}, "input 'plan' must be one of BYTES (the column is BYTES), got FP64"),
    ({"plan": {"data": ["pro", "gold"]}}, "input 'plan' row 1 is 'gold'"),
    ({"note": {"data": ["a", None]}}, "input 'note' row 1 is null"),
    ({"monthly": {"data": [1.0, float("nan")]}}, "input 'monthly'.data[1] must be a number for FP64, got NaN"),
    ({"autopay": {"data": [True, 0]}}, "input 'autopay' row 1 must be true or false (BOOL), got int"),
    ({"age": {"shape": [3, 1], "data": [1, 2, 3]}}, "input 'age' has 3 rows but 'plan' has 2"),
    ({"age": {"shape": [2, 2], "data": [1, 2, 3, 4]}}, "a column's shape is [N] or [N, 1]"),
]


@pytest.mark.parametrize(("change", "message"), BAD_TENSORS)
def test_v2_a_bad_column_tensor_is_a_400_naming_it(change, message):
    with pytest.raises(InputError) as err:
        decode_v2({"inputs": column_tensors([ROW, ROW], **change)})
    assert err.value.status == 400
    assert message in str(err.value)


def test_v2_missing_unknown_and_repeated_columns_are_named():
    tensors = column_tensors([ROW])
    with pytest.raises(InputError, match=r"input 'age' \(INT64\) is missing; the model takes plan \(BYTES\)"):
        decode_v2({"inputs": [t for t in tensors if t["name"] != "age"]})
    with pytest.raises(InputError, match="unknown input 'x'; the model takes one input per column"):
        decode_v2({"inputs": [*tensors, {**tensors[0], "name": "x"}]})
    with pytest.raises(InputError, match="input 'plan' is sent twice"):
        decode_v2({"inputs": [*tensors, tensors[0]]})


def _binary_request(rows):
    """What tritonclient sends: every tensor binary, BYTES as 4-byte lengths + UTF-8."""
    tensors, blobs = [], []
    for column in COLUMNS:
        values = [row[column.name] for row in rows]
        if column.datatype == "BYTES":
            blob = b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)
        else:
            blob = np.asarray(values, dtype=v2.NUMERIC[column.datatype]).tobytes()
        tensors.append(
            {
                "name": column.name,
                "datatype": column.datatype,
                "shape": [len(rows), 1],
                "parameters": {"binary_data_size": len(blob)},
            }
        )
        blobs.append(blob)
    header = json.dumps({"inputs": tensors}).encode()
    return header + b"".join(blobs), str(len(header))


def test_v2_binary_tensors_of_every_column_type():
    rows = [ROW, {**ROW, "plan": "basic", "note": "héllo", "autopay": False, "age": -3}]
    body, length = _binary_request(rows)
    decoded = decode_v2(None, length, body).rows.tolist()
    assert decoded == [["pro", 31, 20.5, True, "1"], ["basic", -3, 20.5, False, "héllo"]]


def test_v2_binary_strings_that_do_not_add_up_are_400s():
    body, length = _binary_request([ROW])
    with pytest.raises(InputError, match="binary bytes follow the JSON header but the inputs declare"):
        decode_v2(None, length, body + b"x")
    bad_utf8 = body.replace(b"\x01\x00\x00\x001", b"\x01\x00\x00\x00\xff")
    with pytest.raises(InputError, match="input 'note' row 0: the string is not valid UTF-8"):
        decode_v2(None, length, bad_utf8)


def test_one_numeric_tensor_still_serves_a_model_of_numeric_named_columns():
    numeric = (Column("a", "FP64"), Column("n", "INT64"))
    payload = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 2], "data": [0.5, 3.0]}]}
    rows = v2.decode(json.dumps(payload).encode(), None, 2, 8, OUTPUTS, numeric).rows
    assert rows.tolist() == [[0.5, 3]] and type(rows[0, 1]) is int
    with pytest.raises(InputError, match="this model takes one input per column, by name"):
        payload = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 5], "data": [1.0] * 5}]}
        decode_v2(payload)


def test_typed_rows_never_share_a_cache_key_across_types():
    def key(*row):
        rows = np.empty((1, len(row)), dtype=object)
        rows[0, :] = list(row)
        return row_keys("p", "m", "1", "a" * 64, rows)[0]

    assert len({key("1"), key(1), key(1.0), key(True)}) == 4
    assert key("pro", 31, 20.5) == key("pro", 31, 20.5)
    # What a column makes of a value is the key: 31.0 in an INT64 column is 31.
    assert decode_v1({"instances": [{**ROW, "age": 31.0}]}).tolist() == decode_v1({"instances": [ROW]}).tolist()


def test_the_dataframe_has_the_columns_names_and_types():
    table = frame(decode_v1({"instances": [ROW]}), COLUMNS)
    assert list(table.columns) == [c.name for c in COLUMNS]
    assert [table[c].dtype.kind for c in ("age", "monthly", "autopay")] == ["i", "f", "b"]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "non-empty list"),
        ([{"name": "a", "datatype": "FP32"}], "datatype must be one of"),
        ([{"name": "a", "datatype": "FP64"}, {"name": "a", "datatype": "FP64"}], "unique"),
        ([{"name": "a", "datatype": "BYTES", "categories": [1]}], "must be a string"),
    ],
)
def test_model_json_columns_are_checked(entries, message):
    with pytest.raises(ValueError, match=message):
        columns_from_json(entries, "inputs.columns")
