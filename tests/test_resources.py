"""The one resource factory: the CLI and the Dagster definitions get the same resources for the same environment,
the definitions read no secret or endpoint at import, and prod names the setting it lacks. No services needed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import dagster as dg
import pytest

from mlplatform.audit import AuditTrail
from mlplatform.spec import SettingError
from resources.environment import ENV_VARS, Settings, build_resources
from tooling import cli

ROOT = Path(__file__).resolve().parent.parent


def environment(tmp_path: Path, env: str) -> dict[str, str]:
    return {"MLP_ENV": env, "MLP_STATE_DIR": str(tmp_path / "state"),
            "LAKEFS_ENDPOINT": "https://lakefs.example.com", "LAKEFS_ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE01",
            "LAKEFS_SECRET_ACCESS_KEY": "s3cr3t-example", "LAKEFS_REPOSITORY": "ml",
            "LAKEFS_STORAGE_NAMESPACE": "s3://bucket/ml", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "MLFLOW_UI_URL": "https://mlflow.example.com"}


@pytest.fixture
def clean_env(monkeypatch):
    for var in ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("MLP_DATASET", raising=False)
    return monkeypatch


def load_definitions() -> dg.Definitions:
    spec = importlib.util.spec_from_file_location("mlp_definitions_under_test", ROOT / "platform" / "definitions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.defs


def configuration(resources: dict) -> dict:
    """Every resource's configuration as Dagster resolves it when a run starts (EnvVars read then)."""
    resources = {k: v for k, v in resources.items() if k != "io_manager"}  # configured by its `lakefs`
    with dg.build_resources(resources) as built:
        return {k: getattr(built, k).model_dump() for k in resources}


def test_the_cli_and_the_definitions_get_the_same_resources_for_the_same_environment(clean_env, tmp_path):
    env = environment(tmp_path, "prod")
    for k, v in env.items():
        clean_env.setenv(k, v)
    defs = load_definitions()
    cli_side = configuration(cli._resources())
    assert configuration(defs.resources) == cli_side
    assert cli_side["lakefs"]["storage_namespace"] == "s3://bucket/ml" == cli._lakefs().storage_namespace
    assert cli_side["mlflow"]["ui_url"] == "https://mlflow.example.com" == cli._mlflow().ui_url
    assert cli_side["duckdb"]["lakefs"] == cli_side["lakefs"]  # DuckDB reaches lakeFS through that resource
    assert cli._audit().path == tmp_path / "state" / "audit" / "audit.db"

    # Secrets and endpoints are resolved when a run starts, not when the definitions are loaded.
    clean_env.setenv("LAKEFS_ENDPOINT", "https://lakefs-2.example.com")
    clean_env.setenv("LAKEFS_SECRET_ACCESS_KEY", "rotated")
    later = configuration(defs.resources)
    assert (later["lakefs"]["endpoint"], later["lakefs"]["secret_access_key"]) == ("https://lakefs-2.example.com",
                                                                                    "rotated")
    assert later["duckdb"]["lakefs"]["endpoint"] == "https://lakefs-2.example.com"


@pytest.mark.parametrize("env", ["local", "prod"])
def test_the_factory_gives_dagster_and_everything_else_the_same_configuration(clean_env, tmp_path, env):
    for k, v in environment(tmp_path, env).items():
        clean_env.setenv(k, v)
    settings = Settings.from_env()
    assert configuration(build_resources(settings, deferred=True)) == configuration(build_resources(settings))


def test_local_settings_honour_the_storage_namespace_and_the_mlflow_ui_url(clean_env, tmp_path):
    env = {**environment(tmp_path, "local")}
    resources = build_resources(Settings.from_env(env))
    assert resources["lakefs"].storage_namespace == "s3://bucket/ml"
    assert resources["mlflow"].ui_url == "https://mlflow.example.com"


@pytest.mark.parametrize("missing", ["LAKEFS_STORAGE_NAMESPACE", "MLFLOW_UI_URL", "LAKEFS_SECRET_ACCESS_KEY",
                                     "LAKEFS_REPOSITORY"])
def test_prod_without_a_required_setting_names_it(clean_env, tmp_path, capsys, missing):
    env = environment(tmp_path, "prod")
    del env[missing]
    with pytest.raises(SettingError, match=missing):
        Settings.from_env(env)
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert cli.main(["publish"]) == 1
    err = capsys.readouterr().err
    assert missing in err and "MLP_ENV=prod" in err and "s3cr3t-example" not in err


def test_local_needs_nothing_until_a_command_uses_lakefs_and_then_names_what_is_missing(clean_env, tmp_path):
    clean_env.setenv("MLP_STATE_DIR", str(tmp_path))
    settings = Settings.from_env()
    assert settings.lakefs_repository == "mlplatform" and settings.mlflow_ui_url == "http://127.0.0.1:5000"
    assert "mlflow" not in build_resources(settings)  # no tracking URI: nothing pretends to have one
    with pytest.raises(SettingError, match="LAKEFS_ENDPOINT, LAKEFS_ACCESS_KEY_ID, LAKEFS_SECRET_ACCESS_KEY"):
        cli._lakefs()
    with pytest.raises(SettingError, match="MLFLOW_TRACKING_URI"):
        cli._mlflow()


def test_the_audit_trail_stays_where_the_library_puts_it(clean_env, tmp_path):
    clean_env.setenv("MLP_STATE_DIR", str(tmp_path))
    assert Path(build_resources()["audit"].path) == AuditTrail().path == tmp_path / "audit" / "audit.db"
    clean_env.setenv("MLP_AUDIT_DB", str(tmp_path / "elsewhere.db"))
    assert Path(build_resources()["audit"].path) == AuditTrail().path == tmp_path / "elsewhere.db"


def test_settings_travel_to_a_subprocess_through_the_environment(tmp_path):
    settings = Settings.from_env(environment(tmp_path, "prod")).replace(landing_settle_seconds=0.0)
    assert Settings.from_env(settings.to_env()) == settings


def test_a_changed_state_folder_or_data_set_carries_what_derives_from_it(tmp_path):
    settings = Settings(state_dir=tmp_path / "a", dataset="car_loan", mlflow_experiment="shared")
    moved = settings.replace(state_dir=tmp_path / "b", dataset="other")
    assert moved.audit_path == tmp_path / "b" / "audit" / "audit.db"
    assert (moved.mlflow_model_name, moved.mlflow_experiment) == ("other-model", "shared")  # given: kept
    assert settings.replace(audit_path=tmp_path / "x.db", state_dir=tmp_path / "c").audit_path == tmp_path / "x.db"


def test_a_malformed_setting_is_named(clean_env):
    with pytest.raises(SettingError, match="MLP_ENV"):
        Settings.from_env({"MLP_ENV": "staging"})
    with pytest.raises(SettingError, match="MLP_LANDING_SETTLE_SECONDS"):
        Settings.from_env({"MLP_LANDING_SETTLE_SECONDS": "ten"})
