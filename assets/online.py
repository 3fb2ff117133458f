"""Closing the loop: the server's prediction log (mlplatform.serving.predlog) into lakeFS, per partition.

`make serve` writes each online prediction (request id, entity id, time, variant, model version, features,
output, policy flags) to Parquet files under <state dir>/online_predictions/<data set>/<partition>/, in
batches and off the response path. `online_predictions` reads every complete file of its partition (the
whole partition each time, de-duplicated by request, row and shadow flag, so a re-run is idempotent) and
writes it through the lakeFS IO manager, committed on the run's branch like every other batch asset.

The same monitoring then runs on it, per partition, with the batch monitoring's functions
(assets/monitoring.py): `online_drift_report` (univariate + multivariate drift of the served rows against
`reference_features`) and `online_performance_estimate` (CBPE / DLE per served model version, fitted on that
version's own test split). Once the partition's labels land (`raw_labels`), `online_experiment_report` joins
them to the logged predictions and compares each variant with the champion (mlplatform.serving.experiment:
bootstrap CI on the metric difference, Welch or paired t-test on the per-row loss, verdict). A promotion gate
reads the published report with `mlplatform.serving.experiment.gate_verdict` (README "Online serving").
"""



import dagster as dg
from mlplatform.lazy import lazy_import
pl = lazy_import("polars")

from assets.monitoring import (_md_table, batch_drift, champion_reference, drift_check_specs, drift_results,
                               estimate_performance)
from mlplatform.serving.predlog import read_spool, spool_dir
from mlplatform.serving.settings import load_serving_settings
from mlplatform.spec import DatasetSpec
from resources.io import read_upstream_table
from resources.lakefs import LakeFSResource
from resources.mlflow import MLflowResource
from resources.naming import ns
from resources.partitions import partitions_def


def build_online(spec: DatasetSpec) -> list:
    n = ns(spec)

    @dg.asset(
        key_prefix=[spec.name], group_name="serving", kinds={"polars", "lakefs"}, code_version="1", partitions_def=partitions_def(spec),
        description="Online predictions logged by the model server (make serve) for one batch period: variant, "
                    "model version, features, output and missing-feature policy flags per row.",
    )
    def online_predictions(context: dg.AssetExecutionContext) -> dg.Output:
        root = spool_dir(spec, load_serving_settings(spec).log.spool_dir)
        df, files = read_spool(spec, root, context.partition_key)
        if df is None:
            raise ValueError(f"no online predictions logged for batch {context.partition_key}: no complete "
                             f"Parquet file under {root / context.partition_key} (the server writes there)")
        counts = df.group_by("variant", "model_version", "shadow").len().sort("variant", "model_version")
        return dg.Output(df, metadata={
            "rows": df.height, "files": len(files), "spool": str(root / context.partition_key),
            "variants": dg.MetadataValue.md(
                "\n".join(f"- {r['variant']} v{r['model_version']}{' (shadow)' if r['shadow'] else ''}: "
                          f"{r['len']}" for r in counts.to_dicts())),
            "flagged_rows": int((df["policy_flags"] != "{}").sum())})

    parts = partitions_def(spec)

    @dg.asset(
        key_prefix=[spec.name], group_name="serving", kinds={"polars", "lakefs"}, code_version="1",
        partitions_def=parts, deps=[n.key("reference_features")], ins=n.ins("online_predictions"),
        description="Drift of the rows the model server answered for one batch period (shadow scores excluded) "
                    "against the reference: the same engine, methods and thresholds as drift_report.",
        check_specs=drift_check_specs("online_drift", n.key("online_drift_report")),
    )
    def online_drift_report(context: dg.AssetExecutionContext, online_predictions,
                            lakefs: LakeFSResource):
        ref, _ = read_upstream_table(context, lakefs, n.key("reference_features"))
        served = served_rows(spec, online_predictions)
        if served.height == 0:
            raise ValueError(f"no answered (non-shadow) online prediction in batch {context.partition_key} of "
                             f"`online_predictions`")
        _, latest, summary = batch_drift(spec, ref, served)
        summary["partition"] = context.partition_key
        yield from drift_results("online_drift", context.partition_key, latest, summary, served.height)

    @dg.asset(
        key_prefix=[spec.name], group_name="serving", kinds={"polars", "lakefs"}, code_version="1",
        partitions_def=parts, ins=n.ins("online_predictions"),
        description="Label-free performance estimate (NannyML CBPE / DLE) of each model version the server ran "
                    "in one batch period, answering or in shadow, each fitted on its own test split.",
    )
    def online_performance_estimate(context: dg.AssetExecutionContext, online_predictions,
                                    lakefs: LakeFSResource, mlflow: MLflowResource) -> dg.Output:
        logged = served_rows(spec, online_predictions, shadow=None)
        rows = []
        for variant, version, shadow in logged.select("variant", "model_version", "shadow").unique() \
                .sort("shadow", "variant", "model_version").rows():
            part = logged.filter((pl.col("variant") == variant) & (pl.col("model_version") == version)
                                 & (pl.col("shadow") == shadow))
            if part.height < 2:
                context.log.warning(f"{variant} v{version}: {part.height} row(s), too few to estimate")
                continue
            ref = champion_reference(context, spec, lakefs, mlflow, version)
            est = estimate_performance(spec, ref, part, lakefs, context)
            rows.append({"variant": variant, "shadow": shadow, **est})
        if not rows:
            raise ValueError(f"no model version with 2 or more logged rows in batch {context.partition_key} of "
                             f"`online_predictions`: nothing to estimate")
        out = pl.DataFrame(rows)
        metric = spec.estimated_metric
        return dg.Output(out, metadata={
            "metric": metric, "alerts": dg.MetadataValue.int(int(out["alert"].sum())),
            "estimates": dg.MetadataValue.md(_md_table(out, ["variant", "shadow", "model_version", "rows",
                                                             "estimated", "lower", "upper", "reference_score",
                                                             "alert"])),
            **{f"estimated_{metric}_{r['variant']}{'_shadow' if r['shadow'] else ''}":
               dg.MetadataValue.float(r["estimated"]) for r in rows},
        })

    @dg.asset(
        key_prefix=[spec.name], group_name="serving", kinds={"polars", "lakefs"}, code_version="1",
        partitions_def=parts, ins=n.ins("online_predictions", "raw_labels"),
        description="Online experiment once a batch's labels land: logged predictions joined to raw_labels, each "
                    "variant against the champion (rows, metric, difference with a bootstrap CI, p-value of a "
                    "t-test on the per-row loss, verdict). A promotion gate reads it with "
                    "mlplatform.serving.experiment.gate_verdict.",
    )
    def online_experiment_report(context: dg.AssetExecutionContext, online_predictions,
                                 raw_labels) -> dg.Output:
        from mlplatform.serving.experiment import experiment_table

        joined = join_labels(spec, online_predictions, raw_labels)
        if joined.height == 0:
            raise ValueError(f"no labelled online prediction in batch {context.partition_key}: `raw_labels` and "
                             f"`online_predictions` share no {spec.id_column!r} (entity_id)")
        table = experiment_table(joined, spec, seed=0)
        served = joined.filter(~pl.col("shadow")).group_by("variant").len().sort("variant")
        meta = {"labelled_rows": joined.height, "unlabelled_rows": online_predictions.height - joined.height,
                "metric": spec.metric, "rows_per_variant": dg.MetadataValue.json(dict(served.rows())),
                "verdicts": dg.MetadataValue.json({f"{r['variant']}{' (shadow)' if r['shadow'] else ''} "
                                                   f"v{r['model_version']}": r["verdict"] for r in table.to_dicts()}),
                # The rows themselves, for the online gate (sensors/lifecycle.py online_experiment_gate).
                "comparisons": dg.MetadataValue.json(table.to_dicts()),
                "comparison": dg.MetadataValue.md(_md_table(table, [
                    "variant", "shadow", "model_version", "n_baseline", "n_variant", "metric_baseline",
                    "metric_variant", "difference", "ci_low", "ci_high", "p_value", "verdict"]))}
        return dg.Output(table.with_columns(pl.lit(context.partition_key).alias("partition")), metadata=meta)

    return [online_predictions, online_drift_report, online_performance_estimate, online_experiment_report]


def served_rows(spec: DatasetSpec, logged: "pl.DataFrame", shadow: bool | None = False) -> "pl.DataFrame":
    """Logged rows as a batch of the data set: the event time (else the prediction time) under the spec's time
    column, the entity id under its id column; only answered rows by default (shadow=None: all)."""
    out = logged if shadow is None else logged.filter(pl.col("shadow") == shadow)
    return out.with_columns(pl.coalesce("event_time", "predicted_at").alias(spec.time_column),
                            pl.col("entity_id").alias(spec.id_column))


def join_labels(spec: DatasetSpec, logged: "pl.DataFrame", labels: "pl.DataFrame") -> "pl.DataFrame":
    """Logged predictions with their label (inner join on the entity id; the newest label of an id wins)."""
    lab = labels.select(pl.col(spec.id_column).cast(pl.String).alias("entity_id"), spec.target) \
        .unique(subset="entity_id", keep="last", maintain_order=True)
    return logged.filter(pl.col("entity_id").is_not_null()).join(lab, on="entity_id", how="inner")
