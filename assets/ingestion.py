"""Ingestion: the labelled history and the production batches and delayed labels from the landing zone."""


import datetime as dt
import json

import dagster as dg
import polars as pl

from mlplatform import contracts
from mlplatform.batches import partitions_def, window
from resources.lakefs import LakeFSResource
from resources.landing import LandingZoneResource
from resources.settings import DatasetSpec

CONTRACT_CHECKS = ["files_readable", "schema_and_types", "ids_and_times_present", "unique_ids", "values_in_range",
                   "event_time_in_partition", "not_empty"]
VIOLATION_TO_CHECK = {"nulls": "ids_and_times_present", "duplicates": "unique_ids", "range": "values_in_range",
                      "time_window": "event_time_in_partition", "future": "event_time_in_partition",
                      "empty": "not_empty", "schema": "schema_and_types", "types": "schema_and_types"}


def check_results(asset_key: dg.AssetKey, names: list[str], violations: list[contracts.Violation],
                  rejected: list[dict] | None = None, warn_check: str | None = None):
    """One AssetCheckResult per contract check, failing with file/column/rows/examples where violated."""
    by_check: dict[str, list[contracts.Violation]] = {n: [] for n in names}
    warnings = []
    for v in violations:
        if not v.blocking:
            warnings.append(v)
            continue
        by_check.setdefault(VIOLATION_TO_CHECK.get(v.check, v.check), []).append(v)
    if rejected:
        by_check.setdefault("files_readable", []).extend(
            contracts.Violation("files_readable", r["reason"], file=r["file"]) for r in rejected
            if not r.get("row_level"))
    for name in names:
        found = by_check.get(name, [])
        yield dg.AssetCheckResult(
            asset_key=asset_key, check_name=name, passed=not found,
            severity=dg.AssetCheckSeverity.ERROR,
            description="; ".join(v.message for v in found)[:2000] if found else "passed",
            metadata={"violations": dg.MetadataValue.json([v.as_dict() for v in found])} if found else {},
        )
    if warn_check:
        yield dg.AssetCheckResult(
            asset_key=asset_key, check_name=warn_check, passed=not warnings,
            severity=dg.AssetCheckSeverity.WARN,
            description="; ".join(v.message for v in warnings)[:2000] if warnings else "no unseen categories",
            metadata={"violations": dg.MetadataValue.json([v.as_dict() for v in warnings])} if warnings else {},
        )


def build_ingestion(spec: DatasetSpec) -> list:
    partitions = partitions_def(spec)
    ref_checks = ["schema_and_types", "ids_and_times_present", "unique_ids", "values_in_range", "not_empty"]

    @dg.asset(
        group_name="ingestion", kinds={"polars", "lakefs"}, code_version="1",
        description=f"Labelled history of {spec.name} (the reference period), versioned in lakeFS.",
        check_specs=[dg.AssetCheckSpec(n, asset="reference_data", blocking=True) for n in ref_checks]
        + [dg.AssetCheckSpec("known_categories", asset="reference_data")],
    )
    def reference_data(context: dg.AssetExecutionContext):
        reference, _, _ = spec.load_source()
        raw = pl.from_pandas(reference)
        source = f"{spec.loader} (reference)"
        violations: list[contracts.Violation] = []
        try:
            df = contracts.conform(raw, spec, source, with_target=True)
        except contracts.FileRejected as exc:
            violations.append(contracts.Violation("schema", str(exc), file=source))
            df = raw
        else:
            df = df.with_columns(pl.lit(source).alias(contracts.SOURCE_FILE))
            violations += contracts.check_records(df, spec, None)
            df = df.drop(contracts.SOURCE_FILE)
        tmin, tmax = (df[spec.time_column].min(), df[spec.time_column].max()) if df.height else (None, None)
        yield dg.Output(df, metadata={
            "rows": df.height, "time_from": str(tmin), "time_to": str(tmax),
            "target_mean": float(df[spec.target].mean()) if spec.target in df.columns and df.height else 0.0,
        })
        yield from check_results(reference_data.key, ref_checks, violations, warn_check="known_categories")

    @dg.asset(
        group_name="ingestion", kinds={"polars", "lakefs"}, code_version="1", partitions_def=partitions,
        description="Production records of one batch period, read from the landing zone and contract-checked.",
        check_specs=[dg.AssetCheckSpec(n, asset="raw_records", blocking=True) for n in CONTRACT_CHECKS]
        + [dg.AssetCheckSpec("known_categories", asset="raw_records")],
    )
    def raw_records(context: dg.AssetExecutionContext, landing: LandingZoneResource):
        partition = context.partition_key
        zone = landing.zone()
        files = zone.files("records", partition)
        frames, rejected = [], []
        for path in files:
            try:
                frame = contracts.conform(contracts.read_landing_file(path), spec, path.name)
            except contracts.FileRejected as exc:
                target = zone.quarantine("records", partition, path, str(exc), context.run_id)
                rejected.append({"file": path.name, "reason": str(exc), "quarantined_to": str(target)})
                context.log.error(f"quarantined {path.name}: {exc}")
                continue
            frames.append(frame.with_columns(pl.lit(path.name).alias(contracts.SOURCE_FILE)))
        schema = {**contracts.expected_dtypes(spec), contracts.SOURCE_FILE: pl.String}
        df = pl.concat(frames, how="vertical") if frames else pl.DataFrame(schema=schema)
        violations = contracts.check_records(df, spec, window(spec, partition)) if frames else \
            [contracts.Violation("empty", f"no readable file landed for batch {partition} "
                                          f"({len(files)} file(s) found in {zone.records_dir(partition)})")]
        # A file whose rows break the contract goes to quarantine too; the batch's good files stay.
        by_file: dict[str, list[str]] = {}
        for v in violations:
            if v.blocking and v.file:
                for name in v.file.split(", "):
                    by_file.setdefault(name, []).append(v.message)
        for path in files:
            if path.name in by_file and path.exists():
                reason = "; ".join(by_file[path.name])
                target = zone.quarantine("records", partition, path, reason, context.run_id)
                rejected.append({"file": path.name, "reason": reason, "quarantined_to": str(target),
                                 "row_level": True})
                context.log.error(f"quarantined {path.name}: {reason}")
        yield dg.Output(df, metadata={
            "rows": df.height, "files": dg.MetadataValue.json([p.name for p in files]),
            "files_rejected": len(rejected),
            **({"rejected": dg.MetadataValue.json(rejected)} if rejected else {}),
        })
        yield from check_results(raw_records.key, CONTRACT_CHECKS, violations, rejected, "known_categories")

    label_checks = ["files_readable", "labels_valid", "labels_for_known_ids", "not_empty"]

    @dg.asset(
        group_name="ingestion", kinds={"polars", "lakefs"}, code_version="1", partitions_def=partitions,
        description="Delayed labels for one batch period, as they arrive in the landing zone.",
        check_specs=[dg.AssetCheckSpec(n, asset="raw_labels", blocking=True) for n in label_checks],
        deps=[dg.AssetDep("raw_records")],
    )
    def raw_labels(context: dg.AssetExecutionContext, landing: LandingZoneResource, lakefs: LakeFSResource):
        partition = context.partition_key
        zone = landing.zone()
        files = zone.files("labels", partition)
        frames, rejected = [], []
        schema = {spec.id_column: pl.Int64, spec.target: pl.Float64}
        for path in files:
            try:
                frame = contracts.read_landing_file(path)
                missing = [c for c in schema if c not in frame.columns]
                if missing or frame.height == 0:
                    raise contracts.FileRejected(
                        f"{path.name}: " + (f"missing column(s) {missing}" if missing else "has no rows"))
                frame = frame.select([pl.col(c).cast(t, strict=True) for c, t in schema.items()])
            except contracts.FileRejected as exc:
                reason = str(exc)
            except Exception as exc:  # noqa: BLE001 - a cast failure is a contract failure of the file
                reason = f"{path.name}: labels do not match the contract ({type(exc).__name__}: {str(exc)[:200]})"
            else:
                frames.append(frame.with_columns(
                    pl.lit(path.name).alias(contracts.SOURCE_FILE),
                    pl.lit(dt.datetime.fromtimestamp(path.stat().st_mtime)).alias("_arrived_at")))
                continue
            target = zone.quarantine("labels", partition, path, reason, context.run_id)
            rejected.append({"file": path.name, "reason": reason, "quarantined_to": str(target)})
        df = pl.concat(frames) if frames else pl.DataFrame(
            schema={**schema, contracts.SOURCE_FILE: pl.String, "_arrived_at": pl.Datetime("us")})
        known = _known_ids(context, lakefs, spec, partition)
        violations = contracts.check_labels(df, spec, known) if frames else \
            [contracts.Violation("empty", f"no readable label file for batch {partition}")]
        remap = {"nulls": "labels_valid", "range": "labels_valid", "duplicates": "labels_valid",
                 "unknown_id": "labels_for_known_ids", "empty": "not_empty"}
        for v in violations:
            v.check = remap.get(v.check, v.check)
        # Labels become available when the batch period ends plus the label delay (the point-in-time rule).
        _, end = window(spec, partition)
        df = df.with_columns(pl.lit(end + dt.timedelta(days=spec.label_delay_days)).alias("label_available_at"))
        yield dg.Output(df, metadata={"rows": df.height, "files_rejected": len(rejected),
                                      "label_available_at": str(end + dt.timedelta(days=spec.label_delay_days))})
        yield from check_results(raw_labels.key, label_checks, violations, rejected)

    return [reference_data, raw_records, raw_labels]


def _known_ids(context: dg.AssetExecutionContext, lakefs: LakeFSResource, spec: DatasetSpec,
               partition: str) -> pl.Series | None:
    """Ids of the records batch these labels belong to, from its latest checked version in lakeFS."""
    from resources.io import deserialize, latest_checked_materialization

    found = latest_checked_materialization(context.instance, dg.AssetKey("raw_records"), partition, context.run_id)
    if found is None:
        return pl.Series(spec.id_column, [], dtype=pl.Int64)
    df = deserialize(lakefs.get(found[0], found[1]), found[1])
    return df[spec.id_column]
