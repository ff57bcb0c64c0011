"""Adaptive batching and the cache policy: pure logic with gevent greenlets, no servers."""

from __future__ import annotations

import gevent
import numpy as np
import pytest

from service.dataplane.batching import Batcher
from service.dataplane.predictor import BYPASS, OFF, Predictor
from service.metrics import Metrics
from service.models.serving import ModelServing, ServingPolicy


class CountingModel:
    """Stands in for an estimator: labels are the rows' first values; counts calls."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.fail = fail

    def __call__(self, rows: np.ndarray):
        self.calls.append(len(rows))
        if self.fail:
            raise RuntimeError("model exploded")
        return rows[:, 0].tolist(), [[1.0, 0.0]] * len(rows)


def test_concurrent_callers_share_one_predict_call_and_get_their_own_rows():
    model, observed = CountingModel(), []
    batcher = Batcher(model, max_rows=64, max_wait_s=1.0, observe=lambda req, rows: observed.append((req, rows)))
    jobs = [gevent.spawn(batcher.predict, np.array([[float(i), 0.0]] * (1 + i % 3))) for i in range(10)]
    gevent.joinall(jobs, raise_error=True)
    assert model.calls == [sum(1 + i % 3 for i in range(10))], "one call for everyone who was waiting"
    assert observed == [(10, sum(1 + i % 3 for i in range(10)))]
    for i, job in enumerate(jobs):
        labels, proba = job.value
        assert labels == [float(i)] * (1 + i % 3) and len(proba) == len(labels)


def test_a_full_batch_runs_at_once_and_the_rest_follow():
    model = CountingModel()
    batcher = Batcher(model, max_rows=4, max_wait_s=1.0, observe=lambda *_: None)
    jobs = [gevent.spawn(batcher.predict, np.array([[float(i), 0.0]])) for i in range(10)]
    gevent.joinall(jobs, raise_error=True)
    assert model.calls == [4, 4, 2]
    assert [job.value[0] for job in jobs] == [[float(i)] for i in range(10)]


def test_a_lone_request_is_not_held_for_the_max_wait():
    batcher = Batcher(CountingModel(), max_rows=64, max_wait_s=30.0, observe=lambda *_: None)
    with gevent.Timeout(5):  # the idle check flushes it, long before 30 s
        assert batcher.predict(np.array([[7.0, 0.0]]))[0] == [7.0]


def test_an_error_reaches_every_waiting_caller():
    batcher = Batcher(CountingModel(fail=True), max_rows=64, max_wait_s=1.0, observe=lambda *_: None)
    jobs = [gevent.spawn(batcher.predict, np.array([[1.0, 0.0]])) for _ in range(3)]
    gevent.joinall(jobs)
    assert all(isinstance(job.exception, RuntimeError) for job in jobs)
    with pytest.raises(RuntimeError):
        batcher.predict(np.zeros((100, 2)))  # larger than a batch: runs alone, raises to its caller


class PickyModel(CountingModel):
    """Refuses any call that holds a negative first value, as a model's own checks would."""

    def __call__(self, rows: np.ndarray):
        self.calls.append(len(rows))
        if (rows[:, 0] < 0).any():
            raise ValueError("Input X contains NaN")
        return rows[:, 0].tolist(), None


def test_rows_the_model_refuses_fail_only_their_caller():
    model = PickyModel()
    batcher = Batcher(model, max_rows=64, max_wait_s=1.0, observe=lambda *_: None)
    values = [1.0, 2.0, -1.0, 3.0]
    jobs = [gevent.spawn(batcher.predict, np.array([[v, 0.0]])) for v in values]
    gevent.joinall(jobs)
    assert model.calls == [4, 1, 1, 1, 1], "the shared call, then each caller alone"
    assert [job.value[0] if job.successful() else type(job.exception) for job in jobs] == [
        [1.0],
        [2.0],
        ValueError,
        [3.0],
    ]


class FakeCache:
    """A cache that is always empty and answers PING in a given time."""

    def __init__(self, round_trip_ms: float | None) -> None:
        self.rtt = round_trip_ms
        self.reads = 0

    def get_many(self, keys):
        self.reads += 1
        return [None] * len(keys)

    def set_many(self, items) -> None:
        pass

    def round_trip_ms(self):
        return self.rtt


@pytest.mark.parametrize(("round_trip_ms", "expected"), [(0.0001, True), (1000.0, False), (None, None)])
def test_auto_policy_caches_only_what_costs_more_than_a_miss(models_dir, round_trip_ms, expected):
    from service.models.registry import ModelRegistry

    registry = ModelRegistry(models_dir, "iris")
    registry.load()
    model = registry.get("iris")
    cache = FakeCache(round_trip_ms)
    serving = ModelServing(cache_policy="auto", batching=False, batch_max_rows=64, batch_max_wait_ms=5.0)
    predictor = Predictor(cache, Metrics(), "t", ServingPolicy(lambda model: serving))
    prediction = predictor.predict(model, np.array([[5.1, 3.5, 1.4, 0.2]]))
    assert prediction.labels == ["setosa"]
    assert predictor.policy.cache_decision(model) is expected
    # Decided off: OFF (policy); undecidable, Redis unavailable: BYPASS; on: through the cache.
    assert (prediction.cache_status == OFF) is (expected is False)
    assert (prediction.cache_status == BYPASS) is (expected is None)
    assert cache.reads == (1 if expected else 0)


@pytest.mark.parametrize(("batching", "expected"), [(False, True), (True, False)])
def test_auto_policy_weighs_what_a_hit_saves_a_busy_replica(models_dir, batching, expected):
    """iris costs about as much for 8 rows as for one: with batching, a hit saves a busy
    replica almost nothing, and a round trip that a lone predict would repay does not pay."""
    from service.models.registry import ModelRegistry

    registry = ModelRegistry(models_dir, "iris")
    registry.load()
    model = registry.get("iris")
    assert 0 < model.batch_row_ms < model.predict_ms / 3, (model.batch_row_ms, model.predict_ms)
    between = (model.batch_row_ms * model.predict_ms) ** 0.5 / 2  # batch_row_ms < 2 × this < predict_ms
    serving = ModelServing(cache_policy="auto", batching=batching, batch_max_rows=64, batch_max_wait_ms=5.0)
    predictor = Predictor(FakeCache(between), Metrics(), "t", ServingPolicy(lambda model: serving))
    predictor.predict(model, np.array([[5.1, 3.5, 1.4, 0.2]]))
    assert predictor.policy.cache_decision(model) is expected


class HalfCache:
    """A cache whose second row lives on a failing node: one row found, one UNAVAILABLE, one missing."""

    def __init__(self, found: bytes) -> None:
        self.found = found
        self.written: list[str] = []

    def get_many(self, keys):
        from service.cache.results import UNAVAILABLE

        return [self.found, UNAVAILABLE, None]

    def set_many(self, items) -> None:
        self.written += [key for key, _ in items]

    def round_trip_ms(self):
        return 0.1


def test_rows_on_a_failing_node_are_computed_not_written_and_the_request_says_bypass(models_dir):
    import orjson

    from service.cache.results import row_keys
    from service.models.registry import ModelRegistry

    registry = ModelRegistry(models_dir, "iris")
    registry.load()
    model = registry.get("iris")
    rows = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]])
    expected_labels, _ = model.predict(rows)
    # A value a replica would write (a class of the model), but not what it computes here.
    cache = HalfCache(orjson.dumps(["virginica", [0.0, 0.0, 1.0]]))
    serving = ModelServing(cache_policy="on", batching=False, batch_max_rows=64, batch_max_wait_ms=5.0)
    metrics = Metrics()
    prediction = Predictor(cache, metrics, "t", ServingPolicy(lambda model: serving)).predict(model, rows)
    assert prediction.cache_status == BYPASS
    assert expected_labels[0] != "virginica"
    assert prediction.labels == ["virginica", *expected_labels[1:]]
    written = row_keys("t", "iris", model.version, model.identity, rows)[2]
    assert cache.written == [written], "only the row whose node answered"
    counted = {s.labels["result"]: s.value for s in metrics.cache_rows.collect()[0].samples if s.name.endswith("total")}
    assert counted == {"hit": 1.0, "bypass": 1.0, "miss": 1.0}
