"""The data plane: rows in, predictions out, through the shared result cache and batching.

Knows nothing of HTTP. Cache status per request: HIT (every row cached), MISS (none),
PARTIAL (some), BYPASS (cache off for this model, or unavailable for at least one of
its rows: with a Redis Cluster, rows on live nodes are still read and written).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.batching import Batcher
from service.cache import UNAVAILABLE, ResultCache, row_keys
from service.metrics import Metrics
from service.models import LoadedModel
from service.settings import ModelServing

log = logging.getLogger(__name__)

HIT, MISS, PARTIAL, BYPASS = "HIT", "MISS", "PARTIAL", "BYPASS"
Result = tuple[list[Any], list[list[float]] | None]


@dataclass(frozen=True)
class Prediction:
    """Labels and (optionally) class probabilities for each row, and how the cache did."""

    labels: list[Any]
    probabilities: list[list[float]] | None
    cache_status: str


def _encode(label: Any, proba: list[float] | None) -> bytes:
    return orjson.dumps([label, proba])


class Predictor:
    """Answers predictions for loaded models, reusing rows any replica already computed."""

    def __init__(
        self,
        cache: ResultCache | None,
        metrics: Metrics,
        key_prefix: str,
        serving_for: Callable[[LoadedModel], ModelServing],
    ) -> None:
        self._cache = cache
        self._metrics = metrics
        self._key_prefix = key_prefix
        self._serving_for = serving_for
        self._batchers: dict[tuple[str, str], Batcher | None] = {}
        self._uses_cache: dict[tuple[str, str], bool] = {}
        self._deciding = False

    def _timed_predict(self, model: LoadedModel, rows: np.ndarray) -> Result:
        started = time.perf_counter()
        result = model.predict(rows)
        self._metrics.observe_inference(model.name, len(rows), time.perf_counter() - started)
        return result

    def _batcher(self, model: LoadedModel) -> Batcher | None:
        key = (model.name, model.version)
        if key not in self._batchers:
            serving = self._serving_for(model)
            if not serving.batching:
                self._batchers[key] = None
            else:

                def observe(requests: int, _rows: int, name: str = model.name) -> None:
                    self._metrics.observe_batch(name, requests)

                self._batchers[key] = Batcher(lambda batch: self._timed_predict(model, batch), serving.batch_max_rows,
                                              serving.batch_max_wait_ms / 1000, observe)  # fmt: skip
        return self._batchers[key]

    def _infer(self, model: LoadedModel, rows: np.ndarray) -> Result:
        batcher = self._batcher(model)
        return batcher.predict(rows) if batcher is not None else self._timed_predict(model, rows)

    def cache_decision(self, model: LoadedModel) -> bool | None:
        """Whether this model's results go through the cache (None: auto, not decided yet)."""
        return self._uses_cache.get((model.name, model.version))

    def _cache_pays(self, model: LoadedModel) -> bool:
        key = (model.name, model.version)
        decided = self._uses_cache.get(key)
        if decided is not None:
            return decided
        serving = self._serving_for(model)
        policy = serving.cache_policy
        if self._cache is None or policy == "off":
            decided = False
        elif policy == "on":
            decided = True
        else:
            if self._deciding:
                return False  # another request is measuring Redis: bypass meanwhile
            self._deciding = True
            try:
                round_trip = self._cache.round_trip_ms()
            finally:
                self._deciding = False
            if round_trip is None:
                return False  # Redis unavailable: bypass now, decide once it answers
            # A miss pays an MGET and a SET; a hit saves the predict of one row. With batching
            # that row shares a predict call with others when the replica is busy (when
            # throughput counts), and saves only its share of one (models.BUSY_BATCH_ROWS).
            batching = serving.batching
            cost = model.batch_row_ms if batching else model.predict_ms
            decided = cost > 2 * round_trip
            log.info(
                "cache auto for %s %s: predict %.3f ms per row (%s) vs two Redis round trips %.3f ms -> %s",
                model.name, model.version, cost, "in a busy batch" if batching else "alone", 2 * round_trip,
                "on" if decided else "off",
            )  # fmt: skip
        self._uses_cache[key] = decided
        return decided

    def predict(self, model: LoadedModel, rows: np.ndarray) -> Prediction:
        """Predict every row, taking cached rows from the cache and caching the rest."""
        cached = None
        if self._cache is not None and self._cache_pays(model):
            keys = row_keys(self._key_prefix, model.name, model.version, rows)
            cached = self._cache.get_many(keys)
        if cached is None:
            labels, proba = self._infer(model, rows)
            self._metrics.count_cache(model.name, BYPASS, len(rows))
            return Prediction(labels, proba, BYPASS)
        unavailable = {i for i, value in enumerate(cached) if value is UNAVAILABLE}
        missing = [i for i, value in enumerate(cached) if value is None or i in unavailable]
        hits = len(rows) - len(missing)
        self._metrics.count_cache(model.name, HIT, hits)
        self._metrics.count_cache(model.name, MISS, len(missing) - len(unavailable))
        if unavailable:
            self._metrics.count_cache(model.name, BYPASS, len(unavailable))
        labels_out: list[Any] = [None] * len(rows)
        proba_out: list[Any] = [None] * len(rows)
        for i, value in enumerate(cached):
            if isinstance(value, bytes):
                labels_out[i], proba_out[i] = orjson.loads(value)
        if missing:
            new_labels, new_proba = self._infer(model, rows[missing])
            writes = []
            for n, i in enumerate(missing):
                row_proba = new_proba[n] if new_proba is not None else None
                labels_out[i], proba_out[i] = new_labels[n], row_proba
                if i not in unavailable:
                    writes.append((keys[i], _encode(new_labels[n], row_proba)))
            assert self._cache is not None
            self._cache.set_many(writes)
        if unavailable:
            return Prediction(labels_out, proba_out if model.has_proba else None, BYPASS)
        status = HIT if not missing else MISS if not hits else PARTIAL
        return Prediction(labels_out, proba_out if model.has_proba else None, status)
