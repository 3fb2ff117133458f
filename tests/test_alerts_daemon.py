"""Alerts under a real dagster-daemon running the platform's definitions (workspace.yaml): runs that fail in
the instance (a failing step; a failing blocking check) reach the webhooks exactly once each, with the run
link, while the daemon keeps ticking. The webhooks are a receiver on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import dagster as dg
import pytest

from tests.conftest import ROOT
from tests.test_alerts import Receiver
from tests.test_alerts_sensors import downstream, exploding, gated

pytestmark = [pytest.mark.daemon, pytest.mark.timeout(600)]
DAGSTER_URL = "http://127.0.0.1:3998"


def _wait(pred, timeout: float, what: str, log_path):
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, f"{what} within {timeout:.0f}s; daemon log:\n" + log_path.read_text()[-4000:]
        time.sleep(1)


def test_under_the_daemon_a_failing_run_and_a_failing_blocking_check_alert_exactly_once_each(
        lakefs, mlflow_uri, state, tmp_path, monkeypatch):
    receiver = Receiver()
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(ROOT / "platform" / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("MLP_ALERT_WEBHOOKS", f"json={receiver.url}/json,slack={receiver.url}/slack")
    monkeypatch.setenv("MLP_DAGSTER_URL", DAGSTER_URL)
    log_path = tmp_path / "daemon.log"
    log = open(log_path, "w")
    # The instance's storage is created here, before the daemon opens it: two processes creating a new SQLite
    # run storage at once can both stamp its schema version ("alembic_version has more than one head").
    instance = dg.DagsterInstance.get()
    instance.get_runs_count()
    daemon = subprocess.Popen([str(ROOT / ".venv" / "bin" / "dagster-daemon"), "run", "-w", "workspace.yaml"],
                              cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # A run status sensor starts from the newest run event at its first evaluation: fail the runs after it.
        # These runs belong to no data set: the first live data set's failure sensor alerts them (catch_all).
        from mlplatform.spec import dataset_specs
        from resources.naming import ns

        sensor = ns(dataset_specs()[0]).sensor("alert_on_run_failure")
        _wait(lambda: f"Checking for new runs for sensor: {sensor}" in log_path.read_text(), 240,
              f"the daemon did not evaluate {sensor}", log_path)
        time.sleep(5)
        failed = dg.materialize([exploding], instance=instance, raise_on_error=False)
        checked = dg.materialize([gated, downstream], instance=instance, raise_on_error=False)
        assert not failed.success and not checked.success

        expected = {f"run_failure:{failed.run_id}", f"run_failure:{checked.run_id}",
                    f"check_failure:{checked.run_id}:gated:rows_positive"}
        _wait(lambda: {b["key"] for b in receiver.bodies("/json")} >= expected, 180,
              f"alerts {expected} were not all delivered (got {[b['key'] for b in receiver.bodies('/json')]})",
              log_path)
        # the daemon keeps ticking (every 5 s): nothing is delivered twice
        time.sleep(20)
        keys = [b["key"] for b in receiver.bodies("/json")]
        assert sorted(keys) == sorted(expected), keys
        assert len(receiver.bodies("/slack")) == 3

        by_key = {b["key"]: b for b in receiver.bodies("/json")}
        assert by_key[f"run_failure:{failed.run_id}"]["links"]["dagster_run"] == f"{DAGSTER_URL}/runs/{failed.run_id}"
        check = by_key[f"check_failure:{checked.run_id}:gated:rows_positive"]
        assert check["links"]["dagster_run"] == f"{DAGSTER_URL}/runs/{checked.run_id}"
        assert "0 rows in batch 2024-01" in check["text"]
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
        log.close()
        receiver.close()
