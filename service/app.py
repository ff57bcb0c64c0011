"""The application factory: the only place the Flask app is built."""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from service.api import ModelNameConverter, bp, json_response
from service.cache import CircuitBreaker, RedisResultCache
from service.inference import Predictor
from service.metrics import Metrics
from service.models import ModelRegistry
from service.settings import Settings
from service.state import ServiceState
from service.validation import InputError

log = logging.getLogger(__name__)

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def create_app(
    settings: Settings | None = None,
    *,
    registry: ModelRegistry | None = None,
    cache: RedisResultCache | None = None,
) -> Flask:
    """Build the app from settings (default: the environment), loading models now."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes, JSON_SORT_KEYS=False)
    app.url_map.converters["model"] = ModelNameConverter

    if registry is None:
        registry = ModelRegistry(settings.models_dir, settings.default_model)
        registry.load()
    if cache is None and settings.redis_url:
        cache = RedisResultCache(
            settings.redis_url,
            ttl_s=settings.cache_ttl_s,
            timeout_ms=settings.redis_timeout_ms,
            max_connections=settings.redis_pool_size,
            breaker=CircuitBreaker(settings.breaker_backoff_s, settings.breaker_max_backoff_s),
        )
    metrics = Metrics(settings.prometheus_multiproc_dir)
    predictor = Predictor(
        cache,
        metrics,
        settings.cache_key_prefix,
        settings.cache_policy_for,
        batching=settings.batching == "on",
        batch_max_rows=settings.batch_max_rows,
        batch_max_wait_s=settings.batch_max_wait_ms / 1000,
    )
    app.extensions["prediction"] = ServiceState(settings, registry, predictor, metrics, cache)
    app.register_blueprint(bp)
    _register_hooks(app, settings, metrics)
    _register_error_handlers(app)
    return app


def _register_hooks(app: Flask, settings: Settings, metrics: Metrics) -> None:
    served_by = settings.replica_id

    @app.before_request
    def start_request() -> None:
        g.started = time.perf_counter()
        metrics.in_flight.inc()
        incoming = request.headers.get("X-Request-ID", "")
        request_id = incoming if REQUEST_ID_PATTERN.match(incoming) else uuid.uuid4().hex
        request.environ["prediction.request_id"] = request_id

    @app.after_request
    def finish_request(response: Response) -> Response:
        response.headers["X-Request-ID"] = request.environ.get("prediction.request_id", "")
        response.headers["X-Served-By"] = served_by
        started = g.get("started")
        if started is not None:
            rule = request.url_rule.rule if request.url_rule else "unmatched"
            view_args = request.view_args or {}
            # Label only names of served models: arbitrary names would grow the series.
            model = view_args.get("name", "") if response.status_code != 404 else ""
            if request.endpoint == "api.shortcut_predict":
                model = settings.default_model
            metrics.observe_request(model, rule, response.status_code, time.perf_counter() - started)
        return response

    @app.teardown_request
    def end_request(_exc: BaseException | None) -> None:
        if g.get("started") is not None:
            metrics.in_flight.dec()


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(InputError)
    def input_error(exc: InputError) -> Response:
        return json_response({"error": str(exc)}, exc.status)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        message = {
            404: "not found: no such route",
            405: f"method {request.method} not allowed here",
            413: "request body too large",
        }.get(exc.code or 500, exc.description or exc.name)
        return json_response({"error": message}, exc.code or 500, headers)

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return json_response({"error": "internal error"}, 500)
