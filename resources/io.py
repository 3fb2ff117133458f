"""Write-audit-publish I/O: every asset output is written and committed on its run's lakeFS branch.

Reads take the upstream at the exact commit its materialization recorded, and only from runs that
passed their blocking checks (status SUCCESS) or from the current run, so unchecked data never
flows on. Publishing (merging the run branch into main) is done by `resources.publish`.
"""


import functools
import io
import json
import subprocess
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
from pydantic import PrivateAttr

from resources.lakefs import LakeFSError, LakeFSResource, run_branch

ROOT = Path(__file__).resolve().parent.parent

# (run_id, step_key) -> {upstream asset key: commit id}: lineage recorded on load, written on commit.
_LOADED_COMMITS: dict[tuple[str, str], dict[str, str]] = {}


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def asset_path(key: dg.AssetKey, partition: str | None, suffix: str) -> str:
    base = "/".join(key.path)
    part = f"partition={partition}/" if partition else ""
    return f"assets/{base}/{part}data.{suffix}"


def serialize(obj: Any) -> tuple[bytes, str, str]:
    """(bytes, suffix, content type): Parquet for tables, JSON for documents, raw bytes otherwise."""
    if isinstance(obj, pl.LazyFrame):
        obj = obj.collect()
    if isinstance(obj, pl.DataFrame):
        buf = io.BytesIO()
        obj.write_parquet(buf, compression="zstd", statistics=True)
        return buf.getvalue(), "parquet", "application/vnd.apache.parquet"
    if isinstance(obj, (dict, list)):
        return json.dumps(obj, indent=1, default=str, sort_keys=True).encode(), "json", "application/json"
    if isinstance(obj, str):
        return obj.encode(), "md", "text/markdown"
    if isinstance(obj, (bytes, bytearray)):
        return bytes(obj), "bin", "application/octet-stream"
    raise TypeError(f"the lakeFS I/O manager stores polars DataFrames, dicts/lists, str and bytes, "
                    f"not {type(obj).__name__}")


def deserialize(data: bytes, path: str) -> Any:
    if path.endswith(".parquet"):
        return pl.read_parquet(io.BytesIO(data))
    if path.endswith(".json"):
        return json.loads(data)
    if path.endswith(".md"):
        return data.decode()
    return data


def _meta_text(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", getattr(value, "text", value)))


def latest_checked_materialization(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None,
                                   current_run_id: str | None = None) -> tuple[str, str, str] | None:
    """(commit, path, run_id) of the newest materialization from the current run or a successful run."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=50
    ).records
    for rec in records:
        meta = rec.asset_materialization.metadata if rec.asset_materialization else {}
        commit, path = _meta_text(meta.get("lakefs_commit")), _meta_text(meta.get("lakefs_path"))
        if not commit or not path:
            continue
        if rec.run_id != current_run_id:
            run = instance.get_run_by_id(rec.run_id)
            if run is None or run.status != dg.DagsterRunStatus.SUCCESS:
                continue  # a failed run's data never passed its blocking checks
        return commit, path.split("/", 4)[-1] if path.startswith("lakefs://") else path, rec.run_id
    return None


class LakeFSIOManager(dg.ConfigurableIOManager):
    """Stores each asset (partition) on the run's lakeFS branch and commits it with lineage metadata."""

    lakefs: dg.ResourceDependency[LakeFSResource]
    read_ref: str = ""  # load inputs as of this commit id or tag instead of their latest checked version
    # Publish finished, passing runs before making this run's branch, so that with one writer at a time
    # (the run queue's limit) a run always starts from its predecessors' data.
    publish_before_branching: bool = True

    _branches: set = PrivateAttr(default_factory=set)

    def _branch_for(self, run_id: str, instance: dg.DagsterInstance | None = None) -> str:
        from resources.publish import open_run_branch

        name = run_branch(run_id)
        if name not in self._branches:
            open_run_branch(instance if self.publish_before_branching else None, self.lakefs, run_id)
            self._branches.add(name)
        return name

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        key = context.asset_key
        partition = context.asset_partition_key if context.has_asset_partitions else None
        data, suffix, content_type = serialize(obj)
        path = asset_path(key, partition, suffix)
        try:
            instance = context.step_context.instance
        except Exception:  # noqa: BLE001 - direct IO-manager calls have no step
            instance = None
        branch = self._branch_for(context.run_id, instance)
        self.lakefs.put(branch, path, data, content_type)

        step_key = context.step_key if hasattr(context, "step_key") else ""
        upstream = dict(_LOADED_COMMITS.pop((context.run_id, step_key), {}))
        extra = context.output_metadata.get("upstream_commits") if context.output_metadata else None
        if extra is not None:
            value = getattr(extra, "value", getattr(extra, "data", extra))
            upstream.update(value if isinstance(value, dict) else json.loads(str(value)))
        code_version = None
        try:
            assets_def = context.step_context.assets_def
            code_version = assets_def.code_versions_by_key.get(key) if assets_def else None
        except Exception:  # noqa: BLE001 - not every context has a step (direct IO-manager tests)
            pass
        commit = self.lakefs.commit(
            branch,
            message=f"{key.to_user_string()}{f' [{partition}]' if partition else ''}",
            metadata={
                "asset_key": key.to_user_string(),
                "partition": partition or "",
                "dagster_run_id": context.run_id,
                "code_version": code_version or git_commit(),
                "git_commit": git_commit(),
                "upstream_commits": upstream,
            },
        )
        meta: dict[str, Any] = {
            "lakefs_commit": dg.MetadataValue.text(commit),
            "lakefs_path": dg.MetadataValue.path(self.lakefs.uri(commit, path)),
            "lakefs_branch": dg.MetadataValue.text(branch),
            "lakefs_link": dg.MetadataValue.url(self.lakefs.commit_url(commit)),
            "bytes": dg.MetadataValue.int(len(data)),
        }
        if upstream:
            meta["upstream_commits"] = dg.MetadataValue.json(upstream)
        if isinstance(obj, pl.DataFrame):
            meta["dagster/row_count"] = dg.MetadataValue.int(obj.height)
            meta["dagster/column_schema"] = dg.TableSchema(
                columns=[dg.TableColumn(name, str(dtype)) for name, dtype in obj.schema.items()]
            )
        context.add_output_metadata(meta)

    def _resolve(self, context: dg.InputContext, partition: str | None) -> tuple[str, str] | None:
        key = context.asset_key
        if self.read_ref:
            for suffix in ("parquet", "json", "md", "bin"):
                path = asset_path(key, partition, suffix)
                if self.lakefs.exists(self.read_ref, path):
                    return self.read_ref, path
            return None
        found = latest_checked_materialization(context.instance, key, partition, context.step_context.run_id)
        return (found[0], found[1]) if found else None

    def load_input(self, context: dg.InputContext) -> Any:
        key = context.asset_key
        partitions = list(context.asset_partition_keys) if context.has_asset_partitions else [None]
        loaded: list[tuple[str | None, Any]] = []
        missing = []
        commits: dict[str, str] = {}
        for partition in partitions:
            resolved = self._resolve(context, partition)
            if resolved is None:
                missing.append(partition)
                continue
            ref, path = resolved
            loaded.append((partition, deserialize(self.lakefs.get(ref, path), path)))
            commits[key.to_user_string() + (f"[{partition}]" if partition else "")] = ref
        if not loaded:
            where = f"at ref {self.read_ref!r}" if self.read_ref else "from a successful run"
            raise LakeFSError(
                f"no checked version of {key.to_user_string()} {where} for partition(s) {missing} "
                f"in lakeFS repository {self.lakefs.repository!r}: materialize it first"
            )
        if missing:
            context.log.warning(f"{key.to_user_string()}: partitions {missing} have no checked version; skipped")
        try:
            step_key = context.step_context.step.key
            _LOADED_COMMITS.setdefault((context.step_context.run_id, step_key), {}).update(commits)
        except Exception:  # noqa: BLE001 - direct IO-manager calls have no step
            pass
        if len(partitions) == 1 and partitions[0] is None:
            return loaded[0][1]
        values = [v for _, v in loaded]
        if all(isinstance(v, pl.DataFrame) for v in values):
            return pl.concat(values, how="diagonal_relaxed")
        return {p: v for p, v in loaded}


def load_asset(lakefs: LakeFSResource, key: str | dg.AssetKey, ref: str = "main",
               partition: str | None = None) -> Any:
    """Load an asset as of any commit, tag or branch (default: published `main`)."""
    akey = key if isinstance(key, dg.AssetKey) else dg.AssetKey.from_user_string(key)
    for suffix in ("parquet", "json", "md", "bin"):
        path = asset_path(akey, partition, suffix)
        if lakefs.exists(ref, path):
            return deserialize(lakefs.get(ref, path), path)
    raise LakeFSError(f"{akey.to_user_string()} (partition {partition}) is not in lakeFS repository "
                      f"{lakefs.repository!r} at ref {ref!r}")


def read_upstream_table(context, lakefs: LakeFSResource, key: str | dg.AssetKey,
                        partition: str | None = None) -> tuple[pl.DataFrame, str]:
    """Read an asset that is not an IO-manager input (e.g. a dbt model) at its latest checked commit,
    and record that commit as this step's upstream lineage. Returns (table, commit)."""
    akey = key if isinstance(key, dg.AssetKey) else dg.AssetKey.from_user_string(key)
    found = latest_checked_materialization(context.instance, akey, partition, context.run_id)
    if found is None:
        raise LakeFSError(f"no checked version of {akey.to_user_string()} in lakeFS repository "
                          f"{lakefs.repository!r}: materialize it first")
    commit, path, _ = found
    try:
        step_key = context.get_step_execution_context().step.key
    except Exception:  # noqa: BLE001 - outside a step (direct calls)
        step_key = ""
    _LOADED_COMMITS.setdefault((context.run_id, step_key), {})[akey.to_user_string()] = commit
    return deserialize(lakefs.get(commit, path), path), commit
