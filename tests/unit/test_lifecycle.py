"""The model lifecycle's pure logic: plans, weights, the version a request gets."""

import collections

import pytest

from service.models.convergence import Converger, supervise
from service.models.lifecycle import (
    RECORD_MALFORMED,
    RECORD_MISSING,
    RECORD_OK,
    RECORD_OLDER,
    Desired,
    ModelPlan,
    PlanError,
    Record,
    RecordError,
    check_weights,
    choose_version,
    plan_load,
    plan_policy,
    plan_unload,
    primary_version,
    read_record,
    split_in_effect,
    trusted,
)

SHA = "0" * 64


def test_the_desired_state_round_trips_through_json():
    desired = Desired(7, {"iris": ModelPlan(("1", "2"), "1", {"1": 90, "2": 10}, {"2": SHA}), "digits": ModelPlan(())})
    assert Desired.from_json(desired.to_json()) == desired
    assert desired.with_plan("iris", ModelPlan()).generation == 8


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"{}", "generation"),
        (b"not json", "not JSON"),
        (b"\x80", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"generation": "x", "models": {}}', "generation"),
        (b'{"generation": true, "models": {}}', "generation"),
        (b'{"generation": 3, "models": []}', "models is not an object"),
        (b'{"generation": 3, "models": {"iris": {"versions": [1]}}}', "models.iris.versions"),
        (b'{"generation": 3, "models": {"iris": {"weights": {"1": 60}}}}', "sum to 100"),
        (b'{"generation": 3, "models": {"iris": {"artifacts": {"1": "abc"}}}}', "sha256"),
        (b'{"generation": 3, "models": {"iris": {"extra": 1}}}', "unknown fields"),
    ],
)
def test_a_record_no_replica_wrote_is_refused_naming_the_problem(raw, says):
    with pytest.raises(RecordError, match=says):
        Desired.from_json(raw)
    record = read_record(raw)
    assert record.state == RECORD_MALFORMED and says.split()[0] in record.problem and record.desired is None


def test_only_a_good_record_at_least_as_new_as_what_a_worker_serves_is_obeyed():
    served = Desired(5, {"iris": ModelPlan(("1",))})
    newer = Desired(6, {"iris": ModelPlan(("1", "2"))})
    assert trusted(read_record(newer.to_json().encode()), served) == newer
    assert trusted(read_record(served.to_json().encode()), served) == served
    assert trusted(read_record(Desired(2).to_json().encode()), served) is None, "older: a failover lost writes"
    assert trusted(read_record(None), served) is None, "missing: Redis restarted empty, evicted, flushed"
    assert trusted(read_record(b"{}"), served) is None
    assert trusted(read_record(None), Desired()) == Desired(), "nothing decided yet: every version on disk"


class FakeStore:
    """RepositoryStore's surface over one in-memory value (the converger's logic only)."""

    def __init__(self, raw: bytes | None) -> None:
        self.raw = raw
        self.reported: list[tuple[int, str]] = []

    def read(self) -> Record:
        return read_record(self.raw)

    def replace(self, found: Record, desired: Desired) -> bool:
        if found.raw != self.raw:
            return False
        self.raw = desired.to_json().encode()
        return True

    def report(self, worker: str, generation: int, errors: list[str], record: Record) -> None:
        self.reported.append((generation, record.state))


@pytest.mark.parametrize(
    ("lost", "reported"),
    [
        (None, RECORD_MISSING),
        (b"{}", RECORD_MALFORMED),
        (b"garbage", RECORD_MALFORMED),
        (Desired(1).to_json().encode(), RECORD_OLDER),
    ],
)
def test_a_worker_keeps_serving_and_writes_its_state_back_over_a_lost_record(lost, reported):
    served = Desired(5, {"iris": ModelPlan(("1",))})
    store, applied, record_ok, restores = FakeStore(served.to_json().encode()), [], [], []
    converger = Converger(
        lambda desired: applied.append(desired) or [],
        lambda: store,
        "w",
        0.1,
        0,
        known=lambda: applied[-1] if applied else Desired(),
        on_record=record_ok.append,
        on_restore=lambda: restores.append(1),
    )
    converger.step()
    assert applied == [served] and record_ok == [True]
    store.raw = lost
    converger.step()
    assert applied == [served], "nothing applied from a lost record"
    assert record_ok[-1] is False and restores == [1]
    assert Desired.from_json(store.raw) == served, "the last good state written back"
    assert store.reported[-1] == (5, reported), "the worker says what it found"
    converger.step()
    assert record_ok[-1] is True and store.reported[-1] == (5, RECORD_OK)


def test_a_fresh_cluster_with_no_record_serves_every_version_and_writes_nothing():
    store, applied = FakeStore(None), []
    converger = Converger(
        lambda desired: applied.append(desired) or [], lambda: store, "w", 0.1, 0, known=lambda: Desired()
    )
    converger.step()
    assert applied == [Desired()] and store.raw is None


def test_the_converger_is_restarted_whatever_ends_it():
    failures: list[BaseException] = []
    rounds = iter([RuntimeError("a bug in apply"), KeyError("generation"), SystemExit(1)])

    class Done(Exception):
        pass

    def loop() -> None:
        raise next(rounds)

    def failed(exc: BaseException) -> None:
        failures.append(exc)
        if len(failures) == 3:
            raise Done

    with pytest.raises(Done):
        supervise(loop, failed, backoff_s=0)
    assert [type(f) for f in failures] == [RuntimeError, KeyError, SystemExit]


def test_the_loader_is_restarted_whatever_kills_it_and_stops_once_it_has_loaded():
    """The loader thread (supervise(..., once=True)): an exception that killed it left /readyz
    saying "still loading" for ever."""
    failures: list[BaseException] = []
    calls = []

    def load() -> None:
        calls.append(1)
        if len(calls) <= 2:
            raise (AttributeError("'NoneType' object has no attribute 'get'") if len(calls) == 1 else SystemExit(1))

    supervise(load, failures.append, backoff_s=0, once=True)
    assert len(calls) == 3 and [type(f) for f in failures] == [AttributeError, SystemExit]


def test_weights_split_unversioned_requests_and_a_routing_key_sticks():
    plan = ModelPlan(weights={"1": 90, "2": 10})
    drawn = collections.Counter(choose_version("iris", plan, ["1", "2"], None) for _ in range(20000))
    assert abs(drawn["2"] / 20000 - 0.10) < 0.01
    keyed = collections.Counter(choose_version("iris", plan, ["1", "2"], f"user-{n}") for n in range(20000))
    assert abs(keyed["2"] / 20000 - 0.10) < 0.01, "routing keys spread like the weights"
    assert {choose_version("iris", plan, ["1", "2"], "user-42") for _ in range(50)} == {
        choose_version("iris", plan, ["1", "2"], "user-42")
    }
    assert split_in_effect(plan) and not split_in_effect(ModelPlan(weights={"2": 100}))


def test_without_weights_the_default_or_the_latest_answers():
    assert choose_version("iris", ModelPlan(), ["1", "2", "10"], None) == "10"
    assert choose_version("iris", ModelPlan(default="2"), ["1", "2", "10"], None) == "2"
    assert choose_version("iris", ModelPlan(default="3"), ["1", "2"], None) == "2", "a pinned version gone: latest"
    assert choose_version("iris", ModelPlan(), [], None) is None


@pytest.mark.parametrize(
    ("weights", "says"),
    [
        ({"1": 50, "3": 50}, "not served"),
        ({"1": 50, "2": 40}, "sum to 100"),
        ({"1": 101, "2": -1}, "integer percent"),
        ({"1": 50.5, "2": 49.5}, "integer percent"),
    ],
)
def test_bad_weights_are_refused_with_the_reason(weights, says):
    with pytest.raises(PlanError, match=says):
        check_weights(weights, {"1", "2"})
    assert check_weights({"1": 0, "2": 100}, {"1", "2"}) == {"2": 100}


# --- the operator's changes: pure rules, no Flask, no Redis ------------------------------


def test_loading_a_version_with_a_weight_starts_a_canary_beside_todays_version():
    start = Desired(3, {"iris": ModelPlan(("1",), artifacts={"1": SHA})})
    canary = plan_load(start, "iris", {"2": "1" * 64}, served=["1"], version="2", weight=10)
    plan = canary.plan("iris")
    assert canary.generation == 4 and plan.versions == ("1", "2")
    assert plan.weights == {"2": 10, "1": 90} and plan.artifacts == {"1": SHA, "2": "1" * 64}
    everything = plan_load(start, "iris", {"1": SHA}, served=["1"])
    assert everything.plan("iris").versions is None, "no version: every version on disk"
    with pytest.raises(PlanError, match="already split"):
        plan_load(canary, "iris", {"3": SHA}, served=["1", "2"], version="3", weight=5)


def test_unloading_refuses_a_version_that_still_gets_requests():
    split = Desired(1, {"iris": ModelPlan(("1", "2"), weights={"1": 90, "2": 10})})
    with pytest.raises(PlanError, match="still gets 10 %"):
        plan_unload(split, "iris", served=["1", "2"], version="2")
    pinned = Desired(1, {"iris": ModelPlan(("1", "2"), default="1")})
    with pytest.raises(PlanError, match="pinned default"):
        plan_unload(pinned, "iris", served=["1", "2"], version="1")
    with pytest.raises(PlanError, match="serves no version '9'"):
        plan_unload(pinned, "iris", served=["1", "2"], version="9")
    after = plan_unload(pinned, "iris", served=["1", "2"], version="2")
    assert after.plan("iris").versions == ("1",) and after.plan("iris").default == "1"
    assert plan_unload(pinned, "iris", served=["1", "2"]).plan("iris").versions == ()


def test_the_policy_keeps_what_a_change_leaves_out():
    plan = Desired(1, {"iris": ModelPlan(("1", "2"), default="2")})
    weighted = plan_policy(plan, "iris", ["1", "2"], {"weights": {"1": 50, 2: 50}})
    assert weighted.plan("iris").default == "2" and weighted.plan("iris").weights == {"1": 50, "2": 50}
    with pytest.raises(PlanError, match="default must be 'latest' or a served version"):
        plan_policy(plan, "iris", ["1", "2"], {"default": "7"})
    with pytest.raises(PlanError, match="weights must be an object"):
        plan_policy(plan, "iris", ["1", "2"], {"weights": None})


def test_the_primary_version_speaks_for_the_model_whatever_a_split_draws():
    served = ["1", "2", "10"]
    assert primary_version("m", ModelPlan(), served) == "10"  # the latest
    assert primary_version("m", ModelPlan(default="2"), served) == "2"  # the pinned default
    assert primary_version("m", ModelPlan(weights={"1": 70, "2": 30}), served) == "1"  # the largest share
    assert primary_version("m", ModelPlan(weights={"1": 50, "10": 50}), served) == "10"  # a tie: the later
    assert primary_version("m", ModelPlan(), []) is None
