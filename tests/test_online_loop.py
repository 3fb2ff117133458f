"""The loop closed end to end on real lakeFS and MLflow, for a classification and a regression data set: a
champion and a challenger served over loopback with a canary share and a shadow, requests logged,
`online_predictions` ingested, online drift and estimates computed, then the batch's labels land and
`online_experiment_report` compares the variants with numbers that match the responses the clients got."""

import polars as pl
import pytest
import requests
import dagster as dg
from assets.ingestion import build_ingestion
from assets.online import build_online
from mlplatform import modeling, registry
from mlplatform.batches import Landing
from mlplatform.features import online_features
from mlplatform.serving.settings import LogSettings, RoutingSettings, ServingSettings
from resources.io import load_asset
from mlplatform.spec import load_spec
from tooling.simulator import Simulator

from .helpers import key, materialize_and_publish, node, quick_training_set, resources_for
from .test_serving_http import Served, request_rows

pytestmark = pytest.mark.services
MAX_REQUESTS = 1500


def register(tracking, spec, ts, seed: int, rounds: int, lakefs_commit: str) -> str:
    import mlflow

    trained = modeling.train(ts, spec, modeling.lgb_params(spec, {"num_leaves": 15}, seed), rounds, rounds)
    tracking.setup()
    with mlflow.start_run():
        mlflow.lightgbm.log_model(trained.booster, name="model")
        run_id = mlflow.active_run().info.run_id
    version = str(mlflow.register_model(f"runs:/{run_id}/model", tracking.model_name).version)
    tracking.client().set_model_version_tag(tracking.model_name, version, "lakefs_commit", lakefs_commit)
    return version


@pytest.mark.parametrize("dataset", ["car_loan", "car_price"])
def test_online_predictions_are_monitored_and_compared_once_labels_land(dataset, lakefs, mlflow_uri, state,
                                                                       instance, monkeypatch):
    from mlplatform.serving.app import create_app
    from mlplatform.serving.experiment import gate_verdict, metric_fn

    monkeypatch.setenv("MLP_DATASET", dataset)
    spec = load_spec(dataset)
    res = resources_for(lakefs, state, spec, mlflow_uri)
    tracking = res["mlflow"].tracking()
    ts = quick_training_set(spec, n=6000)
    reference, _, _ = spec.load_source()
    ref = pl.from_pandas(reference).select(spec.raw_columns)
    if ref.schema[spec.time_column] == pl.String:
        ref = ref.with_columns(pl.col(spec.time_column).str.to_datetime(time_unit="us"))

    # What the batch graph publishes upstream of the online assets (dbt stand-ins): the reference features and
    # the training set the versions were trained on (the estimates are fitted on each version's test split).
    @dg.asset(name="reference_features", key_prefix=[spec.name])
    def stub_reference_features() -> pl.DataFrame:
        return online_features(ref, spec)

    @dg.asset(name="training_set", key_prefix=[spec.name])
    def stub_training_set() -> pl.DataFrame:
        return ts

    published = materialize_and_publish([stub_reference_features, stub_training_set], None, instance, res, lakefs)
    commit = published.asset_materializations_for_node(node("training_set", spec.name))[0].metadata["lakefs_commit"].value
    # a poor champion (trained on shuffled labels) and a good challenger: the report must tell them apart
    shuffled = ts.with_columns(pl.col(spec.target).shuffle(seed=7))
    champion = register(tracking, spec, shuffled, seed=1, rounds=20, lakefs_commit=commit)
    challenger = register(tracking, spec, ts, seed=2, rounds=120, lakefs_commit=commit)
    registry.promote(tracking, champion)
    registry.set_alias(tracking, "challenger", challenger)

    # A batch lands (records now, its labels later); its records are what clients send.
    ingestion = build_ingestion(spec)
    sim = Simulator(spec, Landing(state / "landing" / spec.name))
    partition = None
    for _ in range(40):  # batches arrive until the first one's labels are due
        released = sim.release(1)
        if released.labels:
            partition = released.labels[0]
            break
    assert partition, "no batch's labels released"
    materialize_and_publish(ingestion, ["raw_records"], instance, res, lakefs, partition)
    records = load_asset(lakefs, key("raw_records", spec.name), partition=partition).head(MAX_REQUESTS)
    assert records.height >= 150, f"batch {partition} has {records.height} records"

    app = create_app(spec, tracking, ServingSettings(
        reload_seconds=1.0, compile=False, routing=RoutingSettings(mode="canary", canary_percent=40, shadow=True),
        log=LogSettings(batch_rows=200, flush_seconds=0.2)))
    served = Served(app)
    answers = []
    try:
        with requests.Session() as s:
            for row in request_rows(spec, records):  # one bounded request per row, over loopback
                r = s.post(f"{served.url}/v1/models/{tracking.model_name}/predict", json=row)
                assert r.status_code == 200, r.text
                b = r.json()
                answers.append({"entity_id": str(row[spec.id_column]), "variant": b["variant"],
                                "model_version": b["model_version"], "prediction": b["predictions"][0]})
    finally:
        served.stop()  # drains the shadow queue and flushes the prediction log
    answers = pl.DataFrame(answers)
    counts = dict(answers.group_by("variant").len().rows())
    assert set(counts) == {"champion", "challenger"}

    online = build_online(spec)
    assets = [*ingestion, *online, stub_reference_features, stub_training_set]
    materialize_and_publish(assets, ["online_predictions", "online_drift_report", "online_performance_estimate"],
                            instance, res, lakefs, partition)
    logged = load_asset(lakefs, key("online_predictions", spec.name), partition=partition)
    assert logged.filter(~pl.col("shadow")).height == records.height
    assert logged.filter(pl.col("shadow")).height == counts["champion"]  # the challenger shadows the champion
    drift = load_asset(lakefs, key("online_drift_report", spec.name), partition=partition)
    monitored = set(spec.model_feature_names)
    assert monitored <= set(drift["feature"]) and drift["value"].is_not_null().all()
    estimate = load_asset(lakefs, key("online_performance_estimate", spec.name), partition=partition)
    assert estimate.select("variant", "shadow", "model_version").sort("shadow", "variant").rows() == [
        ("challenger", False, challenger), ("champion", False, champion), ("challenger", True, challenger)]
    assert estimate["estimated"].is_finite().all() and (estimate["rows"] > 0).all()
    if spec.is_classification:
        assert estimate["estimated"].is_between(0, 1).all()

    # The labels land; the experiment report joins them to what was served.
    materialize_and_publish(assets, ["raw_labels"], instance, res, lakefs, partition)
    labels = load_asset(lakefs, key("raw_labels", spec.name), partition=partition)
    assert labels.height > 0
    materialize_and_publish(assets, ["online_experiment_report"], instance, res, lakefs, partition)
    report = load_asset(lakefs, key("online_experiment_report", spec.name), partition=partition)

    lab = labels.select(pl.col(spec.id_column).cast(pl.String).alias("entity_id"), spec.target)
    truth = answers.join(lab, on="entity_id")
    y_of = {v: truth.filter(pl.col("variant") == v) for v in ("champion", "challenger")}

    metric = metric_fn(spec.metric)

    def score(df):
        return metric(df[spec.target].to_numpy(), df["prediction"].to_numpy())

    rows = {r["shadow"]: r for r in report.to_dicts()}
    assert set(rows) == {False, True} and report["partition"].to_list() == [partition] * 2
    canary = rows[False]
    assert (canary["variant"], canary["model_version"], canary["baseline_version"]) == ("challenger", challenger,
                                                                                       champion)
    assert (canary["n_baseline"], canary["n_variant"]) == (y_of["champion"].height, y_of["challenger"].height)
    assert canary["metric"] == spec.metric == {"car_loan": "roc_auc", "car_price": "rmse"}[dataset]
    assert canary["metric_baseline"] == pytest.approx(score(y_of["champion"]), rel=1e-12)
    assert canary["metric_variant"] == pytest.approx(score(y_of["challenger"]), rel=1e-12)
    assert canary["difference"] == pytest.approx(canary["metric_variant"] - canary["metric_baseline"])
    assert canary["ci_low"] <= canary["difference"] <= canary["ci_high"]
    assert canary["p_value"] < 0.05 and not canary["paired"] and canary["verdict"] == "better"

    # The shadow scored exactly the champion's labelled requests: paired with them, and its metric is the
    # challenger's Booster on those rows.
    shadow = rows[True]
    assert shadow["paired"] and shadow["n_variant"] == shadow["n_baseline"] == y_of["champion"].height
    champ_rows = records.with_columns(pl.col(spec.id_column).cast(pl.String).alias("entity_id")).join(
        y_of["champion"].select("entity_id", spec.target), on="entity_id")
    strong = registry.load_booster(tracking, challenger)
    p_strong = strong.predict(modeling.feature_matrix(online_features(champ_rows.select(spec.raw_columns), spec),
                                                      spec))
    assert shadow["metric_variant"] == pytest.approx(metric(champ_rows[spec.target].to_numpy(), p_strong),
                                                     rel=1e-9)
    sign = 1 if spec.higher_is_better else -1  # the challenger is better: higher AUC, lower RMSE
    assert sign * shadow["difference"] > 0 and sign * (shadow["ci_low"] if sign > 0 else shadow["ci_high"]) > 0
    assert shadow["verdict"] == "better" and shadow["p_value"] < 0.05

    may_promote, why = gate_verdict(report, challenger)
    assert may_promote and "better" in why
