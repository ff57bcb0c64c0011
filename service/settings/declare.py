"""One way to declare a setting, for every part of the project: the replica
(service/settings), the balancer (balancer/settings.py), the local cluster
(localcluster/settings.py) and the benchmarks (loadtest/settings.py).

A setting is a field of a frozen dataclass, declared with `setting(...)`: its environment
variable, default, meaning, and how its text is parsed and checked. `from_env` reads a
group of them from the environment at start; a bad value fails there, with a message
naming the variable. `table` writes a group as the Markdown table docs/settings.md shows
(scripts/settings_doc.py), so the documentation is made from the declarations.

No import from the rest of the project: anything may use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar


class SettingsError(ValueError):
    """A setting has a value that cannot be used."""


# --- checks, declared beside each field -----------------------------------------------------


def positive(value: float) -> str | None:
    """Above zero."""
    return None if value > 0 else "must be positive"


def non_negative(value: float) -> str | None:
    """Zero or more."""
    return None if value >= 0 else "must be >= 0"


def one_of(*allowed: str) -> Callable[[str], str | None]:
    """One of `allowed` (case-insensitive)."""
    return lambda value: None if value.lower() in allowed else f"must be one of {', '.join(allowed)}"


def setting(
    env: str,
    default: Any,
    doc: str,
    *,
    check: Callable[[Any], str | None] | None = None,
    parse: Callable[[str], Any] | None = None,
    factory: Callable[[], Any] | None = None,
    secret: bool = False,
    kind: str = "",
    shown: str = "",
) -> Any:
    """A settings field: its variable, default (or factory), meaning, check and parser.
    `secret`: never shown; `kind`: a name the group's own checks give meaning to (the
    balancer's KINDS); `shown`: the default as the docs say it, when it is computed."""
    metadata = {"env": env, "doc": doc, "check": check, "parse": parse, "secret": secret, "kind": kind, "shown": shown}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Group:
    """A group of settings: each field's declared check runs when it is made, then `check`
    (what involves more than one field)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            check = f.metadata.get("check")
            problem = check(getattr(self, f.name)) if check else None
            if problem:
                raise SettingsError(f"{f.metadata['env']} {problem}, got {getattr(self, f.name)!r}")
        self.check()

    def check(self) -> None:
        """Checks that involve more than one field."""


G = TypeVar("G", bound=Group)


def parse_value(f: Field[Any], raw: str) -> Any:
    """The text of one variable as the field's type (or its declared parser)."""
    parser = f.metadata.get("parse")
    if parser is not None:
        return parser(raw)
    converters: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "Path": Path}
    kind = str(f.type).removesuffix(" | None")
    return converters[kind](raw if kind == "str" else raw.strip())


def from_env(group: type[G], environ: Mapping[str, str] | None = None, **overrides: Any) -> G:
    """The group from the environment (or `environ`), then `overrides` by field name;
    SettingsError naming the variable when one cannot be parsed or fails its check."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(group):
        raw = env.get(f.metadata["env"])
        if raw is None:
            continue
        try:
            values[f.name] = parse_value(f, raw)
        except (ValueError, TypeError) as exc:
            raise SettingsError(f"{f.metadata['env']}={raw!r}: {exc}") from None
    values.update(overrides)
    return group(**values)


def variable(group: type[Group], name: str) -> str:
    """The environment variable of the field `name`."""
    return next(f.metadata["env"] for f in fields(group) if f.name == name)


def default_of(f: Field[Any]) -> Any:
    """A field's default value (made by its factory, if it has one)."""
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc,operator]


def table(group: type[Group], kinds: Callable[[str], str] | None = None) -> str:
    """The group as a Markdown table: variable, default, (kind, with `kinds` naming it), meaning."""
    head = ["variable", "default", *(["kind"] if kinds else []), "meaning"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in fields(group):
        value = f.metadata.get("shown") or str(default_of(f))
        default = "(empty)" if value == "" else value if f.metadata.get("shown") else f"`{value}`"
        kind = [kinds(f.metadata["kind"])] if kinds else []
        rows.append("| " + " | ".join([f"`{f.metadata['env']}`", default, *kind, f.metadata["doc"]]) + " |")
    return "\n".join(rows)
