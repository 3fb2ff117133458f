"""A burst of batches on real lakeFS, DuckDB/dbt and MLflow: three batches landed at once become ONE ingest run
and ONE scoring run over their partition range (the sensors' requests, run as the daemon runs them, published as
the publish sensor publishes them). Each partition lands at its own lakeFS path on main with its own
materialization; a batch whose only file is bad is withheld (its file quarantined with the reason, main never
sees it) while the good batches of the range publish."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from assets.evaluation import build_evaluation
from assets.features import build_features
from assets.ingestion import build_ingestion
from assets.monitoring import build_monitoring
from assets.serving import build_serving
from assets.training import build_training
from mlplatform.batches import Landing, partition_keys
from resources.io import asset_path, load_asset
from resources.naming import ns
from resources.partitions import WITHHELD
from resources.publish import publish_run
from sensors.arrivals import build_arrivals, plan_arrivals
from sensors.publish import scoring_request
from tooling.simulator import Simulator

from .helpers import car_loan, materialize_and_publish, resources_for

INGESTED = ("raw_records", "stg_records", "features", "data_quality_report")
SCORED = ("batch_predictions", "drift_report", "performance_estimate")


def materializations(instance, key, partition):
    return instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]),
                                           limit=10).records


@pytest.mark.services
def test_a_burst_of_three_batches_is_one_ingest_run_and_one_scoring_run_and_a_bad_batch_is_withheld(
        lakefs, mlflow_uri, state, instance):
    spec = car_loan()
    n = ns(spec)
    assets = [*build_ingestion(spec), *build_features(spec), *build_training(spec), *build_evaluation(spec),
              *build_serving(spec), *build_monitoring(spec)]
    arrivals = build_arrivals(spec)
    res = resources_for(lakefs, state, spec, mlflow_uri)
    defs = dg.Definitions(assets=assets, jobs=arrivals["jobs"], resources=res)
    zone = Landing(state / "landing" / spec.name, settle_seconds=0)
    sim = Simulator(spec, zone)

    # A champion, trained on the history.
    materialize_and_publish(assets, n.keys("reference_data"), instance, res, lakefs)
    materialize_and_publish(assets, n.keys("stg_reference_records", "stg_reference_labels", "reference_features",
                                           "labelled_examples", "training_set", "candidate_model",
                                           "evaluation_report", "model_card"), instance, res, lakefs)

    burst = sim.release(3).records
    assert len(burst) == 3
    good1, bad, good2 = burst
    bad_dir = zone.records_dir(bad)
    for f in bad_dir.iterdir():  # the middle batch's only file is unreadable
        f.unlink()
    (bad_dir / "broken.parquet").write_bytes(b"PAR1\x00garbage-not-parquet")
    (bad_dir / "broken.parquet.done").touch()

    plan = plan_arrivals(instance, zone, list(partition_keys(spec)), None, dataset=n)
    (ingest,) = [r for r in plan.requests if r.job_name == n.job("ingest_batch")]
    assert ingest.partition_key is None
    assert (ingest.partition_key_range.start, ingest.partition_key_range.end) == (good1, good2)

    ran = defs.resolve_job_def(ingest.job_name).execute_in_process(instance=instance, tags=ingest.tags,
                                                                  raise_on_error=False)
    assert ran.success, [e.message for e in ran.all_events if e.is_failure]
    checks = {e.check_name: e for e in ran.get_asset_check_evaluations() if e.asset_key == n.key("raw_records")}
    assert checks["not_empty"].passed  # judged on the partitions it publishes ...
    assert not checks["files_quarantined"].passed and bad in checks["files_quarantined"].description
    assert "withheld" in checks["files_quarantined"].description  # ... and the withheld one named
    assert publish_run(instance, lakefs, ran.run_id).status == "published"

    # Scoring: one run over the same range, requested as the publish sensor requests it.
    score = scoring_request(instance, instance.get_run_by_id(ran.run_id))
    assert score is not None and score.partition_key is None
    assert (score.partition_key_range.start, score.partition_key_range.end) == (good1, good2)
    scored = defs.resolve_job_def(score.job_name).execute_in_process(
        instance=instance, tags=score.tags, asset_selection=list(score.asset_selection), raise_on_error=False)
    assert scored.success, [e.message for e in scored.all_events if e.is_failure]
    assert publish_run(instance, lakefs, scored.run_id).status == "published"
    assert len(instance.get_runs(dg.RunsFilter(job_name=n.job("ingest_batch")))) == 1
    assert len(instance.get_runs(dg.RunsFilter(job_name=n.job("score_batch")))) == 1

    for p in (good1, good2):
        for name, run in [*((a, ran) for a in INGESTED), *((a, scored) for a in SCORED)]:
            table = load_asset(lakefs, n.key(name), ref="main", partition=p)  # its own path, on main
            assert table.height > 0, (name, p)
            (mat, *_) = materializations(instance, n.key(name), p)
            meta = mat.asset_materialization.metadata
            assert mat.run_id == run.run_id and meta["lakefs_path"].value.endswith(
                asset_path(n.key(name), p, "parquet")), (name, p)
        features = load_asset(lakefs, n.key("features"), ref="main", partition=p)  # split out of ONE dbt build
        assert sorted(features[spec.id_column].to_list()) == sorted(
            load_asset(lakefs, n.key("raw_records"), ref="main", partition=p)[spec.id_column].to_list())
        preds = load_asset(lakefs, n.key("batch_predictions"), ref="main", partition=p)
        records = load_asset(lakefs, n.key("raw_records"), ref="main", partition=p)
        assert sorted(preds[spec.id_column].to_list()) == sorted(records[spec.id_column].to_list())
        assert load_asset(lakefs, n.key("drift_report"), ref="main", partition=p)["partition"].unique().to_list() == [p]

    for name in (*INGESTED, *SCORED):  # each asset of the range written by one lakeFS commit
        commits = {materializations(instance, n.key(name), p)[0].asset_materialization.metadata["lakefs_commit"].value
                   for p in (good1, good2)}
        assert len(commits) == 1, name

    # The bad batch: withheld everywhere, main untouched, its file quarantined with the reason.
    for name in (*INGESTED, *SCORED):
        assert not lakefs.exists("main", asset_path(n.key(name), bad, "parquet")), name
    (mat, *_) = materializations(instance, n.key("raw_records"), bad)
    assert WITHHELD in mat.asset_materialization.metadata and "lakefs_commit" not in mat.asset_materialization.metadata
    (reason_file,) = zone.quarantine_dir("records", bad).glob("*.reason.json")
    reason = json.loads(reason_file.read_text())
    assert reason["reason"] and reason["dagster_run_id"] == ran.run_id
    assert (zone.quarantine_dir("records", bad) / "broken.parquet").exists()
    assert not (bad_dir / "broken.parquet").exists()

    # Nothing of the burst is requested again.
    again = plan_arrivals(instance, zone, list(partition_keys(spec)), None, dataset=n)
    assert [r for r in again.requests if r.job_name == n.job("ingest_batch")] == []
