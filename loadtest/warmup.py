"""Warming a deployment's caches before a point, so that a pool row is a hit: the
replicas' result cache (batches of the pool), then the balancer's L1 (each pool row as
the exact bytes wrk sends). Used by the local sweep (bench.py) and the remote one."""

from __future__ import annotations

import concurrent.futures
import http.client
import threading
import urllib.parse
import urllib.request

from loadtest.generators import pool_batches, pool_bodies, predict_path
from loadtest.payloads import Mix


def warm_caches(url: str, model: str, mix: Mix) -> None:
    """Put the pool into the caches so that choosing a pool row is a hit: the replicas'
    result cache (batches of pool rows), then the balancer's L1 (see warm_l1)."""
    for body in pool_batches(model, mix):
        request = urllib.request.Request(
            f"{url}{predict_path(model)}", data=body.encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
    warm_l1(url, model, mix)


def warm_l1(url: str, model: str, mix: Mix, threads: int = 8, tries: int = 4) -> int:
    """Send each pool row as the exact request wrk sends for it until the L1 answers it
    (`X-L1-Cache: HIT`; it stores a key from BALANCER_L1_MIN_USES requests on), so a pool
    row is a hit in the L1 too. Nothing to do when the L1 is off (no X-L1-Cache header) or
    does not keep this model's answers (no HIT after `tries`). Returns the rows warmed."""
    parts = urllib.parse.urlsplit(url)
    path = predict_path(model)
    headers = {"Content-Type": "application/json"}
    local = threading.local()

    def until_hit(body: str) -> bool | None:
        """True: a HIT; False: never; None: the L1 is off."""
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
        for _ in range(tries):
            local.conn.request("POST", path, body=body.encode(), headers=headers)
            response = local.conn.getresponse()
            response.read()
            state = response.getheader("X-L1-Cache")
            if state is None:
                return None
            if state == "HIT":
                return True
        return False

    bodies = pool_bodies(model, mix)
    if not bodies or not until_hit(bodies[0]):
        return 0
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return 1 + sum(bool(hit) for hit in pool.map(until_hit, bodies[1:]))
