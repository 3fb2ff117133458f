"""The bad-input catalogue: each bad landing file gives a clear error, main keeps its commit, the bad file
goes to quarantine with a reason, and the good files of the same batch are not lost."""

import datetime as dt
import json

import dagster as dg
import polars as pl
import pytest

from assets.ingestion import build_ingestion
from mlplatform.batches import window
from resources.lakefs import run_branch
from resources.io import load_asset

from .helpers import car_loan, production_rows, resources_for

PARTITION = "2018-11-01"


@pytest.fixture(scope="module")
def spec():
    return car_loan()


@pytest.fixture(scope="module")
def good(spec):
    start, end = window(spec, PARTITION)
    return production_rows(spec, start, end, n=300)


def land(state, spec, name: str, content) -> None:
    d = state / "landing" / spec.name / "records" / PARTITION
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    if isinstance(content, pl.DataFrame):
        if name.endswith(".csv"):
            content.write_csv(path)
        else:
            content.write_parquet(path)
    else:
        path.write_bytes(content)


def ingest(spec, lakefs, state, instance):
    assets = build_ingestion(spec)
    return dg.materialize(assets, selection=["raw_records"], partition_key=PARTITION, instance=instance,
                          resources=resources_for(lakefs, state, spec), raise_on_error=False)


def failed_checks(result) -> dict[str, str]:
    return {e.check_name: e.description for e in result.get_asset_check_evaluations() if not e.passed}


def later(df, spec, col, value):
    return df.with_columns(pl.lit(value).alias(col))


CASES = {
    # name: (bad file name, make bad frame/bytes, check that fails, text the error names)
    "missing_column": ("b.parquet", lambda g, s: g.drop("car_value"), "files_readable", "missing column(s) ['car_value']"),
    "extra_column": ("b.parquet", lambda g, s: g.with_columns(pl.lit(1).alias("surprise")), "files_readable",
                     "unexpected column(s) ['surprise']"),
    "wrong_type": ("b.parquet", lambda g, s: g.with_columns(pl.lit("lots").alias("car_value")), "files_readable",
                   "column 'car_value' should be Float64"),
    "null_id": ("b.parquet", lambda g, s: g.with_columns(pl.when(pl.int_range(pl.len()) < 3).then(None)
                                                        .otherwise(pl.col("id")).alias("id")),
                "ids_and_times_present", "3 row(s) have no 'id' in ['b.parquet']"),
    "null_time": ("b.parquet", lambda g, s: g.with_columns(pl.lit(None, dtype=pl.Datetime("us")).alias("timestamp")),
                  "ids_and_times_present", "no 'timestamp'"),
    "duplicate_ids": ("b.parquet", lambda g, s: pl.concat([g.head(5), g.head(5)]), "unique_ids", "share an id"),
    "out_of_range": ("b.parquet", lambda g, s: g.with_columns(pl.lit(7.5).alias("debt_to_income_ratio")),
                     "values_in_range", "'debt_to_income_ratio' outside [0, 1]"),
    "outside_partition": ("b.parquet", lambda g, s: g.with_columns(
        pl.lit(dt.datetime(2019, 3, 1)).cast(pl.Datetime("us")).alias("timestamp")),
        "event_time_in_partition", "outside the partition"),
    "future_event_time": ("b.parquet", lambda g, s: g.with_columns(
        pl.lit(dt.datetime(2099, 1, 1)).cast(pl.Datetime("us")).alias("timestamp")),
        "event_time_in_partition", "in the future"),
    "corrupt_file": ("b.parquet", lambda g, s: b"PAR1\x00\x01garbage-not-parquet", "files_readable",
                     "cannot be read as parquet"),
    "wrong_format": ("b.json", lambda g, s: b'{"id": 1}', "files_readable", "unsupported file format '.json'"),
    "header_only": ("b.csv", lambda g, s: g.head(0), "files_readable", "has no rows"),
    "schema_change_mid_stream": ("b.parquet", lambda g, s: g.rename({"loan_length": "loan_term"}),
                                 "files_readable", "missing column(s) ['loan_length']"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_landing_file_is_rejected_and_main_keeps_its_commit(case, spec, good, lakefs, state, instance):
    name, make, check, text = CASES[case]
    land(state, spec, "a.parquet", good.slice(150, 150))   # a good file of the same batch
    bad = make(good.slice(0, 150), spec)
    land(state, spec, name, bad)
    before = lakefs.head()
    result = ingest(spec, lakefs, state, instance)
    assert not result.success
    failures = failed_checks(result)
    assert check in failures, failures
    assert text in failures[check], failures[check]
    assert lakefs.head() == before  # main untouched
    q = state / "landing" / spec.name / "quarantine" / "records" / PARTITION
    assert (q / name).exists(), "the bad file is kept in quarantine"
    reason = json.loads((q / f"{name}.reason.json").read_text())
    assert reason["file"].endswith(name) and reason["reason"]
    assert (state / "landing" / spec.name / "records" / PARTITION / "a.parquet").exists(), "good file kept"
    # The good file's rows are on the run's kept branch for inspection.
    kept = load_asset(lakefs, "raw_records", ref=run_branch(result.run_id), partition=PARTITION)
    assert "a.parquet" in set(kept["_source_file"].to_list())


def test_an_empty_batch_blocks(spec, lakefs, state, instance):
    (state / "landing" / spec.name / "records" / PARTITION).mkdir(parents=True)
    before = lakefs.head()
    result = ingest(spec, lakefs, state, instance)
    assert not result.success
    assert "no readable file landed" in failed_checks(result)["not_empty"]
    assert lakefs.head() == before


def test_unseen_categories_warn_but_do_not_block(spec, good, lakefs, state, instance):
    land(state, spec, "a.parquet", good.with_columns(
        pl.when(pl.int_range(pl.len()) < 4).then(pl.lit("1M+ €")).otherwise(pl.col("salary_range"))
        .alias("salary_range")))
    result = ingest(spec, lakefs, state, instance)
    assert result.success
    warn = [e for e in result.get_asset_check_evaluations() if e.check_name == "known_categories"][0]
    assert not warn.passed and warn.severity == dg.AssetCheckSeverity.WARN
    assert "'1M+ €'" in warn.description and "4 row(s)" in warn.description


def test_a_label_for_an_unknown_id_blocks(spec, good, lakefs, state, instance):
    from resources.publish import publish_run

    land(state, spec, "a.parquet", good)
    ok = ingest(spec, lakefs, state, instance)
    assert ok.success and publish_run(instance, lakefs, ok.run_id).status == "published"
    d = state / "landing" / spec.name / "labels" / PARTITION
    d.mkdir(parents=True)
    pl.DataFrame({"id": [good["id"][0], 987654321], "repaid": [1.0, 0.0]}).write_parquet(d / "labels.parquet")
    before = lakefs.head()
    result = dg.materialize(build_ingestion(spec), selection=["raw_labels"], partition_key=PARTITION,
                            instance=instance, resources=resources_for(lakefs, state, spec), raise_on_error=False)
    assert not result.success
    assert "1 label(s) are for ids never seen" in failed_checks(result)["labels_for_known_ids"]
    assert lakefs.head() == before
