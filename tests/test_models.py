"""Models against the real MLflow store and lakeFS: registration with lineage, the gate, rollback,
reproduce, the audit trail, and bad training input that must leave no model version behind."""

import sqlite3
import time

import dagster as dg
import numpy as np
import polars as pl
import pytest

from assets.evaluation import build_evaluation
from assets.training import build_training
from mlplatform import registry
from mlplatform.audit import AuditTrail
from resources.publish import publish_run
from resources.mlflow import MLflowResource, MLflowUnavailable
from resources.io import git_commit

from .helpers import car_loan, node, quick_training_set, resources_for


@pytest.fixture(scope="module")
def spec():
    return car_loan()


@pytest.fixture(scope="module")
def base_ts(spec):
    return quick_training_set(spec, n=8000)


def pipeline(spec, ts: pl.DataFrame):
    @dg.asset(name="training_set", key_prefix=["car_loan"])
    def fixed_training_set() -> pl.DataFrame:
        return ts

    _, _, candidate_model = build_training(spec)
    return [fixed_training_set, candidate_model, *build_evaluation(spec)]


def train(spec, ts, lakefs, state, instance, mlflow_uri, **cfg):
    return dg.materialize(pipeline(spec, ts), instance=instance, raise_on_error=False,
                          resources=resources_for(lakefs, state, spec, mlflow_uri),
                          run_config={"ops": {node("candidate_model"): {"config": cfg}}} if cfg else None)


def mlflow_res(spec, uri) -> MLflowResource:
    return MLflowResource(tracking_uri=uri, model_name=f"{spec.name}-model", experiment=spec.name)


def train_and_publish(spec, ts, lakefs, state, instance, mlflow_uri, **cfg):
    result = train(spec, ts, lakefs, state, instance, mlflow_uri, **cfg)
    publish_run(instance, lakefs, result.run_id, mlflow_res(spec, mlflow_uri))
    return result


def versions(m: MLflowResource) -> list[str]:
    return sorted(str(v.version) for v in m.client().search_model_versions(f"name='{m.model_name}'"))


def test_first_model_becomes_champion_and_carries_its_lineage(spec, base_ts, lakefs, state, instance, mlflow_uri):
    result = train(spec, base_ts, lakefs, state, instance, mlflow_uri)
    assert result.success
    m = mlflow_res(spec, mlflow_uri)
    assert registry.aliases(m) == {}  # the gate decided; nothing moves before the run's data is on main
    assert publish_run(instance, lakefs, result.run_id, m).status == "published"
    assert registry.aliases(m) == {"champion": "1"}
    tags = registry.version_tags(m, "1")
    ts_commit = result.asset_materializations_for_node(node("training_set"))[0].metadata["lakefs_commit"].value
    assert tags["lakefs_commit"] == ts_commit
    assert tags["dagster_run_id"] == result.run_id and tags["code_version"] == git_commit()
    run = m.client().get_run(tags and m.client().get_model_version(m.model_name, "1").run_id)
    assert run.inputs.dataset_inputs[0].dataset.source.find(ts_commit) >= 0
    mat = result.asset_materializations_for_node(node("candidate_model"))[0]
    assert "/runs/" in mat.metadata["mlflow_run"].value
    card = result.asset_materializations_for_node(node("model_card"))[0]
    assert ts_commit in card.metadata["card"].value
    assert [e.action for e in AuditTrail().history(m.model_name)] == ["registered", "gate_decision",
                                                                       "promotion_intent", "promoted"]


def test_better_candidate_is_promoted_and_a_worse_one_stays_challenger(spec, base_ts, lakefs, state, instance,
                                                                        mlflow_uri):
    m = mlflow_res(spec, mlflow_uri)
    weak = train_and_publish(spec, base_ts, lakefs, state, instance, mlflow_uri, num_boost_round=8, num_leaves=3,
                             learning_rate=0.1)
    assert weak.success and registry.aliases(m)["champion"] == "1"
    strong = train_and_publish(spec, base_ts, lakefs, state, instance, mlflow_uri)
    assert strong.success
    assert registry.aliases(m) == {"champion": "2", "previous": "1"}
    lakefs_main_before = lakefs.head()
    worse = train(spec, base_ts, lakefs, state, instance, mlflow_uri, shuffle_labels=True)
    assert not worse.success  # the gate is a blocking check: the run fails, nothing is published
    gate = [e for e in worse.get_asset_check_evaluations() if e.check_name == "promotion_gate"][0]
    assert not gate.passed and ("floor" in gate.description or "CI" in gate.description)
    assert publish_run(instance, lakefs, worse.run_id, m).status == "kept"
    # A rejected candidate gets no alias: its data never reaches main, so it is not even a shadow challenger.
    assert registry.aliases(m) == {"champion": "2", "previous": "1"}
    assert registry.version_tags(m, "3")["gate"] == "reject"
    assert lakefs.head() == lakefs_main_before
    actions = [(e.action, e.version) for e in AuditTrail().history(m.model_name)]
    assert actions == [("registered", "1"), ("gate_decision", "1"), ("promotion_intent", "1"), ("promoted", "1"),
                       ("registered", "2"), ("gate_decision", "2"), ("promotion_intent", "2"), ("promoted", "2"),
                       ("registered", "3"), ("gate_decision", "3")]
    assert AuditTrail().history(m.model_name)[-1].evidence["decision"] == "reject"


def test_rollback_restores_the_previous_champion_in_one_step(spec, base_ts, lakefs, state, instance, mlflow_uri):
    m = mlflow_res(spec, mlflow_uri)
    train_and_publish(spec, base_ts, lakefs, state, instance, mlflow_uri, num_boost_round=8, num_leaves=3,
                      learning_rate=0.1)
    train_and_publish(spec, base_ts, lakefs, state, instance, mlflow_uri)
    old, new = registry.rollback(m, AuditTrail(), "drill", actor="user:test")
    assert (old, new) == ("2", "1")
    assert registry.aliases(m) == {"champion": "1", "challenger": "2"}
    intent, last = AuditTrail().history(m.model_name)[-2:]
    assert intent.action == "rollback_intent" and intent.evidence["aliases_after"]["champion"] == "1"
    assert last.action == "rolled_back" and last.evidence["from_version"] == "2" and last.actor == "user:test"
    assert last.evidence["intent_seq"] == intent.seq


def test_reproduce_rebuilds_the_training_set_from_lakefs_and_predicts_identically(spec, base_ts, lakefs, state,
                                                                                   instance, mlflow_uri):
    from tooling.cli import reproduce

    train_and_publish(spec, base_ts, lakefs, state, instance, mlflow_uri)
    out = reproduce("1", mlflow=mlflow_res(spec, mlflow_uri), lakefs=lakefs, spec=spec)
    assert out["identical"] and out["max_abs_diff"] <= 1e-12 and out["test_rows"] > 1000


def test_the_audit_trail_is_append_only_and_tampering_is_detected(state):
    trail = AuditTrail()
    trail.record("registered", "m", 1, "first", {"x": 1}, actor="user:a")
    trail.record("promoted", "m", 1, "gate", {}, actor="sensor:drift")
    assert [e.action for e in trail.history("m")] == ["registered", "promoted"]
    con = sqlite3.connect(trail.path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("UPDATE audit_events SET reason = 'edited' WHERE seq = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        con.execute("DELETE FROM audit_events")
    assert trail.verify() == []
    # Even someone dropping the trigger behind the platform's back is caught by the hash chain.
    con.execute("DROP TRIGGER audit_no_update")
    con.execute("UPDATE audit_events SET reason = 'edited' WHERE seq = 1")
    con.commit()
    assert trail.verify() == [1]


@pytest.mark.parametrize("problem,expect", [
    ("one_class", "single class"),
    ("empty_split", "split 'test' is empty"),
    ("nan_target", "NaN, null or infinite"),
    ("inf_target", "NaN, null or infinite"),
])
def test_bad_training_data_registers_nothing_and_keeps_the_champion(problem, expect, spec, base_ts, lakefs, state,
                                                                     instance, mlflow_uri):
    m = mlflow_res(spec, mlflow_uri)
    assert train_and_publish(spec, base_ts, lakefs, state, instance, mlflow_uri).success
    ts = base_ts
    if problem == "one_class":
        ts = ts.with_columns(pl.lit(1.0).alias(spec.target))
    elif problem == "empty_split":
        ts = ts.filter(pl.col("split") != "test")
    elif problem == "nan_target":
        ts = ts.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(float("nan")).otherwise(pl.col(spec.target))
                             .alias(spec.target))
    else:
        ts = ts.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(float("inf")).otherwise(pl.col(spec.target))
                             .alias(spec.target))
    result = train(spec, ts, lakefs, state, instance, mlflow_uri)
    assert not result.success
    err = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert expect in str(err.event_specific_data.error.message) + str(err.event_specific_data.error.cause)
    assert versions(m) == ["1"]
    assert registry.aliases(m) == {"champion": "1"}


def test_features_missing_at_inference_are_named_by_the_signature(spec, base_ts, lakefs, state, instance,
                                                                   mlflow_uri):
    import mlflow

    from mlplatform import modeling

    assert train_and_publish(spec, base_ts, lakefs, state, instance, mlflow_uri).success
    m = mlflow_res(spec, mlflow_uri)
    m.setup()
    model = mlflow.pyfunc.load_model(f"models:/{m.model_name}@champion")
    x = modeling.feature_matrix(base_ts.head(5), spec).drop(columns=["car_value"])
    with pytest.raises(mlflow.exceptions.MlflowException, match="car_value"):
        model.predict(x)
    with pytest.raises(modeling.TrainingDataError, match="car_value"):
        modeling.feature_matrix(base_ts.head(5).drop("car_value"), spec)


def test_an_unreachable_mlflow_fails_with_the_uri_after_bounded_retries():
    from tooling.services import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    m = MLflowResource(tracking_uri=uri, retries=3, timeout_seconds=1)
    t0 = time.time()
    with pytest.raises(MLflowUnavailable, match=f"{uri}.*after 3 attempts"):
        m.setup()
    assert time.time() - t0 < 15


def test_manual_mode_holds_promotion_until_an_approval_names_version_approver_and_reason(spec, base_ts, lakefs,
                                                                                         state, instance, mlflow_uri):
    m = mlflow_res(spec, mlflow_uri)
    held = dg.materialize(pipeline(spec, base_ts), instance=instance,
                          resources=resources_for(lakefs, state, spec, mlflow_uri),
                          run_config={"ops": {node("evaluation_report"): {"config": {"manual_approval": True}}}})
    assert held.success
    assert registry.aliases(m) == {}  # decided, not applied: the run is not published yet
    with pytest.raises(registry.RegistryError, match="not awaiting approval"):
        registry.approve(m, AuditTrail(), "1", "alice", "too early")
    publish_run(instance, lakefs, held.run_id, m)
    assert registry.aliases(m) == {"awaiting-approval": "1"}  # nothing is champion yet
    with pytest.raises(registry.RegistryError, match="not awaiting approval"):
        registry.approve(m, AuditTrail(), "7", "alice", "wrong version")
    registry.approve(m, AuditTrail(), "1", "alice", "reviewed the card and slices")
    assert registry.aliases(m) == {"champion": "1"}
    intent, last = AuditTrail().history(m.model_name)[-2:]
    assert intent.action == "approval_intent" and last.evidence["intent_seq"] == intent.seq
    assert (last.action, last.version, last.actor, last.reason) == ("approved", "1", "user:alice",
                                                                    "reviewed the card and slices")


def test_a_dirty_or_unknown_code_version_never_vouches_for_reusing_a_model():
    from assets.training import code_is_exact

    assert code_is_exact("f257878a1b2c")
    assert not code_is_exact("f257878a1b2c-dirty")  # two different uncommitted edits share this name
    assert not code_is_exact("unknown") and not code_is_exact("")


def test_an_mlflow_connection_fault_is_raised_as_unavailable_so_the_run_is_retried():
    from assets.training import _mlflow_error
    from mlplatform.registry import RegistryError
    from resources.mlflow import MLflowUnavailable

    def chained(outer: str, inner: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as exc:
                raise RuntimeError(outer) from exc
        except RuntimeError as exc:
            return exc

    assert _mlflow_error(chained("API request failed", ConnectionRefusedError("refused"))) is MLflowUnavailable
    assert _mlflow_error(RuntimeError("HTTPConnectionPool(...): Max retries exceeded with url")) is MLflowUnavailable
    assert _mlflow_error(chained("INVALID_PARAMETER_VALUE: bad tag", ValueError("bad tag"))) is RegistryError
