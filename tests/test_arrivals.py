"""The landing zone and its arrival sensor: files are taken only once complete, stray folders are skipped
with a warning, labels wait for their records, failed ingestions are retried (with new run keys, bounded,
with backoff, never beside a run in progress), and the same files never make two runs.

Landing logic is tested on plain folders; the sensor on a real Dagster instance (runs are recorded in it
as the daemon would record them: created from the sensor's request, then started, failed or succeeded
through real run events)."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid

import dagster as dg
import polars as pl
import pytest
from dagster._core.events import DagsterEvent, DagsterEventType, StepMaterializationData

from mlplatform.batches import Landing
from tooling.simulator import Simulator
from resources.landing import LandingZoneResource
from sensors.arrivals import build_arrivals, plan_arrivals

from .helpers import car_loan

NOV, DEC = "2018-11-01", "2018-12-01"


@pytest.fixture(scope="module")
def spec():
    return car_loan()


@pytest.fixture
def sensor(spec):
    (s,) = build_arrivals(spec)["sensors"]
    assert s.name == "car_loan__landing_arrivals"
    return s


@pytest.fixture
def root(state, spec):
    """The data set's landing folder; the resource's root is the folder of every data set's (`root.parent`)."""
    return state / "landing" / spec.name


def land(root, kind, partition, name, rows=(1,), marker=True):
    d = root / kind / partition
    d.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"id": list(rows)}).write_parquet(d / name)
    if marker:
        (d / f"{name}.done").touch()
    return d / name


class Tick:
    """One sensor evaluation on the real instance, with the warnings its log received."""

    def __init__(self, sensor, instance, zone, cursor=None):
        ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"landing": zone})
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append
        ctx.log.addHandler(handler)
        self.result = sensor(ctx)
        self.cursor = self.result.cursor
        self.requests = list(self.result.run_requests or [])
        self.skip = self.result.skip_reason.skip_message if self.result.skip_reason else ""
        self.warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]

    def keys(self):
        return [(r.job_name, r.partition_key) for r in self.requests]


def launch(instance, req: dg.RunRequest, sensor_name="car_loan__landing_arrivals", **extra_tags) -> dg.DagsterRun:
    """Record the run the daemon makes of a request (QUEUED, with the request's tags and run key)."""
    tags = {**req.tags, "dagster/partition": req.partition_key, "dagster/run_key": req.run_key,
            "dagster/sensor_name": sensor_name, **extra_tags}
    return queue(instance, dg.DagsterRun(job_name=req.job_name, run_id=str(uuid.uuid4()), tags=tags,
                                         status=dg.DagsterRunStatus.NOT_STARTED))


def queue(instance, run: dg.DagsterRun) -> dg.DagsterRun:
    from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin

    origin = RemoteJobOrigin(RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("definitions.py"),
                                                    "__repository__"), run.job_name)
    run = instance.add_run(run._replace(remote_job_origin=origin))
    event(instance, run, DagsterEventType.RUN_ENQUEUED)
    assert status(instance, run) == dg.DagsterRunStatus.QUEUED
    return run


def event(instance, run, kind, data=None):
    instance.report_dagster_event(DagsterEvent(kind.value, job_name=run.job_name, event_specific_data=data),
                                  run_id=run.run_id)


def start(instance, run):
    event(instance, run, DagsterEventType.RUN_START)


def succeed(instance, run, materialize: str | None = None):
    start(instance, run)
    if materialize:
        mat = dg.AssetMaterialization(asset_key=["car_loan", materialize], partition=run.tags["dagster/partition"], metadata={
            "lakefs_commit": "c0ffee", "lakefs_path": f"lakefs://repo/c0ffee/assets/car_loan/{materialize}/data.parquet"})
        event(instance, run, DagsterEventType.ASSET_MATERIALIZATION, StepMaterializationData(mat))
    event(instance, run, DagsterEventType.RUN_SUCCESS)


def fail(instance, run, materialize: str | None = None):
    start(instance, run)
    if materialize:
        mat = dg.AssetMaterialization(asset_key=["car_loan", materialize], partition=run.tags["dagster/partition"], metadata={
            "lakefs_commit": "bad", "lakefs_path": f"lakefs://repo/bad/assets/car_loan/{materialize}/data.parquet"})
        event(instance, run, DagsterEventType.ASSET_MATERIALIZATION, StepMaterializationData(mat))
    instance.report_run_failed(instance.get_run_by_id(run.run_id))


def status(instance, run):
    return instance.get_run_by_id(run.run_id).status


# --- the landing zone, on plain folders -------------------------------------------------------------------

def test_a_file_being_written_is_not_complete_until_its_size_and_mtime_settle(tmp_path):
    zone = Landing(tmp_path, settle_seconds=0.6)
    d = tmp_path / "records" / NOV
    d.mkdir(parents=True)
    path = d / "batch.csv"
    path.write_text("id,timestamp\n1,2018-11-02\n")
    assert zone.files("records", NOV) == []
    (f,) = zone.landed("records", NOV)
    assert not f.complete and "settle_seconds" in f.why
    time.sleep(0.4)
    with path.open("a") as fh:  # the writer is still appending: the clock starts again
        fh.write("2,2018-11-03\n")
    time.sleep(0.4)
    assert zone.files("records", NOV) == []  # 0.8 s since the first byte, but only 0.4 s since the last
    time.sleep(0.4)
    assert zone.files("records", NOV) == [path]


def test_a_done_marker_or_success_file_makes_a_file_complete_at_once_but_not_a_stale_one(tmp_path):
    zone = Landing(tmp_path, settle_seconds=3600)
    a = land(tmp_path, "records", NOV, "a.parquet")
    assert zone.files("records", NOV) == [a]
    # A marker older than its file vouches for an earlier delivery, not for this one being rewritten.
    b = land(tmp_path, "records", NOV, "b.parquet", marker=False)
    marker = b.with_name("b.parquet.done")
    marker.touch()
    os.utime(marker, ns=(b.stat().st_mtime_ns - 10**9, b.stat().st_mtime_ns - 10**9))
    assert zone.files("records", NOV) == [a]
    (d := tmp_path / "records" / DEC).mkdir()
    c = land(tmp_path, "records", DEC, "part-0.parquet", marker=False)
    assert zone.files("records", DEC) == []
    (d / "_SUCCESS").touch()
    assert zone.files("records", DEC) == [c]


def test_hidden_temporary_and_marker_files_are_never_taken(tmp_path):
    zone = Landing(tmp_path, settle_seconds=0)
    d = tmp_path / "labels" / NOV
    d.mkdir(parents=True)
    for name in (".labels.parquet", "labels.parquet.tmp", "labels.parquet.partial", "_SUCCESS",
                 "labels.parquet.done", "_temporary"):
        (d / name).write_text("x")
    (d / "sub").mkdir()
    assert zone.files("labels", NOV) == []
    good = land(tmp_path, "labels", NOV, "labels.parquet", marker=False)
    assert zone.files("labels", NOV) == [good]


def test_stray_folders_and_files_are_reported_and_partition_folders_kept(tmp_path, spec):
    from mlplatform.batches import partition_keys

    keys = partition_keys(spec)
    zone = Landing(tmp_path, settle_seconds=0)
    land(tmp_path, "records", NOV, "batch.parquet")
    for folder in ("tmp", "2018-11-15", "2019-09-01", "2017-01-01"):
        land(tmp_path, "records", folder, "batch.parquet")
    (tmp_path / "records" / "loose.parquet").write_text("x")
    (tmp_path / "records" / ".scratch").mkdir()
    scan = zone.scan("records", keys)
    assert list(scan.partitions) == [NOV]
    reasons = {s.path.name: s.reason for s in scan.strays}
    assert set(reasons) == {"tmp", "2018-11-15", "2019-09-01", "2017-01-01", "loose.parquet"}
    assert "not a partition key" in reasons["tmp"]
    assert "not the start of a batch period" in reasons["2018-11-15"]
    assert "outside the batch periods 2018-10-01..2019-08-01" in reasons["2019-09-01"]
    assert "outside" in reasons["2017-01-01"]
    assert "directly under records/" in reasons["loose.parquet"]


def test_a_file_with_an_mtime_in_the_future_is_reported_and_not_taken_until_the_clock_passes_it(tmp_path, spec):
    from mlplatform.batches import partition_keys

    zone = Landing(tmp_path, settle_seconds=0)
    good = land(tmp_path, "records", NOV, "a.parquet", marker=False)
    skewed = land(tmp_path, "records", NOV, "b.parquet", marker=False)
    ahead = time.time() + 3600  # written by a machine whose clock is an hour ahead
    os.utime(skewed, (ahead, ahead))
    assert zone.files("records", NOV) == [good]
    scan = zone.scan("records", partition_keys(spec))
    (stray,) = scan.strays
    assert stray.path == skewed and "mtime in the future" in stray.reason and "clock skew" in stray.reason
    assert [f.name for f in scan.partitions[NOV]] == ["a.parquet", "b.parquet"]
    assert zone.files("records", NOV) == [good]
    assert [f.path for f in zone.landed("records", NOV, now=ahead + 1) if f.complete] == [good, skewed]
    # a few seconds of skew is not a stray: the file just settles
    os.utime(skewed, (time.time() + 5, time.time() + 5))
    assert zone.scan("records", partition_keys(spec)).strays == []


def test_subfolders_of_a_partition_are_reported_as_strays_and_the_partition_files_kept(tmp_path, spec):
    from mlplatform.batches import partition_keys

    zone = Landing(tmp_path, settle_seconds=0)
    good = land(tmp_path, "records", NOV, "batch.parquet")
    nested = land(tmp_path, "records", f"{NOV}/region=eu", "part-0.parquet")
    (tmp_path / "records" / NOV / "_temporary").mkdir()   # a writer's metadata folder: not a stray
    scan = zone.scan("records", partition_keys(spec))
    assert [f.path for f in scan.partitions[NOV]] == [good]
    (stray,) = scan.strays
    assert stray.path == nested.parent and "never read" in stray.reason and f"records/{NOV}/" in stray.reason


def test_unknown_entries_under_the_landing_root_are_reported(tmp_path):
    zone = Landing(tmp_path)
    land(tmp_path, "records", NOV, "batch.parquet")
    (tmp_path / "quarantine").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "record").mkdir()        # a typo of records/
    (tmp_path / "batch.parquet").write_text("x")
    assert sorted(s.path.name for s in zone.root_strays()) == ["batch.parquet", "record"]
    assert all("only records/, labels/, quarantine/" in s.reason for s in zone.root_strays())


def test_quarantine_moves_the_file_and_its_marker_and_keeps_both(tmp_path):
    zone = Landing(tmp_path)
    path = land(tmp_path, "records", NOV, "bad.parquet")
    target = zone.quarantine("records", NOV, path, "ids missing", "run-1")
    assert not path.exists() and not path.with_name("bad.parquet.done").exists()
    assert target.exists() and (target.parent / "bad.parquet.done").exists()
    assert json.loads((target.parent / "bad.parquet.reason.json").read_text())["reason"] == "ids missing"


def test_the_simulator_writes_atomically_and_marks_its_files_complete(tmp_path, spec):
    zone = Landing(tmp_path)  # the default settle time: only the marker makes the file complete now
    path = zone.records_dir(NOV) / f"batch-{NOV}.parquet"
    Simulator(spec, zone)._write(path, pl.DataFrame({"id": [1, 2]}))
    assert zone.files("records", NOV) == [path]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, f"{path.name}.done"]  # no temp left


# --- the sensor, on a real Dagster instance ----------------------------------------------------------------

def test_the_sensor_requests_a_file_still_being_written_only_once_it_settles(sensor, instance, root):
    zone = LandingZoneResource(root=str(root.parent), settle_seconds=0.6)
    path = land(root, "records", NOV, "batch.csv", marker=False)
    t = Tick(sensor, instance, zone)
    assert t.requests == [] and f"records/{NOV}: waiting for batch.csv" in t.skip
    with path.open("ab") as fh:
        fh.write(b"more bytes")
    t = Tick(sensor, instance, zone, t.cursor)
    assert t.requests == []
    time.sleep(0.7)
    t = Tick(sensor, instance, zone, t.cursor)
    assert t.keys() == [("car_loan__ingest_batch", NOV)]


def test_complete_files_are_requested_while_another_file_of_the_partition_is_still_settling(
        sensor, instance, root):
    zone = LandingZoneResource(root=str(root.parent), settle_seconds=60)
    land(root, "records", NOV, "a.parquet")                    # complete: its marker is there
    b = land(root, "records", NOV, "b.csv", marker=False)      # still being written
    t = Tick(sensor, instance, zone)
    (req,) = t.requests
    assert req.partition_key == NOV and [e.split("|")[0] for e in json.loads(req.tags["arrival/files"])] == [
        "a.parquet"]                                           # b.csv is not in it
    succeed(instance, launch(instance, req))
    t = Tick(sensor, instance, zone, t.cursor)
    assert t.requests == [] and f"records/{NOV}: waiting for b.csv" in t.skip  # a.parquet is ingested
    settled = time.time() - 61                                 # b.csv unchanged for settle_seconds now
    os.utime(b, (settled, settled))
    t = Tick(sensor, instance, zone, t.cursor)
    (req2,) = t.requests                                       # a later request takes it
    assert req2.run_key != req.run_key
    assert sorted(e.split("|")[0] for e in json.loads(req2.tags["arrival/files"])) == ["a.parquet", "b.csv"]


def test_a_file_with_an_mtime_in_the_future_warns_and_never_blocks_its_partition(sensor, instance, root):
    zone = LandingZoneResource(root=str(root.parent), settle_seconds=0.6)
    land(root, "records", NOV, "a.parquet")
    skewed = land(root, "records", NOV, "b.parquet", marker=False)
    ahead = time.time() + 3600
    os.utime(skewed, (ahead, ahead))
    t = Tick(sensor, instance, zone)
    assert t.keys() == [("car_loan__ingest_batch", NOV)]
    assert any("b.parquet" in w and "mtime in the future" in w for w in t.warnings), t.warnings


def test_subfolders_and_unknown_root_entries_warn_and_the_partition_is_still_requested(sensor, instance, root):
    zone = LandingZoneResource(root=str(root.parent))
    land(root, "records", NOV, "batch.parquet")
    land(root, "records", f"{NOV}/region=eu", "part-0.parquet")
    (root / "incoming").mkdir()
    t = Tick(sensor, instance, zone)
    assert t.keys() == [("car_loan__ingest_batch", NOV)]
    warned = "\n".join(t.warnings)
    assert f"records/{NOV}/region=eu" in warned and "never read" in warned, warned
    assert str(root / "incoming") in warned and "not a landing-zone entry" in warned, warned


def test_a_marker_makes_the_sensor_request_at_once(sensor, instance, root):
    zone = LandingZoneResource(root=str(root.parent))  # default settle time of 10 s
    land(root, "records", NOV, "batch.parquet", marker=False)
    assert Tick(sensor, instance, zone).requests == []
    (root / "records" / NOV / "batch.parquet.done").touch()
    assert Tick(sensor, instance, zone).keys() == [("car_loan__ingest_batch", NOV)]


def test_a_stray_folder_is_skipped_with_a_warning_and_the_good_partition_beside_it_is_requested(
        sensor, instance, root):
    zone = LandingZoneResource(root=str(root.parent))
    for folder in ("tmp", "2019-09-01", "2018-11-15"):
        land(root, "records", folder, "batch.parquet")
    land(root, "labels", "not-a-date", "labels.parquet")
    (root / "records" / "batch.parquet").write_text("misplaced")
    t = Tick(sensor, instance, zone)
    assert t.requests == []
    assert "tmp" in t.skip and "2019-09-01" in t.skip and "not-a-date" in t.skip  # visible in the UI
    land(root, "records", NOV, "batch.parquet")
    t = Tick(sensor, instance, zone, t.cursor)
    assert t.keys() == [("car_loan__ingest_batch", NOV)]
    warned = "\n".join(t.warnings)
    for name in ("records/tmp", "records/2019-09-01", "records/2018-11-15", "labels/not-a-date",
                 "records/batch.parquet"):
        assert name in warned, warned


def test_labels_before_records_are_held_then_requested_once_raw_records_is_published(sensor, instance, root):
    zone = LandingZoneResource(root=str(root.parent), retry_backoff_seconds=0)
    land(root, "labels", NOV, "labels.parquet")
    t = Tick(sensor, instance, zone)
    assert t.requests == [] and f"labels/{NOV}: labels held until raw_records [{NOV}]" in t.skip
    land(root, "records", NOV, "batch.parquet")
    t = Tick(sensor, instance, zone, t.cursor)
    (req,) = t.requests
    assert req.job_name == "car_loan__ingest_batch"  # the records; the labels still wait for them to publish
    first = launch(instance, req)
    fail(instance, first, materialize="raw_records")  # materialized in a run that failed: not published
    t = Tick(sensor, instance, zone, t.cursor)
    assert t.keys() == [("car_loan__ingest_batch", NOV)] and "labels held" not in t.skip
    second = launch(instance, t.requests[0])
    succeed(instance, second, materialize="raw_records")
    t = Tick(sensor, instance, zone, t.cursor)
    (req,) = t.requests
    assert (req.job_name, req.partition_key) == ("car_loan__ingest_labels", NOV)
    assert req.tags["arrival/records_run"] == second.run_id


def test_a_failed_ingest_run_is_requested_again_with_a_new_key_but_never_beside_one_in_progress(
        sensor, instance, root):
    zone = LandingZoneResource(root=str(root.parent), retry_backoff_seconds=0, max_ingest_attempts=3)
    land(root, "records", NOV, "batch.parquet")
    t = Tick(sensor, instance, zone)
    (req0,) = t.requests
    run0 = launch(instance, req0)
    t = Tick(sensor, instance, zone, t.cursor)
    assert t.requests == [] and "queued or running" in t.skip  # queued
    start(instance, run0)
    t = Tick(sensor, instance, zone, t.cursor)
    assert t.requests == []  # running
    fail(instance, run0)
    t = Tick(sensor, instance, zone, t.cursor)
    (req1,) = t.requests
    assert req1.run_key != req0.run_key and req1.run_key.endswith("attempt-1") and req1.partition_key == NOV
    run1 = launch(instance, req1)
    succeed(instance, run1)
    assert status(instance, run1) == dg.DagsterRunStatus.SUCCESS
    t = Tick(sensor, instance, zone, t.cursor)
    assert t.requests == []
    assert Tick(sensor, instance, zone).requests == []  # nor with a lost cursor (a daemon restart)


def test_retries_back_off_and_stop_after_the_maximum_number_of_attempts(sensor, instance, root):
    zone = LandingZoneResource(root=str(root.parent), retry_backoff_seconds=3600, max_ingest_attempts=2)
    land(root, "records", NOV, "batch.parquet")
    run = launch(instance, Tick(sensor, instance, zone).requests[0])
    fail(instance, run)
    t = Tick(sensor, instance, zone)
    assert t.requests == [] and "retry 2 of 2 in" in t.skip  # backing off
    quick = LandingZoneResource(root=str(root.parent), retry_backoff_seconds=0, max_ingest_attempts=2)
    t = Tick(sensor, instance, quick)
    fail(instance, launch(instance, t.requests[0]))
    t = Tick(sensor, instance, quick)
    assert t.requests == [] and any("gave up after 2 failed car_loan__ingest_batch run(s)" in w for w in t.warnings)


def test_a_run_with_a_dagster_retry_coming_counts_as_in_progress(sensor, instance, root):
    zone = LandingZoneResource(root=str(root.parent), retry_backoff_seconds=0)
    land(root, "records", NOV, "batch.parquet")
    (req,) = Tick(sensor, instance, zone).requests
    run = launch(instance, req, **{"dagster/max_retries": "1"})
    fail(instance, run)
    instance.add_run_tags(run.run_id, {"dagster/will_retry": "true"})
    assert Tick(sensor, instance, zone).requests == []  # Dagster will retry it: not ours to request
    retry = queue(instance, dg.DagsterRun(
        job_name=run.job_name, run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.NOT_STARTED,
        tags={**run.tags, "dagster/root_run_id": run.run_id, "dagster/parent_run_id": run.run_id,
              "dagster/will_retry": "false"}))
    assert Tick(sensor, instance, zone).requests == []  # the retry is queued
    fail(instance, retry)
    instance.add_run_tags(retry.run_id, {"dagster/will_retry": "false"})
    (again,) = Tick(sensor, instance, zone).requests
    assert again.run_key.endswith("attempt-1")  # the run and its Dagster retry were one attempt


def test_two_files_with_overlapping_ids_in_separate_ticks_each_produce_a_request(sensor, instance, root):
    zone = LandingZoneResource(root=str(root.parent))
    land(root, "records", NOV, "a.parquet", rows=(1, 2, 3))
    t = Tick(sensor, instance, zone)
    (first,) = t.requests
    succeed(instance, launch(instance, first))
    land(root, "records", NOV, "b.parquet", rows=(3, 4))
    t = Tick(sensor, instance, zone, t.cursor)
    (second,) = t.requests
    assert second.partition_key == NOV and second.run_key != first.run_key
    assert json.loads(second.tags["arrival/files"])[1].startswith("b.parquet|")
    # That run fails on the overlap and quarantines b: a's rows are already ingested, nothing to request.
    run = launch(instance, second)
    Landing(root).quarantine("records", NOV, root / "records" / NOV / "b.parquet", "duplicate ids", run.run_id)
    fail(instance, run)
    assert Tick(sensor, instance, zone, t.cursor).requests == []


def test_a_partition_whose_bad_file_was_quarantined_is_requested_again_for_its_good_file(sensor, instance, root):
    zone = LandingZoneResource(root=str(root.parent))  # default backoff: the new request is not a retry
    land(root, "records", NOV, "good.parquet")
    land(root, "records", NOV, "bad.parquet")
    t = Tick(sensor, instance, zone)
    run = launch(instance, t.requests[0])
    Landing(root).quarantine("records", NOV, root / "records" / NOV / "bad.parquet", "unreadable", run.run_id)
    fail(instance, run)
    t = Tick(sensor, instance, zone, t.cursor)
    (req,) = t.requests
    assert req.run_key.endswith("attempt-0") and [e.split("|")[0] for e in json.loads(req.tags["arrival/files"])] \
        == ["good.parquet"]


def test_the_same_files_on_the_same_tick_twice_make_one_request(sensor, instance, root):
    zone = LandingZoneResource(root=str(root.parent))
    land(root, "records", NOV, f"batch-{NOV}.parquet")
    land(root, "labels", "2018-10-01", "labels.parquet")
    a, b = Tick(sensor, instance, zone), Tick(sensor, instance, zone)
    assert [r.run_key for r in a.requests] == [r.run_key for r in b.requests] and len(a.requests) == 1
    launch(instance, a.requests[0])  # Dagster makes one run per run key; once it exists, no new request
    assert Tick(sensor, instance, zone, b.cursor).requests == []


def test_arrivals_request_the_landed_partition_once_and_labels_their_own_job(sensor, instance, root):
    zone = LandingZoneResource(root=str(root.parent))
    land(root, "records", NOV, "batch.parquet")
    t = Tick(sensor, instance, zone)
    assert t.keys() == [("car_loan__ingest_batch", NOV)]
    succeed(instance, launch(instance, t.requests[0]), materialize="raw_records")
    t = Tick(sensor, instance, zone, t.cursor)
    assert t.requests == []  # the same files never fire twice
    land(root, "labels", NOV, "labels.parquet")
    t = Tick(sensor, instance, zone, t.cursor)
    assert t.keys() == [("car_loan__ingest_labels", NOV)]


def test_a_tick_over_every_partition_already_ingested_is_fast(sensor, instance, root, monkeypatch):
    monkeypatch.setattr("sensors.arrivals.MAX_RANGE", 1)  # one run per partition (a burst would be one ranged run)
    zone = LandingZoneResource(root=str(root.parent))
    from mlplatform.batches import partition_keys
    from .helpers import car_loan as _spec

    keys = partition_keys(_spec())
    for p in keys:
        land(root, "records", p, "batch.parquet")
    t = Tick(sensor, instance, zone)
    assert sorted(t.keys()) == [("car_loan__ingest_batch", p) for p in sorted(keys)]  # every partition gets ingested first
    for req in t.requests:
        succeed(instance, launch(instance, req), materialize="raw_records")
    t0 = time.perf_counter()
    t = Tick(sensor, instance, zone)  # no cursor: the run history alone says everything is ingested
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    Tick(sensor, instance, zone, t.cursor)
    warm = time.perf_counter() - t0
    assert t.requests == [] and cold < 2.0 and warm < 0.5, (cold, warm)


def test_files_ingested_by_a_run_the_sensor_did_not_make_are_not_requested_again(sensor, instance, root):
    """`make demo` materializes raw_records from the CLI; a daemon started afterwards must not ingest twice."""
    zone = LandingZoneResource(root=str(root.parent))
    path = land(root, "records", NOV, "batch.parquet")
    time.sleep(0.05)
    run = queue(instance, dg.DagsterRun(job_name="__ASSET_JOB", run_id=str(uuid.uuid4()),
                                        status=dg.DagsterRunStatus.NOT_STARTED, tags={"dagster/partition": NOV}))
    start(instance, run)
    mat = dg.AssetMaterialization(asset_key=["car_loan", "raw_records"], partition=NOV, metadata={
        "lakefs_commit": "c0ffee", "lakefs_path": "lakefs://repo/c0ffee/assets/raw_records/data.parquet",
        "files": dg.MetadataValue.json(["batch.parquet"])})
    event(instance, run, DagsterEventType.ASSET_MATERIALIZATION, StepMaterializationData(mat))
    event(instance, run, DagsterEventType.RUN_SUCCESS)
    t = Tick(sensor, instance, zone)
    assert t.requests == []
    with path.open("ab") as fh:  # rewritten after that run started: a new delivery
        fh.write(b"x")
    (root / "records" / NOV / "batch.parquet.done").touch()
    assert Tick(sensor, instance, zone, t.cursor).keys() == [("car_loan__ingest_batch", NOV)]


# --- labels wait for every records file of their partition (issue 9: labels before records) ---------------

def succeed_holding(instance, run, held: list[str]):
    """A labels run that succeeds but HELD files (raw_labels metadata `files_held`, as the asset writes it)."""
    start(instance, run)
    mat = dg.AssetMaterialization(asset_key=["car_loan", "raw_labels"], partition=run.tags["dagster/partition"], metadata={
        "lakefs_commit": "c0ffee", "lakefs_path": "lakefs://repo/c0ffee/assets/raw_labels/data.parquet",
        "files_held": dg.MetadataValue.json(held)})
    event(instance, run, DagsterEventType.ASSET_MATERIALIZATION, StepMaterializationData(mat))
    event(instance, run, DagsterEventType.RUN_SUCCESS)


def published_records(sensor, instance, zone, root):
    """records/NOV/a.parquet landed and ingested by a successful ingest_batch run: the first generation."""
    land(root, "records", NOV, "a.parquet", rows=range(100))
    t = Tick(sensor, instance, zone)
    (req,) = t.requests
    run = launch(instance, req)
    succeed(instance, run, materialize="raw_records")
    return run, t.cursor


def test_labels_wait_while_a_second_records_file_of_their_partition_is_written_pending_or_being_ingested(
        sensor, instance, root, spec):
    zone = LandingZoneResource(root=str(root.parent))  # default settle time: a file without marker is still written
    _, cursor = published_records(sensor, instance, zone, root)
    land(root, "records", NOV, "late.parquet", rows=range(100, 150), marker=False)  # still being written
    land(root, "labels", NOV, "labels.parquet", rows=range(150))  # covers a's ids and late's
    t = Tick(sensor, instance, zone, cursor)
    assert t.requests == []
    assert f"labels/{NOV}: labels held until the records of {NOV} settle" in t.skip
    assert "late.parquet still being written" in t.skip
    (root / "records" / NOV / "late.parquet.done").touch()  # complete, but no run has ingested it
    t = Tick(sensor, instance, zone, t.cursor)
    assert t.keys() == [("car_loan__ingest_batch", NOV)]  # the records only
    waiting = "\n".join(plan_arrivals(instance, zone.zone(spec), [NOV], t.cursor, dataset=spec).waiting)
    assert f"labels/{NOV}: labels held until the records of {NOV} settle" in waiting
    assert "late.parquet not yet ingested by a successful car_loan__ingest_batch run" in waiting
    records_run = launch(instance, t.requests[0])
    t = Tick(sensor, instance, zone, t.cursor)  # the records run is queued
    assert t.requests == [] and f"car_loan__ingest_batch for {NOV} is queued or running ({records_run.run_id})" in t.skip
    start(instance, records_run)
    assert Tick(sensor, instance, zone, t.cursor).requests == []  # running
    event(instance, records_run, DagsterEventType.ASSET_MATERIALIZATION, StepMaterializationData(
        dg.AssetMaterialization(asset_key=["car_loan", "raw_records"], partition=NOV, metadata={
            "lakefs_commit": "beef", "lakefs_path": "lakefs://repo/beef/assets/raw_records/data.parquet"})))
    event(instance, records_run, DagsterEventType.RUN_SUCCESS)
    t = Tick(sensor, instance, zone, t.cursor)
    (req,) = t.requests
    assert (req.job_name, req.partition_key) == ("car_loan__ingest_labels", NOV)
    assert req.tags["arrival/records_run"] == records_run.run_id  # after the records that hold every id


def test_a_labels_run_that_held_its_file_did_not_ingest_it_and_the_labels_are_requested_after_the_records(
        sensor, instance, root):
    zone = LandingZoneResource(root=str(root.parent), retry_backoff_seconds=0)
    first_records, cursor = published_records(sensor, instance, zone, root)
    land(root, "labels", NOV, "labels.parquet", rows=range(150))
    t = Tick(sensor, instance, zone, cursor)
    (labels_req,) = t.requests
    labels_run = launch(instance, labels_req)
    # The late records file lands before the labels run reads: the run holds the labels file and succeeds.
    land(root, "records", NOV, "late.parquet", rows=range(100, 150))
    succeed_holding(instance, labels_run, ["labels.parquet"])
    t = Tick(sensor, instance, zone, t.cursor)
    assert t.keys() == [("car_loan__ingest_batch", NOV)]  # the late records; the held labels wait for them
    assert json.loads(t.cursor)["done"].get(f"labels/{NOV}") is None  # not remembered as ingested
    records_run = launch(instance, t.requests[0])
    succeed(instance, records_run, materialize="raw_records")
    for cursor in (t.cursor, None):  # also with a lost cursor: the run history says the labels are not in
        (req,) = Tick(sensor, instance, zone, cursor).requests
        assert (req.job_name, req.partition_key) == ("car_loan__ingest_labels", NOV)
        assert req.run_key != labels_req.run_key and req.tags["arrival/records_run"] == records_run.run_id


def test_held_labels_are_requested_again_when_the_late_records_file_is_quarantined_instead_of_published(
        sensor, instance, root):
    zone = LandingZoneResource(root=str(root.parent), retry_backoff_seconds=0)
    _, cursor = published_records(sensor, instance, zone, root)
    land(root, "labels", NOV, "labels.parquet", rows=range(150))
    labels_run = launch(instance, Tick(sensor, instance, zone, cursor).requests[0])
    late = land(root, "records", NOV, "late.parquet", rows=range(100, 150))
    succeed_holding(instance, labels_run, ["labels.parquet"])
    records_run = launch(instance, Tick(sensor, instance, zone).requests[0])
    Landing(root).quarantine("records", NOV, late, "unreadable", records_run.run_id)
    fail(instance, records_run)  # no new publication of the records: the same generation
    (req,) = Tick(sensor, instance, zone).requests
    assert (req.job_name, req.partition_key) == ("car_loan__ingest_labels", NOV)
    assert req.run_key != labels_run.tags["dagster/run_key"] and req.run_key.endswith("attempt-1")
