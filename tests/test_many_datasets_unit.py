"""Many data sets, without services: which specs are live, the names of a data set's slice, which data set a run
belongs to, the operator's one table of every model, and a code location that imports no heavy library."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dagster as dg
import pytest

from mlplatform.spec import SettingError, dataset_specs, live_dataset_names
from resources.naming import dataset_of_run, ns

from .conftest import ROOT


def test_live_data_sets_come_from_mlp_datasets_else_mlp_dataset_else_every_bundled_spec(monkeypatch, tmp_path):
    monkeypatch.delenv("MLP_DATASETS", raising=False)
    monkeypatch.delenv("MLP_DATASET", raising=False)
    assert live_dataset_names() == ["car_loan", "car_price"]
    monkeypatch.setenv("MLP_DATASET", "car_price")
    assert [s.name for s in dataset_specs()] == ["car_price"]  # the singular setting: exactly that one
    copy = tmp_path / "loans_eu.yaml"
    copy.write_text((ROOT / "platform" / "datasets" / "car_loan.yaml").read_text()
                    .replace("name: car_loan", "name: loans_eu"))
    monkeypatch.setenv("MLP_DATASETS", f" car_loan , {copy} ")
    assert [s.name for s in dataset_specs()] == ["car_loan", "loans_eu"]  # MLP_DATASETS wins


def test_two_specs_with_one_name_are_an_error_naming_both_files(monkeypatch, tmp_path):
    twin = tmp_path / "twin.yaml"
    twin.write_text((ROOT / "platform" / "datasets" / "car_loan.yaml").read_text())  # still named car_loan
    with pytest.raises(SettingError, match=r"car_loan\.yaml and .*twin\.yaml are both named 'car_loan'"):
        dataset_specs(["car_loan", str(twin)])


def test_a_data_sets_names_carry_its_name():
    n = ns("car_price")
    assert n.key("raw_records") == dg.AssetKey(["car_price", "raw_records"])
    assert n.key(dg.AssetKey("features")) == dg.AssetKey(["car_price", "features"])
    assert n.key_str("features") == "car_price/features" and n.selection(["a", "b"]) == "car_price/a,car_price/b"
    assert n.job("ingest_batch") == "car_price__ingest_batch" and n.group("training") == "car_price_training"
    assert n.partition_tags("2017-02-20") == {"mlp/dataset": "car_price", "mlp/partition": "car_price/2017-02-20"}


def test_a_run_belongs_to_the_data_set_of_its_tag_its_job_or_its_assets():
    def run(job="__ASSET_JOB", tags=None, keys=None):
        return dg.DagsterRun(job_name=job, run_id="r", tags=tags or {},
                             asset_selection=frozenset(keys) if keys else None)

    assert dataset_of_run(run(tags={"mlp/dataset": "car_price"})) == "car_price"
    assert dataset_of_run(run(job="car_loan__retrain")) == "car_loan"
    assert dataset_of_run(run(keys=[dg.AssetKey(["car_price", "raw_records"])])) == "car_price"
    assert dataset_of_run(run(keys=[dg.AssetKey(["car_price", "a"]), dg.AssetKey(["car_loan", "b"])])) is None
    assert dataset_of_run(run(keys=[dg.AssetKey("toy")])) is None  # an asset of no data set
    assert dataset_of_run(None) is None


def test_a_partitioned_jobs_runs_carry_the_data_set_and_its_partition_however_launched():
    from sensors.arrivals import build_arrivals
    from mlplatform.spec import load_spec

    jobs = {j.name: j for j in build_arrivals(load_spec("car_price"))["jobs"]}
    job = jobs["car_price__ingest_batch"]
    assert job.tags == {"mlp/dataset": "car_price"}
    assert job.config.get_tags_for_partition_key("2017-02-20") == {
        "mlp/dataset": "car_price", "mlp/partition": "car_price/2017-02-20", "dagster/partition": "2017-02-20"}


def test_the_run_queue_limits_one_run_per_partition_of_a_data_set_and_one_training_overall():
    import yaml

    limits = yaml.safe_load((ROOT / "platform" / "dagster.yaml").read_text())["concurrency"]["runs"]
    by_key = {lim["key"]: lim for lim in limits["tag_concurrency_limits"]}
    assert by_key["mlp/partition"]["value"] == {"applyLimitPerUniqueValue": True} and by_key["mlp/partition"]["limit"] == 1
    assert "dagster/partition" not in by_key  # it would hold car_price's 2018-11 behind car_loan's
    assert by_key["retrain/trigger"]["limit"] == 1 and "value" not in by_key["retrain/trigger"]
    assert limits["max_concurrent_runs"] == 4


def test_mlp_status_shows_every_model_in_one_table():
    from tooling.cli import status_table

    def state(name, champion, drift=None):
        return {"dataset": name, "model": f"{name}-model",
                "aliases": {"champion": {"version": champion}} if champion else {}, "last_retrain": None,
                "last_decision": None, "last_batch": "2019-05-01" if champion else None, "latest_drift": drift,
                "freshness": {"raw_records": "PASS", "features": "FAIL"}, "pending_triggers": []}

    text = status_table([state("car_loan", "3", {"partition": "2019-05-01", "n_alerts": 4,
                                                 "multivariate_alert": True}), state("car_price", None)])
    header, rule, loan, price = text.splitlines()
    assert header.split()[:3] == ["data", "set", "champion"]
    assert loan.split()[:3] == ["car_loan", "v3", "-"] and "4 alert(s), multivariate" in loan
    assert "features=FAIL" in loan
    assert price.split()[:3] == ["car_price", "-", "-"]


def test_loading_the_code_location_imports_no_heavy_library():
    """polars, numpy, pandas, requests and the run-time libraries are imported on first use, not by the
    definitions: loading many data sets costs their graph, not their libraries (bench/bench_foundation.py)."""
    code = ("import runpy, sys, json; runpy.run_path('platform/definitions.py'); "
            "print(json.dumps(sorted(m for m in ('polars', 'numpy', 'pandas', 'requests', 'mlflow', 'lightgbm', "
            "'nannyml', 'dagster_dbt', 'duckdb') if m in sys.modules)))")
    env = {**os.environ, "LAKEFS_ENDPOINT": "http://127.0.0.1:1", "LAKEFS_ACCESS_KEY_ID": "k",
           "LAKEFS_SECRET_ACCESS_KEY": "s", "MLFLOW_TRACKING_URI": "sqlite:///:memory:"}
    env.pop("MLP_DATASET", None)
    env.pop("MLP_DATASETS", None)
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
