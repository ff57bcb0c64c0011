"""Per-app state, kept in `app.extensions["prediction"]` rather than module globals."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from service.cache.results import ResultCache
from service.dataplane.admission import Admission
from service.dataplane.predictor import Predictor
from service.metrics import Metrics
from service.models.convergence import RepositoryStore
from service.models.registry import ModelRegistry
from service.settings import Settings


@dataclass
class ServiceState:
    """What the views need: settings, models, the data plane, metrics."""

    settings: Settings
    registry: ModelRegistry
    predictor: Predictor
    metrics: Metrics
    cache: ResultCache | None
    draining: bool = False  # set on SIGTERM by service.worker
    closing: bool = False  # after the drain delay: every request but /healthz gets a 503
    # Whether this replica's other workers have loaded their models too (gunicorn).
    peers_ready: Callable[[], bool] = lambda: True
    # The shared desired model state (None: no Redis, or SERVICE_REPOSITORY_POLL_S=0).
    repository: Callable[[], RepositoryStore] | None = None
    # This worker's queue discipline (service.dataplane.admission).
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.settings.server.latency_objective_ms)

    def is_ready(self) -> bool:
        """Every model found has loaded (in every worker), and not draining."""
        return not self.draining and self.registry.ready and self.peers_ready()
