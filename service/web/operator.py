"""The Flask door's operator views: the model repository (index, load, unload, version
policy, status). The balancer serves them on its internal listener only, like /metrics.

A view checks its parameters, then stores a change of the desired state (the pure rules
of service.models.lifecycle: plan_load, plan_unload, plan_policy) with a compare-and-set
(service.models.convergence.RepositoryStore), then converges this worker on it at once; the
others follow within SERVICE_REPOSITORY_POLL_S. A change that cannot apply is a 409, a
version that fails to load a 422, and Redis unavailable a 503: nothing changed anywhere.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import Blueprint, Response, request

from service.cache.client import REDIS_FAILURES
from service.errors import BadRequest, Conflict, NotFound, Refused, Unauthorized, Unavailable
from service.inputs.parsing import body_object, parse_json
from service.models.artifacts import LoadedModel, ModelError
from service.models.convergence import SEEN_STALE_S, RepositoryStore
from service.models.lifecycle import Desired, PlanError, RecordError, assess, plan_load, plan_policy, plan_unload
from service.models.registry import UnknownModel
from service.web.http import add_routes, json_response, state

T = TypeVar("T")

bp = Blueprint("repository", __name__)


@bp.before_request
def _operator_only() -> None:
    """Every repository route needs the operator's token (SERVICE_OPERATOR_TOKEN) as a
    bearer token, compared in constant time; without it, a JSON 401 and nothing changes."""
    expected = state().settings.server.operator_token
    if not expected:
        raise Unauthorized(
            "the model repository needs an operator token: set SERVICE_OPERATOR_TOKEN on the replicas and send "
            "it as Authorization: Bearer <token>",
            {"WWW-Authenticate": 'Bearer realm="model repository"'},
        )
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise Unauthorized(
            "missing or wrong operator token (Authorization: Bearer <token>); nothing changed",
            {"WWW-Authenticate": 'Bearer realm="model repository", error="invalid_token"'},
        )


UNAVAILABLE = "the model repository is unavailable (Redis: {}); nothing changed"


def _off_loop(work: Callable[[], T]) -> T:
    """Run CPU-bound work (unpickling a model) in an OS thread while this request's
    greenlet waits, so the worker keeps answering other requests meanwhile."""
    try:
        from gevent import monkey

        if monkey.is_module_patched("socket"):
            import gevent

            return cast(T, gevent.get_hub().threadpool.apply(work))
    except ImportError:  # pragma: no cover - gevent is a dependency
        pass
    return work()


def _repository() -> RepositoryStore:
    connect = state().repository
    if connect is None:
        raise Unavailable(
            "the model repository needs Redis (REDIS_URL) and SERVICE_REPOSITORY_POLL_S > 0: every "
            "replica must hear of a change",
        )
    try:
        return connect()
    except REDIS_FAILURES as exc:
        raise Unavailable(UNAVAILABLE.format(exc)) from None


def _parameters() -> dict[str, Any]:
    """The optional {"parameters": {...}} of a repository request."""
    raw = request.get_data(cache=False)
    if not raw.strip():
        return {}
    payload = body_object(parse_json(raw))
    parameters = payload.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest("parameters must be an object")
    return parameters


def _version(parameters: dict[str, Any]) -> str | None:
    version = parameters.get("version")
    if version is not None and not isinstance(version, str | int):
        raise BadRequest("parameters.version must be a string")
    return None if version is None else str(version)


def _change(change: Callable[[Desired], Desired], added: list[LoadedModel] | None = None) -> Desired:
    """Store a change of the desired state, then converge this worker on it at once (the
    others within SERVICE_REPOSITORY_POLL_S); `added`: versions this worker already
    loaded for it, served only once the change is stored."""
    store = _repository()
    registry = state().registry  # the worker thread has no app context
    try:
        updated = store.update(change, registry.desired)
    except PlanError as exc:
        raise Conflict(str(exc)) from None
    except RecordError as exc:
        raise Unavailable(f"{exc}; nothing changed") from None
    except REDIS_FAILURES as exc:
        raise Unavailable(UNAVAILABLE.format(exc)) from None
    for model in added or []:
        registry.add(model)
    _off_loop(lambda: registry.apply(updated))
    return updated


def _served(name: str) -> list[str]:
    registry = state().registry
    return registry.versions(name) if name in registry.names() else []


def _changed(name: str, desired: Desired) -> Response:
    plan = desired.plan(name)
    return json_response(
        {
            "generation": desired.generation,
            "model": name,
            "versions": _served(name),
            "default": plan.default,
            "weights": dict(plan.weights),
        }
    )


def repository_index() -> Response:
    """Every model version on disk or served: READY, or UNAVAILABLE with the reason."""
    raw = request.get_data(cache=False)
    ready_only = bool(body_object(parse_json(raw)).get("ready")) if raw.strip() else False
    rows = state().registry.index()
    return json_response([r for r in rows if r["state"] == "READY"] if ready_only else rows)


def repository_load(name: str) -> Response:
    """Load a model's versions from disk on every replica: all of them, or
    {"parameters": {"version": "2", "weight": 10}} (one version, and optionally the
    percent of unversioned requests it gets, the rest staying on today's version)."""
    parameters = _parameters()
    registry = state().registry
    version = _version(parameters)
    weight = parameters.get("weight")
    if weight is not None and (version is None or type(weight) is not int or not 0 <= weight <= 100):
        raise BadRequest("parameters.weight must be an integer percent, with parameters.version")
    _repository()  # Redis first: a version only this worker knew of would split the replicas
    disk, _ = registry.on_disk()
    versions = [version] if version is not None else sorted(disk.get(name, {}))
    if not versions:
        raise NotFound(f"no model folder {name}/<version> in the models folder")
    try:  # verify (sha256) and load here first: a version that fails changes nothing anywhere
        loaded = _off_loop(lambda: [registry.load_version(name, v) for v in versions])
    except UnknownModel as exc:
        raise NotFound(str(exc)) from None
    except ModelError as exc:
        if version is not None:
            registry.version_errors[(name, version)] = str(exc)
        raise Refused(f"refused: {exc}") from None
    # The artifacts these versions are from now on: every worker serves exactly these.
    artifacts = {model.version: model.sha256 for model in loaded}
    change = functools.partial(
        plan_load, name=name, artifacts=artifacts, served=_served(name), version=version, weight=weight
    )
    return _changed(name, _change(change, loaded))


def repository_unload(name: str) -> Response:
    """Unload a model on every replica, or one version of it ({"parameters": {"version": "1"}}):
    refused while unversioned requests are still sent to that version."""
    version = _version(_parameters())
    served = _served(name)
    if not served and version is None:
        raise NotFound(f"model {name!r} not found")
    return _changed(name, _change(functools.partial(plan_unload, name=name, served=served, version=version)))


def repository_policy(name: str) -> Response:
    """Which version unversioned requests get: {"default": "latest" | "<version>",
    "weights": {"1": 90, "2": 10}} (weights over served versions, summing to 100; {} ends
    a split). Explicit version paths always get their version."""
    payload = body_object(parse_json(request.get_data(cache=False)))
    unknown = set(payload) - {"default", "weights"}
    if unknown:
        raise BadRequest(f"unknown policy fields: {', '.join(sorted(unknown))} (known: default, weights)")
    served = _served(name)
    if not served:
        raise NotFound(f"model {name!r} not found")
    return _changed(name, _change(functools.partial(plan_policy, name=name, served=served, changes=payload)))


def repository_status() -> Response:
    """The desired state, what Redis holds of it, and which generation each worker of each
    replica serves. While the record is missing, malformed or older than what this worker
    serves, the state shown is this worker's (the replicas write it back within a poll)."""
    store = _repository()
    current = state()
    try:
        record = store.read()
        workers = store.reports(SEEN_STALE_S + 3 * current.settings.models.repository_poll_s)
    except REDIS_FAILURES as exc:
        raise Unavailable(f"the model repository is unavailable (Redis: {exc})") from None
    obeyed, record = assess(record, current.registry.desired)
    desired = obeyed if obeyed is not None else current.registry.desired
    behind = sorted(w for w, r in workers.items() if r["generation"] != desired.generation)
    return json_response(
        {
            "generation": desired.generation,
            "models": {name: plan.to_json() for name, plan in desired.models.items()},
            "record": record.describe(),
            "workers": workers,
            "converged": bool(workers) and not behind and obeyed is not None,
            "behind": behind,
        }
    )


add_routes(
    bp,
    {
        view.__name__: view
        for view in (repository_index, repository_load, repository_unload, repository_policy, repository_status)
    },
)
