"""What the compose tests share: the project's name, the stack's settings, and how to read
the balancer's access log, post to the stack and print the run's numbers."""

from __future__ import annotations

import json
import time

import requests

from balancer.settings import container_settings
from tests.support.access_log import ACCESS_LOG_SETTLE_S
from tests.support.containers import ComposeStack

PROJECT = "prediction-cluster-e2e"
# The image's default, which docker-compose.scale.yml keeps.
RESOLVER_VALID_S = int(container_settings({}).resolver_valid_s)
FAIL_TIMEOUT_S = int(container_settings({}).fail_timeout_s)
ACCESS_LOG = "/tmp/nginx/access.log"
ROW = {"instances": [[5.1, 3.5, 1.4, 0.2]]}
# Every optional profile, so that `down` removes whatever a test started.
PROFILES = ("--profile", "loadtest", "--profile", "redis-cluster")


def report(what: str, **numbers: object) -> None:
    """One line of the run's numbers, for the closing note and CI's log."""
    print(f"\nCOMPOSE {json.dumps({'check': what, **numbers})}")


def access_log(stack: ComposeStack) -> list[dict]:
    """The balancer's JSON access log, whole (a file in its tmpfs, not the engine's log), once
    every request answered so far is in it (nginx buffers it)."""
    time.sleep(ACCESS_LOG_SETTLE_S)
    text = stack.compose("exec", "-T", "balancer", "cat", ACCESS_LOG).stdout
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def post(stack: ComposeStack, path: str, body: object, **kwargs: object) -> requests.Response:
    return requests.post(f"{stack.url}{path}", json=body, timeout=30, **kwargs)
