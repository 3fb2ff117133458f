"""Alert sensors: they read (a failed run, Dagster's event log, freshness states, the audit trail) and hand
alerts to the outbox (mlplatform.alerts), which de-duplicates, rate-limits and delivers them to the webhooks.
A webhook that fails is retried on later ticks; nothing here fails a platform run.

Per data set (`<data set>__alert_on_run_failure`, `<data set>__alert_on_platform_events`): each alerts its own
spec's webhooks about its own runs, assets and model. A failed run that belongs to no data set (another code
location's, or an ad-hoc run of no asset) is alerted by the first live data set's sensor (`catch_all`)."""

from __future__ import annotations

import json

import dagster as dg

from resources.lakefs import LakeFSResource, run_branch
from resources.mlflow import MLflowResource
from resources.naming import dataset_of_run, local_name, ns
from resources.publish import MODEL_VERSION_TAG, PUBLISHED_TAG
from mlplatform.alerts import Alert, AlertSettings, Outbox
from mlplatform.spec import DatasetSpec

# Audit actions that alert, and their kind.
AUDIT_KINDS = {"promoted": "promotion", "rolled_back": "rollback", "retrain_triggered": "retrain"}
MONITORS = {"drift_report": "drift", "performance_estimate": "estimate"}


def _value(meta: dict, key: str, default=None):
    v = meta.get(key)
    return default if v is None else getattr(v, "value", v)


def failed_blocking_checks(instance: dg.DagsterInstance, run_id: str) -> list:
    """The run's check evaluations that failed, blocking, with severity ERROR (the ones that stop a publish)."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
    evaluations = [r.event_log_entry.dagster_event.event_specific_data for r in records]
    return [e for e in evaluations if not e.passed and e.blocking and e.severity == dg.AssetCheckSeverity.ERROR]


def _deliver(context, outbox: Outbox, alerts: list[Alert]) -> str:
    statuses, deliveries = outbox.send(alerts)
    for key, status in statuses.items():
        context.log.info(f"alert {key}: {status}")
    for d in deliveries:
        (context.log.info if d.ok else context.log.warning)(
            f"alert {d.key} -> {d.webhook}: {'delivered' if d.ok else 'failed, retried later: ' + d.error}")
    return f"{len(alerts)} alert(s) {sorted(set(statuses.values()))}; {sum(d.ok for d in deliveries)} delivered, " \
           f"{sum(not d.ok for d in deliveries)} failed (retried later)"


def _safe(fn, default=None):
    """A link is best effort: lakeFS or MLflow being down must not stop an alert."""
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return default


def run_commit_url(lakefs: LakeFSResource, run: dg.DagsterRun | None, run_id: str) -> str | None:
    """The run's lakeFS commit: published on main, else the head of its kept run branch."""
    if run is not None and run.tags.get(PUBLISHED_TAG):
        return lakefs.commit_url(run.tags[PUBLISHED_TAG])

    def head():
        branch = run_branch(run_id)
        return lakefs.commit_url(lakefs.head(branch)) if lakefs.branch_exists(branch) else None

    return _safe(head)


def build_alert_sensors(spec: DatasetSpec, catch_all: bool = True) -> list:
    n = ns(spec)

    def settings() -> AlertSettings:
        return AlertSettings.from_spec(spec)

    # Every run of the instance: also runs launched from the CLI (`dagster asset materialize`, `make demo`) or
    # from another code location, which a run status sensor would otherwise not see.
    @dg.run_failure_sensor(name=n.sensor("alert_on_run_failure"), minimum_interval_seconds=5, monitor_all_code_locations=True,
                           default_status=dg.DefaultSensorStatus.RUNNING,
                           description="Alerts the webhooks (alerts: in the spec, MLP_ALERT_WEBHOOKS) that a run "
                                       "failed, and which of its blocking checks failed, with links to the run, its "
                                       "lakeFS commit and its model version.")
    def alert_on_run_failure(context: dg.RunFailureSensorContext, lakefs: LakeFSResource, mlflow: MLflowResource):
        run = context.dagster_run
        owner = dataset_of_run(run)
        if owner != spec.name and not (owner is None and catch_all):
            return  # another data set's run: its own sensor alerts its own webhooks
        mlflow = mlflow.scoped(spec)
        s = settings()
        version = run.tags.get(MODEL_VERSION_TAG)
        steps = sorted({e.step_key for e in _safe(lambda: context.get_step_failure_events(), []) if e.step_key})
        commit = run_commit_url(lakefs, run, run.run_id)
        message = (context.failure_event.message or "").strip() if context.failure_event else ""
        alert = Alert(
            kind="run_failure", key=f"run_failure:{run.run_id}", severity="error", dataset=spec.name,
            title=f"Run {run.run_id[:8]} of {run.job_name} failed",
            text=f"{message or 'the run failed'}" + (f"; failed steps: {', '.join(steps)}" if steps else ""),
            dagster_run_url=s.run_url(run.run_id), lakefs_commit_url=commit,
            mlflow_url=mlflow.model_version_url(version) if version else None,
            fields={"job": run.job_name, "run_id": run.run_id,
                    **({"partition": run.tags["dagster/partition"]} if run.tags.get("dagster/partition") else {}),
                    **({"failed_steps": ", ".join(steps)} if steps else {})})
        # A blocking check that fails (severity ERROR) fails its run: its alert is raised here, once per check.
        checks = [failed_check_alert(s, ev, run, commit) for ev in failed_blocking_checks(context.instance, run.run_id)]
        context.log.info(_deliver(context, Outbox(s), [alert, *checks]))

    @dg.sensor(name=n.sensor("alert_on_platform_events"), minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Alerts the webhooks on freshness FAIL, drift and estimated-performance alerts, "
                           "retrain requests, promotions and rollbacks; retries failed deliveries.")
    def alert_on_platform_events(context: dg.SensorEvaluationContext, lakefs: LakeFSResource,
                                 mlflow: MLflowResource):
        s = settings()
        mlflow = mlflow.scoped(spec)
        cur = json.loads(context.cursor) if context.cursor else {}
        alerts = [*_monitor_alerts(context.instance, s, mlflow, cur), *_freshness(context.instance, s, cur),
                  *_audit(s, lakefs, mlflow, cur)]
        summary = _deliver(context, Outbox(s), alerts)
        context.update_cursor(json.dumps(cur, sort_keys=True))
        return dg.SkipReason(summary)

    def failed_check_alert(s: AlertSettings, ev, run: dg.DagsterRun, commit: str | None) -> Alert:
        asset = ev.asset_key.to_user_string()
        partition = run.tags.get("dagster/partition") or ""
        return Alert(
            kind="check_failure", key=f"check_failure:{run.run_id}:{asset}:{ev.check_name}", severity="error",
            dataset=spec.name, title=f"Blocking check {asset}:{ev.check_name} failed",
            text=(ev.description or "the check failed") + f"; run {run.run_id[:8]} is not published (main untouched)",
            dagster_run_url=s.run_url(run.run_id), lakefs_commit_url=commit,
            fields={"asset": asset, "check": ev.check_name, **({"partition": partition} if partition else {}),
                    "run_id": run.run_id})

    def _monitor_alerts(instance, s, mlflow, cur) -> list[Alert]:
        out = []
        for asset, kind in MONITORS.items():
            recs = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=n.key(asset), after_storage_id=cur.get(asset, 0)),
                limit=200, ascending=True).records
            for rec in recs:
                cur[asset] = max(cur.get(asset, 0), rec.storage_id)
                meta = rec.asset_materialization.metadata
                part = rec.partition_key or ""
                link = _value(meta, "lakefs_link")
                if kind == "drift":
                    count, mv = int(_value(meta, "n_alerts", 0) or 0), bool(_value(meta, "multivariate_alert", False))
                    if not count and not mv:
                        continue
                    feats = (_value(meta, "summary", {}) or {}).get("alerting_features", [])
                    alert = Alert(
                        kind="drift", key=f"drift:{part}:{rec.run_id}", severity="warning", dataset=spec.name,
                        title=f"Drift in batch {part}",
                        text=f"{count} drift alert(s) on {len(feats)} feature(s) {', '.join(map(str, feats[:10]))}"
                             + ("; multivariate reconstruction error alerts" if mv else ""),
                        dagster_run_url=s.run_url(rec.run_id) if rec.run_id else s.asset_url(n.key_str(asset)),
                        lakefs_commit_url=link,
                        fields={"partition": part, "drift_alerts": count, "multivariate_alert": mv})
                else:
                    if not _value(meta, "alert", False):
                        continue
                    metric = spec.estimated_metric
                    est = _value(meta, f"estimated_{metric}")
                    version = _value(meta, "champion_version")
                    alert = Alert(
                        kind="estimate", key=f"estimate:{part}:{rec.run_id}", severity="warning", dataset=spec.name,
                        title=f"Estimated {metric} alert in batch {part}",
                        text=f"estimated {metric} {est:.4f} of champion v{version} is outside NannyML's thresholds "
                             f"(champion test score {_value(meta, 'champion_test_score', float('nan')):.4f})",
                        dagster_run_url=s.run_url(rec.run_id) if rec.run_id else s.asset_url(n.key_str(asset)),
                        lakefs_commit_url=link, mlflow_url=mlflow.model_version_url(version) if version else None,
                        fields={"partition": part, f"estimated_{metric}": round(float(est), 4),
                                "champion_version": version})
                out.append(alert)
        return out

    def _freshness(instance, s, cur) -> list[Alert]:
        from dagster._core.definitions.freshness import FreshnessState

        if not spec.freshness:
            return []
        states = instance.get_freshness_state_records(n.keys(*spec.freshness))
        seen = cur.setdefault("freshness", {})
        out = []
        for key, rec in states.items():
            asset = key.to_user_string()
            state = rec.freshness_state.value
            if rec.freshness_state == FreshnessState.FAIL and seen.get(asset) != state:
                windows = spec.freshness[local_name(key)]
                last = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key), limit=1).records
                run_id = last[0].run_id if last else None
                out.append(Alert(
                    kind="freshness", key=f"freshness:{asset}:{rec.updated_at.timestamp():.0f}", severity="error",
                    dataset=spec.name, title=f"{asset} is stale (freshness FAIL)",
                    text=f"{asset} was not updated within its fail window of {windows.fail}"
                         + (f" (last materialized by run {run_id[:8]})" if run_id else " (never materialized)"),
                    dagster_run_url=s.run_url(run_id) if run_id else s.asset_url(asset),
                    lakefs_commit_url=_value(last[0].asset_materialization.metadata, "lakefs_link") if last else None,
                    fields={"asset": asset, "fail_window": str(windows.fail), "asset_page": s.asset_url(asset)}))
            seen[asset] = state
        return out

    def _audit(s, lakefs, mlflow, cur) -> list[Alert]:
        from mlplatform.audit import AuditTrail

        out = []
        for e in AuditTrail().history(mlflow.model_name):
            if e.seq <= cur.get("audit", 0):
                continue
            cur["audit"] = e.seq
            kind = AUDIT_KINDS.get(e.action)
            if kind is None:
                continue
            ev = e.evidence
            run_id = ev.get("rollback_run_id") or ev.get("dagster_run_id")
            commit = ev.get("published_commit")
            if kind == "promotion":
                title = f"Model v{e.version} promoted to champion"
            elif kind == "rollback":
                title = f"Champion rolled back from v{ev.get('from_version')} to v{e.version}"
            else:
                title = f"Retrain requested ({ev.get('trigger', 'trigger')})"
            out.append(Alert(
                kind=kind, key=f"audit:{mlflow.model_name}:{e.seq}", severity="warning" if kind == "rollback" else "info",
                dataset=spec.name, title=title, text=e.reason,
                dagster_run_url=s.run_url(run_id) if run_id else None,
                lakefs_commit_url=lakefs.commit_url(commit) if commit else None,
                mlflow_url=mlflow.model_version_url(e.version) if e.version else None,
                fields={"actor": e.actor, "audit_seq": e.seq, **({"model_version": e.version} if e.version else {})}))
        return out

    return [alert_on_run_failure, alert_on_platform_events]
