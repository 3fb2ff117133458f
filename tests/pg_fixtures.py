"""Fixtures of the prod profile: a real Postgres server (Debian's, installed by `make postgres`) started for the
session on a free loopback port in a temporary folder, and a fresh set of the platform's databases on it per
test. Import them into a test module: `from .pg_fixtures import postgres, prod_env`."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from tooling.postgres import PostgresServer


@pytest.fixture(scope="session")
def postgres():
    # Not under pytest's tmp_path: as root, Postgres runs as the `postgres` user, who cannot enter root's
    # private pytest folders; mkdtemp's folder (0700) is handed over to it by the server.
    folder = tempfile.mkdtemp(prefix="mlp-pg-")
    server = PostgresServer(folder, durable=False).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def prod_env(postgres, monkeypatch) -> dict[str, str]:
    """The prod profile's settings for fresh databases (Dagster, MLflow, audit, lakeFS KV), exported."""
    env = postgres.fresh_databases()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
