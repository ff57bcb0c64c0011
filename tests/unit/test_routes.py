"""One route table (service.web.routes) read by every door: the Flask app, the fast lane, the
OpenAPI document and the balancer's L1 location all serve exactly its routes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.app import create_app
from service.dataplane.handlers import HANDLERS
from service.settings import Settings
from service.web.fastlane import LANES
from service.web.openapi import openapi_document
from service.web.routes import PREDICTION_ROUTES, ROUTES, compiled, nginx_prediction_pattern, openapi_path

ROOT = Path(__file__).resolve().parents[2]


def table() -> set[tuple[str, str]]:
    return {(route.method, route.rule) for route in ROUTES}


def test_the_flask_app_serves_exactly_the_table(models_dir):
    app = create_app(Settings.from_env({"SERVICE_MODELS_DIR": str(models_dir), "REDIS_URL": ""}))
    served = {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }
    assert served == table()
    views = {rule.rule: rule.endpoint.split(".")[-1] for rule in app.url_map.iter_rules()}
    assert all(views[route.rule] == route.view for route in ROUTES)


def test_the_fast_lane_serves_exactly_the_prediction_routes_with_the_data_planes_handlers():
    assert {rule for _, rule, _ in LANES} == {route.rule for route in PREDICTION_ROUTES}
    assert set(HANDLERS) == {route.view for route in PREDICTION_ROUTES}
    pattern = compiled(next(r for r in ROUTES if r.rule.endswith("/versions/<model:version>/infer")))
    match = pattern.match("/v2/models/iris/versions/2/infer")
    assert match is not None and match.groupdict() == {"name": "iris", "version": "2"}
    assert pattern.match("/v2/models/ir:is/versions/2/infer") is None, "names have no colon"


def test_the_fast_lane_imports_no_flask():
    code = (
        "import sys, service.web.fastlane; print(sorted(m for m in sys.modules if m.startswith(('flask', 'werkzeug'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_openapi_document_lists_exactly_the_table():
    paths = openapi_document("test")["paths"]
    listed = {(method.upper(), path) for path, item in paths.items() for method in item}
    assert listed == {(route.method, openapi_path(route)) for route in ROUTES}


def test_the_balancers_l1_location_is_the_tables_prediction_routes():
    template = (ROOT / "balancer" / "nginx.conf.template").read_text()
    locations = re.findall(r'location ~ "([^"]+)"', template)
    assert locations == [nginx_prediction_pattern()]
    l1 = re.compile(nginx_prediction_pattern())
    for route in ROUTES:
        path = route.rule.replace("<model:name>", "iris").replace("<model:version>", "2")
        assert bool(l1.match(path)) is route.prediction, path


@pytest.mark.parametrize("path", ["/v2/repository/models/iris/load", "/v1/models/iris", "/v2/models/iris/ready"])
def test_no_other_route_goes_through_the_l1(path):
    assert re.match(nginx_prediction_pattern(), path) is None
