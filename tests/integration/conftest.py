"""Fixtures of the integration layer: whole local clusters on free ports, through the
same library the CLI and the benchmarks use."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from localcluster import Cluster, ClusterError, Ports
from localcluster.settings import DEFAULT_SLOTS

# The tests follow iris rows through the replicas' cache, so it is on whatever `auto`
# would decide; and they send the same body again and again to see the replicas answer
# it, so nginx's L1 micro-cache (which would answer the repeats) is off. The L1 has its
# own tests, with the default on: tests/integration/test_l1_cache.py.
TEST_ENVIRONMENT = {"SERVICE_CACHE_POLICY": "on", "BALANCER_L1_CACHE": "off"}

StartCluster = Callable[..., Cluster]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """This module's own copy of the demo models folder, for tests that add or rewrite versions."""
    folder = tmp_path_factory.mktemp("models")
    for name in ("iris", "digits", "churn"):
        shutil.copytree(models_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def start_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, models_dir: Path
) -> Iterator[StartCluster]:
    """start_cluster(replicas, **environment) → a running Cluster in its own run directory on
    free ports; every one is stopped after the module, its logs printed if a test failed."""
    started: list[Cluster] = []
    failed_before = request.session.testsfailed

    def start(replicas: int, *, defaults: bool = False, **environment: str) -> Cluster:
        """`defaults`: the configuration users run (L1 on, cache policy auto), not TEST_ENVIRONMENT."""
        chosen = {} if defaults else TEST_ENVIRONMENT
        cluster = Cluster(tmp_path_factory.mktemp("cluster") / "run", {**os.environ, **chosen, **environment})
        started.append(cluster)
        cluster.start(replicas, Ports.auto(DEFAULT_SLOTS))
        return cluster

    yield start
    for cluster in started:
        if request.session.testsfailed > failed_before:
            print(cluster.log_tails())
        try:
            cluster.stop()
        except ClusterError as exc:
            print(f"stopping {cluster.run_dir}: {exc}")
