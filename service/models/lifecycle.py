"""Model lifecycle: which versions every replica serves, and which version an unversioned
request gets, agreed through one record in Redis.

The desired state is one JSON document (`<prefix>:repository`) with a generation that
every change increments: per model, the versions to serve (None: every version on disk),
the artifact (sha256) each listed version must be, and the version policy (a default,
"latest" or a version, and optional weights between versions for a canary). An operator
route changes it with a compare-and-set; every worker of every replica reads it every
SERVICE_REPOSITORY_POLL_S and converges (loads and unloads from its models folder, off
the request path), then reports the generation it applied in `<prefix>:repository:seen`,
which `status` shows. A replica that starts later reads it before it calls itself ready.

Redis is where the replicas meet, not the only copy: every worker keeps the last state it
applied. A record that is missing (Redis restarted empty, an eviction, a failover to an
empty replica, FLUSHALL), malformed (bytes no replica wrote) or older than what a worker
applied is never obeyed: the worker keeps serving what it serves, says so (`status`, the
`prediction_repository_record_ok` metric), and writes its last good state back, so the
newest generation any live worker holds wins. While Redis is down every replica keeps
serving what it has, and changes are refused (503): one replica cannot tell the others.
See docs/reliability.md.

This module is the rules, pure (no Redis, no HTTP, no clock): the state and its JSON
form, whether a record may be obeyed, the version a request gets, and what the
operator's load, unload and policy change (plan_load, plan_unload, plan_policy). Its
home in Redis and the workers' loop are service.models.convergence; the routes service.web.operator.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

LATEST = "latest"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# What a worker found under the record's key: a state to obey, or why it did not obey it.
RECORD_OK, RECORD_MISSING, RECORD_MALFORMED, RECORD_OLDER = "ok", "missing", "malformed", "older"


class PlanError(ValueError):
    """A requested change that cannot apply (the message says why); nothing changed."""


class RecordError(ValueError):
    """The desired-state record is not one a replica wrote (the message says what is wrong)."""


def _require(condition: bool, problem: str) -> None:
    if not condition:
        raise RecordError(problem)


@dataclass(frozen=True)
class ModelPlan:
    """What one model should look like on every replica."""

    versions: tuple[str, ...] | None = None  # None: every version found on disk
    default: str = LATEST  # the version unversioned requests get, unless weights say otherwise
    weights: Mapping[str, int] = field(default_factory=dict)  # version -> percent, summing to 100
    # version -> the sha256 its artifact must have: a folder rewritten under the same
    # version number is another model, and every worker moves to it (or stops serving it)
    artifacts: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "versions": None if self.versions is None else list(self.versions),
            "default": self.default,
            "weights": dict(self.weights),
            "artifacts": dict(self.artifacts),
        }

    @classmethod
    def from_json(cls, raw: Any, where: str = "plan") -> ModelPlan:
        """A plan as stored, checked field by field (RecordError names the first problem)."""
        _require(type(raw) is dict, f"{where} is not an object")
        unknown = set(raw) - {"versions", "default", "weights", "artifacts"}
        _require(not unknown, f"{where} has unknown fields {sorted(unknown)}")
        versions = raw.get("versions")
        _require(
            versions is None or (type(versions) is list and all(type(v) is str for v in versions)),
            f"{where}.versions is not null or a list of strings",
        )
        default = raw.get("default", LATEST)
        _require(type(default) is str, f"{where}.default is not a string")
        weights = raw.get("weights") or {}
        _require(
            type(weights) is dict and all(type(w) is int and 0 <= w <= 100 for w in weights.values()),
            f"{where}.weights is not an object of integer percents",
        )
        _require(not weights or sum(weights.values()) == 100, f"{where}.weights do not sum to 100")
        artifacts = raw.get("artifacts") or {}
        _require(
            type(artifacts) is dict and all(type(a) is str and SHA256.match(a) for a in artifacts.values()),
            f"{where}.artifacts is not an object of sha256 digests",
        )
        return cls(None if versions is None else tuple(versions), default, dict(weights), dict(artifacts))


@dataclass(frozen=True)
class Desired:
    """The whole desired state: a generation and a plan per model that has one."""

    generation: int = 0
    models: Mapping[str, ModelPlan] = field(default_factory=dict)

    def plan(self, name: str) -> ModelPlan:
        return self.models.get(name, ModelPlan())

    def with_plan(self, name: str, plan: ModelPlan) -> Desired:
        return Desired(self.generation + 1, {**self.models, name: plan})

    def to_json(self) -> str:
        return json.dumps(
            {"generation": self.generation, "models": {n: p.to_json() for n, p in sorted(self.models.items())}}
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Desired:
        """The state a replica wrote, or RecordError naming what is wrong with `text`."""
        try:
            raw = orjson.loads(text)  # strict: no NaN, no lone surrogates, no 400-digit numbers
        except orjson.JSONDecodeError as exc:
            raise RecordError(f"not JSON ({exc})") from None
        _require(type(raw) is dict, "not a JSON object")
        generation = raw.get("generation")
        _require(type(generation) is int and generation >= 0, "generation is not a non-negative integer")
        models = raw.get("models")
        _require(type(models) is dict, "models is not an object")
        return cls(generation, {str(n): ModelPlan.from_json(p, f"models.{n}") for n, p in models.items()})


@dataclass(frozen=True)
class Record:
    """What one read of the record's key found: `desired` to obey when `state` is RECORD_OK."""

    state: str
    desired: Desired | None = None
    raw: bytes | None = None  # the bytes read, for a compare-and-set over them
    problem: str = ""  # what is wrong with a malformed record

    def describe(self) -> dict[str, Any]:
        """For `status`: the record's state, generation and problem."""
        found = {"state": self.state, "generation": self.desired.generation if self.desired else None}
        return {**found, "problem": self.problem} if self.problem else found


def read_record(raw: bytes | None) -> Record:
    """Classify the bytes under the record's key (never raises on what Redis holds)."""
    if raw is None:
        return Record(RECORD_MISSING)
    try:
        return Record(RECORD_OK, Desired.from_json(raw), raw)
    except RecordError as exc:
        return Record(RECORD_MALFORMED, None, raw, str(exc))


def trusted(record: Record, known: Desired) -> Desired | None:
    """The state to obey: the record when it is well-formed and not older than `known`
    (what this worker applied last); None when the record cannot be trusted. A missing
    record while nothing was ever decided is the first state: every version on disk."""
    if record.state == RECORD_MISSING and known.generation == 0:
        return Desired()
    if record.desired is None or record.desired.generation < known.generation:
        return None
    return record.desired


def assess(record: Record, known: Desired) -> tuple[Desired | None, Record]:
    """The state to obey (None: keep serving `known`), and the record as `status` and the
    reports show it: a well-formed record older than `known` is RECORD_OLDER."""
    obeyed = trusted(record, known)
    if obeyed is None and record.state == RECORD_OK:
        record = replace(record, state=RECORD_OLDER)
    return obeyed, record


def check_weights(weights: Mapping[str, int], served: set[str]) -> dict[str, int]:
    """Weights as given, checked: integer percents of served versions summing to 100 (or none)."""
    if not weights:
        return {}
    checked = {}
    for version, weight in weights.items():
        if version not in served:
            raise PlanError(f"version {version!r} is not served (served: {', '.join(sorted(served)) or 'none'})")
        if type(weight) is not int or not 0 <= weight <= 100:
            raise PlanError(f"weight of version {version!r} must be an integer percent, got {weight!r}")
        checked[str(version)] = weight
    if sum(checked.values()) != 100:
        raise PlanError(f"weights must sum to 100, not {sum(checked.values())}")
    return {v: w for v, w in checked.items() if w}


def _bucket(name: str, key: str) -> int:
    """0..9999, the same for a routing key on every replica."""
    return int.from_bytes(hashlib.blake2b(f"{name}\0{key}".encode(), digest_size=8).digest(), "big") % 10000


def choose_version(name: str, plan: ModelPlan, served: list[str], routing_key: str | None) -> str | None:
    """The version an unversioned request gets: by the weights (sticky for a routing key,
    else at random), else the pinned default, else the latest served (None: none served)."""
    if not served:
        return None
    weighted = [(v, w) for v, w in sorted(plan.weights.items()) if w > 0 and v in served]
    if weighted:
        total = sum(w for _, w in weighted)
        point = (_bucket(name, routing_key) if routing_key else random.randrange(10000)) * total / 10000
        for version, weight in weighted:
            point -= weight
            if point < 0:
                return version
        return weighted[-1][0]
    if plan.default != LATEST and plan.default in served:
        return plan.default
    return served[-1]


def primary_version(name: str, plan: ModelPlan, served: list[str]) -> str | None:
    """The version that speaks for the model as a whole (its metadata, its configuration,
    whatever the split draws for one request): the one with the largest share of unversioned
    requests (the later on a tie; `served` is oldest first), else the pinned default, else the
    latest served."""
    weighted = [(w, served.index(v), v) for v, w in plan.weights.items() if w > 0 and v in served]
    if weighted:
        return max(weighted)[2]
    return choose_version(name, replace(plan, weights={}), served, None)


def split_in_effect(plan: ModelPlan) -> bool:
    """Whether unversioned requests of this model may get different versions."""
    return sum(1 for w in plan.weights.values() if w > 0) > 1


def planned(plan: ModelPlan, served: list[str]) -> list[str]:
    """The versions the desired state serves: those its plan lists, else `served` (what this
    worker serves: every version on disk). Not this worker's alone: it may not have
    converged yet."""
    return sorted(plan.versions) if plan.versions is not None else served


def plan_load(
    desired: Desired,
    name: str,
    artifacts: Mapping[str, str],
    served: list[str],
    version: str | None = None,
    weight: int | None = None,
) -> Desired:
    """Serve the versions just loaded (`artifacts`: version → sha256) of `name`: all versions
    on disk (no `version`), or one more, optionally with `weight` percent of unversioned
    requests, the rest staying on today's version. PlanError if it cannot apply."""
    plan = desired.plan(name)
    plan = replace(plan, artifacts={**plan.artifacts, **artifacts})
    if version is None:
        return desired.with_plan(name, replace(plan, versions=None))
    listed = set(planned(plan, served)) | {version}
    weights = dict(plan.weights)
    if weight is not None:
        if split_in_effect(plan):
            raise PlanError(
                f"{name} is already split between versions ({dict(plan.weights)}); set the "
                "weights with the policy route instead"
            )
        others = [v for v in planned(plan, served) if v != version]
        base = choose_version(name, replace(plan, weights={}), others, None)
        weights = {version: weight, **({base: 100 - weight} if base and weight < 100 else {})}
    return desired.with_plan(name, replace(plan, versions=tuple(sorted(listed)), weights=weights))


def plan_unload(desired: Desired, name: str, served: list[str], version: str | None = None) -> Desired:
    """Serve no version of `name`, or one fewer: refused (PlanError) while unversioned
    requests still go to that version, by weight or as the pinned default."""
    plan = desired.plan(name)
    if version is None:
        return desired.with_plan(name, ModelPlan(versions=()))
    listed = planned(plan, served)
    if version not in listed:
        raise PlanError(f"model {name!r} serves no version {version!r}")
    if plan.weights.get(version, 0) > 0:
        raise PlanError(
            f"version {version} still gets {plan.weights[version]} % of {name}'s unversioned requests; "
            "move them with the policy route first"
        )
    if plan.default == version:
        raise PlanError(f"version {version} is {name}'s pinned default; change the policy first")
    remaining = tuple(v for v in listed if v != version)
    weights = {v: w for v, w in plan.weights.items() if v != version}
    artifacts = {v: a for v, a in plan.artifacts.items() if v != version}
    return desired.with_plan(name, replace(plan, versions=remaining, weights=weights, artifacts=artifacts))


def plan_policy(desired: Desired, name: str, served: list[str], changes: Mapping[str, Any]) -> Desired:
    """Which version unversioned requests of `name` get: `changes` may set "default"
    ("latest" or a served version) and "weights" (version → percent over served versions,
    summing to 100; {} ends a split); what it leaves out stays. PlanError if it cannot apply."""
    plan = desired.plan(name)
    listed = set(planned(plan, served))
    default = str(changes.get("default", plan.default))
    if default != LATEST and default not in listed:
        raise PlanError(f"default must be 'latest' or a served version of {name} ({', '.join(sorted(listed))})")
    raw = changes.get("weights", plan.weights)
    if not isinstance(raw, dict):
        raise PlanError("weights must be an object of version: percent")
    weights = check_weights({str(k): v for k, v in raw.items()}, listed)
    return desired.with_plan(name, replace(plan, default=default, weights=weights))
