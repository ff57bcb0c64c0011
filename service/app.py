"""The application factory: the only place the Flask app is built."""

from __future__ import annotations

import threading

from flask import Flask

from service.api import bp
from service.cache import CircuitBreaker, RedisResultCache
from service.inference import Predictor
from service.metrics import Metrics
from service.models import ModelRegistry
from service.settings import Settings
from service.state import ServiceState


def create_app(
    settings: Settings | None = None,
    *,
    registry: ModelRegistry | None = None,
    cache: RedisResultCache | None = None,
) -> Flask:
    """Build the app from settings (default: the environment), loading models now."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.models.max_body_bytes, JSON_SORT_KEYS=False)

    if registry is None:
        registry = ModelRegistry(settings.models.models_dir, settings.models.default_model)
        registry.load()
        if not registry.ready:
            # Not ready until every model loads; keep trying beside the requests (under
            # gevent this thread is a greenlet), never inside one.
            threading.Thread(target=registry.retry_until_ready, name="model-loader", daemon=True).start()
    if cache is None and settings.cache.redis_url:
        cache = RedisResultCache(
            settings.cache.redis_url,
            ttl_s=settings.cache.ttl_s,
            timeout_ms=settings.cache.timeout_ms,
            max_connections=settings.redis_pool_size,
            breaker=CircuitBreaker(settings.cache.breaker_backoff_s, settings.cache.breaker_max_backoff_s),
        )
    metrics = Metrics(settings.server.prometheus_multiproc_dir)
    predictor = Predictor(
        cache, metrics, settings.cache.key_prefix, lambda model: settings.serving_for(model.name, model.serving)
    )
    app.extensions["prediction"] = ServiceState(settings, registry, predictor, metrics, cache)
    app.register_blueprint(bp)
    return app
