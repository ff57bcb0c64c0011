"""The model lifecycle's pure logic: plans, weights, the version a request gets."""

import collections

import pytest

from service.lifecycle import Desired, ModelPlan, PlanError, check_weights, choose_version, split_in_effect


def test_the_desired_state_round_trips_through_json():
    desired = Desired(7, {"iris": ModelPlan(("1", "2"), "1", {"1": 90, "2": 10}), "digits": ModelPlan(())})
    assert Desired.from_json(desired.to_json()) == desired
    assert Desired.from_json(None) == Desired()
    assert desired.with_plan("iris", ModelPlan()).generation == 8


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
    [({"1": 50, "3": 50}, "not served"), ({"1": 50, "2": 40}, "sum to 100"), ({"1": 101, "2": -1}, "integer percent"),
     ({"1": 50.5, "2": 49.5}, "integer percent")],
)  # fmt: skip
def test_bad_weights_are_refused_with_the_reason(weights, says):
    with pytest.raises(PlanError, match=says):
        check_weights(weights, {"1", "2"})
    assert check_weights({"1": 0, "2": 100}, {"1", "2"}) == {"2": 100}
