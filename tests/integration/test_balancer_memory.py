"""The balancer's memory under slow uploads: one address cannot make nginx hold hundreds of
request bodies open (a real nginx, the defaults but for which address is trusted)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import requests

from localcluster.processes import children

UPLOADS = 200
DECLARED = 1_000_000  # bytes each upload says it will send (under the 1m body limit)
SENT = 900_000  # bytes of it each sends at once; then a byte a second keeps it open
LIMIT = 32  # BALANCER_CONN_PER_CLIENT's default


@pytest.fixture(scope="module")
def cluster(start_cluster):
    # The defaults users run; 127.0.0.1 is the operator, 127.0.0.2 a client like any other.
    return start_cluster(1, defaults=True, BALANCER_RATE_LIMIT_EXEMPT="127.0.0.1/32")


def nginx_rss_mb(cluster) -> float:
    """Resident memory of nginx's master and workers, in MB."""
    master = cluster.status().component("nginx").pid
    total_kb = 0
    for pid in [master, *(child for child, _ in children(master))]:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def test_slow_uploads_from_one_address_hold_little_of_the_balancers_memory(cluster):
    port = int(cluster.url.rsplit(":", 1)[1])
    before = nginx_rss_mb(cluster)
    head = (
        f"POST /v1/models/iris:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {DECLARED}\r\n\r\n"
    ).encode()
    uploads = []
    try:
        for _ in range(UPLOADS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
            sock.sendall(head + b'{"instances": [' + b" " * (SENT - 15))
            uploads.append(sock)
        peak = before
        for _ in range(3):  # trickle a byte each, inside the body timeout, and watch nginx
            time.sleep(1)
            for sock in uploads:
                try:
                    sock.sendall(b" ")
                except OSError:
                    pass
            peak = max(peak, nginx_rss_mb(cluster))
        # Another client is served meanwhile.
        answer = requests.post(f"{cluster.url}/v1/models/iris:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
        assert answer.status_code == 200, answer.text
        refused = 0  # answered a JSON 429 at once: beyond the per-address limit
        for sock in uploads:
            sock.settimeout(0.2)
            try:
                reply = sock.recv(4096)
            except OSError:
                continue  # still held open (nginx waits for the body)
            if reply.startswith(b"HTTP/1.1 429"):
                refused += 1
                assert b'{"error"' in reply, reply
    finally:
        for sock in uploads:
            sock.close()
    line = {
        "uploads": UPLOADS,
        "admitted": UPLOADS - refused,
        "refused_429": refused,
        "rss_mb_before": round(before, 1),
        "rss_mb_peak": round(peak, 1),
    }
    print(f"FAULT {json.dumps(line)}")
    assert refused >= UPLOADS - LIMIT, line
    assert peak - before < 16, line
