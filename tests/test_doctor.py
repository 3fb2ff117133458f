"""`mlp doctor`: the audit trail, the MLflow aliases and the lakeFS commits agree, and each divergence one can
provoke is named (real MLflow store, real lakeFS, real Dagster instance)."""

import sqlite3

import pytest

from mlplatform import registry
from tooling import cli
from mlplatform.audit import AuditTrail
from resources.publish import publish_run

from .test_models import base_ts, mlflow_res, spec, train  # noqa: F401 - fixtures and helpers

pytestmark = pytest.mark.services


@pytest.fixture
def published(spec, base_ts, lakefs, state, instance, mlflow_uri):
    """Version 1 trained, gated and published: champion, with its data on main."""
    m = mlflow_res(spec, mlflow_uri)
    result = train(spec, base_ts, lakefs, state, instance, mlflow_uri, num_boost_round=8, num_leaves=3,
                   learning_rate=0.1)
    publish_run(instance, lakefs, result.run_id, m)
    assert registry.aliases(m) == {"champion": "1"}
    return m


def run_cli(monkeypatch, capsys, instance) -> tuple[int, str]:
    monkeypatch.setattr(cli, "_instance", lambda: instance)
    code = cli.main(["doctor"])
    return code, capsys.readouterr().out


def test_doctor_passes_when_audit_aliases_and_lakefs_agree(published, lakefs, instance, monkeypatch, capsys):
    assert cli.doctor(published, lakefs, instance) == []
    code, out = run_cli(monkeypatch, capsys, instance)
    assert code == 0 and out.startswith("ok:")


def test_doctor_names_a_champion_moved_behind_the_platforms_back_and_trained_off_main(
        published, spec, base_ts, lakefs, state, instance, mlflow_uri, monkeypatch, capsys):
    import assets.evaluation

    with monkeypatch.context() as patch:
        patch.setattr(assets.evaluation, "make_card", lambda *a, **k: 1 / 0)
        failed = train(spec, base_ts, lakefs, state, instance, mlflow_uri)  # v2 registered, its run fails
    assert not failed.success
    assert cli.doctor(published, lakefs, instance) == []  # a failed run's version is fine while not champion
    registry.set_alias(published, registry.CHAMPION, "2")  # by hand, bypassing the platform
    problems = cli.doctor(published, lakefs, instance)
    assert any("alias champion" in p and "v2" in p and "behind the platform's back" in p for p in problems)
    assert any("champion v2 was trained on lakeFS commit" in p and "not reachable from main" in p for p in problems)
    code, out = run_cli(monkeypatch, capsys, instance)
    assert code == 1 and out.count("DIVERGENCE:") == len(problems)


def test_doctor_names_an_intent_without_outcome(published, lakefs, instance):
    trail = AuditTrail()
    intent = trail.record("rollback_intent", published.model_name, "1", "process killed mid-move",
                          {"aliases_before": {"champion": "1"}, "aliases_after": {"champion": "1"}}, actor="user:t")
    (problem,) = cli.doctor(published, lakefs, instance)
    assert f"audit entry {intent.seq} (rollback_intent v1" in problem and "has no outcome" in problem


def test_doctor_names_a_version_without_audit_entry_and_a_broken_hash_chain(published, lakefs, instance):
    published.client().create_model_version(published.model_name, source="file:///tmp/none")  # behind our back
    problems = cli.doctor(published, lakefs, instance)
    assert problems == [f"{published.model_name} v2 is in MLflow at {published.tracking_uri} but has no "
                        f"`registered` entry in the audit trail (half-registered, or registered behind the "
                        f"platform's back)"]
    con = sqlite3.connect(AuditTrail().path)
    con.execute("DROP TRIGGER audit_no_update")
    con.execute("UPDATE audit_events SET reason = 'edited' WHERE seq = 1")
    con.commit()
    assert any(p.startswith("audit hash chain broken at entries [1]") for p in cli.doctor(published, lakefs, instance))


def test_doctor_names_a_published_run_whose_promotion_is_not_recorded(published, lakefs, instance):
    import uuid

    import dagster as dg

    from resources.publish import GATE_TAG, MODEL_NAME_TAG, MODEL_VERSION_TAG, PUBLISHED_TAG

    assert instance.get_runs()[0].tags[GATE_TAG] == "promote"  # the published run's promotion is in the trail
    run_id = str(uuid.uuid4())  # a run published while MLflow was down: merged, aliases not moved yet
    instance.add_run(dg.DagsterRun(job_name="car_loan__retrain", run_id=run_id, status=dg.DagsterRunStatus.SUCCESS, tags={
        GATE_TAG: "promote", MODEL_VERSION_TAG: "1", MODEL_NAME_TAG: published.model_name, PUBLISHED_TAG: "c0ffee"}))
    (problem,) = cli.doctor(published, lakefs, instance)
    assert run_id in problem and "mlp publish --run-id" in problem
