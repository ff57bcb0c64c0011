"""REDIS_URL: which Redis topology the result cache uses, and where.

Pure parsing (no redis import): the settings check it in gunicorn's master, which must
not import redis before the workers' gevent monkey-patching.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

SCHEMES = {
    "redis": "single", "rediss": "single", "unix": "single",
    "redis+sentinel": "sentinel", "rediss+sentinel": "sentinel",
    "redis+cluster": "cluster", "rediss+cluster": "cluster",
}  # fmt: skip


class RedisUrlError(ValueError):
    """REDIS_URL cannot be used; the message says why and what the forms are."""


@dataclass(frozen=True)
class RedisTarget:
    """Where the cache lives, parsed from REDIS_URL."""

    topology: str  # single | sentinel | cluster
    url: str
    nodes: tuple[tuple[str, int], ...] = ()  # sentinels, or cluster startup nodes
    service_name: str = ""  # sentinel: the monitored primary's name
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @property
    def redacted(self) -> str:
        """The URL without its password (logs, reports, status)."""
        return redact_url(self.url)


_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|pass|pwd|auth)=)[^&#]*")


def redact_url(url: str) -> str:
    """`url` with every password it may hold replaced by ***: in the userinfo (whatever the
    scheme, parseable or not) and in the query (`?password=`). For errors, logs, reports."""
    scheme, sep, rest = url.partition("://")
    if not sep and "@" in url:  # not a URL at all: nothing before an @ is shown
        return _QUERY_SECRET.sub(r"\1***", "***@" + url.rpartition("@")[2])
    if sep and "@" in rest:
        userinfo, _, location = rest.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        rest = f"{user}:***@{location}" if colon else f"***@{location}"
    return _QUERY_SECRET.sub(r"\1***", f"{scheme}{sep}{rest}")


URL_FORMS = (
    "redis[s]://[[user]:password@]host:port[/db] (one server), "
    "redis[s]+sentinel://[[user]:password@]host:port[,host:port...]/service-name[/db] (Sentinel), "
    "redis[s]+cluster://[[user]:password@]host:port[,host:port...] (Redis Cluster)"
)


def _host_port(item: str, default_port: int) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [IPv6]:port
        host, _, rest = item[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise RedisUrlError(f"REDIS_URL: {item!r} is not host:port")
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise RedisUrlError(f"REDIS_URL: port {port!r} of {item!r} is not a number") from None
    if not 0 < number < 65536:
        raise RedisUrlError(f"REDIS_URL: port {number} of {item!r} is out of range")
    return host, number


def parse_redis_url(url: str) -> RedisTarget:
    """The topology and nodes REDIS_URL names (RedisUrlError if it names none)."""
    scheme, sep, rest = url.partition("://")
    topology = SCHEMES.get(scheme.lower())
    if not sep or topology is None:
        shown = scheme if sep else "(none)"
        raise RedisUrlError(f"REDIS_URL {redact_url(url)!r}: unknown scheme {shown!r}; the forms are {URL_FORMS}")
    tls = scheme.lower().startswith("rediss")
    if topology == "single":
        return RedisTarget("single", url, tls=tls)
    userinfo, _, location = rest.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    hosts, _, path = location.partition("/")
    path, _, _query = path.partition("?")
    nodes = tuple(_host_port(item, 26379 if topology == "sentinel" else 6379) for item in hosts.split(",") if item)
    if not nodes:
        raise RedisUrlError(f"REDIS_URL {redact_url(url)!r}: no host:port; the forms are {URL_FORMS}")
    parts = [unquoted for unquoted in (urllib.parse.unquote(p) for p in path.split("/")) if unquoted]
    service_name, db = "", 0
    if topology == "sentinel":
        if not parts:
            raise RedisUrlError(
                f"REDIS_URL {redact_url(url)!r}: Sentinel needs the primary's service name: {URL_FORMS}"
            )
        service_name, parts = parts[0], parts[1:]
    if parts:
        if topology == "cluster" or len(parts) > 1 or not parts[0].isdigit():
            raise RedisUrlError(f"REDIS_URL {redact_url(url)!r}: unexpected path {path!r}; the forms are {URL_FORMS}")
        db = int(parts[0])
    return RedisTarget(
        topology,
        url,
        nodes,
        service_name,
        db,
        urllib.parse.unquote(username) or None,
        urllib.parse.unquote(password) or None,
        tls,
    )


def with_password(url: str, password: str) -> str:
    """`url` with `password` in its userinfo (percent-encoded, after the user if it names
    one); a URL that holds a password of its own keeps it. RedisUrlError for a URL that
    cannot take one."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() == "unix":
        shown = redact_url(url)
        raise RedisUrlError(f"REDIS_URL {shown!r} cannot take a password from a file; the forms are {URL_FORMS}")
    userinfo, at, location = rest.rpartition("@")
    user, _, existing = userinfo.partition(":")
    if existing:
        return url
    return f"{scheme}://{user}:{urllib.parse.quote(password, safe='')}@{location if at else rest}"


def with_password_file(url: str, path: str) -> str:
    """`url` with the password the file at `path` holds (a secret: one line); `url` as it is
    without a file or a URL. RedisUrlError naming REDIS_PASSWORD_FILE if it cannot be read."""
    if not path or not url:
        return url
    try:
        password = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise RedisUrlError(f"REDIS_PASSWORD_FILE {path!r} cannot be read ({type(exc).__name__})") from None
    if not password:
        raise RedisUrlError(f"REDIS_PASSWORD_FILE {path!r} is empty")
    return with_password(url, password)
