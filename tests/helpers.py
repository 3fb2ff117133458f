"""Shared test helpers: the platform's real resources pointed at the test's lakeFS repo and state folder."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from mlplatform import modeling
from mlplatform.features import online_features
from resources.io import LakeFSIOManager
from resources.landing import LandingZoneResource
from resources.lakefs import LakeFSResource
from resources.mlflow import MLflowResource
from mlplatform.spec import DatasetSpec, load_spec


def resources_for(lakefs: LakeFSResource, state: Path, spec: DatasetSpec, mlflow_uri: str | None = None) -> dict:
    from resources.duckdb import DuckDBResource

    res = {
        "lakefs": lakefs,
        "io_manager": LakeFSIOManager(lakefs=lakefs),
        # Tests write whole files before they materialize, so a file counts as complete at once; the settle
        # time itself is proven in tests/test_arrivals.py.
        "landing": LandingZoneResource(root=str(state / "landing" / spec.name), settle_seconds=0),
        "duckdb": DuckDBResource(database=str(state / "duckdb" / f"{spec.name}.duckdb"), state_dir=str(state),
                                 lakefs_endpoint=lakefs.endpoint, lakefs_access_key_id=lakefs.access_key_id,
                                 lakefs_secret_access_key=lakefs.secret_access_key),
    }
    if mlflow_uri:
        res["mlflow"] = MLflowResource(tracking_uri=mlflow_uri, model_name=f"{spec.name}-model",
                                       experiment=spec.name)
    return res


def production_rows(spec: DatasetSpec, start, end, n: int | None = None) -> pl.DataFrame:
    """Raw production rows (as the simulator lands them) with event times in [start, end)."""
    _, production, _ = spec.load_source()
    df = pl.from_pandas(production)
    t = spec.time_column
    df = df.with_columns(pl.col(t).str.to_datetime(time_unit="us")) if df.schema[t] == pl.String else df
    df = df.filter((pl.col(t) >= start) & (pl.col(t) < end)).select(spec.raw_columns)
    return df.head(n) if n else df


def quick_training_set(spec: DatasetSpec, n: int = 6000, seed_shift: int = 0) -> pl.DataFrame:
    """A training set built the platform's way (same feature SQL, time split) from the reference data."""
    reference, _, _ = spec.load_source()
    ref = pl.from_pandas(reference)
    t = spec.time_column
    ref = ref.with_columns(pl.col(t).str.to_datetime(time_unit="us")) if ref.schema[t] == pl.String else ref
    ref = ref.slice(seed_shift, n)
    feats = online_features(ref.select(spec.raw_columns), spec)
    ex = feats.join(ref.select(spec.id_column, spec.target), on=spec.id_column)
    return modeling.time_split(ex, spec)


def car_loan() -> DatasetSpec:
    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
    return load_spec("car_loan")
