"""Closing the loop: the server's prediction log (mlplatform.serving.predlog) into lakeFS, per partition.

`make serve` writes each online prediction (request id, entity id, time, variant, model version, features,
output, policy flags) to Parquet files under <state dir>/online_predictions/<data set>/<partition>/, in
batches and off the response path. `online_predictions` reads every complete file of its partition (the
whole partition each time, de-duplicated by request, row and shadow flag, so a re-run is idempotent) and
writes it through the lakeFS IO manager, committed on the run's branch like every other batch asset.
"""

import dagster as dg

from mlplatform.serving.predlog import read_spool, spool_dir
from mlplatform.serving.settings import load_serving_settings
from mlplatform.spec import DatasetSpec
from resources.partitions import partitions_def


def build_online(spec: DatasetSpec) -> list:
    @dg.asset(
        group_name="serving", kinds={"polars", "lakefs"}, code_version="1", partitions_def=partitions_def(spec),
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

    return [online_predictions]
