"""What predicting from a DataFrame costs: the demo churn Pipeline as a replica runs it (a
DataFrame of named, mixed-type columns) against the same fitted model on plain rows (its
LogisticRegression on the rows its ColumnTransformer encodes: what a client that encodes
the columns itself would send), per predict call, in alternated rounds.

    python -m loadtest.dataframe_cost [--rounds 5] [--calls 200]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from service.inputs.columns import frame
from service.models.artifacts import load_model

ROOT = Path(__file__).resolve().parent.parent


def per_call_ms(call: Callable[[], object], calls: int) -> float:
    """Mean milliseconds per call, after one call of warm-up."""
    call()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1000


def main(argv: list[str] | None = None) -> int:
    """Print one line per batch size: both costs and their ratio, medians [min-max]."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    model = load_model(ROOT / "models" / "churn" / "1")
    assert model.columns is not None
    encode, classify = model.estimator.named_steps["encode"], model.estimator.named_steps["classify"]
    print(f"churn, {args.rounds} alternated rounds of {args.calls} calls: DataFrame Pipeline vs plain rows")
    for rows in (1, 8, 32):
        typed = model.example(rows)
        encoded = np.asarray(encode.transform(frame(typed, model.columns)), dtype=np.float64)
        table, plain = [], []
        for _ in range(args.rounds):
            table.append(per_call_ms(functools.partial(model.predict, typed), args.calls))
            plain.append(per_call_ms(functools.partial(classify.predict_proba, encoded), args.calls))
        ratios = [t / p for t, p in zip(table, plain, strict=True)]

        def spread(values: list[float], digits: int) -> str:
            return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"

        print(
            f"{rows:>2} rows/call: DataFrame {spread(table, 2)} ms, plain rows {spread(plain, 3)} ms, "
            f"ratio {spread(ratios, 0)}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
