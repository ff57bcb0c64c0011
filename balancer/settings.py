"""Every BALANCER_* setting, declared once: its variable, default, kind and meaning. The
kind (`KINDS`) is checked by render.py before anything reaches nginx.conf, and by the
image's generated entrypoint script (envsh.py) in sh; docs/settings.md is generated from
the same declarations (`settings_table`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

# A buffer always with a flush time: without one, lines would wait for the buffer to fill.
ACCESS_LOG_BUFFER_PATTERN = r"buffer=\d+[km]? flush=(\d+)(ms|s|m)?"


class RenderError(ValueError):
    """The settings cannot make a valid configuration."""


@dataclass(frozen=True)
class Kind:
    """What a setting's value may be: `pattern` (a full match) in Python, and the characters
    the image's shell script allows (`chars`, a sh bracket-expression body; `choices`
    instead, for an enumeration). Each kind refuses `;`, `{`, `}`, `#`, quotes, `$` and
    whitespace but the spaces of a list: no value can add an nginx directive."""

    description: str
    pattern: str
    chars: str = ""
    choices: tuple[str, ...] = ()
    empty: bool = False  # the empty value is allowed


KINDS: dict[str, Kind] = {
    "listen": Kind(
        "a port or address:port", r"((\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):)?[0-9]{1,5}", "]0-9A-Za-z.:[-"
    ),
    "processes": Kind("auto or a number of processes", r"auto|[1-9][0-9]{0,3}", "0-9auto"),
    "count": Kind("a whole number", r"0|[1-9][0-9]{0,8}", "0-9"),
    "duration": Kind("a whole number (of the unit its name ends in)", r"0|[1-9][0-9]{0,8}", "0-9"),
    "size": Kind("a size in bytes, or with k, m or g", r"[0-9]{1,9}[kKmMgG]?", "0-9kKmMgG"),
    "rate": Kind("a rate like 200r/s or 600r/m", r"[0-9]{1,9}r/[sm]", "0-9r/sm"),
    "switch": Kind("on or off", r"on|off", choices=("on", "off")),
    "scheduling": Kind("batch or normal", r"batch|normal", choices=("batch", "normal")),
    "real_ip_header": Kind(
        "X-Forwarded-For, X-Real-IP or proxy_protocol",
        r"X-Forwarded-For|X-Real-IP|proxy_protocol",
        choices=("X-Forwarded-For", "X-Real-IP", "proxy_protocol"),
    ),
    "networks": Kind(
        "space-separated addresses or networks (CIDR)",
        r"[0-9A-Fa-f.:/]+( [0-9A-Fa-f.:/]+)*",
        "0-9A-Fa-f.:/ ",
        empty=True,
    ),
    "servers": Kind(
        "space-separated host:port", r"[A-Za-z0-9_.\[\]:-]+:[0-9]+( [A-Za-z0-9_.\[\]:-]+:[0-9]+)*", "]A-Za-z0-9_.:[ -"
    ),
    "hosts": Kind(
        "space-separated addresses or names",
        r"[A-Za-z0-9_.\[\]:-]+( [A-Za-z0-9_.\[\]:-]+)*",
        "]A-Za-z0-9_.:[ -",
        empty=True,
    ),
    "path": Kind("a file path (or stderr)", r"[A-Za-z0-9_./:-]+", "A-Za-z0-9_./:-"),
    "log_buffer": Kind("like buffer=64k flush=100ms, or empty", ACCESS_LOG_BUFFER_PATTERN, "a-z0-9= ", empty=True),
}


def _setting(default: str, kind: str, doc: str) -> str:
    return field(default=default, metadata={"doc": doc, "kind": kind})  # type: ignore[return-value]


@dataclass(frozen=True)
class BalancerSettings:
    """Every BALANCER_* setting; the field name upper-cased with the prefix is its variable."""

    listen: str = _setting("8080", "listen", "Public listener (port or address:port): rate limited, no /metrics.")
    internal_listen: str = _setting(
        "8082",
        "listen",
        "Internal listener for load generators and scrapers: not rate limited, serves /metrics. Never publish it.",
    )
    status_listen: str = _setting("127.0.0.1:8081", "listen", "stub_status listener; keep it on loopback.")
    worker_processes: str = _setting("auto", "processes", "nginx worker processes (one per core).")
    worker_connections: str = _setting("4096", "count", "Connections per nginx worker (client + upstream).")
    scheduling: str = _setting(
        "batch",
        "scheduling",
        "Linux scheduling policy of nginx's processes. batch (SCHED_BATCH): nginx does not preempt a replica on "
        "the cores they share at each request it wakes for, and takes up its ready connections at the next tick "
        "(iris new rows +11-16 % with 2 replicas on 2 cores, no change at c=1); normal: as started (the kernel's "
        "default).",
    )
    upstream_keepalive: str = _setting("64", "count", "Idle connections per nginx worker kept to the replicas.")
    upstream_keepalive_timeout_s: str = _setting(
        "60", "duration", "Idle upstream connection lifetime; below gunicorn's SERVICE_KEEPALIVE_S (75)."
    )
    max_fails: str = _setting("2", "count", "Failures within fail_timeout that take a replica out of rotation.")
    fail_timeout_s: str = _setting("5", "duration", "How long a failed replica stays out before nginx tries it again.")
    next_upstream_tries: str = _setting(
        "0",
        "count",
        "Most replicas one request is tried on; 0: as many as answer within BALANCER_NEXT_UPSTREAM_TIMEOUT_S "
        "(several replicas stopping at once each refuse with a 503 while they drain).",
    )
    next_upstream_timeout_s: str = _setting("15", "duration", "Most time spent trying replicas for one request.")
    proxy_connect_timeout_ms: str = _setting("500", "duration", "Connecting to a replica (loopback/LAN: fast or dead).")
    proxy_read_timeout_s: str = _setting(
        "10", "duration", "Longest wait for a replica's answer before trying the next."
    )
    operator_timeout_s: str = _setting(
        "120",
        "duration",
        "Longest wait for a replica's answer to an operator route (a model load); never retried on another replica.",
    )
    client_keepalive_timeout_s: str = _setting("75", "duration", "Idle client keep-alive.")
    client_timeout_s: str = _setting("10", "duration", "Client header/body/send timeouts (cuts off slow clients).")
    max_body_size: str = _setting("1m", "size", "Largest request body (413 above); match SERVICE_MAX_BODY_BYTES.")
    gzip_min_length: str = _setting("1024", "count", "Smallest JSON response that is gzipped.")
    rate_limit: str = _setting("200r/s", "rate", "Requests per second per client address (nginx rate syntax).")
    rate_limit_burst: str = _setting("400", "count", "Requests above the rate a client may burst before 429s.")
    conn_per_client: str = _setting(
        "32",
        "count",
        "Requests in progress at once per client address on the public listener (429 beyond): bounds what "
        "one address holds open, slow uploads included.",
    )
    rate_limit_exempt: str = _setting(
        "",
        "networks",
        "Source networks not rate limited on the public listener; empty (the default, in every mode): limit "
        "every client alike.",
    )
    internal_networks: str = _setting(
        "",
        "networks",
        "Source networks that may read /metrics on the public listener, and only that (never the model "
        "repository, which the internal listener alone serves); empty (the default): nobody.",
    )
    real_ip_from: str = _setting(
        "",
        "networks",
        "Trusted proxies or load balancers (addresses or CIDRs) in front of the balancer: the client address "
        "they give in BALANCER_REAL_IP_HEADER is the one rate limited and logged. Empty (the default): the TCP "
        "peer. Set it wherever clients arrive through a proxy (docs/balancer.md says which deployment needs it).",
    )
    real_ip_header: str = _setting(
        "X-Forwarded-For",
        "real_ip_header",
        "Where the trusted proxies put the client's address: X-Forwarded-For (the rightmost untrusted entry), "
        "X-Real-IP, or proxy_protocol (the public listener then expects the PROXY protocol).",
    )
    upstream_servers: str = _setting(
        "127.0.0.1:8001", "servers", "Space-separated replica addresses (host:port); or a DNS name with resolve."
    )
    upstream_resolve: str = _setting("off", "switch", "on: re-resolve upstream names (compose/k8s, nginx >= 1.27.3).")
    resolver: str = _setting("", "hosts", "DNS server for resolve (Docker: 127.0.0.11); empty: none.")
    resolver_valid_s: str = _setting(
        "5", "duration", "How long a resolved address list is trusted; scaling shows within it."
    )
    l1_cache: str = _setting(
        "on",
        "switch",
        "L1 micro-cache: nginx answers a repeated prediction (same route, headers, body) "
        "itself for BALANCER_L1_TTL_S; off: every request reaches a replica.",
    )
    l1_ttl_s: str = _setting(
        "5",
        "duration",
        "How long the L1 keeps a 200 answer fresh (an expired one is served while one request refreshes it): a "
        "new model version under an unversioned path shows within it.",
    )
    l1_max_body_bytes: str = _setting(
        "4096",
        "count",
        "Largest request body the L1 caches (at most 12288); larger ones, and chunked ones, pass through.",
    )
    l1_min_uses: str = _setting(
        "2",
        "count",
        "Requests for the same key before the L1 stores the answer: 1 stores every "
        "answer (a file write each, even for requests never repeated).",
    )
    l1_size: str = _setting("64m", "size", "Most disk (tmpfs in containers) the L1's answers take.")
    l1_keys: str = _setting(
        "16m",
        "size",
        "Shared memory for the L1's keys, about 8,000 a megabyte. Every request the L1 looks up holds a key for "
        "BALANCER_L1_TTL_S, stored or not: new requests a second times the TTL must fit (16m: 25,000/s at 5 s).",
    )
    l1_lock_timeout_ms: str = _setting(
        "50",
        "duration",
        "Identical concurrent misses wait this long for the first one's answer (nginx looks once, at the end) "
        "before going to a replica themselves.",
    )
    pid_file: str = _setting("/run/nginx.pid", "path", "nginx pid file.")
    error_log: str = _setting("stderr", "path", "nginx error log.")
    access_log: str = _setting("/dev/stdout", "path", "JSON access log.")
    access_log_buffer: str = _setting(
        "buffer=64k flush=100ms",
        "log_buffer",
        "How nginx buffers the access log: lines reach the file in blocks, at most the flush time late (a "
        "reload or stop writes them out; a killed nginx loses the unwritten ones). Empty: one write per request.",
    )
    temp_dir: str = _setting("/tmp/nginx", "path", "Folder for nginx's temp files.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: str) -> BalancerSettings:
        """Defaults, then BALANCER_* variables, then explicit overrides."""
        env = os.environ if environ is None else environ
        values = {f.name: env[env_name(f.name)] for f in fields(cls) if env_name(f.name) in env}
        values.update(overrides)
        return cls(**values)


# What the balancer image changes from the defaults above: a pid file the non-root nginx
# user may write on a read-only root filesystem, and no trusted source networks. Under a
# container engine a host client arrives from whichever gateway the engine's port
# forwarding picks, so trust goes by listener: the internal one is never published.
CONTAINER_DEFAULTS = {"pid_file": "/tmp/nginx/nginx.pid"}


def container_settings(environ: Mapping[str, str], **overrides: str) -> BalancerSettings:
    """The settings the balancer image renders with: CONTAINER_DEFAULTS under `environ`."""
    defaults = {env_name(name): value for name, value in CONTAINER_DEFAULTS.items()}
    return BalancerSettings.from_env({**defaults, **environ}, **overrides)


L1_MAX_BODY_LIMIT = 12288  # the cache key holds the body and must fit in proxy_buffer_size (16k)


def check_kinds(settings: BalancerSettings) -> None:
    """RenderError unless every setting's value is of its kind (before it reaches nginx.conf)."""
    for f in fields(settings):
        kind, value = KINDS[f.metadata["kind"]], getattr(settings, f.name)
        if value == "" and kind.empty:
            continue
        if not re.fullmatch(kind.pattern, value):
            raise RenderError(f"{env_name(f.name)} must be {kind.description}, got {value[:60]!r}")


def env_name(field_name: str) -> str:
    """BALANCER_<FIELD>."""
    return f"BALANCER_{field_name.upper()}"


def settings_table() -> str:
    """Markdown table of every BALANCER_* setting, for docs/settings.md."""
    rows = ["| variable | default | kind | meaning |", "|---|---|---|---|"]
    for f in fields(BalancerSettings):
        default = f"`{f.default}`" if f.default else "(empty)"
        rows.append(
            f"| `{env_name(f.name)}` | {default} | {KINDS[f.metadata['kind']].description} | {f.metadata['doc']} |"
        )
    return "\n".join(rows)
