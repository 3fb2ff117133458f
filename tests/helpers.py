"""Shared test helpers: the platform's real resources pointed at the test's lakeFS repo and state folder."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from mlplatform.audit import default_path as audit_default_path
from mlplatform.spec import DatasetSpec
from resources.environment import Settings, build_resources
from resources.lakefs import LakeFSResource
from tooling.testbed import car_loan, quick_training_set, testbed_settings

__all__ = ["settings_for", "resources_for", "production_rows", "quick_training_set", "car_loan"]


def settings_for(lakefs: LakeFSResource, state: Path, spec: DatasetSpec, mlflow_uri: str | None = None) -> Settings:
    """The settings of a test: its lakeFS server and repository, its state folder, its data set and MLflow store.
    The audit trail is the one the tests read with `AuditTrail()` (MLP_AUDIT_DB, else <MLP_STATE_DIR>/audit)."""
    env = {"LAKEFS_ENDPOINT": lakefs.endpoint, "LAKEFS_ACCESS_KEY_ID": lakefs.access_key_id,
           "LAKEFS_SECRET_ACCESS_KEY": lakefs.secret_access_key}
    return testbed_settings(env, lakefs.repository, state, spec, mlflow_uri or "",
                            lakefs_storage_namespace=lakefs.storage_namespace, audit_path=audit_default_path())


def resources_for(lakefs: LakeFSResource, state: Path, spec: DatasetSpec, mlflow_uri: str | None = None) -> dict:
    """The platform's resources, from the one factory, for a test's lakeFS repository, state folder and MLflow."""
    return build_resources(settings_for(lakefs, state, spec, mlflow_uri))


def production_rows(spec: DatasetSpec, start, end, n: int | None = None) -> pl.DataFrame:
    """Raw production rows (as the simulator lands them) with event times in [start, end)."""
    _, production, _ = spec.load_source()
    df = pl.from_pandas(production)
    t = spec.time_column
    df = df.with_columns(pl.col(t).str.to_datetime(time_unit="us")) if df.schema[t] == pl.String else df
    df = df.filter((pl.col(t) >= start) & (pl.col(t) < end)).select(spec.raw_columns)
    return df.head(n) if n else df


def materialize_and_publish(assets, selection, instance, resources: dict, lakefs: LakeFSResource,
                            partition: str | None = None):
    """Materialize `selection` as one run (every check must pass) and publish it, as the publish sensor does."""
    import dagster as dg

    from resources.publish import publish_run

    by_name: dict = {}
    for a in assets:  # bare asset names (`"raw_records"`) are the assets' own: `[<data set>, "raw_records"]`
        for k in getattr(a, "keys", ()):
            by_name.setdefault(k.path[-1], []).append(k)
    if selection is not None:
        selection = [by_name[s][0] if isinstance(s, str) and "/" not in s and len(by_name.get(s, ())) == 1 else s
                     for s in selection]
    result = dg.materialize(assets, selection=selection, partition_key=partition, instance=instance,
                            resources=resources, raise_on_error=False)
    failed = [e for e in result.get_asset_check_evaluations() if not e.passed]
    assert result.success, (selection, partition, [(e.check_name, e.description) for e in failed])
    assert publish_run(instance, lakefs, result.run_id).status == "published"
    return result


# --- many data sets: asset keys and job names of the tests' data set --------------------------------------------------
def K(*names: str, dataset: str = "car_loan") -> list:
    """The asset keys `[<data set>, <name>]` of bare asset names (a `selection=` for dg.materialize)."""
    from resources.naming import ns

    return ns(dataset).keys(*names)


def key(name: str, dataset: str = "car_loan"):
    """The asset key `[<data set>, <name>]` of a bare asset name."""
    from resources.naming import ns

    return ns(dataset).key(name)


def node(name: str, dataset: str = "car_loan") -> str:
    """The op (node) name of a data set's asset, for `run_config={"ops": ...}` and
    `asset_materializations_for_node`."""
    return f"{dataset}__{name}"
