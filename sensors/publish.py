"""Publish sensors: a finished run's branch is merged into main only if it passed; failures keep theirs."""


import dagster as dg

from resources.lakefs import LakeFSResource
from resources.publish import publish_run


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, minimum_interval_seconds=5,
                      description="Merges a successful run's lakeFS branch into main (write-audit-publish).")
def publish_successful_runs(context: dg.RunStatusSensorContext, lakefs: LakeFSResource):
    outcome = publish_run(context.instance, lakefs, context.dagster_run.run_id)
    context.log.info(f"{outcome.run_id}: {outcome.status}: {outcome.detail}")
    if outcome.status == "conflict":
        raise RuntimeError(outcome.detail)


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.FAILURE, minimum_interval_seconds=5,
                      description="Records that a failed run's lakeFS branch is kept and main untouched.")
def keep_failed_run_branches(context: dg.RunStatusSensorContext, lakefs: LakeFSResource):
    outcome = publish_run(context.instance, lakefs, context.dagster_run.run_id)
    context.log.info(f"{outcome.run_id}: {outcome.status}: {outcome.detail}")


publish_sensors = [publish_successful_runs, keep_failed_run_branches]
