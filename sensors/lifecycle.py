"""Lifecycle automation: arrivals, retraining triggers (schedule, volume, drift, estimated performance)
and automated rollback. Sensors only read (Dagster's event log, the registry's aliases) and request runs
with deterministic run keys; every write (audit entries, alias moves) happens in those runs.

Per data set: `build_lifecycle(spec)` makes that data set's jobs, sensors and schedule (`<data set>__retrain`,
`<data set>__retrain_on_evidence`, ...); its sensors read only its own assets (`[<data set>, ...]` keys) and its
own registered model (`<data set>-model`), and request only its own jobs, so one data set's batch never
triggers another's runs."""

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dagster as dg

from sensors.arrivals import build_arrivals
from resources.audit import AuditResource
from resources.mlflow import MLflowResource
from resources.naming import Namespace, ns
from resources.partitions import WITHHELD
from mlplatform.spec import DatasetSpec

# The history's dbt models (unpartitioned) are rebuilt with each training; the batches' features are built per
# partition as they arrive (sensors/arrivals.py) and only read here.
RETRAIN_ASSETS = ["stg_reference_records", "stg_reference_labels", "reference_features", "labelled_examples", "training_set", "candidate_model",
                  "evaluation_report", "model_card"]


@dataclass
class Trigger:
    name: str            # schedule | volume | drift | performance
    reason: str
    evidence: dict = field(default_factory=dict)
    event_id: int = 0    # storage id of the evidence: each event fires once


def latest_materializations(instance: dg.DagsterInstance, key: str | dg.AssetKey, limit: int = 1):
    key = key if isinstance(key, dg.AssetKey) else dg.AssetKey.from_user_string(key)
    return instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=limit).records


def _checked(instance: dg.DagsterInstance, key: str | dg.AssetKey, limit: int = 1):
    """The newest materializations of `key` that count as evidence: from SUCCESS runs (a failed run's
    output never passed its checks) or reported from outside a run. Newest first."""
    records = latest_materializations(instance, key, limit=limit)
    run_ids = sorted({r.run_id for r in records if r.run_id})
    ok = set()
    if run_ids:
        ok = {r.run_id for r in instance.get_runs(filters=dg.RunsFilter(run_ids=run_ids,
                                                                        statuses=[dg.DagsterRunStatus.SUCCESS]))}
    # A partition a ranged run withheld has a materialization but nothing published: not evidence.
    return [r for r in records if (not r.run_id or r.run_id in ok) and WITHHELD not in r.asset_materialization.metadata]


EVIDENCE_LIMIT = 40  # materializations read per tick: more than a ranged run publishes at once (31)


def new_evidence(records: list, seen_id: int, trained_at: float) -> list:
    """The newest run's records (newest first; several when that run was a burst over many partitions), if made
    since the trigger last looked (`seen_id`) and after the current model. An older run's report is superseded by
    the newer batch's, as it always was for batches one by one."""
    fresh = [r for r in records if r.storage_id > seen_id and r.timestamp > trained_at]
    return [r for r in fresh if r.run_id == fresh[0].run_id] if fresh else []


def meta_value(meta: dict, key: str, default=None):
    v = meta.get(key)
    return default if v is None else getattr(v, "value", v)


def evaluate_triggers(instance: dg.DagsterInstance, spec: DatasetSpec, seen: dict) -> list[Trigger]:
    """Which retraining triggers have new evidence since `seen` (storage ids per trigger)."""
    auto = spec.automation
    n = ns(spec)
    fired: list[Trigger] = []
    # Since the last model a successful run produced: a failed retrain must not hide the evidence.
    last_model = _checked(instance, n.key("candidate_model"), limit=20)
    trained_at = last_model[0].timestamp if last_model else 0.0

    vol = auto.volume
    if vol.enabled:
        per_partition = {}  # partition -> its latest checked materialization: each partition's rows count once
        for r in _checked(instance, n.key("raw_labels"), limit=500):
            per_partition.setdefault(r.partition_key, r)
        new = [r for r in per_partition.values() if r.timestamp > trained_at]
        rows = sum(int(meta_value(r.asset_materialization.metadata, "rows", 0)) for r in new)
        ts = _checked(instance, n.key("training_set"), limit=5)
        base = int(meta_value(ts[0].asset_materialization.metadata, "rows_train", 0)) if ts else 0
        frac = rows / base if base else float("inf")
        top = max((r.storage_id for r in new), default=0)
        if new and top > seen.get("volume", 0) and (
                (vol.min_new_labelled_rows is not None and rows >= vol.min_new_labelled_rows)
                or (vol.min_fraction is not None and frac >= vol.min_fraction)):
            fired.append(Trigger("volume", f"{rows} labelled rows arrived since the last training "
                                           f"({frac:.0%} of its {base} training rows)",
                                 {"new_labelled_rows": rows, "fraction": round(frac, 4),
                                  "partitions": sorted({r.partition_key for r in new if r.partition_key})}, top))

    drift = auto.drift
    if drift.enabled:
        # Every report of the newest run counts (a burst publishes many at once); the first alerting one fires.
        recs = new_evidence(_checked(instance, n.key("drift_report"), limit=EVIDENCE_LIMIT), seen.get("drift", 0),
                            trained_at)
        for rec in recs:
            summary = meta_value(rec.asset_materialization.metadata, "summary", {}) or {}
            method = drift.method
            by_feature = summary.get("alerts_by_feature", {})
            feats = sorted(f for f, ms in by_feature.items() if not method or method in ms)
            mv = bool(summary.get("multivariate", {}).get("alert"))
            if len(feats) >= drift.min_alerting_features or (mv and drift.on_multivariate_alert):
                fired.append(Trigger("drift", f"{len(feats)} feature(s) drift by {method or 'any method'}"
                                              f"{' and a multivariate alert' if mv else ''} in batch "
                                              f"{rec.partition_key}",
                                     {"features": feats, "multivariate_alert": mv, "partition": rec.partition_key},
                                     recs[0].storage_id))
                break

    perf = auto.performance
    if perf.enabled:
        recs = new_evidence(_checked(instance, n.key("performance_estimate"), limit=EVIDENCE_LIMIT),
                            seen.get("performance", 0), trained_at)
        for rec in recs:
            meta = rec.asset_materialization.metadata
            metric = spec.estimated_metric
            est = float(meta_value(meta, f"estimated_{metric}", float("nan")))
            champ = float(meta_value(meta, "champion_test_score", float("nan")))
            higher = spec.higher_is_better
            below_floor = est < perf.floor if higher else est > perf.floor
            margin = perf.margin_below_champion_test
            below_champ = margin is not None and ((est < champ - margin) if higher else (est > champ + margin))
            if below_floor or below_champ:
                fired.append(Trigger("performance", f"estimated {metric} {est:.4f} in batch {rec.partition_key} "
                                     + ("is below the floor " + str(perf.floor) if below_floor else
                                        f"is below the champion's test score {champ:.4f} by more than {margin}"),
                                     {"estimated": est, "champion_test_score": champ,
                                      "partition": rec.partition_key}, recs[0].storage_id))
                break
    return fired


def retrain_run_key(fired: list[Trigger]) -> str:
    """Deterministic: the same evidence (trigger names and their event storage ids) gives the same key."""
    return "retrain-" + "-".join(f"{t.name}{t.event_id}" for t in sorted(fired, key=lambda t: t.name))


class RollbackConfig(dg.Config):
    expected_champion: str  # roll back only if this version is still the champion
    reason: str
    partition: str = ""
    evidence_run_id: str = ""
    evidence_storage_id: int = 0
    champion_score: float = float("nan")
    previous_score: float = float("nan")
    requested_by: str = "sensor:rollback_on_regression"


def roll_back(context: dg.OpExecutionContext, config: RollbackConfig, mlflow: MLflowResource,
              audit: AuditResource) -> None:
    """Move `champion` back to `previous` of `mlflow`'s model (scoped to the data set by the caller)."""
    from mlplatform import registry

    current = registry.aliases(mlflow)
    if current.get(registry.CHAMPION) != config.expected_champion:
        context.log.info(f"the champion is v{current.get(registry.CHAMPION)}, not v{config.expected_champion}: "
                         f"already rolled back or replaced since the evidence; nothing to do")
        return
    frm, to = registry.rollback(
        mlflow, audit.trail(), config.reason, actor=config.requested_by, expected_champion=config.expected_champion,
        evidence={"partition": config.partition, "dagster_run_id": config.evidence_run_id,
                  "evidence_storage_id": config.evidence_storage_id, "champion_score": config.champion_score,
                  "previous_score": config.previous_score, "rollback_run_id": context.run_id})
    context.log.info(f"rolled back champion v{frm} -> v{to}")


def rollback_job(spec: DatasetSpec) -> dg.JobDefinition:
    """`<data set>__rollback_champion`: its one op, `<data set>__roll_back_champion`, acts on the data set's model."""
    n = ns(spec)

    @dg.op(name=n.job("roll_back_champion"),
           description=f"Move `champion` of {spec.name}-model back to `previous` (audit intent, alias moves, "
                       f"outcome), if the evidence's champion is still the champion.")
    def roll_back_champion(context: dg.OpExecutionContext, config: RollbackConfig, mlflow: MLflowResource,
                           audit: AuditResource) -> None:
        roll_back(context, config, mlflow.scoped(spec), audit)

    @dg.job(name=n.job("rollback_champion"), tags=n.tags,
            description=f"Roll the champion of {spec.name}-model back to the previous version (requested by "
                        f"rollback_on_regression or by hand).")
    def rollback_champion():
        roll_back_champion()

    return rollback_champion


class ExperimentApprovalConfig(dg.Config):
    version: str  # approve only if this version is still the one awaiting approval
    reason: str
    partition: str = ""
    evidence_run_id: str = ""
    evidence_storage_id: int = 0


def approve_on_evidence(context: dg.OpExecutionContext, config: ExperimentApprovalConfig, mlflow: MLflowResource,
                        audit: AuditResource):
    """Approve the version awaiting approval of `mlflow`'s model (scoped to the data set by the caller)."""
    from mlplatform import registry

    current = registry.aliases(mlflow)
    if current.get(registry.AWAITING) != config.version:
        context.log.info(f"v{config.version} no longer awaits approval (aliases {current}): nothing to do")
        return
    registry.approve(mlflow, audit.trail(), config.version, approver="", reason=config.reason,
                     evidence={"partition": config.partition, "dagster_run_id": config.evidence_run_id,
                               "evidence_storage_id": config.evidence_storage_id, "approval_run_id": context.run_id},
                     actor="sensor:online_experiment_gate")
    context.log.info(f"approved v{config.version}: {config.reason}")


def approval_job(spec: DatasetSpec) -> dg.JobDefinition:
    """`<data set>__approve_from_experiment`, with its one op `<data set>__approve_on_experiment`."""
    n = ns(spec)

    @dg.op(name=n.job("approve_on_experiment"),
           description=f"Approve the {spec.name}-model version awaiting approval on the evidence of the online "
                       f"experiment (audit intent, alias moves, outcome), if it is still the one awaiting approval.")
    def approve_on_experiment(context: dg.OpExecutionContext, config: ExperimentApprovalConfig,
                              mlflow: MLflowResource, audit: AuditResource):
        approve_on_evidence(context, config, mlflow.scoped(spec), audit)

    @dg.job(name=n.job("approve_from_experiment"), tags=n.tags,
            description=f"Promote the {spec.name}-model version awaiting approval once the online experiment shows "
                        f"it better (requested by online_experiment_gate).")
    def approve_from_experiment():
        approve_on_experiment()

    return approve_from_experiment


def online_gate_decision(instance: dg.DagsterInstance, recs: list, awaiting: str | None, after: int,
                         dataset: Namespace | str):
    """(request or None, skip reason, cursor): the newest published one of `recs` (online_experiment_report
    materializations after storage id `after`, at least one) judged for the version awaiting approval with
    mlplatform.serving.experiment.gate_verdict."""
    import polars as pl

    from mlplatform.serving.experiment import gate_verdict
    from resources.publish import PUBLISHED_TAG

    rec = max(recs, key=lambda r: r.storage_id)
    run = instance.get_run_by_id(rec.run_id) if rec.run_id else None
    if run is not None and PUBLISHED_TAG not in run.tags:  # judged on published data only; asked again later
        return None, f"online_experiment_report of run {rec.run_id} is not on main yet", after
    if not awaiting:
        return None, "no version awaits approval", rec.storage_id
    rows = meta_value(rec.asset_materialization.metadata, "comparisons") or []
    ok, why = gate_verdict(pl.DataFrame(rows) if rows else pl.DataFrame({"model_version": [], "verdict": []},
                                                                         schema={"model_version": pl.String,
                                                                                 "verdict": pl.String}), awaiting)
    if not ok:
        return None, f"v{awaiting} stays awaiting approval: {why}", rec.storage_id
    partition = rec.asset_materialization.partition or ""
    n = ns(dataset)
    return dg.RunRequest(run_key=f"online-approval-{awaiting}-{rec.storage_id}",
                         job_name=n.job("approve_from_experiment"),
                         run_config={"ops": {n.job("approve_on_experiment"): {"config": {
                             "version": awaiting, "reason": f"online experiment [{partition}]: {why}"[:2000],
                             "partition": partition, "evidence_run_id": rec.run_id or "",
                             "evidence_storage_id": rec.storage_id}}}},
                         tags={**n.tags, "approval/version": awaiting,
                               "approval/evidence_storage_id": str(rec.storage_id)}), \
        "", rec.storage_id


def build_lifecycle(spec: DatasetSpec) -> dict:
    arrivals = build_arrivals(spec)
    n = ns(spec)
    retrain_job = dg.define_asset_job(n.job("retrain"), selection=n.keys(*RETRAIN_ASSETS), tags=n.tags,
                                      description=f"Rebuild {spec.name}'s history features and training set, train, "
                                                  f"evaluate, gate.")
    rollback_champion = rollback_job(spec)
    approve_from_experiment = approval_job(spec)
    auto = spec.automation

    @dg.sensor(name=n.sensor("retrain_on_evidence"), job=retrain_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
               description="Retrain when labelled volume, drift or estimated performance says so (once per event, "
                           "one run per storm, a minimum interval between retrains). Only requests the run; the "
                           "run writes the audit entry.")
    def retrain_on_evidence(context: dg.SensorEvaluationContext):
        state = json.loads(context.cursor) if context.cursor else {"seen": {}, "last_fired": 0.0}
        fired = evaluate_triggers(context.instance, spec, state["seen"])
        if not fired:
            return dg.SkipReason("no trigger has new evidence")
        min_gap = auto.min_minutes_between_retrains * 60
        now = time.time()
        if now - state["last_fired"] < min_gap:
            # The evidence is held, not consumed: the cursor only moves past evidence handed to a run, so it
            # fires once the interval has passed (unless a newer model makes it stale first).
            return dg.SkipReason(f"triggers {[t.name for t in fired]} fired, but the last retrain was "
                                 f"{(now - state['last_fired']) / 60:.0f} min ago (minimum {min_gap / 60:.0f} min)")
        for t in fired:  # consumed now that a run carries it
            state["seen"][t.name] = max(state["seen"].get(t.name, 0), t.event_id)
        state["last_fired"] = now
        context.update_cursor(json.dumps(state))
        evidence = {t.name: {"reason": t.reason, "event_storage_id": t.event_id, **t.evidence} for t in fired}
        return dg.RunRequest(run_key=retrain_run_key(fired), tags={
            "retrain/trigger": "+".join(t.name for t in fired),
            "retrain/reason": "; ".join(t.reason for t in fired)[:1000],
            "retrain/evidence": json.dumps(evidence, default=str)[:4000]})

    @dg.sensor(name=n.sensor("rollback_on_regression"), job=rollback_champion, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
               description="Request a rollback run when the champion does worse than the previous champion on the "
                           "same rows (the sensor reads; the rollback_champion job acts).")
    def rollback_on_regression(context: dg.SensorEvaluationContext, mlflow: MLflowResource):
        rb = auto.rollback
        if not rb.enabled:
            return dg.SkipReason("automated rollback is switched off")
        seen = int(context.cursor or 0)
        recs = [r for r in _checked(context.instance, n.key("realized_performance"), limit=5) if r.storage_id > seen]
        if not recs:
            return dg.SkipReason("no new realized performance")
        metric = spec.estimated_metric
        from mlplatform import registry

        al = None
        for rec in sorted(recs, key=lambda r: r.storage_id):
            meta = rec.asset_materialization.metadata
            cur, prev = meta_value(meta, f"realized_{metric}"), meta_value(meta, f"previous_{metric}")
            if cur is None or prev is None:
                continue
            worse = (prev - cur) if spec.higher_is_better else (cur - prev)
            if worse > rb.margin:
                al = al if al is not None else registry.aliases(mlflow.scoped(spec))  # a read; fails closed
                champ = al.get(registry.CHAMPION)
                if champ != str(meta_value(meta, "model_version")) or not al.get(registry.PREVIOUS):
                    continue  # the champion changed since (or nothing to go back to): evidence about another state
                context.update_cursor(str(max(r.storage_id for r in recs)))
                reason = (f"realized {metric} of champion v{champ} is {cur:.4f} vs {prev:.4f} for v"
                          f"{al.get(registry.PREVIOUS)} on batch {rec.partition_key} (margin {rb.margin})")
                return dg.RunRequest(
                    run_key=f"rollback-{champ}-{rec.storage_id}",
                    run_config={"ops": {n.job("roll_back_champion"): {"config": {
                        "expected_champion": champ, "reason": reason, "partition": rec.partition_key or "",
                        "evidence_run_id": rec.run_id or "", "evidence_storage_id": rec.storage_id,
                        "champion_score": float(cur), "previous_score": float(prev),
                        "requested_by": "sensor:rollback_on_regression"}}}},
                    tags={"rollback/from_version": champ, "rollback/evidence_storage_id": str(rec.storage_id)})
        context.update_cursor(str(max(r.storage_id for r in recs)))
        return dg.SkipReason("champion is not worse than the previous champion")

    @dg.sensor(name=n.sensor("online_experiment_gate"), job=approve_from_experiment, minimum_interval_seconds=60,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="The online gate (serving.experiment_gate): request the approval of the version awaiting "
                           "approval when a published online_experiment_report shows it better than the champion "
                           "and nowhere worse (the sensor reads; the approve_from_experiment job acts).")
    def online_experiment_gate(context: dg.SensorEvaluationContext, mlflow: MLflowResource):
        if not spec.serving.experiment_gate:
            return dg.SkipReason("the online gate is switched off (serving.experiment_gate)")
        from mlplatform import registry

        after = int(context.cursor or 0)
        recs = [r for r in _checked(context.instance, n.key("online_experiment_report"), limit=5)
                if r.storage_id > after]
        if not recs:
            return dg.SkipReason("no new online experiment report")
        # a read (only with a new report); fails closed
        awaiting = registry.aliases(mlflow.scoped(spec)).get(registry.AWAITING)
        request, why, cursor = online_gate_decision(context.instance, recs, awaiting, after, n)
        if cursor != after:
            context.update_cursor(str(cursor))
        return request if request is not None else dg.SkipReason(why)

    schedules = []
    if auto.retrain_schedule:
        schedules.append(dg.ScheduleDefinition(name=n.schedule("scheduled_retrain"), cron_schedule=auto.retrain_schedule,
                                               job=retrain_job, tags={**n.tags, "retrain/trigger": "schedule"},
                                               default_status=dg.DefaultScheduleStatus.RUNNING))
    return {"jobs": [*arrivals["jobs"], retrain_job, rollback_champion, approve_from_experiment],
            "sensors": [*arrivals["sensors"], retrain_on_evidence, rollback_on_regression, online_experiment_gate],
            "schedules": schedules}
