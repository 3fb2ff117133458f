"""Features: dbt models on DuckDB, reading raw tables at the run's lakeFS ref through the S3 gateway.

Two multi-assets, built from dbt's manifest JSON (loading the definitions imports no dbt):
- `reference_models` (unpartitioned): the history's staging and features (`stg_reference_records`,
  `stg_reference_labels`, `reference_features`). They change only when the reference data does.
- `batch_models` (partitioned like raw_records): one production batch's `stg_records`, `stg_labels` and
  `features`, built from that partition's raw files only. A batch costs its own size, however long the
  platform has run. Each partition is written to `assets/<data set>/<model>/partition=<key>/data.parquet`, so runs of
  disjoint partitions never touch the same lakeFS object.

The feature SQL is one dbt macro (`feature_select`), used by both models and rendered for serving by
mlplatform.features. dbt tests are the models' asset checks; they run in the run's own database, so they
cover exactly what the run built (one partition, or the history).

Isolation: every step builds into its own DuckDB file, `<state>/duckdb/runs/<data set>/<run_id>/<step>.duckdb`, removed
when the step ends; dbt runs in the step's process (resources/dbt_runner.py: imported and the project parsed once
per process) and gets that path (and its own target folder) for that one invocation, so no two runs share a
mutable local file. The exports read that file from an in-memory connection.

Full rebuild: a partition run always rebuilds its partition from raw (no incremental state is carried), so a
backfill of `rebuild_features` over all partitions is the full rebuild. A changed model, macro or feature
definition in the spec changes the models' code versions, which marks their partitions stale in the UI.
"""

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg

from mlplatform.spec import DatasetSpec, state_dir
from resources.dbt_runner import dbt_build
from resources.duckdb import DuckDBResource
from resources.io import asset_path, asset_prefix
from resources.lakefs import LakeFSResource
from resources.naming import Namespace, ns
from mlplatform.batches import window
from resources.partitions import merge_check_results, partitions_def, ranged_keys, withhold

DBT_DIR = Path(__file__).resolve().parent.parent / "dbt_project"
REFERENCE_MODELS = ("stg_reference_records", "stg_reference_labels", "reference_features")
BATCH_MODELS = ("stg_records", "stg_labels", "features")
EXPORTED_MODELS = REFERENCE_MODELS + BATCH_MODELS


def dbt_vars(spec: DatasetSpec, tables: dict | None = None) -> dict:
    return {
        "id_column": spec.id_column, "time_column": spec.time_column, "target": spec.target,
        "features": [{"name": f.name, "type": f.type} for f in spec.features],
        "engineered": [{"name": f.name, "expression": f.expression} for f in spec.engineered_features],
        "label_delay_days": spec.label_delay_days,
        "tables": tables or {"reference_data": None, "raw_records": None, "raw_labels": None},
    }


def manifest_path(spec: DatasetSpec) -> Path:
    """dbt's manifest for the spec's dbt vars: keyed by their content, so data sets (or copies of one) with the same
    columns share one parse."""
    digest = hashlib.sha256(json.dumps(dbt_vars(spec), sort_keys=True).encode()).hexdigest()[:16]
    return DBT_DIR / "target" / "manifests" / digest / "manifest.json"


def ensure_manifest(spec: DatasetSpec) -> dict:
    """dbt's manifest for this data set, re-parsed when a dbt file or the spec is newer than it."""
    path = manifest_path(spec)
    sources = [p for p in DBT_DIR.rglob("*") if p.suffix in (".sql", ".yml") and "target" not in p.parts]
    if not path.exists() or max(p.stat().st_mtime for p in sources) > path.stat().st_mtime:
        # Parsed into a folder of this process's own, then moved into place in one step: two processes loading
        # the definitions at once never read (or write) a half-written manifest.
        dbt = Path(sys.executable).parent / "dbt"
        scratch = path.parent.with_name(f".parse-{path.parent.name}-{os.getpid()}")
        env = {**os.environ, "DBT_SEND_ANONYMOUS_USAGE_STATS": "false", "DBT_TARGET_PATH": str(scratch),
               "DBT_LOG_PATH": str(scratch)}
        try:
            proc = subprocess.run([str(dbt), "parse", "--project-dir", str(DBT_DIR), "--profiles-dir", str(DBT_DIR),
                                   "--vars", json.dumps(dbt_vars(spec))], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"`dbt parse` of {DBT_DIR} failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(scratch / "manifest.json", path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return _read_manifest(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_manifest(path: str, mtime_ns: int) -> dict:
    """A parsed manifest, once per process and version: data sets with the same dbt vars share it (read only)."""
    return json.loads(Path(path).read_text())


def manifest_hash(spec: DatasetSpec) -> str:
    return hashlib.sha256(manifest_path(spec).read_bytes()).hexdigest()[:16]


def model_code_version(manifest: dict, node: dict, spec: DatasetSpec) -> str:
    """The code version of a dbt model: its SQL, the SQL of every macro it calls (transitively, e.g. the shared
    `feature_select`) and the spec's feature definitions it renders. Any of them changing marks the model's
    partitions stale."""
    h = hashlib.sha256(node["checksum"]["checksum"].encode())
    seen: set[str] = set()
    todo = list(node.get("depends_on", {}).get("macros", []))
    while todo:
        uid = todo.pop()
        if uid in seen or uid not in manifest.get("macros", {}):
            continue
        seen.add(uid)
        macro = manifest["macros"][uid]
        if macro.get("package_name") == node.get("package_name"):  # the project's own macros, not dbt's
            h.update(uid.encode() + macro.get("macro_sql", "").encode())
        todo.extend(macro.get("depends_on", {}).get("macros", []))
    h.update(json.dumps({k: v for k, v in dbt_vars(spec).items() if k != "tables"}, sort_keys=True).encode())
    return h.hexdigest()[:12]


def _source_key(manifest: dict, unique_id: str, n: Namespace) -> dg.AssetKey:
    """The asset key of a dbt model's parent, in the data set's namespace."""
    if unique_id.startswith("source."):
        meta = manifest["sources"][unique_id].get("meta", {}).get("dagster", {})
        return n.key(dg.AssetKey(meta.get("asset_key") or [manifest["sources"][unique_id]["name"]]))
    return n.key(manifest["nodes"][unique_id]["name"])


def run_database(run_id: str, step: str, dataset: str = "") -> Path:
    """The step's own DuckDB file, under its data set's folder: never shared with another run (or another step)."""
    return state_dir() / "duckdb" / "runs" / (dataset or "_") / run_id / f"{step}.duckdb"


def remove_run_database(path: Path) -> None:
    """Remove a step's database and its write-ahead log; and the run's folder once nothing is left in it."""
    for p in (path, path.with_name(path.name + ".wal")):
        p.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass  # another step of the same run still has its files there


def dbt_select(selected: list[str], models: dict[str, dict]) -> list[str]:
    """dbt's --select for the selected models plus their upstream models: the run's database starts empty, so
    a model's in-project parents are rebuilt with it (only the selected ones are exported)."""
    # By file path: a bare name is also matched against folders (`features` would select models/features/*).
    return sorted({f"+path:{models[name]['original_file_path']}" for name in selected if name in models})


def check_outcome(status: str) -> tuple[bool, dg.AssetCheckSeverity]:
    """A dbt test status as an asset check outcome (`warn` is a failed WARN-severity check)."""
    if status == "pass":
        return True, dg.AssetCheckSeverity.ERROR
    if status == "warn":
        return False, dg.AssetCheckSeverity.WARN
    return False, dg.AssetCheckSeverity.ERROR


def build_features(spec: DatasetSpec) -> list:
    n = ns(spec)
    manifest = ensure_manifest(spec)
    models = {n["name"]: n for n in manifest["nodes"].values()
              if n["resource_type"] == "model" and n["name"] in EXPORTED_MODELS}
    missing = [m for m in EXPORTED_MODELS if m not in models]
    if missing:
        raise RuntimeError(f"dbt models {missing} are not in {DBT_DIR}/models (manifest {manifest_path(spec)})")
    tests = [n for n in manifest["nodes"].values()
             if n["resource_type"] == "test" and n.get("attached_node") in {m["unique_id"] for m in models.values()}]
    versions = {name: model_code_version(manifest, n, spec) for name, n in models.items()}
    by_uid = {n["unique_id"]: name for name, n in models.items()}
    dbt_hash = manifest_hash(spec)  # one manifest, hashed once

    def specs_for(names, parts):
        return [
            dg.AssetSpec(
                key=n.key(name), group_name="features", kinds={"dbt", "duckdb", "lakefs"},
                description=(models[name].get("description") or name).split("\n")[0],
                deps=[_source_key(manifest, d, n) for d in models[name]["depends_on"]["nodes"]],
                skippable=True, code_version=versions[name], partitions_def=parts,
                metadata={"dbt_unique_id": models[name]["unique_id"]},
            )
            for name in names
        ]

    def checks_for(names):
        return [
            dg.AssetCheckSpec(t["name"], asset=n.key(by_uid[t["attached_node"]]),
                              blocking=str(t["config"].get("severity", "ERROR")).upper() == "ERROR",
                              description=f"dbt test {t['name']}")
            for t in tests if by_uid[t["attached_node"]] in names
        ]

    def run_models(context: dg.AssetExecutionContext, lakefs: LakeFSResource, duckdb: DuckDBResource,
                   step: str, names: tuple, tables: dict, branch: str, partition: str | None,
                   partitions: dict | None = None):
        """dbt build of the selected models into the step's own database, each exported to lakeFS and committed;
        then the dbt tests as asset checks. With `partitions` ({partition: (start, end)}, a ranged run): ONE dbt
        build over all of them, each model exported per partition (its rows of the partition's time window) to
        the partition's own path, one commit per model, the partition's metadata on its own materialization."""
        selected = [m for m in names if n.key(m) in context.selected_asset_keys]  # in dependency order
        selected_checks = {(k.asset_key.path[-1], k.name) for k in context.selected_asset_check_keys}
        database = run_database(context.run.run_id, step, spec.name)
        target = state_dir() / "duckdb" / "dbt-target" / spec.name / context.run.run_id / step
        database.parent.mkdir(parents=True, exist_ok=True)
        # dbt's profile reads the per-run database from this environment, set for the one invocation only.
        env = {**duckdb.dbt_env(), "MLP_DUCKDB_PATH": str(database), "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
               "DBT_TARGET_PATH": str(target), "DBT_LOG_PATH": str(target), "DO_NOT_TRACK": "1"}
        try:
            # In this process (dbt imported once, the project parsed once per process), not one `dbt` process each.
            proc = dbt_build(DBT_DIR, dbt_select(selected, models), dbt_vars(spec, tables), dbt_vars(spec), env, target)
            if proc.results is None:
                where = f" for partition {partition}" if partition else ""
                raise RuntimeError(f"`dbt build` in {DBT_DIR} ran no model{where} (log in {target}):\n"
                                   f"{proc.output[-3000:]}")
            results = proc.results
            built = [name for name in selected if results.get(models[name]["unique_id"], {}).get("status") == "success"]
            con = duckdb.connect(in_memory=True)
            out = []
            try:
                con.execute(f"ATTACH '{database}' AS run_db (READ_ONLY)")
                for name in (built if partitions else ()):
                    out.append(export_partitions(context, lakefs, con, name, branch, partitions, database))
                for name in (() if partitions else built):
                    rows = con.execute(f'select count(*) from run_db.main."{name}"').fetchone()[0]
                    path = asset_path(n.key(name), partition, "parquet")
                    con.execute(f"COPY run_db.main.\"{name}\" TO '{lakefs.s3_uri(branch, path)}' "
                                f"(FORMAT parquet, COMPRESSION zstd)")
                    commit = lakefs.commit(branch, f"{name}{f' [{partition}]' if partition else ''} (dbt)", {
                        "asset_key": n.key_str(name), "partition": partition or "", "dagster_run_id": context.run.run_id,
                        "code_version": versions[name], "dbt_manifest_hash": dbt_hash, "upstream_ref": branch,
                    })
                    out.append(dg.MaterializeResult(asset_key=n.key(name), metadata={
                        "dagster/row_count": dg.MetadataValue.int(rows),
                        "lakefs_commit": dg.MetadataValue.text(commit),
                        "lakefs_path": dg.MetadataValue.path(lakefs.uri(commit, path)),
                        "lakefs_link": dg.MetadataValue.url(lakefs.commit_url(commit)),
                        "dbt_manifest_hash": dg.MetadataValue.text(dbt_hash),
                        "duckdb_database": dg.MetadataValue.path(str(database)),
                    }))
            finally:
                con.close()
        finally:
            remove_run_database(database)
        yield from out
        for t in tests:
            model = by_uid[t["attached_node"]]
            r = results.get(t["unique_id"])
            if r is None or (model, t["name"]) not in selected_checks:
                continue
            passed, severity = check_outcome(r["status"])
            where = partition or (f"{min(partitions)}...{max(partitions)}" if partitions else None)
            yield dg.AssetCheckResult(asset_key=n.key(model), check_name=t["name"], passed=passed,
                                      severity=severity, description=(r.get("message") or r["status"])[:1000],
                                      metadata={"failures": dg.MetadataValue.int(int(r.get("failures") or 0)),
                                                **({"partition": where} if where else {})})
        failed = [f"{uid.split('.')[-1]}: {r['status']} {r.get('message') or ''}".strip()
                  for uid, r in results.items() if r["status"] in ("error", "skipped", "runtime error")]
        if proc.returncode != 0 and failed:
            raise RuntimeError(f"dbt build in {DBT_DIR} failed{f' for partition {partition}' if partition else ''}: "
                               + "; ".join(failed)[:2000])
        shutil.rmtree(target, ignore_errors=True)  # kept only when dbt failed, for its logs
        try:
            target.parent.rmdir()
        except OSError:
            pass  # another step of the run still has its target there

    def export_partitions(context, lakefs: LakeFSResource, con, name: str, branch: str, partitions: dict,
                          database: Path) -> dg.MaterializeResult:
        """A ranged run's model: each partition's rows (its time window) to the partition's own lakeFS path, one
        commit, each partition's metadata on its own materialization."""
        t = spec.time_column
        counts = {}
        for p, (start, end) in partitions.items():
            where = f"where \"{t}\" >= TIMESTAMP '{start}' and \"{t}\" < TIMESTAMP '{end}'"
            counts[p] = con.execute(f'select count(*) from run_db.main."{name}" {where}').fetchone()[0]
            con.execute(f"COPY (select * from run_db.main.\"{name}\" {where}) TO "
                        f"'{lakefs.s3_uri(branch, asset_path(n.key(name), p, 'parquet'))}' (FORMAT parquet, COMPRESSION zstd)")
        first, last = min(partitions), max(partitions)
        commit = lakefs.commit(branch, f"{name} [{first}...{last}] ({len(partitions)} partitions) (dbt)", {
            "asset_key": n.key_str(name), "partition": ",".join(sorted(partitions)),
            "dagster_run_id": context.run.run_id, "code_version": versions[name], "dbt_manifest_hash": dbt_hash,
            "upstream_ref": branch,
        })
        for p in partitions:
            path = asset_path(n.key(name), p, "parquet")
            context.add_asset_metadata({
                "dagster/row_count": dg.MetadataValue.int(counts[p]),
                "lakefs_commit": dg.MetadataValue.text(commit),
                "lakefs_path": dg.MetadataValue.path(lakefs.uri(commit, path)),
                "lakefs_link": dg.MetadataValue.url(lakefs.commit_url(commit)),
                "dbt_manifest_hash": dg.MetadataValue.text(dbt_hash),
                "duckdb_database": dg.MetadataValue.path(str(database)),
            }, asset_key=n.key(name), partition_key=p)
        return dg.MaterializeResult(asset_key=n.key(name))

    @dg.multi_asset(specs=specs_for(REFERENCE_MODELS, None), check_specs=checks_for(REFERENCE_MODELS),
                    name=n.job("reference_models"), can_subset=False)
    def reference_models(context: dg.AssetExecutionContext, lakefs: LakeFSResource, duckdb: DuckDBResource):
        """Build the history's staging and features from reference_data and version each in lakeFS."""
        from resources.publish import open_run_branch

        branch = open_run_branch(context.instance, lakefs, context.run.run_id)
        path = asset_path(n.key("reference_data"), None, "parquet")
        if not lakefs.list_paths(branch, asset_prefix(n.key("reference_data"))):
            raise RuntimeError(f"reference_data is not on lakeFS ref {branch!r} of {lakefs.repository!r}: "
                               f"materialize it (and let its run publish) first")
        tables = {"reference_data": lakefs.s3_uri(branch, path), "raw_records": None, "raw_labels": None}
        yield from run_models(context, lakefs, duckdb, "reference_models", REFERENCE_MODELS, tables, branch, None)

    @dg.multi_asset(specs=specs_for(BATCH_MODELS, partitions_def(spec)), check_specs=checks_for(BATCH_MODELS),
                    name=n.job("batch_models"), can_subset=True)
    def batch_models(context: dg.AssetExecutionContext, lakefs: LakeFSResource, duckdb: DuckDBResource):
        """Build one batch's staging and features from its own raw partition and version each in lakeFS (a
        ranged run, for a burst of batches: each partition of the range in turn, in this one run)."""
        from resources.publish import open_run_branch

        keys = ranged_keys(context)
        if keys is None:
            yield from batch_partition(context, lakefs, duckdb, context.partition_key)
            return
        # A burst: ONE dbt build over every partition of the range (the run's fixed dbt cost paid once), its
        # inputs the partitions' raw files on the run's branch, copied into a folder of this step's own.
        branch = open_run_branch(context.instance, lakefs, context.run.run_id)
        present = []
        for partition in keys:
            if lakefs.exists(branch, asset_path(n.key("raw_records"), partition, "parquet")):
                present.append(partition)
                continue
            for key in context.selected_asset_keys:  # raw_records withheld it: nothing to build from
                withhold(context, key, partition, f"raw_records [{partition}] is not on this run's branch")
        if not present:
            return
        if n.key("stg_labels") in context.selected_asset_keys:  # labels carry no event time to split them by
            yield from each_partition(context, lakefs, duckdb, present)
            return
        inputs = run_database(context.run.run_id, "batch_models_inputs", spec.name).with_suffix("")
        try:
            tables = {"reference_data": None, "raw_records": None, "raw_labels": None}
            for kind in ("raw_records", "raw_labels"):
                folder = inputs / kind
                for partition in present:
                    path = asset_path(n.key(kind), partition, "parquet")
                    if lakefs.exists(branch, path):
                        folder.mkdir(parents=True, exist_ok=True)
                        (folder / f"{partition}.parquet").write_bytes(lakefs.get(branch, path))
                tables[kind] = str(folder / "*.parquet") if folder.exists() else None
            yield from run_models(context, lakefs, duckdb, "batch_models", BATCH_MODELS, tables, branch, None,
                                  partitions={p: window(spec, p) for p in present})
        finally:
            shutil.rmtree(inputs, ignore_errors=True)

    def each_partition(context, lakefs: LakeFSResource, duckdb: DuckDBResource, partitions: list[str]):
        """A ranged run that builds the labels' models: one dbt build per partition, in this one run."""
        built, checks_by = set(), {}
        for partition in partitions:
            for result in batch_partition(context, lakefs, duckdb, partition):
                if isinstance(result, dg.MaterializeResult):  # this partition's own materialization metadata
                    context.add_asset_metadata(result.metadata or {}, asset_key=result.asset_key,
                                               partition_key=partition)
                    built.add(result.asset_key)
                else:
                    checks_by.setdefault(partition, []).append(result)
        for key in (n.key(m) for m in BATCH_MODELS):  # in dependency order
            if key in built:
                yield dg.MaterializeResult(asset_key=key)
        yield from merge_check_results(checks_by)

    def batch_partition(context, lakefs: LakeFSResource, duckdb: DuckDBResource, partition: str):
        from resources.publish import open_run_branch

        branch = open_run_branch(context.instance, lakefs, context.run.run_id)
        records = asset_path(n.key("raw_records"), partition, "parquet")
        labels = asset_path(n.key("raw_labels"), partition, "parquet")
        if not lakefs.exists(branch, records):
            raise RuntimeError(f"raw_records[{partition}] is not on lakeFS ref {branch!r} of {lakefs.repository!r} "
                               f"({records}): ingest the batch first")
        tables = {"reference_data": None, "raw_records": lakefs.s3_uri(branch, records),
                  "raw_labels": lakefs.s3_uri(branch, labels) if lakefs.exists(branch, labels) else None}
        yield from run_models(context, lakefs, duckdb, "batch_models", BATCH_MODELS, tables, branch, partition)

    return [reference_models, batch_models]
