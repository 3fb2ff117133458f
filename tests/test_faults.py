"""Fault drills against the real services: lakeFS, MLflow, a Dagster instance and (for most) a real
dagster-daemon. Each drill injects one fault, asserts a clear error naming the endpoint or file within
seconds, asserts that lakeFS `main` holds only checked data and that the registry has no version without
its audit entry and no alias moved by a failed run, then lets the daemon finish the work by itself."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from tooling.services import LakeFSServer, free_port
from resources.io import LakeFSIOManager, TRANSIENT_TAG, latest_checked_materialization
from resources.lakefs import LakeFSResource, LakeFSUnavailable, run_branch
from resources.publish import publish_run

from .conftest import ROOT

from .helpers import K, key  # the tests' data set: car_loan


pytestmark = pytest.mark.faults

RETRAIN = "car_loan__retrain"  # the drills run on car_loan (with car_price live beside it)


# --- helpers -------------------------------------------------------------------------------------------
def wait_for(what: str, fn, timeout: float, every: float = 1.0, daemon: subprocess.Popen | None = None,
             log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        if daemon is not None and daemon.poll() is not None:
            raise AssertionError(f"dagster-daemon exited while waiting for {what}: "
                                 f"{log.read_text()[-3000:] if log else ''}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def runs_of(instance: dg.DagsterInstance, job: str) -> list[dg.DagsterRun]:
    return list(instance.get_runs(filters=dg.RunsFilter(job_name=job)))


def step_started(instance: dg.DagsterInstance, run_id: str, step: str) -> bool:
    recs = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_START).records
    return any(r.event_log_entry.dagster_event.step_key == step for r in recs)


def run_worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    for rec in instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT).records:
        m = re.search(r"Started process for run \(pid: (\d+)\)", rec.event_log_entry.dagster_event.message or "")
        if m:
            return int(m.group(1))
    return None


def run_messages(instance: dg.DagsterInstance, run_id: str) -> list[tuple[float, str]]:
    out = []
    for entry in instance.all_logs(run_id):
        text = entry.user_message or ""
        if entry.is_dagster_event and entry.dagster_event.event_type == dg.DagsterEventType.STEP_FAILURE:
            err = entry.dagster_event.step_failure_data.error
            while err is not None:
                text += "\n" + (err.message or "")
                err = err.cause
        out.append((entry.timestamp, text))
    return out


def finished(run: dg.DagsterRun | None) -> bool:
    return run is not None and run.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE,
                                              dg.DagsterRunStatus.CANCELED)


def retry_of(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRun | None:
    return next((r for r in instance.get_runs() if r.parent_run_id == run_id), None)


def final_retry(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRun | None:
    """The last run of `run_id`'s retry chain, once it has finished."""
    run = instance.get_run_by_id(run_id)
    while run is not None and run.status == dg.DagsterRunStatus.FAILURE:
        nxt = retry_of(instance, run.run_id)
        if nxt is None:
            return None
        run = nxt
    return run if finished(run) else None


def main_holds_only_checked_data(lakefs: LakeFSResource, instance: dg.DagsterInstance) -> list[str]:
    """Every run merged into main succeeded with no failed blocking check; returns the merged run ids."""
    from resources.publish import failed_blocking_checks

    merged = []
    for c in lakefs.repo().ref("main").log(max_amount=200):
        run_id = (c.metadata or {}).get("dagster_run_id")
        if run_id and c.message.startswith("publish"):
            run = instance.get_run_by_id(run_id)
            assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS, (c.message, run and run.status)
            assert not failed_blocking_checks(instance, run_id), c.message
            merged.append(run_id)
    return merged


def wait_published(lakefs: LakeFSResource, instance: dg.DagsterInstance, run_id: str, timeout: float = 120):
    """The daemon's publish sensor merges a successful run into main by itself (no later run needed)."""
    try:
        return wait_for(f"run {run_id} to be published", lambda: (lambda ids: ids if run_id in ids else None)(
            main_holds_only_checked_data(lakefs, instance)), timeout, every=3)
    except AssertionError:
        ticks = [s.name for s in instance.all_instigator_state() if s.status.value == "RUNNING"]
        raise AssertionError(f"run {run_id} succeeded but was not merged into main within {timeout:.0f}s; "
                             f"sensors and schedules running: {ticks} (the publish sensors of "
                             f"sensors/publish.py must run by default)") from None


def wait_champion(m, timeout: float = 90) -> None:
    """The publish sensor moves the aliases just after the merge: wait for that, not only for the merge."""
    def promoted():
        aliases, versions = registry_state(m)
        return versions and aliases.get("champion") == versions[-1]

    try:
        wait_for("the published model to become champion", promoted, timeout, every=2)
    except AssertionError as exc:
        from mlplatform.audit import AuditTrail

        trail = [(e.action, e.version, e.reason[:160]) for e in AuditTrail().history(m.model_name)]
        raise AssertionError(f"{exc}; aliases/versions {registry_state(m)}; audit {trail}") from None


def registry_state(m) -> tuple[dict, list[str]]:
    """(aliases, versions); asserts every version has its audit entry."""
    from mlflow.exceptions import MlflowException

    from mlplatform import registry
    from mlplatform.audit import AuditTrail

    try:
        versions = [str(v.version) for v in m.client().search_model_versions(f"name='{m.model_name}'")]
    except MlflowException:
        versions = []
    audited = {e.version for e in AuditTrail().history(m.model_name) if e.action == "registered"}
    missing = sorted(set(versions) - audited)
    assert not missing, f"model versions {missing} of {m.model_name} have no audit entry"
    return registry.aliases(m), sorted(versions, key=int)


def launch(job: str, tmp_path: Path) -> None:
    """Submit a run of `job` to the instance's queue, as a user (or a schedule) would."""
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "dagster"), "job", "launch", "-w", "workspace.yaml",
                          "-j", job], cwd=ROOT, env={**os.environ}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


def stop_daemon(daemon: subprocess.Popen) -> None:
    if daemon.poll() is None:
        try:
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(daemon.pid, signal.SIGKILL)
    else:  # the daemon died (a drill killed it): its code server may still be finishing a run
        try:
            os.killpg(daemon.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


@pytest.fixture
def lifecycle(lakefs, mlflow_uri, state, tmp_path, monkeypatch):
    """The daemon drills' set-up: temporary DAGSTER_HOME from platform/dagster.yaml, reference data published."""
    from .test_daemon_e2e import drill_setup

    def make(retrain: bool = False, res_lakefs: LakeFSResource | None = None):
        spec, instance, res, assets = drill_setup(res_lakefs or lakefs, os.environ["MLFLOW_TRACKING_URI"], state,
                                                  tmp_path, monkeypatch, retrain=retrain)
        r = dg.materialize(assets, selection=K("reference_data"), instance=instance, resources=res)
        assert publish_run(instance, res["lakefs"], r.run_id).status == "published"
        return spec, instance, res, assets

    return make


class MLflowServer:
    """`mlflow server` over a SQLite store on a free port; stop and start it on the same port and store."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: float = 120) -> "MLflowServer":
        import requests

        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                if requests.get(f"{self.uri}/health", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            time.sleep(0.5)
        raise AssertionError(f"mlflow server at {self.uri} did not start within {wait}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


# --- lakeFS client: timeouts, bounded retries, idempotent writes (no daemon) ------------------------------
def test_a_hung_lakefs_times_out_within_seconds_naming_endpoint_repository_and_ref():
    """A server that accepts connections and never answers (hung, not dead) must not hang a run."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        endpoint = f"http://127.0.0.1:{srv.getsockname()[1]}"
        res = LakeFSResource(endpoint=endpoint, access_key_id="x", secret_access_key="y", repository="hung-repo",
                             connect_timeout_seconds=1, timeout_seconds=1, retries=2, backoff_seconds=0.1)
        t0 = time.time()
        with pytest.raises(LakeFSUnavailable) as info:
            res.head("run-abc")
        assert time.time() - t0 < 15
        assert endpoint in str(info.value)


def test_a_lakefs_restart_is_ridden_out_by_bounded_retries(tmp_path):
    """Killed and restarted on the same port and data: calls made while it is down fail with a clear error
    naming endpoint, repository and ref within seconds; calls after the restart work on the same data."""
    server = LakeFSServer(tmp_path / "lakefs", port=free_port()).start()
    try:
        env = server.env()
        res = LakeFSResource(endpoint=env["LAKEFS_ENDPOINT"], access_key_id=env["LAKEFS_ACCESS_KEY_ID"],
                             secret_access_key=env["LAKEFS_SECRET_ACCESS_KEY"], repository="restart-drill")
        res.ensure_branch("run-x")
        res.put("run-x", "a.txt", b"1")
        first = res.commit("run-x", "one")
        server.stop()
        t0 = time.time()
        with pytest.raises(LakeFSUnavailable) as info:
            res.put("run-x", "b.txt", b"2")
        took = time.time() - t0
        assert took < 10, took
        msg = str(info.value)
        assert env["LAKEFS_ENDPOINT"] in msg and "'restart-drill'" in msg and "'run-x'" in msg and "b.txt" in msg
        # Restarted while a call is retrying: the call succeeds without the caller noticing.
        patient = LakeFSResource(endpoint=env["LAKEFS_ENDPOINT"], access_key_id=env["LAKEFS_ACCESS_KEY_ID"],
                                 secret_access_key=env["LAKEFS_SECRET_ACCESS_KEY"], repository="restart-drill",
                                 retries=10, retry_deadline_seconds=120, max_backoff_seconds=4)
        restart = threading.Timer(2.0, server.start)
        restart.start()
        patient.put("run-x", "b.txt", b"2")
        second = patient.commit("run-x", "two")
        restart.join()
        assert second != first and res.get("run-x", "a.txt") == b"1" and res.get(second, "b.txt") == b"2"
    finally:
        server.stop()


def test_a_commit_whose_answer_is_lost_is_not_made_twice(lakefs, monkeypatch):
    """The server commits but the connection drops before the answer: the retry finds the commit."""
    import lakefs as sdk

    lakefs.ensure_branch("run-lost")
    lakefs.put("run-lost", "x.txt", b"x")
    base = lakefs.head("run-lost")
    real = sdk.Branch.commit
    calls = []

    def commit_then_drop(self, *a, **kw):
        ref = real(self, *a, **kw)
        calls.append(ref)
        if len(calls) == 1:
            raise ConnectionResetError("connection reset by peer (after the server committed)")
        return ref

    monkeypatch.setattr(sdk.Branch, "commit", commit_then_drop)
    commit = lakefs.commit("run-lost", "once", {"asset_key": "x"})
    assert len(calls) == 1  # recognised by its write id: no second commit
    log = [c.id for c in lakefs.repo().ref("run-lost").log(max_amount=5)]
    assert log[0] == commit and log[1] == base


def test_a_retried_step_rewrites_its_outputs_on_the_same_branch(lakefs, instance):
    """An op retry (same run): the output written before the failure is written again, same path, same
    branch; the run ends with one object per output and the values of the successful attempt."""
    attempts = []

    @dg.multi_asset(outs={"first": dg.AssetOut(), "second": dg.AssetOut()},
                    retry_policy=dg.RetryPolicy(max_retries=1))
    def pair():
        attempts.append(1)
        yield dg.Output(pl.DataFrame({"attempt": [len(attempts)]}), output_name="first")
        if len(attempts) == 1:
            raise ConnectionResetError("the connection dropped mid-step")
        yield dg.Output(pl.DataFrame({"attempt": [len(attempts)]}), output_name="second")

    io = LakeFSIOManager(lakefs=lakefs, await_publication=False)
    r = dg.materialize([pair], instance=instance, resources={"io_manager": io})
    assert len(attempts) == 2
    branch = run_branch(r.run_id)
    assert sorted(lakefs.list_paths(branch, "assets/")) == ["assets/first/data.parquet", "assets/second/data.parquet"]
    from resources.io import load_asset

    assert load_asset(lakefs, "first", ref=branch)["attempt"].to_list() == [2]
    assert [b.name for b in lakefs.branches()] == [branch]


def test_only_a_transient_fault_marks_a_failed_run_for_retry(lakefs, instance):
    """Run retries skip step failures (dagster.yaml); a step that failed on a transient fault tags its run."""
    @dg.asset
    def registers() -> pl.DataFrame:
        raise ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded "
                              "(Connection refused)")

    @dg.asset
    def judges() -> pl.DataFrame:
        raise ValueError("column 'amount' holds text")

    io = LakeFSIOManager(lakefs=lakefs, await_publication=False)
    transient = dg.materialize([registers], instance=instance, resources={"io_manager": io}, raise_on_error=False)
    tags = instance.get_run_by_id(transient.run_id).tags
    assert tags.get("dagster/retry_on_asset_or_op_failure") == "true"
    assert tags.get(TRANSIENT_TAG, "").startswith("registers: ConnectionError")
    bad = dg.materialize([judges], instance=instance, resources={"io_manager": io}, raise_on_error=False)
    assert "dagster/retry_on_asset_or_op_failure" not in instance.get_run_by_id(bad.run_id).tags


@dg.asset(name="base")
def resumable_base() -> pl.DataFrame:
    return pl.DataFrame({"v": [7]})


@dg.asset(name="top")
def resumable_top(base: pl.DataFrame) -> pl.DataFrame:
    return base.with_columns(pl.col("v") + 1)


def test_a_resumed_run_starts_its_own_branch_from_the_failed_runs_and_reads_its_outputs(lakefs, instance):
    """Dagster's run retry re-executes from the failure under a NEW run id: it gets its own branch, made from
    the failed run's branch (which holds the outputs it does not rebuild); the failed branch is kept."""
    from dagster._core.storage.tags import PARENT_RUN_ID_TAG, RESUME_RETRY_TAG, ROOT_RUN_ID_TAG

    from resources.publish import KEPT_TAG

    io = LakeFSIOManager(lakefs=lakefs, await_publication=False)
    first = dg.materialize([resumable_base], instance=instance, resources={"io_manager": io})
    # Mark `first` failed, as a run killed after `base` would be, then resume it as a retry would.
    instance.report_run_failed(instance.get_run_by_id(first.run_id))
    before = lakefs.head()
    # A retry copies its parent's tags, including the parent's kept branch (if it was recorded before).
    second = dg.materialize([resumable_base, resumable_top], selection=["top"], instance=instance,
                            resources={"io_manager": io},
                            tags={PARENT_RUN_ID_TAG: first.run_id, ROOT_RUN_ID_TAG: first.run_id,
                                  RESUME_RETRY_TAG: "true", KEPT_TAG: run_branch(first.run_id)})
    assert not instance.get_run_by_id(second.run_id).tags.get(KEPT_TAG)  # the parent's outcome is not its own
    found = latest_checked_materialization(instance, dg.AssetKey("top"), None, second.run_id)
    assert found and found[2] == second.run_id
    child = run_branch(second.run_id)
    assert sorted(lakefs.list_paths(child, "assets/")) == ["assets/base/data.parquet", "assets/top/data.parquet"]
    assert lakefs.branch_exists(run_branch(first.run_id))  # kept for inspection
    assert lakefs.head() == before  # nothing published yet
    from resources.publish import publish_pending

    assert {o.run_id: o.status for o in publish_pending(instance, lakefs)}.get(second.run_id) == "published"
    from resources.io import load_asset

    assert load_asset(lakefs, "top")["v"].to_list() == [8] and load_asset(lakefs, "base")["v"].to_list() == [7]


def test_a_resumed_step_writing_lakefs_itself_starts_from_the_failed_runs_branch_not_from_main(lakefs, instance):
    """Ranged runs write their partitions themselves (`open_run_branch`, not the I/O manager): resumed, such a step
    must still see what the failed run wrote, or its inputs would be missing and the run would publish nothing."""
    from dagster._core.storage.tags import PARENT_RUN_ID_TAG, RESUME_RETRY_TAG, ROOT_RUN_ID_TAG

    from resources.publish import open_run_branch

    seen = {}

    @dg.asset(name="self_writer", deps=["base"])
    def self_writer(context) -> None:
        branch = open_run_branch(context.instance, lakefs, context.run.run_id, wait=False)
        seen["paths"] = sorted(lakefs.list_paths(branch, "assets/"))

    io = LakeFSIOManager(lakefs=lakefs, await_publication=False)
    first = dg.materialize([resumable_base], instance=instance, resources={"io_manager": io})
    instance.report_run_failed(instance.get_run_by_id(first.run_id))
    before = lakefs.head()
    dg.materialize([resumable_base, self_writer], selection=["self_writer"], instance=instance,
                   resources={"io_manager": io},
                   tags={PARENT_RUN_ID_TAG: first.run_id, ROOT_RUN_ID_TAG: first.run_id, RESUME_RETRY_TAG: "true"})
    assert seen["paths"] == ["assets/base/data.parquet"]  # the failed run's output, on the resumed run's branch
    assert lakefs.head() == before


def test_a_resumed_run_whose_parent_branch_is_gone_fails_instead_of_branching_from_main(lakefs, instance):
    from dagster._core.storage.tags import PARENT_RUN_ID_TAG, RESUME_RETRY_TAG, ROOT_RUN_ID_TAG

    io = LakeFSIOManager(lakefs=lakefs, await_publication=False)
    first = dg.materialize([resumable_base], instance=instance, resources={"io_manager": io})
    instance.report_run_failed(instance.get_run_by_id(first.run_id))
    lakefs.delete_branch(run_branch(first.run_id))  # e.g. pruned by hand while its retry was queued
    before = lakefs.head()
    second = dg.materialize([resumable_base, resumable_top], selection=["top"], instance=instance,
                            resources={"io_manager": io},
                            raise_on_error=False,
                            tags={PARENT_RUN_ID_TAG: first.run_id, ROOT_RUN_ID_TAG: first.run_id,
                                  RESUME_RETRY_TAG: "true"})
    assert not second.success
    failure = next(e for e in second.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    error, messages = failure.step_failure_data.error, []
    while error is not None:  # the LakeFSError is the cause of Dagster's handle-output error
        messages.append(error.message)
        error = error.cause
    assert any(run_branch(first.run_id) in m and "gone" in m for m in messages), messages
    assert lakefs.head() == before and not lakefs.branch_exists(run_branch(second.run_id))


def test_a_second_retry_branches_from_the_first_run_when_the_first_retry_wrote_nothing(lakefs, instance):
    """Two retries in a row (e.g. MLflow still down for the first): the first retry failed before writing, so it
    has no branch; the second must start from the original run's branch, which holds the outputs it skips."""
    from dagster._core.storage.tags import PARENT_RUN_ID_TAG, RESUME_RETRY_TAG, ROOT_RUN_ID_TAG

    io = LakeFSIOManager(lakefs=lakefs, await_publication=False)
    first = dg.materialize([resumable_base], instance=instance, resources={"io_manager": io})
    instance.report_run_failed(instance.get_run_by_id(first.run_id))
    resume = {ROOT_RUN_ID_TAG: first.run_id, RESUME_RETRY_TAG: "true"}
    # The first retry fails before it writes anything: no branch of its own.
    import uuid

    empty = instance.add_run(dg.DagsterRun(job_name="__ephemeral_asset_job__", run_id=str(uuid.uuid4()),
                                           status=dg.DagsterRunStatus.FAILURE,
                                           tags={PARENT_RUN_ID_TAG: first.run_id, **resume}))
    assert not lakefs.branch_exists(run_branch(empty.run_id))
    second = dg.materialize([resumable_base, resumable_top], selection=["top"], instance=instance,
                            resources={"io_manager": io}, tags={PARENT_RUN_ID_TAG: empty.run_id, **resume})
    assert sorted(lakefs.list_paths(run_branch(second.run_id), "assets/")) == [
        "assets/base/data.parquet", "assets/top/data.parquet"]


# --- daemon drills ------------------------------------------------------------------------------------
@pytest.mark.daemon
def test_run_worker_sigkilled_mid_training_is_failed_and_retried_by_the_daemon(lifecycle, tmp_path):
    from .test_daemon_e2e import start_daemon

    t_start = time.time()
    spec, instance, res, _ = lifecycle()
    m = res["mlflow"]
    before_main = res["lakefs"].head()
    daemon = start_daemon(tmp_path)
    log = tmp_path / "daemon.log"
    try:
        launch(RETRAIN, tmp_path)
        (run,) = wait_for("the retrain run", lambda: runs_of(instance, RETRAIN), 120, daemon=daemon, log=log)
        wait_for("training to start", lambda: step_started(instance, run.run_id, "car_loan__candidate_model"), 600,
                 daemon=daemon, log=log)
        pid = wait_for("the run worker's pid", lambda: run_worker_pid(instance, run.run_id), 30)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.time()
        failed = wait_for("the killed run to be marked failed",
                          lambda: (lambda r: r if r.status == dg.DagsterRunStatus.FAILURE else None)(
                              instance.get_run_by_id(run.run_id)), 60, every=0.5)
        detected = time.time() - killed_at
        assert detected < 30, detected
        text = "\n".join(t for _, t in run_messages(instance, run.run_id))
        assert str(pid) in text or "-9" in text or "unexpectedly" in text, text[-2000:]
        # A failed run moves nothing: main as it was, no champion, no version without its audit entry.
        assert res["lakefs"].head() == before_main
        aliases, _ = registry_state(m)
        assert "champion" not in aliases
        wait_for("the killed run to be marked for a retry", lambda: instance.get_run_by_id(run.run_id).tags.get(
            "dagster/will_retry") == "true", 30, every=0.5)
        done = wait_for("the daemon's retry to finish", lambda: final_retry(instance, run.run_id), 900,
                        every=5, daemon=daemon, log=log)
        assert done.status == dg.DagsterRunStatus.SUCCESS, done.status
        wait_published(res["lakefs"], instance, done.run_id)
        wait_champion(m)
    finally:
        stop_daemon(daemon)
    aliases, versions = registry_state(m)
    assert aliases.get("champion") == versions[-1]
    assert res["lakefs"].branch_exists(run_branch(run.run_id))  # the killed run's branch kept for inspection
    print(f"drill sigkill: detected in {detected:.1f}s, total {time.time() - t_start:.0f}s")


@pytest.mark.daemon
def test_mlflow_unreachable_during_registration_fails_cleanly_and_the_daemon_finishes(lifecycle, tmp_path,
                                                                                     monkeypatch):
    from .test_daemon_e2e import start_daemon

    t_start = time.time()
    mlflow_server = MLflowServer(tmp_path / "mlflow-server").start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    # MLflow's own client retries a dead server for minutes by default; bound it as production should.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    spec, instance, res, _ = lifecycle()
    m = res["mlflow"]
    before_main = res["lakefs"].head()
    daemon = start_daemon(tmp_path)
    log = tmp_path / "daemon.log"
    try:
        launch(RETRAIN, tmp_path)
        (run,) = wait_for("the retrain run", lambda: runs_of(instance, RETRAIN), 120, daemon=daemon, log=log)
        wait_for("training to start", lambda: step_started(instance, run.run_id, "car_loan__candidate_model"), 600,
                 daemon=daemon, log=log)
        mlflow_server.stop()
        stopped_at = time.time()
        failed = wait_for("the run to fail", lambda: (lambda r: r if finished(r) else None)(
            instance.get_run_by_id(run.run_id)), 300, every=0.5)
        assert failed.status == dg.DagsterRunStatus.FAILURE
        text = "\n".join(t for _, t in run_messages(instance, run.run_id))
        assert mlflow_server.uri in text, text[-3000:]
        print(f"drill mlflow: failed {time.time() - stopped_at:.1f}s after the stop")
        assert failed.tags.get(TRANSIENT_TAG), failed.tags
        assert res["lakefs"].head() == before_main
        mlflow_server.start()
        aliases, versions = registry_state(m)
        assert "champion" not in aliases and not versions  # nothing half-registered
        done = wait_for("the daemon's retry to finish", lambda: final_retry(instance, run.run_id), 900,
                        every=5, daemon=daemon, log=log)
        assert done.status == dg.DagsterRunStatus.SUCCESS, done.status
        wait_published(res["lakefs"], instance, done.run_id)
        wait_champion(m)
        aliases, versions = registry_state(m)
        assert aliases.get("champion") == versions[-1]
    finally:
        stop_daemon(daemon)
        mlflow_server.stop()
    print(f"drill mlflow: total {time.time() - t_start:.0f}s")


@pytest.mark.daemon
def test_lakefs_killed_mid_run_and_restarted_the_run_finishes(lifecycle, lakefs_env, tmp_path, monkeypatch):
    from .test_daemon_e2e import start_daemon

    t_start = time.time()
    server = LakeFSServer(tmp_path / "lakefs-own", port=free_port()).start()
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        env = server.env()
        own = LakeFSResource(endpoint=env["LAKEFS_ENDPOINT"], access_key_id=env["LAKEFS_ACCESS_KEY_ID"],
                             secret_access_key=env["LAKEFS_SECRET_ACCESS_KEY"],
                             repository=os.environ["LAKEFS_REPOSITORY"])
        spec, instance, res, _ = lifecycle(res_lakefs=own)
        m = res["mlflow"]
        before_main = own.head()
        daemon = start_daemon(tmp_path)
        log = tmp_path / "daemon.log"
        try:
            launch(RETRAIN, tmp_path)
            (run,) = wait_for("the retrain run", lambda: runs_of(instance, RETRAIN), 120, daemon=daemon, log=log)
            wait_for("training to start", lambda: step_started(instance, run.run_id, "car_loan__candidate_model"), 600,
                     daemon=daemon, log=log)
            server.stop()
            killed_at = time.time()

            def complaint():
                return [t for ts, t in run_messages(instance, run.run_id)
                        if ts >= killed_at and env["LAKEFS_ENDPOINT"] in t and "retrying" in t]

            msgs = wait_for("a warning naming the lakeFS endpoint", complaint, 120, every=0.5)
            waited = time.time() - killed_at
            assert os.environ["LAKEFS_REPOSITORY"] in msgs[0] and "run-" in msgs[0], msgs[0]
            server.start()
            done = wait_for("the run (or its retry) to finish", lambda: final_retry(instance, run.run_id), 900,
                            every=5, daemon=daemon, log=log)
            assert done.status == dg.DagsterRunStatus.SUCCESS, done.status
            merged = wait_published(own, instance, done.run_id)
            assert own.head() != before_main and merged
            wait_champion(m)
        finally:
            stop_daemon(daemon)
        aliases, versions = registry_state(m)
        assert aliases.get("champion") == versions[-1]
    finally:
        server.stop()
    print(f"drill lakefs: first warning {waited:.1f}s after the kill, total {time.time() - t_start:.0f}s")


@pytest.mark.daemon
def test_daemon_killed_and_restarted_drains_the_queue_and_ingests_nothing_twice(lifecycle, state, tmp_path):
    from mlplatform.batches import Landing
    from tooling.simulator import Simulator

    from .test_daemon_e2e import start_daemon

    from resources.partitions import partitions_def, run_partitions

    t_start = time.time()
    spec, instance, res, _ = lifecycle()
    keys = list(partitions_def(spec).get_partition_keys())

    def covered(run) -> list[str]:
        """The partitions an ingest run took: its own, or its range (two batches landed at once are a burst)."""
        return [run.tags["dagster/partition"]] if run.tags.get("dagster/partition") else run_partitions(run, keys)

    Simulator(spec, Landing(state / "landing" / spec.name)).release(2, start="2018-11-01")
    log = tmp_path / "daemon.log"
    daemon = start_daemon(tmp_path)
    try:
        def ingest_started():
            return [r for r in runs_of(instance, "car_loan__ingest_batch") if r.status == dg.DagsterRunStatus.STARTED]

        wait_for("an ingest run to start", ingest_started, 300, daemon=daemon, log=log)
        os.kill(daemon.pid, signal.SIGKILL)  # the daemon only: its code server finishes the run in flight
        daemon.wait(10)
        time.sleep(5)
        daemon = start_daemon(tmp_path)

        def drained():
            ingests = runs_of(instance, "car_loan__ingest_batch")
            if len({p for r in ingests if r.status == dg.DagsterRunStatus.SUCCESS for p in covered(r)}) < 2:
                return None
            busy = instance.get_runs(filters=dg.RunsFilter(statuses=[
                dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED],
                job_name="car_loan__ingest_batch"))
            return ingests if not busy else None

        ingests = wait_for("the ingest queue to drain", drained, 900, every=5, daemon=daemon, log=log)
    finally:
        stop_daemon(daemon)
    per_partition: dict[str, int] = {}
    for r in ingests:
        if r.status == dg.DagsterRunStatus.SUCCESS:
            for p in covered(r):
                per_partition[p] = per_partition.get(p, 0) + 1
    assert per_partition == {p: 1 for p in per_partition} and len(per_partition) == 2, per_partition
    keys = [r.tags.get("dagster/run_key") for r in ingests if r.tags.get("dagster/run_key")]
    assert len(keys) == len(set(keys)), keys
    main_holds_only_checked_data(res["lakefs"], instance)
    print(f"drill daemon restart: total {time.time() - t_start:.0f}s")


# --- landing-zone drills (the arrival sensor on a real instance; ingestion through dg.materialize) ------
def _sensor(spec):
    from sensors.arrivals import build_arrivals

    return build_arrivals(spec)["sensors"][0]


def _tick(sensor, instance, landing_root, cursor=None):
    from resources.landing import LandingZoneResource

    ctx = dg.build_sensor_context(instance=instance, cursor=cursor,
                                  resources={"landing": LandingZoneResource(root=str(landing_root.parent))})
    result = sensor(ctx)
    requests = list(result.run_requests or []) if isinstance(result, dg.SensorResult) else []
    return requests, (result.cursor if isinstance(result, dg.SensorResult) else ctx.cursor)


def _records(spec, start, end, n):
    from .helpers import production_rows

    return production_rows(spec, start, end, n)


def test_a_stray_folder_is_skipped_and_does_not_block_other_arrivals(state, instance):
    import datetime as dt

    from .helpers import car_loan

    spec = car_loan()
    root = state / "landing" / spec.name
    good = root / "records" / "2018-11-01"
    good.mkdir(parents=True)
    _records(spec, dt.datetime(2018, 11, 1), dt.datetime(2018, 12, 1), 50).write_parquet(good / "batch.parquet")
    for stray in ("tmp", "2018-11-31", "2099-01-01"):
        (root / "records" / stray).mkdir(parents=True)
        (root / "records" / stray / "x.parquet").write_bytes(b"junk")
    old = time.time() - 3600
    for f in root.rglob("*.parquet"):
        os.utime(f, (old, old))
    sensor = _sensor(spec)
    requests, cursor = _tick(sensor, instance, root)
    if not requests:  # a sensor that confirms a file's size over two ticks
        requests, cursor = _tick(sensor, instance, root, cursor)
    assert [r.partition_key for r in requests] == ["2018-11-01"]
    # The stray files are left where they are (nothing is lost).
    assert (root / "records" / "tmp" / "x.parquet").exists()


def test_a_file_still_being_written_is_not_taken_until_it_is_complete(state, instance):
    import datetime as dt

    from .helpers import car_loan

    spec = car_loan()
    root = state / "landing" / spec.name
    folder = root / "records" / "2018-11-01"
    folder.mkdir(parents=True)
    data = _records(spec, dt.datetime(2018, 11, 1), dt.datetime(2018, 12, 1), 200)
    import io as _io

    buf = _io.BytesIO()
    data.write_csv(buf)
    whole = buf.getvalue()
    target = folder / "batch.csv"
    target.write_bytes(whole[: len(whole) // 2])  # the copy is in progress: half a CSV, mtime now
    sensor = _sensor(spec)
    requests, cursor = _tick(sensor, instance, root)
    assert requests == [], "a file written this very second was taken before it was complete"
    target.write_bytes(whole)  # the copy completes, then stays untouched
    old = time.time() - 3600
    os.utime(target, (old, old))
    requests, cursor = _tick(sensor, instance, root, cursor)
    if not requests:
        requests, cursor = _tick(sensor, instance, root, cursor)
    assert [r.partition_key for r in requests] == ["2018-11-01"]


@pytest.mark.services
def test_overlapping_ids_in_separate_ticks_keep_rows_already_on_main(lakefs, state, instance):
    """File A is ingested and published; file B repeats some of A's ids in a later tick. Whatever the
    re-delivery policy, no row of A that is on main disappears and no id appears twice."""
    import datetime as dt

    from assets.ingestion import build_ingestion
    from resources.io import load_asset

    from .helpers import car_loan, resources_for

    spec = car_loan()
    res = resources_for(lakefs, state, spec)
    assets = build_ingestion(spec)
    root = state / "landing" / spec.name
    folder = root / "records" / "2018-11-01"
    folder.mkdir(parents=True)
    rows = _records(spec, dt.datetime(2018, 11, 1), dt.datetime(2018, 12, 1), 400)
    rows.head(200).write_parquet(folder / "a.parquet")
    r1 = dg.materialize(assets, selection=K("raw_records"), partition_key="2018-11-01", instance=instance,
                        resources=res)
    assert publish_run(instance, lakefs, r1.run_id).status == "published"
    on_main = load_asset(lakefs, key("raw_records"), partition="2018-11-01")
    ids_a = set(on_main[spec.id_column].to_list())
    assert len(ids_a) == 200
    rows.slice(100, 200).write_parquet(folder / "b.parquet")  # ids 100..299: half of them repeat A's
    r2 = dg.materialize(assets, selection=K("raw_records"), partition_key="2018-11-01", instance=instance,
                        resources=res, raise_on_error=False)
    publish_run(instance, lakefs, r2.run_id)
    after = load_asset(lakefs, key("raw_records"), partition="2018-11-01")
    ids = after[spec.id_column].to_list()
    assert ids_a <= set(ids), "rows already on main disappeared"
    assert len(ids) == len(set(ids)), "an id appears twice on main"
    kept = list((root / "quarantine").rglob("b.parquet")) + list(folder.glob("b.parquet"))
    assert kept or set(ids) > ids_a, "file b was neither ingested nor kept"
    # A third, clean file in a later tick: the partition's rebuild keeps every row that was on main.
    rows.slice(300, 100).write_parquet(folder / "c.parquet")
    r3 = dg.materialize(assets, selection=K("raw_records"), partition_key="2018-11-01", instance=instance,
                        resources=res)
    assert publish_run(instance, lakefs, r3.run_id).status == "published"
    final = load_asset(lakefs, key("raw_records"), partition="2018-11-01")[spec.id_column].to_list()
    assert ids_a <= set(final) and set(rows.slice(300, 100)[spec.id_column].to_list()) <= set(final)
    assert len(final) == len(set(final))
