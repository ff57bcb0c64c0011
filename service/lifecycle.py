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
See docs/reliability.md. This module knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

log = logging.getLogger(__name__)

LATEST = "latest"
SEEN_STALE_S = 10.0  # a worker not heard from for longer (plus 3 polls) has gone
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
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
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


def split_in_effect(plan: ModelPlan) -> bool:
    """Whether unversioned requests of this model may get different versions."""
    return sum(1 for w in plan.weights.values() if w > 0) > 1


class RepositoryStore:
    """The desired state and the workers' reports in Redis (any topology: single keys,
    compare-and-set in a script)."""

    CAS = (
        "if (redis.call('GET', KEYS[1]) or '') == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) return 1 end "
        "return 0"
    )

    def __init__(self, client: Any, prefix: str) -> None:
        self._client = client
        self.key = f"{prefix}:repository"
        self.seen_key = f"{prefix}:repository:seen"

    def read(self) -> Record:
        """The record as it is now in Redis (missing, malformed or a state)."""
        raw = self._client.get(self.key)
        return read_record(raw if raw is None else bytes(raw))

    def replace(self, found: Record, desired: Desired) -> bool:
        """Write `desired` over the record `found` read, unless it changed since."""
        return bool(self._client.eval(self.CAS, 1, self.key, found.raw or b"", desired.to_json()))

    def update(self, change: Callable[[Desired], Desired], known: Desired) -> Desired:
        """Apply `change` to the current state and store it, unless someone else changed it
        meanwhile (then again, a few times). The current state is the record, or `known`
        (what this worker serves) when the record is missing or older: an operator's
        change never starts from a lost record. PlanError from `change`, and RecordError
        for a malformed record this worker has nothing to replace with, pass through."""
        for _ in range(10):
            found = self.read()
            current = trusted(found, known)
            if current is None:
                if found.state == RECORD_MALFORMED and known.generation == 0:
                    raise RecordError(
                        f"the desired-state record {self.key} in Redis is malformed ({found.problem}) "
                        "and no replica here holds a state to replace it with; delete the key to "
                        "start from the models on disk"
                    )
                current = known
            updated = change(current)
            if self.replace(found, updated):
                return updated
        raise PlanError("the model repository kept changing under this request; try again")

    def report(self, worker: str, generation: int, errors: list[str], record: Record) -> None:
        report = {"generation": generation, "at": time.time(), "errors": errors, "record": record.describe()}
        self._client.hset(self.seen_key, worker, json.dumps(report))

    def reports(self, stale_after_s: float) -> dict[str, dict[str, Any]]:
        """Each live worker's last report; reports older than `stale_after_s`, and values
        no worker wrote, are dropped."""
        now, live = time.time(), {}
        for worker, raw in (self._client.hgetall(self.seen_key) or {}).items():
            name = worker.decode(errors="replace") if isinstance(worker, bytes) else str(worker)
            try:
                report = json.loads(raw)
                age_s = now - float(report["at"])
                generation = int(report["generation"])
            except (ValueError, TypeError, KeyError, UnicodeDecodeError):
                self._client.hdel(self.seen_key, worker)
                continue
            if age_s > stale_after_s:
                self._client.hdel(self.seen_key, worker)
                continue
            live[name] = {**report, "generation": generation, "age_s": round(age_s, 2)}
        return live


class Converger:
    """One worker's loop: read the desired state, converge, report; and, when asked,
    look for new model folders. Runs in its own OS thread, beside the requests.

    `known()` is the state this worker applied last (the registry's). A record that cannot
    be trusted is never applied: the worker keeps serving, writes what it knows back (when
    it knows anything: generation > 0), and `on_record(ok)` tells the metrics."""

    def __init__(
        self,
        apply: Callable[[Desired, bool], list[str]],
        connect: Callable[[], RepositoryStore],
        worker: str,
        poll_s: float,
        models_poll_s: float,
        known: Callable[[], Desired],
        on_record: Callable[[bool], None] = lambda ok: None,
        on_restore: Callable[[], None] = lambda: None,
    ) -> None:
        self._apply = apply
        self._connect = connect
        self._known = known
        self._on_record = on_record
        self._on_restore = on_restore
        self.worker = worker
        self.poll_s = poll_s
        self.models_poll_s = models_poll_s
        self.applied = -1
        self.record = Record(RECORD_MISSING)
        self._store: RepositoryStore | None = None
        self._next_scan = time.monotonic() + models_poll_s

    def step(self) -> None:
        """One round; Redis failures are logged and the next round tries again."""
        from service.redis_client import REDIS_FAILURES  # redis: only in the workers, after gevent's patch

        try:
            if self._store is None:
                self._store = self._connect()
            self.record = self._store.read()
        except REDIS_FAILURES as exc:
            log.debug("model repository: cannot read the desired state: %s", exc)
            self._store = None
            return
        known = self._known()
        desired, self.record = assess(self.record, known)
        self._on_record(desired is not None)
        if desired is None:
            desired = known
            self._restore(self._store, known)
        scan = self.models_poll_s > 0 and time.monotonic() >= self._next_scan
        if scan:
            self._next_scan = time.monotonic() + self.models_poll_s
        errors: list[str] = []
        if desired.generation != self.applied or scan:
            errors = self._apply(desired, scan)
            if desired.generation != self.applied:
                log.info("model repository: converged on generation %d", desired.generation)
            self.applied = desired.generation
        try:
            self._store.report(self.worker, self.applied, errors, self.record)
        except REDIS_FAILURES as exc:
            log.debug("model repository: cannot report: %s", exc)
            self._store = None

    def _restore(self, store: RepositoryStore, known: Desired) -> None:
        """Write the last good state back over a record that is missing, malformed or older."""
        what = self.record.problem or self.record.state
        if known.generation == 0:  # nothing decided yet: no state to restore
            if self.record.state == RECORD_MALFORMED:
                log.error("model repository: record malformed (%s); serving what is loaded", what)
            return
        if store.replace(self.record, known):
            self._on_restore()
            log.warning(
                "model repository: record %s (%s); wrote back generation %d, which this worker serves",
                self.record.state,
                what,
                known.generation,
            )

    def run_forever(self) -> None:
        """Step every poll, for ever; an unexpected error ends it, and `supervise` reports it
        and starts it again."""
        while True:
            self.step()
            time.sleep(self.poll_s)


def supervise(loop: Callable[[], None], on_failure: Callable[[BaseException], None], backoff_s: float = 1.0) -> None:
    """Run `loop` for ever: whatever ends it (an error, a thread-killing exception) is
    reported to `on_failure` and the loop starts again after `backoff_s`."""
    while True:
        try:
            loop()
        except BaseException as exc:  # noqa: BLE001 - the converger must outlive anything
            on_failure(exc)
        time.sleep(backoff_s)
