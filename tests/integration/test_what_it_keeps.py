"""What the cluster keeps between requests, tried as an operator would, on a real cluster
in the configuration users run (L1 on, cache policy auto): the operator's decisions
survive a Redis that restarts empty, is flushed or holds an older record; a value in
Redis that no replica wrote is never trusted; a version is its artifact; and no client
receives another's request id from the L1.

Prints one KEEPS line per measurement (requests sent and failed, how long the replicas
took to show the right state again, what `status` said meanwhile, a worker's RSS)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import joblib
import numpy as np
import pytest
import redis
import requests
from sklearn.dummy import DummyClassifier

from localcluster.processes import children
from service.models.artifacts import sha256_of
from tests.support import wait_until
from tests.support.load import PacedLoad
from tests.support.repository import copy_model_version, repository_call, repository_status, wait_converged

pytestmark = [pytest.mark.integration, pytest.mark.faults]

ROW = {"instances": [[5.9, 3.0, 5.1, 1.8]]}
REPOSITORY_KEY = "pred:repository"


def _report(step: str, **numbers: object) -> None:
    print(f"\nKEEPS {json.dumps({'step': step, **numbers})}")


def _rewrite_constant(folder: Path, label: int) -> str:
    """Replace the folder's artifact by a model that always answers `label` (same inputs and
    classes), recording its sha256 in model.json as a CI pipeline would; the new sha256."""
    meta = json.loads((folder / "model.json").read_text())
    width, classes = meta["inputs"]["width"], meta["outputs"]["classes"]
    model = DummyClassifier(strategy="constant", constant=label)
    model.fit(np.zeros((len(classes), width)), np.array(classes))
    artifact = folder / meta["artifact"]
    joblib.dump(model, artifact)
    meta["sha256"] = sha256_of(artifact)
    (folder / "model.json").write_text(json.dumps(meta))
    return str(meta["sha256"])


@pytest.fixture(scope="module")
def cluster(start_cluster, models):
    return start_cluster(
        2,
        defaults=True,
        SERVICE_MODELS_DIR=str(models),
        SERVICE_REPOSITORY_POLL_S="0.5",
        BALANCER_INTERNAL_NETWORKS="127.0.0.1/32",
        # The forest's rows are cached (auto would not: through ONNX Runtime a predict costs
        # less than a Redis round trip), so that what Redis holds is read back.
        SERVICE_CACHE_POLICY="digits=on,*=auto",
    )


def _redis(cluster) -> redis.Redis:
    return redis.Redis(port=cluster.status().component("redis").port, password=cluster.redis_password or None)


def _replicas(cluster) -> list[str]:
    return [f"http://127.0.0.1:{c.port}" for c in cluster.status().components if c.kind == "replica"]


def _version_call(cluster, action: str, name: str, version: str) -> int:
    """Load or unload one version through the repository; the generation, once every
    worker serves it."""
    answer = repository_call(cluster, f"/v2/repository/models/{name}/{action}", {"parameters": {"version": version}})
    assert answer.status_code == 200, answer.text
    generation = int(answer.json()["generation"])
    wait_converged(cluster, generation)
    return generation


def _served_versions(cluster, name: str) -> list[list[str]]:
    """The versions each replica serves, asked directly (not through the L1)."""
    return [requests.get(f"{url}/v2/models/{name}", timeout=5).json()["versions"] for url in _replicas(cluster)]


def _restart_redis_empty(cluster) -> None:
    """SIGKILL Redis, start it again on its port with nothing on disk, as a supervisor would."""
    os.kill(cluster.status().component("redis").pid, signal.SIGKILL)
    wait_until(lambda: not cluster.status().component("redis").running, 10, "Redis to die")
    cluster.start(2)  # starts only what is missing: Redis


def _watch_unloaded(cluster, generation: int, what: str, seconds: float = 6.0) -> dict:
    """For `seconds`, no replica may serve iris version 2 again; returns how long the record
    took to hold `generation` again and what status said meanwhile."""
    started, restored_s, said = time.monotonic(), None, set()
    while time.monotonic() - started < seconds or restored_s is None:
        assert time.monotonic() - started < 30, f"{what}: the record never held generation {generation} again"
        served = _served_versions(cluster, "iris")
        assert all(versions == ["1"] for versions in served), f"{what}: an unloaded version came back: {served}"
        status = repository_status(cluster)
        said.add(f"generation {status.get('generation')}, record {status.get('record', {}).get('state')}")
        if restored_s is None and status.get("record", {}).get("generation") == generation:
            restored_s = round(time.monotonic() - started, 2)
        time.sleep(0.2)
    return {"restored_s": restored_s, "status_said": sorted(said)}


def test_an_unloaded_version_stays_unloaded_when_redis_loses_the_record(cluster, models):
    copy_model_version(models, "iris", "2")
    loaded = repository_call(cluster, "/v2/repository/models/iris/load", {"parameters": {"version": "2"}})
    assert loaded.status_code == 200, loaded.text
    # Unloaded at once, perhaps on the replica that has not converged on the load yet.
    generation = _version_call(cluster, "unload", "iris", "2")
    assert _served_versions(cluster, "iris") == [["1"], ["1"]]

    with PacedLoad(cluster.url, rate=100, clients=4, max_seconds=120, body=ROW) as load:
        _restart_redis_empty(cluster)
        restart = _watch_unloaded(cluster, generation, "Redis restarted empty")
    summary = load.summary("Redis restarted empty under load, iris v2 unloaded before")
    _report("Redis restart", sent=summary["sent"], failed=summary["failed"], **restart)
    assert summary["failed"] == {}, summary

    _redis(cluster).flushall()
    _report("FLUSHALL", **_watch_unloaded(cluster, generation, "FLUSHALL"))

    # A failover to a replica that missed the last writes: an older record.
    _redis(cluster).set(REPOSITORY_KEY, json.dumps({"generation": 1, "models": {}}))
    _report("an older record", **_watch_unloaded(cluster, generation, "an older record"))

    # Every replica restarting (Redis keeps the record): they read it before serving.
    cluster.restart()
    assert _served_versions(cluster, "iris") == [["1"], ["1"]]
    wait_converged(cluster, generation)


def test_a_malformed_record_is_refused_and_convergence_goes_on(cluster):
    generation = repository_status(cluster)["generation"]
    store = _redis(cluster)
    for poison in (b"{}", b"not json", json.dumps({"generation": "x", "models": []}).encode()):
        store.set(REPOSITORY_KEY, poison)
        said = repository_status(cluster)
        assert said["generation"] == generation, said
        wait_until(
            lambda: json.loads(store.get(REPOSITORY_KEY) or b"{}").get("generation") == generation,
            10,
            f"the last good record to replace {poison!r}",
        )
        assert _served_versions(cluster, "iris") == [["1"], ["1"]]
    store.delete(REPOSITORY_KEY)
    # Convergence goes on: a change after all that reaches every worker.
    changed = repository_call(cluster, "/v2/repository/models/iris/policy", {"default": "1"})
    assert changed.status_code == 200, changed.text
    assert changed.json()["generation"] > generation
    wait_converged(cluster, changed.json()["generation"])
    restored = repository_call(cluster, "/v2/repository/models/iris/policy", {"default": "latest"})
    assert restored.status_code == 200, restored.text


def test_bytes_no_replica_wrote_are_a_miss_then_overwritten(cluster):
    row = {"instances": [[3.0] * 64]}
    replica = _replicas(cluster)[0]
    first = requests.post(f"{replica}/v1/models/digits:predict", json=row, timeout=10)
    assert first.status_code == 200, first.text
    wait_until(
        lambda: requests.post(f"{replica}/v1/models/digits:predict", json=row, timeout=10).headers["X-Cache"] == "HIT",
        10,
        "the forest's row to be cached",
    )
    store = _redis(cluster)
    keys = [k for k in store.scan_iter("pred:digits:*") if b"repository" not in k]
    assert keys, "the forest's rows are cached in Redis"
    for poison in (b"\x80garbage", b"[1]", b'{"a": 1}', b'["x", [0.5]]', b"[3, null]"):
        for key in keys:
            store.set(key, poison)
        answer = requests.post(f"{replica}/v1/models/digits:predict", json=row, timeout=10)
        assert answer.status_code == 200, (poison, answer.text)
        assert answer.headers["X-Cache"] == "MISS", poison
        assert answer.json()["predictions"] == first.json()["predictions"], poison
        again = requests.post(f"{replica}/v1/models/digits:predict", json=row, timeout=10)
        assert again.headers["X-Cache"] == "HIT", f"the fresh answer overwrote {poison!r}"
    metrics = requests.get(f"{replica}/metrics", timeout=5).text
    counted = [line for line in metrics.splitlines() if line.startswith("prediction_cache_undecodable_total")]
    assert counted and float(counted[0].split()[-1]) >= 5, counted


def test_a_rewritten_version_answers_from_its_new_artifact(cluster, models):
    folder = copy_model_version(models, "digits", "3", serving={"cache_policy": "on"})
    row = [0.0] * 64
    _version_call(cluster, "load", "digits", "3")
    original = {_label(url, "digits", "3", row) for url in _replicas(cluster)}
    assert len(original) == 1
    first_label = 7 if original != {7} else 4

    # Unload, rewrite the folder (same version number, new artifact), load again.
    _version_call(cluster, "unload", "digits", "3")
    _load_rewritten(cluster, folder, first_label, row)

    # Rewritten again while served, then loaded: every worker moves to the new artifact.
    second_label = 2 if first_label != 2 else 5
    _load_rewritten(cluster, folder, second_label, row)
    # Through the balancer too, once the L1's bounded reuse of the old answer has passed.
    wait_until(
        lambda: _label(cluster.url, "digits", "3", row) == second_label,
        15,
        "the balancer to answer from the new artifact",
    )
    _version_call(cluster, "unload", "digits", "3")


def _load_rewritten(cluster, folder: Path, label: int, row: list[float]) -> None:
    """Rewrite digits/3 to answer `label`, load it, and check every replica answers from it."""
    sha = _rewrite_constant(folder, label)
    _version_call(cluster, "load", "digits", "3")
    for url in _replicas(cluster):
        assert _label(url, "digits", "3", row) == label, url
        assert requests.get(f"{url}/v2/models/digits/versions/3", timeout=5).json()["parameters"]["sha256"] == sha


def _label(url: str, name: str, version: str, row: list[float]) -> int:
    """The predicted label of one row from `name` `version` (V2 infer, JSON tensors)."""
    body = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, len(row)], "data": row}]}
    answer = requests.post(f"{url}/v2/models/{name}/versions/{version}/infer", json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    return int(answer.json()["outputs"][0]["data"][0])


def _worker_rss_mb(cluster) -> list[float]:
    """Resident memory of every replica's gunicorn workers, MB."""
    sizes = []
    for replica in (c for c in cluster.status().components if c.kind == "replica"):
        for pid, _ in children(replica.pid):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes.append(int(line.split()[1]) / 1024)
    return sizes


def test_an_unloaded_forest_is_freed(cluster, models):
    copy_model_version(models, "digits", "4")
    samples = []
    for cycle in range(20):
        _version_call(cluster, "load", "digits", "4")
        for url in _replicas(cluster):  # a batcher and a cache decision for it on every worker
            _label(url, "digits", "4", [float(cycle)] * 64)
        _version_call(cluster, "unload", "digits", "4")
        samples.append(_worker_rss_mb(cluster))
    grown = [round(after - before, 1) for before, after in zip(samples[4], samples[-1], strict=True)]
    _report(
        "20 load/unload cycles of the forest",
        rss_mb_after_5=[round(s, 1) for s in samples[4]],
        rss_mb_after_20=[round(s, 1) for s in samples[-1]],
        grown_mb=grown,
    )
    # One forest is about 12 MB on disk and more in memory: keeping each would grow by 15 x that.
    assert max(grown) < 25, grown


def test_the_l1_never_hands_one_clients_id_to_another(cluster):
    body = {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": [6.1, 2.8, 4.7, 1.2]}]}
    answers = []
    for request_id in ("a", "b", "c", "d"):
        answer = requests.post(
            cluster.url + "/v2/models/iris/infer", json=body, timeout=10, headers={"X-Request-ID": request_id}
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Request-ID"] == request_id
        answers.append(answer)
    assert "HIT" in {a.headers.get("X-L1-Cache") for a in answers}, "the L1 answered a repeat"
    for answer in answers:
        assert "id" not in answer.json(), f"a body without an id got one: {answer.json().get('id')}"
    # An id in the request is the request's own: echoed, and a different id is a different key.
    for request_id in ("mine", "yours", "mine"):
        answer = requests.post(cluster.url + "/v2/models/iris/infer", json={**body, "id": request_id}, timeout=10)
        assert answer.json()["id"] == request_id
