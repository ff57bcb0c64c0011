"""The application factory: the only place the Flask app is built."""

from __future__ import annotations

import _thread
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

from flask import Flask

from service.cache.client import redis_client
from service.cache.results import ResultCache, open_result_cache
from service.dataplane.predictor import Predictor
from service.dataplane.state import ServiceState
from service.metrics import Metrics
from service.models.convergence import Converger, RepositoryStore, supervise
from service.models.lifecycle import Desired
from service.models.registry import ModelRegistry
from service.models.serving import ServingPolicy
from service.settings import Settings
from service.web import http, operator, views
from service.web.fastlane import FastLane

log = logging.getLogger(__name__)


def _native_thread(target: Callable[[], None]) -> None:
    """Run `target` in an OS thread, also under gevent's monkey-patching (where
    threading.Thread makes a greenlet): a CPU-bound load in a greenlet would stall the
    worker's event loop, and requests would wait unanswered instead of getting a 503."""
    try:
        from gevent import monkey

        start = monkey.get_original("_thread", "start_new_thread")
    except ImportError:  # pragma: no cover - gevent is a dependency
        start = _thread.start_new_thread
    start(target, ())


def _repository(settings: Settings, redis_url: str) -> Callable[[], RepositoryStore] | None:
    """How to reach the shared desired model state at `redis_url` (REDIS_URL with its
    password), or None when there is none to share (no Redis, or convergence turned off)."""
    if not redis_url or settings.models.repository_poll_s <= 0:
        return None
    timeout_s = max(settings.cache.timeout_ms / 1000, 0.5)  # off the request path: no hurry
    prefix = settings.cache.key_prefix
    return lambda: RepositoryStore(redis_client(redis_url, timeout_s), prefix)


def _desired_now(connect: Callable[[], RepositoryStore] | None) -> Desired | None:
    """The desired state if Redis holds a good one now (a replica that starts after a
    change loads what the others serve); None: load what is on disk and converge later
    (a record lost meanwhile is written back by the replicas that still hold it)."""
    if connect is None:
        return None
    try:
        record = connect().read()
    except Exception as exc:  # noqa: BLE001 - any failure here just means "converge later"
        log.warning("model repository: desired state unreadable at start (%s); loading every model on disk", exc)
        return None
    if record.desired is None:
        log.warning(
            "model repository: record %s at start %s; loading every model on disk until a replica that "
            "holds the state writes it back",
            record.state,
            record.problem,
        )
    return record.desired


def _load_then_mark(
    registry: ModelRegistry,
    folder: Path,
    connect: Callable[[], RepositoryStore] | None,
    settings: Settings,
    metrics: Metrics,
) -> None:
    """Load the models (the versions the desired state lists), leave a mark that this
    worker is ready (see _workers_ready), then converge on the desired state for ever."""
    # A loader that died would leave /readyz saying "still loading" for ever.
    supervise(
        functools.partial(registry.load_until_ready, functools.partial(_desired_now, connect)),
        functools.partial(_thread_failed, metrics, "loader"),
        once=True,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"ready-{os.getpid()}").touch()
    if connect is not None:
        worker = f"{settings.server.replica_id}/{os.getpid()}"
        converger = Converger(
            registry.apply,
            connect,
            worker,
            settings.models.repository_poll_s,
            settings.models.models_poll_s,
            known=lambda: registry.desired,
            on_record=metrics.repository_record_read,
            on_restore=metrics.repository_restores.inc,
        )
        supervise(converger.run_forever, functools.partial(_thread_failed, metrics, "converger"))


def _thread_failed(metrics: Metrics, which: str, exc: BaseException) -> None:
    metrics.repository_converger_failures.labels(which).inc()
    log.error("models: the %s failed (%s: %s); restarting it", which, type(exc).__name__, exc, exc_info=exc)


def _workers_ready(folder: Path) -> bool:
    """Every worker of this replica (the gunicorn master's children) has loaded its models:
    a worker that answers /readyz must not call the replica ready while another still loads."""
    master = os.getppid()
    try:
        workers = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    except OSError:  # no /proc children list: judge by this worker alone
        return True
    return all((folder / f"ready-{pid}").exists() for pid in workers)


def create_app(
    settings: Settings | None = None,
    *,
    registry: ModelRegistry | None = None,
    cache: ResultCache | None = None,
    load_in_background: bool = False,
) -> Flask:
    """Build the app from settings (default: the environment), loading models now, or
    (`load_in_background`, the replicas) beside the requests, which get 503 until then."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.models.max_body_bytes, JSON_SORT_KEYS=False)

    metrics = Metrics(settings.server.prometheus_multiproc_dir)
    redis_url = settings.cache.connection_url()  # REDIS_PASSWORD_FILE read once, for both uses
    connect_repository = _repository(settings, redis_url)
    if registry is None:
        registry = ModelRegistry(settings.models.models_dir, settings.models.default_model, settings.models.runtime)
        if load_in_background:
            # A replica listens before its models load (gunicorn binds first): answer
            # 503 at once meanwhile, so the balancer tries another replica right away.
            _native_thread(
                functools.partial(
                    _load_then_mark, registry, settings.server.metrics_path, connect_repository, settings, metrics
                )
            )
        else:
            registry.load()
            if not registry.ready:
                # Not ready until every model loads; keep trying beside the requests.
                _native_thread(registry.retry_until_ready)
    if cache is None and redis_url:
        cache = open_result_cache(
            redis_url,
            ttl_s=settings.cache.ttl_s,
            timeout_ms=settings.cache.timeout_ms,
            max_connections=settings.redis_pool_size,
            backoff_s=settings.cache.breaker_backoff_s,
            max_backoff_s=settings.cache.breaker_max_backoff_s,
            on_change=metrics.breaker_changed,
        )
    policy = ServingPolicy.from_settings(settings)
    predictor = Predictor(cache, metrics, settings.cache.key_prefix, policy)
    # What a worker remembers of a model version follows its artifact: an unloaded or
    # replaced one leaves nothing behind (its estimator is freed).
    registry.listeners.append(predictor.forget_all_but)
    registry.listeners.append(policy.forget_all_but)
    app.extensions["prediction"] = ServiceState(
        settings, registry, predictor, metrics, cache, repository=connect_repository
    )
    if load_in_background:
        app.extensions["prediction"].peers_ready = functools.partial(_workers_ready, settings.server.metrics_path)
    http.install(app)
    app.register_blueprint(views.bp)
    app.register_blueprint(operator.bp)
    # The prediction routes without Flask's per-request machinery (service/web/fastlane.py).
    app.wsgi_app = FastLane(app.wsgi_app, app.extensions["prediction"])  # type: ignore[method-assign]
    return app
