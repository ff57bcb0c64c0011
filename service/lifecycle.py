"""Model lifecycle: which versions every replica serves, and which version an unversioned
request gets, agreed through one record in Redis.

The desired state is one JSON document (`<prefix>:repository`) with a generation that
every change increments: per model, the versions to serve (None: every version on disk)
and the version policy (a default, "latest" or a version, and optional weights between
versions for a canary). An operator route changes it with a compare-and-set; every
worker of every replica reads it every SERVICE_REPOSITORY_POLL_S and converges (loads
and unloads from its models folder, off the request path), then reports the generation
it applied in `<prefix>:repository:seen`, which `status` shows. A replica that starts
later reads it before it calls itself ready. While Redis is down every replica keeps
serving what it has, and changes are refused (503): one replica cannot tell the others.
This module knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

LATEST = "latest"
SEEN_STALE_S = 10.0  # a worker not heard from for longer (plus 3 polls) has gone


class PlanError(ValueError):
    """A requested change that cannot apply (the message says why); nothing changed."""


@dataclass(frozen=True)
class ModelPlan:
    """What one model should look like on every replica."""

    versions: tuple[str, ...] | None = None  # None: every version found on disk
    default: str = LATEST  # the version unversioned requests get, unless weights say otherwise
    weights: Mapping[str, int] = field(default_factory=dict)  # version -> percent, summing to 100

    def to_json(self) -> dict[str, Any]:
        return {"versions": None if self.versions is None else list(self.versions), "default": self.default,
                "weights": dict(self.weights)}  # fmt: skip

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ModelPlan:
        versions = raw.get("versions")
        return cls(None if versions is None else tuple(str(v) for v in versions), str(raw.get("default", LATEST)),
                   {str(k): int(v) for k, v in (raw.get("weights") or {}).items()})  # fmt: skip


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
        return json.dumps({"generation": self.generation,
                           "models": {n: p.to_json() for n, p in sorted(self.models.items())}})  # fmt: skip

    @classmethod
    def from_json(cls, text: str | bytes | None) -> Desired:
        if not text:
            return cls()
        raw = json.loads(text)
        return cls(int(raw["generation"]), {n: ModelPlan.from_json(p) for n, p in raw.get("models", {}).items()})


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

    def read(self) -> Desired:
        return Desired.from_json(self._client.get(self.key))

    def update(self, change: Callable[[Desired], Desired]) -> Desired:
        """Apply `change` to the current state and store it, unless someone else changed it
        meanwhile (then again, a few times). PlanError from `change` passes through."""
        for _ in range(10):
            raw = self._client.get(self.key)
            current = Desired.from_json(raw)
            updated = change(current)
            if self._client.eval(self.CAS, 1, self.key, raw or b"", updated.to_json()):
                return updated
        raise PlanError("the model repository kept changing under this request; try again")

    def report(self, worker: str, generation: int, errors: list[str]) -> None:
        self._client.hset(self.seen_key, worker, json.dumps({"generation": generation, "at": time.time(),
                                                             "errors": errors}))  # fmt: skip

    def reports(self, stale_after_s: float) -> dict[str, dict[str, Any]]:
        """Each live worker's last report; reports older than `stale_after_s` are dropped."""
        now, live = time.time(), {}
        for worker, raw in (self._client.hgetall(self.seen_key) or {}).items():
            name = worker.decode() if isinstance(worker, bytes) else str(worker)
            report = json.loads(raw)
            if now - report["at"] > stale_after_s:
                self._client.hdel(self.seen_key, name)
                continue
            live[name] = {**report, "age_s": round(now - report["at"], 2)}
        return live


class Converger:
    """One worker's loop: read the desired state, converge, report; and, when asked,
    look for new model folders. Runs in its own OS thread, beside the requests."""

    def __init__(self, apply: Callable[[Desired, bool], list[str]], connect: Callable[[], RepositoryStore],
                 worker: str, poll_s: float, models_poll_s: float) -> None:  # fmt: skip
        self._apply = apply
        self._connect = connect
        self.worker = worker
        self.poll_s = poll_s
        self.models_poll_s = models_poll_s
        self.applied = -1
        self._store: RepositoryStore | None = None
        self._next_scan = time.monotonic() + models_poll_s

    def step(self) -> None:
        """One round; Redis failures are logged and the next round tries again."""
        from service.cache import REDIS_FAILURES  # redis: only in the workers, after gevent's patch

        try:
            if self._store is None:
                self._store = self._connect()
            desired = self._store.read()
        except (*REDIS_FAILURES, ValueError) as exc:
            log.debug("model repository: cannot read the desired state: %s", exc)
            self._store = None
            return
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
            self._store.report(self.worker, self.applied, errors)
        except REDIS_FAILURES as exc:
            log.debug("model repository: cannot report: %s", exc)
            self._store = None

    def run_forever(self) -> None:
        while True:
            self.step()
            time.sleep(self.poll_s)
