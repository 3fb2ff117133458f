"""Sensors on a real Dagster instance: they fire on the right evidence, stay quiet otherwise, fire once
per event, make one run out of a storm, honour the minimum interval, and request (never perform) the
rollback of a worse champion; run keys come from the evidence."""

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


def by_name(sensors) -> dict:
    """A data set's sensors by their own name (`car_loan__retrain_on_evidence` -> `retrain_on_evidence`)."""
    assert all(s.name.startswith("car_loan__") for s in sensors)
    return {s.name.split("__", 1)[1]: s for s in sensors}


@pytest.fixture
def sensors(spec):
    return by_name(build_lifecycle(spec)["sensors"])


def key(name: str) -> dg.AssetKey:
    return dg.AssetKey(["car_loan", name])


def report(instance, key_name, partition=None, **meta):
    instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key=key(key_name), partition=partition,
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


def skipped(result) -> str:
    """The reason a tick requested nothing: a quiet tick must say why, not just return no request."""
    assert isinstance(result, dg.SkipReason), result
    return result.skip_message


def past_the_interval(cursor: str) -> str:
    """The retrain sensor's cursor as if its last run was requested a day ago: the minimum interval is over."""
    state = json.loads(cursor)
    state["last_fired"] -= 24 * 3600
    return json.dumps(state)


def drift_evidence(n_features, partition="2019-04-01", mv=False):
    feats = ["car_value", "salary_range", "debt_to_income_ratio", "loan_length", "driver_tenure"][:n_features]
    return {"alerts_by_feature": {f: ["jensen_shannon"] for f in feats}, "multivariate": {"alert": mv},
            "alerting_features": feats, "partition": partition}


def test_drift_on_enough_features_triggers_one_retrain_with_its_evidence(sensors, instance, state):
    s = sensors["retrain_on_evidence"]
    report(instance, "drift_report", "2019-04-01", summary=drift_evidence(2))
    result, cursor = tick(s, instance)
    assert skipped(result) == "no trigger has new evidence"  # 2 features < the 4 the spec asks for: quiet
    report(instance, "drift_report", "2019-05-01", summary=drift_evidence(5, "2019-05-01"))
    result, cursor = tick(s, instance, cursor=cursor)
    (req,) = requests(result)
    assert req.tags["retrain/trigger"] == "drift"
    evidence = json.loads(req.tags["retrain/evidence"])
    assert evidence["drift"]["partition"] == "2019-05-01" and len(evidence["drift"]["features"]) == 5
    assert AuditTrail().history() == []  # the sensor only requests the run; the run writes the audit entry
    # The same event fires once: even with the minimum interval over, the consumed evidence requests nothing.
    result, _ = tick(s, instance, cursor=past_the_interval(cursor))
    assert skipped(result) == "no trigger has new evidence"
    # and a new event does fire from that cursor: the quiet tick above is not a sensor that went deaf
    report(instance, "drift_report", "2019-06-01", summary=drift_evidence(5, "2019-06-01"))
    result, _ = tick(s, instance, cursor=past_the_interval(cursor))
    (again,) = requests(result)
    assert json.loads(again.tags["retrain/evidence"])["drift"]["partition"] == "2019-06-01"


def test_a_burst_of_reports_is_evidence_as_a_whole_and_a_withheld_partition_is_none(sensors, instance, state):
    """A ranged run publishes many partitions' reports at once: a drifting one fires even if it is not the newest of
    the run, and a partition the run withheld (a materialization with nothing published) is never evidence. (Here
    the reports come from outside a run, as one burst.)"""
    from resources.partitions import WITHHELD

    s = sensors["retrain_on_evidence"]
    report(instance, "drift_report", "2019-04-01", summary=drift_evidence(5, "2019-04-01"))
    report(instance, "drift_report", "2019-05-01", summary=drift_evidence(1, "2019-05-01"))
    report(instance, "performance_estimate", "2019-05-01", **{WITHHELD: "features [2019-05-01] withheld upstream"},
           estimated_roc_auc=0.10, champion_test_score=0.97)
    result, cursor = tick(s, instance)
    (req,) = requests(result)
    assert req.tags["retrain/trigger"] == "drift"  # not "performance": the withheld estimate is not evidence
    assert json.loads(req.tags["retrain/evidence"])["drift"]["partition"] == "2019-04-01"
    result, _ = tick(s, instance, cursor=past_the_interval(cursor))
    assert skipped(result) == "no trigger has new evidence"  # the whole burst was consumed at once


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
    assert "minimum" in skipped(result)
    # The evidence that came inside the interval is held, not dropped: it fires once the interval has passed.
    result, cursor = tick(s, instance, cursor=past_the_interval(cursor))
    (held,) = requests(result)
    assert json.loads(held.tags["retrain/evidence"])["drift"]["partition"] == "2019-06-01"


def test_estimated_performance_triggers_below_the_floor_only(sensors, instance, state):
    s = sensors["retrain_on_evidence"]
    report(instance, "performance_estimate", "2019-05-01", estimated_roc_auc=0.96, champion_test_score=0.97)
    result, cursor = tick(s, instance)
    assert skipped(result) == "no trigger has new evidence"
    report(instance, "performance_estimate", "2019-06-01", estimated_roc_auc=0.85, champion_test_score=0.97)
    result, cursor = tick(s, instance, cursor=cursor)
    (req,) = requests(result)
    assert req.tags["retrain/trigger"] == "performance"
    assert json.loads(req.tags["retrain/evidence"])["performance"]["estimated"] == 0.85


def test_one_data_sets_drift_never_triggers_another_data_sets_retrain(sensors, instance, state):
    """Many data sets: car_price's drifting batch is car_price's evidence; car_loan's sensor reads only
    car_loan's keys and requests only car_loan's retrain job."""
    instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key=dg.AssetKey(["car_price", "drift_report"]), partition="2019-05-01",
        metadata={"summary": dg.MetadataValue.json(drift_evidence(5, "2019-05-01"))}))
    s = sensors["retrain_on_evidence"]
    result, cursor = tick(s, instance)
    assert skipped(result) == "no trigger has new evidence"
    report(instance, "drift_report", "2019-05-01", summary=drift_evidence(5, "2019-05-01"))
    (req,) = requests(tick(s, instance, cursor=cursor)[0])
    assert req.job_name in (None, "car_loan__retrain") and s.job_name == "car_loan__retrain"


def test_volume_triggers_when_enough_labelled_rows_arrive(sensors, instance, state):
    s = sensors["retrain_on_evidence"]
    report(instance, "training_set", None, rows_train=60000)
    report(instance, "raw_labels", "2019-01-01", rows=5000)
    result, cursor = tick(s, instance)
    assert skipped(result) == "no trigger has new evidence"
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


def test_the_rollback_sensor_only_requests_a_run_and_the_job_rolls_back(sensors, instance, state, two_versions,
                                                                          spec):
    from sensors.lifecycle import rollback_job

    rollback_champion = rollback_job(spec)

    s = sensors["rollback_on_regression"]
    report(instance, "realized_performance", "2019-05-01", realized_roc_auc=0.96, previous_roc_auc=0.965,
           model_version="2")
    result, cursor = tick(s, instance, mlflow=two_versions)
    assert skipped(result) == "champion is not worse than the previous champion"  # within the margin: quiet
    report(instance, "realized_performance", "2019-06-01", realized_roc_auc=0.80, previous_roc_auc=0.95,
           model_version="2")
    result, cursor = tick(s, instance, cursor=cursor, mlflow=two_versions)
    (req,) = requests(result)
    # Evaluating the sensor (as a UI "test sensor" does) changes nothing: no alias, no audit entry.
    assert registry.aliases(two_versions) == {"champion": "2", "previous": "1"}
    assert AuditTrail().history() == []
    evidence_id = instance.fetch_materializations(key("realized_performance"), limit=1).records[0].storage_id
    assert req.run_key == f"rollback-2-{evidence_id}" and req.job_name in (None, "car_loan__rollback_champion")
    again, _ = tick(s, instance, mlflow=two_versions)  # the same evidence from scratch: the same run key
    assert [r.run_key for r in requests(again)] == [req.run_key]
    again_result, _ = tick(s, instance, cursor=cursor, mlflow=two_versions)
    assert skipped(again_result) == "no new realized performance"  # fires once

    from resources.audit import AuditResource

    audit = AuditResource(path=str(AuditTrail().path))  # the trail this test reads
    run = rollback_champion.execute_in_process(run_config=req.run_config, instance=instance, tags=req.tags,
                                               resources={"mlflow": two_versions, "audit": audit})
    assert run.success
    assert registry.aliases(two_versions) == {"champion": "1", "challenger": "2"}
    intent, last = AuditTrail().history()[-2:]
    assert intent.action == "rollback_intent" and last.evidence["intent_seq"] == intent.seq
    assert last.action == "rolled_back" and last.actor == "sensor:rollback_on_regression"
    assert last.evidence["partition"] == "2019-06-01" and last.evidence["from_version"] == "2"
    assert last.evidence["rollback_run_id"] == run.run_id
    # Requested twice (a re-executed run): the champion is no longer v2, so nothing more moves.
    assert rollback_champion.execute_in_process(run_config=req.run_config, instance=instance,
                                                resources={"mlflow": two_versions, "audit": audit}).success
    assert registry.aliases(two_versions) == {"champion": "1", "challenger": "2"}
    assert [e.action for e in AuditTrail().history()] == ["rollback_intent", "rolled_back"]


def test_retrain_run_keys_come_from_the_evidence_and_the_run_writes_the_audit_entry_once(sensors, instance, state,
                                                                                        spec):
    from assets.training import record_retrain_trigger

    s = sensors["retrain_on_evidence"]
    report(instance, "drift_report", "2019-05-01", summary=drift_evidence(5, "2019-05-01"))
    (first,) = requests(tick(s, instance)[0])
    (second,) = requests(tick(s, instance)[0])  # a fresh cursor sees the same evidence: the same key
    evidence_id = instance.fetch_materializations(key("drift_report"), limit=1).records[0].storage_id
    assert first.run_key == second.run_key == f"retrain-drift{evidence_id}"
    report(instance, "drift_report", "2019-06-01", summary=drift_evidence(5, "2019-06-01"))
    (third,) = requests(tick(s, instance)[0])
    assert third.run_key != first.run_key

    @dg.asset
    def marker() -> None:
        return None

    run = dg.materialize([marker], instance=instance, tags={**first.tags, "dagster/sensor_name": s.name})
    model = f"{spec.name}-model"
    assert record_retrain_trigger(instance.get_run_by_id(run.run_id), model)
    assert not record_retrain_trigger(instance.get_run_by_id(run.run_id), model)  # once per run
    (entry,) = AuditTrail().history(model)
    assert entry.action == "retrain_triggered" and entry.actor == "sensor:car_loan__retrain_on_evidence"
    assert entry.evidence["dagster_run_id"] == run.run_id and entry.evidence["drift"]["partition"] == "2019-05-01"


def test_volume_counts_labels_from_successful_runs_once_per_partition(sensors, instance, state):
    s = sensors["retrain_on_evidence"]
    report(instance, "training_set", None, rows_train=60000)
    parts = dg.StaticPartitionsDefinition(["2019-01-01", "2019-02-01"])

    class Rows(dg.Config):
        rows: int
        fail_after: bool = False

    @dg.asset(name="raw_labels", key_prefix=["car_loan"], partitions_def=parts)
    def raw_labels(config: Rows):
        return dg.MaterializeResult(metadata={"rows": config.rows})

    @dg.asset(key_prefix=["car_loan"], deps=[raw_labels], partitions_def=parts)
    def later_step(config: Rows):
        if config.fail_after:
            raise RuntimeError("the run fails after raw_labels materialized")

    def land(partition, rows, fail=False):
        return dg.materialize([raw_labels, later_step], instance=instance, partition_key=partition,
                              raise_on_error=False,
                              run_config={"ops": {"car_loan__raw_labels": {"config": {"rows": rows}},
                                                  "car_loan__later_step": {"config": {"rows": rows,
                                                                                      "fail_after": fail}}}})

    assert not land("2019-01-01", 50000, fail=True).success  # a failed run's labels are no evidence
    result, cursor = tick(s, instance)
    assert skipped(result) == "no trigger has new evidence"
    assert land("2019-01-01", 9000).success
    assert land("2019-01-01", 9000).success  # the same partition again: counted once, not twice
    result, cursor = tick(s, instance, cursor=cursor)
    assert skipped(result) == "no trigger has new evidence"  # 9000 < the 15000 new labelled rows the spec asks for
    assert land("2019-02-01", 7000).success
    result, cursor = tick(s, instance, cursor=cursor)
    (req,) = requests(result)
    ev = json.loads(req.tags["retrain/evidence"])["volume"]
    assert ev["new_labelled_rows"] == 16000 and ev["partitions"] == ["2019-01-01", "2019-02-01"]


def test_each_sensor_tick_is_fast(sensors, instance, state, two_versions):
    zone = LandingZoneResource(root=str(state / "landing"))  # car_loan's folder: landing/car_loan
    for i in range(30):
        report(instance, "drift_report", f"2019-0{1 + i % 8}-01", summary=drift_evidence(1))
    timings = {}
    for name, res in (("landing_arrivals", {"landing": zone}), ("retrain_on_evidence", {}),
                      ("rollback_on_regression", {"mlflow": two_versions})):
        t0 = time.perf_counter()
        tick(sensors[name], instance, **res)
        timings[name] = time.perf_counter() - t0
    assert all(t < 1.0 for t in timings.values()), timings


def test_the_online_gate_approves_the_awaiting_version_only_when_the_published_experiment_shows_it_better(
        spec, instance, state, two_versions):
    """serving.experiment_gate: the version awaiting approval is promoted on the online experiment's evidence
    (better than the champion, nowhere worse), by a run the sensor requests; a draw or a loss keeps it waiting,
    and with the gate off nothing is requested."""
    import dataclasses

    from mlplatform.serving.experiment import BETTER, INCONCLUSIVE
    from resources.audit import AuditResource
    from sensors.lifecycle import approval_job

    approve_from_experiment = approval_job(spec)

    m = two_versions  # champion v2, previous v1
    m.client().create_model_version(m.model_name, source="file:///tmp/none")
    registry.set_alias(m, registry.AWAITING, "3")

    def comparison(verdict, version="3"):
        return {"variant": "awaiting-approval", "shadow": False, "model_version": version, "metric": "roc_auc",
                "n_baseline": 900, "n_variant": 880, "difference": 0.02 if verdict == BETTER else 0.0,
                "ci_low": 0.01 if verdict == BETTER else -0.01, "ci_high": 0.03, "p_value": 0.001, "verdict": verdict}

    off = by_name(build_lifecycle(spec)["sensors"])["online_experiment_gate"]
    report(instance, "online_experiment_report", "2019-05-01", comparisons=[comparison(BETTER)])
    assert skipped(tick(off, instance, mlflow=m)[0]).startswith("the online gate is switched off")

    gated = dataclasses.replace(spec, serving=spec.serving.model_copy(update={"experiment_gate": True}))
    s = by_name(build_lifecycle(gated)["sensors"])["online_experiment_gate"]
    report(instance, "online_experiment_report", "2019-05-01", comparisons=[comparison(INCONCLUSIVE)])
    result, cursor = tick(s, instance, mlflow=m)
    assert "v3 stays awaiting approval" in skipped(result)
    report(instance, "online_experiment_report", "2019-06-01", comparisons=[comparison(BETTER)])
    result, cursor = tick(s, instance, cursor=cursor, mlflow=m)
    (req,) = requests(result)
    assert registry.aliases(m)["champion"] == "2"  # the tick only asks
    assert skipped(tick(s, instance, cursor=cursor, mlflow=m)[0]) == "no new online experiment report"

    audit = AuditResource(path=str(AuditTrail().path))
    run = approve_from_experiment.execute_in_process(run_config=req.run_config, instance=instance, tags=req.tags,
                                                     resources={"mlflow": m, "audit": audit})
    assert run.success
    assert registry.aliases(m) == {"champion": "3", "previous": "2"}
    last = AuditTrail().history()[-1]
    assert last.action == "approved" and last.actor == "sensor:online_experiment_gate"
    assert last.evidence["partition"] == "2019-06-01" and "better" in last.reason
    # Requested again (a re-executed run): v3 no longer awaits approval, so nothing more moves.
    assert approve_from_experiment.execute_in_process(run_config=req.run_config, instance=instance,
                                                      resources={"mlflow": m, "audit": audit}).success
    assert registry.aliases(m) == {"champion": "3", "previous": "2"}
