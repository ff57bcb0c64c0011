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
from dataclasses import fields
from pathlib import Path

from balancer.envsh import ENVSH, envsh
from balancer.settings import (
    ACCESS_LOG_BUFFER_PATTERN,
    L1_MAX_BODY_LIMIT,
    BalancerSettings,
    RenderError,
    check_kinds,
    env_name,
    settings_table,
)

TEMPLATE = Path(__file__).resolve().parent / "nginx.conf.template"
PLACEHOLDER = re.compile(r"\$\{(BALANCER_[A-Z0-9_]+)\}")


# BALANCER_SCHEDULING: what starts nginx under the policy (util-linux's chrt, and busybox's
# in the alpine image; the policy passes from nginx's master to its workers).
SCHEDULING = {"batch": ["chrt", "--batch", "0"], "normal": []}


def scheduling_argv(settings: BalancerSettings) -> list[str]:
    """The command prefix that starts nginx under settings.scheduling."""
    if settings.scheduling not in SCHEDULING:
        raise RenderError(f"BALANCER_SCHEDULING: {settings.scheduling!r} is not batch or normal")
    return list(SCHEDULING[settings.scheduling])


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


def worker_rlimit_nofile(settings: BalancerSettings) -> int:
    """Open files each nginx worker may hold: two per connection, and 1024 for the rest."""
    return 2 * int(settings.worker_connections) + 1024


def _networks(value: str, what: str) -> list[str]:
    networks = value.split()
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise RenderError(f"{what}: {network!r} is not an address or network") from None
    return networks


RESOLV_CONF = Path("/etc/resolv.conf")


def local_resolvers(resolv_conf: Path | None = None) -> str:
    """The nameservers this host or container uses (its resolv.conf), as nginx's `resolver`
    takes them: IPv6 in brackets; link-local ones with a zone (`%eth0`) left out."""
    try:
        lines = (resolv_conf or RESOLV_CONF).read_text().splitlines()
    except OSError:
        return ""
    servers = [words[1] for words in map(str.split, lines) if words[:1] == ["nameserver"] and len(words) > 1]
    return " ".join(f"[{s}]" if ":" in s else s for s in servers if "%" not in s)


def resolver(settings: BalancerSettings) -> str:
    """BALANCER_RESOLVER, or with `resolve` on and none set, the local resolvers: on
    Kubernetes the pod's DNS (kube-dns, NodeLocal DNSCache's 169.254.20.10, GKE's
    169.254.169.254), under Docker its embedded DNS, under podman the network's."""
    if settings.resolver or settings.upstream_resolve.lower() != "on":
        return settings.resolver
    return local_resolvers()


def _upstream_lines(settings: BalancerSettings, resolvers: str) -> str:
    servers = settings.upstream_servers.split()
    if not servers:
        raise RenderError("BALANCER_UPSTREAM_SERVERS: at least one replica is needed")
    resolve = settings.upstream_resolve.lower() == "on"
    if resolve and not resolvers:
        raise RenderError("BALANCER_UPSTREAM_RESOLVE=on needs BALANCER_RESOLVER (/etc/resolv.conf names no nameserver)")
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
    resolvers = resolver(settings)  # reads resolv.conf once
    values["BALANCER_UPSTREAM_SERVERS"] = _upstream_lines(settings, resolvers)
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
        f"resolver {resolvers} valid={settings.resolver_valid_s}s ipv6=off;" if resolvers else ""
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
