"""dbt in the step's process (resources/dbt_runner.py): builds in one process, the project parsed once, each build
into its own DuckDB file from its own tables; the run's settings are in the environment only while dbt runs; a
failing model is reported by name with dbt's error. Real dbt and DuckDB on local Parquet files (no service)."""

from __future__ import annotations

import os

import duckdb
import polars as pl
import pytest

import resources.dbt_runner as dbt_runner
from assets.features import DBT_DIR, dbt_select, dbt_vars, ensure_manifest
from mlplatform import contracts
from resources.dbt_runner import dbt_build
from resources.duckdb import extension_dir

from .helpers import car_loan


@pytest.fixture(scope="module")
def spec():
    return car_loan()


@pytest.fixture(scope="module")
def batch_files(spec, tmp_path_factory):
    """Two raw_records files of different sizes, shaped as ingestion writes them."""
    folder = tmp_path_factory.mktemp("raw")
    _, production, _ = spec.load_source()
    prod = contracts.conform(pl.from_pandas(production), spec, "production")
    files = {}
    for rows in (40, 90):
        files[rows] = folder / f"raw_records_{rows}.parquet"
        prod.head(rows).with_columns(pl.lit("batch.csv").alias("_source_file")).write_parquet(files[rows])
    return files


def _build(spec, tmp_path, run: str, raw, secret: str = "k"):
    models = {n["name"]: n for n in ensure_manifest(spec)["nodes"].values() if n["resource_type"] == "model"}
    database = tmp_path / run / "batch_models.duckdb"  # the same file name in every run, as run_database gives
    database.parent.mkdir(parents=True)
    env = {**os.environ, "MLP_DUCKDB_PATH": str(database), "MLP_DUCKDB_EXT_DIR": str(extension_dir(tmp_path)),
           "MLP_S3_SECRET_ACCESS_KEY": secret}
    tables = {"reference_data": None, "raw_records": str(raw), "raw_labels": None}
    out = dbt_build(DBT_DIR, dbt_select(["stg_records", "features"], models), dbt_vars(spec, tables),
                    dbt_vars(spec), env, tmp_path / run / "target")
    return out, database


def _rows(database) -> int:
    con = duckdb.connect(str(database), read_only=True)
    try:
        return con.execute("select count(*) from main.features").fetchone()[0]
    finally:
        con.close()


def test_builds_in_one_process_each_read_their_own_tables_into_their_own_database_with_one_parse(
        spec, batch_files, tmp_path):
    before = dict(os.environ)
    dbt_runner._MANIFESTS.clear()
    for run, rows in (("a", 40), ("b", 90), ("c", 40)):
        out, database = _build(spec, tmp_path, run, batch_files[rows], secret=f"secret-{run}")
        assert out.success, out.output
        assert {r["status"] for r in out.results.values()} <= {"success", "pass"}
        assert _rows(database) == rows  # this run's table, not the one the manifest was parsed (or first built) with
    assert len(dbt_runner._MANIFESTS) == 1  # parsed once for the three builds
    # the run's settings were in the environment for the invocation only
    assert dict(os.environ) == before


def test_a_failing_model_is_reported_by_name_with_dbt_error_and_its_dependants_skipped(spec, tmp_path):
    out, _ = _build(spec, tmp_path, "bad", tmp_path / "no-such-batch.parquet")
    assert not out.success and out.returncode != 0
    by_name = {uid.split(".")[-1]: r for uid, r in out.results.items() if uid.startswith("model.")}
    assert by_name["stg_records"]["status"] == "error"
    assert "no-such-batch.parquet" in by_name["stg_records"]["message"]
    assert by_name["features"]["status"] == "skipped"
    assert "stg_records" in out.output
