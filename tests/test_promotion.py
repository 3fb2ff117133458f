"""Promotion follows publication, against the real MLflow store and lakeFS: the gate only decides; aliases
move once the run's data is merged into main, once; a run that fails after the gate moves nothing; a retrain
on unchanged data and code reuses its version; registry reads fail closed; no half-registered version."""

import pytest

from mlplatform import registry
from mlplatform.audit import AuditTrail
from resources.mlflow import MLflowResource
from resources.lakefs import run_branch
from resources.publish import commit_on_main, publish_pending, publish_run

from .test_models import base_ts, mlflow_res, spec, train, versions  # noqa: F401 - fixtures and helpers

from .helpers import node  # the tests' data set: car_loan


pytestmark = pytest.mark.services

WEAK = {"num_boost_round": 8, "num_leaves": 3, "learning_rate": 0.1}


def actions(m, version=None):
    return [(e.action, e.version) for e in AuditTrail().history(m.model_name, version)]


def test_a_run_that_fails_after_the_gate_moves_no_alias(spec, base_ts, lakefs, state, instance, mlflow_uri,
                                                          monkeypatch):
    import assets.evaluation

    m = mlflow_res(spec, mlflow_uri)
    first = train(spec, base_ts, lakefs, state, instance, mlflow_uri, **WEAK)
    publish_run(instance, lakefs, first.run_id, m)
    assert registry.aliases(m) == {"champion": "1"}
    main_before = lakefs.head()

    def broken_card(*args, **kwargs):
        raise RuntimeError("model card store is down")

    with monkeypatch.context() as patch:
        patch.setattr(assets.evaluation, "make_card", broken_card)
        failed = train(spec, base_ts, lakefs, state, instance, mlflow_uri)  # a better model; the card step fails
    assert not failed.success
    gate = [e for e in failed.get_asset_check_evaluations() if e.check_name == "promotion_gate"][0]
    assert gate.passed  # the gate said promote ...
    assert publish_run(instance, lakefs, failed.run_id, m).status == "kept"
    assert registry.aliases(m) == {"champion": "1"}  # ... but the run failed after it: nothing moved
    assert lakefs.head() == main_before
    v2 = AuditTrail().history(m.model_name, "2")
    assert [e.action for e in v2] == ["registered", "gate_decision"] and v2[-1].evidence["decision"] == "promote"
    assert not commit_on_main(lakefs, registry.version_tags(m, "2")["lakefs_commit"])

    # The same data and code again, without the fault: version 2 is not reused (its data never reached main).
    again = train(spec, base_ts, lakefs, state, instance, mlflow_uri)
    assert again.success
    assert again.asset_materializations_for_node(node("candidate_model"))[0].metadata[
        "reused_existing_version"].value is False
    assert registry.aliases(m) == {"champion": "1"}  # not published yet
    publish_run(instance, lakefs, again.run_id, m)
    assert registry.aliases(m) == {"champion": "3", "previous": "1"}
    assert commit_on_main(lakefs, registry.version_tags(m, "3")["lakefs_commit"])


def test_publishing_a_passing_run_moves_the_champion_once(spec, base_ts, lakefs, state, instance, mlflow_uri):
    m = mlflow_res(spec, mlflow_uri)
    result = train(spec, base_ts, lakefs, state, instance, mlflow_uri)
    first = publish_run(instance, lakefs, result.run_id, m)
    assert first.status == "published" and "promoted" in first.detail
    second = publish_run(instance, lakefs, result.run_id, m)
    publish_pending(instance, lakefs, m)
    assert second.status == "published" and "already" in second.detail
    assert registry.aliases(m) == {"champion": "1"}
    assert actions(m) == [("registered", "1"), ("gate_decision", "1"), ("promotion_intent", "1"), ("promoted", "1")]
    promoted = AuditTrail().history(m.model_name)[-1]
    assert promoted.evidence["dagster_run_id"] == result.run_id and promoted.evidence["published_commit"] == first.commit
    assert commit_on_main(lakefs, registry.version_tags(m, "1")["lakefs_commit"])


def test_a_run_published_without_an_mlflow_resource_is_promoted_from_the_environment_store(
        spec, base_ts, lakefs, state, instance, mlflow_uri):
    """`mlp publish` (publish_pending with no MLflow resource) moves the champion through MLFLOW_TRACKING_URI.
    The next run never publishes its predecessor: it fails, naming it, until it is published."""
    m = mlflow_res(spec, mlflow_uri)
    first = train(spec, base_ts, lakefs, state, instance, mlflow_uri, **WEAK)
    assert registry.aliases(m) == {}
    blocked = train(spec, base_ts, lakefs, state, instance, mlflow_uri)
    assert not blocked.success and registry.aliases(m) == {}
    assert lakefs.branch_exists(run_branch(first.run_id))
    outcomes = {o.run_id: o.status for o in publish_pending(instance, lakefs)}  # what `mlp publish` does
    assert outcomes[first.run_id] == "published"
    assert registry.aliases(m) == {"champion": "1"}


def test_a_retrain_on_unchanged_data_and_code_registers_no_new_version(spec, base_ts, lakefs, state, instance,
                                                                        mlflow_uri, monkeypatch):
    import assets.training

    # The code as one exact commit (a developer's uncommitted edits would rightly disable reuse).
    monkeypatch.setattr(assets.training, "git_commit", lambda: "0123456789abcdef0123456789abcdef01234567")
    m = mlflow_res(spec, mlflow_uri)
    first = train(spec, base_ts, lakefs, state, instance, mlflow_uri)
    publish_run(instance, lakefs, first.run_id, m)
    fp = registry.version_tags(m, "1")["fingerprint"]
    second = train(spec, base_ts, lakefs, state, instance, mlflow_uri)
    assert second.success
    meta = second.asset_materializations_for_node(node("candidate_model"))[0].metadata
    assert meta["reused_existing_version"].value is True and meta["model_version"].value == 1
    assert meta["fingerprint"].value == fp
    assert versions(m) == ["1"]
    publish_run(instance, lakefs, second.run_id, m)
    assert registry.aliases(m) == {"champion": "1"}
    assert [a for a in actions(m) if a[0] == "registered"] == [("registered", "1")]
    # Different parameters are a different model (here a weaker one, which the gate then rejects).
    train(spec, base_ts, lakefs, state, instance, mlflow_uri, **WEAK)
    assert versions(m) == ["1", "2"]


def test_registry_read_errors_raise_instead_of_reading_as_no_champion(spec, mlflow_uri, tmp_path):
    from tooling.services import free_port

    fresh = mlflow_res(spec, mlflow_uri)
    assert registry.aliases(fresh) == {}  # only "not registered yet" reads as no model

    garbage = tmp_path / "broken" / "mlflow.db"
    garbage.parent.mkdir()
    garbage.write_bytes(b"this is not a database" * 100)
    broken = MLflowResource(tracking_uri=f"sqlite:///{garbage}", model_name=fresh.model_name, experiment="x")
    with pytest.raises(registry.RegistryError, match=str(garbage)):
        registry.aliases(broken)

    uri = f"http://alice:s3cr3t@127.0.0.1:{free_port()}"
    down = MLflowResource(tracking_uri=uri, model_name=fresh.model_name, retries=1, timeout_seconds=1)
    with pytest.raises(registry.RegistryError, match=r"127\.0\.0\.1") as err:
        registry.aliases(down)
    assert "s3cr3t" not in str(err.value) and "alice" not in str(err.value)


def test_a_failed_audit_write_leaves_no_model_version_and_names_the_store(spec, base_ts, lakefs, state, instance,
                                                                          mlflow_uri, monkeypatch, tmp_path):
    m = mlflow_res(spec, mlflow_uri)
    unwritable = tmp_path / "audit-is-a-folder"
    unwritable.mkdir()
    monkeypatch.setenv("MLP_AUDIT_DB", str(unwritable))
    result = train(spec, base_ts, lakefs, state, instance, mlflow_uri)
    assert not result.success
    err = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    message = str(err.event_specific_data.error.message) + str(err.event_specific_data.error.cause)
    assert "audit entry" in message and mlflow_uri in message and "no version left behind" in message
    assert versions(m) == []
    assert registry.aliases(m) == {}


def test_an_unreachable_mlflow_registers_nothing_and_the_error_names_the_store_without_credentials(
        spec, base_ts, lakefs, state, instance, mlflow_uri):
    import dagster as dg

    from tooling.services import free_port

    from .helpers import resources_for
    from .test_models import pipeline

    uri = f"http://ops:hunter2@127.0.0.1:{free_port()}"
    res = {**resources_for(lakefs, state, spec, mlflow_uri),
           "mlflow": MLflowResource(tracking_uri=uri, model_name=f"{spec.name}-model", experiment=spec.name,
                                    retries=2, timeout_seconds=1)}
    result = dg.materialize(pipeline(spec, base_ts), instance=instance, resources=res, raise_on_error=False)
    assert not result.success
    err = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"][0]
    assert err.step_key == "car_loan__candidate_model"
    message = str(err.event_specific_data.error.message) + str(err.event_specific_data.error.cause)
    assert "127.0.0.1" in message and "hunter2" not in message and "no model is registered" in message
    assert versions(mlflow_res(spec, mlflow_uri)) == [] and AuditTrail().history() == []


def test_a_promotion_cut_short_is_finished_by_the_next_publish_exactly_once(spec, base_ts, lakefs, state, instance,
                                                                              mlflow_uri):
    from tooling.cli import doctor
    from tooling.services import free_port
    from resources.lakefs import run_branch

    m = mlflow_res(spec, mlflow_uri)
    result = train(spec, base_ts, lakefs, state, instance, mlflow_uri)
    down = MLflowResource(tracking_uri=f"http://127.0.0.1:{free_port()}", model_name=m.model_name, retries=1,
                          timeout_seconds=1)
    outcome = publish_run(instance, lakefs, result.run_id, down)  # data merged; MLflow down for the alias move
    assert outcome.status == "published" and outcome.promotion_pending and "127.0.0.1" in outcome.detail
    assert commit_on_main(lakefs, registry.version_tags(m, "1")["lakefs_commit"])
    assert registry.aliases(m) == {}
    assert lakefs.branch_exists(run_branch(result.run_id))  # kept as the marker of unfinished work
    assert any(result.run_id in p for p in doctor(m, lakefs, instance))
    # A publisher killed after writing its intent, before moving anything.
    intent = AuditTrail().record("promotion_intent", m.model_name, "1", "killed mid-move",
                                 {"dagster_run_id": result.run_id, "aliases_before": {},
                                  "aliases_after": {"champion": "1"}}, actor="platform:publish",
                                 once=f"promotion_intent:{result.run_id}")
    assert any("has no outcome" in p for p in doctor(m, lakefs, instance))

    publish_pending(instance, lakefs, m)  # what the next run (or `mlp publish`) does
    assert registry.aliases(m) == {"champion": "1"}
    assert not lakefs.branch_exists(run_branch(result.run_id))
    publish_run(instance, lakefs, result.run_id, m)
    moves = [e for e in AuditTrail().history(m.model_name) if e.action in ("promotion_intent", "promoted")]
    assert [(e.action, e.seq) for e in moves][0] == ("promotion_intent", intent.seq)
    assert [e.action for e in moves] == ["promotion_intent", "promoted"]
    assert moves[1].evidence["intent_seq"] == intent.seq
    assert doctor(m, lakefs, instance) == []


def test_an_audit_entry_with_a_once_key_is_written_once(state):
    trail = AuditTrail()
    a = trail.record("promotion_intent", "m", "1", "first", {"x": 1}, actor="user:a", once="k")
    b = trail.record("promotion_intent", "m", "1", "second", {"x": 2}, actor="user:b", once="k")
    assert a.seq == b.seq and b.reason == "first" and len(trail.history("m")) == 1
    trail.record("promotion_intent", "m", "1", "other key", {}, actor="user:a", once="k2")
    assert len(trail.history("m")) == 2 and trail.verify() == []


def test_a_promotion_cut_short_is_not_reapplied_over_aliases_moved_in_between(spec, base_ts, lakefs, state,
                                                                               instance, mlflow_uri):
    m = mlflow_res(spec, mlflow_uri)
    result = train(spec, base_ts, lakefs, state, instance, mlflow_uri)
    # A publisher killed after its intent, before moving anything; then an operator moves the alias by hand.
    AuditTrail().record("promotion_intent", m.model_name, "1", "killed mid-move",
                        {"dagster_run_id": result.run_id, "aliases_before": {},
                         "aliases_after": {"champion": "1"}}, actor="platform:publish",
                        once=f"promotion_intent:{result.run_id}")
    registry.set_alias(m, "challenger", "1")
    outcome = publish_run(instance, lakefs, result.run_id, m)
    assert outcome.promotion_pending and "moved in between" in outcome.detail
    assert registry.aliases(m) == {"challenger": "1"}  # the stale plan was not applied
