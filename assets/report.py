"""The model health report: one HTML page per model, refreshed after each batch's monitoring (drift report,
performance estimate, data quality), committed to lakeFS on the run branch beside the batch's other outputs.

This module only gathers the inputs (the stored monitoring outputs of the last `monitoring.drift_plot_batches`
batches, the landing results of raw_records, the registry's versions and aliases, the audit trail); the page is
built by mlplatform.report."""



import datetime as dt

import dagster as dg
from mlplatform.lazy import lazy_import
pl = lazy_import("polars")

from mlplatform import registry, report
from mlplatform.spec import LOWER_IS_BETTER, DatasetSpec
from assets.monitoring import previous_partitions
from resources.audit import AuditResource
from resources.io import deserialize, latest_checked_materialization
from resources.lakefs import LakeFSResource
from resources.mlflow import MLflowResource
from resources.naming import Namespace, ns
from resources.partitions import partitions_def

REPORT_FILE = "model_health.html"


def report_path(spec: DatasetSpec | str, partition: str) -> str:
    """Where a data set's health page of a batch lives in lakeFS: under `reports/<data set>/`."""
    name = spec if isinstance(spec, str) else spec.name
    return f"reports/{name}/model_health_report/partition={partition}/{REPORT_FILE}"


def _stored(context, lakefs: LakeFSResource, key: dg.AssetKey, partition: str):
    """A batch's checked output of `key` (from this run or a successful one), or None if there is none yet."""
    found = latest_checked_materialization(context.instance, key, partition, context.run_id)
    return deserialize(lakefs.get(found[0], found[1]), found[1]) if found else None


def _meta(meta: dict, key: str, default=None):
    v = meta.get(key)
    return default if v is None else getattr(v, "value", getattr(v, "text", v))


def _ingestion(instance: dg.DagsterInstance, n: Namespace, partition: str) -> dict | None:
    """What the landing recorded for a batch: rows, files accepted and quarantined (with their reasons)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=n.key("raw_records"), asset_partitions=[partition]), limit=1).records
    if not records or records[0].asset_materialization is None:
        return None
    meta = records[0].asset_materialization.metadata
    accepted = _meta(meta, "files_accepted", [])
    rejected = _meta(meta, "rejected")
    reasons = []
    for rec in (getattr(rejected, "records", None) or []):
        data = getattr(rec, "data", {})
        reasons.append(f"{data.get('file', '')}: {data.get('reason', '')}"[:200])
    return {"partition": partition, "rows": int(_meta(meta, "rows", 0) or 0),
            "files_accepted": len(accepted) if isinstance(accepted, list) else int(accepted or 0),
            "files_rejected": int(_meta(meta, "files_rejected", 0) or 0), "rejected_reasons": "; ".join(reasons)}


def gather(context, spec: DatasetSpec, lakefs: LakeFSResource, mlflow: MLflowResource,
           audit: AuditResource, window: list[str]) -> report.HealthData:
    n = ns(spec)
    mlflow = mlflow.scoped(spec)
    metric = spec.estimated_metric
    drift, perf, quality, ingestion = [], [], [], []
    method = "jensen_shannon" if "jensen_shannon" in spec.monitoring.drift_methods else \
        spec.monitoring.drift_methods[0]
    for p in window:
        d = _stored(context, lakefs, n.key("drift_report"), p)
        if d is not None and d.height:
            drift.append(d.select("feature", "method", pl.col("value").cast(pl.Float64),
                                  pl.col("upper_threshold").cast(pl.Float64), pl.col("alert").cast(pl.Boolean))
                         .with_columns(pl.lit(p).alias("partition")))
        est = _stored(context, lakefs, n.key("performance_estimate"), p)
        real = _stored(context, lakefs, n.key("realized_performance"), p)
        if est is not None and est.height:
            e = est.row(0, named=True)
            realized = real.row(0, named=True).get(f"realized_{metric}") if real is not None and real.height else None
            perf.append({"partition": p, "estimated": e.get("estimated"), "lower": e.get("lower"),
                         "upper": e.get("upper"), "lower_threshold": e.get("lower_threshold"),
                         "reference_score": e.get("reference_score"), "model_version": str(e.get("model_version")),
                         "realized": realized, "alert": e.get("alert")})
        q = _stored(context, lakefs, n.key("data_quality_report"), p)
        if q is not None and q.height:
            quality.append(q.select("feature", pl.col("rows").cast(pl.Int64), pl.col("missing_rate").cast(pl.Float64),
                                    pl.col("unseen_categories").cast(pl.Int64), pl.col("out_of_range").cast(pl.Int64))
                           .with_columns(pl.lit(p).alias("partition")))
        landed = _ingestion(context.instance, n, p)
        if landed:
            ingestion.append(landed)

    aliases = registry.aliases(mlflow)
    by_version: dict[str, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(str(v), []).append(alias)
    try:
        found = mlflow.client().search_model_versions(f"name='{mlflow.model_name}'")
    except Exception as exc:  # noqa: BLE001 - a model not registered yet has no versions; anything else raises
        if getattr(exc, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
            raise
        found = []
    versions = []
    for mv in sorted(found, key=lambda m: int(m.version)):
        tags = dict(mv.tags or {})
        versions.append({"version": str(mv.version), "aliases": sorted(by_version.get(str(mv.version), [])),
                         "created": dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, dt.timezone.utc)
                         .isoformat(timespec="seconds"),
                         "gate": tags.get("gate", ""), "lakefs_commit": tags.get("lakefs_commit", "")[:12]})
    events = [{"at": e.at, "action": e.action, "version": e.version, "actor": e.actor, "reason": e.reason,
               "decision": e.evidence.get("decision")} for e in audit.trail().history(mlflow.model_name)]
    links = {}
    champion = aliases.get(registry.CHAMPION)
    if champion:
        links[f"MLflow: champion v{champion}"] = mlflow.model_version_url(champion)
    return report.HealthData(
        model=mlflow.model_name, dataset=spec.name, as_of=context.partition_key, metric=metric,
        higher_is_better=metric not in LOWER_IS_BETTER, drift_method=method,
        drift=pl.concat(drift, how="vertical_relaxed") if drift else report.empty(report.DRIFT_COLUMNS),
        performance=pl.DataFrame(perf, infer_schema_length=None) if perf else report.empty(report.PERFORMANCE_COLUMNS),
        quality=pl.concat(quality, how="vertical_relaxed") if quality else report.empty(report.QUALITY_COLUMNS),
        ingestion=pl.DataFrame(ingestion) if ingestion else report.empty(report.INGESTION_COLUMNS),
        versions=versions, events=events, links=links)


MONITORING = ("drift_report", "performance_estimate", "data_quality_report")


def after_monitoring(n: Namespace) -> dg.AutomationCondition:
    """Refresh once a batch's monitoring outputs change (and again when its realized performance lands, labels
    arriving later); only the three monitoring outputs must exist: the labels may be weeks away."""
    return (
        dg.AutomationCondition.any_deps_updated().since_last_handled()
        & ~dg.AutomationCondition.any_deps_match(dg.AutomationCondition.missing()).allow(
            dg.AssetSelection.assets(*n.keys(*MONITORING)))
        & ~dg.AutomationCondition.any_deps_in_progress()
        & ~dg.AutomationCondition.in_progress()
    ).with_label("after its batch's monitoring")


def build_report(spec: DatasetSpec) -> list:
    n = ns(spec)

    @dg.asset(
        key_prefix=[spec.name], group_name="monitoring", kinds={"plotly", "lakefs"}, code_version="1",
        partitions_def=partitions_def(spec), deps=n.keys(*MONITORING, "realized_performance"),
        automation_condition=after_monitoring(n),
        description="The model's health on one HTML page, refreshed after each batch's monitoring: drift over time "
                    "per feature, the estimate against the realized metric with its confidence band, data quality "
                    "per batch, and the timeline of versions with promotions and rollbacks.",
    )
    def model_health_report(context: dg.AssetExecutionContext, lakefs: LakeFSResource, mlflow: MLflowResource,
                            audit: AuditResource) -> dg.Output:
        from resources.publish import open_run_branch

        partition = context.partition_key
        window = previous_partitions(spec, partition, max(spec.monitoring.drift_plot_batches - 1, 0)) + [partition]
        data = gather(context, spec, lakefs, mlflow, audit, window)
        page = report.build_html(data)
        branch = open_run_branch(context.instance, lakefs, context.run_id)
        path = report_path(spec, partition)
        lakefs.put(branch, path, page.encode(), "text/html")  # committed together with this asset's output
        url = lakefs.object_url("main", path)
        facts = report.summary(data)
        return dg.Output({**facts, "report_path": path, "report_uri": lakefs.uri("main", path)}, metadata={
            "report": dg.MetadataValue.url(url),
            "report_uri": dg.MetadataValue.text(lakefs.uri("main", path)),
            "summary": dg.MetadataValue.md(report.summary_markdown(data, link=url)),
            "batches": dg.MetadataValue.int(len(facts["batches"])),
            "alerting_features": dg.MetadataValue.int(len(facts["drift"]["alerting_in_latest"])),
            "files_quarantined": dg.MetadataValue.int(facts["quality"]["files_quarantined"]),
            "model_versions": dg.MetadataValue.int(facts["versions"]["count"]),
            "report_bytes": dg.MetadataValue.int(len(page)),
        })

    return [model_health_report]
