"""The prod profile (MLP_ENV=prod) chosen by configuration alone, against a real Postgres server: Dagster's storage,
MLflow's store, the audit trail (append-only, hash-chained) and lakeFS's KV store all on it. The daemon end to end
scenario on this profile is in tests/test_daemon_e2e.py (its `prod` parameter)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import dagster as dg
import pytest
import yaml

from mlplatform.audit import AuditTrail, PostgresAuditTrail
from resources.environment import Settings, build_resources
from resources.lakefs import LakeFSResource
from tooling.services import LakeFSServer, free_port

from .pg_fixtures import postgres, prod_env  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent


def sql(postgres, database: str, query: str, args: tuple = ()) -> list[tuple]:
    con = postgres.connect(database)
    try:
        with con.cursor() as cur:
            cur.execute(query, args)
            return cur.fetchall() if cur.description else []
    finally:
        con.close()


def db(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?", 1)[0]


# --- configuration alone --------------------------------------------------------------------------------------
def test_the_prod_dagster_yaml_is_the_local_one_with_its_storage_on_postgres():
    local = yaml.safe_load((ROOT / "platform" / "dagster.yaml").read_text())
    prod = yaml.safe_load((ROOT / "platform" / "dagster.prod.yaml").read_text())
    assert {k: v for k, v in prod.items() if k != "storage"} == local  # queue, concurrency, retries: the same
    pg = prod["storage"]["postgres"]["postgres_db"]
    assert pg.pop("scheme") == "postgresql+psycopg2"  # the driver dagster-postgres is written for
    assert all(isinstance(v, dict) and set(v) == {"env"} for v in pg.values())  # no connection detail in the file


def test_the_settings_alone_put_the_audit_trail_and_mlflow_artifacts_where_the_profile_says(tmp_path, monkeypatch):
    base = {"MLP_STATE_DIR": str(tmp_path), "LAKEFS_ENDPOINT": "http://127.0.0.1:1", "LAKEFS_ACCESS_KEY_ID": "AKIAX",
            "LAKEFS_SECRET_ACCESS_KEY": "s3cr3t", "LAKEFS_REPOSITORY": "ml", "LAKEFS_STORAGE_NAMESPACE": "local://ml",
            "MLFLOW_UI_URL": "http://127.0.0.1:5000"}
    local = build_resources(Settings.from_env({**base, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}))
    assert (local["audit"].url, local["mlflow"].artifact_root) == ("", "")  # today's local profile, unchanged
    assert local["audit"].path == str(tmp_path / "audit" / "audit.db")
    url = "postgresql://mlp:pw@127.0.0.1:5999/audit"
    prod = build_resources(Settings.from_env({**base, "MLP_ENV": "prod", "MLP_AUDIT_URL": url,
                                              "MLFLOW_TRACKING_URI": "postgresql://mlp:pw@127.0.0.1:5999/mlflow"}))
    assert prod["audit"].url == url
    assert prod["mlflow"].artifact_root == (tmp_path / "mlflow" / "artifacts").as_uri()
    monkeypatch.setenv("MLP_AUDIT_URL", url)
    assert "pw" not in repr(Settings.from_env({**base, "MLP_AUDIT_URL": url}))


# --- Dagster ---------------------------------------------------------------------------------------------------
@pytest.mark.services
def test_dagster_loads_the_prod_yaml_and_stores_runs_and_materializations_in_postgres(postgres, prod_env, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "platform" / "dagster.prod.yaml", home / "dagster.yaml")

    @dg.asset
    def prod_probe() -> int:
        return 1

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        result = dg.materialize([prod_probe], instance=instance)
        assert result.success
    rows = sql(postgres, prod_env["MLP_PG_DAGSTER_DB"], "SELECT run_id, status FROM runs")
    assert rows == [(result.run_id, "SUCCESS")]
    with dg.DagsterInstance.from_config(str(home)) as again:  # a new process would see the same
        record = again.get_latest_materialization_event(dg.AssetKey("prod_probe"))
        assert record is not None and record.run_id == result.run_id


# --- MLflow ----------------------------------------------------------------------------------------------------
@pytest.mark.services
def test_a_model_version_is_registered_in_mlflow_on_postgres(postgres, prod_env, tmp_path):
    import mlflow

    from mlplatform.tracking import Tracking

    tracking = Tracking(prod_env["MLFLOW_TRACKING_URI"], artifact_root=(tmp_path / "artifacts").as_uri(),
                        experiment="prod-profile", model_name="prod-profile-model")
    client = tracking.client()
    with tracking.redacting(), mlflow.start_run(experiment_id=tracking.setup()) as run:
        mlflow.log_metric("auc", 0.9)
        mlflow.log_dict({"model": "card"}, "model/card.json")
    client.create_registered_model(tracking.model_name)
    version = client.create_model_version(tracking.model_name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias(tracking.model_name, "champion", version.version)
    assert str(tracking.alias_version("champion").version) == "1"
    db_name = db(prod_env["MLFLOW_TRACKING_URI"])
    assert sql(postgres, db_name, "SELECT name, version FROM model_versions") == [("prod-profile-model", 1)]
    assert sql(postgres, db_name, "SELECT key, value FROM metrics") == [("auc", 0.9)]
    assert (tmp_path / "artifacts").is_dir()  # artifacts in the artifact location, not in ./mlruns
    assert prod_env["MLP_PG_PASSWORD"] not in tracking.display_uri


# --- the audit trail -------------------------------------------------------------------------------------------
@pytest.mark.services
def test_the_audit_setting_chooses_postgres_and_the_trail_records_and_reads_back(prod_env):
    trail = AuditTrail()  # MLP_AUDIT_URL is set: the Postgres trail
    assert isinstance(trail, PostgresAuditTrail) and prod_env["MLP_PG_PASSWORD"] not in trail.location
    first = trail.record("registered", "m", 1, "trained", {"auc": 0.9}, actor="user:test")
    again = trail.record("gate_decision", "m", 1, "passed", {"decision": "promote"}, actor="user:test", once="k1")
    same = trail.record("gate_decision", "m", 1, "passed twice", actor="user:test", once="k1")
    assert same.seq == again.seq and first.seq < again.seq
    assert [(e.action, e.version, e.evidence.get("auc")) for e in AuditTrail(prod_env["MLP_AUDIT_URL"]).history("m")] \
        == [("registered", "1", 0.9), ("gate_decision", "1", None)]
    assert trail.verify() == []
    res = build_resources(Settings.from_env())["audit"].trail()
    assert isinstance(res, PostgresAuditTrail) and len(res.history("m")) == 2


def test_an_unreachable_audit_database_is_named_by_its_setting_without_its_password():
    from mlplatform.audit import AuditError

    url = f"postgresql://mlp:s3cr3t-pw@127.0.0.1:{free_port()}/audit"
    with pytest.raises(AuditError, match="MLP_AUDIT_URL") as err:
        AuditTrail(url)
    assert "127.0.0.1" in str(err.value) and "s3cr3t-pw" not in str(err.value)


@pytest.mark.services
@pytest.mark.parametrize("statement", ["UPDATE audit_events SET reason = 'edited'", "DELETE FROM audit_events",
                                       "TRUNCATE audit_events"])
def test_postgres_rejects_any_change_to_the_audit_trail(postgres, prod_env, statement):
    import psycopg2

    AuditTrail().record("registered", "m", 1, "trained", actor="user:test")
    with pytest.raises(psycopg2.Error, match="append-only"):
        sql(postgres, db(prod_env["MLP_AUDIT_URL"]), statement)  # even the superuser, through the triggers
    assert [e.reason for e in AuditTrail().history()] == ["trained"]


@pytest.mark.services
def test_verify_finds_an_entry_changed_behind_the_triggers_and_a_forged_one(postgres, prod_env):
    trail = AuditTrail()
    for v in (1, 2, 3):
        trail.record("registered", "m", v, f"trained v{v}", actor="user:test")
    seq2 = trail.history(version="2")[0].seq
    name = db(prod_env["MLP_AUDIT_URL"])
    # A superuser disables the trigger, edits an entry and enables it again: the chain shows it.
    sql(postgres, name, "ALTER TABLE audit_events DISABLE TRIGGER audit_no_update; "
                        "UPDATE audit_events SET reason = 'trained on other data' WHERE seq = %s; "
                        "ALTER TABLE audit_events ENABLE TRIGGER audit_no_update", (seq2,))
    assert trail.verify() == [seq2]
    # An entry inserted directly, with a made-up hash, is found too.
    last = trail.history()[-1]
    sql(postgres, name, "INSERT INTO audit_events (at, actor, action, model, version, reason, evidence, prev_hash, "
                        "hash) VALUES ('2026-01-01', 'user:mallory', 'promoted', 'm', '3', 'forged', '{}', "
                        "(SELECT hash FROM audit_events WHERE seq = %s), 'f00d')", (last.seq,))
    forged = trail.history()[-1].seq
    assert trail.verify() == [seq2, forged]


# --- lakeFS ----------------------------------------------------------------------------------------------------
@pytest.mark.services
def test_lakefs_on_postgres_kv_keeps_the_products_repository_and_commits_across_a_restart(postgres, prod_env,
                                                                                          tmp_path):
    server = LakeFSServer(tmp_path / "lakefs", port=free_port(), kv_url=prod_env["MLP_LAKEFS_KV_URL"]).start()
    try:
        creds = server.credentials
        lakefs = LakeFSResource(endpoint=server.endpoint, access_key_id=creds["access_key_id"],
                                secret_access_key=creds["secret_access_key"], repository=f"p-{uuid.uuid4().hex[:8]}")
        lakefs.put("main", "data/x.txt", b"hello")  # the product creates the repository on first use
        commit = lakefs.commit("main", "first", {"by": "test"})
    finally:
        server.stop()
    kv_tables = sql(postgres, db(prod_env["MLP_LAKEFS_KV_URL"]),
                    "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
    assert kv_tables[0][0] >= 1  # lakeFS's KV lives in Postgres...
    assert not (tmp_path / "lakefs" / "metadata").exists()  # ...and not in the local KV folder
    server = LakeFSServer(tmp_path / "lakefs", port=server.port, kv_url=prod_env["MLP_LAKEFS_KV_URL"]).start()
    try:
        again = LakeFSResource(endpoint=server.endpoint, access_key_id=creds["access_key_id"],
                               secret_access_key=creds["secret_access_key"], repository=lakefs.repository)
        assert again.head("main") == commit
        assert again.get(commit, "data/x.txt") == b"hello"
        assert again.commit_metadata(commit)["by"] == "test"
    finally:
        server.stop()


# --- the operator's side: MLP_ENV=prod make up -----------------------------------------------------------------
@pytest.mark.services
def test_make_up_in_prod_starts_postgres_and_puts_every_store_on_it(tmp_path, monkeypatch, capsys):
    from tooling import services
    from tooling.postgres import local_postgres

    for var in ("LAKEFS_ENDPOINT", "LAKEFS_ACCESS_KEY_ID", "LAKEFS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI",
                "MLP_AUDIT_URL", "MLP_AUDIT_DB", "MLP_PG_HOST", "MLP_LAKEFS_KV_URL", "LAKEFS_REPOSITORY",
                "LAKEFS_STORAGE_NAMESPACE", "MLFLOW_UI_URL", "MLP_DATASET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "state" / "dagster_home"))
    monkeypatch.setenv("MLP_ENV", "prod")
    monkeypatch.setenv("MLP_PG_PORT", str(free_port()))
    monkeypatch.setenv("MLP_LAKEFS_PORT", str(free_port()))
    pg_folder = local_postgres().folder
    try:
        services.up()
        out = capsys.readouterr().out
        env = services.read_env_file()
        assert env["MLFLOW_TRACKING_URI"].startswith("postgresql://") and env["MLP_AUDIT_URL"].startswith(
            "postgresql://") and env["MLP_PG_PORT"] == str(local_postgres().port)
        assert env["MLP_PG_PASSWORD"] not in out  # printed redacted
        lakefs_pid = int((tmp_path / "state" / "lakefs-prod" / "lakefs.pid").read_text())
        assert services._proc_environ(lakefs_pid)["LAKEFS_DATABASE_TYPE"] == "postgres"
        assert "postgres:" in (tmp_path / "state" / "dagster_home" / "dagster.yaml").read_text()
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        settings = Settings.from_env()  # MLP_ENV=prod is satisfied by what `up` wrote
        trail = build_resources(settings)["audit"].trail()
        assert isinstance(trail, PostgresAuditTrail)
        trail.record("registered", "m", 1, "trained", actor="user:test")
        with dg.DagsterInstance.get() as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        LakeFSResource(endpoint=env["LAKEFS_ENDPOINT"], access_key_id=env["LAKEFS_ACCESS_KEY_ID"],
                       secret_access_key=env["LAKEFS_SECRET_ACCESS_KEY"],
                       repository=settings.lakefs_repository).ensure_repository()
    finally:
        services.down()
        stopped = not local_postgres().running()
        shutil.rmtree(pg_folder, ignore_errors=True)
    assert stopped  # `make stop` stops the profile's Postgres too
