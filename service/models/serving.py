"""How each model is served, in one place: its cache policy and batching, typed.

Three sources, in this order: a per-model entry in the replica's settings
(`SERVICE_CACHE_POLICY=iris=off,*=auto`, `SERVICE_BATCHING=...`), the model's own
`model.json` `serving` block (ServingOptions), the settings' default. `settle` combines
them; ServingPolicy keeps what was settled for each model version a worker serves (and
the `auto` cache decision, taken once per version by the data plane), and forgets a
version once it is no longer served. No I/O here: the decision's measurement (a Redis
round trip) is the data plane's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from service.settings import CACHE_POLICIES, SWITCH, Settings

if TYPE_CHECKING:
    from service.models.artifacts import LoadedModel

# A model version's identity: name, version and its artifact's sha256.
Identity = tuple[str, str, str]


class ServingError(ValueError):
    """A model.json `serving` block that cannot be used; the message says which option."""


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _duration(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class ServingOptions:
    """A model.json `serving` block, checked; None where the block says nothing."""

    cache_policy: str | None = None  # on | off | auto
    batching: str | None = None  # on | off
    batch_max_rows: int | None = None
    batch_max_wait_ms: float | None = None

    @classmethod
    def from_json(cls, block: Any) -> ServingOptions:
        """The options of `{"cache_policy": "off", "batching": "on", ...}` (ServingError if
        a key is unknown or a value not allowed)."""
        if not isinstance(block, dict):
            raise ServingError("serving must be an object")
        allowed: dict[str, Callable[[Any], bool]] = {
            "cache_policy": lambda v: v in CACHE_POLICIES,
            "batching": lambda v: v in SWITCH,
            "batch_max_rows": _count,
            "batch_max_wait_ms": _duration,
        }
        for key, value in block.items():
            if key not in allowed:
                raise ServingError(f"unknown serving option {key!r} (known: {', '.join(allowed)})")
            if not allowed[key](value):
                raise ServingError(f"serving.{key} = {value!r} is not allowed")
        return cls(**block)

    def to_json(self) -> dict[str, Any]:
        """What the block said (model.json's form)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class ModelServing:
    """How one model version is served, settled from the settings and its model.json."""

    cache_policy: str  # on | off | auto ("off" without Redis)
    batching: bool
    batch_max_rows: int
    batch_max_wait_ms: float
    # Caching declared off (in the settings or model.json), not merely not worth it or
    # without Redis: then nobody may reuse its answers, the balancer's L1 included.
    declared_off: bool = False


def settle(settings: Settings, model: str, options: ServingOptions) -> ModelServing:
    """This model's serving: a per-model entry in the settings wins, then the model's own
    `serving` block, then the settings' default. No Redis: no cache."""
    cache, batching = settings.cache.policy, settings.batching.enabled
    policy = cache.explicit(model) or options.cache_policy or cache.default
    switch = batching.explicit(model) or options.batching or batching.default
    return ModelServing(
        cache_policy=policy if settings.cache.redis_url else "off",
        batching=switch == "on",
        batch_max_rows=options.batch_max_rows or settings.batching.max_rows,
        batch_max_wait_ms=float(
            options.batch_max_wait_ms if options.batch_max_wait_ms is not None else settings.batching.max_wait_ms
        ),
        declared_off=policy == "off",
    )


class ServingPolicy:
    """What each served model version is served with, settled once per version, and the
    `auto` cache decision the data plane takes for it (service.dataplane.predictor)."""

    def __init__(self, settle_model: Callable[[LoadedModel], ModelServing]) -> None:
        self._settle = settle_model
        self._settled: dict[Identity, ModelServing] = {}
        self._uses_cache: dict[Identity, bool] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> ServingPolicy:
        """The policy of a replica: `settle` over its settings and each model's options."""
        return cls(lambda model: settle(settings, model.name, model.serving))

    def of(self, model: LoadedModel) -> ModelServing:
        """How `model` is served."""
        key = (model.name, model.version, model.identity)
        settled = self._settled.get(key)
        if settled is None:
            settled = self._settled[key] = self._settle(model)
        return settled

    def cache_decision(self, model: LoadedModel) -> bool | None:
        """Whether this version's results go through the cache (None: auto, not decided yet)."""
        return self._uses_cache.get((model.name, model.version, model.identity))

    def decide(self, model: LoadedModel, uses_cache: bool) -> None:
        """Remember whether this version's results go through the cache."""
        self._uses_cache[(model.name, model.version, model.identity)] = uses_cache

    def forget_all_but(self, served: set[Identity]) -> None:
        """Drop what was settled for versions no longer served."""
        self._settled = {key: s for key, s in list(self._settled.items()) if key in served}
        self._uses_cache = {key: u for key, u in list(self._uses_cache.items()) if key in served}
