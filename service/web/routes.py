"""The one route table: every route a replica serves, read by each door that serves it.

The Flask app registers its views from it (service.web.views, service.web.operator), the fast
lane compiles its prediction routes from it (service.web.fastlane), the OpenAPI document
lists exactly its paths (service.web.openapi), and the balancer's L1 location must match
exactly its prediction routes (`nginx_prediction_pattern`, checked against
balancer/nginx.conf.template by the tests). A rule is Flask's (`<model:name>` is a model
name or version: service.models.registry.NAME_REGEX, no `/` or `:`), and is also the `route`
label of the request metrics, whichever door answered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from re import Pattern

from service.models.registry import NAME_REGEX


@dataclass(frozen=True)
class Route:
    """One method on one path."""

    method: str
    rule: str
    view: str  # the view function (and Flask endpoint) that answers it
    prediction: bool = False  # answered by the fast lane, through the balancer's L1
    operator: bool = False  # the model repository: the balancer's internal listener only


ROUTES: tuple[Route, ...] = (
    Route("GET", "/healthz", "healthz"),
    Route("GET", "/readyz", "readyz"),
    Route("GET", "/metrics", "metrics"),
    Route("GET", "/openapi.json", "openapi"),
    Route("POST", "/predict", "shortcut_predict", prediction=True),
    Route("GET", "/v1/models", "v1_models"),
    Route("GET", "/v1/models/<model:name>", "v1_model"),
    Route("POST", "/v1/models/<model:name>:predict", "v1_predict", prediction=True),
    Route("GET", "/v2", "v2_server"),
    Route("GET", "/v2/health/live", "v2_live"),
    Route("GET", "/v2/health/ready", "v2_ready"),
    Route("GET", "/v2/models/<model:name>", "v2_model"),
    Route("GET", "/v2/models/<model:name>/versions/<model:version>", "v2_model"),
    Route("GET", "/v2/models/<model:name>/config", "v2_model_config"),
    Route("GET", "/v2/models/<model:name>/versions/<model:version>/config", "v2_model_config"),
    Route("GET", "/v2/models/<model:name>/ready", "v2_model_ready"),
    Route("GET", "/v2/models/<model:name>/versions/<model:version>/ready", "v2_model_ready"),
    Route("POST", "/v2/models/<model:name>/infer", "v2_infer", prediction=True),
    Route("POST", "/v2/models/<model:name>/versions/<model:version>/infer", "v2_infer", prediction=True),
    Route("POST", "/v2/repository/index", "repository_index", operator=True),
    Route("POST", "/v2/repository/models/<model:name>/load", "repository_load", operator=True),
    Route("POST", "/v2/repository/models/<model:name>/unload", "repository_unload", operator=True),
    Route("POST", "/v2/repository/models/<model:name>/policy", "repository_policy", operator=True),
    Route("GET", "/v2/repository/status", "repository_status", operator=True),
)

PREDICTION_ROUTES = tuple(route for route in ROUTES if route.prediction)

_VARIABLE = re.compile(r"<model:(\w+)>")


def compiled(route: Route) -> Pattern[str]:
    """The route's path as a regular expression, a named group per variable."""
    parts = _VARIABLE.split(route.rule)  # literal, name, literal, name, ..., literal
    pattern = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{NAME_REGEX})" for i, part in enumerate(parts))
    return re.compile(f"^{pattern}$")


def openapi_path(route: Route) -> str:
    """The route's path as OpenAPI writes it (`{name}`)."""
    return _VARIABLE.sub(r"{\1}", route.rule)


def nginx_prediction_pattern() -> str:
    """The regular expression of the balancer's L1 location: the prediction routes' paths,
    a variable as any run of characters but `/` and `:` (the replica checks the name)."""
    paths = [_VARIABLE.sub("[^/:]+", route.rule)[1:] for route in PREDICTION_ROUTES]
    return f"^/({'|'.join(paths)})$"
