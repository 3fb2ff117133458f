"""Publish: merge a run's lakeFS branch into main when the run succeeded and every blocking check passed,
then apply the run's gate decision: model aliases move only once the data they were trained on is on main."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import dagster as dg

from mlplatform.audit import AuditTrail
from resources.lakefs import LakeFSError, LakeFSResource, MergeConflict, run_branch
from resources.partitions import RANGE_END_TAG, RANGE_START_TAG
from resources.mlflow import MLflowResource

PUBLISHED_TAG = "lakefs/published_commit"
KEPT_TAG = "lakefs/kept_branch"
# Written by the gate (evaluation_report) on its run: what to do with the model once the run is published.
GATE_TAG = "mlp/gate_decision"
MODEL_VERSION_TAG = "mlp/model_version"
MODEL_NAME_TAG = "mlp/model_name"
EXPERIMENT_TAG = "mlp/mlflow_experiment"
# A same-partition conflict: the run merged second is re-executed once from the new main (a new run carrying
# CONFLICT_RETRY_TAG and the conflicting run's id in CONFLICT_OF_TAG); a second conflict fails clearly.
CONFLICT_RETRY_TAG = "mlp/conflict_retry"
CONFLICT_OF_TAG = "mlp/conflict_of"
PARTITION_TAG = "dagster/partition"

ACTIVE = (dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
          dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING)


@dataclass
class PublishOutcome:
    run_id: str
    status: str  # published | kept | conflict | missing | pending
    detail: str
    commit: str | None = None
    promotion_pending: bool = False  # published, but the gate decision's alias moves must be retried
    conflicting_runs: tuple[str, ...] = ()  # conflict: the published runs that changed the same paths first


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
        others = conflicting_runs(lakefs, branch)
        partition = run.tags.get(PARTITION_TAG) or (
            f"{run.tags[RANGE_START_TAG]}...{run.tags[RANGE_END_TAG]}" if run.tags.get(RANGE_START_TAG) else None)
        where = f" of partition {partition!r}" if partition else ""
        detail = f"run {run_id}{where} conflicts with published run(s) {list(others) or ['?']}: {exc}"
        if run.tags.get(CONFLICT_RETRY_TAG):
            detail += (f" It already re-executed conflicting run {run.tags.get(CONFLICT_OF_TAG, '?')} once from "
                       f"the new {lakefs.main_branch!r}; not retried again: launch {run.job_name}"
                       f"{f' [{partition}]' if partition else ''} by hand once the other writer is done.")
        return PublishOutcome(run_id, "conflict", detail, conflicting_runs=others)
    instance.add_run_tags(run_id, {PUBLISHED_TAG: commit})
    settled, promo = promote_run(instance, lakefs, run, commit, mlflow, audit)
    if settled:  # else the branch marks the run for the next publish to finish the alias moves
        lakefs.delete_branch(branch)
    return PublishOutcome(run_id, "published", f"merged {branch} into {lakefs.main_branch}" + promo, commit,
                          promotion_pending=not settled)


def conflicting_runs(lakefs: LakeFSResource, branch: str) -> tuple[str, ...]:
    """The Dagster runs whose published writes to main collide with `branch` (paths changed on both sides
    since the branch was made), read from the commit metadata of the last change of each path on main."""
    try:
        mine = set(lakefs.changed_paths(lakefs.main_branch, branch))
        theirs = set(lakefs.changed_paths(branch, lakefs.main_branch))
        found: list[str] = []
        for path in sorted(mine & theirs)[:10]:
            commit = lakefs.commit_of_object(lakefs.main_branch, path)
            rid = lakefs.commit_metadata(commit).get("dagster_run_id", "") if commit else ""
            if rid and rid not in found:
                found.append(rid)
        return tuple(found)
    except LakeFSError:  # naming the other writer is a courtesy; the conflict itself is already known
        return ()


def conflict_retry_request(run: dg.DagsterRun, outcome: PublishOutcome) -> dg.RunRequest | None:
    """The one re-execution of a run whose publication conflicted: a new run of the same job, partition,
    config and selection, branched from the new main. None when the run was already such a retry (a second
    conflict fails) or is not a job run a sensor can request."""
    if outcome.status != "conflict" or run.tags.get(CONFLICT_RETRY_TAG) or run.job_name.startswith("__"):
        return None
    keep = {k: v for k, v in run.tags.items() if not k.startswith(("dagster/", "lakefs/", ".dagster"))
            and k not in (KEPT_TAG, PUBLISHED_TAG, GATE_TAG, MODEL_VERSION_TAG, MODEL_NAME_TAG, EXPERIMENT_TAG,
                          "mlp/transient_failure")}
    keep.update({CONFLICT_RETRY_TAG: "1", CONFLICT_OF_TAG: run.run_id})
    # A ranged run (a burst) is re-executed over the same range.
    keep.update({k: run.tags[k] for k in (RANGE_START_TAG, RANGE_END_TAG) if run.tags.get(k)})
    return dg.RunRequest(run_key=f"conflict-retry-{run.run_id}", job_name=run.job_name,
                         partition_key=run.tags.get(PARTITION_TAG), run_config=dict(run.run_config or {}),
                         asset_selection=list(run.asset_selection) if run.asset_selection else None, tags=keep)


def publish_pending(instance: dg.DagsterInstance, lakefs: LakeFSResource, mlflow: MLflowResource | None = None,
                    audit: AuditTrail | None = None, min_age_seconds: float = 0.0) -> list[PublishOutcome]:
    """Publish every finished run whose branch still exists (idempotent); with `min_age_seconds`, only runs
    that ended at least that long ago (the sweep leaves fresh runs to the run-status sensor)."""
    import time

    out = []
    cutoff = time.time() - min_age_seconds
    for info in lakefs.branches(prefix="run-"):
        run = instance.get_run_by_id(info.run_id) if info.run_id else None
        if run is not None and run.tags.get(KEPT_TAG):
            continue
        if min_age_seconds and run is not None:
            record = instance.get_run_record_by_id(run.run_id)
            if record is None or record.end_time is None or record.end_time > cutoff:
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


# --- Publishing happens in exactly one place ---------------------------------------------------------------
# Only the publish sensor (sensors/publish.py, in the daemon) merges run branches into main; `mlp publish` is the
# operator's manual path through the same `publish_run`. A run never publishes another run. Instead, when a run
# opens its branch it first waits until every run that finished successfully before it was launched has been
# published (or kept: failed checks, a conflict), so that a follower run (scoring after ingestion, labels after
# records, a retrain after new labels) starts from a main that holds its predecessors' data. The wait is bounded:
# past `PUBLICATION_PATIENCE_SECONDS`, or at once when no sensor daemon is alive to publish anything, the run fails
# with PublicationPending naming the runs it waited for; the failure is marked transient, so Dagster's run
# retries re-execute it later (the daemon case), and an in-process caller (a test, a script) learns that it must
# publish explicitly (`mlp publish`, tests/helpers.py materialize_and_publish).
PUBLICATION_PATIENCE_SECONDS = 180.0
# A daemon whose last heartbeat is older than this is taken for dead (Dagster's daemons beat every 30 s).
DAEMON_HEARTBEAT_TOLERANCE_SECONDS = 120.0


class PublicationPending(LakeFSError):
    """A run cannot open its branch yet: finished runs it may depend on are not published."""


def unpublished_successes(instance: dg.DagsterInstance, lakefs: LakeFSResource, run_id: str) -> list[str]:
    """Ids of the runs `run_id` may depend on that still await publication: they succeeded, and ended before
    `run_id` was created (a run launched before another finished cannot have been requested because of it:
    runs launched together, e.g. twelve batches landing at once, never wait for each other), and their branch
    exists, neither published nor kept."""
    import time

    record = instance.get_run_record_by_id(run_id)
    created = record.create_timestamp.timestamp() if record is not None else time.time()
    out = []
    for info in lakefs.branches(prefix="run-"):
        if not info.run_id or info.run_id == run_id:
            continue
        run = instance.get_run_by_id(info.run_id)
        if run is None or run.status != dg.DagsterRunStatus.SUCCESS:
            continue
        if run.tags.get(PUBLISHED_TAG) or run.tags.get(KEPT_TAG):
            continue
        other = instance.get_run_record_by_id(info.run_id)
        if other is None or other.end_time is None or other.end_time > created:
            continue
        out.append(info.run_id)
    return sorted(out)


def publisher_alive(instance: dg.DagsterInstance) -> bool:
    """Is a sensor daemon (which runs the publish sensor) beating on this instance?"""
    import time

    try:
        beats = instance.get_daemon_heartbeats()
    except Exception:  # noqa: BLE001 - an instance without daemon storage has no publisher
        return False
    beat = beats.get("SENSOR")
    return beat is not None and time.time() - beat.timestamp < DAEMON_HEARTBEAT_TOLERANCE_SECONDS


def await_publication(instance: dg.DagsterInstance, lakefs: LakeFSResource, run_id: str,
                      patience_seconds: float | None = None, poll_seconds: float = 1.0, log=None) -> None:
    """Return once every run that succeeded before `run_id` was launched is published or kept; raise
    PublicationPending (marked transient for Dagster's run retries) when they are not after `patience_seconds`,
    or at once when no sensor daemon is alive to publish them."""
    import time

    patience = PUBLICATION_PATIENCE_SECONDS if patience_seconds is None else patience_seconds
    pending = unpublished_successes(instance, lakefs, run_id)
    if not pending:
        return
    start = time.monotonic()
    alive = publisher_alive(instance)
    if log is not None and alive:
        log.info(f"waiting up to {patience:.0f}s for the publish sensor to publish run(s) {pending} before "
                 f"branching from {lakefs.main_branch}")
    while alive and time.monotonic() - start < patience:
        time.sleep(poll_seconds)
        pending = [r for r in pending if _awaits_publication(instance, lakefs, r)]
        if not pending:
            return
    waited = time.monotonic() - start
    why = (f"still unpublished after {waited:.0f}s (PUBLICATION_PATIENCE_SECONDS={patience:.0f})" if alive else
           "and no sensor daemon is running on this Dagster instance to publish them (the publish sensor "
           "`publish_successful_runs` runs in `dagster-daemon`)")
    message = (f"run {run_id} cannot open its lakeFS branch {run_branch(run_id)!r} in repository "
               f"{lakefs.repository!r}: run(s) {pending} finished successfully before it but are not on "
               f"{lakefs.main_branch!r} yet, {why}. Publish them (`mlp publish`), then re-execute; the run is "
               f"marked for an automatic retry.")
    from resources.io import mark_transient_failure

    if instance.get_run_by_id(run_id) is not None:
        mark_transient_failure(instance, run_id, f"PublicationPending: waiting for {pending[:5]}")
    raise PublicationPending(message)


def _awaits_publication(instance: dg.DagsterInstance, lakefs: LakeFSResource, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    if run is None or run.tags.get(PUBLISHED_TAG) or run.tags.get(KEPT_TAG):
        return False
    return lakefs.branch_exists(run_branch(run_id))


def open_run_branch(instance: dg.DagsterInstance | None, lakefs: LakeFSResource, run_id: str,
                    patience_seconds: float | None = None, log=None, wait: bool = True) -> str:
    """The run's branch, made once (idempotent: a retried step finds it). A run resuming a failed one (Dagster's
    FROM_FAILURE retry) starts from the failed run's branch, which holds the outputs it will not rebuild; any other
    run starts from main once every run that succeeded before it is published (see `await_publication`; no wait
    without an instance or with `wait=False`). Never publishes anything itself. Every writer of a run's outputs
    (the I/O manager, and steps writing lakeFS themselves, e.g. ranged runs) opens its branch here."""
    branch = run_branch(run_id)
    if not lakefs.branch_exists(branch):
        source = resumed_source(instance, lakefs, run_id) if instance is not None else None
        if source is not None:
            lakefs.ensure_branch(branch, source=source)
            return branch
        if instance is not None and wait:
            await_publication(instance, lakefs, run_id, patience_seconds, log=log)
        lakefs.ensure_branch(branch)
    return branch


def resumed_source(instance: dg.DagsterInstance, lakefs: LakeFSResource, run_id: str) -> str | None:
    """For a run resuming a failed one: the branch of the nearest run it resumes that has one (a retry that itself
    failed before writing anything has none; its own parent's branch holds the outputs). None for any other run.
    An ancestor that did write outputs but whose branch is gone is an error: branching from main would silently
    drop them. The ancestors' branches are left as they were, for inspection."""
    from resources.io import is_resumed, resumed_lineage

    if not is_resumed(instance.get_run_by_id(run_id)):
        return None
    for ancestor in resumed_lineage(instance, run_id)[1:]:
        if lakefs.branch_exists(run_branch(ancestor)):
            return run_branch(ancestor)
        if instance.get_records_for_run(ancestor, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION,
                                        limit=1).records:
            raise LakeFSError(
                f"run {run_id} resumes run {ancestor}, whose branch {run_branch(ancestor)!r} (holding the "
                f"outputs this run skips) is gone from lakeFS repository {lakefs.repository!r} at "
                f"{lakefs.endpoint}: re-execute the whole job instead of resuming from the failure")
    return None
