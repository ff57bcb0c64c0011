"""REDIS_URL: the topology, nodes and credentials it names, and clear errors for the rest."""

import pytest

from service.redis_url import RedisUrlError, parse_redis_url
from service.settings import Settings, SettingsError


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
