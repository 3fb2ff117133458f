"""Publish sensors: a finished run's branch is merged into main only if it passed; failures keep theirs.
Publishing a run also applies its gate decision: model aliases move only once its data is on main."""


import dagster as dg

from resources.audit import AuditResource
from resources.lakefs import LakeFSResource
from resources.mlflow import MLflowResource
from resources.publish import publish_run


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, minimum_interval_seconds=5,
                      default_status=dg.DefaultSensorStatus.RUNNING,  # publishing must not wait for a person
                      description="Merges a successful run's lakeFS branch into main (write-audit-publish), then "
                                  "moves the model aliases its gate decided.")
def publish_successful_runs(context: dg.RunStatusSensorContext, lakefs: LakeFSResource, mlflow: MLflowResource,
                            audit: AuditResource):
    outcome = publish_run(context.instance, lakefs, context.dagster_run.run_id, mlflow, audit.trail())
    context.log.info(f"{outcome.run_id}: {outcome.status}: {outcome.detail}")
    if outcome.status == "conflict" or outcome.promotion_pending:
        # Reported on the run; the branch is kept, so the next publish (any new run, or `mlp publish`) retries.
        raise RuntimeError(outcome.detail)


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.FAILURE, minimum_interval_seconds=5,
                      default_status=dg.DefaultSensorStatus.RUNNING,
                      description="Records that a failed run's lakeFS branch is kept and main untouched.")
def keep_failed_run_branches(context: dg.RunStatusSensorContext, lakefs: LakeFSResource):
    outcome = publish_run(context.instance, lakefs, context.dagster_run.run_id)
    context.log.info(f"{outcome.run_id}: {outcome.status}: {outcome.detail}")


publish_sensors = [publish_successful_runs, keep_failed_run_branches]
