#!/usr/bin/env python3
"""Print the project's dependencies from pyproject.toml, one per line, for `pip install -r`.

    python scripts/requirements.py [--only-extra] [EXTRA ...]

The images install what pyproject.toml lists (the one dependency list) without installing
the project itself: their code runs from its own folder.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(extras: list[str], only_extras: bool = False, pyproject: Path = PYPROJECT) -> list[str]:
    """The base dependencies (unless only_extras) plus those of each named extra."""
    project = tomllib.loads(pyproject.read_text())["project"]
    found = [] if only_extras else list(project["dependencies"])
    for extra in extras:
        if extra not in project.get("optional-dependencies", {}):
            raise SystemExit(f"requirements: pyproject.toml has no extra {extra!r}")
        found += project["optional-dependencies"][extra]
    return found


def main(argv: list[str] | None = None) -> int:
    """Print the requirements."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("extras", nargs="*", help="optional-dependency groups to add")
    parser.add_argument("--only-extra", action="store_true", help="leave out the base dependencies")
    args = parser.parse_args(argv)
    print("\n".join(requirements(args.extras, args.only_extra)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
