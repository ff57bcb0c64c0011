"""Typed settings for the prediction service: the one place that reads the environment.

Every field has an environment variable, a type, a default and a docstring; bad values
fail at start-up with a message that names the variable. Units are in the names.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

CACHE_POLICIES = ("on", "off", "auto")


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


def _setting(env: str, default: Any, doc: str) -> Any:
    return field(default=default, metadata={"env": env, "doc": doc})


def _parse_cache_policy(raw: str) -> dict[str, str]:
    """Parse `on`, `off` or `iris=off,*=on` into {model or '*': policy}."""
    policy: dict[str, str] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep:
            name, value = "*", name
        name, value = name.strip(), value.strip().lower()
        if value not in CACHE_POLICIES or not name:
            raise SettingsError(f"cache policy item {item!r}: expected on, off, auto or model=on|off|auto")
        policy[name] = value
    policy.setdefault("*", "auto")
    return policy


@dataclass(frozen=True)
class Settings:
    """Settings of one replica; build with `Settings.from_env()` or directly in tests."""

    models_dir: Path = _setting("SERVICE_MODELS_DIR", Path("models"), "Folder holding models/<name>/<version>/.")
    default_model: str = _setting("SERVICE_DEFAULT_MODEL", "iris", "Model answered by POST /predict.")
    replica_id: str = _setting(
        "SERVICE_REPLICA_ID",
        "",
        "Id returned in X-Served-By; empty means the host name.",
    )
    max_body_bytes: int = _setting("SERVICE_MAX_BODY_BYTES", 1_048_576, "Largest request body accepted (413 above).")
    max_batch_rows: int = _setting("SERVICE_MAX_BATCH_ROWS", 1024, "Most rows one prediction request may carry.")
    redis_url: str = _setting(
        "REDIS_URL",
        "redis://127.0.0.1:6379/0",
        "Result cache; empty turns the cache off. redis://[:password@]host:port/db.",
    )
    redis_timeout_ms: int = _setting(
        "SERVICE_REDIS_TIMEOUT_MS",
        100,
        "Socket connect/read timeout for the cache; the most a request waits on Redis. Keep it above the "
        "longest batched predict, which holds the worker's event loop (and so the timer) meanwhile.",
    )
    redis_max_connections: int = _setting(
        "SERVICE_REDIS_MAX_CONNECTIONS",
        0,
        "Redis pool size per worker; 0 means SERVICE_WORKER_CONNECTIONS.",
    )
    cache_ttl_s: int = _setting("SERVICE_CACHE_TTL_S", 3600, "How long a cached prediction lives in Redis.")
    cache_policy: dict[str, str] = _setting(
        "SERVICE_CACHE_POLICY",
        None,
        "Cache per model: on, off or auto (cache only models whose predict costs more than a "
        "miss's two Redis round trips), e.g. 'iris=off,*=auto'.",
    )
    cache_key_prefix: str = _setting("SERVICE_CACHE_KEY_PREFIX", "pred", "Prefix of every cache key in Redis.")
    breaker_backoff_s: float = _setting(
        "SERVICE_BREAKER_BACKOFF_S",
        1.0,
        "After a Redis failure, how long requests bypass the cache before one probes it.",
    )
    breaker_max_backoff_s: float = _setting(
        "SERVICE_BREAKER_MAX_BACKOFF_S",
        15.0,
        "Ceiling of the doubling back-off while Redis keeps failing.",
    )
    bind: str = _setting("SERVICE_BIND", "127.0.0.1:8000", "Address gunicorn listens on (host:port).")
    workers: int = _setting(
        "SERVICE_WORKERS",
        1,
        "Gunicorn worker processes per replica; the cluster scales by replicas, so one each.",
    )
    worker_connections: int = _setting(
        "SERVICE_WORKER_CONNECTIONS",
        256,
        "Concurrent connections per gevent worker; keep >= nginx upstream keepalive.",
    )
    keepalive_s: int = _setting(
        "SERVICE_KEEPALIVE_S",
        75,
        "Idle keep-alive of gunicorn; must exceed the balancer's upstream keepalive_timeout.",
    )
    graceful_timeout_s: int = _setting(
        "SERVICE_GRACEFUL_TIMEOUT_S",
        30,
        "Time in-flight requests get to finish on SIGTERM before workers are killed.",
    )
    drain_delay_s: float = _setting(
        "SERVICE_DRAIN_DELAY_S",
        0.0,
        "On SIGTERM, /readyz answers 503 and the replica keeps serving this long before it stops "
        "accepting (time for a balancer that reads readiness or DNS to move away).",
    )
    timeout_s: int = _setting("SERVICE_TIMEOUT_S", 30, "Gunicorn kills a worker silent for this long.")
    metrics_dir: Path = _setting(
        "SERVICE_METRICS_DIR",
        None,
        "Prometheus multiprocess folder, wiped at start; default a per-replica temp dir.",
    )
    prometheus_multiproc_dir: str = _setting(
        "PROMETHEUS_MULTIPROC_DIR",
        "",
        "Set by gunicorn.conf.py from SERVICE_METRICS_DIR; non-empty: workers share metrics.",
    )
    batching: str = _setting(
        "SERVICE_BATCHING", "on", "on: concurrent requests in a worker share one predict call; off: one each."
    )
    batch_max_rows: int = _setting(
        "SERVICE_BATCH_MAX_ROWS", 64, "Most rows one batched predict call takes (a batch runs at once when full)."
    )
    batch_max_wait_ms: float = _setting(
        "SERVICE_BATCH_MAX_WAIT_MS",
        5.0,
        "Longest a request waits for others to join its batch (it runs sooner when the worker is idle).",
    )
    log_level: str = _setting("SERVICE_LOG_LEVEL", "info", "Python log level.")

    def __post_init__(self) -> None:
        if self.cache_policy is None:
            object.__setattr__(self, "cache_policy", {"*": "auto"})
        if not self.replica_id:
            object.__setattr__(self, "replica_id", socket.gethostname())
        if self.metrics_dir is None:
            safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.replica_id)
            tmp = Path(os.environ.get("TMPDIR", "/tmp"))
            object.__setattr__(self, "metrics_dir", tmp / f"pcluster-metrics-{safe_id}")
        for name in (
            "max_body_bytes",
            "max_batch_rows",
            "redis_timeout_ms",
            "cache_ttl_s",
            "workers",
            "worker_connections",
            "keepalive_s",
            "graceful_timeout_s",
            "timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{_env_name(name)} must be positive, got {getattr(self, name)}")
        if self.redis_max_connections < 0:
            raise SettingsError("SERVICE_REDIS_MAX_CONNECTIONS must be >= 0")
        if self.breaker_backoff_s <= 0 or self.breaker_max_backoff_s < self.breaker_backoff_s:
            raise SettingsError("SERVICE_BREAKER_BACKOFF_S must be > 0 and <= SERVICE_BREAKER_MAX_BACKOFF_S")
        if self.drain_delay_s < 0 or self.drain_delay_s >= self.graceful_timeout_s:
            raise SettingsError("SERVICE_DRAIN_DELAY_S must be >= 0 and below SERVICE_GRACEFUL_TIMEOUT_S")
        if self.batching not in ("on", "off"):
            raise SettingsError(f"SERVICE_BATCHING must be on or off, got {self.batching!r}")
        if self.batch_max_rows <= 0 or self.batch_max_wait_ms < 0:
            raise SettingsError("SERVICE_BATCH_MAX_ROWS must be positive and SERVICE_BATCH_MAX_WAIT_MS >= 0")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise SettingsError(f"SERVICE_LOG_LEVEL: unknown level {self.log_level!r}")

    @property
    def redis_pool_size(self) -> int:
        """Connections per worker: one per concurrent greenlet is enough, never more."""
        return self.redis_max_connections or self.worker_connections

    def cache_policy_for(self, model: str) -> str:
        """on, off or auto for `model` (off whenever there is no Redis)."""
        if not self.redis_url:
            return "off"
        return self.cache_policy.get(model, self.cache_policy["*"])

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every field from the environment (or `environ`), failing fast on bad values."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"])
            if raw is None:
                continue
            try:
                values[f.name] = _PARSERS[f.name](raw) if f.name in _PARSERS else _parse(f.type, raw)
            except (ValueError, TypeError) as exc:
                raise SettingsError(f"{f.metadata['env']}={raw!r}: {exc}") from None
        return cls(**values)


def _env_name(field_name: str) -> str:
    return next(f.metadata["env"] for f in fields(Settings) if f.name == field_name)


def _parse(type_name: Any, raw: str) -> Any:
    converters: dict[str, Callable[[str], Any]] = {
        "int": int,
        "float": float,
        "str": str,
        "Path": Path,
    }
    return converters[str(type_name)](raw.strip() if type_name != "str" else raw)


_PARSERS: dict[str, Callable[[str], Any]] = {"cache_policy": _parse_cache_policy}


def settings_table() -> str:
    """Markdown table of every setting, for the README."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in fields(Settings):
        default = f.default
        if f.name == "cache_policy":
            default = "auto"
        elif f.name == "replica_id":
            default = "host name"
        elif f.name == "metrics_dir":
            default = "$TMPDIR/pcluster-metrics-<replica>"
        shown = f"`{default}`" if default != "" else "(empty)"
        rows.append(f"| `{f.metadata['env']}` | {shown} | {f.metadata['doc']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
