"""Fixtures: a real lakeFS server (started here unless LAKEFS_ENDPOINT is given), a real MLflow store,
a real Dagster instance. Each test gets its own lakeFS repository and state folder."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import dagster as dg
import pytest

from tooling.services import LakeFSServer, free_port
from resources.lakefs import LakeFSResource

os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session")
def lakefs_env(tmp_path_factory):
    """Endpoint and keys of a real lakeFS: the caller's (LAKEFS_ENDPOINT) or one started for the session."""
    if os.environ.get("MLP_TEST_EXTERNAL_LAKEFS") == "1" and os.environ.get("LAKEFS_ENDPOINT"):
        yield {k: os.environ[k] for k in ("LAKEFS_ENDPOINT", "LAKEFS_ACCESS_KEY_ID", "LAKEFS_SECRET_ACCESS_KEY")}
        return
    server = LakeFSServer(tmp_path_factory.mktemp("lakefs"), port=free_port()).start()
    try:
        yield server.env()
    finally:
        server.stop()


@pytest.fixture
def state(tmp_path, monkeypatch):
    """A private state folder (landing zone, DuckDB file, MLflow store) for one test."""
    monkeypatch.setenv("MLP_STATE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def lakefs(lakefs_env, monkeypatch) -> LakeFSResource:
    """A new repository name on the real server, and the env vars the definitions read. The repository is
    NOT created here: the platform must create it itself, as it does for a new user."""
    for k, v in lakefs_env.items():
        monkeypatch.setenv(k, v)
    repo = f"t-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("LAKEFS_REPOSITORY", repo)
    res = LakeFSResource(endpoint=lakefs_env["LAKEFS_ENDPOINT"], access_key_id=lakefs_env["LAKEFS_ACCESS_KEY_ID"],
                         secret_access_key=lakefs_env["LAKEFS_SECRET_ACCESS_KEY"], repository=repo)
    return res


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"  # the folder is made by the platform, not here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def instance(tmp_path):
    """A real, persistent (SQLite) Dagster instance in a temporary DAGSTER_HOME."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as inst:
        yield inst


ROOT = Path(__file__).resolve().parent.parent


# Test tiers. A test that uses a real service (through these fixtures, or marked so) is `services`;
# `daemon` and `faults` are end to end; every other test is `unit`: no services, fast (`make test-fast`).
SERVICE_FIXTURES = {"lakefs_env", "lakefs", "mlflow_uri"}
END_TO_END = ("services", "daemon", "faults", "slow")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)
        if not any(item.get_closest_marker(name) for name in END_TO_END):
            item.add_marker(pytest.mark.unit)
