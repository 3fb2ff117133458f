"""Publishing happens in exactly one place (the publish sensor, or `mlp publish` by hand), against a real lakeFS
and a real Dagster instance: a run never publishes another run; it waits for its predecessors' publication;
runs of different partitions both publish; a same-partition conflict is re-executed once from the new main,
then fails clearly; the record-id index reads only what a batch's ids can hit."""

import threading
import time

import dagster as dg
import polars as pl
import pytest

from resources.io import LakeFSIOManager, RETRY_ON_STEP_FAILURE_TAG, load_asset
from resources.lakefs import run_branch
from resources.publish import (CONFLICT_OF_TAG, CONFLICT_RETRY_TAG, PUBLISHED_TAG, PublicationPending,
                               await_publication, publish_run)
from sensors.publish import build_publish_sensors

pytestmark = pytest.mark.services


class Knobs(dg.Config):
    value: int = 1


parts = dg.StaticPartitionsDefinition(["a", "b"])


@dg.asset
def first_step(config: Knobs) -> pl.DataFrame:
    return pl.DataFrame({"x": [config.value]})


@dg.asset(partitions_def=parts)
def piece(context: dg.AssetExecutionContext, config: Knobs) -> pl.DataFrame:
    return pl.DataFrame({"part": [context.partition_key], "v": [config.value]})


piece_job = dg.define_asset_job("piece_job", selection=[piece], partitions_def=parts)


def io(lakefs, **kw) -> LakeFSIOManager:
    return LakeFSIOManager(lakefs=lakefs, **kw)


def beat_sensor_daemon(instance: dg.DagsterInstance) -> None:
    """What a running `dagster-daemon` writes: a fresh heartbeat of its sensor daemon."""
    from dagster._daemon.types import DaemonHeartbeat

    instance.add_daemon_heartbeat(DaemonHeartbeat(time.time(), "SENSOR", "test-daemon", []))


def test_a_run_never_publishes_its_predecessor_and_fails_clearly_when_no_publisher_runs(lakefs, instance):
    first = dg.materialize([first_step], instance=instance, resources={"io_manager": io(lakefs)},
                           run_config={"ops": {"first_step": {"config": {"value": 7}}}})
    head = lakefs.head()
    t0 = time.monotonic()
    second = dg.materialize([piece], partition_key="a", instance=instance, resources={"io_manager": io(lakefs)},
                           raise_on_error=False)
    assert not second.success and time.monotonic() - t0 < 60  # no daemon: no pointless wait
    error = [e for e in second.all_events if e.is_step_failure][0].step_failure_data.error
    while error.cls_name != "PublicationPending" and error.cause is not None:  # under Dagster's wrapper
        error = error.cause
    assert error.cls_name == "PublicationPending"
    assert first.run_id in error.message and "mlp publish" in error.message
    # Nothing was published by the second run: main and the first run's branch are as they were.
    assert lakefs.head() == head and lakefs.branch_exists(run_branch(first.run_id))
    assert not instance.get_run_by_id(first.run_id).tags.get(PUBLISHED_TAG)
    # The failure is transient: Dagster's run retries re-execute the run.
    assert instance.get_run_by_id(second.run_id).tags[RETRY_ON_STEP_FAILURE_TAG] == "true"
    # Once the predecessor is published (the sensor's or the operator's job), the run starts from main.
    assert publish_run(instance, lakefs, first.run_id).status == "published"
    third = dg.materialize([piece], partition_key="a", instance=instance, resources={"io_manager": io(lakefs)})
    assert load_asset(lakefs, "first_step", ref=run_branch(third.run_id))["x"][0] == 7


def test_a_run_waits_for_the_publisher_then_branches_from_a_main_holding_its_predecessor(lakefs, instance):
    first = dg.materialize([first_step], instance=instance, resources={"io_manager": io(lakefs)},
                           run_config={"ops": {"first_step": {"config": {"value": 3}}}})
    beat_sensor_daemon(instance)
    published = []
    publisher = threading.Timer(2.0, lambda: published.append(publish_run(instance, lakefs, first.run_id)))
    publisher.start()
    second = dg.materialize([piece], partition_key="b", instance=instance, resources={"io_manager": io(lakefs)})
    publisher.join()
    assert published[0].status == "published"
    assert load_asset(lakefs, "first_step", ref=run_branch(second.run_id))["x"][0] == 3


def test_the_wait_is_bounded_and_names_the_pending_runs(lakefs, instance):
    first = dg.materialize([first_step], instance=instance, resources={"io_manager": io(lakefs)})
    beat_sensor_daemon(instance)
    t0 = time.monotonic()
    with pytest.raises(PublicationPending, match=rf"{first.run_id}.*still unpublished after"):
        await_publication(instance, lakefs, "some-run", patience_seconds=2, poll_seconds=0.5)
    assert 2 <= time.monotonic() - t0 < 30


def test_runs_launched_together_never_wait_for_each_other(lakefs, instance):
    """Only a run launched after another finished can have been requested because of it: twelve batches
    landing at once start without waiting for each other's publication."""
    together = instance.add_run(dg.DagsterRun(job_name="piece_job", run_id="launched-together",
                                              status=dg.DagsterRunStatus.NOT_STARTED))
    time.sleep(0.05)
    finished_first = dg.materialize([first_step], instance=instance, resources={"io_manager": io(lakefs)})
    await_publication(instance, lakefs, together.run_id, patience_seconds=0)  # no wait, no error
    later = instance.add_run(dg.DagsterRun(job_name="piece_job", run_id="launched-after",
                                           status=dg.DagsterRunStatus.NOT_STARTED))
    with pytest.raises(PublicationPending, match=finished_first.run_id):
        await_publication(instance, lakefs, later.run_id, patience_seconds=0)


def sensor_tick(sensor, instance, run_id, resources):
    """Evaluate a run-status sensor on a run's success, as the daemon does."""
    run = instance.get_run_by_id(run_id)
    event = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.RUN_SUCCESS).records[0]
    context = dg.build_run_status_sensor_context(sensor_name=sensor.name, dagster_instance=instance,
                                                 dagster_run=run, dagster_event=event.event_log_entry.dagster_event,
                                                 resources=resources)
    return sensor(context)


@pytest.fixture
def publish_resources(lakefs, state, mlflow_uri):
    from .helpers import car_loan, resources_for

    res = resources_for(lakefs, state, car_loan(), mlflow_uri)
    return {"lakefs": lakefs, "mlflow": res["mlflow"], "audit": res["audit"]}


def concurrent_defs(lakefs) -> dg.Definitions:
    """Runs as if launched at the same moment: none waits for another's publication (neither had finished
    when the other made its branch), so both branch from the same main."""
    return dg.Definitions(assets=[piece], jobs=[piece_job], resources={"io_manager": io(lakefs, await_publication=False)})


def run_piece(defs, instance, partition, value, tags=None):
    job = defs.resolve_job_def("piece_job")
    return job.execute_in_process(instance=instance, partition_key=partition, tags=tags or {},
                                  run_config={"ops": {"piece": {"config": {"value": value}}}})


def test_runs_of_different_partitions_at_once_both_publish(lakefs, instance, publish_resources):
    defs = concurrent_defs(lakefs)
    lakefs.ensure_branch("seed")  # the repository exists before both branch (as after any first run)
    # Both branch from the same main, as two runs launched at once (real processes: test_foundation).
    results = {p: run_piece(defs, instance, p, v) for p, v in (("a", 1), ("b", 2))}
    publish = build_publish_sensors([piece_job])[0]
    for p in ("a", "b"):
        assert results[p].success
        assert sensor_tick(publish, instance, results[p].run_id, publish_resources) is None
        assert instance.get_run_by_id(results[p].run_id).tags.get(PUBLISHED_TAG)
    assert load_asset(lakefs, "piece", partition="a")["v"][0] == 1
    assert load_asset(lakefs, "piece", partition="b")["v"][0] == 2


def test_a_same_partition_conflict_is_retried_once_from_the_new_main_then_publishes(lakefs, instance,
                                                                                     publish_resources):
    defs = concurrent_defs(lakefs)
    lakefs.ensure_branch("seed")
    first = run_piece(defs, instance, "a", 1)
    second = run_piece(defs, instance, "a", 2)  # branched from the same main: both change partition a
    publish = build_publish_sensors([piece_job])[0]
    assert sensor_tick(publish, instance, first.run_id, publish_resources) is None
    request = sensor_tick(publish, instance, second.run_id, publish_resources)
    assert isinstance(request, dg.RunRequest)
    assert request.job_name == "piece_job" and request.partition_key == "a"
    assert request.tags[CONFLICT_RETRY_TAG] == "1" and request.tags[CONFLICT_OF_TAG] == second.run_id
    retry = run_piece(defs, instance, request.partition_key, 2, tags=request.tags)
    assert sensor_tick(publish, instance, retry.run_id, publish_resources) is None
    assert load_asset(lakefs, "piece", partition="a")["v"][0] == 2  # the retry, from the new main, published


def test_a_retry_that_conflicts_again_fails_naming_the_partition_and_the_conflicting_run(lakefs, instance,
                                                                                          publish_resources):
    defs = concurrent_defs(lakefs)
    lakefs.ensure_branch("seed")
    winner = run_piece(defs, instance, "a", 1)
    retry = run_piece(defs, instance, "a", 2, tags={CONFLICT_RETRY_TAG: "1", CONFLICT_OF_TAG: "earlier-run"})
    publish = build_publish_sensors([piece_job])[0]
    assert sensor_tick(publish, instance, winner.run_id, publish_resources) is None
    with pytest.raises(Exception, match=rf"partition 'a' conflicts with published run\(s\) \['{winner.run_id}'\]"):
        sensor_tick(publish, instance, retry.run_id, publish_resources)
    assert load_asset(lakefs, "piece", partition="a")["v"][0] == 1
    assert lakefs.branch_exists(run_branch(retry.run_id))  # kept for inspection


def test_a_batch_reads_only_the_id_index_files_its_ids_can_hit_and_still_rejects_a_reused_id(
        lakefs, state, instance, monkeypatch):
    from mlplatform.batches import window
    from resources.lakefs import LakeFSResource

    from .helpers import car_loan, production_rows
    from .test_data_contracts import failed_checks, ingest, land, published

    spec = car_loan()
    oct_rows = production_rows(spec, *window(spec, "2018-10-01"))
    land(state, spec, "oct.parquet", oct_rows, partition="2018-10-01")
    published(spec, lakefs, state, instance, partition="2018-10-01")
    land(state, spec, "nov.parquet", production_rows(spec, *window(spec, "2018-11-01"), n=300),
         partition="2018-11-01")
    published(spec, lakefs, state, instance, partition="2018-11-01")
    assert lakefs.exists("main", "index/car_loan/record_ids/partition=2018-10-01.parquet")

    reads: list[str] = []
    real_get = LakeFSResource.get
    monkeypatch.setattr(LakeFSResource, "get", lambda self, ref, path: reads.append(path) or real_get(self, ref, path))
    dec = production_rows(spec, *window(spec, "2018-12-01"), n=50)
    land(state, spec, "dec.parquet", dec.with_columns(pl.Series("id", oct_rows["id"].head(5).to_list() * 10)),
         partition="2018-12-01")
    result = ingest(spec, lakefs, state, instance, partition="2018-12-01")
    assert not result.success
    assert "values already published in batch 2018-10-01" in failed_checks(result)["ids_unique_across_batches"]
    # Only the index file whose id range overlaps this batch's ids was read: not November's, no raw batch.
    others = [p for p in reads if "2018-10-01" in p or "2018-11-01" in p]
    assert others == ["index/car_loan/record_ids/partition=2018-10-01.parquet"]


def test_a_published_records_run_requests_one_scoring_run_of_its_batch_unless_one_is_queued(instance):
    """The publish sensor chains a batch's scoring to its records run: one request per published records run,
    keyed on that run; none for other jobs, for a scoring run itself, or while a scoring run of the batch is
    already queued (declarative automation asked first). The request is the run's own data set's job."""
    from sensors.arrivals import JOBS, SCORE_ASSETS
    from sensors.publish import AFTER_RUN_TAG, scoring_request

    def job(name: str, dataset: str = "car_loan") -> str:
        return f"{dataset}__{name}"

    def run(job: str, partition: str, assets: list[str] | None, status=dg.DagsterRunStatus.SUCCESS,
            dataset: str = "car_loan"):
        return instance.add_run(dg.DagsterRun(
            job_name=job, run_id=f"{job}-{partition}-{len(instance.get_runs())}", status=status,
            tags={"dagster/partition": partition},
            asset_selection=frozenset(dg.AssetKey([dataset, a]) for a in assets) if assets else None))

    records = run(job(JOBS["records"]), "2019-01-01", ["raw_records", "stg_records", "features",
                                                       "data_quality_report"])
    req = scoring_request(instance, records)
    assert req is not None and req.job_name == job(JOBS["score"]) and req.partition_key == "2019-01-01"
    # quality came with the records
    assert {k.to_user_string() for k in req.asset_selection} == {f"car_loan/{a}" for a in SCORE_ASSETS}
    assert req.tags[AFTER_RUN_TAG] == records.run_id and records.run_id in req.run_key
    assert req.tags["mlp/partition"] == "car_loan/2019-01-01"
    assert scoring_request(instance, run(job(JOBS["labels"]), "2019-01-01", ["raw_labels", "stg_labels"])) is None
    assert scoring_request(instance, run(job(JOBS["score"]), "2019-01-01", SCORE_ASSETS)) is None
    assert scoring_request(instance, run(job("retrain"), "", None)) is None  # unpartitioned: nothing to score
    run(job(JOBS["score"]), "2019-02-01", SCORE_ASSETS, status=dg.DagsterRunStatus.STARTED)  # already running
    assert scoring_request(instance, run(job(JOBS["records"]), "2019-02-01", ["raw_records"])) is None
    # ... but the same period of ANOTHER data set is its own batch: scored, with its own job
    other = scoring_request(instance, run(job(JOBS["records"], "car_price"), "2019-02-01", ["raw_records"],
                                          dataset="car_price"))
    assert other is not None and other.job_name == "car_price__score_batch"
    assert {k.path[0] for k in other.asset_selection} == {"car_price"}
    # A UI materialization of raw_records (the asset job) is followed too.
    by_hand = scoring_request(instance, run("__ASSET_JOB", "2019-03-01", ["raw_records"]))
    assert by_hand.partition_key == "2019-03-01" and by_hand.job_name == job(JOBS["score"])
    assert {k.to_user_string() for k in by_hand.asset_selection} == \
        {f"car_loan/{a}" for a in (*SCORE_ASSETS, "data_quality_report")}
