"""Write-audit-publish I/O: every asset output is written and committed on its run's lakeFS branch.

Reads take the upstream at the exact commit its materialization recorded, and only from runs that
passed their blocking checks (status SUCCESS) or from the current run, so unchecked data never
flows on. Publishing (merging the run branch into main) is done by `resources.publish`.

Faults: writes are idempotent (a retried step overwrites the same path and commits again; a retried
commit is recognised by its write id), a lakeFS outage is waited out for `outage_patience_seconds`
with backoff, and a run that fails on a transient fault is marked for Dagster's run retries. A retry
is a new run with its own branch; a retry that resumes from the failure (skipping the steps that
succeeded) branches from its parent's branch, so the outputs it does not rebuild are on it, and the
failed run's branch is kept for inspection.
"""




import functools
import io
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import dagster as dg
from mlplatform.lazy import lazy_import
pl = lazy_import("polars")
from pydantic import PrivateAttr

from resources.lakefs import LakeFSError, LakeFSResource, LakeFSUnavailable, run_branch

ROOT = Path(__file__).resolve().parent.parent

# Dagster's run tag: retry this run (instance `run_retries`) although it failed in a step. The instance
# default is false (dagster.yaml): deterministic failures (bad data, a rejected model) are not retried;
# a run whose step failed on a transient fault gets the tag, with TRANSIENT_TAG saying why.
RETRY_ON_STEP_FAILURE_TAG = "dagster/retry_on_asset_or_op_failure"
TRANSIENT_TAG = "mlp/transient_failure"
RESUME_TAGS = ("dagster/is_resume_retry", "dagster/is_asset_resume_retry")
# Error classes, and message fragments, of faults that another attempt may not meet.
TRANSIENT_ERRORS = {"LakeFSUnavailable", "MLflowUnavailable", "ConnectionError", "ConnectionRefusedError",
                    "ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError", "TimeoutError",
                    "MaxRetryError", "NewConnectionError", "ProtocolError", "ReadTimeoutError",
                    "ConnectTimeoutError", "ConnectTimeout", "ReadTimeout", "RemoteDisconnected",
                    "PublicationPending"}  # predecessors not yet published by the publish sensor
TRANSIENT_TEXT = ("Connection refused", "Max retries exceeded", "Connection reset", "Connection aborted",
                  "Read timed out", "Remote end closed connection", "503 Service Unavailable",
                  "502 Bad Gateway", "504 Gateway Timeout")

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


def asset_prefix(key: dg.AssetKey) -> str:
    """Where an asset's objects live in the one lakeFS repository: `assets/<key path>/`. Keys are
    `[<data set>, <asset>]`, so each data set's objects are under `assets/<data set>/` (README "Many data sets")."""
    return f"assets/{'/'.join(key.path)}/"


def asset_path(key: dg.AssetKey, partition: str | None, suffix: str) -> str:
    part = f"partition={partition}/" if partition else ""
    return f"{asset_prefix(key)}{part}data.{suffix}"


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


def parent_of(run: dg.DagsterRun | None) -> str | None:
    return (run.parent_run_id or run.tags.get("dagster/parent_run_id")) if run is not None else None


def is_resumed(run: dg.DagsterRun | None) -> bool:
    """A re-execution that skips the steps its parent finished (Dagster's FROM_FAILURE retry)."""
    return bool(parent_of(run) and any(run.tags.get(t) == "true" for t in RESUME_TAGS))


def resumed_lineage(instance: dg.DagsterInstance, run_id: str | None) -> list[str]:
    """The run and, if it resumes a failed run, the runs it resumes (parent first): their outputs are its own."""
    chain: list[str] = []
    run = instance.get_run_by_id(run_id) if run_id else None
    while run is not None and run.run_id not in chain:
        chain.append(run.run_id)
        if not is_resumed(run):
            break
        run = instance.get_run_by_id(parent_of(run))
    return chain or ([run_id] if run_id else [])


def latest_checked_materialization(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None,
                                   current_run_id: str | None = None) -> tuple[str, str, str] | None:
    """(commit, path, run_id) of the newest materialization from the current run or a successful run.

    A run that resumes a failed run reads the outputs it did not rebuild from the runs it resumes (they are
    on its branch, made from theirs): those steps succeeded, with their checks, in the parent run."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=50
    ).records
    own = resumed_lineage(instance, current_run_id) if current_run_id else []
    fallback = None
    for rec in records:
        meta = rec.asset_materialization.metadata if rec.asset_materialization else {}
        commit, path = _meta_text(meta.get("lakefs_commit")), _meta_text(meta.get("lakefs_path"))
        if not commit or not path:
            continue
        found = (commit, path.split("/", 4)[-1] if path.startswith("lakefs://") else path, rec.run_id)
        if rec.run_id in own:
            return found
        if fallback is None:
            run = instance.get_run_by_id(rec.run_id)
            if run is not None and run.status == dg.DagsterRunStatus.SUCCESS:
                fallback = found  # a failed run's data never passed its blocking checks
                if len(own) <= 1:
                    break  # not a resumed run: the newest checked version is the answer
    return fallback


def is_transient_exception(exc: BaseException | None) -> bool:
    """Whether a live exception, or any exception in its chain, is a fault another attempt may not meet."""
    seen = 0
    while exc is not None and seen < 50:
        seen += 1
        if type(exc).__name__ in TRANSIENT_ERRORS or any(t in str(exc) for t in TRANSIENT_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def transient_cause(error) -> str | None:
    """The first transient fault (connection refused, timeout, service unavailable) in a Dagster error chain."""
    seen = 0
    stack = [error]
    while stack and seen < 50:
        err = stack.pop()
        if err is None:
            continue
        seen += 1
        message = err.message or ""
        if err.cls_name in TRANSIENT_ERRORS or any(t in message for t in TRANSIENT_TEXT):
            return f"{err.cls_name}: {message.strip()[:300]}"
        stack.extend([err.cause, err.context])
    return None


def mark_transient_failure(instance: dg.DagsterInstance, run_id: str, reason: str) -> None:
    """Let Dagster's run retries re-execute this run: it failed on a fault that may be gone next time."""
    instance.add_run_tags(run_id, {RETRY_ON_STEP_FAILURE_TAG: "true", TRANSIENT_TAG: reason[:500]})


class LakeFSIOManager(dg.ConfigurableIOManager):
    """Stores each asset (partition) on the run's lakeFS branch and commits it with lineage metadata."""

    lakefs: dg.ResourceDependency[LakeFSResource]
    read_ref: str = ""  # load inputs as of this commit id or tag instead of their latest checked version
    # Before making this run's branch from main, wait (bounded) until the publish sensor has published every
    # run that succeeded before it, so a run starts from its predecessors' data (resources/publish.py
    # `await_publication`). A run never publishes another run: only the publish sensor (or `mlp publish`) does.
    await_publication: bool = True
    publication_patience_seconds: float = 180.0
    # How long a step waits out a lakeFS outage (beyond the resource's own quick retries), with backoff,
    # before it fails and leaves the run to Dagster's run retries. Bounded: a dead server never hangs a run.
    outage_patience_seconds: float = 120.0

    _branches: set = PrivateAttr(default_factory=set)

    # --- run life ---------------------------------------------------------------------------------
    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # A retry inherits its parent's tags; those describing the parent's outcome (its transient fault,
        # its kept branch) say nothing about this run and would stop its publication. Tags cannot be
        # removed: they are emptied.
        from resources.publish import KEPT_TAG, PUBLISHED_TAG

        run, instance = context.run, context.instance
        if run is None or instance is None or not parent_of(run):
            return
        reset = {}
        if run.tags.get(TRANSIENT_TAG):
            reset.update({RETRY_ON_STEP_FAILURE_TAG: "false", TRANSIENT_TAG: ""})
        if run.tags.get(KEPT_TAG) and run.tags[KEPT_TAG] != run_branch(run.run_id):
            reset[KEPT_TAG] = ""
        if run.tags.get(PUBLISHED_TAG):
            reset[PUBLISHED_TAG] = ""
        if reset:
            instance.add_run_tags(run.run_id, reset)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """Before the run's outcome is recorded: if a step failed on a transient fault (lakeFS, MLflow or
        a connection), mark the run for Dagster's run retries."""
        run, instance = context.run, context.instance
        if run is None or instance is None:
            return
        try:
            failures = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
            for rec in failures:
                data = rec.event_log_entry.dagster_event.step_failure_data
                cause = transient_cause(data.error) if data else None
                if cause:
                    mark_transient_failure(instance, run.run_id,
                                           f"{rec.event_log_entry.dagster_event.step_key}: {cause}")
                    return
        except Exception as exc:  # noqa: BLE001 - never turn a run's teardown into a new failure
            context.log.warning(f"could not classify the run's failures for retry: {exc}")

    def _patiently(self, context, what: str, fn):
        """fn(), retried with backoff while lakeFS is unavailable, for up to outage_patience_seconds."""
        start, attempt = time.monotonic(), 0
        while True:
            try:
                return fn()
            except LakeFSUnavailable as exc:
                waited = time.monotonic() - start
                pause = min(2.0 * 2 ** attempt, 20.0)
                if waited + pause > self.outage_patience_seconds:
                    run_id = getattr(context, "run_id", None)
                    instance = _instance_of(context)
                    if instance is not None and run_id:
                        mark_transient_failure(instance, run_id, f"{what}: {exc}")
                    raise LakeFSUnavailable(f"{exc} (gave up on {what} after waiting {waited:.0f}s; "
                                            f"the run is marked for an automatic retry)") from exc
                attempt += 1
                context.log.warning(f"{exc}; retrying {what} in {pause:.0f}s "
                                    f"(waited {waited:.0f}s of {self.outage_patience_seconds:.0f}s)")
                time.sleep(pause)

    def _branch_for(self, run_id: str, instance: dg.DagsterInstance | None = None) -> str:
        """The run's branch, made once (`open_run_branch`: a run resuming a failed one starts from the failed
        run's branch, which holds the outputs it will not rebuild)."""
        from resources.publish import open_run_branch

        name = run_branch(run_id)
        if name in self._branches:
            return name
        open_run_branch(instance, self.lakefs, run_id, self.publication_patience_seconds,
                        wait=self.await_publication)
        self._branches.add(name)
        return name

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        key = context.asset_key
        partition = context.asset_partition_key if context.has_asset_partitions else None
        data, suffix, content_type = serialize(obj)
        path = asset_path(key, partition, suffix)
        instance = _instance_of(context)
        what = f"storing {key.to_user_string()}{f' [{partition}]' if partition else ''}"
        self._patiently(context, what, lambda: self._write(context, key, partition, obj, data, suffix,
                                                           content_type, path, instance))

    def _write(self, context, key, partition, obj, data, suffix, content_type, path, instance) -> None:
        branch = self._branch_for(context.run_id, instance)
        self.lakefs.put(branch, path, data, content_type)

        step_key = context.step_key if hasattr(context, "step_key") else ""
        upstream = dict(_LOADED_COMMITS.get((context.run_id, step_key), {}))
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
        _LOADED_COMMITS.pop((context.run_id, step_key), None)  # only once written: a retry still has them
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
            data = self._patiently(context, f"loading {key.to_user_string()} at {ref[:12]}",
                                   lambda: self.lakefs.get(ref, path))
            loaded.append((partition, deserialize(data, path)))
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


def _instance_of(context) -> dg.DagsterInstance | None:
    try:
        return context.step_context.instance
    except Exception:  # noqa: BLE001 - direct IO-manager calls have no step
        return None


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
                        partition: str | None = None) -> "tuple[pl.DataFrame, str]":
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
