"""Many data sets in one code location (issue 13): both bundled specs (binary classification and regression) live
at once, on one lakeFS repository, one MLflow store and one Dagster instance, and each runs its whole lifecycle
through the graph (ingestion, dbt features, training, gate, scoring, monitoring) without touching the other:
no shared asset key, no run that materializes the other's assets, lakeFS paths and MLflow models that hold only
their own data, and automation that requests only its own data set's jobs."""

from __future__ import annotations

import runpy
import warnings

import dagster as dg
import polars as pl
import pytest

from mlplatform import registry
from mlplatform.spec import load_spec
from resources.io import load_asset
from resources.naming import ns
from tooling.simulator import Simulator

from .conftest import ROOT
from .helpers import materialize_and_publish, resources_for

DATASETS = ("car_loan", "car_price")


def load_definitions(monkeypatch) -> dg.Definitions:
    """platform/definitions.py as a code location loads it, with both bundled specs live (MLP_DATASETS)."""
    monkeypatch.delenv("MLP_DATASET", raising=False)
    monkeypatch.setenv("MLP_DATASETS", ",".join(DATASETS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return runpy.run_path(str(ROOT / "platform" / "definitions.py"), run_name="mlp_many_datasets")["defs"]


@pytest.mark.services
def test_two_data_sets_run_their_lifecycles_side_by_side_and_never_touch_each_other(lakefs, mlflow_uri, state,
                                                                                    instance, monkeypatch):
    from resources.partitions import partitions_def
    from sensors.publish import scoring_request

    defs = load_definitions(monkeypatch)
    specs = {name: load_spec(name) for name in DATASETS}
    assets = list(defs.assets)
    keys = {name: {k for a in assets for k in a.keys if k.path[0] == name} for name in DATASETS}
    assert keys["car_loan"] and keys["car_price"] and not keys["car_loan"] & keys["car_price"]
    assert {k for a in assets for k in a.keys} == keys["car_loan"] | keys["car_price"]  # every key has its data set

    res = resources_for(lakefs, state, specs["car_loan"], mlflow_uri)  # ONE set of resources for both
    released = {}
    for name, spec in specs.items():
        sim = Simulator(spec, res["landing"].zone(spec))
        released[name] = sim.release(3 if name == "car_loan" else 4)
        assert released[name].labels, name
        assert res["landing"].zone(spec).root == state / "landing" / name  # each lands in its own folder

    # Each data set's arrival sensor requests its own job for its own files only.
    sensors = {s.name: s for s in defs.sensors}
    for name in DATASETS:
        ctx = dg.build_sensor_context(instance=instance, resources={"landing": res["landing"]})
        result = sensors[f"{name}__landing_arrivals"](ctx)
        assert {r.job_name for r in result.run_requests} == {f"{name}__ingest_batch"}
        all_keys = list(partitions_def(specs[name]).get_partition_keys())
        covered = set()  # a batch's own partition, or a burst's range (the batches landed at once)
        for r in result.run_requests:
            rng = r.partition_key_range
            covered |= {r.partition_key} if r.partition_key else set(
                all_keys[all_keys.index(rng.start):all_keys.index(rng.end) + 1])
        assert covered == set(released[name].records), (name, covered)

    def run(name: str, selection: list[str], partition: str | None = None) -> dg.ExecuteInProcessResult:
        """One run of a data set's assets; it materializes only that data set's keys."""
        n = ns(name)
        result = materialize_and_publish(assets, n.keys(*selection), instance, res, lakefs, partition)
        made = {e.asset_key for e in result.get_asset_materialization_events()}
        assert made and made <= keys[name], (name, selection, made - keys[name])
        return result

    # The two lifecycles interleaved, step by step: each step of one data set between steps of the other.
    for name in DATASETS:
        run(name, ["reference_data"])
    records_runs = {}
    for name in DATASETS:
        for p in released[name].records:
            batch = ["raw_records", "stg_records", "features"]
            records_runs[name] = run(name, batch + ["raw_labels", "stg_labels"] if p in released[name].labels
                                     else batch, p)
    # a published records run asks for its own data set's scoring job (dg.materialize's ephemeral job records no
    # asset selection on its run; a job or UI run does: given here as the keys the run materialized)
    for name in DATASETS:
        result = records_runs[name]
        run_record = instance.get_run_by_id(result.run_id)
        made = frozenset(e.asset_key for e in result.get_asset_materialization_events())
        req = scoring_request(instance, run_record._replace(asset_selection=made))
        assert req is not None and req.job_name == f"{name}__score_batch"
        assert {k.path[0] for k in req.asset_selection} == {name}
        assert req.tags["mlp/partition"] == f"{name}/{req.partition_key}"
    training = ["stg_reference_records", "stg_reference_labels", "reference_features", "labelled_examples",
                "training_set", "candidate_model", "evaluation_report", "model_card"]
    for name in DATASETS:
        run(name, training)
    for name in DATASETS:
        run(name, ["batch_predictions", "drift_report", "performance_estimate", "data_quality_report"],
            released[name].records[-1])

    # MLflow: one registered model and one experiment per data set, each version trained on its own data.
    client = res["mlflow"].client()
    for name, spec in specs.items():
        m = res["mlflow"].scoped(spec)
        assert m.model_name == f"{name}-model" and registry.aliases(m)["champion"] == "1"
        (version,) = client.search_model_versions(f"name='{name}-model'")
        tags = dict(version.tags)
        assert tags["dataset"] == name and f"/assets/{name}/training_set/" in tags["training_set_uri"]
        experiment = client.get_experiment_by_name(name)
        assert experiment is not None
        run_ids = {r.info.run_id for r in client.search_runs([experiment.experiment_id])}
        assert version.run_id in run_ids
        other = client.get_experiment_by_name(next(x for x in DATASETS if x != name))
        assert version.run_id not in {r.info.run_id for r in client.search_runs([other.experiment_id])}

    # lakeFS: one repository, each data set's objects under its own prefixes, holding its own columns.
    paths = lakefs.list_paths("main", "")
    for path in paths:
        top, _, rest = path.partition("/")
        assert top in ("assets", "index", "reports") and rest.split("/", 1)[0] in DATASETS, path
    for name, spec in specs.items():
        n = ns(name)
        own = [p for p in paths if p.split("/")[1] == name]
        assert any(p.startswith(f"assets/{name}/raw_records/") for p in own)
        assert any(p.startswith(f"index/{name}/record_ids/") for p in own)
        ts = load_asset(lakefs, n.key("training_set"))
        assert spec.target in ts.columns and set(spec.model_feature_names) <= set(ts.columns)
        other = specs[next(x for x in DATASETS if x != name)]
        assert other.target not in ts.columns  # no row or column of the other data set
        preds = load_asset(lakefs, n.key("batch_predictions"), partition=released[name].records[-1])
        assert preds.height and set(preds["model_version"].unique()) == {"1"}
        if not spec.is_classification:  # the regression model's prices, not the classifier's probabilities
            assert preds["prediction"].max() > 1.0
        landed = pl.concat([load_asset(lakefs, n.key("raw_records"), partition=p) for p in released[name].records])
        assert set(landed.columns) >= set(spec.raw_columns)

    # The Dagster instance: every run materialized the keys of one data set only.
    for record in instance.get_run_records():
        events = instance.get_records_for_run(record.dagster_run.run_id,
                                              of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
        owners = {e.event_log_entry.dagster_event.asset_key.path[0] for e in events}
        assert len(owners) == 1, (record.dagster_run.run_id, owners)
