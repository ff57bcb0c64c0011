"""Pre-generated request rows with a controlled cache-hit ratio (no Flask, no I/O).

A *pool* of rows is warmed into the cache before a run; each request then takes a pool
row (a hit) with probability `hit_ratio`, chosen uniformly or Zipf-like, or a row that
was never sent before (a miss). The choices are drawn once, up front, so the hot loop
only indexes into lists.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

MODEL_WIDTHS = {"iris": 4, "digits": 64, "churn": 5}
FRESH = -1  # a choice that means "a row never sent before"
Row = list[float] | dict[str, Any]


def model_width(model: str) -> int:
    """Input width of a demo model."""
    try:
        return MODEL_WIDTHS[model]
    except KeyError:
        raise ValueError(f"unknown model {model!r}; known: {sorted(MODEL_WIDTHS)}") from None


def pool_row(model: str, index: int) -> Row:
    """Row `index` of a model's pool: deterministic, and plausible input for the model."""
    rng = random.Random(f"{model}:{index}")
    if model == "digits":  # 8x8 pixel intensities 0..16
        return [float(rng.randint(0, 16)) for _ in range(model_width(model))]
    if model == "churn":  # scripts/train_models.py churn_table's columns and ranges
        return {
            "monthly": round(rng.uniform(5.0, 120.0), 2),
            "plan": rng.choice(("basic", "pro", "team")),
            "age": rng.randint(18, 79),
            "support_calls": rng.randint(0, 6),
            "autopay": rng.random() < 0.6,
        }
    model_width(model)  # an unknown model is a ValueError here
    low, high = (4.3, 2.0, 1.0, 0.1), (7.9, 4.4, 6.9, 2.5)  # iris feature ranges
    return [round(rng.uniform(lo, hi), 4) for lo, hi in zip(low, high, strict=True)]


def fresh_row(model: str, nonce: int, counter: int) -> Row:
    """A row no pool and no earlier run produced (the first value carries nonce and counter)."""
    row = pool_row(model, counter % 1000)
    first = float(f"{nonce}.{counter:09d}")
    if isinstance(row, dict):
        return {key: first if i == 0 else value for i, (key, value) in enumerate(row.items())}
    row[0] = first
    return row


def around_first_value(row: Row) -> tuple[str, str]:
    """A row's compact JSON split around its first value, (head, tail): head + a number +
    tail is the row with that number first (how fresh rows are made without re-encoding)."""
    text = json.dumps(row, separators=(",", ":"))
    first = row[0] if isinstance(row, list) else next(iter(row.values()))
    head = "[" if isinstance(row, list) else text[: text.index(":") + 1]
    return head, text[len(head) + len(json.dumps(first)) :]


@dataclass(frozen=True)
class Mix:
    """How requests choose rows: pool size, skew and hit ratio."""

    pool_size: int = 1000
    hit_ratio: float = 0.9
    skew: str = "zipf"  # zipf | uniform
    zipf_s: float = 1.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.hit_ratio <= 1.0:
            raise ValueError("hit_ratio must be within 0..1")
        if self.pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        if self.skew not in ("zipf", "uniform"):
            raise ValueError("skew must be 'zipf' or 'uniform'")

    def choices(self, count: int, seed: int = 7) -> list[int]:
        """`count` pool indexes (or FRESH), drawn up front."""
        rng = random.Random(seed)
        weights = [1.0 / (rank**self.zipf_s) for rank in range(1, self.pool_size + 1)] if self.skew == "zipf" else None
        pool_picks = rng.choices(range(self.pool_size), weights=weights, k=count)
        return [pick if rng.random() < self.hit_ratio else FRESH for pick in pool_picks]
