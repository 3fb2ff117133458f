"""Publish: merge a run's lakeFS branch into main when the run succeeded and every blocking check passed,
then apply the run's gate decision: model aliases move only once the data they were trained on is on main."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import dagster as dg

from mlplatform.audit import AuditTrail
from resources.lakefs import LakeFSResource, MergeConflict, run_branch
from resources.mlflow import MLflowResource

PUBLISHED_TAG = "lakefs/published_commit"
KEPT_TAG = "lakefs/kept_branch"
# Written by the gate (evaluation_report) on its run: what to do with the model once the run is published.
GATE_TAG = "mlp/gate_decision"
MODEL_VERSION_TAG = "mlp/model_version"
MODEL_NAME_TAG = "mlp/model_name"
EXPERIMENT_TAG = "mlp/mlflow_experiment"

ACTIVE = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
          dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING)


@dataclass
class PublishOutcome:
    run_id: str
    status: str  # published | kept | conflict | missing | pending
    detail: str
    commit: str | None = None
    promotion_pending: bool = False  # published, but the gate decision's alias moves must be retried


def failed_blocking_checks(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    """Names of blocking asset checks that failed in the run."""
    failed = []
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    for rec in records:
        evaluation = rec.event_log_entry.dagster_event.event_specific_data
        if not evaluation.passed and evaluation.blocking and evaluation.severity == dg.AssetCheckSeverity.ERROR:
            failed.append(f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}")
    return failed


def commit_on_main(lakefs: LakeFSResource, commit: str) -> bool:
    """Is `commit` reachable from main (its merge base with main is itself)?"""
    from lakefs_sdk.exceptions import ApiException

    if not commit or commit == "unknown":
        return False
    try:
        base = lakefs.client.sdk_client.refs_api.find_merge_base(lakefs.repository, commit, lakefs.main_branch)
    except ApiException as exc:
        if exc.status in (400, 404):  # no such commit in this repository
            return False
        raise
    return base.base_commit_id == commit


def _mlflow_for(run: dg.DagsterRun, mlflow: MLflowResource | None) -> MLflowResource:
    """The MLflow store of the run's model: the given resource (another model's: the same store), else the
    environment's (the resource factory's settings)."""
    from resources.environment import Settings, SettingError, mlflow_resource

    name, experiment = run.tags[MODEL_NAME_TAG], run.tags.get(EXPERIMENT_TAG, "mlplatform")
    if mlflow is not None and mlflow.model_name == name:
        return mlflow
    if mlflow is not None:
        return MLflowResource(tracking_uri=mlflow.tracking_uri, artifact_root=mlflow.artifact_root,
                              ui_url=mlflow.ui_url, retries=mlflow.retries, timeout_seconds=mlflow.timeout_seconds,
                              model_name=name, experiment=experiment)
    settings = Settings.from_env()
    if not settings.mlflow_tracking_uri:
        raise SettingError(f"run {run.run_id} decided to move aliases of {name}, but setting MLFLOW_TRACKING_URI "
                           f"is not set: export it and run `mlp publish`")
    return mlflow_resource(settings.replace(mlflow_model_name=name, mlflow_experiment=experiment))


def _audit(audit: AuditTrail | None) -> AuditTrail:
    """The given audit trail, else the one the resource factory configures for this environment."""
    if audit is not None:
        return audit
    from resources.environment import default_audit_trail

    return default_audit_trail()


def promote_run(instance: dg.DagsterInstance, lakefs: LakeFSResource, run: dg.DagsterRun, commit: str,
                mlflow: MLflowResource | None = None, audit: AuditTrail | None = None) -> tuple[bool, str]:
    """Apply the run's gate decision now that its data is on main: (settled, detail). Idempotent.

    Not settled (retry later) when MLflow or the audit trail cannot be written."""
    from mlplatform import registry

    decision, version = run.tags.get(GATE_TAG), run.tags.get(MODEL_VERSION_TAG)
    if not decision or not version:
        return True, ""
    if decision not in (registry.PROMOTE, registry.AWAIT_APPROVAL):
        return True, f"; v{version} gate decision {decision}: no alias moves"
    try:
        m = _mlflow_for(run, mlflow)
        trained_on = registry.version_tags(m, version).get("lakefs_commit", "")
        if not commit_on_main(lakefs, trained_on):
            return True, (f"; v{version} NOT promoted: its training-set commit {trained_on[:12] or '?'} is not on "
                          f"{lakefs.main_branch} of {lakefs.repository}")
        done = registry.promote_published(m, _audit(audit), version, decision, run.run_id, commit,
                                          actor="platform:publish")
    except Exception as exc:  # noqa: BLE001 - kept for a retry: the branch stays until the move is done
        return False, (f"; aliases not moved yet ({type(exc).__name__}: {registry._redact(str(exc))[:300]}); "
                       f"retried by the next publish")
    return True, f"; {done}{_compile_for_serving(m, version)}"


def _compile_for_serving(mlflow: MLflowResource, version: str) -> str:
    """The promoted version's compiled form, stored beside it for the model server: never fails the publish,
    never holds the publish sensor's tick more than 30 s (the server compiles on its first load otherwise)."""
    from mlplatform.serving.models import compile_at_promotion

    return f"; {compile_at_promotion(mlflow, version, wait_seconds=30.0, log=dg.get_dagster_logger())}"


def publish_run(instance: dg.DagsterInstance, lakefs: LakeFSResource, run_id: str,
                mlflow: MLflowResource | None = None, audit: AuditTrail | None = None) -> PublishOutcome:
    """Merge `run-<run_id>` into main if the run is SUCCESS with no failed blocking check; else keep it.
    Then apply the run's gate decision (aliases move only once its data is on main)."""
    branch = run_branch(run_id)
    run = instance.get_run_by_id(run_id)
    if run is None:
        return PublishOutcome(run_id, "missing", f"no Dagster run {run_id} in this instance")
    if run.tags.get(PUBLISHED_TAG):
        commit = run.tags[PUBLISHED_TAG]
        settled, promo = promote_run(instance, lakefs, run, commit, mlflow, audit)
        if settled and lakefs.branch_exists(branch):
            lakefs.delete_branch(branch)
        return PublishOutcome(run_id, "published", "already published" + promo, commit,
                              promotion_pending=not settled)
    if not lakefs.branch_exists(branch):
        return PublishOutcome(run_id, "missing", f"run {run_id} wrote nothing to lakeFS (no branch {branch})")
    if run.status in ACTIVE:
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
    settled, promo = promote_run(instance, lakefs, run, commit, mlflow, audit)
    if settled:  # else the branch marks the run for the next publish to finish the alias moves
        lakefs.delete_branch(branch)
    return PublishOutcome(run_id, "published", f"merged {branch} into {lakefs.main_branch}" + promo, commit,
                          promotion_pending=not settled)


def publish_pending(instance: dg.DagsterInstance, lakefs: LakeFSResource, mlflow: MLflowResource | None = None,
                    audit: AuditTrail | None = None) -> list[PublishOutcome]:
    """Publish every finished run whose branch still exists (idempotent)."""
    out = []
    for info in lakefs.branches(prefix="run-"):
        run = instance.get_run_by_id(info.run_id) if info.run_id else None
        if run is not None and run.tags.get(KEPT_TAG):
            continue
        out.append(publish_run(instance, lakefs, info.run_id or "", mlflow, audit))
    return out


@dataclass
class PruneOutcome:
    pruned: list[str]
    kept: dict[str, str]  # branch -> why it is kept


def prune_branches(instance: dg.DagsterInstance, lakefs: LakeFSResource, older_than_days: float,
                   dry_run: bool = True) -> PruneOutcome:
    """Delete kept branches of failed or canceled runs that ended more than `older_than_days` ago.

    Never touches the branch of a queued, starting, running, successful (awaiting publication) or unknown run
    (a branch with no Dagster run in this instance may belong to another instance: it is kept and named)."""
    cutoff = dt.datetime.now(dt.timezone.utc).timestamp() - older_than_days * 86400
    pruned, kept = [], {}
    for info in lakefs.branches(prefix="run-"):
        run = instance.get_run_by_id(info.run_id) if info.run_id else None
        if run is None:
            kept[info.name] = "unknown run: no Dagster run with this id in this instance"
            continue
        if run.status in ACTIVE:
            kept[info.name] = f"run is {run.status.value}"
            continue
        if run.status == dg.DagsterRunStatus.SUCCESS and not run.tags.get(KEPT_TAG):
            kept[info.name] = "successful run awaiting publication"
            continue
        retry = _retry_in_flight(instance, run)
        if retry:
            # A resumed retry branches from this run's branch and reads the outputs it does not rebuild.
            kept[info.name] = retry
            continue
        if run.status not in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED) \
                and not run.tags.get(KEPT_TAG):
            kept[info.name] = f"run is {run.status.value}"
            continue
        record = instance.get_run_record_by_id(info.run_id)
        ended = record.end_time if record and record.end_time else None
        if ended is None or ended > cutoff:
            kept[info.name] = ("run has no end time" if ended is None
                               else f"ended less than {older_than_days:g} day(s) ago")
            continue
        pruned.append(info.name)
        if not dry_run:
            lakefs.delete_branch(info.name)
    return PruneOutcome(pruned, kept)


def _retry_in_flight(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str:
    """Why a failed run's branch is still needed by a retry ('' when it is not)."""
    if run.tags.get("dagster/will_retry") == "true":
        return "Dagster will retry this run (its retry resumes from this branch)"
    root = run.root_run_id or run.run_id
    group = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/root_run_id": root}))
    active = [r.run_id for r in group if r.status in ACTIVE]
    if active:
        return f"a retry of this run is {len(active)} run(s) in progress ({active[0]})"
    return ""


def open_run_branch(instance: dg.DagsterInstance | None, lakefs: LakeFSResource, run_id: str) -> str:
    """The run's branch; made from a main that first receives every finished, passing run (so a run
    that starts before the publish sensor's next tick still sees its predecessors' data)."""
    branch = run_branch(run_id)
    if not lakefs.branch_exists(branch):
        if instance is not None:
            publish_pending(instance, lakefs)
        lakefs.ensure_branch(branch)
    return branch
