"""Settings: read once from the environment, typed, failing fast with the variable's name."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from balancer.settings import settings_table as balancer_table
from service.settings import Settings, SettingsError, settings_table
from tests.support.repository import copy_model_version


def test_defaults_and_overrides():
    settings = Settings.from_env({"SERVICE_WORKERS": "3", "SERVICE_MODELS_DIR": "/m", "SERVICE_REPLICA_ID": "a"})
    assert (settings.server.workers, settings.models.models_dir, settings.server.replica_id) == (3, Path("/m"), "a")
    assert settings.server.keepalive_s > 60, "gunicorn keep-alive must outlive nginx's upstream keepalive"
    assert settings.redis_pool_size == settings.server.worker_connections
    assert Settings.from_env({"SERVICE_REPLICA_ID": ""}).server.replica_id == socket.gethostname()
    assert Settings.from_env({}).server.metrics_path.name == f"pcluster-metrics-{socket.gethostname()}"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SERVICE_WORKERS": "two"}, "SERVICE_WORKERS='two'"),
        ({"SERVICE_WORKERS": "0"}, "SERVICE_WORKERS must be positive"),
        ({"SERVICE_MAX_BODY_BYTES": "-1"}, "SERVICE_MAX_BODY_BYTES must be positive"),
        ({"SERVICE_CACHE_POLICY": "iris=maybe"}, "SERVICE_CACHE_POLICY='iris=maybe'"),
        ({"SERVICE_BATCHING": "sometimes"}, "SERVICE_BATCHING='sometimes'"),
        ({"SERVICE_BREAKER_BACKOFF_S": "30"}, "SERVICE_BREAKER_BACKOFF_S"),
        ({"SERVICE_DRAIN_DELAY_S": "40"}, "SERVICE_DRAIN_DELAY_S must be below"),
        ({"SERVICE_BATCH_MAX_WAIT_MS": "-1"}, "SERVICE_BATCH_MAX_WAIT_MS must be >= 0"),
        ({"SERVICE_LOG_LEVEL": "loud"}, "SERVICE_LOG_LEVEL must be one of"),
    ],
)
def test_bad_values_fail_fast_naming_the_variable(env, message):
    with pytest.raises(SettingsError, match=message.replace("[", "\\[")):
        Settings.from_env(env)


def serving(env: dict[str, str], model: str, from_model_json: dict | None = None):
    from service.models.serving import ServingOptions, settle

    return settle(Settings.from_env(env), model, ServingOptions.from_json(from_model_json or {}))


def test_cache_policy_per_model():
    assert serving({"SERVICE_CACHE_POLICY": "iris=off, *=on"}, "iris").cache_policy == "off"
    assert serving({"SERVICE_CACHE_POLICY": "iris=off, *=on"}, "digits").cache_policy == "on"
    assert serving({"SERVICE_CACHE_POLICY": "off"}, "digits").cache_policy == "off"
    assert serving({"SERVICE_CACHE_POLICY": "digits=on"}, "iris").cache_policy == "auto"
    assert serving({}, "iris").cache_policy == "auto", "auto is the default"
    assert serving({"REDIS_URL": ""}, "digits").cache_policy == "off", "no Redis, no cache"


def test_model_json_sits_between_the_settings_default_and_a_per_model_setting():
    from_model = {"cache_policy": "off", "batching": "off", "batch_max_rows": 8, "batch_max_wait_ms": 1}
    chosen = serving({"SERVICE_CACHE_POLICY": "on", "SERVICE_BATCHING": "on"}, "digits", from_model)
    assert (chosen.cache_policy, chosen.batching, chosen.batch_max_rows, chosen.batch_max_wait_ms) == (
        "off",
        False,
        8,
        1,
    )
    explicit = serving(
        {"SERVICE_CACHE_POLICY": "digits=on", "SERVICE_BATCHING": "digits=on,*=off"}, "digits", from_model
    )
    assert (explicit.cache_policy, explicit.batching) == ("on", True)
    assert serving({"SERVICE_BATCHING": "digits=on,*=off"}, "iris").batching is False


def test_a_bad_serving_block_in_model_json_refuses_the_model(tmp_path):
    from service.models.artifacts import ModelError, load_model
    from service.models.serving import ServingError, ServingOptions

    options = ServingOptions.from_json({"batching": "off", "batch_max_rows": 4})
    assert options.to_json() == {"batching": "off", "batch_max_rows": 4}
    for bad in ({"batching": "maybe"}, {"batch_max_rows": 0}, {"batch_max_rows": True}, {"speed": "fast"}, []):
        with pytest.raises(ServingError):
            ServingOptions.from_json(bad)
    models = tmp_path / "models"
    shutil.copytree(Path(__file__).resolve().parents[2] / "models" / "iris", models / "iris")
    folder = copy_model_version(models, "iris", "2", serving={"batching": "maybe"})
    with pytest.raises(ModelError, match="serving.batching = 'maybe' is not allowed"):
        load_model(folder)


def test_the_settings_page_is_generated_from_the_declarations_whole():
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "scripts/settings_doc.py", "--check"], cwd=root, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    page = (root / "docs" / "settings.md").read_text()
    assert settings_table() in page and balancer_table() in page


def test_the_check_fails_on_a_stale_page(tmp_path, monkeypatch):
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("settings_doc", root / "scripts" / "settings_doc.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stale = tmp_path / "settings.md"
    stale.write_text(module.document().replace("SERVICE_MODELS_DIR", "SERVICE_MODEL_DIR"))
    monkeypatch.setattr(module, "DOC", stale)
    assert module.main(["--check"]) == 1


def test_the_redis_password_comes_from_a_file_read_at_start(tmp_path):
    secret = tmp_path / "redis_password"
    secret.write_text("s3cret\n")
    settings = Settings.from_env({"REDIS_URL": "redis://redis:6379/0", "REDIS_PASSWORD_FILE": str(secret)})
    assert settings.cache.redis_url == "redis://redis:6379/0"
    assert settings.cache.connection_url() == "redis://:s3cret@redis:6379/0"
    for problem, content in (("cannot be read", None), ("is empty", "\n")):
        missing = tmp_path / f"other-{problem}"
        if content is not None:
            missing.write_text(content)
        with pytest.raises(SettingsError, match=f"REDIS_PASSWORD_FILE .* {problem}"):
            Settings.from_env({"REDIS_URL": "redis://redis:6379/0", "REDIS_PASSWORD_FILE": str(missing)})


def _groups():
    """Every group of settings in the project, each declared with declare.setting."""
    from dataclasses import fields

    from balancer.settings import BalancerSettings, env_name
    from loadtest.settings import BenchSettings, ShapeSettings
    from localcluster.settings import ClusterSettings
    from service.settings import GROUPS

    return fields, env_name, [*GROUPS.values(), BalancerSettings, ClusterSettings, BenchSettings, ShapeSettings]


def test_every_part_declares_its_settings_one_way_and_the_page_shows_each():
    from service.settings.declare import Group

    fields, env_name, groups = _groups()
    page = (Path(__file__).resolve().parents[2] / "docs" / "settings.md").read_text()
    variables = [f.metadata["env"] for group in groups for f in fields(group)]
    assert all(issubclass(group, Group) for group in groups)
    assert len(variables) == len(set(variables)), "a variable declared twice"
    assert [v for v in variables if f"`{v}`" not in page] == []
    from balancer.settings import BalancerSettings

    assert all(f.metadata["env"] == env_name(f.name) for f in fields(BalancerSettings))


def test_the_benchmarks_and_the_local_cluster_check_their_settings_at_start():
    from loadtest.settings import ShapeSettings
    from localcluster.settings import ClusterSettings

    with pytest.raises(SettingsError, match="LOAD_SHAPE must be one of step, spike, got 'ramp'"):
        ShapeSettings.from_env({"LOAD_SHAPE": "ramp"})
    with pytest.raises(SettingsError, match="CLUSTER_REDIS_TOPOLOGY must be one of single, cluster, sentinel"):
        ClusterSettings.from_env({"CLUSTER_REDIS_TOPOLOGY": "galaxy"})
    # As a user meets it: the CLI says which variable, and starts nothing.
    env = {"PATH": "/usr/bin:/bin", "CLUSTER_UPSTREAM_SLOTS": "eight"}
    done = subprocess.run(
        [sys.executable, "-m", "localcluster", "status"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "CLUSTER_UPSTREAM_SLOTS='eight'" in done.stderr, done.stderr


def test_a_fresh_clusters_status_reads_calm_and_a_lost_record_says_what_happens():
    from localcluster.__main__ import record_reading

    assert record_reading(3, {"state": "ok"}) == ""
    assert record_reading(0, {"state": "missing"}) == "; no operator change yet: every model on disk serves"
    lost = record_reading(4, {"state": "missing"})
    assert lost == "; record in Redis missing: the replicas serve on and write it back"
    bad = record_reading(4, {"state": "malformed", "problem": "not JSON"})
    assert bad == "; record in Redis malformed (not JSON): the replicas serve on and write it back"
