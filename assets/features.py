"""Features: dbt models on DuckDB, reading the raw tables at the run's lakeFS ref through the S3 gateway.

The multi-asset is built from dbt's manifest JSON so that loading the definitions does not import
dagster_dbt (~3 s); dagster_dbt runs dbt inside the step. Each built model is exported to lakeFS and
committed, so features are versioned like every other data asset.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from resources.duckdb import DuckDBResource
from resources.io import asset_path
from resources.lakefs import LakeFSResource, run_branch
from mlplatform.spec import DatasetSpec, state_dir

DBT_DIR = Path(__file__).resolve().parent.parent / "dbt_project"
EXPORTED_MODELS = ("stg_records", "stg_labels", "features")


def dbt_vars(spec: DatasetSpec, tables: dict | None = None) -> dict:
    return {
        "id_column": spec.id_column, "time_column": spec.time_column, "target": spec.target,
        "features": [{"name": f.name, "type": f.type} for f in spec.features],
        "engineered": [{"name": f.name, "expression": f.expression} for f in spec.engineered_features],
        "label_delay_days": spec.label_delay_days,
        "tables": tables or {"reference_data": None, "raw_records": None, "raw_labels": None},
    }


def manifest_path(spec: DatasetSpec) -> Path:
    return DBT_DIR / "target" / spec.name / "manifest.json"


def ensure_manifest(spec: DatasetSpec) -> dict:
    """dbt's manifest for this data set, re-parsed when a dbt file or the spec is newer than it."""
    path = manifest_path(spec)
    sources = [p for p in DBT_DIR.rglob("*") if p.suffix in (".sql", ".yml") and "target" not in p.parts]
    sources.append(Path(spec.path))
    if not path.exists() or max(p.stat().st_mtime for p in sources) > path.stat().st_mtime:
        dbt = Path(sys.executable).parent / "dbt"
        env = {**os.environ, "DBT_SEND_ANONYMOUS_USAGE_STATS": "false", "DBT_TARGET_PATH": str(path.parent)}
        proc = subprocess.run([str(dbt), "parse", "--project-dir", str(DBT_DIR), "--profiles-dir", str(DBT_DIR),
                               "--vars", json.dumps(dbt_vars(spec))], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"`dbt parse` of {DBT_DIR} failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return json.loads(path.read_text())


def manifest_hash(spec: DatasetSpec) -> str:
    return hashlib.sha256(manifest_path(spec).read_bytes()).hexdigest()[:16]


def _source_key(manifest: dict, unique_id: str) -> dg.AssetKey:
    if unique_id.startswith("source."):
        meta = manifest["sources"][unique_id].get("meta", {}).get("dagster", {})
        return dg.AssetKey(meta.get("asset_key") or [manifest["sources"][unique_id]["name"]])
    return dg.AssetKey(manifest["nodes"][unique_id]["name"])


def build_features(spec: DatasetSpec) -> list:
    manifest = ensure_manifest(spec)
    models = {uid: n for uid, n in manifest["nodes"].items() if n["resource_type"] == "model"}
    specs = [
        dg.AssetSpec(
            key=dg.AssetKey(n["name"]), group_name="features", kinds={"dbt", "duckdb", "lakefs"},
            description=(n.get("description") or n["name"]).split("\n")[0],
            deps=[_source_key(manifest, d) for d in n["depends_on"]["nodes"]],
            skippable=True, code_version=n["checksum"]["checksum"][:12],
            metadata={"dbt_unique_id": n["unique_id"]},
        )
        for n in models.values()
    ]
    check_specs = [
        dg.AssetCheckSpec(n["name"], asset=dg.AssetKey(models[n["attached_node"]]["name"]),
                          blocking=str(n["config"].get("severity", "ERROR")).upper() == "ERROR",
                          description=f"dbt test {n['name']}")
        for n in manifest["nodes"].values() if n["resource_type"] == "test" and n.get("attached_node") in models
    ]

    @dg.multi_asset(specs=specs, check_specs=check_specs, name="dbt_models", can_subset=False)
    def dbt_models(context: dg.AssetExecutionContext, lakefs: LakeFSResource, duckdb: DuckDBResource):
        """Build the dbt project (staging, features) and version each model's table in lakeFS."""
        from dagster_dbt import DagsterDbtTranslator, DbtCliResource

        from resources.publish import open_run_branch

        branch = open_run_branch(context.instance, lakefs, context.run_id)
        tables = {}
        for name, partitioned in (("reference_data", False), ("raw_records", True), ("raw_labels", True)):
            present = lakefs.list_paths(branch, f"assets/{name}/")
            glob = "partition=*/data.parquet" if partitioned else "data.parquet"
            tables[name] = lakefs.s3_uri(branch, f"assets/{name}/{glob}") if present else None
        if tables["reference_data"] is None:
            raise RuntimeError(f"reference_data is not on lakeFS ref {branch!r} of {lakefs.repository!r}: "
                               f"materialize it (and let its run publish) first")
        env = duckdb.dbt_env()
        os.environ.update({k: v for k, v in env.items() if k.startswith("MLP_")})
        dbt = DbtCliResource(project_dir=str(DBT_DIR), profiles_dir=str(DBT_DIR),
                             dbt_executable=str(Path(sys.executable).parent / "dbt"))
        target = state_dir() / "duckdb" / "dbt-target" / context.run_id
        invocation = dbt.cli(["build", "--vars", json.dumps(dbt_vars(spec, tables))], manifest=manifest,
                             dagster_dbt_translator=DagsterDbtTranslator(), raise_on_error=False,
                             target_path=target)
        events = list(invocation.stream())
        built = []
        for ev in events:
            if isinstance(ev, (dg.AssetMaterialization, dg.Output)) and getattr(ev, "asset_key", None) is not None:
                built.append(ev.asset_key)
        results = []
        dbt_hash = manifest_hash(spec)  # one manifest, hashed once for every model of this build
        con = duckdb.connect()
        try:
            for key in built:
                name = key.path[-1]
                rows = con.execute(f'select count(*) from "{name}"').fetchone()[0]
                path = asset_path(key, None, "parquet")
                con.execute(f"COPY \"{name}\" TO '{lakefs.s3_uri(branch, path)}' (FORMAT parquet, COMPRESSION zstd)")
                commit = lakefs.commit(branch, f"{name} (dbt)", {
                    "asset_key": name, "partition": "", "dagster_run_id": context.run_id,
                    "code_version": models[f"model.mlplatform.{name}"]["checksum"]["checksum"][:12],
                    "dbt_manifest_hash": dbt_hash, "upstream_ref": branch,
                })
                results.append(dg.MaterializeResult(asset_key=key, metadata={
                    "dagster/row_count": dg.MetadataValue.int(rows),
                    "lakefs_commit": dg.MetadataValue.text(commit),
                    "lakefs_path": dg.MetadataValue.path(lakefs.uri(commit, path)),
                    "lakefs_link": dg.MetadataValue.url(lakefs.commit_url(commit)),
                    "dbt_manifest_hash": dg.MetadataValue.text(dbt_hash),
                }))
        finally:
            con.close()
        yield from results
        for ev in events:
            if isinstance(ev, dg.AssetCheckEvaluation):
                yield dg.AssetCheckResult(asset_key=ev.asset_key, check_name=ev.check_name, passed=ev.passed,
                                          severity=ev.severity, metadata=ev.metadata,
                                          description=ev.description)
            elif isinstance(ev, dg.AssetCheckResult):
                yield ev
        if not invocation.is_successful():
            raise RuntimeError(f"dbt build failed in {DBT_DIR}: "
                               + "; ".join(str(e) for e in invocation.get_error_events())[:2000]
                               if hasattr(invocation, "get_error_events") else f"dbt build failed in {DBT_DIR}")

    return [dbt_models]
