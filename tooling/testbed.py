"""The platform on private services, for the tests and the benchmarks: the car-loan spec, a quick training set,
and settings pointed at a given lakeFS, state folder and MLflow store (the resources come from the one factory,
resources/environment.py). Benchmarks import this, never the tests."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from mlplatform import modeling
from mlplatform.features import online_features
from mlplatform.spec import DatasetSpec, load_spec
from resources.environment import Settings


def car_loan() -> DatasetSpec:
    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
    return load_spec("car_loan")


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


def testbed_settings(lakefs_env: Mapping[str, str], repository: str, state: Path, spec: DatasetSpec,
                     mlflow_uri: str = "", **changes: Any) -> Settings:
    """Settings for a private lakeFS (`lakefs_env`: LAKEFS_ENDPOINT and its keys), a state folder and a data set.

    Files are written whole before anything reads them, so a landing file counts as complete at once (settle
    time 0; the settle time itself is proven in tests/test_arrivals.py)."""
    return Settings(lakefs_endpoint=lakefs_env["LAKEFS_ENDPOINT"], lakefs_access_key_id=lakefs_env["LAKEFS_ACCESS_KEY_ID"],
                    lakefs_secret_access_key=lakefs_env["LAKEFS_SECRET_ACCESS_KEY"], lakefs_repository=repository,
                    state_dir=Path(state), dataset=spec.name, mlflow_tracking_uri=mlflow_uri,
                    **{"landing_settle_seconds": 0.0, **changes})
