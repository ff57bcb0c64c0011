"""Rendered Kubernetes manifests, and their NetworkPolicies evaluated as a network plugin
would: who may connect to whom, on which port, from a pod or an address."""

from __future__ import annotations

import functools
import ipaddress
import math
import subprocess

import yaml

from tests.support import ROOT, VENV_BIN, system_tool

KUBECTL = system_tool("kubectl")
# The Kubernetes version whose schemas every manifest is validated against.
KUBERNETES_VERSION = "1.30.0"


@functools.cache
def rendered(overlay: str) -> str:
    """`kubectl kustomize` of deploy/kubernetes/overlays/<overlay>."""
    return subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / "deploy" / "kubernetes" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def objects_of(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def validate(path) -> subprocess.CompletedProcess:
    """kubernetes-validate --strict against KUBERNETES_VERSION's schemas (the API server's
    refusal of an object, without one)."""
    return subprocess.run(
        [str(VENV_BIN / "kubernetes-validate"), "-k", KUBERNETES_VERSION, "--strict", "--quiet", str(path)],
        capture_output=True,
        text=True,
    )


def one(objects, kind, name):
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def one_container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def matches(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels, matchExpressions In/Exists) against labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        value = labels.get(expression["key"])
        if expression["operator"] == "In" and value not in expression["values"]:
            return False
        if expression["operator"] == "Exists" and expression["key"] not in labels:
            return False
    return True


def peer_allows(peer: dict, pod: dict, namespace: str) -> bool:
    """One `from`/`to` entry against a pod (labels, namespace) or an address (`ip`)."""
    if "ipBlock" in peer:
        if pod.get("ip") is None:
            return False
        address = ipaddress.ip_address(pod["ip"])
        block = peer["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if "labels" not in pod:
        return False  # an address that is no pod: only an ipBlock admits it
    if "namespaceSelector" in peer:
        namespace_ok = matches(peer["namespaceSelector"], pod["namespace_labels"])
    else:
        namespace_ok = pod["namespace"] == namespace
    return namespace_ok and matches(peer.get("podSelector", {}), pod["labels"])


def port_allows(ports: list[dict] | None, port: int, protocol: str) -> bool:
    if ports is None:
        return True
    return any(
        p.get("protocol", "TCP") == protocol and p.get("port", port) <= port <= p.get("endPort", p.get("port", port))
        for p in ports
    )


def side_allows(policies, kind: str, pod: dict, peer: dict, port: int, namespace: str, protocol: str) -> bool:
    """Whether the policies selecting `pod` let `peer` connect (Ingress) or `pod` reach
    `peer` (Egress) on `port`; pods of another namespace and addresses are not selected."""
    if pod.get("namespace") != namespace or "labels" not in pod:
        return True
    selecting = [
        p for p in policies if kind in p["spec"]["policyTypes"] and matches(p["spec"]["podSelector"], pod["labels"])
    ]
    if not selecting:
        return True
    key, peers_key = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
    for policy in selecting:
        for rule in policy["spec"].get(key, []):
            if not port_allows(rule.get("ports"), port, protocol):
                continue
            peers = rule.get(peers_key)
            if peers is None or any(peer_allows(p, peer, namespace) for p in peers):
                return True
    return False


def reachable(objects, namespace: str, source: dict, target: dict, port: int, protocol: str = "TCP") -> bool:
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    return side_allows(policies, "Egress", source, target, port, namespace, protocol) and side_allows(
        policies, "Ingress", target, source, port, namespace, protocol
    )


def pod(objects, namespace: str, deployment: str) -> dict:
    labels = one(objects, "Deployment", deployment)["spec"]["template"]["metadata"]["labels"]
    return {"labels": labels, "namespace": namespace, "namespace_labels": {"kubernetes.io/metadata.name": namespace}}


def outsider(namespace: str = "elsewhere", **labels: str) -> dict:
    return {"labels": labels, "namespace": namespace, "namespace_labels": {"kubernetes.io/metadata.name": namespace}}


def address(ip: str) -> dict:
    """Not a pod: a node-local cache, the metadata server, a managed service, the internet."""
    return {"ip": ip}


def cpu_cores(quantity: str) -> float:
    """A CPU quantity ("2", "500m") in cores."""
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def container_env(deployment: dict, container: str) -> dict[str, str | None]:
    """A container's environment as the kubelet gives it: values, and resourceFieldRef
    (limits.cpu rounded up to its divisor, as the downward API does); secrets as None."""
    env: dict[str, str | None] = {}
    for variable in one_container(deployment, container).get("env", []):
        ref = variable.get("valueFrom", {}).get("resourceFieldRef")
        if ref:
            limit = one_container(deployment, ref["containerName"])
            resource = ref["resource"].split(".")
            value = cpu_cores(limit["resources"][resource[0]][resource[1]]) / cpu_cores(ref.get("divisor", "1"))
            env[variable["name"]] = str(max(1, math.ceil(value)))
        else:
            env[variable["name"]] = variable.get("value")
    return env
