"""The predictor: rows in, predictions out, through the shared result cache and batching.

Knows nothing of HTTP. Cache status per request: HIT (every row cached), MISS (none),
PARTIAL (some), OFF (this model's results do not go through the cache, by policy: `off`,
`auto` found a predict cheaper than Redis, or no REDIS_URL), BYPASS (they should, but
Redis is unavailable for at least one of its rows: with a Redis Cluster, rows on live
nodes are still read and written).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.cache.results import UNAVAILABLE, ResultCache, row_keys
from service.dataplane.batching import Batcher
from service.dataplane.compute import Compute
from service.errors import BadRequest
from service.metrics import Metrics
from service.models.artifacts import LoadedModel
from service.models.serving import ServingPolicy

log = logging.getLogger(__name__)

HIT, MISS, PARTIAL, OFF, BYPASS = "HIT", "MISS", "PARTIAL", "OFF", "BYPASS"
Result = tuple[list[Any], list[list[float]] | None]


@dataclass(frozen=True)
class Prediction:
    """Labels and (optionally) class probabilities for each row, and how the cache did."""

    labels: list[Any]
    probabilities: list[list[float]] | None
    cache_status: str


def _encode(label: Any, proba: list[float] | None) -> bytes:
    return orjson.dumps([label, proba])


def _decode(value: bytes, model: LoadedModel) -> tuple[Any, list[float] | None] | None:
    """A cached row as _encode wrote it for this model, or None for anything else (bytes
    that are not JSON, or not a label of the model with its probabilities): a miss."""
    try:
        decoded = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if type(decoded) is not list or len(decoded) != 2:
        return None
    label, proba = decoded
    if model.regression:
        if type(label) is not float and type(label) is not int:
            return None
    elif type(label) not in (str, int) or label not in model.classes:  # `True in [1]`, `1.0 in [1]`
        return None
    if model.has_proba:
        if type(proba) is not list or len(proba) != len(model.classes):
            return None
        if not all(type(p) is float or type(p) is int for p in proba):
            return None
    elif proba is not None:
        return None
    return label, proba


class Predictor:
    """Answers predictions for loaded models, reusing rows any replica already computed."""

    def __init__(
        self,
        cache: ResultCache | None,
        metrics: Metrics,
        key_prefix: str,
        policy: ServingPolicy,
    ) -> None:
        self._cache = cache
        self._metrics = metrics
        self._key_prefix = key_prefix
        self.policy = policy
        # What this worker remembers of a model version, by its identity: name, version and
        # the artifact's sha256 (a folder rewritten under the same version is another model).
        self._batchers: dict[tuple[str, str, str], Batcher | None] = {}
        self._deciding = False
        self._compute = Compute()  # expensive predicts run beside the loop (service.dataplane.compute)

    def forget_all_but(self, served: set[tuple[str, str, str]]) -> None:
        """Drop the batchers of model versions no longer served (a batcher holds its model:
        the estimator is freed once nothing else does)."""
        self._batchers = {key: b for key, b in list(self._batchers.items()) if key in served}

    def _timed_predict(self, model: LoadedModel, rows: np.ndarray) -> Result:
        started = time.perf_counter()
        try:
            result = self._compute.run(model.predict_ms, model.predict, rows)
        except (ValueError, TypeError) as exc:
            # Rows that passed validation but not the model's own checks (a NaN after its
            # log transform, a value its encoder refuses): the caller's input, a 400.
            message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise BadRequest(f"the model could not predict these rows ({type(exc).__name__}: {message})") from None
        self._metrics.observe_inference(model.name, len(rows), time.perf_counter() - started)
        return result

    def _batcher(self, model: LoadedModel) -> Batcher | None:
        key = (model.name, model.version, model.identity)
        if key not in self._batchers:
            serving = self.policy.of(model)
            if not serving.batching:
                self._batchers[key] = None
            else:

                def observe(requests: int, _rows: int, name: str = model.name) -> None:
                    self._metrics.observe_batch(name, requests)

                self._batchers[key] = Batcher(
                    lambda batch: self._timed_predict(model, batch),
                    serving.batch_max_rows,
                    serving.batch_max_wait_ms / 1000,
                    observe,
                )
        return self._batchers[key]

    def _infer(self, model: LoadedModel, rows: np.ndarray) -> Result:
        batcher = self._batcher(model)
        return batcher.predict(rows) if batcher is not None else self._timed_predict(model, rows)

    def caches(self, model: LoadedModel) -> bool:
        """Whether this model's results go through the result cache (as far as decided)."""
        if self._cache is None:
            return False
        decided = self.policy.cache_decision(model)
        return decided if decided is not None else self.policy.of(model).cache_policy != "off"

    def _cache_pays(self, model: LoadedModel) -> bool | None:
        """Whether this model's results go through the cache: True, False (by policy), or
        None (auto, not decidable now: Redis unavailable, or another request measuring it)."""
        decided = self.policy.cache_decision(model)
        if decided is not None:
            return decided
        serving = self.policy.of(model)
        policy = serving.cache_policy
        if self._cache is None or policy == "off":
            decided = False
        elif policy == "on":
            decided = True
        else:
            if self._deciding:
                return None  # another request is measuring Redis: bypass meanwhile
            self._deciding = True
            try:
                round_trip = self._cache.round_trip_ms()
            finally:
                self._deciding = False
            if round_trip is None:
                return None  # Redis unavailable: bypass now, decide once it answers
            # A miss pays an MGET and a SET; a hit saves the predict of one row. With batching
            # that row shares a predict call with others when the replica is busy (when
            # throughput counts), and saves only its share of one (models.BUSY_BATCH_ROWS).
            batching = serving.batching
            cost = model.batch_row_ms if batching else model.predict_ms
            decided = cost > 2 * round_trip
            log.info(
                "cache auto for %s %s: predict %.3f ms per row (%s) vs two Redis round trips %.3f ms -> %s",
                model.name,
                model.version,
                cost,
                "in a busy batch" if batching else "alone",
                2 * round_trip,
                "on" if decided else "off",
            )
        self.policy.decide(model, decided)
        return decided

    def predict(self, model: LoadedModel, rows: np.ndarray) -> Prediction:
        """Predict every row, taking cached rows from the cache and caching the rest."""
        cached = None
        pays = self._cache_pays(model) if self._cache is not None else False
        if pays and self._cache is not None:
            keys = row_keys(self._key_prefix, model.name, model.version, model.identity, rows)
            cached = self._cache.get_many(keys)
        if cached is None:
            labels, proba = self._infer(model, rows)
            status = OFF if pays is False else BYPASS  # by policy, or Redis unavailable
            self._metrics.count_cache(model.name, status, len(rows))
            return Prediction(labels, proba, status)
        unavailable = {i for i, value in enumerate(cached) if value is UNAVAILABLE}
        labels_out: list[Any] = [None] * len(rows)
        proba_out: list[Any] = [None] * len(rows)
        missing = []
        undecodable = 0
        for i, value in enumerate(cached):
            decoded = _decode(value, model) if isinstance(value, bytes) else None
            if decoded is None:
                missing.append(i)
                undecodable += isinstance(value, bytes)
            else:
                labels_out[i], proba_out[i] = decoded
        if undecodable:  # a value no replica wrote: a miss, overwritten below
            self._metrics.cache_undecodable.labels(model.name).inc(undecodable)
        hits = len(rows) - len(missing)
        self._metrics.count_cache(model.name, HIT, hits)
        self._metrics.count_cache(model.name, MISS, len(missing) - len(unavailable))
        if unavailable:
            self._metrics.count_cache(model.name, BYPASS, len(unavailable))
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
