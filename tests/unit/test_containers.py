"""The compose file, Dockerfiles and the balancer image's rendering, checked without Docker."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from balancer.render import TEMPLATE, BalancerSettings, render, substitute
from tests.containers import COMPOSE, DOCKERFILES, compose_variables, image_cmd, image_env
from tests.support import ROOT, VENV_BIN

ENVSH = ROOT / "balancer" / "docker-entrypoint.d" / "15-balancer-settings.envsh"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_validates_against_the_compose_specification():
    result = subprocess.run(
        [str(VENV_BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


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


def test_balancer_resolves_api_through_dockers_dns(compose):
    env = compose["services"]["balancer"]["environment"]
    assert (env["BALANCER_UPSTREAM_SERVERS"], env["BALANCER_UPSTREAM_RESOLVE"]) == ("api:8000", "on")
    assert env["BALANCER_RESOLVER"] == "127.0.0.11"


def test_loadtest_profile(compose):
    services = compose["services"]
    for name in ("locust-master", "locust-worker", "h2load"):
        assert services[name]["profiles"] == ["loadtest"]
        assert "container_name" not in services[name]
    assert "--master" in services["locust-master"]["command"]
    assert "http://balancer:8080" in services["locust-master"]["command"]
    loadtest_subnet = compose["networks"]["loadtest"]["ipam"]["config"][0]["subnet"]
    exempt = services["balancer"]["environment"]["BALANCER_RATE_LIMIT_EXEMPT"]
    assert loadtest_subnet in exempt, "the load generators' own network is exempt from rate limiting"


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


def _envsh_environment(settings: dict[str, str]) -> dict[str, str]:
    script = f". {ENVSH} >/dev/null && env -0"
    result = subprocess.run(
        ["sh", "-c", script], env={"PATH": "/usr/bin:/bin", **settings}, capture_output=True, check=True
    )
    pairs = (item.split("=", 1) for item in result.stdout.decode().split("\0") if "=" in item)
    return {key: value for key, value in pairs if key.startswith("BALANCER_")}


@pytest.mark.parametrize(
    "settings",
    [
        {
            "BALANCER_UPSTREAM_SERVERS": "api:8000",
            "BALANCER_UPSTREAM_RESOLVE": "on",
            "BALANCER_RESOLVER": "127.0.0.11",
            "BALANCER_RATE_LIMIT_EXEMPT": "127.0.0.0/8 172.30.99.0/24",
        },
        {"BALANCER_UPSTREAM_SERVERS": "10.0.0.1:8000 10.0.0.2:8000", "BALANCER_RATE_LIMIT_EXEMPT": ""},
    ],
    ids=["compose", "static"],
)
def test_image_renders_the_same_config_as_render_py(tmp_path, settings):
    settings = {**settings, "BALANCER_TEMP_DIR": str(tmp_path / "tmp")}
    image_env_after_script = _envsh_environment(settings)
    by_image = substitute(TEMPLATE.read_text(), image_env_after_script)
    container_paths = {"pid_file": "/tmp/nginx/nginx.pid", "error_log": "stderr", "access_log": "/dev/stdout"}
    by_python = render(BalancerSettings.from_env(settings, **container_paths))
    assert by_image == by_python
