"""A data set given as files alone (no Python: a spec with `source: {reference:, production:}`) runs through the
whole graph on the real lakeFS, DuckDB/dbt and MLflow: ingestion, features, training, evaluation, batch scoring
and monitoring, each asset published on main and the model registered. The time column is stored as epoch
milliseconds, in a CSV reference and a Parquet + CSV production folder; the simulator lands it so too."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest

from assets.evaluation import build_evaluation
from assets.features import build_features
from assets.ingestion import build_ingestion
from assets.monitoring import build_monitoring
from assets.serving import build_serving
from assets.training import build_training
from mlplatform import registry
from mlplatform.batches import Landing
from mlplatform.sources import format_times, parse_times
from mlplatform.spec import dataset_name, dataset_spec, load_spec
from resources.io import load_asset
from tooling.simulator import Simulator

from .file_specs import write_spec
from .helpers import key, materialize_and_publish, resources_for

pytestmark = pytest.mark.services

BATCHES = ["2017-02-17", "2017-02-18", "2017-02-19"]


def car_price_as_files(folder) -> None:
    """car_price's rows, exported once through its loader, written as files with epoch-millisecond times:
    3000 reference rows (CSV), every 3rd production row of three days with its target (Parquet + CSV)."""
    reference, production, labels = load_spec("car_price").load_source()
    ref, prod = pl.from_pandas(reference), pl.from_pandas(production).join(pl.from_pandas(labels), on="id")

    def epoch_ms(df: pl.DataFrame) -> pl.DataFrame:
        t = parse_times(df["timestamp"], "datetime")
        return df.with_columns(format_times(t, "epoch_ms").alias("timestamp"))

    ref = epoch_ms(ref.head(3000))
    t = parse_times(prod["timestamp"], "datetime")
    prod = epoch_ms(prod.filter((t >= pl.datetime(2017, 2, 17)) & (t < pl.datetime(2017, 2, 20)))
                    .gather_every(3))
    (folder / "data" / "production").mkdir(parents=True)
    ref.write_csv(folder / "data" / "reference.csv")
    half = prod.height // 2
    prod.head(half).write_parquet(folder / "data" / "production" / "part-1.parquet")
    prod.tail(prod.height - half).write_csv(folder / "data" / "production" / "part-2.csv")


def test_a_data_set_of_files_runs_through_the_whole_graph_by_configuration(lakefs, mlflow_uri, state, instance,
                                                                           monkeypatch, tmp_path):
    car_price_as_files(tmp_path)
    monkeypatch.setenv("MLP_CACHE_DIR", str(tmp_path / "cache"))
    spec = write_spec(tmp_path, {"reference": "data/reference.csv", "production": "data/production/*"},
                      "epoch_ms", name="car_price_files", cadence="daily", start=BATCHES[0], end="2017-02-20")
    monkeypatch.setenv("MLP_DATASET", spec.path)
    assert dataset_name() == "car_price_files" and dataset_spec().loader == ""

    assets = [*build_ingestion(spec), *build_features(spec), *build_training(spec), *build_evaluation(spec),
              *build_serving(spec), *build_monitoring(spec)]
    res = resources_for(lakefs, state, spec, mlflow_uri)
    landing = Landing(state / "landing" / spec.name)
    released = Simulator(spec, landing).release(3)
    assert released.records == BATCHES and released.labels == BATCHES  # labels from the production files' target
    landed = pl.read_parquet(landing.records_dir(BATCHES[0]) / f"batch-{BATCHES[0]}.parquet")
    assert landed["timestamp"].dtype == pl.Int64, "landed as stored: epoch milliseconds"

    def run(selection, partition=None):
        return materialize_and_publish(assets, selection, instance, res, lakefs, partition)

    run(["reference_data"])
    for p in BATCHES:  # each batch's features from its own partition, as the arrivals jobs build them
        run(["raw_records", "stg_records", "features", "raw_labels", "stg_labels"], p)
    run(["stg_reference_records", "stg_reference_labels", "reference_features", "labelled_examples",
         "training_set", "candidate_model", "evaluation_report", "model_card"])
    last = BATCHES[-1]
    run(["batch_predictions", "drift_report", "performance_estimate", "data_quality_report"], last)

    on_main = set(lakefs.list_paths("main", "assets/"))
    for name in ["reference_data", "reference_features", "labelled_examples", "training_set", "candidate_model",
                 "evaluation_report", "model_card"]:
        assert any(p.startswith(f"assets/{spec.name}/{name}/") for p in on_main), (name, sorted(on_main)[:40])
    for name in ["raw_records", "raw_labels", "features"]:
        for p in BATCHES:
            assert any(x.startswith(f"assets/{spec.name}/{name}/partition={p}") for x in on_main), (name, p)
    for name in ["batch_predictions", "drift_report", "performance_estimate", "data_quality_report"]:
        assert any(x.startswith(f"assets/{spec.name}/{name}/partition={last}") for x in on_main), \
            (name, sorted(on_main)[:40])

    m = res["mlflow"].scoped(spec)
    assert registry.aliases(m).get("champion") == "1", "the model is registered and promoted"
    reference = load_asset(lakefs, key("reference_data", spec.name))
    assert reference.height == 3000 and reference["timestamp"].dtype == pl.Datetime("us")
    assert str(reference["timestamp"].min()) == "2017-01-24 08:00:00"  # epoch ms read back to the same times
    records = load_asset(lakefs, key("raw_records", spec.name), partition=last)
    assert records["timestamp"].dt.strftime("%Y-%m-%d").unique().to_list() == [last]
    preds = load_asset(lakefs, key("batch_predictions", spec.name), partition=last)
    assert preds.height == records.height and set(preds["model_version"].unique()) == {"1"}
