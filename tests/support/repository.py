"""Model folders on disk, and the operator's model repository routes of a running cluster."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import requests

from tests.support import wait_until


def copy_model_version(
    models: Path, name: str, version: str, *, serving: dict | None = None, tamper: bool = False
) -> Path:
    """<name>/<version> under `models`: a copy of <name>/1 under another version, optionally
    with a `serving` block, or with its artifact changed after the sha256 was recorded."""
    folder = models / name / version
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(models / name / "1", folder)
    meta = json.loads((folder / "model.json").read_text())
    meta["version"] = version
    if serving is not None:
        meta["serving"] = serving
    (folder / "model.json").write_text(json.dumps(meta))
    if tamper:
        with (folder / meta["artifact"]).open("ab") as artifact:
            artifact.write(b"\0")
    return folder


def operator(cluster) -> dict[str, str]:
    """The operator's credential for the model repository routes (the cluster made it)."""
    return cluster.operator_headers


def repository_call(cluster, path: str, body: dict | None = None) -> requests.Response:
    """An operator's call to the model repository, on the balancer's internal listener."""
    return requests.post(cluster.internal_url + path, json=body, headers=operator(cluster), timeout=60)


def repository_status(cluster) -> dict:
    """The model repository's status, as the operator reads it."""
    return requests.get(cluster.internal_url + "/v2/repository/status", headers=operator(cluster), timeout=5).json()


def wait_converged(cluster, generation: int) -> None:
    """Until every worker of every replica (at least two) serves `generation`, as the
    model repository's status says (at most 30 s)."""

    def done() -> bool:
        status = repository_status(cluster)
        return status["converged"] and status["generation"] == generation and len(status["workers"]) >= 2

    wait_until(done, 30, f"every worker to converge on generation {generation}")
