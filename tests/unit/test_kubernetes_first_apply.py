"""What a first `kubectl apply -k` would meet on kind, EKS or GKE, checked here without an
API server: rules over the rendered manifests, each named for the failure a real cluster
would show. Every rule must hold for both overlays, and must fail on the manifest broken
the way that failure was once shipped (the `BROKEN` cases below)."""

from __future__ import annotations

import copy
import math
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from balancer.settings import BalancerSettings
from service.settings import ServerSettings
from tests.support import ROOT
from tests.support.kubernetes import (
    address,
    container_env,
    objects_of,
    one,
    one_container,
    outsider,
    pod,
    reachable,
    rendered,
    validate,
)

OVERLAYS = {"dev": "prediction-dev", "prod": "prediction"}
# Where a pod's resolv.conf may send DNS: the kube-dns pods, NodeLocal DNSCache's address,
# GKE's metadata server (Cloud DNS, Autopilot).
NODE_LOCAL_DNS, METADATA_DNS = "169.254.20.10", "169.254.169.254"
SERVICE = ServerSettings()


def deployments(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] == "Deployment"]


def pre_stop_s(container: dict) -> int:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return int(command[-1]) if command[:1] == ["sleep"] else 0


# --- the rules: each returns what a real cluster would trip on ---------------------------


def dns_from_every_pod(objects: list[dict], namespace: str) -> list[str]:
    """nginx exits at start when it cannot resolve (the balancer crash-loops), and the api
    pods lose Redis without a word, when the DNS policy admits only pods labelled kube-dns
    but the node sends DNS to NodeLocal DNSCache or the metadata server."""
    servers = {
        "kube-dns": outsider("kube-system", **{"k8s-app": "kube-dns"}),
        "NodeLocal DNSCache": address(NODE_LOCAL_DNS),
        "the metadata server": address(METADATA_DNS),
    }
    return [
        f"{d['metadata']['name']} cannot send DNS ({protocol}) to {name}"
        for d in deployments(objects)
        for name, server in servers.items()
        for protocol in ("UDP", "TCP")
        if not reachable(objects, namespace, pod(objects, namespace, d["metadata"]["name"]), server, 53, protocol)
    ]


def no_replicas_beside_an_hpa(objects: list[dict], namespace: str) -> list[str]:
    """Every `kubectl apply -k` sets `replicas` again: the HPA's count drops back to it."""
    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in objects if h["kind"] == "HorizontalPodAutoscaler"}
    return [
        f"{d['metadata']['name']} sets replicas beside its HPA"
        for d in deployments(objects)
        if d["metadata"]["name"] in scaled and "replicas" in d["spec"]
    ]


def drain_outlasts_dns(objects: list[dict], namespace: str) -> list[str]:
    """A pod leaves the headless Service's DNS at once, but DNS caches keep answering with
    it for their TTL, and nginx keeps each answer `valid` seconds: a pod that stops before
    both have passed gets requests it cannot answer (502s at every rollout)."""
    balancer_env = container_env(one(objects, "Deployment", "balancer"), "balancer")
    valid_s = int(balancer_env.get("BALANCER_RESOLVER_VALID_S") or BalancerSettings().resolver_valid_s)
    api = one(objects, "Deployment", "api")
    ttl = api["spec"]["template"]["metadata"].get("annotations", {}).get("prediction-cluster/dns-ttl-seconds")
    if ttl is None:
        return ["the api pods do not say the DNS TTL their drain waits for (prediction-cluster/dns-ttl-seconds)"]
    env = container_env(api, "api")
    graceful_s = int(env.get("SERVICE_GRACEFUL_TIMEOUT_S") or SERVICE.graceful_timeout_s)
    drain_s = float(env.get("SERVICE_DRAIN_DELAY_S") or SERVICE.drain_delay_s)
    pause_s = pre_stop_s(one_container(api, "api"))
    problems = []
    if pause_s + drain_s < int(ttl) + valid_s:
        problems.append(f"api preStop {pause_s} s + drain {drain_s} s < DNS TTL {ttl} s + valid {valid_s} s")
    grace = api["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    if grace < pause_s + drain_s + graceful_s:
        problems.append(
            f"api grace {grace} s < preStop + drain + gunicorn's graceful {graceful_s} s: killed mid-request"
        )
    return problems


def connections_fit(objects: list[dict], namespace: str) -> list[str]:
    """nginx keeps up to `keepalive` idle connections per worker; with `auto` workers it
    starts one per node CPU, whatever its limit. Every balancer pod's idle connections can
    land on one replica, which accepts SERVICE_WORKER_CONNECTIONS per gunicorn worker:
    beyond it the replica stops accepting and nginx's reused connections fail."""
    balancer = one(objects, "Deployment", "balancer")
    env = container_env(balancer, "balancer")
    workers = env.get("BALANCER_WORKER_PROCESSES") or "auto"
    if not workers.isdigit():
        return [f"BALANCER_WORKER_PROCESSES is {workers!r}: one nginx worker per node CPU, not per CPU of the limit"]
    keepalive = int(env.get("BALANCER_UPSTREAM_KEEPALIVE") or BalancerSettings().upstream_keepalive)
    surge = balancer["spec"].get("strategy", {}).get("rollingUpdate", {}).get("maxSurge", "25%")
    replicas = balancer["spec"].get("replicas", 1)
    pods = replicas + (math.ceil(replicas * int(surge[:-1]) / 100) if str(surge).endswith("%") else int(surge))
    api_env = container_env(one(objects, "Deployment", "api"), "api")
    accepts = int(api_env.get("SERVICE_WORKER_CONNECTIONS") or SERVICE.worker_connections) * int(
        api_env.get("SERVICE_WORKERS") or SERVICE.workers
    )
    idle = pods * int(workers) * keepalive
    return [] if idle < accepts else [f"{idle} idle nginx connections may reach one replica that accepts {accepts}"]


def probes_cannot_flap(objects: list[dict], namespace: str) -> list[str]:
    """A probe's timeout defaults to 1 s: a replica whose loop a batch holds for a second
    reads as unready (readiness) or is restarted (liveness) while it is merely busy."""
    return [
        f"{d['metadata']['name']}/{c['name']} {kind} times out in {c[kind].get('timeoutSeconds', 1)} s"
        for d in deployments(objects)
        for c in d["spec"]["template"]["spec"]["containers"]
        for kind in ("readinessProbe", "livenessProbe", "startupProbe")
        if kind in c and c[kind].get("timeoutSeconds", 1) < 2
    ]


def no_service_links(objects: list[dict], namespace: str) -> list[str]:
    """Kubernetes injects <SERVICE>_PORT=tcp://... variables for every Service: a Service
    named `redis` sets REDIS_PORT, `balancer` BALANCER_PORT... in the namespace of prefixed
    settings, where they are parsed as ours."""
    return [
        f"{d['metadata']['name']} gets Service links"
        for d in deployments(objects)
        if d["spec"]["template"]["spec"].get("enableServiceLinks", True)
    ]


def budgets_for_what_serves(objects: list[dict], namespace: str) -> list[str]:
    """A node drain evicts every pod it can at once: without a PodDisruptionBudget both
    balancers (or all replicas) may go together."""
    budgets = [o["spec"]["selector"]["matchLabels"] for o in objects if o["kind"] == "PodDisruptionBudget"]
    return [
        f"{name} has no PodDisruptionBudget"
        for name in ("api", "balancer")
        if not any(
            b.items() <= one(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"].items()
            for b in budgets
        )
    ]


def replicas_scraped_one_by_one(objects: list[dict], namespace: str) -> list[str]:
    """Prometheus must read each replica's own counters: through the balancer it gets one
    replica per scrape, and the api NetworkPolicy must let it in."""
    api = one(objects, "Deployment", "api")
    annotations = api["spec"]["template"]["metadata"].get("annotations", {})
    port = one_container(api, "api")["ports"][0]["containerPort"]
    problems = []
    if annotations.get("prometheus.io/scrape") != "true" or annotations.get("prometheus.io/port") != str(port):
        problems.append("the api pods do not say where their /metrics are")
    scraper = outsider("monitoring", **{"prediction-cluster/client": "scraper"})
    if not reachable(objects, namespace, scraper, pod(objects, namespace, "api"), port):
        problems.append("a scraper cannot reach the api pods")
    return problems


def no_secret_in_arguments_or_environment(objects: list[dict], namespace: str) -> list[str]:
    """A password on a command line or in an environment variable is readable by anything
    that can list processes (`ps`, /proc/<pid>/cmdline and environ) and is copied into
    crash reports; a Secret mounted as a file is not (compose does the same)."""
    problems = []
    for d in deployments(objects):
        for c in d["spec"]["template"]["spec"]["containers"]:
            where = f"{d['metadata']['name']}/{c['name']}"
            for variable in c.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef", {})
                if ref.get("name", "").startswith("redis-auth"):
                    problems.append(f"{where}: the Redis password in ${variable['name']}")
            if any("$(REDIS_PASSWORD)" in str(part) for part in [*c.get("command", []), *c.get("args", [])]):
                problems.append(f"{where}: the Redis password on the command line")
    return problems


RULES: list[Callable[[list[dict], str], list[str]]] = [
    dns_from_every_pod,
    no_replicas_beside_an_hpa,
    drain_outlasts_dns,
    connections_fit,
    probes_cannot_flap,
    no_service_links,
    budgets_for_what_serves,
    replicas_scraped_one_by_one,
    no_secret_in_arguments_or_environment,
]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_the_manifests_keep_the_rule(overlay, rule):
    assert rule(objects_of(rendered(overlay)), OVERLAYS[overlay]) == []


# --- each rule against the manifest broken as it once shipped -----------------------------


def _dns_only_kube_dns(objects):
    policy = one(objects, "NetworkPolicy", "dns")
    policy["spec"]["egress"][0]["to"] = [p for p in policy["spec"]["egress"][0]["to"] if "ipBlock" not in p]


def _replicas_2(objects):
    one(objects, "Deployment", "api")["spec"]["replicas"] = 2


def _pre_stop_5(objects):
    one_container(one(objects, "Deployment", "api"), "api")["lifecycle"]["preStop"]["exec"]["command"] = ["sleep", "5"]


def _workers_auto(objects):
    balancer = one_container(one(objects, "Deployment", "balancer"), "balancer")
    balancer["env"] = [e for e in balancer["env"] if e["name"] != "BALANCER_WORKER_PROCESSES"]


def _default_probe_timeout(objects):
    one_container(one(objects, "Deployment", "api"), "api")["readinessProbe"].pop("timeoutSeconds")


def _service_links(objects):
    one(objects, "Deployment", "redis")["spec"]["template"]["spec"].pop("enableServiceLinks")


def _no_balancer_budget(objects):
    objects.remove(one(objects, "PodDisruptionBudget", "balancer"))


def _api_closed_to_scrapers(objects):
    policy = one(objects, "NetworkPolicy", "api")
    policy["spec"]["ingress"] = policy["spec"]["ingress"][:1]


def _password_in_environment(objects):
    api = one_container(one(objects, "Deployment", "api"), "api")
    api["env"].insert(
        0, {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "password"}}}
    )


BROKEN = {
    dns_from_every_pod: _dns_only_kube_dns,
    no_replicas_beside_an_hpa: _replicas_2,
    drain_outlasts_dns: _pre_stop_5,
    connections_fit: _workers_auto,
    probes_cannot_flap: _default_probe_timeout,
    no_service_links: _service_links,
    budgets_for_what_serves: _no_balancer_budget,
    replicas_scraped_one_by_one: _api_closed_to_scrapers,
    no_secret_in_arguments_or_environment: _password_in_environment,
}


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_each_rule_fails_on_the_manifest_broken_as_it_shipped(rule):
    objects = copy.deepcopy(objects_of(rendered("prod")))
    BROKEN[rule](objects)
    assert rule(objects, OVERLAYS["prod"]), f"{rule.__name__} did not notice"


def test_patches_address_containers_and_variables_by_name():
    """A JSON patch to `env/3` changes whatever variable sits third: one added above it in
    the base and prod sets the wrong one, silently."""
    by_position = re.compile(r"/(?:containers|env|ports|volumeMounts|volumes)/\d+")
    offending = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for path in (ROOT / "deploy" / "kubernetes").rglob("kustomization.yaml")
        for line in path.read_text().splitlines()
        if by_position.search(line)
    ]
    assert not offending
    assert by_position.search("path: /spec/template/spec/containers/0/env/3/value"), "the check finds the old patch"


def test_the_bench_job_reaches_the_internal_listener_and_nothing_else():
    """docs/kubernetes.md's load test: a Job beside the cluster, not a port-forward (which
    would measure the tunnel). It must validate, and the policies must let it reach
    balancer-internal:8082 and the DNS, not the replicas or the internet."""
    path = ROOT / "deploy" / "kubernetes" / "jobs" / "bench.yaml"
    check = validate(path)
    assert check.returncode == 0, check.stdout + check.stderr
    job = yaml.safe_load(path.read_text())
    objects, namespace = objects_of(rendered("prod")), OVERLAYS["prod"]
    bench = outsider(namespace, **job["spec"]["template"]["metadata"]["labels"])
    command = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--url http://balancer-internal:8082" in command
    assert reachable(objects, namespace, bench, pod(objects, namespace, "balancer"), 8082)
    assert reachable(objects, namespace, bench, address(NODE_LOCAL_DNS), 53, "UDP")
    assert not reachable(objects, namespace, bench, pod(objects, namespace, "api"), 8000)
    assert not reachable(objects, namespace, bench, address("203.0.113.7"), 443)


CHECKOV = ROOT / ".venv" / "tools" / "checkov" / "bin" / "checkov"


def checkov(folder) -> subprocess.CompletedProcess:
    assert CHECKOV.exists(), "checkov is missing: scripts/bootstrap --tools (make test runs it)"
    config = ROOT / "deploy" / "kubernetes" / ".checkov.yaml"
    return subprocess.run(
        [str(CHECKOV), "--config-file", str(config), "-d", str(folder)], capture_output=True, text=True, timeout=300
    )


def test_checkov_passes_the_overlays_and_the_bench_job_and_catches_a_privileged_pod(tmp_path):
    """checkov's Kubernetes policies (about 300 a run: privileges, capabilities, probes,
    limits, secrets as files, ...) over what `apply` would send; the checks skipped, and
    why, are in deploy/kubernetes/.checkov.yaml and in annotations on the objects."""
    for overlay in OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(rendered(overlay))
    (tmp_path / "bench.yaml").write_text((ROOT / "deploy" / "kubernetes" / "jobs" / "bench.yaml").read_text())
    result = checkov(tmp_path)
    assert result.returncode == 0 and "Failed checks: 0" in result.stdout, result.stdout[-4000:] + result.stderr[-2000:]
    broken = objects_of(rendered("prod"))
    one_container(one(broken, "Deployment", "api"), "api")["securityContext"]["allowPrivilegeEscalation"] = True
    for path in tmp_path.iterdir():
        path.unlink()
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump_all(broken))
    caught = checkov(tmp_path)
    assert caught.returncode != 0 and "CKV_K8S_20" in caught.stdout, caught.stdout[-4000:]


def test_the_demo_redis_takes_its_password_from_the_secret_file_and_the_probe_needs_none(tmp_path):
    """The Redis container's script, run as the kubelet would run it (`$$` unescaped), with a
    real redis-server: the password from the mounted file works, the probe's user PINGs
    without one, and the password is in no argument of the running process."""
    import redis as redis_client

    from localcluster.ports import free_port
    from tests.support import system_tool, wait_until

    container = one_container(one(objects_of(rendered("prod")), "Deployment", "redis"), "redis")
    secret = tmp_path / "password"
    secret.write_text("s3cret-from-the-secret\n")
    port = free_port()
    script = container["args"][0].replace("$$", "$").replace("/run/secrets/redis-auth/password", str(secret))
    script = script.replace("redis-server -", f"{system_tool('redis-server')} - --port {port} --bind 127.0.0.1", 1)
    server = subprocess.Popen([*container["command"], script], cwd=tmp_path)
    try:
        client = redis_client.Redis(port=port, password="s3cret-from-the-secret")
        wait_until(client.ping, what="redis-server answering")
        with pytest.raises(redis_client.AuthenticationError):
            redis_client.Redis(port=port).set("x", "1")
        probe = container["readinessProbe"]["exec"]["command"]
        answer = subprocess.run([system_tool("redis-cli"), "-p", str(port), *probe[1:]], capture_output=True, text=True)
        assert answer.stdout.strip() == "PONG", answer
        assert "s3cret" not in Path(f"/proc/{server.pid}/cmdline").read_text()
    finally:
        server.terminate()
        server.wait(timeout=10)
