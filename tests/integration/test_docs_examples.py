"""Every `curl` example of the README and docs/api.md, run as written (the real curl, the
shell) against a local cluster in the defaults, its answer compared with the one the doc
shows beside it: the same keys, the same lengths, the same kinds of values, and the same
labels and numbers where the doc writes them out. A doc whose example drifted from what
the cluster answers fails here (README's probabilities were rounded by hand once)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "docs" / "api.md"]


def examples(doc: Path) -> list[tuple[str, str | None]]:
    """(the curl command, the answer the doc shows or None) for each example in a sh block."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", doc.read_text(), re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if not line.startswith("curl "):
                i += 1
                continue
            command, comment = line, None
            # A continued command (`\` at the end) or an open quote runs onto the next lines.
            while command.rstrip().endswith("\\") or command.count("'") % 2:
                i += 1
                command = command + "\n" + lines[i]  # bash joins the lines itself
            if "#" in command.split("'")[-1]:
                command, comment = command.rsplit("#", 1)
            i += 1
            if comment is None:
                shown = []
                while i < len(lines) and lines[i].startswith("# "):
                    shown.append(lines[i][2:])
                    i += 1
                comment = " ".join(shown) or None
            found.append((command.strip(), comment.strip() if comment else None))
    return found


def same_shape(shown, got, path="answer") -> list[str]:
    """Where `got` differs from what the doc shows: keys, lengths, kinds, and the values
    written out ([...] stands for anything)."""
    if shown == "...":
        return []
    if isinstance(shown, dict):
        if not isinstance(got, dict) or set(shown) != set(got):
            return [f"{path}: keys {sorted(shown)} shown, {sorted(got) if isinstance(got, dict) else got!r} answered"]
        return [d for key in shown for d in same_shape(shown[key], got[key], f"{path}.{key}")]
    if isinstance(shown, list):
        if not isinstance(got, list) or len(shown) != len(got):
            return [f"{path}: {shown!r} shown, {got!r} answered"]
        return [d for i, (s, g) in enumerate(zip(shown, got, strict=True)) for d in same_shape(s, g, f"{path}[{i}]")]
    if isinstance(shown, float) or isinstance(got, float):
        close = isinstance(got, (int, float)) and abs(shown - got) < 0.005
        return [] if close else [f"{path}: {shown} shown, {got} answered"]
    return [] if shown == got else [f"{path}: {shown!r} shown, {got!r} answered"]


def parse_shown(comment: str):
    """The doc's answer as JSON, each [...] read as the placeholder "..."."""
    return json.loads(comment.replace("[...]", '"..."'))


@pytest.fixture(scope="module")
def cluster(start_cluster):
    return start_cluster(2, defaults=True)


def test_the_docs_have_examples_to_run():
    found = [e for doc in DOCS for e in examples(doc)]
    assert len(found) >= 6 and sum(1 for _, shown in found if shown and shown.startswith("{")) >= 5, found


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_curl_example_answers_what_the_doc_shows(cluster, doc):
    port = cluster.url.rsplit(":", 1)[1]
    failures = []
    for command, shown in examples(doc):
        run = command.replace("localhost:8080", f"127.0.0.1:{port}")
        answer = subprocess.run(["bash", "-c", run], capture_output=True, text=True, timeout=30)
        if answer.returncode != 0 or not answer.stdout:
            failures.append(f"{command}: exit {answer.returncode}, {answer.stderr.strip()}")
            continue
        got = json.loads(answer.stdout)
        if shown and shown.startswith("{"):
            failures += [f"{command}: {d}" for d in same_shape(parse_shown(shown), got)]
    assert not failures, "\n".join(failures)
