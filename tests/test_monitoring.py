"""Monitoring assets on bad production input: a clear message in the report and a failed check where it
must block, never a crash with a stack trace and never a silent NaN."""

import dagster as dg
import polars as pl
import pytest

from assets.monitoring import build_monitoring
from mlplatform.batches import window
from mlplatform.features import online_features
from resources.io import load_asset
from resources.lakefs import run_branch
from resources.partitions import partitions_def
from resources.publish import publish_run

from .helpers import K, car_loan, key, production_rows, resources_for

PARTITION = "2019-03-01"


@pytest.fixture(scope="module")
def spec():
    return car_loan()


@pytest.fixture(scope="module")
def features(spec):
    reference, _, _ = spec.load_source()
    ref = pl.from_pandas(reference).select(spec.raw_columns).with_columns(
        pl.col(spec.time_column).str.to_datetime(time_unit="us"))
    start, end = window(spec, PARTITION)
    prod = production_rows(spec, start, end)
    return pl.concat([online_features(ref, spec).with_columns(pl.lit("reference").alias("origin")),
                      online_features(prod, spec).with_columns(pl.lit("production").alias("origin"))])


def drift(spec, table, lakefs, state, instance):
    # Stand-ins for the dbt models: the batch's partition of `features` and the history's `reference_features`.
    @dg.asset(name="features", key_prefix=["car_loan"], partitions_def=partitions_def(spec))
    def stub_features() -> pl.DataFrame:
        return table.filter(pl.col("origin") == "production")

    @dg.asset(name="reference_features", key_prefix=["car_loan"])
    def stub_reference_features() -> pl.DataFrame:
        return table.filter(pl.col("origin") == "reference")

    drift_report = build_monitoring(spec)[0]
    res = resources_for(lakefs, state, spec)
    ref = dg.materialize([stub_reference_features], instance=instance, resources=res)
    publish_run(instance, lakefs, ref.run_id)
    return dg.materialize([stub_features, drift_report], instance=instance, partition_key=PARTITION,
                          selection=K("features", "drift_report"), raise_on_error=False, resources=res)


def checks(result):
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def test_a_healthy_batch_passes_and_reports_numbers(spec, features, lakefs, state, instance):
    result = drift(spec, features, lakefs, state, instance)
    assert result.success
    c = checks(result)
    assert c["drift_inputs_usable"].passed and c["drift_chunks_informative"].passed
    report = load_asset(lakefs, key("drift_report"), ref=run_branch(result.run_id), partition=PARTITION)
    ok = report.filter(pl.col("status") == "ok")
    assert ok.height > 0 and ok["value"].null_count() == 0 and not ok["value"].is_nan().any()


def test_a_production_column_of_another_type_blocks_with_a_clear_message(spec, features, lakefs, state, instance):
    bad = features.with_columns(pl.when(pl.col("origin") == "production").then(pl.lit("n/a"))
                                .otherwise(pl.col("car_value").cast(pl.String)).alias("car_value"))
    result = drift(spec, bad, lakefs, state, instance)
    assert not result.success  # the blocking check fails the run: nothing is published
    msg = checks(result)["drift_inputs_usable"].description
    assert "car_value" in msg and "type" in msg


def test_an_all_null_column_is_reported_and_warned_not_computed_as_nan(spec, features, lakefs, state, instance):
    bad = features.with_columns(pl.when(pl.col("origin") == "production").then(None)
                                .otherwise(pl.col("driver_tenure")).alias("driver_tenure"))
    result = drift(spec, bad, lakefs, state, instance)
    assert result.success
    warn = checks(result)["drift_chunks_informative"]
    assert not warn.passed and "driver_tenure" in warn.description and "null" in warn.description
    report = load_asset(lakefs, key("drift_report"), ref=run_branch(result.run_id), partition=PARTITION)
    rows = report.filter(pl.col("feature") == "driver_tenure")
    assert rows.height > 0  # the report has the column's rows: the checks below are about something
    assert rows["value"].null_count() == rows.height and (rows["status"] != "ok").all()
