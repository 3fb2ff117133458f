"""The one function that chooses the resources for an environment (local / prod)."""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from resources.duckdb import DuckDBResource
from resources.io import LakeFSIOManager
from resources.lakefs import LakeFSResource
from resources.landing import LandingZoneResource
from resources.mlflow import MLflowResource
from mlplatform.spec import SettingError, dataset_name, environment, state_dir


def build_resources(env: str | None = None) -> dict[str, Any]:
    """Resources for `env` (local or prod). Values come from environment variables at run time."""
    env = env or environment()
    state = state_dir()
    lakefs = LakeFSResource(
        endpoint=dg.EnvVar("LAKEFS_ENDPOINT"),
        access_key_id=dg.EnvVar("LAKEFS_ACCESS_KEY_ID"),
        secret_access_key=dg.EnvVar("LAKEFS_SECRET_ACCESS_KEY"),
        repository=dg.EnvVar("LAKEFS_REPOSITORY") if env == "prod" else os.environ.get("LAKEFS_REPOSITORY",
                                                                                       "mlplatform"),
        storage_namespace=dg.EnvVar("LAKEFS_STORAGE_NAMESPACE") if env == "prod" else "",
    )
    model = f"{dataset_name()}-model"
    mlflow = MLflowResource(
        tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI"),
        model_name=model,
        experiment=dataset_name(),
        ui_url=dg.EnvVar("MLFLOW_UI_URL") if env == "prod" else "http://127.0.0.1:5000",
    )
    duckdb = DuckDBResource(
        database=str(state / "duckdb" / f"{dataset_name()}.duckdb"),
        state_dir=str(state),
        lakefs_endpoint=dg.EnvVar("LAKEFS_ENDPOINT"),
        lakefs_access_key_id=dg.EnvVar("LAKEFS_ACCESS_KEY_ID"),
        lakefs_secret_access_key=dg.EnvVar("LAKEFS_SECRET_ACCESS_KEY"),
    )
    return {
        "lakefs": lakefs,
        "mlflow": mlflow,
        "duckdb": duckdb,
        "landing": LandingZoneResource(root=str(state / "landing" / dataset_name())),
        "io_manager": LakeFSIOManager(lakefs=lakefs),
    }


__all__ = ["build_resources", "LakeFSResource", "LakeFSIOManager", "MLflowResource", "DuckDBResource",
           "SettingError"]
