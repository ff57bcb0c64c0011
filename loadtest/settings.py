"""The benchmarks' settings: the sweep's (BENCH_*) and Locust's load shapes (LOAD_SHAPE and
its numbers), declared as every setting of the project is (service/settings/declare.py):
checked when read, and docs/settings.md is generated from them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from service.settings.declare import Group, from_env, non_negative, one_of, positive, setting

SHAPES = ("step", "spike")


@dataclass(frozen=True)
class BenchSettings(Group):
    """The sweep (`make bench`, `scripts/bench`); each also has a command-line option."""

    disturbance_cores: float = setting(
        "BENCH_DISTURBANCE_CORES",
        0.1,
        "Mark a point disturbed when processes the benchmark does not know, or steal time, use more cores than "
        "this meanwhile (--disturbance-cores).",
        check=non_negative,
    )
    wait_quiet_s: float = setting(
        "BENCH_WAIT_QUIET_S",
        0.0,
        "Before measuring, wait up to this long for the machine to be quiet; 0: only warn (--wait-quiet).",
        check=non_negative,
    )
    reports_dir: str = setting(
        "BENCH_REPORTS_DIR",
        "",
        "Where `--url` writes its report folders; empty: reports/ in the repository (--out names one folder).",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BenchSettings:
        """The settings in `environ` (default: this process's environment); SettingsError if one is bad."""
        return from_env(cls, environ)


@dataclass(frozen=True)
class ShapeSettings(Group):
    """Locust's load shapes (loadtest/shapes.py, given to locust beside the locustfile)."""

    shape: str = setting("LOAD_SHAPE", "step", "Which shape runs: step or spike.", check=one_of(*SHAPES))
    step_users: int = setting("STEP_USERS", 8, "step: users added at each step.", check=positive)
    step_seconds: float = setting("STEP_SECONDS", 10.0, "step: how long each step lasts.", check=positive)
    steps: int = setting("STEPS", 6, "step: how many steps, then the run stops.", check=positive)
    spike_base_users: int = setting("SPIKE_BASE_USERS", 8, "spike: users before and after.", check=positive)
    spike_users: int = setting("SPIKE_USERS", 128, "spike: users during the spike.", check=positive)
    spike_at_s: float = setting("SPIKE_AT_S", 10.0, "spike: when it starts.", check=non_negative)
    spike_length_s: float = setting("SPIKE_LENGTH_S", 10.0, "spike: how long it lasts.", check=positive)
    duration_s: float = setting("SHAPE_DURATION_S", 40.0, "spike: the whole run.", check=positive)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ShapeSettings:
        """The settings in `environ` (default: this process's environment); SettingsError if one is bad."""
        return from_env(cls, environ)
