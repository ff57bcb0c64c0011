"""The data plane: rows in, predictions out, through the shared result cache.

Knows nothing of HTTP. Cache status per request: HIT (every row cached), MISS (none),
PARTIAL (some), BYPASS (cache off for this model, or unavailable).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.cache import ResultCache, row_keys
from service.metrics import Metrics
from service.models import LoadedModel

HIT, MISS, PARTIAL, BYPASS = "HIT", "MISS", "PARTIAL", "BYPASS"


@dataclass(frozen=True)
class Prediction:
    """Labels and (optionally) class probabilities for each row, and how the cache did."""

    labels: list[Any]
    probabilities: list[list[float]] | None
    cache_status: str


def _encode(label: Any, proba: list[float] | None) -> bytes:
    return json.dumps([label, proba], separators=(",", ":")).encode()


class Predictor:
    """Answers predictions for loaded models, reusing rows any replica already computed."""

    def __init__(
        self,
        cache: ResultCache | None,
        metrics: Metrics,
        key_prefix: str,
        cache_enabled_for: Any,
    ) -> None:
        self._cache = cache
        self._metrics = metrics
        self._key_prefix = key_prefix
        self._cache_enabled_for = cache_enabled_for

    def _infer(self, model: LoadedModel, rows: np.ndarray) -> tuple[list[Any], list[list[float]] | None]:
        started = time.perf_counter()
        result = model.predict(rows)
        self._metrics.observe_inference(model.name, len(rows), time.perf_counter() - started)
        return result

    def predict(self, model: LoadedModel, rows: np.ndarray) -> Prediction:
        """Predict every row, taking cached rows from the cache and caching the rest."""
        if self._cache is None or not self._cache_enabled_for(model.name):
            labels, proba = self._infer(model, rows)
            self._metrics.count_cache(model.name, BYPASS, len(rows))
            return Prediction(labels, proba, BYPASS)
        keys = row_keys(self._key_prefix, model.name, model.version, rows)
        cached = self._cache.get_many(keys)
        if cached is None:
            labels, proba = self._infer(model, rows)
            self._metrics.count_cache(model.name, BYPASS, len(rows))
            return Prediction(labels, proba, BYPASS)
        missing = [i for i, value in enumerate(cached) if value is None]
        hits = len(rows) - len(missing)
        self._metrics.count_cache(model.name, HIT, hits)
        self._metrics.count_cache(model.name, MISS, len(missing))
        labels_out: list[Any] = [None] * len(rows)
        proba_out: list[Any] = [None] * len(rows)
        for i, value in enumerate(cached):
            if value is not None:
                labels_out[i], proba_out[i] = json.loads(value)
        if missing:
            new_labels, new_proba = self._infer(model, rows[missing])
            writes = []
            for n, i in enumerate(missing):
                row_proba = new_proba[n] if new_proba is not None else None
                labels_out[i], proba_out[i] = new_labels[n], row_proba
                writes.append((keys[i], _encode(new_labels[n], row_proba)))
            self._cache.set_many(writes)
        status = HIT if not missing else MISS if not hits else PARTIAL
        return Prediction(labels_out, proba_out if model.has_proba else None, status)
