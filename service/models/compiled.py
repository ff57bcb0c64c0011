"""A model compiled to ONNX and run by ONNX Runtime, allowed to answer only once it agrees
with scikit-learn.

`OnnxModel` is one ONNX Runtime session of a version's `model.onnx` (one thread: gevent is
cooperative), fed straight from the decoded rows or typed columns, with no DataFrame.
`verification_rows` draws rows from what the fitted model knows (the example row, scaler
means and scales, encoder categories, tree thresholds); `verify` compares the two runtimes
on them: every label equal, and every probability or regression output within `TOLERANCE`
(absolute up to 1, relative beyond). Packaging (`scripts/cluster model add`) runs it before
it keeps a model.onnx, and every replica runs it again when it loads one: model.json's word
that a model was verified is not trusted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from service.inputs.columns import Column, typed_rows

log = logging.getLogger(__name__)

# |Δ| of a probability or a regression output, scaled by max(1, |scikit-learn's value|).
TOLERANCE = 1e-5
VERIFICATION_ROWS = 256
RUNTIMES = ("sklearn", "onnx")

_DTYPES = {
    "tensor(double)": np.float64,
    "tensor(float)": np.float32,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(string)": object,
}


@dataclass(frozen=True)
class Verification:
    """How a compiled model compared with scikit-learn on `rows` rows."""

    rows: int
    labels_equal: bool
    worst: float  # the largest scaled |Δ| of a probability or output (0 for labels only)
    tolerance: float = TOLERANCE

    @property
    def passed(self) -> bool:
        """Every label equal and every number within the tolerance."""
        return self.rows > 0 and self.labels_equal and self.worst <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line: what was compared and how it went."""
        labels = "labels equal" if self.labels_equal else "labels differ"
        return f"{self.rows} rows, {labels}, worst |Δ| {self.worst:.1e} (tolerance {self.tolerance:g})"


class OnnxModel:
    """One ONNX Runtime session of a converted model: rows in, (labels or numbers, and
    probabilities where the model has them) out."""

    def __init__(self, data: bytes, columns: tuple[Column, ...] | None) -> None:
        import onnxruntime as ort  # deferred: only a replica serving a compiled model needs it

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No memory arena: a request's tensors are small, and an arena keeps what one large
        # batch took for as long as the session lives.
        options.enable_cpu_mem_arena = False
        options.log_severity_level = 3
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.columns = columns
        self.inputs = [(i.name, _DTYPES.get(i.type)) for i in self.session.get_inputs()]
        if any(dtype is None for _, dtype in self.inputs):
            raise ValueError(f"an input of a type this replica does not feed: {self.session.get_inputs()}")
        # Plain rows: one matrix. Named columns: one [N, 1] tensor per column (a
        # ColumnTransformer selects them by name), or one matrix when every column is a number
        # and the model takes a matrix (a model fitted on a DataFrame of numbers).
        self.matrix = columns is None or len(self.inputs) == 1 < len(columns)
        if self.matrix and columns is not None and any(c.datatype == "BYTES" for c in columns):
            raise ValueError("one matrix input, where the model has a string column")
        if not self.matrix and [name for name, _ in self.inputs] != [c.name for c in columns or ()]:
            raise ValueError("its inputs are not the model's columns, in order")
        self.outputs = [o.name for o in self.session.get_outputs()]

    def feeds(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The session's inputs: the float rows as one tensor, or one [N, 1] tensor per column."""
        if self.matrix:
            name, dtype = self.inputs[0]
            values = rows if self.columns is None else np.asarray(rows.tolist(), dtype=np.float64)
            return {name: np.ascontiguousarray(values, dtype=dtype)}
        feeds = {}
        for j, (name, dtype) in enumerate(self.inputs):
            values = rows[:, j].tolist()
            feeds[name] = np.array(values, dtype=dtype).reshape(-1, 1)
        return feeds

    def run(self, rows: np.ndarray) -> list[np.ndarray]:
        """Every output of the session for `rows`."""
        return self.session.run(None, self.feeds(rows))


# --- verification rows: from what the fitted model knows ----------------------------------------


def walk(estimator: Any, columns: Any = None) -> Iterator[tuple[Any, Any]]:
    """Every estimator inside `estimator` (Pipelines, ColumnTransformers, ...), with the input
    columns it is applied to where a ColumnTransformer says."""
    yield estimator, columns
    for _, step in getattr(estimator, "steps", []) or []:
        yield from walk(step, columns)
    for _, transformer, selected in getattr(estimator, "transformers_", []) or []:
        if not isinstance(transformer, str):
            yield from walk(transformer, selected)


def input_names(part: Any, selected: Any, names: list[str]) -> list[str]:
    """The model's named inputs `part` applies to: those it was fitted on, else the columns
    a ColumnTransformer selected for it (by name or by position in `names`)."""
    inputs = [str(n) for n in getattr(part, "feature_names_in_", [])]
    if not inputs and selected is not None:
        inputs = [names[i] if isinstance(i, (int, np.integer)) else str(i) for i in np.atleast_1d(selected)]
    return inputs


def _trees(part: Any) -> Iterator[Any]:
    """The fitted decision trees of a tree or an ensemble of them."""
    if hasattr(part, "tree_"):
        yield part.tree_
    members = getattr(part, "estimators_", None)
    for member in np.ravel(np.asarray(members if members is not None else [], dtype=object)):
        yield from _trees(member)


def _thresholds(estimator: Any, width: int) -> list[tuple[int, float]]:
    """(feature, threshold) of every split of every tree the model holds on its input columns
    (a tree after a transformer splits on what the transformer made: not used)."""
    found: list[tuple[int, float]] = []
    for part, selected in walk(estimator):
        if selected is not None or getattr(part, "n_features_in_", width) != width:
            continue
        for tree in _trees(part):
            inner = tree.feature >= 0
            found += list(zip(tree.feature[inner].tolist(), tree.threshold[inner].tolist(), strict=True))
    return found


def _centers(estimator: Any, width: int, example: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the plain inputs live: a scaler's means and scales on them, else the spread of
    the trees' thresholds, else the example row and 1."""
    for part, selected in walk(estimator):
        if selected is None and getattr(part, "n_features_in_", None) == width:
            if hasattr(part, "mean_") and hasattr(part, "scale_") and part.mean_ is not None:
                return np.asarray(part.mean_, dtype=np.float64), np.asarray(part.scale_, dtype=np.float64)
            if hasattr(part, "data_min_") and hasattr(part, "data_max_"):
                low, high = np.asarray(part.data_min_, float), np.asarray(part.data_max_, float)
                return (low + high) / 2, np.maximum((high - low) / 2, 1e-3)
    splits = _thresholds(estimator, width)
    if splits:
        center, scale = example.astype(np.float64).copy(), np.ones(width)
        for feature in range(width):
            values = [t for f, t in splits if f == feature]
            if values:
                center[feature] = (min(values) + max(values)) / 2
                scale[feature] = max((max(values) - min(values)) / 2, 1.0)
        return center, scale
    return example.astype(np.float64), np.ones(width)


def verification_rows(
    estimator: Any,
    width: int,
    columns: tuple[Column, ...] | None,
    example: tuple[Any, ...] | None,
    count: int = VERIFICATION_ROWS,
    seed: int = 0,
) -> np.ndarray:
    """`count` rows drawn from what the fitted model knows, always the same for the same model
    (a fixed seed): plain float rows, or typed rows of named columns."""
    generator = np.random.default_rng(seed)
    if columns is None:
        base = np.asarray(example if example is not None else [0.0] * width, dtype=np.float64)
        center, scale = _centers(estimator, width, base)
        rows = [base, np.zeros(width), center]
        splits = _thresholds(estimator, width)
        while len(rows) < count:
            row = center + scale * generator.normal(size=width)
            if splits and len(rows) % 2:  # near a split, on either side, far beyond float32's rounding
                for index in generator.choice(len(splits), size=min(4, len(splits)), replace=False):
                    feature, threshold = splits[int(index)]
                    row[feature] = threshold + generator.choice((-1.0, 1.0)) * 1e-3 * max(1.0, abs(threshold))
            rows.append(row)
        return np.asarray(rows[:count], dtype=np.float64)
    stats = _column_stats(estimator, columns)
    return typed_rows([_typed_row(stats, columns, example, generator, i) for i in range(count)])


def _typed_row(
    stats: dict[str, tuple[float, float]],
    columns: tuple[Column, ...],
    example: tuple[Any, ...] | None,
    generator: Any,
    i: int,
) -> list[Any]:
    row = []
    for j, column in enumerate(columns):
        base = example[j] if example is not None else None
        if column.categories:
            row.append(column.categories[i % len(column.categories)])
        elif column.datatype == "BOOL":
            row.append(bool(generator.integers(2)) if i else bool(base))
        elif column.datatype == "BYTES":
            row.append(str(base) if base is not None else "")
        else:
            center, scale = stats.get(column.name, (float(base or 0.0), 1.0))
            value = center + scale * generator.normal() if i else float(base or 0.0)
            row.append(int(round(value)) if column.datatype == "INT64" else float(value))
    return row


def _column_stats(estimator: Any, columns: tuple[Column, ...]) -> dict[str, tuple[float, float]]:
    """Mean and scale of each named column a scaler inside the model was fitted on."""
    names = [c.name for c in columns]
    stats: dict[str, tuple[float, float]] = {}
    for part, selected in walk(estimator):
        if not (hasattr(part, "mean_") and hasattr(part, "scale_")) or part.mean_ is None:
            continue
        for name, mean, scale in zip(
            input_names(part, selected, names), np.ravel(part.mean_), np.ravel(part.scale_), strict=False
        ):
            stats[str(name)] = (float(mean), float(scale) or 1.0)
    return stats


Answers = tuple[list[Any], list[list[float]] | None]


def verify(expected: Answers, got: Answers, regression: bool) -> Verification:
    """scikit-learn's answers (`expected`) against the compiled model's (`got`) for the same rows."""
    labels, proba = expected
    their_labels, their_proba = got
    if regression:
        want, have = np.asarray(labels, dtype=np.float64), np.asarray(their_labels, dtype=np.float64)
        worst = float(np.max(np.abs(want - have) / np.maximum(1.0, np.abs(want)))) if len(want) else 0.0
        return Verification(len(want), bool(np.all(np.isfinite(have))), worst)
    worst = 0.0
    if proba is not None:
        if their_proba is None:
            return Verification(len(labels), False, float("inf"))
        worst = float(np.max(np.abs(np.asarray(proba) - np.asarray(their_proba)))) if len(proba) else 0.0
    return Verification(len(labels), list(labels) == list(their_labels), worst)
