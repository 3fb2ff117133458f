"""The whole graph on real lakeFS, DuckDB/dbt and MLflow, for each data-set spec (configuration alone):
ingestion, dbt features, point-in-time training set, model, gate, batch scoring, monitoring; and the
same features in training and serving."""

import math

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
from mlplatform.features import online_features
from tooling.simulator import Simulator
from resources.io import load_asset
from mlplatform.spec import load_spec
from resources.naming import ns

from .helpers import materialize_and_publish, resources_for


@pytest.mark.parametrize("dataset", ["car_loan", "car_price"])
def test_a_data_set_runs_through_the_whole_graph_by_configuration_alone(dataset, lakefs, mlflow_uri, state,
                                                                         instance, monkeypatch):
    monkeypatch.setenv("MLP_DATASET", dataset)
    spec = load_spec(dataset)
    assets = [*build_ingestion(spec), *build_features(spec), *build_training(spec), *build_evaluation(spec),
              *build_serving(spec), *build_monitoring(spec)]
    res = resources_for(lakefs, state, spec, mlflow_uri)
    n = ns(spec)
    sim = Simulator(spec, Landing(state / "landing" / spec.name))
    released = sim.release(3)
    assert released.labels, "the label delay lets the first batch's labels arrive"

    def run(selection, partition=None):
        return materialize_and_publish(assets, n.keys(*selection), instance, res, lakefs, partition)

    run(["reference_data"])
    for p in released.records:  # each batch's features are built from its own partition, as the arrivals jobs do
        batch = ["raw_records", "stg_records", "features"]
        run(batch + ["raw_labels", "stg_labels"] if p in released.labels else batch, p)
    trained = run(["stg_reference_records", "stg_reference_labels", "reference_features", "labelled_examples",
                   "training_set", "candidate_model", "evaluation_report", "model_card"])
    m = res["mlflow"].scoped(spec)
    assert registry.aliases(m)["champion"] == "1"
    ts_commit = trained.asset_materializations_for_node(f"{spec.name}__training_set")[0].metadata["lakefs_commit"].value
    assert registry.version_tags(m, "1")["lakefs_commit"] == ts_commit
    ts = load_asset(lakefs, n.key("training_set"))
    assert set(ts["split"].unique()) == {"train", "validation", "test"}
    assert ts[spec.time_column].is_sorted() or ts.sort(spec.time_column)[spec.time_column].equals(ts[spec.time_column])

    # Same features in training and serving: the dbt table and the online path agree row for row.
    features = pl.concat([load_asset(lakefs, n.key("features"), partition=p) for p in released.records])
    sample = features.filter(pl.col("origin") == "production").sample(200, seed=1).sort(spec.id_column)
    _, production, _ = spec.load_source()
    raw = pl.from_pandas(production).filter(pl.col(spec.id_column).is_in(sample[spec.id_column].implode()))
    online = online_features(raw.select(spec.raw_columns).with_columns(
        pl.col(spec.time_column).str.to_datetime(time_unit="us")), spec).sort(spec.id_column)
    for col in spec.model_feature_names:
        a, b = sample[col], online[col]
        if a.dtype.is_float():
            assert (a - b).abs().max() < 1e-9, col
        else:
            assert a.cast(pl.String).to_list() == b.cast(pl.String).to_list(), col

    last = released.records[-1]
    run(["batch_predictions", "drift_report", "performance_estimate", "data_quality_report"], last)
    preds = load_asset(lakefs, n.key("batch_predictions"), partition=last)
    assert preds.height > 0 and set(preds["model_version"].unique()) == {"1"}
    assert preds["input_commit"][0]  # each row keeps the lakeFS commit of its input
    est = load_asset(lakefs, n.key("performance_estimate"), partition=last)
    value = est["estimated"][0]
    assert isinstance(value, float) and math.isfinite(value), value  # a number: not None, not NaN
    drift = load_asset(lakefs, n.key("drift_report"), partition=last)
    assert set(drift["feature"].unique()) >= set(spec.feature_names)
