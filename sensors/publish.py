"""Publish sensors: a finished run's branch is merged into main only if it passed; failures keep theirs.
Publishing a run also applies its gate decision: model aliases move only once its data is on main.

This is the ONLY place that merges run branches automatically (`mlp publish` is the operator's manual path
through the same `publish_run`). A run opening its branch waits for its predecessors to be published here
(resources/publish.py `await_publication`); it never publishes them itself.

A same-partition conflict (two runs of one partition both changed its paths; main keeps the one merged
first) is re-executed once from the new main: the sensor requests a new run of the same job, partition and
config tagged `mlp/conflict_retry=1`. If that run conflicts again, its publication fails with a message naming
the partition and the conflicting run(s), and its branch is kept.

Publishing is the platform's, not a data set's: one set of publish sensors serves every data set (a run's branch
holds only its own data set's paths, so publishing one never touches another's). What a publication requests
stays inside the run's data set: a published records run of `car_loan` requests `car_loan__score_batch`."""

from collections.abc import Sequence

import dagster as dg

from resources.audit import AuditResource
from resources.lakefs import LakeFSResource
from resources.mlflow import MLflowResource
from resources.naming import dataset_of_run, ns
from resources.publish import ACTIVE, PARTITION_TAG, conflict_retry_request, publish_pending, publish_run
from resources.partitions import RANGE_END_TAG, RANGE_START_TAG, range_tags
from sensors.arrivals import JOBS, QUALITY_ASSET, SCORE_ASSETS

AFTER_RUN_TAG = "mlp/after_run"  # a scoring run: the records run whose publication requested it


def scoring_request(instance: dg.DagsterInstance, run: dg.DagsterRun) -> dg.RunRequest | None:
    """A published run that materialized a batch's raw records -> one run scoring and monitoring that batch
    (with its data-quality report if that run did not make one), unless one is already queued or running.
    This is the only automatic path to these assets: records ingested by the arrivals sensor, or raw_records
    materialized by hand in the UI or the CLI, are followed the same way."""
    partition, dataset = run.tags.get(PARTITION_TAG), dataset_of_run(run)
    ranged = run.tags.get(RANGE_START_TAG), run.tags.get(RANGE_END_TAG)
    if not partition and all(ranged) and dataset:
        # A ranged run (a burst of batches): ONE scoring run over the same range, published as one.
        return ranged_scoring_request(instance, run, dataset, *ranged)
    if not partition or not dataset:
        return None
    n = ns(dataset)
    if run.job_name == n.job(JOBS["score"]):
        return None
    selection = run.asset_selection
    if selection is not None and n.key("raw_records") not in selection:
        return None
    if selection is None and run.job_name != n.job(JOBS["records"]):
        return None
    wanted = set(n.keys(*SCORE_ASSETS))
    for other in instance.get_runs(dg.RunsFilter(tags={PARTITION_TAG: partition}, statuses=list(ACTIVE)), limit=20):
        if other.asset_selection is not None and wanted <= set(other.asset_selection):
            return None
    assets = [*SCORE_ASSETS] + ([] if selection and n.key(QUALITY_ASSET) in selection else [QUALITY_ASSET])
    return dg.RunRequest(run_key=f"score/{dataset}/{partition}/{run.run_id}", job_name=n.job(JOBS["score"]),
                         partition_key=partition, asset_selection=n.keys(*assets),
                         tags={**n.partition_tags(partition), AFTER_RUN_TAG: run.run_id})


def ranged_scoring_request(instance: dg.DagsterInstance, run: dg.DagsterRun, dataset: str, start: str,
                           end: str) -> dg.RunRequest | None:
    n = ns(dataset)
    if run.job_name == n.job(JOBS["score"]):
        return None
    selection = run.asset_selection or None  # none, or empty: the whole job
    if selection is not None and n.key("raw_records") not in selection:
        return None
    if selection is None and run.job_name != n.job(JOBS["records"]):
        return None
    made_quality = n.key(QUALITY_ASSET) in selection if selection else run.job_name == n.job(JOBS["records"])
    assets = [*SCORE_ASSETS] + ([] if made_quality else [QUALITY_ASSET])
    return dg.RunRequest(run_key=f"score/{dataset}/{start}...{end}/{run.run_id}", job_name=n.job(JOBS["score"]),
                         asset_selection=n.keys(*assets),
                         tags={**n.tags, **range_tags(start, end), AFTER_RUN_TAG: run.run_id})


def build_publish_sensors(jobs: Sequence = ()) -> list:
    """The publish sensors. With `jobs` (every job whose runs may conflict), a conflicting run is re-executed
    once; without, a conflict fails the sensor tick with the conflict named (the branch is kept either way)."""
    retry_jobs = list(jobs)
    score_jobs = [j for j in retry_jobs if j.name.endswith(f"__{JOBS['score']}")]  # every data set's

    @dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, minimum_interval_seconds=5,
                          default_status=dg.DefaultSensorStatus.RUNNING,  # publishing must not wait for a person
                          request_jobs=retry_jobs or None,
                          description="Merges a successful run's lakeFS branch into main (write-audit-publish), "
                                      "then moves the model aliases its gate decided; re-executes a run whose "
                                      "partition conflicted once from the new main; a published batch's records "
                                      "run requests that batch's scoring and monitoring run.")
    def publish_successful_runs(context: dg.RunStatusSensorContext, lakefs: LakeFSResource, mlflow: MLflowResource,
                                audit: AuditResource):
        outcome = publish_run(context.instance, lakefs, context.dagster_run.run_id, mlflow, audit.trail())
        context.log.info(f"{outcome.run_id}: {outcome.status}: {outcome.detail}")
        if outcome.status == "conflict":
            request = conflict_retry_request(context.dagster_run, outcome) if retry_jobs else None
            if request is not None and request.job_name in {j.name for j in retry_jobs}:
                context.log.warning(f"{outcome.detail} Re-executing it once from the new main.")
                return request
            raise RuntimeError(outcome.detail)
        if outcome.promotion_pending:
            # Reported on the run; the branch is kept, so the next publish (this sensor or `mlp publish`) retries.
            raise RuntimeError(outcome.detail)
        if outcome.status == "published" and score_jobs:
            request = scoring_request(context.instance, context.dagster_run)
            if request is not None and request.job_name in {j.name for j in score_jobs}:
                where = request.partition_key or "{}...{}".format(*request.partition_key_range)
                context.log.info(f"requesting {request.job_name} [{where}] after {outcome.run_id}")
                return request
        return None

    @dg.run_status_sensor(run_status=dg.DagsterRunStatus.FAILURE, minimum_interval_seconds=5,
                          default_status=dg.DefaultSensorStatus.RUNNING,
                          description="Records that a failed run's lakeFS branch is kept and main untouched.")
    def keep_failed_run_branches(context: dg.RunStatusSensorContext, lakefs: LakeFSResource):
        outcome = publish_run(context.instance, lakefs, context.dagster_run.run_id)
        context.log.info(f"{outcome.run_id}: {outcome.status}: {outcome.detail}")

    @dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING, jobs=score_jobs or None,
               description="Sweep: publishes successful runs the run-status sensor could not (lakeFS or MLflow was "
                           "down at its tick) and finishes pending alias moves, so runs waiting for their "
                           "predecessors' publication are not left waiting; a batch published here is scored too.")
    def publish_stragglers(context: dg.SensorEvaluationContext, lakefs: LakeFSResource, mlflow: MLflowResource,
                           audit: AuditResource):
        outcomes = [o for o in publish_pending(context.instance, lakefs, mlflow, audit.trail(), min_age_seconds=30)
                    if o.status not in ("pending", "missing")]
        requests = []
        for o in outcomes:
            context.log.info(f"{o.run_id}: {o.status}: {o.detail}")
            run = context.instance.get_run_by_id(o.run_id) if o.status == "published" and score_jobs else None
            request = scoring_request(context.instance, run) if run is not None else None
            if request is not None and request.job_name in {j.name for j in score_jobs}:
                requests.append(request)
        if requests:
            return dg.SensorResult(run_requests=requests)
        return dg.SkipReason(f"swept {len(outcomes)} run branch(es)" if outcomes else "nothing left unpublished")

    return [publish_successful_runs, keep_failed_run_branches, publish_stragglers]


# Without the jobs: what platform/definitions.py uses until it passes `build_publish_sensors(lifecycle["jobs"])`.
publish_sensors = build_publish_sensors()
