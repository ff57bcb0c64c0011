"""Render balancer/nginx.conf.template from BALANCER_* settings.

Only `${BALANCER_*}` placeholders are substituted (the nginx image's envsubst filter
does the same in containers), so nginx's own `$variables` survive. A placeholder
without a value is an error, never an empty string.

    python -m balancer.render --replicas 127.0.0.1:8001,127.0.0.1:8002 > nginx.conf
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "nginx.conf.template"
ENVSH = Path(__file__).resolve().parent / "docker-entrypoint.d" / "15-balancer-settings.envsh"
PLACEHOLDER = re.compile(r"\$\{(BALANCER_[A-Z0-9_]+)\}")


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

# BALANCER_SCHEDULING: what starts nginx under the policy (util-linux's chrt, and busybox's
# in the alpine image; the policy passes from nginx's master to its workers).
SCHEDULING = {"batch": ["chrt", "--batch", "0"], "normal": []}


def scheduling_argv(settings: BalancerSettings) -> list[str]:
    """The command prefix that starts nginx under settings.scheduling."""
    if settings.scheduling not in SCHEDULING:
        raise RenderError(f"BALANCER_SCHEDULING: {settings.scheduling!r} is not batch or normal")
    return list(SCHEDULING[settings.scheduling])


def container_settings(environ: Mapping[str, str], **overrides: str) -> BalancerSettings:
    """The settings the balancer image renders with: CONTAINER_DEFAULTS under `environ`."""
    defaults = {env_name(name): value for name, value in CONTAINER_DEFAULTS.items()}
    return BalancerSettings.from_env({**defaults, **environ}, **overrides)


def size_bytes(size: str) -> int:
    """An nginx size ("1m", "512k", "4096") in bytes."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    size = size.strip().lower()
    return int(size[:-1]) * units[size[-1]] if size[-1:] in units else int(size)


ACCESS_LOG_BUFFER = re.compile(ACCESS_LOG_BUFFER_PATTERN)
_FLUSH_UNITS_S = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0}


def access_log_flush_s(settings: BalancerSettings) -> float:
    """The longest a request's access-log line waits in nginx's buffer (0: unbuffered)."""
    match = ACCESS_LOG_BUFFER.fullmatch(settings.access_log_buffer)
    return int(match.group(1)) * _FLUSH_UNITS_S[match.group(2) or ""] if match else 0.0


def access_log_settle_s(environ: Mapping[str, str] | None = None) -> float:
    """How long after an answer its access-log line is surely in the file, for a balancer
    configured by `environ` (default: this process's environment): the flush time, and a
    margin for nginx's timer and the write."""
    return access_log_flush_s(BalancerSettings.from_env(os.environ if environ is None else environ)) + 0.15


L1_MAX_BODY_LIMIT = 12288  # the cache key holds the body and must fit in proxy_buffer_size (16k)


def at_most_regex(limit: int) -> str:
    """A regex matching the decimal integers 0..limit (for nginx's map on $content_length)."""
    digits = str(limit)
    parts = [f"[0-9]{{1,{len(digits) - 1}}}"] if len(digits) > 1 else []
    for i, digit in enumerate(digits):
        lower, rest = int(digit) - 1, len(digits) - i - 1
        if i == 0 and len(digits) > 1:
            below = f"[1-{lower}]" if lower >= 2 else "1" if lower == 1 else ""
        else:
            below = f"[0-{lower}]" if lower >= 1 else "0" if lower == 0 else ""
        if below:
            parts.append(digits[:i] + below + (f"[0-9]{{{rest}}}" if rest else ""))
    return "^(" + "|".join([*parts, digits]) + ")$"


def check_kinds(settings: BalancerSettings) -> None:
    """RenderError unless every setting's value is of its kind (before it reaches nginx.conf)."""
    for f in fields(settings):
        kind, value = KINDS[f.metadata["kind"]], getattr(settings, f.name)
        if value == "" and kind.empty:
            continue
        if not re.fullmatch(kind.pattern, value):
            raise RenderError(f"{env_name(f.name)} must be {kind.description}, got {value[:60]!r}")


def worker_rlimit_nofile(settings: BalancerSettings) -> int:
    """Open files each nginx worker may hold: two per connection, and 1024 for the rest."""
    return 2 * int(settings.worker_connections) + 1024


def env_name(field_name: str) -> str:
    """BALANCER_<FIELD>."""
    return f"BALANCER_{field_name.upper()}"


def _networks(value: str, what: str) -> list[str]:
    networks = value.split()
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise RenderError(f"{what}: {network!r} is not an address or network") from None
    return networks


def _upstream_lines(settings: BalancerSettings) -> str:
    servers = settings.upstream_servers.split()
    if not servers:
        raise RenderError("BALANCER_UPSTREAM_SERVERS: at least one replica is needed")
    resolve = settings.upstream_resolve.lower() == "on"
    if resolve and not settings.resolver:
        raise RenderError("BALANCER_UPSTREAM_RESOLVE=on needs BALANCER_RESOLVER")
    lines = []
    for server in servers:
        if not re.fullmatch(r"[A-Za-z0-9_.\-\[\]:]+:\d+", server):
            raise RenderError(f"BALANCER_UPSTREAM_SERVERS: {server!r} is not host:port")
        options = f"max_fails={settings.max_fails} fail_timeout={settings.fail_timeout_s}s"
        lines.append(f"server {server} {options}{' resolve' if resolve else ''};")
    return "\n        ".join(lines)


def listen_port(listen: str, what: str) -> str:
    """The port of an nginx `listen` value (`8080`, `127.0.0.1:8080`, `[::]:8080`)."""
    port = listen.rsplit(":", 1)[-1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise RenderError(f"{what}: {listen!r} is not a port or address:port")
    return port


def template_values(settings: BalancerSettings) -> dict[str, str]:
    """Every placeholder's value: the settings plus the lines derived from them."""
    values = {env_name(f.name): getattr(settings, f.name) for f in fields(settings)}
    # The internal listener is told apart by its port ($server_port), so the ports differ.
    internal_port = listen_port(settings.internal_listen, "BALANCER_INTERNAL_LISTEN")
    if internal_port == listen_port(settings.listen, "BALANCER_LISTEN"):
        raise RenderError("BALANCER_INTERNAL_LISTEN needs a port of its own, not BALANCER_LISTEN's")
    values["BALANCER_INTERNAL_PORT"] = internal_port
    exempt = _networks(settings.rate_limit_exempt, "BALANCER_RATE_LIMIT_EXEMPT")
    internal = _networks(settings.internal_networks, "BALANCER_INTERNAL_NETWORKS")
    values["BALANCER_RATE_LIMIT_EXEMPT_GEO"] = " ".join(f"{n} 1;" for n in exempt)
    values["BALANCER_INTERNAL_GEO"] = " ".join(f"{n} 1;" for n in internal)
    values["BALANCER_UPSTREAM_SERVERS"] = _upstream_lines(settings)
    trusted = _networks(settings.real_ip_from, "BALANCER_REAL_IP_FROM")
    values["BALANCER_REAL_IP"] = (
        " ".join(f"set_real_ip_from {n};" for n in trusted)
        + f" real_ip_header {settings.real_ip_header}; real_ip_recursive on;"
        if trusted
        else ""
    )
    proxy_protocol = trusted and settings.real_ip_header == "proxy_protocol"
    values["BALANCER_PUBLIC_LISTEN_OPTIONS"] = " proxy_protocol" if proxy_protocol else ""
    values["BALANCER_RESOLVER"] = (
        f"resolver {settings.resolver} valid={settings.resolver_valid_s}s ipv6=off;" if settings.resolver else ""
    )
    if not re.fullmatch(r"\d+r/[sm]", settings.rate_limit):
        raise RenderError(f"BALANCER_RATE_LIMIT: {settings.rate_limit!r} is not like 200r/s")
    if not settings.conn_per_client.isdigit() or int(settings.conn_per_client) < 1:
        raise RenderError(f"BALANCER_CONN_PER_CLIENT: {settings.conn_per_client!r} is not a positive number")
    scheduling_argv(settings)  # a valid BALANCER_SCHEDULING
    if settings.l1_cache not in ("on", "off"):
        raise RenderError(f"BALANCER_L1_CACHE: {settings.l1_cache!r} is not on or off")
    if not settings.l1_max_body_bytes.isdigit() or int(settings.l1_max_body_bytes) > L1_MAX_BODY_LIMIT:
        raise RenderError(f"BALANCER_L1_MAX_BODY_BYTES: {settings.l1_max_body_bytes!r} is not 0..{L1_MAX_BODY_LIMIT}")
    if settings.access_log_buffer and not ACCESS_LOG_BUFFER.fullmatch(settings.access_log_buffer):
        raise RenderError(
            f"BALANCER_ACCESS_LOG_BUFFER: {settings.access_log_buffer!r} is not like buffer=64k flush=100ms (or empty)"
        )
    values["BALANCER_L1_ZONE"] = "l1" if settings.l1_cache == "on" else "off"
    values["BALANCER_L1_BODY_REGEX"] = at_most_regex(int(settings.l1_max_body_bytes))
    check_kinds(settings)  # after the checks above, which say more about their settings
    values["BALANCER_WORKER_RLIMIT_NOFILE"] = str(worker_rlimit_nofile(settings))
    return values


def substitute(template: str, values: Mapping[str, str]) -> str:
    """Replace ${BALANCER_*} placeholders; any other `$` text is left for nginx."""

    def value_of(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise RenderError(f"template needs {name}, which has no value")
        return values[name]

    return PLACEHOLDER.sub(value_of, template)


def render(settings: BalancerSettings, template: Path = TEMPLATE) -> str:
    """The nginx.conf for these settings."""
    return substitute(template.read_text(encoding="utf-8"), template_values(settings))


_ENVSH_HEAD = """\
#!/bin/sh
# GENERATED by `python -m balancer.render --envsh > {path}`
# from balancer/render.py: change that file, not this one.
#
# The nginx image's /docker-entrypoint.sh sources this (only because it is executable)
# before 20-envsubst-on-templates.sh renders the template: every BALANCER_* setting gets
# render.py's default (CONTAINER_DEFAULTS in a container), then the placeholders that
# render.py derives are computed the same way. tests/unit/test_containers.py runs the
# image's real entrypoint chain over this file and compares the result with render.py's.

"""

# Each setting checked against its kind's characters (render.py's KINDS), before any is used.
_ENVSH_CHECKS = """
balancer_fail() {
    echo "15-balancer-settings.envsh: $1 must be $2, got '$3'" >&2
    exit 1
}
# balancer_kind NAME ALLOWED-CHARACTERS EMPTY-ALLOWED(0|1) DESCRIPTION
balancer_kind() {
    eval "value=\\$$1"
    if [ -z "$value" ]; then
        [ "$3" = 1 ] || balancer_fail "$1" "$4" "$value"
        return 0
    fi
    case "$value" in
        *[!$2]*) balancer_fail "$1" "$4" "$value" ;;
    esac
}
# balancer_choice NAME DESCRIPTION CHOICE...
balancer_choice() {
    name=$1 description=$2
    eval "value=\\$$1"
    shift 2
    for choice in "$@"; do
        [ "$value" = "$choice" ] && return 0
    done
    balancer_fail "$name" "$description" "$value"
}
"""

# The shell twin of template_values(); render.py validates more, nginx -t the rest.
_ENVSH_DERIVED = """
balancer_geo() {
    entries=""
    for network in $1; do
        entries="${entries:+$entries }$network 1;"
    done
    printf '%s' "$entries"
}

balancer_upstream() {
    resolve=""
    [ "$BALANCER_UPSTREAM_RESOLVE" = "on" ] && resolve=" resolve"
    lines=""
    for server in $BALANCER_UPSTREAM_SERVERS; do
        line="server $server max_fails=$BALANCER_MAX_FAILS fail_timeout=${BALANCER_FAIL_TIMEOUT_S}s$resolve;"
        lines="${lines:+$lines
        }$line"
    done
    printf '%s' "$lines"
}

BALANCER_INTERNAL_PORT="${BALANCER_INTERNAL_LISTEN##*:}"
if [ "$BALANCER_INTERNAL_PORT" = "${BALANCER_LISTEN##*:}" ]; then
    echo "15-balancer-settings.envsh: BALANCER_INTERNAL_LISTEN needs a port of its own, not BALANCER_LISTEN's" >&2
    exit 1
fi
if [ "$BALANCER_UPSTREAM_RESOLVE" = "on" ] && [ -z "$BALANCER_RESOLVER" ]; then
    echo "15-balancer-settings.envsh: BALANCER_UPSTREAM_RESOLVE=on needs BALANCER_RESOLVER" >&2
    exit 1
fi
# The integers 0..$1 as a regex (render.py's at_most_regex).
balancer_at_most() {
    n=$1 len=${#1} parts="" prefix="" i=0
    [ "$len" -gt 1 ] && parts="[0-9]{1,$((len - 1))}"
    while [ "$i" -lt "$len" ]; do
        d=$(printf '%s' "$n" | cut -c$((i + 1)))
        lower=$((d - 1)) rest=$((len - i - 1)) below=""
        if [ "$i" -eq 0 ] && [ "$len" -gt 1 ]; then
            if [ "$lower" -ge 2 ]; then below="[1-$lower]"; elif [ "$lower" -eq 1 ]; then below="1"; fi
        else
            if [ "$lower" -ge 1 ]; then below="[0-$lower]"; elif [ "$lower" -eq 0 ]; then below="0"; fi
        fi
        if [ -n "$below" ]; then
            tail=""
            [ "$rest" -gt 0 ] && tail="[0-9]{$rest}"
            parts="${parts:+$parts|}$prefix$below$tail"
        fi
        prefix="$prefix$d" i=$((i + 1))
    done
    printf '^(%s)$' "${parts:+$parts|}$n"
}

case "$BALANCER_L1_CACHE" in
    on) BALANCER_L1_ZONE=l1 ;;
    off) BALANCER_L1_ZONE=off ;;
    *) echo "15-balancer-settings.envsh: BALANCER_L1_CACHE must be on or off" >&2; exit 1 ;;
esac
case "$BALANCER_L1_MAX_BODY_BYTES" in
    ''|*[!0-9]*) echo "15-balancer-settings.envsh: BALANCER_L1_MAX_BODY_BYTES must be a number" >&2; exit 1 ;;
esac
if [ "$BALANCER_L1_MAX_BODY_BYTES" -gt {L1_MAX_BODY_LIMIT} ]; then
    echo "15-balancer-settings.envsh: BALANCER_L1_MAX_BODY_BYTES must be at most {L1_MAX_BODY_LIMIT}" >&2
    exit 1
fi
BALANCER_L1_BODY_REGEX="$(balancer_at_most "$BALANCER_L1_MAX_BODY_BYTES")"
BALANCER_WORKER_RLIMIT_NOFILE=$((2 * BALANCER_WORKER_CONNECTIONS + 1024))
BALANCER_RATE_LIMIT_EXEMPT_GEO="$(balancer_geo "$BALANCER_RATE_LIMIT_EXEMPT")"
BALANCER_INTERNAL_GEO="$(balancer_geo "$BALANCER_INTERNAL_NETWORKS")"
BALANCER_UPSTREAM_SERVERS="$(balancer_upstream)"
BALANCER_REAL_IP="" BALANCER_PUBLIC_LISTEN_OPTIONS=""
if [ -n "$BALANCER_REAL_IP_FROM" ]; then
    for network in $BALANCER_REAL_IP_FROM; do
        BALANCER_REAL_IP="${BALANCER_REAL_IP:+$BALANCER_REAL_IP }set_real_ip_from $network;"
    done
    BALANCER_REAL_IP="$BALANCER_REAL_IP real_ip_header $BALANCER_REAL_IP_HEADER; real_ip_recursive on;"
    [ "$BALANCER_REAL_IP_HEADER" = "proxy_protocol" ] && BALANCER_PUBLIC_LISTEN_OPTIONS=" proxy_protocol"
fi
if [ -n "$BALANCER_RESOLVER" ]; then
    BALANCER_RESOLVER="resolver $BALANCER_RESOLVER valid=${BALANCER_RESOLVER_VALID_S}s ipv6=off;"
fi
export BALANCER_INTERNAL_PORT BALANCER_RATE_LIMIT_EXEMPT_GEO BALANCER_INTERNAL_GEO BALANCER_UPSTREAM_SERVERS \\
    BALANCER_RESOLVER BALANCER_L1_ZONE BALANCER_L1_BODY_REGEX BALANCER_REAL_IP BALANCER_PUBLIC_LISTEN_OPTIONS \\
    BALANCER_WORKER_RLIMIT_NOFILE
mkdir -p "$BALANCER_TEMP_DIR" "$(dirname "$BALANCER_PID_FILE")"
# The entrypoint sources this in a subshell of its pipeline, where $$ is still the shell
# that then execs nginx: the policy set on it passes to nginx's master and its workers.
case "$BALANCER_SCHEDULING" in
    batch)
        if ! chrt -b -p 0 $$ >/dev/null 2>&1; then
            echo "15-balancer-settings.envsh: could not set SCHED_BATCH (chrt); nginx runs under the normal policy" >&2
        fi
        ;;
    normal) ;;
    *) echo "15-balancer-settings.envsh: BALANCER_SCHEDULING must be batch or normal" >&2; exit 1 ;;
esac
"""


def envsh() -> str:
    """The balancer image's entrypoint script: render.py's defaults and derivations in sh."""
    defaults = {f.name: f.default for f in fields(BalancerSettings)} | CONTAINER_DEFAULTS
    lines = []
    for name, default in defaults.items():
        if re.search(r'["$`\\}]', str(default)):
            raise RenderError(f"{env_name(name)}: default {default!r} cannot be written in sh")
        lines.append(f'export {env_name(name)}="${{{env_name(name)}-{default}}}"')
    checks = []
    for f in fields(BalancerSettings):
        kind, name = KINDS[f.metadata["kind"]], env_name(f.name)
        if kind.choices:
            checks.append(f'balancer_choice {name} "{kind.description}" {" ".join(kind.choices)}')
        else:
            checks.append(f'balancer_kind {name} "{kind.chars}" {int(kind.empty)} "{kind.description}"')
    path = ENVSH.relative_to(ENVSH.parent.parent.parent)
    derived = _ENVSH_DERIVED.replace("{L1_MAX_BODY_LIMIT}", str(L1_MAX_BODY_LIMIT))
    return _ENVSH_HEAD.format(path=path) + "\n".join(lines) + "\n" + _ENVSH_CHECKS + "\n".join(checks) + "\n" + derived


def settings_table() -> str:
    """Markdown table of every BALANCER_* setting, for docs/settings.md."""
    rows = ["| variable | default | kind | meaning |", "|---|---|---|---|"]
    for f in fields(BalancerSettings):
        default = f"`{f.default}`" if f.default else "(empty)"
        rows.append(
            f"| `{env_name(f.name)}` | {default} | {KINDS[f.metadata['kind']].description} | {f.metadata['doc']} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the rendered configuration (or the settings table)."""
    parser = argparse.ArgumentParser(description="Render the balancer's nginx.conf from BALANCER_* settings.")
    parser.add_argument("--replicas", help="comma-separated host:port list (overrides BALANCER_UPSTREAM_SERVERS)")
    parser.add_argument("--table", action="store_true", help="print the settings table (docs/settings.md)")
    parser.add_argument("--envsh", action="store_true", help=f"print the image's {ENVSH.name}")
    args = parser.parse_args(argv)
    if args.table:
        print(settings_table())
        return 0
    if args.envsh:
        sys.stdout.write(envsh())
        return 0
    overrides = {"upstream_servers": args.replicas.replace(",", " ")} if args.replicas else {}
    try:
        sys.stdout.write(render(BalancerSettings.from_env(**overrides)))
    except RenderError as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
