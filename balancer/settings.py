"""Every BALANCER_* setting, declared once: its variable, default, kind and meaning. The
kind (`KINDS`) is checked by render.py before anything reaches nginx.conf, and by the
image's generated entrypoint script (envsh.py) in sh; docs/settings.md is generated from
the same declarations (`settings_table`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields

from service.settings.declare import Group, from_env, setting, table

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


@dataclass(frozen=True)
class BalancerSettings(Group):
    """Every BALANCER_* setting; the field name upper-cased with the prefix is its variable."""

    listen: str = setting(
        "BALANCER_LISTEN",
        "8080",
        "Public listener (port or address:port): rate limited, no /metrics.",
        kind="listen",
    )
    internal_listen: str = setting(
        "BALANCER_INTERNAL_LISTEN",
        "8082",
        "Internal listener for load generators and scrapers: not rate limited, serves /metrics. Never publish it.",
        kind="listen",
    )
    status_listen: str = setting(
        "BALANCER_STATUS_LISTEN",
        "127.0.0.1:8081",
        "stub_status listener; keep it on loopback.",
        kind="listen",
    )
    worker_processes: str = setting(
        "BALANCER_WORKER_PROCESSES",
        "auto",
        "nginx worker processes (one per core).",
        kind="processes",
    )
    worker_connections: str = setting(
        "BALANCER_WORKER_CONNECTIONS",
        "4096",
        "Connections per nginx worker (client + upstream).",
        kind="count",
    )
    scheduling: str = setting(
        "BALANCER_SCHEDULING",
        "batch",
        "Linux scheduling policy of nginx's processes. batch (SCHED_BATCH): nginx does not preempt a replica on "
        "the cores they share at each request it wakes for, and takes up its ready connections at the next tick "
        "(iris new rows +11-16 % with 2 replicas on 2 cores, no change at c=1); normal: as started (the kernel's "
        "default).",
        kind="scheduling",
    )
    upstream_keepalive: str = setting(
        "BALANCER_UPSTREAM_KEEPALIVE",
        "64",
        "Idle connections per nginx worker kept to the replicas.",
        kind="count",
    )
    upstream_keepalive_timeout_s: str = setting(
        "BALANCER_UPSTREAM_KEEPALIVE_TIMEOUT_S",
        "60",
        "Idle upstream connection lifetime; below gunicorn's SERVICE_KEEPALIVE_S (75).",
        kind="duration",
    )
    max_fails: str = setting(
        "BALANCER_MAX_FAILS",
        "2",
        "Failures within fail_timeout that take a replica out of rotation.",
        kind="count",
    )
    fail_timeout_s: str = setting(
        "BALANCER_FAIL_TIMEOUT_S",
        "5",
        "How long a failed replica stays out before nginx tries it again.",
        kind="duration",
    )
    next_upstream_tries: str = setting(
        "BALANCER_NEXT_UPSTREAM_TRIES",
        "0",
        "Most replicas one request is tried on; 0: as many as answer within BALANCER_NEXT_UPSTREAM_TIMEOUT_S "
        "(several replicas stopping at once each refuse with a 503 while they drain).",
        kind="count",
    )
    next_upstream_timeout_s: str = setting(
        "BALANCER_NEXT_UPSTREAM_TIMEOUT_S",
        "15",
        "Most time spent trying replicas for one request.",
        kind="duration",
    )
    proxy_connect_timeout_ms: str = setting(
        "BALANCER_PROXY_CONNECT_TIMEOUT_MS",
        "500",
        "Connecting to a replica (loopback/LAN: fast or dead).",
        kind="duration",
    )
    proxy_read_timeout_s: str = setting(
        "BALANCER_PROXY_READ_TIMEOUT_S",
        "10",
        "Longest wait for a replica's answer before trying the next.",
        kind="duration",
    )
    operator_timeout_s: str = setting(
        "BALANCER_OPERATOR_TIMEOUT_S",
        "120",
        "Longest wait for a replica's answer to an operator route (a model load); never retried on another replica.",
        kind="duration",
    )
    client_keepalive_timeout_s: str = setting(
        "BALANCER_CLIENT_KEEPALIVE_TIMEOUT_S",
        "75",
        "Idle client keep-alive.",
        kind="duration",
    )
    client_timeout_s: str = setting(
        "BALANCER_CLIENT_TIMEOUT_S",
        "10",
        "Client header/body/send timeouts (cuts off slow clients).",
        kind="duration",
    )
    max_body_size: str = setting(
        "BALANCER_MAX_BODY_SIZE",
        "1m",
        "Largest request body (413 above); match SERVICE_MAX_BODY_BYTES.",
        kind="size",
    )
    gzip_min_length: str = setting(
        "BALANCER_GZIP_MIN_LENGTH",
        "1024",
        "Smallest JSON response that is gzipped.",
        kind="count",
    )
    rate_limit: str = setting(
        "BALANCER_RATE_LIMIT",
        "200r/s",
        "Requests per second per client address (nginx rate syntax).",
        kind="rate",
    )
    rate_limit_burst: str = setting(
        "BALANCER_RATE_LIMIT_BURST",
        "400",
        "Requests above the rate a client may burst before 429s.",
        kind="count",
    )
    conn_per_client: str = setting(
        "BALANCER_CONN_PER_CLIENT",
        "32",
        "Requests in progress at once per client address on the public listener (429 beyond): bounds what "
        "one address holds open, slow uploads included.",
        kind="count",
    )
    rate_limit_exempt: str = setting(
        "BALANCER_RATE_LIMIT_EXEMPT",
        "",
        "Source networks not rate limited on the public listener; empty (the default, in every mode): limit "
        "every client alike.",
        kind="networks",
    )
    internal_networks: str = setting(
        "BALANCER_INTERNAL_NETWORKS",
        "",
        "Source networks that may read /metrics on the public listener, and only that (never the model "
        "repository, which the internal listener alone serves); empty (the default): nobody.",
        kind="networks",
    )
    real_ip_from: str = setting(
        "BALANCER_REAL_IP_FROM",
        "",
        "Trusted proxies or load balancers (addresses or CIDRs) in front of the balancer: the client address "
        "they give in BALANCER_REAL_IP_HEADER is the one rate limited and logged. Empty (the default): the TCP "
        "peer. Set it wherever clients arrive through a proxy (docs/balancer.md says which deployment needs it).",
        kind="networks",
    )
    real_ip_header: str = setting(
        "BALANCER_REAL_IP_HEADER",
        "X-Forwarded-For",
        "Where the trusted proxies put the client's address: X-Forwarded-For (the rightmost untrusted entry), "
        "X-Real-IP, or proxy_protocol (the public listener then expects the PROXY protocol).",
        kind="real_ip_header",
    )
    upstream_servers: str = setting(
        "BALANCER_UPSTREAM_SERVERS",
        "127.0.0.1:8001",
        "Space-separated replica addresses (host:port); or a DNS name with resolve.",
        kind="servers",
    )
    upstream_resolve: str = setting(
        "BALANCER_UPSTREAM_RESOLVE",
        "off",
        "on: re-resolve upstream names (compose/k8s, nginx >= 1.27.3).",
        kind="switch",
    )
    resolver: str = setting(
        "BALANCER_RESOLVER",
        "",
        "DNS servers for resolve (Docker: 127.0.0.11); empty: with BALANCER_UPSTREAM_RESOLVE=on the nameservers "
        "of /etc/resolv.conf (a Kubernetes pod's own DNS, NodeLocal DNSCache included), else none.",
        kind="hosts",
    )
    resolver_valid_s: str = setting(
        "BALANCER_RESOLVER_VALID_S",
        "5",
        "How long a resolved address list is trusted; scaling shows within it.",
        kind="duration",
    )
    l1_cache: str = setting(
        "BALANCER_L1_CACHE",
        "on",
        "L1 micro-cache: nginx answers a repeated prediction (same route, headers, body) "
        "itself for BALANCER_L1_TTL_S; off: every request reaches a replica.",
        kind="switch",
    )
    l1_ttl_s: str = setting(
        "BALANCER_L1_TTL_S",
        "5",
        "How long the L1 keeps a 200 answer fresh (an expired one is served while one request refreshes it): a "
        "new model version under an unversioned path shows within it.",
        kind="duration",
    )
    l1_max_body_bytes: str = setting(
        "BALANCER_L1_MAX_BODY_BYTES",
        "4096",
        "Largest request body the L1 caches (at most 12288), sent chunked or not; larger ones pass through.",
        kind="count",
    )
    l1_min_uses: str = setting(
        "BALANCER_L1_MIN_USES",
        "2",
        "Requests for the same key before the L1 stores the answer: 1 stores every "
        "answer (a file write each, even for requests never repeated).",
        kind="count",
    )
    l1_size: str = setting(
        "BALANCER_L1_SIZE",
        "64m",
        "Most disk (tmpfs in containers) the L1's answers take.",
        kind="size",
    )
    l1_keys: str = setting(
        "BALANCER_L1_KEYS",
        "16m",
        "Shared memory for the L1's keys, about 8,000 a megabyte. Every request the L1 looks up holds a key for "
        "BALANCER_L1_TTL_S, stored or not: new requests a second times the TTL must fit (16m: 25,000/s at 5 s).",
        kind="size",
    )
    l1_lock_timeout_ms: str = setting(
        "BALANCER_L1_LOCK_TIMEOUT_MS",
        "50",
        "Identical concurrent misses wait this long for the first one's answer (nginx looks once, at the end) "
        "before going to a replica themselves.",
        kind="duration",
    )
    pid_file: str = setting(
        "BALANCER_PID_FILE",
        "/run/nginx.pid",
        "nginx pid file.",
        kind="path",
    )
    error_log: str = setting(
        "BALANCER_ERROR_LOG",
        "stderr",
        "nginx error log.",
        kind="path",
    )
    access_log: str = setting(
        "BALANCER_ACCESS_LOG",
        "/dev/stdout",
        "JSON access log.",
        kind="path",
    )
    access_log_buffer: str = setting(
        "BALANCER_ACCESS_LOG_BUFFER",
        "buffer=64k flush=100ms",
        "How nginx buffers the access log: lines reach the file in blocks, at most the flush time late (a "
        "reload or stop writes them out; a killed nginx loses the unwritten ones). Empty: one write per request.",
        kind="log_buffer",
    )
    temp_dir: str = setting(
        "BALANCER_TEMP_DIR",
        "/tmp/nginx",
        "Folder for nginx's temp files.",
        kind="path",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: str) -> BalancerSettings:
        """Defaults, then BALANCER_* variables, then explicit overrides."""
        return from_env(cls, environ, **overrides)


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
    """BALANCER_<FIELD>: the variable each field declares (tests/unit/test_settings.py holds them equal)."""
    return f"BALANCER_{field_name.upper()}"


def settings_table() -> str:
    """Markdown table of every BALANCER_* setting, for docs/settings.md."""
    return table(BalancerSettings, kinds=lambda kind: KINDS[kind].description)
