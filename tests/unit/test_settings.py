"""Settings: read once from the environment, typed, failing fast with the variable's name."""

from pathlib import Path

import pytest

from service.settings import Settings, SettingsError, settings_table


def test_defaults_and_overrides():
    settings = Settings.from_env({"SERVICE_WORKERS": "3", "SERVICE_MODELS_DIR": "/m", "SERVICE_REPLICA_ID": "a"})
    assert (settings.workers, settings.models_dir, settings.replica_id) == (3, Path("/m"), "a")
    assert settings.keepalive_s > 60, "gunicorn keep-alive must outlive nginx's upstream keepalive"
    assert settings.redis_pool_size == settings.worker_connections


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SERVICE_WORKERS": "two"}, "SERVICE_WORKERS='two'"),
        ({"SERVICE_WORKERS": "0"}, "SERVICE_WORKERS must be positive"),
        ({"SERVICE_MAX_BODY_BYTES": "-1"}, "SERVICE_MAX_BODY_BYTES must be positive"),
        ({"SERVICE_CACHE_POLICY": "iris=maybe"}, "cache policy item"),
        ({"SERVICE_BREAKER_BACKOFF_S": "30"}, "SERVICE_BREAKER_BACKOFF_S"),
        ({"SERVICE_LOG_LEVEL": "loud"}, "SERVICE_LOG_LEVEL"),
    ],
)
def test_bad_values_fail_fast(env, message):
    with pytest.raises(SettingsError, match=message.replace("[", "\\[")):
        Settings.from_env(env)


def test_cache_policy_per_model():
    settings = Settings.from_env({"SERVICE_CACHE_POLICY": "iris=off, *=on"})
    assert settings.cache_policy_for("iris") == "off"
    assert settings.cache_policy_for("digits") == "on"
    assert Settings.from_env({"SERVICE_CACHE_POLICY": "off"}).cache_policy_for("digits") == "off"
    assert Settings.from_env({"SERVICE_CACHE_POLICY": "digits=on"}).cache_policy_for("iris") == "auto"
    assert Settings.from_env({}).cache_policy_for("iris") == "auto", "auto is the default"
    assert Settings.from_env({"REDIS_URL": ""}).cache_policy_for("digits") == "off"


def test_readme_documents_every_setting():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for line in settings_table().splitlines()[2:]:
        variable = line.split("`")[1]
        assert f"`{variable}`" in readme, f"README does not document {variable}"
