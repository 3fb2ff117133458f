"""Sensors on a real Dagster instance: they fire on the right evidence, stay quiet otherwise, fire once
per event, make one run out of a storm, honour the minimum interval, and roll back a worse champion."""

import json
import time

import dagster as dg
import pytest

from mlplatform import registry
from mlplatform.audit import AuditTrail
from resources.landing import LandingZoneResource
from resources.mlflow import MLflowResource
from sensors.lifecycle import build_lifecycle

from .helpers import car_loan


@pytest.fixture(scope="module")
def spec():
    return car_loan()


@pytest.fixture
def sensors(spec):
    return {s.name: s for s in build_lifecycle(spec)["sensors"]}


def report(instance, key, partition=None, **meta):
    instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key=key, partition=partition,
        metadata={k: dg.MetadataValue.json(v) if isinstance(v, dict) else v for k, v in meta.items()}))


def tick(sensor, instance, cursor=None, **resources):
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources or None)
    result = sensor(ctx)
    return result, ctx.cursor


def requests(result):
    if isinstance(result, dg.RunRequest):
        return [result]
    if isinstance(result, dg.SensorResult):
        return list(result.run_requests or [])
    if isinstance(result, list):
        return [r for r in result if isinstance(r, dg.RunRequest)]
    return []


def drift_evidence(n_features, partition="2019-04-01", mv=False):
    feats = ["car_value", "salary_range", "debt_to_income_ratio", "loan_length", "driver_tenure"][:n_features]
    return {"alerts_by_feature": {f: ["jensen_shannon"] for f in feats}, "multivariate": {"alert": mv},
            "alerting_features": feats, "partition": partition}


def test_drift_on_enough_features_triggers_one_retrain_with_its_evidence(sensors, instance, state):
    s = sensors["retrain_on_evidence"]
    report(instance, "drift_report", "2019-04-01", summary=drift_evidence(2))
    result, cursor = tick(s, instance)
    assert requests(result) == []  # 2 features < the 4 the spec asks for: quiet
    report(instance, "drift_report", "2019-05-01", summary=drift_evidence(5, "2019-05-01"))
    result, cursor = tick(s, instance, cursor=cursor)
    (req,) = requests(result)
    assert req.tags["retrain/trigger"] == "drift"
    evidence = json.loads(req.tags["retrain/evidence"])
    assert evidence["drift"]["partition"] == "2019-05-01" and len(evidence["drift"]["features"]) == 5
    assert AuditTrail().history()[-1].action == "retrain_triggered"
    result, cursor = tick(s, instance, cursor=cursor)
    assert requests(result) == []  # the same event fires once


def test_a_storm_of_evidence_makes_one_run_and_the_minimum_interval_holds(sensors, instance, state):
    s = sensors["retrain_on_evidence"]
    report(instance, "training_set", None, rows_train=10000)
    report(instance, "raw_labels", "2019-01-01", rows=20000)
    report(instance, "drift_report", "2019-05-01", summary=drift_evidence(5, "2019-05-01"))
    report(instance, "performance_estimate", "2019-05-01", estimated_roc_auc=0.80, champion_test_score=0.97)
    result, cursor = tick(s, instance)
    (req,) = requests(result)
    assert set(req.tags["retrain/trigger"].split("+")) == {"volume", "drift", "performance"}
    report(instance, "drift_report", "2019-06-01", summary=drift_evidence(5, "2019-06-01"))
    result, cursor = tick(s, instance, cursor=cursor)
    assert requests(result) == [] and "minimum" in result.skip_message


def test_estimated_performance_triggers_below_the_floor_only(sensors, instance, state):
    s = sensors["retrain_on_evidence"]
    report(instance, "performance_estimate", "2019-05-01", estimated_roc_auc=0.96, champion_test_score=0.97)
    result, cursor = tick(s, instance)
    assert requests(result) == []
    report(instance, "performance_estimate", "2019-06-01", estimated_roc_auc=0.85, champion_test_score=0.97)
    result, cursor = tick(s, instance, cursor=cursor)
    (req,) = requests(result)
    assert req.tags["retrain/trigger"] == "performance"
    assert json.loads(req.tags["retrain/evidence"])["performance"]["estimated"] == 0.85


def test_volume_triggers_when_enough_labelled_rows_arrive(sensors, instance, state):
    s = sensors["retrain_on_evidence"]
    report(instance, "training_set", None, rows_train=60000)
    report(instance, "raw_labels", "2019-01-01", rows=5000)
    result, cursor = tick(s, instance)
    assert requests(result) == []
    report(instance, "raw_labels", "2019-02-01", rows=11000)
    result, cursor = tick(s, instance, cursor=cursor)
    (req,) = requests(result)
    ev = json.loads(req.tags["retrain/evidence"])["volume"]
    assert ev["new_labelled_rows"] == 16000 and ev["partitions"] == ["2019-01-01", "2019-02-01"]


@pytest.fixture
def two_versions(spec, mlflow_uri):
    m = MLflowResource(tracking_uri=mlflow_uri, model_name=f"{spec.name}-model", experiment=spec.name)
    c = m.client()
    c.create_registered_model(m.model_name)
    for _ in range(2):
        c.create_model_version(m.model_name, source="file:///tmp/none")
    registry.promote(m, "1")
    registry.promote(m, "2")
    return m


def test_rollback_restores_the_previous_champion_when_the_champion_does_worse(sensors, instance, state,
                                                                              two_versions):
    s = sensors["rollback_on_regression"]
    report(instance, "realized_performance", "2019-05-01", realized_roc_auc=0.96, previous_roc_auc=0.965,
           model_version="2")
    result, cursor = tick(s, instance, mlflow=two_versions)
    assert registry.aliases(two_versions)["champion"] == "2"  # within the margin: quiet
    report(instance, "realized_performance", "2019-06-01", realized_roc_auc=0.80, previous_roc_auc=0.95,
           model_version="2")
    result, cursor = tick(s, instance, cursor=cursor, mlflow=two_versions)
    assert registry.aliases(two_versions)["champion"] == "1"
    last = AuditTrail().history()[-1]
    assert last.action == "rolled_back" and last.actor == "sensor:rollback_on_regression"
    assert last.evidence["partition"] == "2019-06-01" and last.evidence["from_version"] == "2"
    result, cursor = tick(s, instance, cursor=cursor, mlflow=two_versions)
    assert registry.aliases(two_versions)["champion"] == "1"  # fires once: no second rollback


def test_each_sensor_tick_is_fast(sensors, instance, state, two_versions):
    zone = LandingZoneResource(root=str(state / "landing"))
    for i in range(30):
        report(instance, "drift_report", f"2019-0{1 + i % 8}-01", summary=drift_evidence(1))
    timings = {}
    for name, res in (("landing_arrivals", {"landing": zone}), ("retrain_on_evidence", {}),
                      ("rollback_on_regression", {"mlflow": two_versions})):
        t0 = time.perf_counter()
        tick(sensors[name], instance, **res)
        timings[name] = time.perf_counter() - t0
    assert all(t < 1.0 for t in timings.values()), timings
