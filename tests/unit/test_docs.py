"""The docs name only what exists: every make target, setting, file, module and link they
give, and the paths and listeners they send a user to. A newcomer follows them literally.
The last two checks stand for false claims found in them once: models mounted where the
image does not read them (`/app/models`), and load generators pointed at the rate-limited
public listener. The curl examples run against a real cluster in
tests/integration/test_docs_examples.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP = ("service", "balancer", "localcluster", "loadtest", "scripts", "deploy", "docs", "tests", ".ci")


def text(doc: Path) -> str:
    return doc.read_text(encoding="utf-8")


def where(doc: Path, found: str) -> str:
    return f"{doc.relative_to(ROOT)}: {found}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_make_target_named_exists(doc):
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", (ROOT / "Makefile").read_text(), re.M))
    # `make X` in code or in backticks (prose like "make nginx hold" is not a command).
    named = re.findall(r"(?:^|`|\$ )make ([a-z][a-z0-9-]*)", text(doc), re.M)
    assert not [where(doc, n) for n in named if n not in targets]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_setting_named_is_read_by_something(doc):
    """SERVICE_/BALANCER_/CLUSTER_/REDIS_ settings are declared in a settings module (or the
    balancer image's entrypoint); compose's own variables (API_..., *_HOST_PORT) in the
    compose file."""
    declared = "".join(
        p.read_text()
        for pattern in ("service/settings/*.py", "balancer/*.py", "localcluster/*.py", "loadtest/*.py")
        for p in ROOT.glob(pattern)
    )
    declared += (ROOT / "balancer" / "docker-entrypoint.d" / "15-balancer-settings.envsh").read_text()
    compose = (ROOT / "docker-compose.scale.yml").read_text()
    missing = []
    for name in set(re.findall(r"\b((?:SERVICE|BALANCER|CLUSTER|REDIS)_[A-Z0-9_]*[A-Z0-9])\b", text(doc))):
        if f'"{name}"' not in declared and name not in compose and f"{name}=" not in declared:
            missing.append(name)
    for name in set(re.findall(r"\$\{?(API_[A-Z0-9_]+)|\b(API_[A-Z0-9_]+)=", text(doc))):
        name = next(n for n in name if n)
        if "${" + name not in compose:
            missing.append(name)
    assert not [where(doc, n) for n in sorted(missing)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_repository_path_and_link_named_exists(doc):
    body = text(doc)
    top = "|".join(re.escape(t) for t in TOP)
    paths = re.findall(rf"(?<![\w/.:-])((?:{top})/[\w./-]*[\w/])", body)
    links = [link.split("#")[0] for link in re.findall(r"\]\(([^)#:]+(?:#[^)]*)?)\)", body)]
    # `deploy/api` after kubectl is a Deployment, not a folder of ours.
    paths = [p for p in paths if not p.startswith("deploy/") or p.startswith(("deploy/kubernetes", "deploy/compose"))]
    missing = [p for p in paths if "*" not in p and not (ROOT / p).exists()]
    missing += [link for link in links if link and not (doc.parent / link).exists()]
    assert not [where(doc, m) for m in missing]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_python_module_named_runs(doc):
    modules = re.findall(r"python -m ((?:service|balancer|localcluster|loadtest|scripts)[\w.]*)", text(doc))
    missing = [
        m
        for m in modules
        if not (ROOT / (m.replace(".", "/") + ".py")).exists()
        and not (ROOT / m.replace(".", "/") / "__main__.py").exists()
    ]
    assert not [where(doc, m) for m in missing]


def test_a_models_folder_is_mounted_where_the_image_reads_it():
    """containers.md said /app/models; the image reads SERVICE_MODELS_DIR=/models, so the
    user's mounted models were silently ignored."""
    image_dir = re.search(r"SERVICE_MODELS_DIR=(\S+)", (ROOT / "service" / "Dockerfile").read_text()).group(1)
    for doc in DOCS:
        for mount in re.findall(r"models:(/[\w/]+)(?::ro)?\"", text(doc)):
            assert mount == image_dir, where(doc, f"mounts models at {mount}, the image reads {image_dir}")
        assert "/app/models" not in text(doc), where(doc, "/app/models")


@pytest.mark.parametrize("doc", [*DOCS, ROOT / "loadtest" / "h2load.sh"], ids=lambda d: d.name)
def test_load_generators_are_pointed_at_the_internal_listener(doc):
    """The public listener (8080) rate limits every client, loopback too: a load generator
    pointed at it measures the limiter (429s)."""
    generators = re.compile(r"(?:locust|h2load|wrk|scripts/bench|loadtest/h2load\.sh)\b")
    lines = text(doc).splitlines()
    offending = [
        line
        for i, line in enumerate(lines)
        if generators.search(line)
        and re.search(r"(?:127\.0\.0\.1|localhost):8080\b", line)
        # Loading the limiter on purpose, said so beside it.
        and "limiter" not in " ".join(lines[max(0, i - 2) : i + 1])
    ]
    offending += re.findall(r"^url=\S*:8080\b.*", text(doc), re.M)
    assert not [where(doc, line) for line in offending]
