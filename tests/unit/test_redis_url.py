"""REDIS_URL: the topology, nodes and credentials it names, and clear errors for the rest."""

import pytest

from service.settings import Settings, SettingsError
from service.settings.redis_url import RedisUrlError, parse_redis_url, redact_url, with_password


@pytest.mark.parametrize(
    ("url", "topology", "nodes", "service", "db", "password", "tls"),
    [
        ("redis://127.0.0.1:6379/0", "single", (), "", 0, None, False),
        ("rediss://:pw@cache.example:6380/2", "single", (), "", 0, None, True),
        ("unix:///run/redis.sock", "single", (), "", 0, None, False),
        (
            "redis+cluster://10.0.0.1:7000,10.0.0.2:7001",
            "cluster",
            (("10.0.0.1", 7000), ("10.0.0.2", 7001)),
            "",
            0,
            None,
            False,
        ),
        (
            "rediss+cluster://:s%40cret@node-a,node-b:7001",
            "cluster",
            (("node-a", 6379), ("node-b", 7001)),
            "",
            0,
            "s@cret",
            True,
        ),
        (
            "redis+sentinel://:pw@s1:26379,[::1]:26380/prediction/3",
            "sentinel",
            (("s1", 26379), ("::1", 26380)),
            "prediction",
            3,
            "pw",
            False,
        ),
        ("redis+sentinel://s1/mymaster", "sentinel", (("s1", 26379),), "mymaster", 0, None, False),
    ],
)
def test_the_url_names_the_topology_and_its_nodes(url, topology, nodes, service, db, password, tls):
    target = parse_redis_url(url)
    assert (target.topology, target.nodes, target.service_name, target.db) == (topology, nodes, service, db)
    assert (target.password, target.tls) == (password, tls)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("memcached://x:1", "unknown scheme 'memcached'"),
        ("127.0.0.1:6379", "unknown scheme"),
        ("redis+sentinel://s1:26379", "service name"),
        ("redis+sentinel://s1:26379/name/zero", "unexpected path"),
        ("redis+cluster://a:1,b:2/0", "unexpected path"),
        ("redis+cluster://", "no host:port"),
        ("redis+cluster://a:port", "not a number"),
        ("redis+cluster://a:70000", "out of range"),
    ],
)
def test_a_url_that_names_no_topology_says_why_and_gives_the_forms(url, says):
    with pytest.raises(RedisUrlError, match=says):
        parse_redis_url(url)
    with pytest.raises(SettingsError, match="REDIS_URL"):
        Settings.from_env({"REDIS_URL": url})


def test_the_redacted_url_hides_only_the_password():
    assert parse_redis_url("redis+cluster://u:pw@a:1,b:2").redacted == "redis+cluster://u:***@a:1,b:2"
    assert parse_redis_url("redis://a:1/0").redacted == "redis://a:1/0"


SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET}@localhost:6379/zero",
        f"redis+sentinel://user:{SECRET}@s1:26379,s2:26379",
        f"redis+cluster://:{SECRET}@n1:6379,n2:6379/3",
        f"redis+cluster://:{SECRET}@",
        f"redis+sentinel://:{SECRET}@s1:26379/mymaster/db/extra",
        f"memcached://:{SECRET}@host:11211",
        f"redis:/:{SECRET}@host:6379",
        f"redis://host:6379/0?password={SECRET}",
    ],
)
def test_a_password_never_appears_in_an_error_or_a_redacted_url(url):
    try:
        Settings.from_env({"REDIS_URL": url})
    except SettingsError as exc:
        assert SECRET not in str(exc), str(exc)
    try:
        assert SECRET not in parse_redis_url(url).redacted
    except RedisUrlError as exc:
        assert SECRET not in str(exc), str(exc)
    assert SECRET not in redact_url(url)


def test_redaction_keeps_what_an_operator_needs_to_read():
    assert redact_url("redis+sentinel://user:pw@s1:26379,s2:26379/main/0") == (
        "redis+sentinel://user:***@s1:26379,s2:26379/main/0"
    )
    assert redact_url("redis://h:6379/0?password=pw&db=1") == "redis://h:6379/0?password=***&db=1"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://redis:6379/0", "redis://:p%40ss%3Aw%2Fd@redis:6379/0"),
        ("redis://app@redis:6379/0", "redis://app:p%40ss%3Aw%2Fd@redis:6379/0"),
        ("redis+cluster://a:6379,b:6379", "redis+cluster://:p%40ss%3Aw%2Fd@a:6379,b:6379"),
        ("rediss+sentinel://s1:26379,s2:26379/main/0", "rediss+sentinel://:p%40ss%3Aw%2Fd@s1:26379,s2:26379/main/0"),
    ],
)
def test_a_password_from_a_file_goes_into_the_url_every_topology_reads(url, expected):
    assert with_password(url, "p@ss:w/d") == expected
    target = parse_redis_url(expected)
    assert target.topology == "single" or target.password == "p@ss:w/d"


def test_a_url_that_holds_a_password_keeps_it_and_a_unix_socket_takes_none_from_a_file():
    assert with_password("redis://:inline@redis:6379/0", "from-file") == "redis://:inline@redis:6379/0"
    with pytest.raises(RedisUrlError, match="cannot take a password from a file"):
        with_password("unix:///run/redis.sock", "from-file")
