"""A burst of batches: the arrival sensor requests ONE ranged ingest run over consecutive landed partitions
(never beside a run in progress; a partition a ranged run tried before is requested on its own), and the publish
sensor follows a published ranged run with ONE ranged scoring run. Plain grouping logic without services; the
sensor on a real Dagster instance (runs recorded as the daemon records them, see tests/test_arrivals.py)."""

from __future__ import annotations

import json
import uuid

import dagster as dg
import pytest

from resources.partitions import RANGE_END_TAG, RANGE_START_TAG, contiguous_groups, run_partitions
from sensors.arrivals import RANGE_STAMPS_TAG

from .test_arrivals import Tick, fail, land, launch, queue, start  # noqa: F401 - shared run recorders
from .test_arrivals import sensor, spec  # noqa: F401 - the same fixtures (car_loan's arrivals sensor)

NOV, DEC, JAN, FEB, MAR = "2018-11-01", "2018-12-01", "2019-01-01", "2019-02-01", "2019-03-01"


@pytest.fixture
def root(state, spec):
    return state / "landing" / spec.name


@pytest.fixture
def zone(root):
    from resources.landing import LandingZoneResource

    return LandingZoneResource(root=str(root.parent), settle_seconds=0.0)


def launch_tags(req: dg.RunRequest) -> dict:
    return {**req.tags, "dagster/run_key": req.run_key, "dagster/sensor_name": "car_loan__landing_arrivals"}


def launch_ranged(instance, req: dg.RunRequest) -> dg.DagsterRun:
    """Record the run the daemon makes of a ranged request (no `dagster/partition`, the range tags)."""
    return queue(instance, dg.DagsterRun(job_name=req.job_name, run_id=str(uuid.uuid4()), tags=launch_tags(req),
                                         status=dg.DagsterRunStatus.NOT_STARTED))


def records_requests(tick):
    return [r for r in tick.requests if r.job_name == "car_loan__ingest_batch"]


def test_consecutive_partitions_group_into_ranges_and_a_gap_splits_them():
    keys = [NOV, DEC, JAN, FEB, MAR]
    assert contiguous_groups([JAN, NOV, DEC, MAR], keys) == [[NOV, DEC, JAN], [MAR]]
    assert contiguous_groups([NOV, DEC, JAN, FEB], keys, max_size=3) == [[NOV, DEC, JAN], [FEB]]
    assert contiguous_groups(["1999-01-01", DEC], keys) == [[DEC]]


def test_a_ranged_run_covers_every_partition_of_its_range():
    keys = [NOV, DEC, JAN, FEB]
    run = dg.DagsterRun(job_name="j", run_id="r", tags={RANGE_START_TAG: DEC, RANGE_END_TAG: FEB})
    assert run_partitions(run, keys) == [DEC, JAN, FEB]
    assert run_partitions(dg.DagsterRun(job_name="j", run_id="s", tags={"dagster/partition": NOV}), keys) == [NOV]
    assert run_partitions(dg.DagsterRun(job_name="j", run_id="t", tags={}), keys) == []


def test_three_landed_batches_become_one_ranged_ingest_run_and_a_lone_batch_keeps_its_own(sensor, instance, root,
                                                                                            zone):
    for p in (NOV, DEC, JAN, MAR):
        land(root, "records", p, "batch.parquet")
    tick = Tick(sensor, instance, zone)
    reqs = records_requests(tick)
    ranged = [r for r in reqs if r.partition_key is None]
    single = [r for r in reqs if r.partition_key is not None]
    assert len(ranged) == 1 and [r.partition_key for r in single] == [MAR]
    (req,) = ranged
    assert (req.partition_key_range.start, req.partition_key_range.end) == (NOV, JAN)
    assert sorted(json.loads(req.tags[RANGE_STAMPS_TAG])) == [NOV, DEC, JAN]
    assert req.tags["mlp/dataset"] == "car_loan" and "dagster/partition" not in req.tags
    # The same files on the next tick make the same request (Dagster makes one run of its key).
    assert [r.run_key for r in records_requests(Tick(sensor, instance, zone, tick.cursor))] == \
        [r.run_key for r in reqs]


def test_no_partition_of_a_ranged_run_in_progress_is_requested_again(sensor, instance, root, zone):
    for p in (NOV, DEC, JAN):
        land(root, "records", p, "batch.parquet")
    (req,) = records_requests(Tick(sensor, instance, zone))
    run = launch_ranged(instance, req)
    tick = Tick(sensor, instance, zone)
    assert records_requests(tick) == []
    assert run.run_id in tick.skip
    start(instance, run)
    assert records_requests(Tick(sensor, instance, zone)) == []


def test_after_a_ranged_run_fails_each_of_its_partitions_is_requested_on_its_own(sensor, instance, root, zone):
    for p in (NOV, DEC, JAN):
        land(root, "records", p, "batch.parquet")
    (req,) = records_requests(Tick(sensor, instance, zone))
    run = launch_ranged(instance, req)
    fail(instance, run)
    reqs = records_requests(Tick(sensor, instance, zone))
    assert sorted(r.partition_key for r in reqs) == [NOV, DEC, JAN]
    assert all(r.tags.get(RANGE_START_TAG) is None for r in reqs)
    # ... while batches landing after it still form a range of their own.
    land(root, "records", FEB, "batch.parquet")
    land(root, "records", MAR, "batch.parquet")
    reqs = records_requests(Tick(sensor, instance, zone))
    assert sorted(r.partition_key for r in reqs if r.partition_key) == [NOV, DEC, JAN]
    assert [(r.partition_key_range.start, r.partition_key_range.end) for r in reqs if r.partition_key is None] \
        == [(FEB, MAR)]


def test_a_ranged_run_dagster_retried_is_judged_by_its_retry_not_held_in_progress_forever(sensor, instance, root,
                                                                                          zone):
    for p in (NOV, DEC, JAN):
        land(root, "records", p, "batch.parquet")
    (req,) = records_requests(Tick(sensor, instance, zone))
    parent = launch_ranged(instance, req)
    start(instance, parent)
    instance.add_run_tags(parent.run_id, {"dagster/will_retry": "true"})  # Dagster leaves it there for good
    instance.report_run_failed(instance.get_run_by_id(parent.run_id))
    retry = queue(instance, dg.DagsterRun(job_name=req.job_name, run_id=str(uuid.uuid4()), tags={
        **launch_tags(req), "dagster/parent_run_id": parent.run_id,
        "dagster/root_run_id": parent.run_id}, status=dg.DagsterRunStatus.NOT_STARTED))
    assert records_requests(Tick(sensor, instance, zone)) == []  # the retry is in flight: nothing again
    fail(instance, retry)
    # The retry failed for good: each partition is requested on its own, the retried parent holds nothing.
    tick = Tick(sensor, instance, zone)
    reqs = records_requests(tick)
    assert sorted(r.partition_key for r in reqs) == [NOV, DEC, JAN], tick.skip
    assert sorted(r.partition_key for r in reqs) == [NOV, DEC, JAN]


def test_a_ranged_scoring_run_that_failed_for_good_is_split_into_one_scoring_run_per_partition(sensor, instance,
                                                                                                 zone):
    from sensors.arrivals import SPLIT_FROM_TAG

    def ranged_scoring(**extra) -> dg.DagsterRun:
        run = queue(instance, dg.DagsterRun(job_name="car_loan__score_batch", run_id=str(uuid.uuid4()), tags={
            "mlp/dataset": "car_loan", RANGE_START_TAG: NOV, RANGE_END_TAG: JAN, **extra},
            status=dg.DagsterRunStatus.NOT_STARTED))
        start(instance, run)
        return run

    def scoring(tick):
        return [r for r in tick.requests if r.job_name == "car_loan__score_batch"]

    retried = ranged_scoring(**{"dagster/will_retry": "true"})
    instance.report_run_failed(instance.get_run_by_id(retried.run_id))
    assert scoring(Tick(sensor, instance, zone)) == []  # Dagster retries it: its retry is judged instead
    failed = ranged_scoring()
    instance.report_run_failed(instance.get_run_by_id(failed.run_id))
    reqs = scoring(Tick(sensor, instance, zone))
    assert sorted(r.partition_key for r in reqs) == [NOV, DEC, JAN]
    assert {r.tags[SPLIT_FROM_TAG] for r in reqs} == {failed.run_id} and len({r.run_key for r in reqs}) == 3
    queue(instance, dg.DagsterRun(job_name="car_loan__score_batch", run_id=str(uuid.uuid4()),
                                  tags={**reqs[0].tags, "dagster/partition": NOV},
                                  status=dg.DagsterRunStatus.NOT_STARTED))
    assert scoring(Tick(sensor, instance, zone)) == []  # split once


def test_a_published_ranged_records_run_requests_one_ranged_scoring_run(instance):
    from sensors.arrivals import JOBS, SCORE_ASSETS
    from sensors.publish import AFTER_RUN_TAG, scoring_request

    run = instance.add_run(dg.DagsterRun(
        job_name=f"car_loan__{JOBS['records']}", run_id="ranged-records", status=dg.DagsterRunStatus.SUCCESS,
        tags={"mlp/dataset": "car_loan", RANGE_START_TAG: NOV, RANGE_END_TAG: JAN},
        asset_selection=frozenset(dg.AssetKey(["car_loan", a]) for a in
                                  ("raw_records", "stg_records", "features", "data_quality_report"))))
    req = scoring_request(instance, run)
    assert req is not None and req.job_name == "car_loan__score_batch" and req.partition_key is None
    assert (req.partition_key_range.start, req.partition_key_range.end) == (NOV, JAN)
    assert {k.to_user_string() for k in req.asset_selection} == {f"car_loan/{a}" for a in SCORE_ASSETS}
    assert req.tags[AFTER_RUN_TAG] == run.run_id and run.run_id in req.run_key
    scored = instance.add_run(dg.DagsterRun(job_name="car_loan__score_batch", run_id="ranged-score",
                                            status=dg.DagsterRunStatus.SUCCESS, tags=dict(req.tags)))
    assert scoring_request(instance, scored) is None  # a scoring run is never followed by another


def test_a_conflicting_ranged_run_is_re_executed_over_the_same_range():
    from resources.publish import CONFLICT_RETRY_TAG, PublishOutcome, conflict_retry_request

    run = dg.DagsterRun(job_name="car_loan__ingest_batch", run_id="r1",
                        tags={"mlp/dataset": "car_loan", RANGE_START_TAG: NOV, RANGE_END_TAG: JAN})
    req = conflict_retry_request(run, PublishOutcome("r1", "conflict", "conflict"))
    assert req.partition_key is None and req.tags[CONFLICT_RETRY_TAG] == "1"
    assert (req.partition_key_range.start, req.partition_key_range.end) == (NOV, JAN)
