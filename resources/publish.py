"""Publish: merge a run's lakeFS branch into main when the run succeeded and every blocking check passed."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import dagster as dg

from resources.lakefs import LakeFSResource, MergeConflict, run_branch

PUBLISHED_TAG = "lakefs/published_commit"
KEPT_TAG = "lakefs/kept_branch"


@dataclass
class PublishOutcome:
    run_id: str
    status: str  # published | kept | conflict | missing | pending
    detail: str
    commit: str | None = None


def failed_blocking_checks(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """Names of blocking asset checks that failed in the run."""
    failed = []
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    for rec in records:
        evaluation = rec.event_log_entry.dagster_event.event_specific_data
        if not evaluation.passed and evaluation.blocking and evaluation.severity == dg.AssetCheckSeverity.ERROR:
            failed.append(f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}")
    return failed


def publish_run(instance: dg.DagsterInstance, lakefs: LakeFSResource, run_id: str) -> PublishOutcome:
    """Merge `run-<run_id>` into main if the run is SUCCESS with no failed blocking check; else keep it."""
    branch = run_branch(run_id)
    run = instance.get_run_by_id(run_id)
    if run is None:
        return PublishOutcome(run_id, "missing", f"no Dagster run {run_id} in this instance")
    if run.tags.get(PUBLISHED_TAG):
        return PublishOutcome(run_id, "published", "already published", run.tags[PUBLISHED_TAG])
    if not lakefs.branch_exists(branch):
        return PublishOutcome(run_id, "missing", f"run {run_id} wrote nothing to lakeFS (no branch {branch})")
    if run.status in (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
                      dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.CANCELING):
        return PublishOutcome(run_id, "pending", f"run {run_id} is {run.status.value}")
    failed = failed_blocking_checks(instance, run_id)
    if run.status != dg.DagsterRunStatus.SUCCESS or failed:
        reason = f"failed blocking checks {failed}" if failed else f"run status {run.status.value}"
        instance.add_run_tags(run_id, {KEPT_TAG: branch})
        return PublishOutcome(run_id, "kept", f"{reason}: main untouched, branch {branch} kept for inspection")
    try:
        commit = lakefs.merge(branch, message=f"publish Dagster run {run_id} ({run.job_name})",
                              metadata={"dagster_run_id": run_id, "job": run.job_name})
    except MergeConflict as exc:
        instance.add_run_tags(run_id, {KEPT_TAG: branch})
        return PublishOutcome(run_id, "conflict", str(exc))
    instance.add_run_tags(run_id, {PUBLISHED_TAG: commit})
    lakefs.delete_branch(branch)
    return PublishOutcome(run_id, "published", f"merged {branch} into {lakefs.main_branch}", commit)


def publish_pending(instance: dg.DagsterInstance, lakefs: LakeFSResource) -> list[PublishOutcome]:
    """Publish every finished run whose branch still exists (idempotent)."""
    out = []
    for info in lakefs.branches(prefix="run-"):
        run = instance.get_run_by_id(info.run_id) if info.run_id else None
        if run is not None and run.tags.get(KEPT_TAG):
            continue
        out.append(publish_run(instance, lakefs, info.run_id or ""))
    return out


def prune_branches(instance: dg.DagsterInstance, lakefs: LakeFSResource, older_than_days: float,
                   dry_run: bool = True) -> list[str]:
    """Delete kept branches of failed runs that ended more than `older_than_days` ago."""
    cutoff = dt.datetime.now(dt.timezone.utc).timestamp() - older_than_days * 86400
    pruned = []
    for info in lakefs.branches(prefix="run-"):
        run = instance.get_run_by_id(info.run_id) if info.run_id else None
        record = instance.get_run_record_by_id(info.run_id) if run else None
        ended = record.end_time if record and record.end_time else None
        if run is not None and run.status == dg.DagsterRunStatus.SUCCESS and not run.tags.get(KEPT_TAG):
            continue  # awaiting publication, not a leftover
        if ended is not None and ended > cutoff:
            continue
        pruned.append(info.name)
        if not dry_run:
            lakefs.delete_branch(info.name)
    return pruned


def open_run_branch(instance: dg.DagsterInstance | None, lakefs: LakeFSResource, run_id: str) -> str:
    """The run's branch; made from a main that first receives every finished, passing run (so a run
    that starts before the publish sensor's next tick still sees its predecessors' data)."""
    branch = run_branch(run_id)
    if not lakefs.branch_exists(branch):
        if instance is not None:
            publish_pending(instance, lakefs)
        lakefs.ensure_branch(branch)
    return branch
