"""The alert sensors of the definitions (sensors/alerts.py) on a real Dagster instance: each event delivers
exactly one payload per webhook, with its links, however often the sensors tick.

Runs really fail in the instance (a failing step; a failing blocking check); monitoring, freshness and
audit events are written the way the platform writes them (a materialization's metadata, the freshness
daemon's state change, the audit trail). The webhooks are a receiver on loopback."""

from __future__ import annotations

import time

import dagster as dg
import pytest

from mlplatform.spec import dataset_spec
from resources.mlflow import MLflowResource
from sensors.alerts import build_alert_sensors
from tests.test_alerts import Receiver

DAGSTER_URL = "http://127.0.0.1:3999"


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def hooks(receiver, state, monkeypatch):
    monkeypatch.setenv("MLP_ALERT_WEBHOOKS", f"json={receiver.url}/json,slack={receiver.url}/slack")
    monkeypatch.setenv("MLP_DAGSTER_URL", DAGSTER_URL)
    monkeypatch.setenv("MLP_AUDIT_DB", str(state / "audit" / "audit.db"))
    return receiver


def _sensors():
    on_failure, on_events = build_alert_sensors(dataset_spec())
    return on_failure, on_events


def _mlflow(state) -> MLflowResource:
    return MLflowResource(tracking_uri=f"sqlite:///{state / 'mlflow.db'}", model_name="car_loan-model",
                          experiment="car_loan")


def _tick_events(sensor, instance, resources, cursor=None):
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    sensor(ctx)
    return ctx.cursor


def _tick_failure(sensor, instance, resources, run):
    failure = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE).records
    ctx = dg.build_run_status_sensor_context(
        sensor_name=sensor.name, dagster_instance=instance, dagster_run=run,
        dagster_event=failure[0].event_log_entry.dagster_event, resources=resources).for_run_failure()
    sensor(ctx)


@dg.asset
def exploding():
    raise RuntimeError("the source table vanished")


@dg.asset(check_specs=[dg.AssetCheckSpec("rows_positive", asset="gated", blocking=True)])
def gated():
    yield dg.Output(1)
    yield dg.AssetCheckResult(check_name="rows_positive", passed=False, description="0 rows in batch 2024-01")


@dg.asset(deps=[gated])
def downstream():
    return 2


@pytest.mark.services
def test_a_failing_run_and_a_failing_blocking_check_each_alert_exactly_once_with_the_run_link(
        hooks, instance, lakefs, state):
    on_failure, on_events = _sensors()
    resources = {"lakefs": lakefs, "mlflow": _mlflow(state)}
    failed = dg.materialize([exploding], instance=instance, raise_on_error=False)
    checked = dg.materialize([gated, downstream], instance=instance, raise_on_error=False)
    assert not failed.success and not checked.success
    runs = {r.run_id: r for r in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))}
    assert set(runs) == {failed.run_id, checked.run_id}

    for _ in range(2):  # the daemon may evaluate a run's failure again (restart): still one alert
        for run in runs.values():
            _tick_failure(on_failure, instance, resources, run)
    cursor = _tick_events(on_events, instance, resources)
    _tick_events(on_events, instance, resources, cursor)  # next tick: nothing new
    _tick_events(on_events, instance, resources)          # cursor lost: the outbox still remembers

    generic = hooks.bodies("/json")
    by_key = {}
    for body in generic:
        by_key.setdefault(body["key"], []).append(body)
    assert all(len(v) == 1 for v in by_key.values()), by_key
    assert set(by_key) == {f"run_failure:{failed.run_id}", f"run_failure:{checked.run_id}",
                           f"check_failure:{checked.run_id}:gated:rows_positive"}

    [run_alert] = by_key[f"run_failure:{failed.run_id}"]
    assert run_alert["links"]["dagster_run"] == f"{DAGSTER_URL}/runs/{failed.run_id}"
    assert "exploding" in run_alert["text"] and run_alert["severity"] == "error"

    [check_alert] = by_key[f"check_failure:{checked.run_id}:gated:rows_positive"]
    assert check_alert["kind"] == "check_failure"
    assert check_alert["links"]["dagster_run"] == f"{DAGSTER_URL}/runs/{checked.run_id}"
    assert "0 rows in batch 2024-01" in check_alert["text"]

    slack = hooks.bodies("/slack")
    assert len(slack) == 3
    assert any(f"<{DAGSTER_URL}/runs/{checked.run_id}|Dagster run>" in str(b["blocks"]) and
               "Blocking check gated:rows_positive failed" in b["text"] for b in slack)


def test_drift_estimate_freshness_retrain_promotion_and_rollback_each_alert_once_with_their_links(
        hooks, instance, state):
    from dagster._core.definitions.freshness import FreshnessState, FreshnessStateChange

    from mlplatform.audit import AuditTrail
    from resources.lakefs import LakeFSResource

    on_failure, on_events = _sensors()
    lakefs = LakeFSResource(endpoint="http://127.0.0.1:8000", access_key_id="k", secret_access_key="s",
                            repository="mlplatform")
    mlflow = _mlflow(state)
    resources = {"lakefs": lakefs, "mlflow": mlflow}
    commit_link = lakefs.commit_url("c0ffee")
    instance.report_runless_asset_event(dg.AssetMaterialization(
        ["car_loan", "drift_report"], partition="2024-02", metadata={
            "n_alerts": 3, "multivariate_alert": True, "lakefs_link": dg.MetadataValue.url(commit_link),
            "summary": dg.MetadataValue.json({"alerting_features": ["debt_to_income_ratio", "loan_amount"]})}))
    instance.report_runless_asset_event(dg.AssetMaterialization(
        ["car_loan", "drift_report"], partition="2024-03", metadata={"n_alerts": 0, "multivariate_alert": False}))  # no alert
    instance.report_runless_asset_event(dg.AssetMaterialization(
        ["car_loan", "performance_estimate"], partition="2024-02", metadata={
            "estimated_roc_auc": 0.61, "alert": True, "champion_version": 3, "champion_test_score": 0.74,
            "lakefs_link": dg.MetadataValue.url(commit_link)}))
    # the freshness daemon's own record of a state change (as dagster._daemon.freshness writes it)
    instance._report_runless_asset_event(asset_event=FreshnessStateChange(  # noqa: SLF001
        key=dg.AssetKey(["car_loan", "features"]), new_state=FreshnessState.FAIL, previous_state=FreshnessState.WARN,
        state_change_timestamp=time.time()))
    audit = AuditTrail()
    audit.record("retrain_triggered", "car_loan-model", None, "3 features drift", {"dagster_run_id": "r-retrain",
                                                                                  "trigger": "drift"})
    audit.record("promoted", "car_loan-model", "4", "run r-pub published to main at c0ffee",
                 {"dagster_run_id": "r-pub", "published_commit": "c0ffee"})
    audit.record("rolled_back", "car_loan-model", "3", "realized roc_auc of v4 is worse",
                 {"from_version": "4", "dagster_run_id": "r-evidence", "rollback_run_id": "r-rollback"})
    audit.record("registered", "car_loan-model", "5", "trained")  # not an alert

    cursor = _tick_events(on_events, instance, resources)
    _tick_events(on_events, instance, resources, cursor)
    _tick_events(on_events, instance, resources)

    got = {b["kind"]: b for b in hooks.bodies("/json")}
    assert len(hooks.bodies("/json")) == 6 and len(hooks.bodies("/slack")) == 6
    assert set(got) == {"drift", "estimate", "freshness", "retrain", "promotion", "rollback"}
    assert got["drift"]["links"] == {"dagster_run": f"{DAGSTER_URL}/assets/car_loan/drift_report",
                                     "lakefs_commit": commit_link}
    assert "debt_to_income_ratio" in got["drift"]["text"] and got["drift"]["fields"]["partition"] == "2024-02"
    assert got["estimate"]["links"]["mlflow"].endswith("/#/models/car_loan-model/versions/3")
    assert "0.6100" in got["estimate"]["text"]
    assert got["freshness"]["fields"]["asset"] == "car_loan/features" and "stale" in got["freshness"]["title"]
    assert got["retrain"]["links"] == {"dagster_run": f"{DAGSTER_URL}/runs/r-retrain"}
    assert got["promotion"]["links"] == {"dagster_run": f"{DAGSTER_URL}/runs/r-pub", "lakefs_commit": commit_link,
                                         "mlflow": mlflow.model_version_url("4")}
    assert got["rollback"]["links"]["dagster_run"] == f"{DAGSTER_URL}/runs/r-rollback"
    assert got["rollback"]["title"] == "Champion rolled back from v4 to v3"
