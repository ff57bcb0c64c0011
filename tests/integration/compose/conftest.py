"""The real compose stack, end to end: `docker compose -f docker-compose.scale.yml` builds
the images, starts redis, 4 api replicas and the balancer on whatever engine this machine
has (Docker, or podman through its Docker API), and is loaded only on loopback through
the published port. Numbers are printed as `COMPOSE {...}` lines.

    COMPOSE_E2E=required scripts/test -m compose -s    # run alone, fail if no engine

See tests/containers.py (ComposeEngine) for the settings; `.ci/run` sets them for the
podman lab on machines without Docker.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from localcluster.ports import free_port
from tests.integration.compose.stack import ACCESS_LOG, PROFILES, PROJECT, report
from tests.support import ROOT
from tests.support.containers import ComposeEngine, ComposeStack


@pytest.fixture(scope="package")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    """Build and start the stack with 4 api replicas; always `down` it afterwards."""
    mode = os.environ.get("COMPOSE_E2E", "auto")
    if mode == "skip":
        pytest.skip("COMPOSE_E2E=skip")
    engine, why_not = ComposeEngine.find()
    if engine is None:
        if mode == "required":
            pytest.fail(f"COMPOSE_E2E=required but {why_not}")
        pytest.skip(f"{why_not}; COMPOSE_E2E=required makes this a failure (.ci/run sets it)")
    log_dir = tmp_path_factory.mktemp("compose")
    reports_dir = f"compose-e2e-{os.getpid()}"
    env = {
        **os.environ,
        "BALANCER_HOST_PORT": str(free_port()),
        "LOCUST_WEB_PORT": str(free_port()),
        "BALANCER_ACCESS_LOG": ACCESS_LOG,
        "LOADTEST_USER": f"{os.getuid()}:{os.getgid()}",
        "REPORTS_SUBDIR": reports_dir,
        # The checks follow one body to the replicas; the L1 has its own check (near the end).
        "BALANCER_L1_CACHE": "off",
        # The defaults (`auto`) keep the demo models' ONNX predicts out of Redis; the checks
        # of the result cache (its password, the Redis Cluster profile: iris rows counted,
        # digits rows to see each replica reach it) need models that use it, as a user asks
        # for it: iris and digits on, churn as the defaults.
        "API_CACHE_POLICY": "iris=on,digits=on,*=auto",
    }
    stack = ComposeStack(engine, PROJECT, env, log_dir)
    stack.url = f"http://127.0.0.1:{env['BALANCER_HOST_PORT']}"
    stack.reports_dir = ROOT / "reports" / reports_dir
    driver = None
    if os.environ.get("COMPOSE_E2E_HEALTHCHECK_DRIVER"):
        driver = subprocess.Popen(
            ["sh", "-c", os.environ["COMPOSE_E2E_HEALTHCHECK_DRIVER"]],
            stdout=(log_dir / "healthcheck-driver.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    failed_before = 0
    try:
        stack.compose(*PROFILES, "down", "-v", "--remove-orphans", check=False)  # a previous run's
        started = time.monotonic()
        stack.compose("--profile", "loadtest", "build", timeout=1800)
        report("images built", seconds=round(time.monotonic() - started, 1))
        started = time.monotonic()
        up = stack.compose("up", "-d", "--scale", "api=4", "--wait", "--wait-timeout", "300", timeout=600)
        stack.up_output = up.stdout + up.stderr
        report("stack up and healthy", seconds=round(time.monotonic() - started, 1))
        failed_before = request.session.testsfailed
        yield stack
    finally:
        if request.session.testsfailed > failed_before or not hasattr(stack, "up_output"):
            logs = stack.compose(*PROFILES, "logs", "--no-color", "--tail", "60", check=False)
            print(f"\n----- compose logs -----\n{logs.stdout[-12000:]}\n{logs.stderr[-2000:]}")
        stack.compose(*PROFILES, "down", "-v", "--remove-orphans", check=False)
        shutil.rmtree(ROOT / "reports" / reports_dir, ignore_errors=True)
        if driver is not None:
            os.killpg(driver.pid, signal.SIGTERM)
            driver.wait(timeout=30)
