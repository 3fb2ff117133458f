"""End to end under a real dagster-daemon on a temporary instance, with real lakeFS and MLflow: the
simulator releases drifting batches and nothing else is done by the test; the arrival sensor ingests
them, declarative automation scores and monitors them, the retrain sensor fires, and a new model version
is trained, evaluated and gated.

Two data sets are live in the daemon's code location (issue 13: many data sets): the drill's car_loan and the
bundled car_price. Everything the drills do happens to car_loan; car_price's sensors run beside it and must
request nothing: a drifting batch of one data set retrains only that one.

Each scenario runs on both profiles, chosen by configuration alone: `local` (SQLite stores, lakeFS local KV) and
`prod` (MLP_ENV=prod: Dagster's storage, MLflow's store, the audit trail and lakeFS's KV store all on a real
Postgres server, tests/pg_fixtures.py)."""

import os
import shutil
import subprocess
import sys
import time

import dagster as dg
import pytest

from assets.evaluation import build_evaluation
from assets.features import build_features
from assets.ingestion import build_ingestion
from assets.training import build_training
from mlplatform import registry
from mlplatform.audit import AuditTrail
from mlplatform.batches import Landing
from tooling.simulator import Simulator
from resources.environment import build_resources
from resources.lakefs import LakeFSResource
from resources.naming import ns
from resources.publish import publish_run
from mlplatform.spec import load_spec
from tooling.services import LakeFSServer, free_port

from .conftest import ROOT
from .helpers import settings_for
from .pg_fixtures import postgres  # noqa: F401 - fixture

pytestmark = pytest.mark.daemon


# How long the daemon has for a scenario: 25 min by default; a machine shared with other work may need more.
DEADLINE_SECONDS = float(os.environ.get("MLP_E2E_DEADLINE_SECONDS", "1500"))


def prod() -> bool:
    return os.environ.get("MLP_ENV") == "prod"


@pytest.fixture(params=["local", "prod"])
def profile_env(request, monkeypatch) -> dict[str, str]:
    """Nothing for the local profile; for prod, MLP_ENV=prod and fresh Postgres databases for Dagster, MLflow,
    the audit trail and lakeFS, exported (so the daemon, its runs and this test all read them)."""
    if request.param == "local":
        return {}
    env = {"MLP_ENV": "prod", "MLFLOW_UI_URL": "http://127.0.0.1:5000",
           **request.getfixturevalue("postgres").fresh_databases()}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def lakefs(lakefs, profile_env, tmp_path, monkeypatch):
    """conftest's lakeFS (local profile), or a lakeFS server on the profile's Postgres KV (prod)."""
    if not profile_env:
        yield lakefs
        return
    server = LakeFSServer(tmp_path / "lakefs-pg", port=free_port(), kv_url=profile_env["MLP_LAKEFS_KV_URL"]).start()
    try:
        namespace = f"local://{lakefs.repository}"
        for k, v in {**server.env(), "LAKEFS_STORAGE_NAMESPACE": namespace}.items():
            monkeypatch.setenv(k, v)
        creds = server.credentials
        yield LakeFSResource(endpoint=server.endpoint, access_key_id=creds["access_key_id"],
                             secret_access_key=creds["secret_access_key"], repository=lakefs.repository,
                             storage_namespace=namespace)
    finally:
        server.stop()


@pytest.fixture
def mlflow_uri(mlflow_uri, profile_env, monkeypatch) -> str:
    """conftest's SQLite store (local profile), or the MLflow database on Postgres (prod)."""
    if not profile_env:
        return mlflow_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", profile_env["MLFLOW_TRACKING_URI"])
    return profile_env["MLFLOW_TRACKING_URI"]


def drill_spec(tmp_path, retrain: bool = True):
    text = (ROOT / "platform" / "datasets" / "car_loan.yaml").read_text()
    text = text.replace("volume:      {enabled: true", "volume:      {enabled: false")
    if not retrain:  # the rollback drill: a retrain racing the rollback would replace the bad champion first
        text = text.replace("drift:       {enabled: true", "drift:       {enabled: false")
        text = text.replace("performance: {enabled: true", "performance: {enabled: false")
    text = text.replace("min_alerting_features: 4", "min_alerting_features: 2")
    text = text.replace("min_minutes_between_retrains: 60", "min_minutes_between_retrains: 0")
    path = tmp_path / "car_loan.yaml"
    path.write_text(text)
    return path


def drill_setup(lakefs, mlflow_uri, state, tmp_path, monkeypatch, retrain: bool = True):
    """A temporary DAGSTER_HOME seeded from the profile's dagster.yaml, the drill spec, the real resources."""
    spec_path = drill_spec(tmp_path, retrain)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "platform" / ("dagster.prod.yaml" if prod() else "dagster.yaml"), home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("MLP_DATASET", str(spec_path))  # the drill's data set (settings, tools)
    monkeypatch.setenv("MLP_DATASETS", f"{spec_path},{OTHER}")  # the code location: both live
    spec = load_spec(spec_path)
    assets = [*build_ingestion(spec), *build_features(spec), *build_training(spec), *build_evaluation(spec)]
    settings = settings_for(lakefs, state, spec, mlflow_uri)
    if prod():  # the trail the daemon's runs write to (MLP_AUDIT_URL), for the set-up's entries too
        settings = settings.replace(audit_url=os.environ["MLP_AUDIT_URL"])
    res = build_resources(settings)
    res["mlflow"] = res["mlflow"].scoped(spec)
    return spec, dg.DagsterInstance.get(), res, assets


OTHER = "car_price"  # the second live data set: nothing lands for it


def assert_other_untouched(instance, res) -> None:
    """The second data set was left alone: no run of its jobs, no materialization of its assets, no model."""
    other = [r for r in instance.get_runs() if r.job_name.startswith(f"{OTHER}__")
             or any(k.path[0] == OTHER for k in (r.asset_selection or ()))]
    assert other == [], [(r.job_name, r.status.value) for r in other]
    for key in ns(OTHER).keys("raw_records", "features", "training_set", "candidate_model", "drift_report"):
        assert instance.get_latest_materialization_event(key) is None, key
    client = res["mlflow"].client()
    assert client.search_model_versions(f"name='{OTHER}-model'") == []


def start_daemon(tmp_path) -> subprocess.Popen:
    log = open(tmp_path / "daemon.log", "w")
    return subprocess.Popen([str(ROOT / ".venv" / "bin" / "dagster-daemon"), "run", "-w", "workspace.yaml"],
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_drifting_batches_make_the_daemon_retrain_without_any_command(lakefs, mlflow_uri, state, tmp_path,
                                                                       monkeypatch):
    spec, instance, res, assets = drill_setup(lakefs, mlflow_uri, state, tmp_path, monkeypatch)
    n = ns(spec)

    # Precondition: a champion trained on the reference period (set-up, before the daemon starts).
    for selection in (["reference_data"], ["stg_reference_records", "stg_reference_labels", "reference_features",
                                           "labelled_examples", "training_set", "candidate_model",
                                           "evaluation_report", "model_card"]):
        r = dg.materialize(assets, selection=n.keys(*selection), instance=instance, resources=res)
        publish_run(instance, lakefs, r.run_id)
    m = res["mlflow"]
    assert registry.aliases(m)["champion"] == "1"
    v1_commit = registry.version_tags(m, "1")["lakefs_commit"]

    daemon = start_daemon(tmp_path)
    try:
        # The only action: drifting production batches land.
        Simulator(spec, Landing(state / "landing" / spec.name)).release(2, start="2019-04-01")
        deadline = time.time() + DEADLINE_SECONDS
        gated = None
        while time.time() < deadline and gated is None:
            time.sleep(10)
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            events = AuditTrail().history(m.model_name)
            decided = next((e for e in events if e.version == "2" and e.action == "gate_decision"), None)
            # A promotion is complete only once the run's data is on main and the publish moved the alias.
            if decided is not None and (decided.evidence.get("decision") != "promote"
                                        or any(e.version == "2" and e.action == "promoted" for e in events)):
                gated = decided
        events = AuditTrail().history(m.model_name)
        runs = instance.get_runs()
        summary = [(r.job_name, r.status.value, r.tags.get("dagster/partition")) for r in runs]
        assert gated is not None, f"no gated version 2; runs: {summary}; audit: {[e.action for e in events]}"
    finally:
        os.killpg(daemon.pid, 15)
        daemon.wait(30)
    triggered = [e for e in events if e.action == "retrain_triggered"]
    assert triggered and triggered[0].actor == "sensor:car_loan__retrain_on_evidence"
    assert set(triggered[0].evidence) & {"drift", "performance"}
    tags = registry.version_tags(m, "2")
    (retrain,) = [r for r in runs if r.run_id == tags["dagster_run_id"]]  # version 2 came from this run
    assert retrain.job_name == "car_loan__retrain"
    assert_other_untouched(instance, res)  # car_price's sensors ran beside it and requested nothing
    assert retrain.tags["retrain/trigger"] in ("drift", "performance", "drift+performance")
    assert tags["lakefs_commit"] != v1_commit  # trained on the new batches' data, a new lakeFS commit
    assert lakefs.repo().commit(tags["lakefs_commit"]).get_commit().id == tags["lakefs_commit"]
    order = [e.action for e in events]
    assert order.index("retrain_triggered") < order.index("registered", 2)
    if not prod():
        report_latency(instance, state / "landing" / spec.name, n)
    else:  # everything above was read from Postgres: the runs, the audit trail, the registry, lakeFS's KV
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(AuditTrail()).__name__ == "PostgresAuditTrail"


def report_latency(instance, landing_root, n):
    """Record, for the note, how long a landed batch took to be scored and monitored (not asserted)."""
    import json
    import statistics

    out = {}
    for f in sorted((landing_root / "records").glob("*/*.parquet")):
        partition, landed = f.parent.name, f.stat().st_mtime
        done = {}
        for key in ("batch_predictions", "drift_report", "data_quality_report", "performance_estimate"):
            recs = instance.fetch_materializations(dg.AssetRecordsFilter(
                asset_key=n.key(key), asset_partitions=[partition]), limit=1).records
            if recs:
                done[key] = round(recs[0].timestamp - landed, 1)
        out[partition] = done
    medians = {k: statistics.median([v[k] for v in out.values() if k in v]) for k in
               ("batch_predictions", "drift_report") if any(k in v for v in out.values())}
    path = ROOT / "bench" / "results" / "lifecycle_latency.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"per_batch_seconds": out, "median_seconds": medians}, indent=1))
    print("landing -> materialized (s):", json.dumps(out), "median:", medians)


def test_a_worse_champion_is_rolled_back_by_the_daemon(lakefs, mlflow_uri, state, tmp_path, monkeypatch):
    spec, instance, res, assets = drill_setup(lakefs, mlflow_uri, state, tmp_path, monkeypatch, retrain=False)
    n = ns(spec)
    train = n.keys("stg_reference_records", "stg_reference_labels", "reference_features", "labelled_examples",
                   "training_set", "candidate_model", "evaluation_report", "model_card")
    r = dg.materialize(assets, selection=n.keys("reference_data"), instance=instance, resources=res)
    publish_run(instance, lakefs, r.run_id)
    good = dg.materialize(assets, selection=train, instance=instance, resources=res)
    publish_run(instance, lakefs, good.run_id)
    # A deliberately worse model (shuffled labels) is made champion by hand, bypassing the gate.
    r = dg.materialize(assets, selection=train, instance=instance, resources=res, raise_on_error=False,
                       run_config={"ops": {"car_loan__candidate_model": {"config": {"shuffle_labels": True}}}})
    m = res["mlflow"]
    registry.promote(m, "2")
    assert registry.aliases(m)["champion"] == "2" and registry.aliases(m)["previous"] == "1"

    daemon = start_daemon(tmp_path)
    try:
        # The only action: two batches land; the first one's labels arrive with the second.
        Simulator(spec, Landing(state / "landing" / spec.name)).release(2, start="2018-11-01")
        deadline = time.time() + DEADLINE_SECONDS
        while time.time() < deadline and registry.aliases(m).get("champion") != "1":
            time.sleep(10)
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
        runs = [(r.job_name, r.status.value, r.tags.get("dagster/partition")) for r in instance.get_runs()]
        assert registry.aliases(m).get("champion") == "1", f"no rollback; runs: {runs}"
    finally:
        os.killpg(daemon.pid, 15)
        daemon.wait(30)
    # The restored champion is the original version 1: the model of the good training run.
    assert registry.aliases(m)["champion"] == "1" and registry.version_tags(m, "1")["dagster_run_id"] == good.run_id
    last = [e for e in AuditTrail().history(m.model_name) if e.action == "rolled_back"][-1]
    assert last.actor == "sensor:rollback_on_regression"
    assert last.evidence["from_version"] == "2" and last.evidence["to_version"] == "1"
    assert last.evidence["partition"] == "2018-11-01"
    evidence_run = instance.get_run_by_id(last.evidence["dagster_run_id"])
    assert evidence_run is not None  # the run whose realized performance caused it is linked
    assert_other_untouched(instance, res)
    if prod():
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(AuditTrail()).__name__ == "PostgresAuditTrail" and AuditTrail().verify() == []
