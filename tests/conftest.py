"""Shared fixtures: trained models, real servers that print their logs when a test fails."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.servers import Server

MODELS_DIR = ROOT / "models"


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    """Remember each phase's outcome so fixtures can print server logs on failure."""
    if call.when == "call":
        item.stash[FAILED_KEY] = call.excinfo is not None


FAILED_KEY = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The demo models, trained once if absent."""
    if not all((MODELS_DIR / name / "1" / "model.json").exists() for name in ("iris", "digits", "churn")):
        subprocess.run([sys.executable, "scripts/train_models.py"], cwd=ROOT, check=True)
    return MODELS_DIR


def _stop_all(started: list[Server], failed: bool) -> None:
    if failed:
        for server in started:
            print(f"\n----- {server.name} log ({server.log_path}) -----\n{server.log_text()[-6000:]}")
    for server in reversed(started):
        server.stop()


@pytest.fixture
def servers(request: pytest.FixtureRequest) -> Iterator[list[Server]]:
    """Collects servers a test starts; prints their logs if it failed; always stops them."""
    started: list[Server] = []
    yield started
    _stop_all(started, request.node.stash.get(FAILED_KEY, False))


@pytest.fixture(scope="module")
def module_servers(request: pytest.FixtureRequest) -> Iterator[list[Server]]:
    """Like `servers`, shared by a module's tests; logs printed if any of them failed."""
    started: list[Server] = []
    failed_before = request.session.testsfailed
    yield started
    _stop_all(started, request.session.testsfailed > failed_before)
