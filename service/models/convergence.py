"""The desired state's home in Redis, and each worker's loop that converges on it.

RepositoryStore keeps the record (`<prefix>:repository`, changed by compare-and-set) and
the workers' reports (`<prefix>:repository:seen`); the Converger, one per worker in its
own OS thread, reads the record every SERVICE_REPOSITORY_POLL_S, judges it with the pure
rules of service.models.lifecycle (a record that is missing, malformed or older is never
obeyed, and the worker writes its last good state back), applies it to the registry and
reports. `supervise` restarts the loop whatever ends it. Knows nothing of HTTP.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import orjson

from service.models.lifecycle import (
    RECORD_MALFORMED,
    RECORD_MISSING,
    Desired,
    PlanError,
    Record,
    RecordError,
    assess,
    read_record,
    trusted,
)

log = logging.getLogger(__name__)

SEEN_STALE_S = 10.0  # a worker not heard from for longer (plus 3 polls) has gone


WRONG_TYPE = "WRONGTYPE"  # what Redis answers a command on a key that holds another type


def _wrong_type(exc: BaseException) -> bool:
    return str(exc).startswith(WRONG_TYPE)


class RepositoryStore:
    """The desired state and the workers' reports in Redis (any topology: single keys,
    compare-and-set in a script). Whatever the two keys hold is input: a value of another
    type or shape is a malformed record, or a report no worker wrote, never an error."""

    # GET of a key that holds another type is an error: pcall makes it "", which a malformed
    # record compares equal to (its raw is b""), so the SET replaces it.
    CAS = (
        "local v = redis.pcall('GET', KEYS[1]) "
        "if type(v) ~= 'string' then v = '' end "
        "if v == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) return 1 end "
        "return 0"
    )

    def __init__(self, client: Any, prefix: str) -> None:
        self._client = client
        self.key = f"{prefix}:repository"
        self.seen_key = f"{prefix}:repository:seen"

    def read(self) -> Record:
        """The record as it is now in Redis (missing, malformed or a state)."""
        from redis.exceptions import ResponseError

        try:
            raw = self._client.get(self.key)
        except ResponseError as exc:
            if not _wrong_type(exc):
                raise
            return Record(RECORD_MALFORMED, None, b"", f"the key holds a {self._type_of(self.key)}, not a string")
        return read_record(raw if raw is None else bytes(raw))

    def _type_of(self, key: str) -> str:
        kind = self._client.type(key)
        return kind.decode(errors="replace") if isinstance(kind, bytes) else str(kind)

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
        """This worker's report; a reports key of another type (no worker wrote it) is replaced."""
        from redis.exceptions import ResponseError

        report = {"generation": generation, "at": time.time(), "errors": errors, "record": record.describe()}
        try:
            self._client.hset(self.seen_key, worker, json.dumps(report))
        except ResponseError as exc:
            if not _wrong_type(exc):
                raise
            log.warning("model repository: %s held a %s; replaced it", self.seen_key, self._type_of(self.seen_key))
            self._client.delete(self.seen_key)
            self._client.hset(self.seen_key, worker, json.dumps(report))

    def reports(self, stale_after_s: float) -> dict[str, dict[str, Any]]:
        """Each live worker's last report; reports older than `stale_after_s`, and values
        no worker wrote (another type of key, fields of other types), are dropped."""
        from redis.exceptions import ResponseError

        try:
            found = self._client.hgetall(self.seen_key) or {}
        except ResponseError as exc:
            if not _wrong_type(exc):
                raise
            return {}  # the next report replaces the key
        now, live = time.time(), {}
        for worker, raw in found.items():
            report = _report(raw, now)
            if report is None or report["age_s"] > stale_after_s:
                self._client.hdel(self.seen_key, worker)
                continue
            live[worker.decode(errors="backslashreplace") if isinstance(worker, bytes) else str(worker)] = report
        return live


def _report(raw: Any, now: float) -> dict[str, Any] | None:
    """A worker's report as `report` wrote it, or None for anything else."""
    try:
        report = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        return None
    if type(report) is not dict:
        return None
    generation, at, errors, record = (report.get(k) for k in ("generation", "at", "errors", "record"))
    if type(generation) is not int or isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        return None
    if type(errors) is not list or not all(type(e) is str for e in errors) or type(record) is not dict:
        return None
    return {"generation": generation, "at": at, "errors": errors, "record": record, "age_s": round(now - at, 2)}


class Converger:
    """One worker's loop: read the desired state, converge, report; and, when asked,
    look for new model folders. Runs in its own OS thread, beside the requests.

    `known()` is the state this worker applied last (the registry's). A record that cannot
    be trusted is never applied: the worker keeps serving, writes what it knows back (when
    it knows anything: generation > 0), and `on_record(ok)` tells the metrics."""

    def __init__(
        self,
        apply: Callable[[Desired], list[str]],
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
        from service.cache.client import REDIS_FAILURES  # redis: only in the workers, after gevent's patch

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
            errors = self._apply(desired)
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


def supervise(
    loop: Callable[[], None], on_failure: Callable[[BaseException], None], backoff_s: float = 1.0, *, once: bool = False
) -> None:
    """Run `loop` for ever (`once`: until it returns): whatever ends it by an exception (an
    error, a thread-killing exception) is reported to `on_failure` and the loop starts again
    after `backoff_s`."""
    while True:
        try:
            loop()
            if once:
                return
        except BaseException as exc:  # noqa: BLE001 - the loader and the converger must outlive anything
            on_failure(exc)
        time.sleep(backoff_s)
