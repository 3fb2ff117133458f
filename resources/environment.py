"""The one resource factory: typed settings, read from the environment in one function, and the resources
built from them, for every caller.

- `Settings.from_env()` is the only place that turns environment variables into settings (`MLP_ENV=local`
  gives local defaults; `MLP_ENV=prod` requires what it needs and names what is missing).
- `build_resources(settings)` builds the platform's resources from settings. Outside Dagster (CLI, demo,
  tests, benchmarks) every value is concrete. With `deferred=True` (the Dagster definitions) secrets and
  endpoints are `dg.EnvVar`s, resolved by Dagster when a run starts, so none is read or baked in at import.

Many data sets share these resources (one per key in the Definitions). What differs per data set is derived from
its spec where it is used: `mlflow.scoped(spec)` (experiment and registered model), `landing.zone(spec)` (its
folder under `<state>/landing/`), lakeFS paths from its asset keys. `Settings.dataset` (MLP_DATASET) names the one
data set of single-data-set callers (the CLI's default model, the model server, tests).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dagster as dg

from mlplatform.batches import SETTLE_SECONDS
from mlplatform.spec import ROOT, SettingError, load_spec
from resources.audit import AuditResource
from resources.duckdb import DuckDBResource
from resources.io import LakeFSIOManager
from resources.lakefs import LakeFSResource
from resources.landing import LandingZoneResource
from resources.landing_store import ObjectStoreLandingZoneResource
from resources.mlflow import MLflowResource

# Each setting and the environment variable it is read from.
ENV_VARS: dict[str, str] = {
    "env": "MLP_ENV",
    "lakefs_endpoint": "LAKEFS_ENDPOINT",
    "lakefs_access_key_id": "LAKEFS_ACCESS_KEY_ID",
    "lakefs_secret_access_key": "LAKEFS_SECRET_ACCESS_KEY",
    "lakefs_repository": "LAKEFS_REPOSITORY",
    "lakefs_storage_namespace": "LAKEFS_STORAGE_NAMESPACE",
    "mlflow_tracking_uri": "MLFLOW_TRACKING_URI",
    "mlflow_ui_url": "MLFLOW_UI_URL",
    "state_dir": "MLP_STATE_DIR",
    "dataset": "MLP_DATASET",
    "audit_path": "MLP_AUDIT_DB",
    "audit_url": "MLP_AUDIT_URL",
    "mlflow_artifact_root": "MLP_MLFLOW_ARTIFACT_ROOT",
    "landing_url": "MLP_LANDING_URL",
    "landing_settle_seconds": "MLP_LANDING_SETTLE_SECONDS",
}
# Secrets and endpoints: in the Dagster definitions always a dg.EnvVar, resolved at run time.
AT_RUN_TIME = ("lakefs_endpoint", "lakefs_access_key_id", "lakefs_secret_access_key", "mlflow_tracking_uri")
# MLP_ENV=prod has no local defaults: these must be set (LAKEFS_REPOSITORY, LAKEFS_STORAGE_NAMESPACE and
# MLFLOW_UI_URL are then also dg.EnvVars in the definitions).
PROD_REQUIRES = (*AT_RUN_TIME, "lakefs_repository", "lakefs_storage_namespace", "mlflow_ui_url")
LAKEFS = ("lakefs_endpoint", "lakefs_access_key_id", "lakefs_secret_access_key")
MLFLOW = ("mlflow_tracking_uri",)

LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"


@dataclass(frozen=True)
class Settings:
    """Where the platform's services and state are. Empty strings are "not set": with MLP_ENV=local the local
    defaults apply, with MLP_ENV=prod the settings of PROD_REQUIRES must be given."""

    env: Literal["local", "prod"] = "local"
    lakefs_endpoint: str = ""
    lakefs_access_key_id: str = ""
    lakefs_secret_access_key: str = field(default="", repr=False)
    lakefs_repository: str = ""  # local default: mlplatform
    lakefs_storage_namespace: str = ""  # default: local://<repository> (the server's local blockstore)
    mlflow_tracking_uri: str = ""
    mlflow_ui_url: str = ""  # local default: http://127.0.0.1:5000 (`make dev`)
    mlflow_experiment: str = ""  # default: the data set's name
    mlflow_model_name: str = ""  # default: <data set>-model
    state_dir: Path = ROOT / ".state"
    dataset: str = "car_loan"  # a spec name under platform/datasets/
    audit_path: Path | None = None  # default: <state dir>/audit/audit.db
    # The prod profile's stores (`make up` with MLP_ENV=prod sets them for its Postgres): the audit trail in a
    # Postgres database instead of the SQLite file, and where MLflow puts artifacts when its store is a database
    # (default: <state dir>/mlflow/artifacts; an s3:// prefix on a cluster).
    audit_url: str = field(default="", repr=False)  # postgresql://user:password@host:port/db
    mlflow_artifact_root: str = ""
    # The landing zone as an object-store prefix (lakefs://<repository>/<branch>/<prefix>); default: the folder
    # <state dir>/landing/<data set>, which is then its local mirror.
    landing_url: str = ""
    landing_settle_seconds: float = SETTLE_SECONDS

    def __post_init__(self) -> None:
        if self.env not in ("local", "prod"):
            raise SettingError(f"setting MLP_ENV must be 'local' or 'prod', got {self.env!r}")
        if self.env == "prod":
            self.require(*PROD_REQUIRES, why="MLP_ENV=prod")
        fill = {"state_dir": Path(self.state_dir),
                "lakefs_repository": self.lakefs_repository or "mlplatform",
                "mlflow_ui_url": self.mlflow_ui_url or LOCAL_MLFLOW_UI,
                "mlflow_experiment": self.mlflow_experiment or self.dataset,
                "mlflow_model_name": self.mlflow_model_name or f"{self.dataset}-model"}
        fill["audit_path"] = Path(self.audit_path) if self.audit_path else fill["state_dir"] / "audit" / "audit.db"
        for name, value in fill.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """The settings of this process's environment (or of `environ`): the one place they are read."""
        environ = os.environ if environ is None else environ
        given = {name: environ[var].strip() for name, var in ENV_VARS.items() if environ.get(var, "").strip()}
        if "dataset" in given and given["dataset"].endswith((".yaml", ".yml")):  # a path to a spec file
            given["dataset"] = load_spec(given["dataset"]).name
        if "landing_settle_seconds" in given:
            try:
                given["landing_settle_seconds"] = float(given["landing_settle_seconds"])
            except ValueError:
                raise SettingError(f"setting MLP_LANDING_SETTLE_SECONDS must be a number of seconds, got "
                                   f"{given['landing_settle_seconds']!r}") from None
        return cls(**given)

    def require(self, *names: str, why: str = "") -> "Settings":
        """Self, or SettingError naming every environment variable among `names` that is not set."""
        missing = [ENV_VARS[n] for n in names if not getattr(self, n)]
        if missing:
            hint = f" ({why} needs them): export them" if why else ": run `make up`, or export them for your services"
            raise SettingError(f"setting(s) {', '.join(missing)} not set{hint}")
        return self

    def replace(self, **changes: Any) -> "Settings":
        """A copy with `changes`; what was derived (audit path from the state folder, MLflow experiment and model
        from the data set) follows the change unless it was set to something else."""
        derived = {"audit_path": self.state_dir / "audit" / "audit.db", "mlflow_experiment": self.dataset,
                   "mlflow_model_name": f"{self.dataset}-model"}
        follow = {k: None if k == "audit_path" else "" for k, v in derived.items()
                  if k not in changes and getattr(self, k) == v}
        return dataclasses.replace(self, **{**follow, **changes})

    def to_env(self) -> dict[str, str]:
        """The environment variables that give these settings (for a subprocess): `from_env` reads them back."""
        out = {var: str(getattr(self, name)) for name, var in ENV_VARS.items() if getattr(self, name) != ""}
        if self.mlflow_experiment != self.dataset or self.mlflow_model_name != f"{self.dataset}-model":
            raise SettingError(f"MLflow experiment {self.mlflow_experiment!r} and model {self.mlflow_model_name!r} "
                               f"are not the data set's: no environment variable gives them")
        return out


def _value(settings: Settings, name: str, deferred: bool) -> Any:
    """A setting as a resource field: a dg.EnvVar in the definitions for what is resolved at run time."""
    if deferred and (name in AT_RUN_TIME or (settings.env == "prod" and name in PROD_REQUIRES)):
        return dg.EnvVar(ENV_VARS[name])
    return getattr(settings, name)


def lakefs_resource(settings: Settings, deferred: bool = False) -> LakeFSResource:
    return LakeFSResource(**{f: _value(settings, f"lakefs_{f}", deferred)
                             for f in ("endpoint", "access_key_id", "secret_access_key", "repository",
                                       "storage_namespace")})


def mlflow_resource(settings: Settings, deferred: bool = False) -> MLflowResource:
    return MLflowResource(tracking_uri=_value(settings, "mlflow_tracking_uri", deferred),
                          ui_url=_value(settings, "mlflow_ui_url", deferred),
                          experiment=settings.mlflow_experiment, model_name=settings.mlflow_model_name,
                          artifact_root=mlflow_artifact_root(settings))


DATABASE_URIS = ("postgresql", "postgres", "mysql", "mssql")


def mlflow_artifact_root(settings: Settings) -> str:
    """Where MLflow writes artifacts: the setting, else, for a database store (no server to decide it), a folder
    under the state folder (MLflow's own default would be ./mlruns in whatever directory a process runs in)."""
    if settings.mlflow_artifact_root:
        return settings.mlflow_artifact_root
    if settings.mlflow_tracking_uri.split(":", 1)[0].split("+", 1)[0] in DATABASE_URIS:
        return (settings.state_dir / "mlflow" / "artifacts").absolute().as_uri()
    return ""


def audit_resource(settings: Settings, deferred: bool = False) -> AuditResource:
    """The trail in Postgres when MLP_AUDIT_URL is set (in the definitions a dg.EnvVar: it holds a password),
    else in the SQLite file."""
    url: Any = settings.audit_url
    if deferred and url:
        url = dg.EnvVar(ENV_VARS["audit_url"])
    return AuditResource(path=str(settings.audit_path), url=url)


def default_audit_trail():
    """The audit trail of this environment's settings, for a caller outside a run that was given none."""
    return audit_resource(Settings.from_env()).trail()


def landing_resource(settings: Settings, lakefs: LakeFSResource) -> LandingZoneResource:
    """The folder <state dir>/landing, each data set landing in its own <state dir>/landing/<data set>
    (`zone(spec)`), or the object-store prefix MLP_LANDING_URL (`<prefix>/<data set>`) mirrored into it."""
    root = str(settings.state_dir / "landing")
    if settings.landing_url:
        return ObjectStoreLandingZoneResource(root=root, settle_seconds=settings.landing_settle_seconds,
                                              url=settings.landing_url, lakefs=lakefs)
    return LandingZoneResource(root=root, settle_seconds=settings.landing_settle_seconds)


def build_resources(settings: Settings | None = None, deferred: bool = False) -> dict[str, Any]:
    """The platform's resources for `settings` (default: `Settings.from_env()`).

    `deferred=True` is for the Dagster definitions: secrets and endpoints become dg.EnvVars. Otherwise every
    value is concrete; `mlflow` is left out when no tracking URI is set (only what uses MLflow needs it)."""
    settings = settings or Settings.from_env()
    state = settings.state_dir
    lakefs = lakefs_resource(settings, deferred)
    resources: dict[str, Any] = {
        "lakefs": lakefs,
        "io_manager": LakeFSIOManager(lakefs=lakefs),
        "duckdb": DuckDBResource(database=str(state / "duckdb" / f"{settings.dataset}.duckdb"), state_dir=str(state),
                                 lakefs=lakefs),
        "landing": landing_resource(settings, lakefs),
        "audit": audit_resource(settings, deferred),
    }
    if deferred or settings.mlflow_tracking_uri:
        resources["mlflow"] = mlflow_resource(settings, deferred)
    return resources


__all__ = ["Settings", "build_resources", "lakefs_resource", "mlflow_resource", "audit_resource",
           "default_audit_trail", "ENV_VARS", "SettingError"]
