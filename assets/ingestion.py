"""Ingestion: the labelled history and the production batches and delayed labels from the landing zone.

A batch (partition) grows by files. Each run of `raw_records[p]` / `raw_labels[p]` starts from the batch's
previous checked version in lakeFS and adds the landing files it has not taken yet:
1. files already taken (same name and sha256, kept in the materialization's `ingested_files` ledger) are
   skipped, so a rerun, or a landing file that is gone, never drops a published row;
2. every new file is checked on its own (`contracts`); a bad one is quarantined with its reason and never
   takes a good file with it;
3. the surviving files are added in arrival order under the spec's re-delivery policy
   (`landing.redelivery`): a later file repeating ids already in the batch is quarantined (`reject`) or
   replaces those rows (`replace_by_id`); the earlier file is never judged again;
4. the blocking checks judge the batch as it will be published; quarantined files are reported in the
   metadata and by the WARN check `files_quarantined`. The run fails only if the batch ends up empty.
Labels are judged against the checked records of their batch: a label file with ids the records do not have
yet is held in the landing zone (WARN check `files_held`) while the batch's records are still arriving, and
quarantined only once they have settled (see raw_labels).
"""




import datetime as dt
import io
from pathlib import Path

import dagster as dg
from mlplatform.lazy import lazy_import
pl = lazy_import("polars")

from mlplatform import contracts
from mlplatform.sources import source_name
from mlplatform.batches import Landing, window
from resources.partitions import (merge_check_results, partitions_def, ranged_keys, run_partitions, withhold,
                                  write_partitions)
from resources.lakefs import LakeFSResource
from resources.landing import LandingZoneResource
from resources.naming import Namespace, ns
from mlplatform.spec import DatasetSpec

RECORD_CHECKS = ["files_readable", "schema_and_types", "ids_and_times_present", "unique_ids", "values_in_range",
                 "event_time_in_partition", "unseen_categories_within_limit", "ids_unique_across_batches",
                 "not_empty"]
CONTRACT_CHECKS = RECORD_CHECKS  # the blocking checks of raw_records (older name)
RECORD_CHECK_OF = {"unreadable": "files_readable", "schema": "schema_and_types", "types": "schema_and_types",
                   "nulls": "ids_and_times_present", "duplicates": "unique_ids", "redelivery": "unique_ids",
                   "range": "values_in_range", "time_window": "event_time_in_partition",
                   "future": "event_time_in_partition", "unseen_categories": "unseen_categories_within_limit",
                   "ids_elsewhere": "ids_unique_across_batches", "empty": "not_empty"}
LABEL_CHECKS = ["files_readable", "schema_and_types", "labels_valid", "labels_for_known_ids", "not_empty"]
LABEL_CHECK_OF = {"unreadable": "files_readable", "schema": "schema_and_types", "types": "schema_and_types",
                  "nulls": "labels_valid", "range": "labels_valid", "duplicates": "labels_valid",
                  "redelivery": "labels_valid", "unknown_id": "labels_for_known_ids", "empty": "not_empty"}
REFERENCE_CHECKS = ["schema_and_types", "ids_and_times_present", "unique_ids", "values_in_range",
                    "unseen_categories_within_limit", "not_empty"]
QUARANTINE_CHECK = "files_quarantined"
HELD_CHECK = "files_held"  # raw_labels (WARN): label files left in the landing zone until their records settle

# (repository, path, lakeFS checksum) -> ids of a published batch: objects are immutable per checksum.
_IDS_CACHE: "dict[tuple[str, str, str], pl.Series]" = {}


def check_results(asset_key: dg.AssetKey, names: list[str], violations: list[contracts.Violation],
                  check_of: dict[str, str], warnings: list[contracts.Violation] | None = None,
                  warn_check: str | None = None, quarantined: list[dict] | None = None):
    """One AssetCheckResult per contract check, failing with file/column/rows/examples where violated; then
    the WARN checks: unseen categories below the limit, and the files sent to quarantine."""
    by_check: dict[str, list[contracts.Violation]] = {n: [] for n in names}
    for v in violations:
        by_check.setdefault(check_of.get(v.check, v.check), []).append(v)
    for name in names:
        found = by_check.get(name, [])
        yield dg.AssetCheckResult(
            asset_key=asset_key, check_name=name, passed=not found,
            severity=dg.AssetCheckSeverity.ERROR,
            description="; ".join(v.message for v in found)[:2000] if found else "passed",
            metadata={"violations": dg.MetadataValue.json([v.as_dict() for v in found])} if found else {},
        )
    if warn_check:
        warnings = warnings or []
        yield dg.AssetCheckResult(
            asset_key=asset_key, check_name=warn_check, passed=not warnings,
            severity=dg.AssetCheckSeverity.WARN,
            description="; ".join(v.message for v in warnings)[:2000] if warnings else "no unseen categories",
            metadata={"violations": dg.MetadataValue.json([v.as_dict() for v in warnings])} if warnings else {},
        )
    if quarantined is not None:
        yield dg.AssetCheckResult(
            asset_key=asset_key, check_name=QUARANTINE_CHECK, passed=not quarantined,
            severity=dg.AssetCheckSeverity.WARN,
            description=("; ".join(f"{q['file']} quarantined: {q['reason']}" for q in quarantined)[:2000]
                         if quarantined else "no file quarantined"),
            metadata={"quarantined": dg.MetadataValue.json(quarantined)} if quarantined else {},
        )


def _reason(violations: list[contracts.Violation]) -> str:
    parts = []
    for v in violations:
        text = v.message
        if v.examples and "e.g." not in text:
            text += f", e.g. {[str(e) for e in v.examples[:3]]}"
        parts.append(text)
    return "; ".join(parts)


def _arrival_order(paths: list[Path]) -> list[Path]:
    """Files by arrival (mtime, then name): a later file is judged against the earlier ones, never the reverse."""
    stamped = []
    for p in paths:
        try:
            stamped.append((p.stat().st_mtime, p.name, p))
        except FileNotFoundError:  # taken away between listing and now
            continue
    return [p for _, _, p in sorted(stamped)]


def _entries(paths: list[Path], names: list[str]) -> list[str]:
    """`name|size|mtime_ns` of the landing files the batch now holds (the arrival sensor's proof that this
    materialization read the files as they are)."""
    out = []
    for p in paths:
        if p.name in names:
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append(f"{p.name}|{st.st_size}|{st.st_mtime_ns}")
    return out


def _quarantine(context, zone: Landing, kind: str, partition: str, path: Path,
                violations: list[contracts.Violation]) -> dict:
    reason = _reason(violations)
    try:
        target = str(zone.quarantine(kind, partition, path, reason, context.run.run_id))
        context.log.error(f"quarantined {kind}/{partition}/{path.name}: {reason}")
    except FileNotFoundError:
        target = "(the file was gone from the landing zone before it could be moved)"
        context.log.error(f"rejected {kind}/{partition}/{path.name}: {reason}; {target}")
    except OSError as exc:  # e.g. a full disk or a read-only quarantine: the other files carry on
        target = (f"(not moved: quarantining into {zone.quarantine_dir(kind, partition)} failed: "
                  f"{type(exc).__name__}: {exc}; the file is left in place at {path})")
        context.log.error(f"rejected {kind}/{partition}/{path.name}: {reason}; {target}")
    first = violations[0]
    return {"file": path.name, "check": first.check, "column": first.column or "", "rows": first.rows,
            "reason": reason, "quarantined_to": target}


def _rejected_table(quarantined: list[dict]) -> dg.MetadataValue:
    cols = ["file", "check", "column", "rows", "reason", "quarantined_to"]
    return dg.MetadataValue.table(
        records=[dg.TableRecord({c: (q[c] if c == "rows" else str(q[c])[:1000]) for c in cols}) for q in quarantined],
        schema=dg.TableSchema(columns=[dg.TableColumn(c, "int" if c == "rows" else "string") for c in cols]),
    )


def _previous_version(context, lakefs: LakeFSResource, key: dg.AssetKey,
                      partition: str) -> "tuple[pl.DataFrame | None, dict[str, str | None]]":
    """The batch's latest checked version and the ledger of landing files it holds (name -> sha256)."""
    from resources.io import _meta_text, deserialize, latest_checked_materialization

    found = latest_checked_materialization(context.instance, key, partition, context.run.run_id)
    if found is None:
        return None, {}
    commit, path, run_id = found
    df = deserialize(lakefs.get(commit, path), path)
    ledger = None
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=50).records
    for rec in records:
        meta = rec.asset_materialization.metadata if rec.asset_materialization else {}
        if rec.run_id == run_id and _meta_text(meta.get("lakefs_commit")) == commit:
            value = meta.get("ingested_files")
            if value is not None:
                ledger = dict(getattr(value, "data", value))
            break
    if ledger is None:  # a version written before ledgers were kept: its file names are the record
        ledger = {n: None for n in df[contracts.SOURCE_FILE].unique().to_list()} \
            if contracts.SOURCE_FILE in df.columns else {}
    return df, ledger


# The record-id index: one small parquet file of a batch's sorted, distinct ids per partition, written on the
# run's branch with the partition (so batches of different partitions never write the same path and merge
# without conflict), its smallest and largest id in the object's user metadata. A new batch reads the listing
# (metadata only) and then only the index files whose id range overlaps its own ids, semi-joined against them:
# its cost follows the batch, not the history (ids that grow over time touch one or two files).
# Each data set has its own index under `index/<data set>/record_ids/` (one lakeFS repository, a prefix per data set).
ID_MIN, ID_MAX = "id_min", "id_max"


def id_index_prefix(spec: DatasetSpec) -> str:
    return f"index/{spec.name}/record_ids/"


def id_index_path(spec: DatasetSpec, partition: str) -> str:
    return f"{id_index_prefix(spec)}partition={partition}.parquet"


def write_id_index(lakefs: LakeFSResource, branch: str, spec: DatasetSpec, partition: str, df: "pl.DataFrame") -> None:
    """Write the batch's id index on its branch (committed with the batch by the I/O manager)."""
    ids = df.select(pl.col(spec.id_column).drop_nulls().unique().sort())
    buf = io.BytesIO()
    ids.write_parquet(buf)
    meta = {ID_MIN: "", ID_MAX: ""}
    if ids.height:
        meta = {ID_MIN: str(ids[spec.id_column][0]), ID_MAX: str(ids[spec.id_column][-1])}
    path = id_index_path(spec, partition)
    lakefs.call(f"write id index {path}", lambda: lakefs.repo().branch(branch).object(
        path).upload(buf.getvalue(), content_type="application/x-parquet", metadata=meta), branch)


def _overlaps(meta: dict, lo, hi, dtype) -> bool:
    """Might an index file with this (min, max) metadata hold an id in [lo, hi]? Unknown -> yes."""
    if not meta or ID_MIN not in meta or ID_MAX not in meta:
        return True
    if meta[ID_MIN] == "":
        return False  # an empty batch
    try:
        fmin, fmax = pl.Series([meta[ID_MIN], meta[ID_MAX]]).cast(dtype).to_list()
    except Exception:  # noqa: BLE001 - a metadata value that does not cast: read the file
        return True
    return not (fmax < lo or fmin > hi)


def _read_ids(lakefs: LakeFSResource, ref: str, path: str, checksum: str, column: str) -> "pl.Series":
    key = (lakefs.repository, path, checksum)
    if key not in _IDS_CACHE:
        data = lakefs.get(ref, path)
        _IDS_CACHE[key] = pl.read_parquet(io.BytesIO(data), columns=[column])[column]
        if len(_IDS_CACHE) > 4096:
            _IDS_CACHE.pop(next(iter(_IDS_CACHE)))
    return _IDS_CACHE[key]


def _ids_elsewhere(context, lakefs: LakeFSResource, spec: DatasetSpec, partition: str,
                   ids: "pl.Series") -> "dict[str, pl.Series]":
    """Which of `ids` (this batch's) other batches and the reference history already hold, as the run's
    branch (main once its predecessors are published) has them: {batch or 'reference': the repeated ids}.

    Reads the id index (listing metadata, then only the files whose id range overlaps `ids`), the reference
    history's id column (a fixed size), and, for a batch published before the index existed, its id column."""
    from resources.io import asset_prefix
    from resources.publish import open_run_branch

    branch = open_run_branch(context.instance, lakefs, context.run.run_id)
    ref = lakefs.repo().ref(branch)
    ids = ids.drop_nulls().unique()
    out: "dict[str, pl.Series]" = {}
    if ids.len() == 0:
        return out
    lo, hi = ids.min(), ids.max()

    def hits(other: "pl.Series") -> "pl.Series":
        return ids.filter(ids.is_in(other.cast(ids.dtype, strict=False).implode()))

    indexed = set()
    for obj in ref.objects(prefix=id_index_prefix(spec), user_metadata=True):
        if not obj.path.endswith(".parquet") or "partition=" not in obj.path:
            continue
        where = obj.path.split("partition=", 1)[1].removesuffix(".parquet")
        indexed.add(where)
        if where == partition or not _overlaps(dict(obj.metadata or {}), lo, hi, ids.dtype):
            continue
        found = hits(_read_ids(lakefs, branch, obj.path, obj.checksum, spec.id_column))
        if found.len():
            out[where] = found
    for prefix in (asset_prefix(ns(spec).key("reference_data")), asset_prefix(ns(spec).key("raw_records"))):
        for obj in ref.objects(prefix=prefix):
            if not obj.path.endswith(".parquet"):
                continue
            where = obj.path.split("partition=", 1)[1].split("/", 1)[0] if "partition=" in obj.path else "reference"
            if where == partition or where in indexed:
                continue
            found = hits(_read_ids(lakefs, branch, obj.path, obj.checksum, spec.id_column))
            if found.len():
                out[where] = found
    return out


def new_landing_files(files, ledger: dict, conform, skipped: list, rejected: list):
    """(path, digest, conformed frame, arrival time) of each landing file not yet in the batch's ledger.

    A file already ingested (same name and content) goes to `skipped`, one that cannot be read or conformed
    to `rejected` with its violation, one that vanished meanwhile is passed over."""
    for path in files:
        try:
            digest = contracts.file_digest(path)
            arrived = dt.datetime.fromtimestamp(path.stat().st_mtime)
        except FileNotFoundError:
            continue
        if contracts.already_ingested(path.name, digest, ledger):
            skipped.append(path.name)
            continue
        try:
            frame = conform(contracts.read_landing_file(path), path.name)
        except contracts.FileRejected as exc:
            rejected.append((path, [exc.violation(path.name)]))
            continue
        yield path, digest, frame, arrived


def build_ingestion(spec: DatasetSpec) -> list:
    partitions = partitions_def(spec)
    n = ns(spec)

    @dg.asset(
        key_prefix=[spec.name], group_name="ingestion", kinds={"polars", "lakefs"}, code_version="2",
        description=f"Labelled history of {spec.name} (the reference period), versioned in lakeFS.",
        check_specs=[dg.AssetCheckSpec(c, asset=n.key("reference_data"), blocking=True) for c in REFERENCE_CHECKS]
        + [dg.AssetCheckSpec("known_categories", asset=n.key("reference_data"))],
    )
    def reference_data(context: dg.AssetExecutionContext):
        reference, _, _ = spec.load_source()
        raw = pl.from_pandas(reference)
        source = source_name(spec, 'reference')
        violations: list[contracts.Violation] = []
        try:
            df = contracts.conform(raw, spec, source, with_target=True)
        except contracts.FileRejected as exc:
            violations.append(exc.violation(source))
            df = raw
        else:
            df = df.with_columns(pl.lit(source).alias(contracts.SOURCE_FILE))
            violations += contracts.check_records(df, spec, None)
            df = df.drop(contracts.SOURCE_FILE)
        tmin, tmax = (df[spec.time_column].min(), df[spec.time_column].max()) if df.height else (None, None)
        yield dg.Output(df, metadata={
            "rows": df.height, "time_from": str(tmin), "time_to": str(tmax), "timezone": spec.timezone,
            "target_mean": float(df[spec.target].mean()) if spec.target in df.columns and df.height else 0.0,
        })
        yield from check_results(reference_data.key, REFERENCE_CHECKS, [v for v in violations if v.blocking],
                                 RECORD_CHECK_OF, [v for v in violations if not v.blocking], "known_categories")

    @dg.asset(
        key_prefix=[spec.name], group_name="ingestion", kinds={"polars", "lakefs"}, code_version="2", partitions_def=partitions,
        description="Production records of one batch period: its previous checked version plus the landing "
                    "files that pass the contract; bad files go to quarantine, the good ones still publish.",
        check_specs=[dg.AssetCheckSpec(c, asset=n.key("raw_records"), blocking=True) for c in RECORD_CHECKS]
        + [dg.AssetCheckSpec("known_categories", asset=n.key("raw_records")),
           dg.AssetCheckSpec(QUARANTINE_CHECK, asset=n.key("raw_records"))],
    )
    def raw_records(context: dg.AssetExecutionContext, landing: LandingZoneResource, lakefs: LakeFSResource):
        keys = ranged_keys(context)
        if keys is None:  # one batch: the I/O manager stores it
            df, meta, checks = ingest_records(context, landing, lakefs, context.partition_key)
            if df.height:  # committed with the batch, on its branch: published (or kept) with it
                from resources.publish import open_run_branch

                write_id_index(lakefs, open_run_branch(context.instance, lakefs, context.run.run_id), spec,
                               context.partition_key, df)
            yield dg.Output(df, metadata=meta)
            yield from checks
            return
        # A burst: every partition of the range judged on its own. One that fails a blocking check is withheld
        # (not written: main never sees it; its bad files are quarantined with their reasons) and the others
        # publish; the checks report every partition, the withheld ones under the WARN check files_quarantined.
        values, metas, checks_by, originals = {}, {}, {}, {}
        for partition in keys:
            df, meta, checks = ingest_records(context, landing, lakefs, partition)
            failed = [c for c in checks if not c.passed and c.severity == dg.AssetCheckSeverity.ERROR]
            originals[partition] = checks
            if failed:
                why = "; ".join(f"{c.check_name}: {c.description}" for c in failed)
                withhold(context, raw_records.key, partition, why)
                checks = [c for c in checks if c.severity != dg.AssetCheckSeverity.ERROR]
                checks = [c if c.check_name != QUARANTINE_CHECK else dg.AssetCheckResult(
                    asset_key=c.asset_key, check_name=c.check_name, passed=False, severity=dg.AssetCheckSeverity.WARN,
                    description=f"batch withheld from publication ({why}); {c.description}"[:2000],
                    metadata=c.metadata) for c in checks]
                context.add_asset_metadata({k: v for k, v in meta.items() if k != "ingested_files"},
                                           asset_key=raw_records.key, partition_key=partition)
            else:
                from resources.publish import open_run_branch

                write_id_index(lakefs, open_run_branch(context.instance, lakefs, context.run.run_id), spec,
                               partition, df)  # before the next partition judges its ids against it
                values[partition], metas[partition] = df, meta
            checks_by[partition] = checks
        if not values:  # nothing left to publish: the run fails on the partitions' own blocking checks
            checks_by = originals
        write_partitions(context, lakefs, raw_records.key, values, metas)
        yield dg.Output(None, metadata={"partitions_published": dg.MetadataValue.json(sorted(values)),
                                        "partitions_withheld": dg.MetadataValue.json(
                                            sorted(set(keys) - set(values)))})
        yield from merge_check_results(checks_by)

    def ingest_records(context: dg.AssetExecutionContext, landing: LandingZoneResource, lakefs: LakeFSResource,
                       partition: str):
        """One batch's records: (frame, metadata, check results)."""
        zone = landing.zone(spec)
        win = window(spec, partition)
        schema = {**contracts.expected_dtypes(spec), contracts.SOURCE_FILE: pl.String}
        previous, ledger = _previous_version(context, lakefs, raw_records.key, partition)
        files = _arrival_order(zone.files("records", partition))
        by_name = {p.name: p for p in files}

        skipped, deliveries, warnings = [], [], []
        rejected: list[tuple[Path, list[contracts.Violation]]] = []
        arrived = list(new_landing_files(files, ledger, lambda df, name: contracts.conform(df, spec, name),
                                         skipped, rejected))
        # Ids other batches already hold, looked up for this batch's ids only (the id index): its own cost.
        candidates = [f[2][spec.id_column] for f in arrived]
        if previous is not None and previous.height:
            candidates.append(previous[spec.id_column])
        elsewhere = _ids_elsewhere(context, lakefs, spec, partition,
                                   pl.concat([c.cast(candidates[0].dtype, strict=False) for c in candidates])
                                   if candidates else pl.Series(spec.id_column, []))
        # 1. per file
        for path, digest, frame, _ in arrived:
            frame = frame.with_columns(pl.lit(path.name).alias(contracts.SOURCE_FILE))
            found = contracts.check_records(frame, spec, win) + contracts.check_ids_elsewhere(frame, spec, elsewhere)
            blocking = [v for v in found if v.blocking]
            if blocking:
                rejected.append((path, blocking))
                continue
            warnings += [v for v in found if not v.blocking]
            deliveries.append(contracts.Delivery(path.name, digest, frame))
        # 2. across the survivors and the rows already in the batch
        merged = contracts.merge_deliveries(previous, deliveries, ledger, spec, schema, partition)
        rejected += [(by_name[name], [v]) for name, v in merged.rejected]
        warnings = [v for v in warnings if v.file in merged.accepted]
        quarantined = [_quarantine(context, zone, "records", partition, p, vs) for p, vs in rejected]

        df = merged.frame
        if df.height:  # 3. the blocking checks judge the batch as it will be published
            violations = [v for v in contracts.check_records(df, spec, win)
                          + contracts.check_ids_elsewhere(df, spec, elsewhere) if v.blocking]
        else:
            violations = [contracts.Violation(
                "empty", f"no file of batch {partition} was accepted ({len(files)} file(s) found in "
                         f"{zone.records_dir(partition)}" + (f", {len(rejected)} quarantined" if rejected else "")
                         + ")")]
            violations += [v for _, vs in rejected for v in vs]
        context.log.info(f"batch {partition}: {len(previous) if previous is not None else 0} row(s) before, "
                         f"accepted {merged.accepted}, already ingested {skipped}, quarantined "
                         f"{[q['file'] for q in quarantined]}, {df.height} row(s) now")
        meta = {
            "rows": df.height,
            "rows_before": previous.height if previous is not None else 0,
            "files": dg.MetadataValue.json(_entries(files, merged.accepted + skipped)),
            "files_accepted": dg.MetadataValue.json(merged.accepted),
            "files_already_ingested": dg.MetadataValue.json(skipped),
            "files_rejected": len(quarantined),
            "rows_replaced": dg.MetadataValue.json(merged.replaced),
            "ingested_files": dg.MetadataValue.json(merged.ledger),
            "redelivery_policy": spec.redelivery,
            **({"rejected": _rejected_table(quarantined)} if quarantined else {}),
        }
        return df, meta, list(check_results(raw_records.key, RECORD_CHECKS, violations, RECORD_CHECK_OF, warnings,
                                            "known_categories", quarantined))

    @dg.asset(
        key_prefix=[spec.name], group_name="ingestion", kinds={"polars", "lakefs"}, code_version="2", partitions_def=partitions,
        description="Delayed labels of one batch period: its previous checked version plus the label files "
                    "that pass the contract (only for ids in the batch's records); bad files go to quarantine; "
                    "a file with ids whose records are still arriving is held in the landing zone.",
        check_specs=[dg.AssetCheckSpec(c, asset=n.key("raw_labels"), blocking=True) for c in LABEL_CHECKS]
        + [dg.AssetCheckSpec(QUARANTINE_CHECK, asset=n.key("raw_labels")), dg.AssetCheckSpec(HELD_CHECK, asset=n.key("raw_labels"))],
        deps=[dg.AssetDep(n.key("raw_records"))],
    )
    def raw_labels(context: dg.AssetExecutionContext, landing: LandingZoneResource, lakefs: LakeFSResource):
        partition = context.partition_key
        zone = landing.zone(spec)
        schema = {spec.id_column: pl.Int64, spec.target: pl.Float64, contracts.SOURCE_FILE: pl.String,
                  contracts.ARRIVED_AT: pl.Datetime("us")}
        previous, ledger = _previous_version(context, lakefs, raw_labels.key, partition)
        records, records_ledger = _previous_version(context, lakefs, n.key("raw_records"), partition)
        known = records[spec.id_column] if records is not None else None
        files = _arrival_order(zone.files("labels", partition))
        by_name = {p.name: p for p in files}
        pending: list[str] | None = None  # why the partition's records are not settled (computed once, if needed)

        # Unknown ids: HOLD or QUARANTINE. A label file is taken whole or not at all (the ledger records whole
        # files, so taking its known rows now would make the rest look ingested and lose them). A file whose
        # ids are not all in the checked records is HELD (left in the landing zone, out of the ledger and of
        # `files`, listed in `files_held`) while the records of the partition are not settled: a records file
        # of the partition in the landing zone is incomplete or not yet in the checked batch, or an
        # ingest_batch run of the partition is queued or running. The arrival sensor sees a held file as not
        # ingested and requests it again once the records publish. Once the records are settled, ids still
        # unknown quarantine the file. A file with any other fault is quarantined at once.
        skipped, held, deliveries = [], [], []
        held_why: dict[str, str] = {}
        rejected: list[tuple[Path, list[contracts.Violation]]] = []
        for path, digest, frame, arrived in new_landing_files(
                files, ledger, lambda df, name: contracts.conform_labels(df, spec, name), skipped, rejected):
            frame = frame.with_columns(pl.lit(path.name).alias(contracts.SOURCE_FILE),
                                       pl.lit(arrived).cast(pl.Datetime("us")).alias(contracts.ARRIVED_AT))
            found = contracts.check_labels(frame, spec, known, partition)
            unknown = [v for v in found if v.check == "unknown_id"]
            if len(found) > len(unknown):  # a fault of the file itself: the records cannot cure it
                rejected.append((path, found))
            elif known is None:
                held.append(path.name)  # records not ingested yet: judged (and taken) once they are
                held_why[path.name] = f"the records of batch {partition} have no checked version yet"
            elif unknown:
                if pending is None:
                    pending = _records_pending(context, n, zone, partition, records_ledger)
                if pending:
                    held.append(path.name)
                    held_why[path.name] = (f"{unknown[0].rows} label(s) for ids not (yet) in the records of "
                                           f"batch {partition}, e.g. {[str(e) for e in unknown[0].examples[:3]]}, "
                                           f"while its records are still arriving ({'; '.join(pending)})")
                else:  # records settled: the ids will not come
                    rejected.append((path, unknown))
            else:
                deliveries.append(contracts.Delivery(path.name, digest, frame))
        merged = contracts.merge_deliveries(previous, deliveries, ledger, spec, schema, partition)
        rejected += [(by_name[name], [v]) for name, v in merged.rejected]
        quarantined = [_quarantine(context, zone, "labels", partition, p, vs) for p, vs in rejected]
        for name in held:
            context.log.warning(f"held labels/{partition}/{name} in the landing zone: {held_why[name]}")

        _, end = window(spec, partition)
        available = end + dt.timedelta(days=spec.label_delay_days)
        df = merged.frame.with_columns(pl.lit(available).cast(pl.Datetime("us")).alias("label_available_at"))
        violations = [v for v in contracts.check_labels(df, spec, known, partition) if v.check != "empty"]
        held_text = "; ".join(f"{n}: {held_why[n]}" for n in held)
        if held and df.height == 0:  # nothing to publish: the run fails, naming what it waits for
            violations.append(contracts.Violation(
                "unknown_id", (f"the records of batch {partition} have no checked version yet: label file(s) "
                               f"{held} are held in {zone.labels_dir(partition)} and taken once the records are "
                               f"ingested" if known is None else
                               f"label file(s) {held} are held in {zone.labels_dir(partition)} (not quarantined) "
                               f"and taken once the records are ingested: {held_text}"),
                spec.id_column, ", ".join(held)))
        elif df.height == 0:
            violations.append(contracts.Violation(
                "empty", f"no label file of batch {partition} was accepted ({len(files)} file(s) found in "
                         f"{zone.labels_dir(partition)}" + (f", {len(rejected)} quarantined" if rejected else "")
                         + ")"))
            violations += [v for _, vs in rejected for v in vs]
        yield dg.Output(df, metadata={
            "rows": df.height, "rows_before": previous.height if previous is not None else 0,
            "files": dg.MetadataValue.json(_entries(files, merged.accepted + skipped)),
            "files_accepted": dg.MetadataValue.json(merged.accepted),
            "files_already_ingested": dg.MetadataValue.json(skipped),
            "files_held": dg.MetadataValue.json(held),
            **({"files_held_reason": held_text[:4000]} if held else {}),
            "files_rejected": len(quarantined),
            "rows_replaced": dg.MetadataValue.json(merged.replaced),
            "ingested_files": dg.MetadataValue.json(merged.ledger),
            "label_available_at": str(available),
            **({"rejected": _rejected_table(quarantined)} if quarantined else {}),
        })
        yield from check_results(raw_labels.key, LABEL_CHECKS, violations, LABEL_CHECK_OF,
                                 quarantined=quarantined)
        yield dg.AssetCheckResult(
            asset_key=raw_labels.key, check_name=HELD_CHECK, passed=not held, severity=dg.AssetCheckSeverity.WARN,
            description=(f"held in {zone.labels_dir(partition)}: {held_text}"[:2000] if held
                         else "no label file held"),
            metadata={"held": dg.MetadataValue.json(held)} if held else {},
        )

    return [reference_data, raw_records, raw_labels]


def _records_pending(context: dg.AssetExecutionContext, n: Namespace, zone: Landing, partition: str,
                     records_ledger: dict[str, str | None]) -> list[str]:
    """Why the records of a partition are not settled (empty: settled): records files in the landing zone
    still being written or not in the batch's checked version (`records_ledger`), and ingest_batch runs of
    the partition queued or running. Files quarantined by a records run have left the landing zone."""
    out = []
    for f in zone.landed("records", partition):
        if not f.complete:
            out.append(f"{f.name} still being written")
            continue
        try:
            digest = contracts.file_digest(f.path)
        except FileNotFoundError:
            continue
        if not contracts.already_ingested(f.name, digest, records_ledger):
            out.append(f"{f.name} not yet ingested")
    waiting = {dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
               dg.DagsterRunStatus.STARTED}
    runs = context.instance.get_run_records(
        dg.RunsFilter(job_name=n.job("ingest_batch"), tags={"dagster/partition": partition}, statuses=list(waiting)),
        limit=10)
    runs += [r for r in context.instance.get_run_records(  # ranged runs (a burst) covering the partition
        dg.RunsFilter(job_name=n.job("ingest_batch"), statuses=list(waiting)), limit=50)
        if not r.dagster_run.tags.get("dagster/partition")
        and partition in run_partitions(r.dagster_run, _keys_of(context))]
    out += [f"ingest_batch run {r.dagster_run.run_id} is {r.dagster_run.status.value.lower()}"
            for r in runs if r.dagster_run.run_id != context.run.run_id]
    return out


def _keys_of(context) -> list[str]:
    defs = context.assets_def.partitions_def
    return list(defs.get_partition_keys()) if defs is not None else []
