"""nginx's L1 micro-cache on a real local cluster, with its defaults on: it answers a
repeated prediction itself, and never one request's answer for another's. It stores an
answer from the second request for a key on (BALANCER_L1_MIN_USES=2), so a first
repeat is still a MISS."""

from __future__ import annotations

import gzip
import json
import threading
import time

import pytest
import requests

from balancer.settings import BalancerSettings
from tests.support import wait_until
from tests.support.access_log import access_log
from tests.support.load import SourceAddressAdapter
from tests.support.repository import repository_call, repository_status

pytestmark = pytest.mark.integration

TTL_S = 2
MAX_BODY = int(BalancerSettings().l1_max_body_bytes)
V1 = "/v1/models/iris:predict"


@pytest.fixture(scope="module")
def cluster(start_cluster):
    return start_cluster(
        2,
        BALANCER_L1_CACHE="on",
        BALANCER_L1_TTL_S=str(TTL_S),
        # Long enough for digits' predict under a loaded test machine (the lock test).
        BALANCER_L1_LOCK_TIMEOUT_MS="2000",
        # 127.0.0.1 (these tests) is not limited; 127.0.0.2 is an ordinary client.
        BALANCER_RATE_LIMIT_EXEMPT="127.0.0.1/32",
        BALANCER_RATE_LIMIT="5r/s",
        BALANCER_RATE_LIMIT_BURST="5",
    )


def post(
    cluster, path: str, body: bytes, headers: dict[str, str | None] | None = None, session=None
) -> requests.Response:
    headers = {"Content-Type": "application/json", **(headers or {})}
    return (session or requests).post(f"{cluster.url}{path}", data=body, headers=headers, timeout=30)


def fresh(cluster, path: str, body: bytes, headers: dict[str, str | None] | None = None) -> requests.Response:
    """The replicas' own answer: `Cache-Control: no-cache` passes the L1 by."""
    answer = post(cluster, path, body, {**(headers or {}), "Cache-Control": "no-cache"})
    assert answer.headers["X-L1-Cache"] == "BYPASS"
    return answer


def rows_body(*rows: list[float], pad_to: int = 0) -> bytes:
    body = json.dumps({"instances": list(rows)}).encode()
    return body[:-1] + b" " * max(0, pad_to - len(body)) + b"}"


def log_of(cluster) -> list[dict]:
    return access_log(cluster.run_dir / "logs" / "access.log")


def test_a_repeat_is_answered_by_nginx_with_the_replicas_answer(cluster):
    body = rows_body([5.0, 3.1, 1.5, 0.25])
    first, second, third = (post(cluster, V1, body) for _ in range(3))
    assert [a.headers["X-L1-Cache"] for a in (first, second, third)] == ["MISS", "MISS", "HIT"]
    assert third.content == first.content == fresh(cluster, V1, body).content
    assert third.headers["X-Request-ID"] != second.headers["X-Request-ID"], "each answer has its own request id"


def test_requests_that_differ_in_anything_that_matters_never_share_an_answer(cluster):
    body = rows_body([6.1, 2.9, 4.7, 1.4])
    other_row = rows_body([6.3, 3.3, 6.0, 2.5])
    cases = {
        "the body": (V1, other_row, {}),
        "the V2 route": ("/v2/models/iris/infer", body, {}),
        "no Content-Type": (V1, body, {"Content-Type": None}),
        "a compressed body": (V1, gzip.compress(body), {"Content-Encoding": "gzip"}),
    }
    post(cluster, V1, body), post(cluster, V1, body)
    assert post(cluster, V1, body).headers["X-L1-Cache"] == "HIT"
    for name, (path, data, headers) in cases.items():
        answer = post(cluster, path, data, headers)
        assert answer.headers.get("X-L1-Cache") in ("MISS", "BYPASS"), (name, answer.headers)
        assert answer.content == fresh(cluster, path, data, headers).content, name
    # The same V2 body on the unversioned path (kept by the L1) and on a version's path.
    tensor = {"name": "input-0", "shape": [1, 4], "datatype": "FP64", "data": [6.1, 2.9, 4.7, 1.4]}
    v2_body = json.dumps({"inputs": [tensor]}).encode()
    post(cluster, "/v2/models/iris/infer", v2_body), post(cluster, "/v2/models/iris/infer", v2_body)
    assert post(cluster, "/v2/models/iris/infer", v2_body).headers["X-L1-Cache"] == "HIT"
    versioned = post(cluster, "/v2/models/iris/versions/1/infer", v2_body)
    assert versioned.headers.get("X-L1-Cache") in ("MISS", "BYPASS"), versioned.headers
    assert versioned.content == fresh(cluster, "/v2/models/iris/versions/1/infer", v2_body).content
    # A path of no prediction route does not go through the L1 at all (the route table's
    # prediction routes are the L1 location's, service/web/routes.py): the replica's JSON 404.
    nowhere = post(cluster, "/v1/models/iris/versions/1:predict", body)
    assert nowhere.status_code == 404 and "X-L1-Cache" not in nowhere.headers, nowhere.headers
    assert nowhere.json() == {"error": "not found: no such route"}
    # The same bytes on the same route from one more client: a hit, the first answer.
    assert post(cluster, V1, body).content == fresh(cluster, V1, body).content


def test_bodies_up_to_the_limit_are_cached_and_larger_ones_pass_through(cluster):
    at_limit = rows_body([4.4, 2.9, 1.4, 0.2], pad_to=MAX_BODY)
    over = rows_body([4.4, 2.9, 1.4, 0.2], pad_to=MAX_BODY + 1)
    assert (len(at_limit), len(over)) == (MAX_BODY, MAX_BODY + 1)
    assert [post(cluster, V1, at_limit).headers["X-L1-Cache"] for _ in range(3)] == ["MISS", "MISS", "HIT"]
    assert [post(cluster, V1, over).headers["X-L1-Cache"] for _ in range(3)] == ["BYPASS"] * 3
    # Large bodies (nginx may buffer them to a file, where they have no key) each get their own answer.
    big = [rows_body(*[[float(i), float(j), 1.0, 0.5] for j in range(400)]) for i in range(2)]
    answers = [post(cluster, V1, b) for b in big * 2]
    assert all(a.headers["X-L1-Cache"] == "BYPASS" for a in answers)
    assert answers[0].content == answers[2].content != answers[1].content == answers[3].content


def test_a_chunked_body_is_judged_by_its_length_once_nginx_has_read_it(cluster):
    """nginx reads a chunked body whole before it proxies (and then knows its length): a
    small one is cached like any other, a larger one passes through."""

    def chunked(body: bytes) -> requests.Response:
        pieces = iter([body[:10], body[10:]])  # a generator: requests sends it chunked
        answer = requests.post(
            f"{cluster.url}{V1}", data=pieces, headers={"Content-Type": "application/json"}, timeout=30
        )
        assert answer.request.headers.get("Transfer-Encoding") == "chunked"
        return answer

    small = rows_body([4.3, 2.9, 1.4, 0.2])
    assert [chunked(small).headers["X-L1-Cache"] for _ in range(3)] == ["MISS", "MISS", "HIT"]
    # The same bytes with a Content-Length: the same key.
    assert post(cluster, V1, small).headers["X-L1-Cache"] == "HIT"
    over = rows_body([4.3, 2.9, 1.4, 0.2], pad_to=MAX_BODY + 1)
    assert [chunked(over).headers["X-L1-Cache"] for _ in range(3)] == ["BYPASS"] * 3


def test_errors_are_never_cached(cluster):
    wrong_width = rows_body([1.0, 2.0, 3.0])
    answers = [post(cluster, V1, wrong_width) for _ in range(3)]
    assert [a.status_code for a in answers] == [400] * 3
    assert all(a.headers["X-L1-Cache"] == "MISS" for a in answers), "each one reached a replica"


def test_answers_expire_after_the_ttl(cluster):
    body = rows_body([5.5, 2.5, 4.0, 1.3])
    assert [post(cluster, V1, body).headers["X-L1-Cache"] for _ in range(3)] == ["MISS", "MISS", "HIT"]
    time.sleep(TTL_S + 1)
    # STALE: answered at once while a background request refreshes it; MISS if nginx's
    # cache manager removed the entry already (inactive for the TTL).
    assert post(cluster, V1, body).headers["X-L1-Cache"] in ("STALE", "EXPIRED", "MISS")
    refreshed = wait_until(lambda: post(cluster, V1, body).headers["X-L1-Cache"] == "HIT", 5, "a fresh entry")
    assert refreshed


def test_a_key_idle_long_past_its_ttl_is_answered_by_nginx_again(cluster):
    # nginx's cache manager drops an entry unused for the TTL (`inactive`); the key's next
    # requests store it anew. With open_file_cache in the L1's location, such a key was
    # REVALIDATED upstream on every request instead, never a HIT again.
    body = rows_body([5.9, 3.0, 4.2, 1.5])
    assert [post(cluster, V1, body).headers["X-L1-Cache"] for _ in range(3)] == ["MISS", "MISS", "HIT"]
    time.sleep(5 * TTL_S + 2)
    states = [post(cluster, V1, body).headers["X-L1-Cache"] for _ in range(6)]
    assert states[-3:] == ["HIT"] * 3, states


def replica_304s(cluster) -> float:
    """304s the replicas answered (the L1's revalidations), summed from every replica's metrics."""
    total = 0.0
    for component in cluster.status().components:
        if component.kind == "replica":
            text = requests.get(f"http://127.0.0.1:{component.port}/metrics", timeout=10).text
            total += sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("prediction_http_requests_total{") and 'status="304"' in line
            )
    return total


def test_an_expired_answer_is_revalidated_by_a_304_and_stays_the_same(cluster):
    body = rows_body([5.7, 2.8, 4.1, 1.3])
    answers = [post(cluster, V1, body) for _ in range(3)]
    assert [a.headers["X-L1-Cache"] for a in answers] == ["MISS", "MISS", "HIT"]
    assert answers[0].headers["ETag"].startswith('"iris/1/')
    before = replica_304s(cluster)
    # Asked for every 0.3 s (nginx drops entries unused for BALANCER_L1_TTL_S) until it
    # expires (nginx counts whole seconds: TTL_S to TTL_S + 1 after it was stored). The first
    # request after expiry gets the stale answer while nginx revalidates it in the
    # background (If-None-Match: the ETag); the replica's 304 renews the entry.
    states = []
    while "STALE" not in states and len(states) < 15:
        time.sleep(0.3)
        states.append(post(cluster, V1, body).headers["X-L1-Cache"])
    assert states[-1] == "STALE" and set(states[:-1]) <= {"HIT"}, states
    wait_until(lambda: replica_304s(cluster) > before, 5, "the replica's 304")
    # (nginx renews the entry just after the 304 arrives)
    wait_until(lambda: post(cluster, V1, body).headers["X-L1-Cache"] == "HIT", 5, "the renewed entry")
    assert post(cluster, V1, body).content == answers[0].content == fresh(cluster, V1, body).content


def test_identical_concurrent_misses_send_one_request_to_a_replica(cluster):
    # digits' predict takes tens of ms: the 16 requests arrive while the first is computed.
    body = json.dumps({"instances": [[float((i * 5 + j) % 17) for j in range(64)] for i in range(8)]}).encode()
    path = "/v1/models/digits:predict"
    mark = len(log_of(cluster))
    barrier, answers = threading.Barrier(16), []

    def one() -> None:
        barrier.wait()
        answers.append(post(cluster, path, body))

    threads = [threading.Thread(target=one) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(answers) == 16 and {a.status_code for a in answers} == {200}
    assert len({a.content for a in answers}) == 1
    # nginx writes a line just after the answer: wait for all 16.
    lines = wait_until(
        lambda: (found := [ln for ln in log_of(cluster)[mark:] if ln["uri"] == path]) and len(found) == 16 and found,
        10,
        "16 access-log lines",
    )
    # The first request is the key's first use (not stored); of the rest, one goes upstream
    # while the others wait for its answer.
    upstream = [line for line in lines if line["upstream_addr"]]
    assert len(upstream) <= 2, [(line["l1"], line["upstream_addr"]) for line in lines]


def test_a_rate_limited_client_is_limited_for_cached_answers_too(cluster):
    body = rows_body([5.9, 3.0, 5.1, 1.8])
    post(cluster, V1, body), post(cluster, V1, body)  # cached, by an unlimited client

    with requests.Session() as session:
        session.mount("http://", SourceAddressAdapter("127.0.0.2"))
        statuses = [post(cluster, V1, body, session=session).status_code for _ in range(30)]
    assert statuses.count(200) <= 5 + 1 + 2 and statuses.count(429) >= 20, statuses


def test_a_model_whose_caching_is_declared_off_is_never_micro_cached(start_cluster):
    other = start_cluster(1, BALANCER_L1_CACHE="on", SERVICE_CACHE_POLICY="iris=off,*=on")
    body = {"instances": [[6.1, 2.8, 4.7, 1.2]]}
    answers = [requests.post(other.url + V1, json=body, timeout=10) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    assert "HIT" not in [a.headers.get("X-L1-Cache") for a in answers]
    assert "X-Accel-Expires" not in answers[0].headers, "nginx keeps the replica's instruction to itself"


def test_requests_the_l1_has_no_room_to_count_are_answered_by_a_replica(start_cluster):
    """The L1 holds a key for every request it looks up, stored or not, for the TTL. When
    its keys' memory is full and nginx cannot free a key in time (a full zone, two nginx
    workers competing for what one frees), nginx fails the lookup with a 500 of its own: a
    stream of new rows faster than its cache manager expires keys once gave a few 500s a
    benchmark point. Such a request goes to a replica instead, uncached. Here: a zone of a
    few dozen keys, more requests in flight than it holds (the digits forest through
    scikit-learn, whose predict takes milliseconds, keeps the 48 clients' requests in flight:
    with iris, or the forest through ONNX Runtime at 0.01 ms, a busy machine could answer them
    faster than they piled up, and the zone never filled)."""
    small = start_cluster(
        2,
        SERVICE_RUNTIME="digits=sklearn,*=auto",
        SERVICE_LATENCY_OBJECTIVE_MS="0",  # more than the replicas serve, on purpose: none refused
        BALANCER_L1_CACHE="on",
        BALANCER_L1_KEYS="12k",
        BALANCER_WORKER_PROCESSES="2",
        BALANCER_L1_TTL_S="60",
        BALANCER_RATE_LIMIT_EXEMPT="127.0.0.1/32",
    )
    bodies = [rows_body([i / 1000] + [float((i * 7 + j) % 17) for j in range(63)]) for i in range(800)]
    digits = "/v1/models/digits:predict"
    statuses: list[int] = []
    states: set[str] = set()
    lock = threading.Lock()

    def send(part: list[bytes]) -> None:
        with requests.Session() as session:
            for body in part:
                answer = post(small, digits, body, session=session)
                with lock:
                    statuses.append(answer.status_code)
                    states.add(answer.headers.get("X-L1-Cache", ""))
                if answer.status_code != 200:
                    assert answer.headers["Content-Type"] == "application/json", answer.text

    threads = [threading.Thread(target=send, args=(bodies[i::48],)) for i in range(48)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(statuses) == len(bodies)
    assert {s: statuses.count(s) for s in set(statuses)} == {200: len(bodies)}
    errors = (small.run_dir / "logs" / "nginx-error.log").read_text()
    assert "could not allocate node" in errors, "the zone was not full: the test proved nothing"
    assert "BYPASS" in states, states


def test_the_benchmark_warms_its_pool_into_the_l1_with_the_bytes_wrk_sends(cluster):
    """A 100 % hits point must be hits in the L1 too, not a replica's answer for every row's
    first BALANCER_L1_MIN_USES requests (which once made the report's tails those of Python)."""
    from loadtest.generators import pool_bodies
    from loadtest.payloads import Mix
    from loadtest.warmup import warm_l1

    mix = Mix(pool_size=20, hit_ratio=1.0, skew="zipf")  # warmed and checked within TTL_S
    assert warm_l1(cluster.url, "iris", mix) == 20
    states = [post(cluster, V1, body.encode()).headers["X-L1-Cache"] for body in pool_bodies("iris", mix)]
    assert states == ["HIT"] * 20


def test_a_split_that_begins_after_an_answer_was_kept_reaches_its_hot_keys(start_cluster, models_dir, tmp_path):
    """An entry whose refresh comes back not reusable (a split began) is served stale only
    for the replica's stale-while-revalidate, not for as long as it stays hot."""
    import shutil

    from service.dataplane.handlers import L1_STALE_S

    models = tmp_path / "models"
    shutil.copytree(models_dir / "iris", models / "iris")
    cluster = start_cluster(
        1,
        SERVICE_MODELS_DIR=str(models),
        SERVICE_REPOSITORY_POLL_S="0.3",
        BALANCER_L1_CACHE="on",
        BALANCER_L1_TTL_S="1",
    )
    body = rows_body([6.0, 2.2, 5.0, 1.5])
    assert [post(cluster, V1, body).headers["X-L1-Cache"] for _ in range(3)] == ["MISS", "MISS", "HIT"]
    shutil.copytree(models / "iris" / "1", models / "iris" / "2")
    meta = json.loads((models / "iris" / "2" / "model.json").read_text())
    (models / "iris" / "2" / "model.json").write_text(json.dumps({**meta, "version": "2"}))
    loaded = repository_call(cluster, "/v2/repository/models/iris/load", {"parameters": {"version": "2", "weight": 50}})
    assert loaded.status_code == 200, loaded.text
    wait_until(
        lambda: repository_status(cluster)["converged"],
        20,
        "the replica to serve the split",
    )
    # Kept hot (a request every 50 ms) past TTL + stale-while-revalidate: then every answer
    # is the split's own (version 1 or 2, never reused), none the kept one.
    deadline = time.monotonic() + 1 + L1_STALE_S + 3
    answers = []
    while time.monotonic() < deadline:
        answer = post(cluster, V1, body)
        answers.append((time.monotonic(), answer.headers["X-L1-Cache"], answer.headers["X-Model-Version"]))
        time.sleep(0.05)
    late = [a for a in answers if a[0] > deadline - 2]
    assert late and all(state in ("MISS", "EXPIRED", "BYPASS") for _, state, _ in late), late[:5]
    assert {version for _, _, version in late} == {"1", "2"}, late
