"""Named, typed input columns: a model fitted on a table (a pandas DataFrame with named
columns, strings among them) is served by name.

model.json's `inputs.columns` lists them, each with an Open Inference Protocol datatype:
BYTES (a string), INT64, FP64 or BOOL, and optionally the `categories` an encoder was
fitted on when it refuses any other value. A request's rows are checked column by column
into one typed value per cell (an object array, N rows by the columns), so that the result
cache keys them exactly (`"1"` is never `1`), and predicted as a DataFrame. Errors name
the column and the row. No Flask, no HTTP; pandas is imported only when a table is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.errors import InputError
from service.inputs.parsing import NonFinite, check_rows_count, fail, type_name

DATATYPES = ("BYTES", "INT64", "FP64", "BOOL")
NUMERIC_DATATYPES = ("INT64", "FP64")
_INT64 = (-(2**63), 2**63 - 1)
# How each column reaches the model: the dtype pandas gives it.
_DTYPES = {"BYTES": object, "INT64": np.int64, "FP64": np.float64, "BOOL": np.bool_}


@dataclass(frozen=True)
class Column:
    """One named input of a model."""

    name: str
    datatype: str  # one of DATATYPES
    categories: tuple[Any, ...] | None = None  # the only values the model accepts, when it says

    def to_json(self) -> dict[str, Any]:
        """The column as model.json writes it."""
        entry: dict[str, Any] = {"name": self.name, "datatype": self.datatype}
        if self.categories is not None:
            entry["categories"] = list(self.categories)
        return entry

    def check(self, value: Any, where: str) -> Any:
        """The value as the model takes it (a str, int, float or bool), or a 400 naming `where`."""
        kind = type(value)
        if value is None:
            fail(f"{where} is null; every column needs a value")
        if kind is NonFinite or (kind is float and not math.isfinite(value)):
            fail(f"{where} is {value}; numbers must be finite")
        datatype = self.datatype
        if datatype == "FP64":
            if kind is not float and kind is not int:
                fail(f"{where} must be a number (FP64), got {type_name(value)}")
            checked: Any = float(value) + 0.0  # -0.0 and 0.0 are one value, and one cache key
            if not math.isfinite(checked):
                fail(f"{where} is too large for a 64-bit float")
        elif datatype == "INT64":
            if kind is float and value.is_integer():
                value, kind = int(value), int
            if kind is not int:
                fail(f"{where} must be an integer (INT64), got {type_name(value)}")
            if not _INT64[0] <= value <= _INT64[1]:
                fail(f"{where} is out of range for INT64")
            checked = value
        elif datatype == "BOOL":
            if kind is not bool:
                fail(f"{where} must be true or false (BOOL), got {type_name(value)}")
            checked = value
        else:
            if kind is not str:
                fail(f"{where} must be a string (BYTES), got {type_name(value)}")
            checked = value
        if self.categories is not None and checked not in self.categories:
            shown = ", ".join(map(str, self.categories[:20])) + (", ..." if len(self.categories) > 20 else "")
            fail(f"{where} is {checked!r}, not one of the values the model was fitted on: {shown}")
        return checked


def columns_from_json(entries: Any, where: str) -> tuple[Column, ...]:
    """model.json's `inputs.columns`, checked; ValueError naming what is wrong."""
    if type(entries) is not list or not entries:
        raise ValueError(f"{where} must be a non-empty list of {{name, datatype}}")
    columns = []
    for i, entry in enumerate(entries):
        if type(entry) is not dict or type(entry.get("name")) is not str or not entry["name"]:
            raise ValueError(f"{where}[{i}] needs a non-empty string 'name'")
        if entry.get("datatype") not in DATATYPES:
            raise ValueError(f"{where}[{i}] ({entry['name']}): datatype must be one of {', '.join(DATATYPES)}")
        categories = entry.get("categories")
        if categories is not None and (type(categories) is not list or not categories):
            raise ValueError(f"{where}[{i}] ({entry['name']}): categories must be a non-empty list")
        column = Column(entry["name"], entry["datatype"], tuple(categories) if categories is not None else None)
        for value in column.categories or ():
            try:
                column.check(value, "a category")
            except InputError as exc:
                raise ValueError(f"{where}[{i}] ({entry['name']}): {exc}") from None
        columns.append(column)
    names = [c.name for c in columns]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: column names must be unique")
    return tuple(columns)


def describe(columns: tuple[Column, ...]) -> str:
    """`plan (BYTES), age (INT64)`: for messages."""
    return ", ".join(f"{c.name} ({c.datatype})" for c in columns)


def example_row(columns: tuple[Column, ...], number: int = 0) -> list[Any]:
    """A row every column accepts: a category where the model lists them, else `number`
    (a string of it, a boolean of it)."""
    values = {"BYTES": str(number) if number else "", "INT64": number, "FP64": float(number), "BOOL": bool(number)}
    return [c.categories[0] if c.categories else values[c.datatype] for c in columns]


def typed_rows(cells: list[list[Any]]) -> np.ndarray:
    """Checked rows (lists of one value per column) as an N x columns object array."""
    rows = np.empty((len(cells), len(cells[0]) if cells else 0), dtype=object)
    for i, row in enumerate(cells):
        rows[i, :] = row
    return rows


def rows_from_instances(instances: Any, columns: tuple[Column, ...], max_rows: int, where: str) -> np.ndarray:
    """V1 instances, each an object by column name (KServe's object instances) or an array
    in column order, checked into typed rows."""
    if type(instances) is not list:
        fail(f"'{where}' must be an array of rows, got {type_name(instances)}")
    check_rows_count(len(instances), max_rows, f"'{where}'")
    names = [c.name for c in columns]
    known = set(names)
    cells = []
    for i, instance in enumerate(instances):
        kind = type(instance)
        if kind is dict:
            missing = [n for n in names if n not in instance]
            if missing:
                fail(f"{where}[{i}] is missing column {missing[0]!r}; the model takes {describe(columns)}")
            unknown = [n for n in instance if n not in known]
            if unknown:
                fail(f"{where}[{i}] has unknown column {unknown[0]!r}; the model takes {describe(columns)}")
            cells.append([c.check(instance[c.name], f"{where}[{i}].{c.name}") for c in columns])
        elif kind is list:
            if len(instance) != len(columns):
                fail(f"{where}[{i}] has {len(instance)} values; the model takes {len(columns)}: {describe(columns)}")
            cells.append(
                [c.check(v, f"{where}[{i}] column {c.name!r}") for c, v in zip(columns, instance, strict=True)]
            )
        else:
            fail(
                f"{where}[{i}] must be an object by column name or an array in column order, got {type_name(instance)}"
            )
    return typed_rows(cells)


def rows_from_matrix(matrix: np.ndarray, columns: tuple[Column, ...], where: str) -> np.ndarray:
    """A float64 matrix (one numeric tensor) as typed rows of all-numeric columns."""
    if any(c.datatype not in NUMERIC_DATATYPES for c in columns):
        fail(f"{where}: this model takes one input per column, by name: {describe(columns)}")
    cells = []
    for i, row in enumerate(matrix.tolist()):
        cells.append(
            [c.check(_numeric(c, v), f"{where} row {i} column {c.name!r}") for c, v in zip(columns, row, strict=True)]
        )
    return typed_rows(cells)


def _numeric(column: Column, value: float) -> float | int:
    """A float of a numeric tensor as the column takes it: an integer for INT64 if whole."""
    return int(value) if column.datatype == "INT64" and value.is_integer() else value


def frame(rows: np.ndarray, columns: tuple[Column, ...]) -> Any:
    """The rows as the pandas DataFrame the model was fitted on: its column names and types.
    Strings stay an object column: pandas 3 would infer its string dtype, which costs an
    encoder about a tenth more per predict and changes nothing it computes."""
    import pandas as pd  # deferred: only models fitted on named columns need it

    data: dict[str, Any] = {}
    for j, column in enumerate(columns):
        values: Any = np.asarray(rows[:, j].tolist(), dtype=_DTYPES[column.datatype])
        data[column.name] = pd.Series(values, dtype=object, copy=False) if column.datatype == "BYTES" else values
    return pd.DataFrame(data, copy=False)


def canonical_bytes(row: np.ndarray) -> bytes:
    """A typed row's bytes for its cache key: JSON of its values, so a string never shares a
    key with a number, nor an integer with a boolean."""
    return orjson.dumps(row.tolist())
