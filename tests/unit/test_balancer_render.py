"""The balancer template: rendering is a tested function, and nginx accepts every variant."""

from __future__ import annotations

import re
import subprocess
from dataclasses import fields

import pytest

from balancer.render import PLACEHOLDER, TEMPLATE, access_log_flush_s, render, substitute
from balancer.settings import KINDS, BalancerSettings, RenderError, env_name
from localcluster.processes import ClusterError
from tests.support import system_tool

NGINX = system_tool("nginx")


def local(tmp_path, **overrides: str) -> BalancerSettings:
    return BalancerSettings.from_env(
        {},
        pid_file=str(tmp_path / "nginx.pid"),
        error_log=str(tmp_path / "error.log"),
        access_log=str(tmp_path / "access.log"),
        temp_dir=str(tmp_path),
        **overrides,
    )


def test_every_placeholder_is_filled_and_nginx_variables_survive(tmp_path):
    text = render(local(tmp_path, upstream_servers="127.0.0.1:8001 127.0.0.1:8002"))
    assert not PLACEHOLDER.search(text)
    for nginx_variable in ("$request_id", "$binary_remote_addr", "$upstream_addr", "$req_id"):
        assert nginx_variable in text
    assert "server 127.0.0.1:8001 max_fails=2 fail_timeout=5s;" in text
    assert "server 127.0.0.1:8002 max_fails=2 fail_timeout=5s;" in text
    # One trust rule in every mode: no source network is trusted by default, locally too.
    assert "127.0.0.0/8 1;" not in text and re.search(r"geo \$internal_network \{\s*default 0;\s*\}", text)
    exempt = render(local(tmp_path, rate_limit_exempt="127.0.0.0/8 ::1/128"))
    assert "127.0.0.0/8 1; ::1/128 1;" in exempt
    assert "non_idempotent" in text and "keepalive_timeout 60s;" in text


def test_settings_come_from_the_environment():
    settings = BalancerSettings.from_env({"BALANCER_RATE_LIMIT": "9r/s", "OTHER": "x"})
    assert settings.rate_limit == "9r/s"


def test_resolve_variant_for_compose(tmp_path):
    text = render(local(tmp_path, upstream_servers="api:8000", upstream_resolve="on", resolver="127.0.0.11"))
    assert "server api:8000 max_fails=2 fail_timeout=5s resolve;" in text
    assert "resolver 127.0.0.11 valid=5s ipv6=off;" in text


def test_resolve_without_a_resolver_asks_the_nameservers_the_container_uses(tmp_path, monkeypatch):
    """A Kubernetes pod's DNS may be kube-dns, NodeLocal DNSCache (169.254.20.10) or GKE's
    Cloud DNS (169.254.169.254): the pod's resolv.conf says which, a fixed name cannot."""
    import balancer.render

    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search prediction.svc.cluster.local\nnameserver 169.254.20.10\nnameserver fd00::a\n")
    monkeypatch.setattr(balancer.render, "RESOLV_CONF", resolv)
    text = render(local(tmp_path, upstream_servers="api:8000", upstream_resolve="on"))
    assert "resolver 169.254.20.10 [fd00::a] valid=5s ipv6=off;" in text
    # Set, it wins; without `resolve` there is no resolver.
    assert "resolver 10.0.0.10 valid=5s" in render(
        local(tmp_path, upstream_servers="api:8000", upstream_resolve="on", resolver="10.0.0.10")
    )
    assert "resolver " not in render(local(tmp_path))
    resolv.write_text("search nowhere\n")
    with pytest.raises(RenderError, match="needs BALANCER_RESOLVER"):
        render(local(tmp_path, upstream_servers="api:8000", upstream_resolve="on"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"upstream_servers": ""}, "at least one replica"),
        ({"upstream_servers": "no-port"}, "not host:port"),
        ({"rate_limit_exempt": "10.0.0.0/33"}, "not an address"),
        ({"rate_limit": "fast"}, "not like 200r/s"),
        ({"access_log_buffer": "buffer=64k"}, "not like buffer=64k flush=100ms"),
        ({"access_log_buffer": "64k"}, "not like buffer=64k flush=100ms"),
        ({"scheduling": "fifo"}, "not batch or normal"),
    ],
)
def test_bad_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(RenderError, match=message):
        render(local(tmp_path, **overrides))


def test_a_placeholder_without_a_value_is_an_error():
    with pytest.raises(RenderError, match="BALANCER_NOPE"):
        substitute("listen ${BALANCER_NOPE}; $host", {})


def test_template_uses_only_known_placeholders(tmp_path):
    names = set(PLACEHOLDER.findall(TEMPLATE.read_text()))
    assert names, "the template has placeholders"
    render(local(tmp_path))  # would raise on any unknown one


VARIANTS = {
    "one replica": {},
    "eight replicas": {"upstream_servers": " ".join(f"127.0.0.1:{8001 + i}" for i in range(8))},
    "loopback exempt": {"rate_limit_exempt": "127.0.0.0/8 ::1/128", "internal_networks": "127.0.0.1/32"},
    "tuned": {"rate_limit": "50r/m", "rate_limit_burst": "1", "max_body_size": "64k", "worker_processes": "1"},
    "unbuffered access log": {"access_log_buffer": ""},
    "behind proxies": {"real_ip_from": "10.0.0.0/8 192.168.1.1", "real_ip_header": "X-Real-IP"},
    "behind a PROXY-protocol balancer": {"real_ip_from": "10.0.0.0/8", "real_ip_header": "proxy_protocol"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_nginx_accepts_every_local_variant(tmp_path, variant):
    conf = tmp_path / "nginx.conf"
    conf.write_text(render(local(tmp_path, **VARIANTS[variant])))
    result = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_nginx_sizes_in_bytes():
    from balancer.render import size_bytes

    assert [size_bytes(s) for s in ("1m", "512k", "4096", "2G")] == [1048576, 524288, 4096, 2 * 1024**3]


@pytest.mark.parametrize("limit", [0, 7, 10, 99, 100, 1000, 4096, 12288])
def test_the_l1_body_limit_regex_matches_exactly_0_to_the_limit_in_python_and_in_sh(limit):
    import re
    import subprocess

    from balancer.envsh import ENVSH
    from balancer.render import at_most_regex

    pattern = re.compile(at_most_regex(limit))
    assert all(pattern.match(str(n)) for n in range(limit + 1))
    assert not any(pattern.match(str(n)) for n in range(limit + 1, 10 * limit + 20))
    script = ENVSH.read_text()
    function = script[script.index("balancer_at_most() {") : script.index("\n}\n", script.index("balancer_at_most"))]
    shell = subprocess.run(
        ["sh", "-c", f'{function}\n}}\nbalancer_at_most "$1"', "sh", str(limit)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout == at_most_regex(limit)


def test_the_l1_can_be_turned_off_and_refuses_bodies_its_key_cannot_hold():
    from balancer.render import render
    from balancer.settings import BalancerSettings, RenderError

    assert "proxy_cache off;" in render(BalancerSettings(l1_cache="off"))
    assert "proxy_cache l1;" in render(BalancerSettings())
    with pytest.raises(RenderError, match="BALANCER_L1_MAX_BODY_BYTES"):
        render(BalancerSettings(l1_max_body_bytes="20000"))


def test_the_access_log_is_buffered_with_a_bounded_delay(tmp_path):
    text = render(local(tmp_path))
    # One write per block of lines, never more than the flush time late.
    assert f"access_log {tmp_path / 'access.log'} json_lines buffer=64k flush=100ms;" in text
    assert access_log_flush_s(local(tmp_path)) == 0.1
    assert access_log_flush_s(local(tmp_path, access_log_buffer="buffer=32k flush=2s")) == 2.0
    unbuffered = render(local(tmp_path, access_log_buffer=""))
    assert re.search(r"access_log \S+ json_lines\s*;", unbuffered)
    assert access_log_flush_s(local(tmp_path, access_log_buffer="")) == 0.0


def test_the_local_cluster_runs_two_nginx_workers_and_a_quarter_of_many_cores():
    from localcluster.balancer import default_worker_processes

    # One worker would cap the L1 at one core while the replicas idle.
    assert [default_worker_processes(c) for c in (1, 2, 4, 8, 12, 32)] == [1, 2, 2, 2, 3, 8]


def test_a_location_with_error_pages_of_its_own_answers_every_status_the_server_does(tmp_path):
    """error_page in a location replaces the server's whole list: a status added to the
    server's and forgotten in such a location would be nginx's HTML page there."""
    text = render(local(tmp_path))
    server = text.split("\n    server {", 1)[1].split("\n    server {", 1)[0]

    def statuses(block: str) -> set[str]:
        return {s for line in re.findall(r"^\s*error_page ([^;]+);", block, re.M) for s in line.split() if s.isdigit()}

    top_level = statuses("\n".join(line for line in server.splitlines() if re.match(r"^ {8}error_page", line)))
    assert {"400", "429", "500", "502", "504"} <= top_level
    locations = re.findall(r"^ {8}location [^@{][^{]*\{(.*?)^ {8}\}", server, re.M | re.S)
    own = [block for block in locations if "error_page" in block]  # not the named ones: last resorts
    assert len(own) >= 2, "the model repository's and the L1's"
    for block in own:
        assert statuses(block).issuperset(top_level), block


def test_nginx_starts_under_the_scheduling_policy_it_is_given(tmp_path):
    from localcluster.balancer import LocalBalancer

    def argv(**environ: str) -> list[str]:
        return LocalBalancer(tmp_path, environ, "/usr/sbin/nginx").argv()

    assert argv()[:4] == ["chrt", "--batch", "0", "/usr/sbin/nginx"], "batch by default"
    assert argv(BALANCER_SCHEDULING="normal")[0] == "/usr/sbin/nginx"
    with pytest.raises(ClusterError, match="not batch or normal"):
        argv(BALANCER_SCHEDULING="rr")


@pytest.mark.parametrize("name", [f.name for f in fields(BalancerSettings)])
def test_every_setting_has_a_kind_and_a_value_carrying_directives_is_refused(name):
    """BALANCER_GZIP_MIN_LENGTH='1024; server { listen 9099; ... }' rendered a second server."""
    assert fields_by_name()[name].metadata["kind"] in KINDS
    default = getattr(BalancerSettings(), name)
    for injected in ("; server { listen 9099; }", "}", "# comment", "'x'", "$host", "\nerror_log x;"):
        with pytest.raises(RenderError, match=env_name(name)):
            render(BalancerSettings(**{name: (default or "1") + injected}))


def fields_by_name() -> dict:
    return {f.name: f for f in fields(BalancerSettings)}
