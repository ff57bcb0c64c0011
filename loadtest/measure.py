"""One point's load, as the local sweep (sweep.py) and the benchmark of a running deployment
(remote.py) both run it: the caches warmed for a mix with hits, then wrk with the
benchmark's payloads. Imports only what the loadtest image carries (remote.py runs there).
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
from pathlib import Path
from typing import Any

from loadtest.generators import write_wrk_payloads, wrk_argv
from loadtest.parsers import parse_wrk
from loadtest.payloads import Mix
from loadtest.results import WrkNumbers
from loadtest.warmup import warm_caches


def run_wrk(
    url: str,
    model: str,
    mix: Mix,
    concurrency: int,
    seconds: float,
    raw: Path,
    tag: str,
    protocol: str = "v1",
    around: contextlib.AbstractContextManager[Any] | None = None,
) -> tuple[WrkNumbers, str]:
    """One point's load: the caches warmed for a mix with hits, wrk with the benchmark's
    payloads (V1 or V2 bodies) for `seconds`, inside `around` (what the caller measures
    meanwhile); wrk's output kept as raw/<tag>.wrk.txt. What wrk saw, and the command."""
    if mix.hit_ratio > 0:
        warm_caches(url, model, mix)
    nonce = random.SystemRandom().randint(10**5, 10**6 - 1)
    payloads = write_wrk_payloads(raw / f"{tag}.lua", model, mix, nonce, protocol=protocol)
    argv = wrk_argv(url, concurrency, seconds)
    with around or contextlib.nullcontext():
        result = subprocess.run(
            argv,
            env={**os.environ, "WRK_PAYLOADS": str(payloads)},
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
    (raw / f"{tag}.wrk.txt").write_text(result.stdout + result.stderr)
    payloads.unlink()
    return parse_wrk(result.stdout), f"WRK_PAYLOADS=raw/{tag}.lua " + " ".join(argv)
