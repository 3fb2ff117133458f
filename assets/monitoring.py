"""Monitoring per production batch: univariate drift (our polars engine) and multivariate drift (NannyML),
label-free performance estimation (NannyML CBPE / DLE), realized performance, and data quality."""



import base64
import io

import dagster as dg
from mlplatform.lazy import lazy_import
np = lazy_import("numpy")
pl = lazy_import("polars")

from mlplatform import modeling, registry
from resources.partitions import (each_partition, merge_check_results, partitions_def, ranged_keys, withhold,
                                  write_partitions)
from resources.io import latest_checked_materialization, read_upstream_table
from resources.lakefs import LakeFSResource, run_branch
from resources.mlflow import MLflowResource
from resources.naming import ns
from mlplatform.spec import DatasetSpec


def _png_md(fig, title: str) -> tuple[bytes, str]:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=70, bbox_inches="tight")
    data = buf.getvalue()
    return data, f"![{title}](data:image/png;base64,{base64.b64encode(data).decode()})"


def _md_table(df: "pl.DataFrame", cols: list[str], limit: int = 60) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df.select(cols).head(limit).iter_rows():
        lines.append("| " + " | ".join("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
                                       for v in r) + " |")
    return "\n".join(lines)


def drift_engine(spec: DatasetSpec):
    from mlplatform.drift.engine import DriftEngine

    mon = spec.monitoring
    cont = [f.name for f in spec.features if f.type == "numeric"] + [f.name for f in spec.engineered_features]
    cat = [f.name for f in spec.features if f.type in ("categorical", "boolean")]
    return DriftEngine(continuous=cont, categorical=cat, methods=mon.drift_methods, psi_bins=mon.psi_bins,
                       min_chunk_rows=mon.min_chunk_rows, threshold="std", std_multiplier=mon.std_multiplier)


def previous_partitions(spec: DatasetSpec, partition: str, count: int) -> list[str]:
    """The `count` batch partitions before `partition`, oldest first."""
    keys = list(partitions_def(spec).get_partition_keys())
    i = keys.index(partition) if partition in keys else len(keys)
    return keys[max(0, i - count):i]


def drift_over_time(context, lakefs: LakeFSResource, spec: DatasetSpec, latest: "pl.DataFrame",
                    partition: str | None = None, this_run: "dict[str, pl.DataFrame] | None" = None) -> "pl.DataFrame":
    """This batch's drift beside the published drift reports of the batches before it (at most
    `monitoring.drift_plot_batches`): one chunk per batch, read from those small reports, so the
    plot costs a bounded number of reads instead of recomputing drift over all history."""
    from resources.io import deserialize

    partition = partition or context.partition_key
    count = spec.monitoring.drift_plot_batches
    frames = []
    for p in previous_partitions(spec, partition, max(count - 1, 0)):
        if this_run and p in this_run:  # an earlier partition of the same (ranged) run
            frames.append(this_run[p].select("feature", "method", "value", pl.lit(p).alias("chunk_key")))
            continue
        found = latest_checked_materialization(context.instance, ns(spec).key("drift_report"), p, context.run_id)
        if found:
            frames.append(deserialize(lakefs.get(found[0], found[1]), found[1])
                          .select("feature", "method", "value", pl.lit(p).alias("chunk_key")))
    frames.append(latest.select("feature", "method", "value", pl.lit(partition).alias("chunk_key")))
    out = pl.concat(frames, how="vertical_relaxed")
    order = {k: i for i, k in enumerate(sorted(out["chunk_key"].unique().to_list()))}
    return out.with_columns(pl.col("chunk_key").replace_strict(order, return_dtype=pl.Int64).alias("chunk_index"))


def multivariate_drift(ref: "pl.DataFrame", batch: "pl.DataFrame", spec: DatasetSpec, chunk_size: int) -> dict:
    """NannyML's data-reconstruction (PCA) drift: reconstruction error of the batch vs reference bounds."""
    import os

    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
    import nannyml as nml

    cols = [f.name for f in spec.features]
    cat = [f.name for f in spec.features if f.type in ("categorical", "boolean")]
    r = ref.select([spec.time_column, *cols]).to_pandas()
    a = batch.select([spec.time_column, *cols]).to_pandas()
    for c in cat:
        r[c], a[c] = r[c].astype(str), a[c].astype(str)
    calc = nml.DataReconstructionDriftCalculator(column_names=cols, timestamp_column_name=spec.time_column,
                                                 chunk_size=chunk_size)
    calc.fit(r)
    res = calc.calculate(a).filter(period="analysis").to_df()
    rec = res["reconstruction_error"]
    return {"error": float(rec["value"].mean()), "upper": float(rec["upper_threshold"].iloc[0]),
            "lower": float(rec["lower_threshold"].iloc[0]) if rec["lower_threshold"].iloc[0] is not None else None,
            "alert": bool(rec["alert"].any()), "chunks": int(len(rec))}


def batch_drift(spec: DatasetSpec, ref: "pl.DataFrame", batch: "pl.DataFrame"):
    """One batch's drift against the reference, as one chunk: (engine, per feature and method table, summary
    with the multivariate reconstruction drift under "multivariate"). Shared by drift_report and the online
    drift report (assets/online.py)."""
    from mlplatform.drift.engine import ChunkSpec

    engine = drift_engine(spec)
    chunk_rows = max(spec.monitoring.reference_chunk_rows, engine.min_chunk_rows)
    engine.fit(ref, ChunkSpec(kind="size", size=chunk_rows))
    latest = engine.calculate(batch, ChunkSpec(kind="count", count=1))
    summary = engine.summary(latest)
    summary["multivariate"] = multivariate_drift(ref, batch, spec, chunk_size=max(batch.height, 2))
    return engine, latest, summary


def drift_problems(summary: dict) -> tuple[list[str], list[str]]:
    """(blocking, warning) problems of a drift summary. A missing column or one of the wrong type means the
    report cannot be trusted: block. Small chunks, all-null or constant columns are reported and warned about,
    never silently NaN."""
    problems = summary.get("problems", [])
    blocking = [p for p in problems if "missing" in p or "type" in p]
    return blocking, [p for p in problems if p not in blocking]


def drift_check_specs(check_prefix: str, asset: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    """The two checks every one-batch drift report carries (see drift_results)."""
    return [dg.AssetCheckSpec(f"{check_prefix}_inputs_usable", asset=asset, blocking=True,
                              description="every monitored column is present and of its type"),
            dg.AssetCheckSpec(f"{check_prefix}_chunks_informative", asset=asset,
                              description="chunks large enough, no all-null or constant columns")]


def drift_results(check_prefix: str, partition: str, latest: "pl.DataFrame", summary: dict, rows: int,
                  extra_metadata: dict | None = None):
    """The output and the two check results of a one-batch drift report (drift_report, online_drift_report):
    the per feature and method table, alert counts that plot over time, and the checks named
    `<prefix>_inputs_usable` (blocking) and `<prefix>_chunks_informative` (warning)."""
    blocking, warning = drift_problems(summary)
    mv = summary["multivariate"]
    table = latest.select("feature", "method", "value", "p_value", "lower_threshold", "upper_threshold",
                          "alert", "status").sort("alert", "feature", descending=[True, False])
    yield dg.Output(latest.with_columns(pl.lit(partition).alias("partition")), metadata={
        "n_alerts": dg.MetadataValue.int(summary["n_alerts"]),
        "alerting_features": dg.MetadataValue.int(len(summary["alerting_features"])),
        "multivariate_error": dg.MetadataValue.float(mv["error"]),
        "multivariate_alert": dg.MetadataValue.bool(mv["alert"]),
        "summary": dg.MetadataValue.json(summary),
        "drift_table": dg.MetadataValue.md(_md_table(table, table.columns)),
        **(extra_metadata or {}),
        "rows": rows,
    })
    yield dg.AssetCheckResult(check_name=f"{check_prefix}_inputs_usable", passed=not blocking,
                              description="; ".join(blocking) or "all monitored columns present and typed")
    yield dg.AssetCheckResult(check_name=f"{check_prefix}_chunks_informative", passed=not warning,
                              severity=dg.AssetCheckSeverity.WARN,
                              description="; ".join(warning) or "every chunk informative")


class MissingUpstream(ValueError):
    """A ranged run's partition whose input has no checked version (withheld upstream): it is withheld too."""


def read_batch(context, lakefs: LakeFSResource, key: dg.AssetKey, partition: str):
    """One partition of an upstream asset at its checked commit (`read_upstream_table`), or MissingUpstream."""
    from resources.lakefs import LakeFSError

    if latest_checked_materialization(context.instance, key, partition, context.run.run_id) is None:
        raise MissingUpstream(f"{key.to_user_string()} [{partition}] has no checked version in lakeFS repository "
                              f"{lakefs.repository!r} (withheld by the run that made it, or never materialized)")
    try:
        return read_upstream_table(context, lakefs, key, partition=partition)
    except LakeFSError as exc:
        raise MissingUpstream(str(exc)) from exc


def build_monitoring(spec: DatasetSpec) -> list:
    parts = partitions_def(spec)
    n = ns(spec)

    def _read_batch(context, lakefs: LakeFSResource, name: str, partition: str):
        return read_batch(context, lakefs, n.key(name), partition)

    @dg.asset(
        key_prefix=[spec.name], group_name="monitoring", kinds={"polars", "lakefs"}, code_version="1",
        partitions_def=parts, deps=[*n.keys("features", "reference_features"), dg.AssetDep(n.key("raw_records"))],
        description="Univariate drift per feature and method (PSI, KS, chi2, JS, Wasserstein, Hellinger, "
                    "L-inf) and multivariate reconstruction drift of one batch against the reference.",
        check_specs=drift_check_specs("drift", n.key("drift_report")),
    )
    def drift_report(context: dg.AssetExecutionContext, lakefs: LakeFSResource):
        # This batch's partition of `features` and the history's features: never the other batches.
        ref, _ = read_upstream_table(context, lakefs, n.key("reference_features"))
        keys = ranged_keys(context)
        if keys is None:
            yield from drift_one(context, lakefs, ref, context.partition_key)
            return
        # A burst: one report per partition, each to its own path; a partition without features is withheld.
        values, metas, checks_by, this_run = {}, {}, {}, {}
        for partition in keys:
            try:
                results = list(drift_one(context, lakefs, ref, partition, this_run))
            except MissingUpstream as exc:
                withhold(context, drift_report.key, partition, str(exc))
                continue
            out = results[0]
            values[partition], metas[partition] = out.value, out.metadata
            this_run[partition] = out.value
            checks_by[partition] = [r for r in results[1:]]
        write_partitions(context, lakefs, drift_report.key, values, metas)
        yield dg.Output(None, metadata={"partitions_published": dg.MetadataValue.json(sorted(values))})
        yield from merge_check_results(checks_by) if checks_by else []

    def drift_one(context, lakefs: LakeFSResource, ref, partition: str, this_run: dict | None = None):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if this_run is None:  # one batch
            batch, commit = read_upstream_table(context, lakefs, n.key("features"), partition=partition)
        else:  # a ranged run: a partition withheld upstream is withheld here too
            batch, commit = _read_batch(context, lakefs, "features", partition)
        if batch.height == 0:
            raise ValueError(f"no production rows for batch {partition} in `features` at lakeFS "
                             f"commit {commit[:12]}")
        engine, latest, summary = batch_drift(spec, ref, batch)
        over_time = drift_over_time(context, lakefs, spec, latest, partition, this_run)
        summary["partition"] = partition
        # Plot: each feature's main distance over time (one line per feature), alerts marked.
        method = "jensen_shannon" if "jensen_shannon" in engine.methods else engine.methods[0]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for feat in over_time["feature"].unique().sort().to_list():
            s = over_time.filter((pl.col("feature") == feat) & (pl.col("method") == method)).sort("chunk_index")
            ax.plot(s["chunk_key"].cast(pl.String).to_list(), s["value"].to_list(), marker="o", ms=3, label=feat)
        ax.set_title(f"{method} per feature over time (up to {partition})")
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        ax.legend(fontsize=6, ncol=2)
        png, md_img = _png_md(fig, "drift over time")
        plt.close(fig)
        from resources.publish import open_run_branch

        branch = open_run_branch(context.instance, lakefs, context.run_id)
        img_path = f"reports/{spec.name}/drift_report/partition={partition}/drift_over_time.png"
        lakefs.put(branch, img_path, png, "image/png")  # committed together with the report
        yield from drift_results("drift", partition, latest, summary, batch.height, {
            "drift_over_time": dg.MetadataValue.md(md_img),
            "plot_in_lakefs": dg.MetadataValue.url(lakefs.object_url("main", img_path)),
        })

    @dg.asset(
        key_prefix=[spec.name], group_name="monitoring", kinds={"polars", "lakefs"}, code_version="1",
        partitions_def=parts, deps=[n.key("features")], ins=n.ins("batch_predictions"),
        description="Label-free performance estimate of the champion on one batch (NannyML CBPE / DLE).",
    )
    def performance_estimate(context: dg.AssetExecutionContext, batch_predictions,
                             lakefs: LakeFSResource, mlflow: MLflowResource) -> dg.Output:
        mlflow = mlflow.scoped(spec)
        keys = ranged_keys(context)
        if keys is None:
            return estimate_one(context, lakefs, mlflow, batch_predictions, context.partition_key, {})
        # A burst: `batch_predictions` came in as all partitions at once; each partition is estimated on its own.
        refs: dict = {}
        return each_partition(context, lakefs, performance_estimate.key, keys, lambda p: estimate_one(
            context, lakefs, mlflow, _read_batch(context, lakefs, "batch_predictions", p)[0], p, refs), MissingUpstream)

    def estimate_one(context, lakefs: LakeFSResource, mlflow: MLflowResource, batch_predictions, partition: str,
                     refs: dict) -> dg.Output:
        champ_v = batch_predictions["model_version"][0]
        if champ_v not in refs:  # the champion's reference, once per run
            refs[champ_v] = champion_reference(context, spec, lakefs, mlflow, champ_v)
        ref = refs[champ_v]
        batch = batch_predictions
        if not spec.is_classification:  # DLE reads the features beside the predictions
            features, _ = read_upstream_table(context, lakefs, n.key("features"), partition=partition)
            batch = batch.join(features.select(spec.id_column, *spec.model_feature_names), on=spec.id_column)
        est = estimate_performance(spec, ref, batch, lakefs, context, partition)
        metric = spec.estimated_metric
        return dg.Output(pl.DataFrame([est]), metadata={
            f"estimated_{metric}": dg.MetadataValue.float(est["estimated"]),
            "lower_bound": dg.MetadataValue.float(est["lower"] if est["lower"] is not None else float("nan")),
            "upper_bound": dg.MetadataValue.float(est["upper"] if est["upper"] is not None else float("nan")),
            "alert": dg.MetadataValue.bool(est["alert"]),
            "champion_version": dg.MetadataValue.int(int(champ_v)),
            "champion_test_score": dg.MetadataValue.float(est["reference_score"]),
            "summary": dg.MetadataValue.json(est),
        })

    @dg.asset(
        key_prefix=[spec.name], group_name="monitoring", kinds={"polars", "lakefs"}, code_version="1",
        partitions_def=parts, deps=[dg.AssetDep(n.key("performance_estimate")), n.key("features")],
        ins=n.ins("batch_predictions", "raw_labels"),
        description="Realized performance once the batch's delayed labels land, beside the estimate.",
    )
    def realized_performance(context: dg.AssetExecutionContext, batch_predictions,
                             raw_labels, lakefs: LakeFSResource, mlflow: MLflowResource) -> dg.Output:
        mlflow = mlflow.scoped(spec)
        joined = batch_predictions.join(raw_labels.select(spec.id_column, spec.target), on=spec.id_column)
        if joined.height == 0:
            raise ValueError(f"no labelled rows for batch {context.partition_key}: labels and predictions share "
                             f"no {spec.id_column!r}")
        y, p = joined[spec.target].to_numpy(), joined["prediction"].to_numpy()
        realized = modeling.metrics(y, p, spec)
        metric = spec.estimated_metric
        row = {"partition": context.partition_key, "rows": joined.height, "model_version":
               batch_predictions["model_version"][0], **{f"realized_{k}": v for k, v in realized.items()}}
        found = latest_checked_materialization(context.instance, n.key("performance_estimate"),
                                               context.partition_key, context.run_id)
        meta = {f"realized_{metric}": dg.MetadataValue.float(realized[metric]), "rows": joined.height,
                "model_version": dg.MetadataValue.text(str(row["model_version"]))}
        # The previous champion on the same rows: the evidence the rollback sensor compares.
        prev_v = registry.aliases(mlflow).get(registry.PREVIOUS)
        if prev_v and prev_v != str(row["model_version"]):
            features, _ = read_upstream_table(context, lakefs, n.key("features"), partition=context.partition_key)
            rows = features.join(joined.select(spec.id_column, spec.target), on=spec.id_column)
            prev = registry.load_booster(mlflow, prev_v)
            prev_score = modeling.metrics(rows[spec.target].to_numpy(), modeling.predict(prev, rows, spec), spec)[metric]
            row["previous_version"], row[f"previous_{metric}"] = prev_v, prev_score
            meta["previous_version"] = dg.MetadataValue.text(prev_v)
            meta[f"previous_{metric}"] = dg.MetadataValue.float(prev_score)
        if found:
            from resources.io import deserialize

            est = deserialize(lakefs.get(found[0], found[1]), found[1])
            row["estimated"] = float(est["estimated"][0])
            row["estimate_error"] = row["estimated"] - realized[metric]
            meta["estimated"] = dg.MetadataValue.float(row["estimated"])
            meta["estimate_abs_error"] = dg.MetadataValue.float(abs(row["estimate_error"]))
        return dg.Output(pl.DataFrame([row]), metadata=meta)

    @dg.asset(
        key_prefix=[spec.name], group_name="monitoring", kinds={"polars", "lakefs"}, code_version="1",
        partitions_def=parts, ins=n.ins("raw_records"),
        description="Missing values, unseen categories and range violations per feature in one batch.",
    )
    def data_quality_report(context: dg.AssetExecutionContext, raw_records, lakefs: LakeFSResource) -> dg.Output:
        keys = ranged_keys(context)
        if keys is None:
            return quality_one(raw_records, context.partition_key)
        # A burst: `raw_records` came in as all partitions at once; each partition gets its own report.
        return each_partition(context, lakefs, data_quality_report.key, keys, lambda p: quality_one(
            _read_batch(context, lakefs, "raw_records", p)[0], p), MissingUpstream)

    def quality_one(raw_records, partition: str) -> dg.Output:
        report = data_quality(raw_records, spec)
        issues = int(report.filter(pl.col("missing") + pl.col("unseen_categories") + pl.col("out_of_range") > 0)
                     .height)
        return dg.Output(report.with_columns(pl.lit(partition).alias("partition")), metadata={
            "features_with_issues": dg.MetadataValue.int(issues),
            "missing_values": dg.MetadataValue.int(int(report["missing"].sum())),
            "unseen_categories": dg.MetadataValue.int(int(report["unseen_categories"].sum())),
            "range_violations": dg.MetadataValue.int(int(report["out_of_range"].sum())),
            "table": dg.MetadataValue.md(_md_table(report, report.columns)),
        })

    return [drift_report, performance_estimate, realized_performance, data_quality_report]


def data_quality(df: "pl.DataFrame", spec: DatasetSpec) -> "pl.DataFrame":
    rows = []
    n = df.height
    for f in spec.features:
        if f.name not in df.columns:
            rows.append({"feature": f.name, "rows": n, "missing": n, "missing_rate": 1.0, "unseen_categories": 0,
                         "out_of_range": 0, "note": "column missing"})
            continue
        col = df[f.name]
        missing = int(col.null_count() + (col.is_nan().sum() if col.dtype.is_float() else 0))
        unseen = int((~col.cast(pl.String).is_in(list(f.categories)) & col.is_not_null()).sum()) \
            if f.type == "categorical" and f.categories else 0
        oor = 0
        if f.type == "numeric":
            if f.min is not None:
                oor += int((col < f.min).sum())
            if f.max is not None:
                oor += int((col > f.max).sum())
        rows.append({"feature": f.name, "rows": n, "missing": missing, "missing_rate": missing / n if n else 0.0,
                     "unseen_categories": unseen, "out_of_range": oor, "note": ""})
    return pl.DataFrame(rows)


def champion_reference(context, spec: DatasetSpec, lakefs: LakeFSResource, mlflow: MLflowResource,
                       version: str) -> "pl.DataFrame":
    """The champion's predictions on its own test split, with labels: what CBPE/DLE are fitted on."""
    from resources.io import load_asset

    mlflow = mlflow.scoped(spec)
    tags = registry.version_tags(mlflow, version)
    ts = load_asset(lakefs, ns(spec).key("training_set"), ref=tags["lakefs_commit"])
    test = ts.filter(pl.col("split") == "test")
    booster = registry.load_booster(mlflow, version)
    return test.with_columns(pl.Series("prediction", modeling.predict(booster, test, spec)))


def estimate_performance(spec: DatasetSpec, ref: "pl.DataFrame", batch: "pl.DataFrame", lakefs, context,
                         partition: str | None = None) -> dict:
    import os

    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
    import nannyml as nml

    metric = spec.estimated_metric
    t = spec.time_column
    r = ref.select(t, spec.target, "prediction").to_pandas()
    a = batch.select(t, "prediction").to_pandas()
    chunk = max(len(a), 2)
    if spec.is_classification:
        r["y_pred"] = (r["prediction"] >= 0.5).astype(int)
        a["y_pred"] = (a["prediction"] >= 0.5).astype(int)
        est = nml.CBPE(y_pred_proba="prediction", y_pred="y_pred", y_true=spec.target, timestamp_column_name=t,
                       metrics=[metric], chunk_size=chunk, problem_type="classification_binary")
    else:
        feats = spec.model_feature_names
        r = ref.select(t, spec.target, "prediction", *feats).to_pandas()
        a = batch.select(t, "prediction", *feats).to_pandas()
        for c in spec.categorical_features:
            cats = list(spec.feature(c).categories or [])
            r[c] = r[c].astype("category").cat.set_categories(cats)
            a[c] = a[c].astype("category").cat.set_categories(cats)
        est = nml.DLE(feature_column_names=feats, y_pred="prediction", y_true=spec.target, timestamp_column_name=t,
                      metrics=[metric], chunk_size=chunk)
    est.fit(r)
    res = est.estimate(a).filter(period="analysis").to_df()[metric]
    ref_score = float(modeling.metrics(ref[spec.target].to_numpy(), ref["prediction"].to_numpy(), spec)[metric])
    return {"partition": partition or context.partition_key, "metric": metric, "estimated": float(res["value"].iloc[0]),
            "lower": _f(res["lower_confidence_boundary"].iloc[0]), "upper": _f(res["upper_confidence_boundary"].iloc[0]),
            "alert": bool(res["alert"].iloc[0]), "lower_threshold": _f(res["lower_threshold"].iloc[0]),
            "reference_score": ref_score, "rows": int(len(a)), "model_version": str(batch["model_version"][0])}


def _f(v):
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)
