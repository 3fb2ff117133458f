"""Closing the loop: the server's prediction log becomes the `online_predictions` asset in lakeFS, one
partition per batch period, idempotently (a re-run after more requests holds every row once)."""

import datetime as dt
import json

import dagster as dg
import polars as pl

from assets.online import build_online
from mlplatform.serving.predlog import PredictionLog, spool_dir, wait_written
from resources.io import load_asset
from resources.publish import publish_run

from .helpers import car_loan, key, production_rows, resources_for


def logged(spec, rows: pl.DataFrame, start: int, variant: str, version: str, shadow: bool = False) -> list[dict]:
    out = []
    for i, r in enumerate(rows.to_dicts()):
        out.append({"request_id": f"req-{start + i}", "row_index": 0, "entity_id": str(r[spec.id_column]),
                    "predicted_at": dt.datetime(2026, 11, 29, 1, 0), "event_time": r[spec.time_column],
                    "variant": variant, "model_version": version, "shadow": shadow, "routing_mode": "canary",
                    "prediction": 0.25, "latency_ms": 0.4,
                    "policy_flags": json.dumps({"driver_tenure": "missing:native_missing"}) if i % 10 == 0 else "{}",
                    **{f: r[f] for f in spec.feature_names}})
    return out


def test_logged_online_predictions_are_ingested_into_lakefs_per_partition(lakefs, state, instance):
    spec = car_loan()
    rows = production_rows(spec, dt.datetime(2018, 11, 1), dt.datetime(2018, 12, 1), n=300)
    partition = "2018-11-01"
    plog = PredictionLog(spec, spool_dir(spec), batch_rows=100, flush_seconds=0.2)
    plog.add(logged(spec, rows.head(200), 0, "champion", "1"))
    plog.add(logged(spec, rows.head(50), 0, "challenger", "2", shadow=True))
    assert wait_written(plog, 250)
    res = resources_for(lakefs, state, spec)
    assets = build_online(spec)[:1]  # online_predictions alone (the monitoring assets need MLflow and more)

    def materialize():
        result = dg.materialize(assets, partition_key=partition, instance=instance, resources=res,
                                raise_on_error=False)
        assert result.success
        assert publish_run(instance, lakefs, result.run_id).status == "published"
        return load_asset(lakefs, key("online_predictions"), partition=partition)

    first = materialize()
    assert first.height == 250
    assert first.filter(pl.col("shadow")).select("variant", "model_version").unique().rows() == [("challenger", "2")]
    assert first.filter(pl.col("policy_flags") != "{}").height == 20 + 5

    # more requests arrive; the same files are read again, nothing is counted twice
    plog.add(logged(spec, rows.tail(100), 200, "champion", "1"))
    assert wait_written(plog, 350)
    plog.close()
    second = materialize()
    assert second.height == 350
    assert second.select("request_id", "row_index", "shadow").n_unique() == 350
    assert set(second["entity_id"]) == {str(i) for i in rows[spec.id_column]}


def test_a_partition_with_no_logged_prediction_fails_naming_the_folder(lakefs, state, instance):
    spec = car_loan()
    result = dg.materialize(build_online(spec)[:1], partition_key="2019-01-01", instance=instance,
                            resources=resources_for(lakefs, state, spec), raise_on_error=False)
    assert not result.success
    error = result.get_step_failure_events()[0].step_failure_data.error
    failure = error.message + (error.cause.message if error.cause else "")
    assert str(spool_dir(spec) / "2019-01-01") in failure
