"""A data set's batch periods as Dagster partitions, built from the library's cadence table
(mlplatform.batches: CRON, KEY_FORMAT), so the keys Dagster shows are the keys the library computes."""

from __future__ import annotations

import dagster as dg

from mlplatform.batches import CRON, KEY_FORMAT, _first, _parse_bound
from mlplatform.spec import DatasetSpec


def partitions_def(spec: DatasetSpec) -> dg.TimeWindowPartitionsDefinition:
    fmt = KEY_FORMAT[spec.cadence]
    start = _first(spec.cadence, _parse_bound(spec.batch_start)).strftime(fmt)
    end = _parse_bound(spec.batch_end).strftime(fmt) if spec.batch_end else None
    return dg.TimeWindowPartitionsDefinition(cron_schedule=CRON[spec.cadence], fmt=fmt, start=start, end=end)


# --- Ranged runs ---------------------------------------------------------------------------------------------
# A burst of batches (several partitions landing at once) is ingested and scored by ONE run over the contiguous
# range of their partitions (sensors/arrivals.py, sensors/publish.py): the run's fixed costs (process start,
# definitions load, imports) are paid once. Dagster marks such a run with the range tags below (no
# `dagster/partition`); the assets loop over `context.partition_keys` and write each partition to its own lakeFS
# path on the run's branch (one commit per asset), with that partition's metadata on its own materialization.
# A single-partition run keeps the single-partition path (the I/O manager), unchanged.
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
WITHHELD = "withheld"  # metadata of a partition a ranged run did not publish: why


def ranged_keys(context) -> list[str] | None:
    """The partition keys of a ranged run (more than one partition), else None (a one-partition run)."""
    try:
        keys = list(context.partition_keys)
    except Exception:  # noqa: BLE001 - an unpartitioned context
        return None
    return keys if len(keys) > 1 else None


def range_tags(start: str, end: str) -> dict[str, str]:
    return {RANGE_START_TAG: start, RANGE_END_TAG: end}


def run_partitions(run, partition_keys: list[str]) -> list[str]:
    """The partitions a run covers: its `dagster/partition`, or every key of its range (in `partition_keys`)."""
    if run.tags.get("dagster/partition"):
        return [run.tags["dagster/partition"]]
    start, end = run.tags.get(RANGE_START_TAG), run.tags.get(RANGE_END_TAG)
    if not start or not end or start not in partition_keys or end not in partition_keys:
        return []
    return partition_keys[partition_keys.index(start):partition_keys.index(end) + 1]


def contiguous_groups(keys: list[str], partition_keys: list[str], max_size: int = 31) -> list[list[str]]:
    """`keys` grouped into runs of consecutive partitions (in the order of `partition_keys`), at most `max_size`
    partitions each: one ranged run per group."""
    index = {k: i for i, k in enumerate(partition_keys)}
    groups: list[list[str]] = []
    for key in sorted((k for k in set(keys) if k in index), key=index.__getitem__):
        if groups and index[key] == index[groups[-1][-1]] + 1 and len(groups[-1]) < max_size:
            groups[-1].append(key)
        else:
            groups.append([key])
    return groups


def write_partitions(context, lakefs, key: dg.AssetKey, values: dict, metadata: dict[str, dict] | None = None) -> None:
    """A ranged run's output of asset `key`: each partition's value (`{partition: DataFrame | dict | str}`)
    written to its own path on the run's branch, all committed at once, and each partition's materialization
    given its lakeFS commit and path (what later runs read, as from the I/O manager) and its own `metadata`."""
    import polars as pl

    from resources.io import asset_path, git_commit, serialize
    from resources.publish import open_run_branch

    metadata = metadata or {}
    branch = open_run_branch(context.instance, lakefs, context.run.run_id)
    written = {}
    for partition, obj in values.items():
        data, suffix, content_type = serialize(obj)
        path = asset_path(key, partition, suffix)
        lakefs.put(branch, path, data, content_type)
        written[partition] = (path, len(data), obj)
    if not written:
        return
    code_version = None
    try:
        code_version = context.assets_def.code_versions_by_key.get(key)
    except Exception:  # noqa: BLE001
        pass
    upstream = {}
    try:  # what the step read (read_upstream_table, the I/O manager's loads): the commit's lineage
        from resources.io import _LOADED_COMMITS

        upstream = dict(_LOADED_COMMITS.get((context.run.run_id, context.get_step_execution_context().step.key), {}))
    except Exception:  # noqa: BLE001 - outside a step
        pass
    parts = sorted(written)
    commit = lakefs.commit(branch, message=f"{key.to_user_string()} [{parts[0]}...{parts[-1]}] ({len(parts)} partitions)",
                           metadata={"asset_key": key.to_user_string(), "partition": ",".join(parts),
                                     "dagster_run_id": context.run.run_id, "code_version": code_version or git_commit(),
                                     "git_commit": git_commit(), "upstream_commits": upstream})
    for partition, (path, size, obj) in written.items():
        meta = {**metadata.get(partition, {}),
                "lakefs_commit": dg.MetadataValue.text(commit),
                "lakefs_path": dg.MetadataValue.path(lakefs.uri(commit, path)),
                "lakefs_branch": dg.MetadataValue.text(branch),
                "lakefs_link": dg.MetadataValue.url(lakefs.commit_url(commit)),
                "bytes": dg.MetadataValue.int(size)}
        if isinstance(obj, pl.DataFrame):
            meta["dagster/row_count"] = dg.MetadataValue.int(obj.height)
        context.add_asset_metadata(meta, asset_key=key, partition_key=partition)


def withhold(context, key: dg.AssetKey, partition: str, why: str) -> None:
    """A partition of a ranged run that is not published (no lakeFS commit: nothing reads it): say why."""
    context.log.error(f"{key.to_user_string()} [{partition}] withheld from this run's publication: {why}")
    context.add_asset_metadata({WITHHELD: dg.MetadataValue.text(why[:2000])}, asset_key=key, partition_key=partition)


def each_partition(context, lakefs, key: dg.AssetKey, keys: list[str], one, missing: type[Exception]) -> dg.Output:
    """A ranged run's asset: `one(partition)` gives each partition's dg.Output, written to its own path with its own
    materialization; a partition whose input was withheld upstream (`one` raises `missing`) is withheld too."""
    values, metas = {}, {}
    for partition in keys:
        try:
            out = one(partition)
        except missing as exc:
            withhold(context, key, partition, str(exc))
            continue
        values[partition], metas[partition] = out.value, out.metadata
    write_partitions(context, lakefs, key, values, metas)
    return dg.Output(None, metadata={"partitions_published": dg.MetadataValue.json(sorted(values))})


def merge_check_results(by_partition: dict[str, list]) -> list:
    """One AssetCheckResult per check of a ranged run: passed when it passed for every partition, the failures
    named per partition (Dagster records one result per check and run)."""
    grouped: dict[tuple, list] = {}
    for partition, results in by_partition.items():
        for r in results:
            grouped.setdefault((r.asset_key, r.check_name), []).append((partition, r))
    out = []
    for (asset_key, name), items in grouped.items():
        failed = [(p, r) for p, r in items if not r.passed]
        worst = next((r for _, r in failed if r.severity == dg.AssetCheckSeverity.ERROR), None) \
            or (failed[0][1] if failed else items[0][1])
        description = ("; ".join(f"[{p}] {r.description}" for p, r in failed) if failed
                       else f"passed for all {len(items)} partitions ({items[0][0]}...{items[-1][0]})")
        out.append(dg.AssetCheckResult(
            asset_key=asset_key, check_name=name, passed=not failed, severity=worst.severity,
            description=description[:2000],
            metadata={"partitions": dg.MetadataValue.json(
                {p: {"passed": r.passed, "description": (r.description or "")[:300]} for p, r in items})}))
    return out
