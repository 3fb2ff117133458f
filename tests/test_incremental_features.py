"""Features per batch partition, on real lakeFS, DuckDB and dbt: separate runs of two partitions write separate
lakeFS paths and both reach main; a batch is scored and monitored from its own partition only; a full rebuild
reproduces the same features; runs share no local file; a changed feature definition changes the code version."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from assets.features import BATCH_MODELS, build_features, dbt_select, ensure_manifest, model_code_version
from assets.ingestion import build_ingestion
from assets.monitoring import build_monitoring, previous_partitions
from assets.serving import build_serving
from assets.training import labelled_window
from mlplatform.batches import Landing, window
from resources.io import load_asset
from resources.lakefs import run_branch
from resources.publish import publish_run
from sensors.arrivals import FEATURE_ASSETS, INGEST_ASSETS, LABEL_ASSETS, build_arrivals
from tooling.simulator import Simulator

from .helpers import K, car_loan, key, node, resources_for

ROOT = Path(__file__).resolve().parent.parent
P1, P2 = "2018-10-01", "2018-11-01"


@pytest.fixture(scope="module")
def spec():
    return car_loan()


# --- plain logic ------------------------------------------------------------------------------------------

def test_dbt_selects_models_by_file_path_so_features_does_not_pull_in_reference_features(spec):
    models = {n["name"]: n for n in ensure_manifest(spec)["nodes"].values() if n["resource_type"] == "model"}
    assert dbt_select(["features"], models) == ["+path:models/features/features.sql"]
    assert dbt_select(["stg_labels", "nope"], models) == ["+path:models/staging/stg_labels.sql"]


def test_a_changed_feature_macro_or_feature_expression_changes_the_feature_code_version(spec):
    manifest = ensure_manifest(spec)
    node = next(n for n in manifest["nodes"].values() if n["name"] == "features")
    before = model_code_version(manifest, node, spec)
    assert model_code_version(manifest, node, spec) == before  # deterministic
    macros = {k: dict(v) for k, v in manifest["macros"].items()}
    uid = next(k for k in macros if k.endswith(".feature_select"))
    macros[uid]["macro_sql"] += "\n-- changed"
    assert model_code_version({**manifest, "macros": macros}, node, spec) != before
    eng = spec.engineered_features[0]
    other = eng.model_copy(update={"expression": f"({eng.expression}) + 1"})
    changed = dataclasses.replace(spec, engineered_features=(other, *spec.engineered_features[1:]))
    assert model_code_version(manifest, node, changed) != before
    # and the partitioned Dagster assets carry it as their code version (what marks partitions stale in the UI)
    batch = build_features(spec)[1]
    assert batch.partitions_def is not None
    assert batch.code_versions_by_key[dg.AssetKey([spec.name, "features"])] == before


def test_training_reads_only_batches_that_start_by_the_cutoff(spec):
    keys = ["2018-10-01", "2018-11-01", "2018-12-01", "2019-01-01"]
    assert labelled_window(spec, keys, dt.datetime(2018, 11, 15)) == ["2018-10-01", "2018-11-01"]
    assert labelled_window(spec, keys, dt.datetime(2018, 9, 1)) == []


def test_the_drift_plot_reads_a_bounded_number_of_earlier_reports(spec):
    assert previous_partitions(spec, "2019-03-01", 2) == ["2019-01-01", "2019-02-01"]
    assert previous_partitions(spec, "2018-10-01", 12) == []


def test_arrival_jobs_build_a_batch_from_its_partition_only():
    assert {"stg_records", "features"} <= set(INGEST_ASSETS) and "stg_labels" in LABEL_ASSETS
    assert not {"reference_features", "stg_reference_records"} & set(INGEST_ASSETS + LABEL_ASSETS + FEATURE_ASSETS)


# --- services ---------------------------------------------------------------------------------------------

def ingest(spec, lakefs, state, instance, batches: int = 2, labels: bool = False):
    """reference_data and the first `batches` batches' raw records (and labels) published on main."""
    res = resources_for(lakefs, state, spec)
    assets = [*build_ingestion(spec), *build_features(spec)]
    released = Simulator(spec, Landing(state / "landing" / spec.name)).release(batches)

    def run(selection, partition=None):
        r = dg.materialize(assets, selection=K(*selection), partition_key=partition, instance=instance, resources=res)
        assert publish_run(instance, lakefs, r.run_id).status == "published"
        return r

    run(["reference_data"])
    for p in released.records:
        run(["raw_records", "raw_labels"] if labels and p in released.labels else ["raw_records"], p)
    return res, assets, run


def open_for_writing(pids: set[int], under: Path, exclude: Path) -> set[str]:
    """Files under `under` (not under `exclude`) that any of `pids` has open for writing right now."""
    out = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                flags = int(next(line.split()[1] for line in open(f"/proc/{pid}/fdinfo/{fd}")
                                 if line.startswith("flags:")), 8)
            except (OSError, StopIteration, ValueError):
                continue
            if flags & 0o3 and target.startswith(str(under)) and not target.startswith(str(exclude)):
                out.add(target)
    return out


def process_tree(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo.extend(int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split())
        except OSError:
            pass
    return found


@pytest.mark.services
def test_two_partitions_built_in_concurrent_runs_write_separate_paths_share_no_local_file_and_both_reach_main(
        spec, lakefs, state, instance):
    ingest(spec, lakefs, state, instance)
    env = {**os.environ, "MLP_STATE_DIR": str(state), "PYTHONPATH": str(ROOT)}
    procs = {p: subprocess.Popen([sys.executable, "-m", "tests.incremental_run", instance.root_directory, p],
                                 cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in (P1, P2)}
    written: dict[str, set[str]] = {p: set() for p in procs}
    while any(proc.poll() is None for proc in procs.values()):
        for p, proc in procs.items():
            written[p] |= open_for_writing(process_tree(proc.pid), state, Path(instance.root_directory))
        time.sleep(0.05)
    runs = {}
    for p, proc in procs.items():
        out, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]
        runs[p] = json.loads(out.strip().splitlines()[-1])
        assert runs[p]["success"], err[-3000:]
    # Each run wrote its own DuckDB file (the monitor saw it), and no file was written by both.
    for p in procs:
        assert any(f"/duckdb/runs/{spec.name}/{runs[p]['run_id']}/" in f for f in written[p]), (p, written[p])
    assert not written[P1] & written[P2], written[P1] & written[P2]
    # Nothing of either run is left in the state folder: no shared DuckDB database, no per-run file.
    assert not list(state.rglob("*.duckdb")) and not list(state.rglob("*.duckdb.wal"))
    # Both runs merge into main without conflict, each at its own partition path holding its own batch only.
    for p in (P1, P2):
        assert publish_run(instance, lakefs, runs[p]["run_id"]).status == "published"
    on_main = set(lakefs.list_paths("main", "assets/car_loan/features/"))
    assert {f"assets/car_loan/features/partition={P1}/data.parquet",
            f"assets/car_loan/features/partition={P2}/data.parquet"} <= on_main
    for p in (P1, P2):
        start, end = window(spec, p)
        feats = load_asset(lakefs, key("features"), partition=p)
        raw = load_asset(lakefs, key("raw_records"), partition=p)
        assert feats.height == raw.height > 0
        assert feats[spec.time_column].min() >= start and feats[spec.time_column].max() < end
        assert set(feats["origin"].unique()) == {"production"}
    # The two partitions were built on branches made from the same main: neither run's commit touched the other
    commits = {p: instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=key("features"), asset_partitions=[p]), limit=1).records[0] for p in (P1, P2)}
    assert commits[P1].run_id != commits[P2].run_id


@pytest.mark.services
def test_a_full_rebuild_reproduces_identical_features(spec, lakefs, state, instance):
    res, assets, run = ingest(spec, lakefs, state, instance, labels=True)
    for p in (P1, P2):
        run(["stg_records", "stg_labels", "features"], p)
    before = {(m, p): load_asset(lakefs, key(m), partition=p) for m in BATCH_MODELS for p in (P1, P2)}
    # The full rebuild: the rebuild_features job over every partition (what a backfill of all partitions runs).
    job = build_arrivals(spec)["jobs"][-1]
    assert job.name == "car_loan__rebuild_features"
    defs = dg.Definitions(assets=assets, jobs=[job], resources=res)
    for p in (P1, P2):
        result = defs.get_job_def("car_loan__rebuild_features").execute_in_process(partition_key=p, instance=instance)
        assert result.success
        assert publish_run(instance, lakefs, result.run_id).status == "published"
        assert {e.asset_key.path[-1] for e in result.get_asset_materialization_events()} == set(FEATURE_ASSETS)
    for (m, p), old in before.items():
        new = load_asset(lakefs, key(m), partition=p)
        assert new.equals(old), (m, p)
    assert before[("stg_labels", P1)].height > 0  # the labelled batch's labels were rebuilt too, not empty


@pytest.mark.services
def test_a_batch_is_scored_and_monitored_from_its_own_partition_while_another_has_no_features(
        spec, lakefs, state, instance, mlflow_uri):
    from .helpers import quick_training_set
    from .test_models import train_and_publish

    res, assets, run = ingest(spec, lakefs, state, instance)
    run(["stg_reference_records", "stg_reference_labels", "reference_features"])
    run(["stg_records", "features"], P2)  # P1's features are never built: no file, no materialization
    assert not lakefs.list_paths("main", f"assets/car_loan/features/partition={P1}/")
    train_and_publish(spec, quick_training_set(spec, n=4000), lakefs, state, instance, mlflow_uri,
                      num_boost_round=8, num_leaves=3)
    res = resources_for(lakefs, state, spec, mlflow_uri)
    scoring = [*build_serving(spec), *build_monitoring(spec)]
    result = dg.materialize([*assets, *scoring], selection=K("batch_predictions", "drift_report"), partition_key=P2,
                            instance=instance, resources=res)
    assert result.success
    feats = load_asset(lakefs, key("features"), partition=P2)
    scored = load_asset(lakefs, key("batch_predictions"), ref=run_branch(result.run_id), partition=P2)
    assert scored.height == feats.height > 0
    assert scored[spec.id_column].sort().equals(feats[spec.id_column].sort())
    drift = result.asset_materializations_for_node(node("drift_report"))[0].metadata
    assert drift["rows"].value == feats.height
