"""Serving: batch predictions per production batch by the champion, with the challenger in shadow."""



import dagster as dg
from mlplatform.lazy import lazy_import
pl = lazy_import("polars")

from mlplatform import modeling, registry
from mlplatform.batches import window
from resources.partitions import each_partition, partitions_def, ranged_keys
from resources.io import latest_checked_materialization, read_upstream_table
from resources.lakefs import LakeFSResource
from resources.mlflow import MLflowResource
from resources.naming import ns
from mlplatform.spec import DatasetSpec


def score_batch(features: "pl.DataFrame", spec: DatasetSpec, champion, champion_version: str, challenger,
                challenger_version: str | None, input_commit: str) -> "pl.DataFrame":
    """Champion scores; the challenger's scores sit beside them (shadow, never acted on)."""
    p = modeling.predict(champion, features, spec)
    out = features.select(spec.id_column, spec.time_column).with_columns(
        pl.Series("prediction", p),
        pl.lit(champion_version).alias("model_version"),
        pl.lit(input_commit).alias("input_commit"),
    )
    if spec.is_classification:
        out = out.with_columns((pl.col("prediction") >= 0.5).cast(pl.Int8).alias("predicted_label"))
    if challenger is not None:
        out = out.with_columns(pl.Series("shadow_prediction", modeling.predict(challenger, features, spec)),
                               pl.lit(challenger_version).alias("shadow_model_version"))
    return out


class MissingFeatures(ValueError):
    """A ranged run's partition whose features were withheld upstream: it is withheld too."""


def build_serving(spec: DatasetSpec) -> list:
    n = ns(spec)

    @dg.asset(
        key_prefix=[spec.name], group_name="serving", kinds={"polars", "lightgbm", "lakefs"}, code_version="1",
        partitions_def=partitions_def(spec), deps=[n.key("features"), dg.AssetDep(n.key("raw_records"))],
        description="Champion scores for one production batch; the challenger scores the same rows in shadow.",
    )
    def batch_predictions(context: dg.AssetExecutionContext, lakefs: LakeFSResource,
                          mlflow: MLflowResource) -> dg.Output:
        mlflow = mlflow.scoped(spec)
        keys = ranged_keys(context)
        models: dict = {}
        if keys is None:
            return score_one(context, lakefs, mlflow, context.partition_key, models)
        # A burst: the models are loaded once, each partition scored and written to its own path; a partition
        # whose features were withheld upstream is withheld too.
        return each_partition(context, lakefs, batch_predictions.key, keys,
                              lambda p: score_one(context, lakefs, mlflow, p, models), MissingFeatures)

    def score_one(context, lakefs: LakeFSResource, mlflow: MLflowResource, partition: str, models: dict):
        # Only this batch's partition of `features` is read: a batch costs its own size, not the history's.
        if ranged_keys(context) is not None and latest_checked_materialization(
                context.instance, n.key("features"), partition, context.run_id) is None:
            raise MissingFeatures(f"{n.key_str('features')} [{partition}] has no checked version")
        batch, commit = read_upstream_table(context, lakefs, n.key("features"), partition=partition)
        if batch.height == 0:
            start, end = window(spec, partition)
            raise ValueError(f"no production features for batch {partition} ({start} to {end}) in "
                             f"`features` at lakeFS commit {commit[:12]}: materialize raw_records"
                             f"[{partition}] and features[{partition}] first")
        if not models:  # once per run
            al = registry.aliases(mlflow)
            champ_v = al.get(registry.CHAMPION)
            if not champ_v:
                raise ValueError(f"model {mlflow.model_name} has no `champion` alias in MLflow {mlflow.display_uri}: "
                                 f"train and promote a model first")
            chall_v = al.get(registry.CHALLENGER)
            models.update(champ_v=champ_v, champion=registry.load_booster(mlflow, champ_v), chall_v=chall_v,
                          challenger=registry.load_booster(mlflow, chall_v) if chall_v and chall_v != champ_v
                          else None)
        champ_v, champion, chall_v, challenger = (models["champ_v"], models["champion"], models["chall_v"],
                                                  models["challenger"])
        out = score_batch(batch, spec, champion, champ_v, challenger, chall_v if challenger else None, commit)
        meta = {"rows": out.height, "champion_version": dg.MetadataValue.int(int(champ_v)),
                "mean_prediction": dg.MetadataValue.float(float(out["prediction"].mean())),
                "input_commit": commit, "mlflow_model": dg.MetadataValue.url(mlflow.model_version_url(champ_v))}
        if challenger is not None:
            meta["shadow_version"] = dg.MetadataValue.int(int(chall_v))
            meta["shadow_agreement"] = dg.MetadataValue.float(
                float(((out["prediction"] >= 0.5) == (out["shadow_prediction"] >= 0.5)).mean())
                if spec.is_classification else float((out["prediction"] - out["shadow_prediction"]).abs().mean()))
        return dg.Output(out, metadata=meta)

    return [batch_predictions]
