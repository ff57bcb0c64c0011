"""Typed settings for the prediction service: the one place that reads the environment.

Settings are grouped by concern (the gunicorn process, the models, the result cache,
batching). Every field declares its environment variable, default, meaning and check
next to it (declare.py, the one way every part of the project declares a setting); a bad
value fails at start-up with a message that names the variable.
Units are in the names. Cache policy and batching can differ per model: in these
settings (`iris=off,*=auto`) or in the model's own `model.json` (service.models.serving settles them).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from service.settings.declare import Group, SettingsError, from_env, non_negative, one_of, positive, setting, table
from service.settings.redis_url import RedisUrlError, parse_redis_url, with_password_file

CACHE_POLICIES = ("on", "off", "auto")
SWITCH = ("on", "off")
RUNTIME_CHOICES = ("auto", "sklearn")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class PerModel:
    """A choice with a default and per-model exceptions: `on`, or `iris=off,*=auto`."""

    default: str
    overrides: tuple[tuple[str, str], ...] = ()

    def explicit(self, model: str) -> str | None:
        """The value set for this model by name, if any."""
        return dict(self.overrides).get(model)

    def __str__(self) -> str:
        return ",".join([*(f"{name}={value}" for name, value in self.overrides), f"*={self.default}"])


def per_model(allowed: tuple[str, ...], default: str) -> Callable[[str], PerModel]:
    """A parser of `value` or `model=value,...,*=value` with values from `allowed`."""

    def parse(raw: str) -> PerModel:
        overrides: dict[str, str] = {}
        fallback = default
        for item in (part.strip() for part in raw.split(",")):
            if not item:
                continue
            name, sep, value = item.partition("=")
            if not sep:
                name, value = "*", name
            name, value = name.strip(), value.strip().lower()
            if value not in allowed or not name:
                raise ValueError(f"item {item!r}: expected {'|'.join(allowed)} or model={'|'.join(allowed)}")
            if name == "*":
                fallback = value
            else:
                overrides[name] = value
        return PerModel(fallback, tuple(sorted(overrides.items())))

    return parse


def _replica_id(raw: str) -> str:
    return raw.strip() or socket.gethostname()


@dataclass(frozen=True)
class ServerSettings(Group):
    """The gunicorn process of one replica."""

    bind: str = setting("SERVICE_BIND", "127.0.0.1:8000", "Address gunicorn listens on (host:port).")
    operator_token: str = setting(
        "SERVICE_OPERATOR_TOKEN",
        "",
        "The operator's credential: the model repository routes need `Authorization: Bearer <it>` (compared "
        "in constant time; a missing or wrong one is a 401 and changes nothing). Empty: those routes refuse "
        "everyone. From a secret store; `scripts/cluster` makes one for a local cluster.",
        secret=True,
    )
    workers: int = setting(
        "SERVICE_WORKERS",
        1,
        "Gunicorn worker processes per replica; the cluster scales by replicas, so one each.",
        check=positive,
    )
    worker_connections: int = setting(
        "SERVICE_WORKER_CONNECTIONS",
        256,
        "Concurrent connections per gevent worker; keep >= nginx upstream keepalive.",
        check=positive,
    )
    keepalive_s: int = setting(
        "SERVICE_KEEPALIVE_S",
        75,
        "Idle keep-alive of gunicorn; must exceed the balancer's upstream keepalive_timeout.",
        check=positive,
    )
    graceful_timeout_s: int = setting(
        "SERVICE_GRACEFUL_TIMEOUT_S",
        30,
        "Time in-flight requests get to finish on SIGTERM before workers are killed.",
        check=positive,
    )
    drain_delay_s: float = setting(
        "SERVICE_DRAIN_DELAY_S",
        0.0,
        "On SIGTERM, /readyz answers 503 and the replica keeps serving this long (closing each connection after "
        "its response) before it refuses requests with 503 until they stop (at most 1.5 s) and stops accepting "
        "(time for a balancer that reads readiness or DNS to move away).",
        check=non_negative,
    )
    latency_objective_ms: float = setting(
        "SERVICE_LATENCY_OBJECTIVE_MS",
        500.0,
        "Latency a prediction should be answered within. Past capacity a replica refuses (429, Retry-After), "
        "before reading the body, a request that would wait over a fifth of it (at least one service time) "
        "while the waits requests face average over that too. 0: never refuse.",
        check=non_negative,
    )
    timeout_s: int = setting("SERVICE_TIMEOUT_S", 30, "Gunicorn kills a worker silent for this long.", check=positive)
    replica_id: str = setting(
        "SERVICE_REPLICA_ID",
        None,
        "Id returned in X-Served-By; empty means the host name.",
        parse=_replica_id,
        factory=socket.gethostname,
        shown="host name",
    )
    metrics_dir: Path | None = setting(
        "SERVICE_METRICS_DIR",
        None,
        "Prometheus multiprocess folder, wiped at start; unset: $TMPDIR/pcluster-metrics-<replica id>.",
        shown="(unset)",
    )
    prometheus_multiproc_dir: str = setting(
        "PROMETHEUS_MULTIPROC_DIR",
        "",
        "Set by gunicorn.conf.py from SERVICE_METRICS_DIR; non-empty: workers share metrics.",
    )
    log_level: str = setting("SERVICE_LOG_LEVEL", "info", "Python log level.", check=one_of(*LOG_LEVELS))

    def check(self) -> None:
        if self.drain_delay_s >= self.graceful_timeout_s:
            raise SettingsError("SERVICE_DRAIN_DELAY_S must be below SERVICE_GRACEFUL_TIMEOUT_S")

    @property
    def metrics_path(self) -> Path:
        """Where this replica's workers write their metrics."""
        if self.metrics_dir is not None:
            return self.metrics_dir
        safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.replica_id)
        return Path(os.environ.get("TMPDIR", "/tmp")) / f"pcluster-metrics-{safe_id}"


@dataclass(frozen=True)
class ModelSettings(Group):
    """Where models come from and how much one request may ask of them."""

    models_dir: Path = setting("SERVICE_MODELS_DIR", Path("models"), "Folder holding models/<name>/<version>/.")
    default_model: str = setting("SERVICE_DEFAULT_MODEL", "iris", "Model answered by POST /predict.")
    max_body_bytes: int = setting(
        "SERVICE_MAX_BODY_BYTES", 1_048_576, "Largest request body accepted (413 above).", check=positive
    )
    max_batch_rows: int = setting(
        "SERVICE_MAX_BATCH_ROWS", 1024, "Most rows one prediction request may carry.", check=positive
    )
    repository_poll_s: float = setting(
        "SERVICE_REPOSITORY_POLL_S",
        1.0,
        "How often each worker reads the desired model state (loads, unloads, version policy) from Redis and "
        "converges on it; 0: never (each replica serves what it loaded at start, and the repository routes "
        "answer 503).",
        check=non_negative,
    )
    models_poll_s: float = setting(
        "SERVICE_MODELS_POLL_S",
        0.0,
        "Rescan SERVICE_MODELS_DIR this often and load new <name>/<version>/ folders of models whose versions "
        "no operator has listed (a load or unload of one version lists them); 0: only at start and when the "
        "desired model state changes.",
        check=non_negative,
    )
    runtime: PerModel = setting(
        "SERVICE_RUNTIME",
        None,
        "Which runtime answers, per model: auto (ONNX Runtime when the version's folder holds a model.onnx that "
        "agrees with scikit-learn, checked again at load; else scikit-learn) or sklearn, e.g. 'churn=sklearn,*=auto'.",
        parse=per_model(RUNTIME_CHOICES, "auto"),
        factory=lambda: PerModel("auto"),
    )
    routing_key_header: str = setting(
        "SERVICE_ROUTING_KEY_HEADER",
        "X-Routing-Key",
        "Request header whose value keeps a client on one version of a model split between versions.",
    )


@dataclass(frozen=True)
class CacheSettings(Group):
    """The shared result cache in Redis and the breaker in front of it."""

    redis_url: str = setting(
        "REDIS_URL",
        "redis://127.0.0.1:6379/0",
        "Result cache; empty turns the cache off. One server: "
        "redis://[[user]:password@]host:port/db (rediss:// for TLS); Sentinel: "
        "redis+sentinel://[[user]:password@]host:port,host:port,.../service-name/db (the password is the primary's); "
        "Redis Cluster: redis+cluster://[[user]:password@]host:port,host:port,... (any reachable nodes).",
    )
    redis_password_file: str = setting(
        "REDIS_PASSWORD_FILE",
        "",
        "A file holding the Redis password (a secret), for a REDIS_URL that names none: on no command line.",
    )
    timeout_ms: int = setting(
        "SERVICE_REDIS_TIMEOUT_MS",
        100,
        "Socket connect/read timeout for the cache; the most a request waits on Redis. Keep it above the longest "
        "batched predict, which holds the worker's event loop (and so the timer) meanwhile.",
        check=positive,
    )
    max_connections: int = setting(
        "SERVICE_REDIS_MAX_CONNECTIONS",
        0,
        "Redis pool size per worker; 0 means SERVICE_WORKER_CONNECTIONS.",
        check=non_negative,
    )
    ttl_s: int = setting("SERVICE_CACHE_TTL_S", 3600, "How long a cached prediction lives in Redis.", check=positive)
    policy: PerModel = setting(
        "SERVICE_CACHE_POLICY",
        None,
        "Cache per model: on, off or auto (cache only models whose predict of a row, with batching its share "
        "of an 8-row batch, costs more than a miss's two Redis round trips), e.g. 'iris=off,*=auto'; a model.json "
        "`serving.cache_policy` sits between the two. off also keeps the L1 from reusing the model's answers.",
        parse=per_model(CACHE_POLICIES, "auto"),
        factory=lambda: PerModel("auto"),
    )
    key_prefix: str = setting("SERVICE_CACHE_KEY_PREFIX", "pred", "Prefix of every cache key in Redis.")
    breaker_backoff_s: float = setting(
        "SERVICE_BREAKER_BACKOFF_S",
        1.0,
        "After a Redis failure, how long requests bypass the cache before one probes it.",
        check=positive,
    )
    breaker_max_backoff_s: float = setting(
        "SERVICE_BREAKER_MAX_BACKOFF_S",
        15.0,
        "Ceiling of the doubling back-off while Redis keeps failing.",
        check=positive,
    )

    def check(self) -> None:
        if self.redis_url:
            try:
                parse_redis_url(self.connection_url())
            except RedisUrlError as exc:
                raise SettingsError(str(exc)) from None
        if self.breaker_max_backoff_s < self.breaker_backoff_s:
            raise SettingsError("SERVICE_BREAKER_BACKOFF_S must be <= SERVICE_BREAKER_MAX_BACKOFF_S")

    def connection_url(self) -> str:
        """REDIS_URL with the password of REDIS_PASSWORD_FILE, if one is set (read now;
        check() reads it once at start, so a file that cannot be read stops the start)."""
        return with_password_file(self.redis_url, self.redis_password_file)


@dataclass(frozen=True)
class BatchingSettings(Group):
    """Concurrent requests in one worker sharing one predict call."""

    enabled: PerModel = setting(
        "SERVICE_BATCHING",
        None,
        "on: concurrent requests in a worker share one predict call; off: one each. Per model too, e.g. "
        "'iris=off,*=on'; a model.json `serving.batching` sits between the two.",
        parse=per_model(SWITCH, "on"),
        factory=lambda: PerModel("on"),
    )
    max_rows: int = setting(
        "SERVICE_BATCH_MAX_ROWS",
        64,
        "Most rows one batched predict call takes (a batch runs at once when full); "
        "model.json `serving.batch_max_rows` overrides it.",
        check=positive,
    )
    max_wait_ms: float = setting(
        "SERVICE_BATCH_MAX_WAIT_MS",
        5.0,
        "Longest a request waits for others to join its batch (it runs sooner when "
        "the worker is idle); model.json `serving.batch_max_wait_ms` overrides it.",
        check=non_negative,
    )


GROUPS = {"server": ServerSettings, "models": ModelSettings, "cache": CacheSettings, "batching": BatchingSettings}


@dataclass(frozen=True)
class Settings:
    """Settings of one replica; build with `Settings.from_env()`."""

    server: ServerSettings = field(default_factory=ServerSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    batching: BatchingSettings = field(default_factory=BatchingSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every field from the environment (or `environ`), failing fast on bad values."""
        env = os.environ if environ is None else environ
        return cls(**{name: from_env(group, env) for name, group in GROUPS.items()})

    @property
    def redis_pool_size(self) -> int:
        """Connections per worker: one per concurrent greenlet is enough, never more."""
        return self.cache.max_connections or self.server.worker_connections

    def flat(self) -> dict[str, str]:
        """Every setting as `group.field` → its value as text (reports, logs); a secret never."""
        shown = {}
        for name in GROUPS:
            for f in fields(getattr(self, name)):
                value = getattr(getattr(self, name), f.name)
                shown[f"{name}.{f.name}"] = "***" if f.metadata.get("secret") and value else str(value)
        return shown


def settings_table() -> str:
    """Markdown tables of every setting, one per group, for docs/settings.md."""
    return "\n\n".join(
        f"**{name}**: {(group.__doc__ or '').strip()}\n\n{table(group)}" for name, group in GROUPS.items()
    )
