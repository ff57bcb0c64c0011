"""The throughput report: report.md and a self-contained report.html with plots, built
from the raw results of a sweep (so it can be rebuilt at any time).

    python -m loadtest.report reports/<timestamp>

In sections: common.py (the results and how numbers are written), plots.py, findings.py
(the headline and what it means), sections.py (optional parts), document.py (the whole
report, as Markdown and HTML).
"""

import sys
from pathlib import Path

from loadtest import results as results_file
from loadtest.report.common import Results
from loadtest.report.document import blocks, to_html, to_markdown


def build(folder: Path) -> dict[str, Path]:
    """Write report.md, report.html and plots/ from folder/results.json."""
    results = Results(results_file.read(folder))
    content = blocks(results, folder)
    md, page = folder / "report.md", folder / "report.html"
    md.write_text(to_markdown(content, folder))
    page.write_text(to_html(content))
    return {"md": md, "html": page}


def main(argv: list[str] | None = None) -> int:
    """Rebuild a report from its folder."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / "results.json").exists():
        print("usage: python -m loadtest.report reports/<timestamp>  (a folder with results.json)", file=sys.stderr)
        return 2
    paths = build(Path(args[0]))
    print(f"report: {paths['md']}\n        {paths['html']}")
    return 0
