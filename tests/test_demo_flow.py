"""`make demo` from an empty state, through the same commands it runs, as a new user would meet it.

Empty means: a lakeFS with NO repository (a fresh name), no MLflow store, a DAGSTER_HOME seeded only with
platform/dagster.yaml (as the Makefile does), no landing zone, no generated settings. This is the test that
catches "make demo fails on a fresh clone: repository not found".
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from resources.environment import Settings, build_resources
from tooling.demo import PER_BATCH, TRAINING

ROOT = Path(__file__).resolve().parent.parent
BATCHES = 2

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(1800)]


def _run(cmd: list[str], env: dict, log: list[str]) -> subprocess.CompletedProcess:
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    log.append(f"$ {' '.join(cmd)}  ({time.time() - t0:.0f}s, exit {proc.returncode})\n{proc.stdout[-4000:]}"
               f"{proc.stderr[-4000:]}")
    assert proc.returncode == 0, "\n".join(log[-1:])
    return proc


def test_demo_flow_from_empty_state_publishes_assets_and_a_champion(tmp_path, lakefs_env):
    state = tmp_path / "state"  # MLP_STATE_DIR: does not exist yet
    home = state / "dagster_home"
    home.mkdir(parents=True)
    shutil.copyfile(ROOT / "platform" / "dagster.yaml", home / "dagster.yaml")  # the Makefile's only seeding
    repo = f"demo-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAKEFS_", "MLFLOW_", "DAGSTER_", "MLP_"))}
    env.update(lakefs_env)  # the operator's own lakeFS, as `export LAKEFS_ENDPOINT=... make demo` would give
    env.update({"LAKEFS_REPOSITORY": repo, "MLP_STATE_DIR": str(state), "DAGSTER_HOME": str(home),
                "NML_DISABLE_USAGE_LOGGING": "1", "DBT_SEND_ANONYMOUS_USAGE_STATS": "False", "DO_NOT_TRACK": "1",
                "MLFLOW_DISABLE_TELEMETRY": "true", "DAGSTER_DISABLE_TELEMETRY": "1",
                "PYTHONDONTWRITEBYTECODE": "1"})
    lakefs = build_resources(Settings.from_env(env))["lakefs"]  # what the demo's commands build from `env`
    import lakefs as lakefs_sdk

    assert not any(r.id == repo for r in lakefs_sdk.repositories(client=lakefs.client)), "not an empty start"

    py, log = sys.executable, []
    run = [py, "-m", "tooling.env"]  # $(RUN) in the Makefile
    _run([py, "-m", "tooling.services", "up"], env, log)  # `make up`: MLflow store and mlp.env under state
    # As the Makefile: the demo walks one data set (DEMO_DATASET, car_loan), the others stay untouched.
    _run(run + ["mlp", "simulate", "reset", "--dataset", "car_loan"], env, log)
    released = _run(run + ["mlp", "simulate", "next", str(BATCHES), "--dataset", "car_loan"], env, log)
    demo_env = {**env, "MLP_DATASET": "car_loan"}
    _run(run + [py, "-m", "tooling.demo"], demo_env, log)
    summary = _run(run + [py, "-m", "tooling.demo", "--summary"], demo_env, log).stdout

    import json

    partitions = json.loads(released.stdout.strip().splitlines()[-1])["released_batches"]
    assert len(partitions) == BATCHES

    # main holds every asset the demo materialized (published, not left on run branches)
    on_main = set(lakefs.list_paths("main", "assets/"))
    for name in ["reference_data", *TRAINING.split(",")]:
        if name in ("stg_records", "stg_labels"):
            continue  # dbt staging views: checked through `features` below
        assert any(p.startswith(f"assets/car_loan/{name}/") for p in on_main), (name, sorted(on_main)[:50])
    for name in ["raw_records", *PER_BATCH.split(",")]:
        for partition in partitions:
            assert any(p.startswith(f"assets/car_loan/{name}/partition={partition}") for p in on_main), \
                (name, partition, sorted(p for p in on_main if name in p))
    assert [b.name for b in lakefs.branches()] == [], "run branches left unpublished (or kept as failed)"

    # MLflow has a champion, trained on a commit that is on main
    settings = dict(line.split("=", 1) for line in (state / "mlp.env").read_text().splitlines())
    mlflow = build_resources(Settings.from_env({**settings, **env}))["mlflow"]  # mlp.env under the caller's
    champion = mlflow.alias_version("champion")
    assert champion is not None, "\n".join(log)
    commit = champion.tags.get("lakefs_commit")
    assert commit and commit in {c.id for c in lakefs.repo().branch("main").log(max_amount=500)}
    assert "champion" in summary and lakefs.head("main") in summary

    # No secret escaped into the state folder (beyond the 0600 settings file) or the output
    secret = lakefs_env["LAKEFS_SECRET_ACCESS_KEY"]
    assert all(secret not in entry for entry in log)
    leaks = [p for p in state.rglob("*") if p.is_file() and p.name != "mlp.env" and secret.encode() in p.read_bytes()]
    assert not leaks, f"the lakeFS secret key is written in {leaks}"
    assert stat.S_IMODE((state / "mlp.env").stat().st_mode) == 0o600
