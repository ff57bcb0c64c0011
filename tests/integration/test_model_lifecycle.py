"""Model versions loaded, split, promoted and unloaded at run time on real replicas,
through the balancer, under a bounded load (scripts/cluster model ... is the same HTTP).

Prints one LIFECYCLE line per step: requests sent, failures, the observed split, how
long every worker took to converge."""

from __future__ import annotations

import collections
import json
import time

import pytest
import requests

from tests.support.load import PacedLoad, SourceAddressAdapter
from tests.support.repository import copy_model_version, repository_call, repository_status, wait_converged

pytestmark = [pytest.mark.integration, pytest.mark.faults]

ROW = {"instances": [[5.9, 3.0, 5.1, 1.8]]}
V2_ROW = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": [5.9, 3.0, 5.1, 1.8]}]}


@pytest.fixture(scope="module")
def cluster(start_cluster, models):
    return start_cluster(
        2,
        SERVICE_MODELS_DIR=str(models),
        SERVICE_REPOSITORY_POLL_S="0.5",
        # 127.0.0.1 is the operator; 127.0.0.2 an outside client on the public listener.
        BALANCER_INTERNAL_NETWORKS="127.0.0.1/32",
        BALANCER_RATE_LIMIT_EXEMPT="127.0.0.1/32",
    )


def _converged(cluster, generation: int, started: float) -> float:
    """Seconds from `started` until every worker of every replica serves `generation`."""
    wait_converged(cluster, generation)
    return time.monotonic() - started


def _report(step: str, **numbers: object) -> None:
    print(f"\nLIFECYCLE {json.dumps({'step': step, **numbers})}")


def test_a_canary_rollout_under_load_fails_nothing(cluster, models):
    copy_model_version(models, "iris", "2")
    with PacedLoad(cluster.url, rate=150, clients=6, max_seconds=240, body=ROW) as load:
        time.sleep(1)
        # Version 2 at 10 %: one call to one replica, every replica follows.
        started = time.monotonic()
        canary = {"parameters": {"version": "2", "weight": 10}}
        answer = repository_call(cluster, "/v2/repository/models/iris/load", canary)
        assert answer.status_code == 200, answer.text
        assert answer.json()["weights"] == {"2": 10, "1": 90}
        converged_s = _converged(cluster, answer.json()["generation"], started)
        _report("load v2 at 10 %", converged_s=round(converged_s, 2))
        window = time.monotonic()
        time.sleep(10)
        split = collections.Counter(r.version for r in load.since(window) if r.ok)
        share = 100 * split["2"] / sum(split.values())
        _report("split", versions=dict(split), v2_percent=round(share, 1))
        assert abs(share - 10) <= 3, split

        # Sticky: a client that sends a routing key sees one version.
        seen = {}
        for key in (f"user-{n}" for n in range(40)):
            versions = {
                requests.post(
                    cluster.url + "/v1/models/iris:predict", json=ROW, timeout=10, headers={"X-Routing-Key": key}
                ).headers["X-Model-Version"]
                for _ in range(5)
            }
            seen[key] = versions
        assert all(len(v) == 1 for v in seen.values()), seen
        assert {next(iter(v)) for v in seen.values()} == {"1", "2"}, "40 keys land on both versions"

        # Version 1 still has traffic: unloading it is refused, nothing changes.
        refused = repository_call(cluster, "/v2/repository/models/iris/unload", {"parameters": {"version": "1"}})
        assert refused.status_code == 409 and "policy" in refused.json()["error"]

        # Promote to 100 %.
        started = time.monotonic()
        answer = repository_call(cluster, "/v2/repository/models/iris/policy", {"weights": {"2": 100}})
        assert answer.status_code == 200, answer.text
        converged_s = _converged(cluster, answer.json()["generation"], started)
        promoted = time.monotonic()
        time.sleep(3)
        after = collections.Counter(r.version for r in load.since(promoted) if r.ok)
        _report("promote v2 to 100 %", converged_s=round(converged_s, 2), versions=dict(after))
        assert set(after) == {"2"}, after

        # Unload version 1: its own paths are a JSON 404 afterwards.
        started = time.monotonic()
        answer = repository_call(cluster, "/v2/repository/models/iris/unload", {"parameters": {"version": "1"}})
        assert answer.status_code == 200 and answer.json()["versions"] == ["2"], answer.text
        converged_s = _converged(cluster, answer.json()["generation"], started)
        time.sleep(2)
    summary = load.summary("canary rollout: load v2 at 10 %, promote, unload v1")
    _report("unload v1", converged_s=round(converged_s, 2), sent=summary["sent"], failed=summary["failed"])
    assert summary["failed"] == {}, summary
    for _ in range(6):  # both replicas, whichever nginx picks
        gone = requests.post(cluster.url + "/v2/models/iris/versions/1/infer", json=V2_ROW, timeout=10)
        assert gone.status_code == 404 and "no version '1'" in gone.json()["error"]
    kept = requests.post(cluster.url + "/v2/models/iris/versions/2/infer", json=V2_ROW, timeout=10)
    assert kept.status_code == 200 and kept.headers["X-Model-Version"] == "2"


def test_a_tampered_version_is_refused_and_changes_nothing(cluster, models):
    copy_model_version(models, "iris", "7", tamper=True)
    before = repository_status(cluster)
    refused = repository_call(cluster, "/v2/repository/models/iris/load", {"parameters": {"version": "7"}})
    assert refused.status_code == 422 and "sha256" in refused.json()["error"], refused.text
    after = repository_status(cluster)
    assert after["generation"] == before["generation"] and after["models"] == before["models"]
    versions = requests.get(cluster.url + "/v2/models/iris", timeout=5).json()["versions"]
    assert "7" not in versions
    index = repository_call(cluster, "/v2/repository/index").json()
    entry = next(r for r in index if (r["name"], r["version"]) == ("iris", "7"))
    assert entry["state"] == "UNAVAILABLE"


def test_a_replica_started_after_the_changes_converges(cluster):
    desired = repository_status(cluster)
    cluster.scale(3)
    try:
        third = cluster.status().component("replica-3")
        direct = f"http://127.0.0.1:{third.port}"
        assert requests.post(direct + "/v1/models/iris:predict", json=ROW, timeout=10).headers["X-Model-Version"] == "2"
        assert requests.post(direct + "/v2/models/iris/versions/1/infer", json=V2_ROW, timeout=10).status_code == 404
        _converged(cluster, desired["generation"], time.monotonic())
    finally:
        cluster.scale(2)


def test_the_repository_routes_are_refused_on_the_published_listener(cluster):
    outside = requests.Session()
    outside.mount("http://", SourceAddressAdapter("127.0.0.2"))
    for path in ("/v2/repository/index", "/v2/repository/models/iris/unload"):
        answer = outside.post(cluster.url + path, json={}, timeout=10)
        assert answer.status_code == 403 and "internal listener" in answer.json()["error"], path
    assert outside.get(cluster.url + "/v2/repository/status", timeout=10).status_code == 403
    assert repository_call(cluster, "/v2/repository/index").status_code == 200
    # On the internal listener too, the routes need the operator's token: none or a wrong
    # one is a JSON 401, and nothing changed.
    before = repository_status(cluster)["generation"]
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        refused = requests.post(cluster.internal_url + "/v2/repository/models/iris/unload", headers=headers, timeout=10)
        assert refused.status_code == 401 and "operator token" in refused.json()["error"], headers
    assert repository_status(cluster)["generation"] == before
    assert requests.post(cluster.url + "/v1/models/iris:predict", json=ROW, timeout=10).status_code == 200
    assert outside.post(cluster.url + "/v1/models/iris:predict", json=ROW, timeout=10).status_code == 200
