"""The online loop closes by itself (sensors/online.py): a partition's prediction log that has gone quiet is
ingested once per set of files, a new file makes a new run, a failed run is retried with backoff and then
given up with a warning. Against a real Dagster instance and real Parquet files in a spool folder."""

import time
import uuid

import dagster as dg
import polars as pl
import pytest

from sensors.online import JOB, STAMP_TAG, log_stamp, plan_online

KEYS = {"2018-11-01", "2018-12-01"}


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def write_log(root, partition: str, age_seconds: float = 0.0, now: float | None = None):
    import os

    folder = root / partition
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / f"part-{uuid.uuid4().hex}.parquet"
    pl.DataFrame({"request_id": ["r"], "row_index": [0], "shadow": [False]}).write_parquet(f)
    t = (now or time.time()) - age_seconds
    os.utime(f, (t, t))
    return f


def record_run(instance, partition: str, stamp: str, status: dg.DagsterRunStatus) -> dg.DagsterRun:
    failed = status == dg.DagsterRunStatus.FAILURE
    run = instance.add_run(dg.DagsterRun(job_name=JOB, run_id=str(uuid.uuid4()),
                                         status=dg.DagsterRunStatus.STARTED if failed else status,
                                         tags={"dagster/partition": partition, STAMP_TAG: stamp}))
    if failed:
        instance.report_run_failed(run)  # a failure event: the run record gets its end time
    return instance.get_run_by_id(run.run_id)


def test_a_quiet_partition_log_is_ingested_once_and_a_partition_still_written_waits(instance, tmp_path):
    now = time.time()
    quiet = write_log(tmp_path, "2018-11-01", age_seconds=300, now=now)
    write_log(tmp_path, "2018-12-01", age_seconds=5, now=now)
    plan = plan_online(instance, tmp_path, KEYS, now=now)
    assert [(r.partition_key, r.job_name, r.tags[STAMP_TAG]) for r in plan.requests] == [
        ("2018-11-01", JOB, log_stamp([quiet]))]
    assert any("2018-12-01: log still being written" in w for w in plan.waiting)
    # while its run is in flight, and once it succeeded, the same files are not requested again
    record_run(instance, "2018-11-01", log_stamp([quiet]), dg.DagsterRunStatus.STARTED)
    assert not plan_online(instance, tmp_path, KEYS, now=now).requests
    record_run(instance, "2018-11-01", log_stamp([quiet]), dg.DagsterRunStatus.SUCCESS)
    assert not plan_online(instance, tmp_path, KEYS, now=now).requests
    # a new file in that partition is a new set of files: one new run, reading both
    later = write_log(tmp_path, "2018-11-01", age_seconds=120, now=now)
    again = plan_online(instance, tmp_path, KEYS, now=now).requests
    assert [(r.partition_key, r.tags[STAMP_TAG]) for r in again] == [("2018-11-01", log_stamp([quiet, later]))]


def test_a_failed_online_run_is_retried_with_backoff_then_given_up_with_a_warning(instance, tmp_path):
    f = write_log(tmp_path, "2018-11-01", age_seconds=600)
    stamp = log_stamp([f])
    record_run(instance, "2018-11-01", stamp, dg.DagsterRunStatus.FAILURE)
    ended = time.time()
    plan = plan_online(instance, tmp_path, KEYS, now=ended + 1, backoff_seconds=60)
    assert not plan.requests and any("1 failed attempt(s); retry in" in w for w in plan.waiting)
    retry = plan_online(instance, tmp_path, KEYS, now=ended + 61, backoff_seconds=60).requests
    assert [r.run_key for r in retry] == [f"online/2018-11-01/{stamp}/attempt-1"]
    for _ in range(2):
        record_run(instance, "2018-11-01", stamp, dg.DagsterRunStatus.FAILURE)
    given_up = plan_online(instance, tmp_path, KEYS, now=time.time() + 10_000, backoff_seconds=60)
    assert not given_up.requests
    assert any("gave up after 3 failed ingest_online run(s)" in w for w in given_up.warnings)


def test_a_log_folder_that_is_not_a_partition_is_named_and_left_alone(instance, tmp_path):
    f = write_log(tmp_path, "2031-01-01", age_seconds=600)
    plan = plan_online(instance, tmp_path, KEYS)
    assert not plan.requests and f.exists()
    assert any(str(tmp_path / "2031-01-01") in w and "not a partition" in w for w in plan.warnings)
    assert not plan_online(instance, tmp_path / "missing", KEYS).requests  # no spool yet: nothing to do
