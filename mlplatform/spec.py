"""Settings: the data-set spec and the one function that chooses the environment (local / prod)."""

from __future__ import annotations

import datetime as dt
import os
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DATASETS_DIR = ROOT / "platform" / "datasets"


class SettingError(ValueError):
    """A configuration value is missing or malformed; the message names the setting and file."""


FEATURE_TYPES = {"numeric", "categorical", "boolean"}
REDELIVERY_POLICIES = {"reject", "replace_by_id"}
PROBLEM_TYPES = {"binary_classification", "regression"}
CADENCES = {"hourly", "daily", "weekly", "monthly", "yearly"}


@dataclass(frozen=True)
class Feature:
    name: str
    type: str
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] | None = None


@dataclass(frozen=True)
class EngineeredFeature:
    name: str
    expression: str  # DuckDB SQL over the raw columns, used by dbt (batch) and serving alike


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    loader: str
    drop_columns: tuple[str, ...]
    id_column: str
    time_column: str
    target: str
    problem_type: str
    positive_class: Any
    features: tuple[Feature, ...]
    engineered_features: tuple[EngineeredFeature, ...]
    label_delay_days: int
    cadence: str
    batch_start: str
    batch_end: str
    split: dict[str, float]
    metric: str
    floor: float
    margin: float
    monitoring: dict[str, Any] = field(default_factory=dict)
    automation: dict[str, Any] = field(default_factory=dict)
    freshness: dict[str, dict[str, dt.timedelta]] = field(default_factory=dict)
    # Landing-zone contract: the timezone naive event times are in (tz-aware ones are converted to it),
    # the fraction of unseen categories a file may hold before it is quarantined, the re-delivery policy.
    timezone: str = "UTC"
    max_unseen_category_fraction: float = 0.05
    redelivery: str = "reject"
    path: str = ""
    # Sources given as files instead of a loader: paths or globs (relative to the spec's folder), read as
    # Parquet or CSV (by extension unless `source.format` says). `time_type` says how the time column is stored.
    source_reference: str = ""
    source_production: str = ""
    source_labels: str = ""
    source_format: str = ""
    time_type: str = "datetime"

    @property
    def is_classification(self) -> bool:
        return self.problem_type == "binary_classification"

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def model_feature_names(self) -> list[str]:
        return self.feature_names + [f.name for f in self.engineered_features]

    @property
    def categorical_features(self) -> list[str]:
        return [f.name for f in self.features if f.type == "categorical"]

    @property
    def raw_columns(self) -> list[str]:
        return [self.id_column, self.time_column, *self.feature_names]

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in {"rmse", "mae", "log_loss", "brier"}

    def load_source(self):
        """(reference, production, production_labels) as pandas: see mlplatform.sources."""
        from mlplatform.sources import load_source

        return load_source(self)


def _require(raw: dict, key: str, path: Path, kind: type | tuple = object):
    cur: Any = raw
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur or cur[part] is None:
            raise SettingError(f"{path}: setting {key!r} is missing")
        cur = cur[part]
    if not isinstance(cur, kind):
        raise SettingError(f"{path}: setting {key!r} must be {getattr(kind, '__name__', kind)}, got {cur!r}")
    return cur


def load_spec(name_or_path: str | Path) -> DatasetSpec:
    """Read and validate a data-set spec; every error names the file and the setting."""
    path = Path(name_or_path)
    if not path.suffix:
        path = DATASETS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in DATASETS_DIR.glob("*.yaml"))
        raise SettingError(f"data-set spec {path} does not exist (MLP_DATASET); known: {known}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SettingError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SettingError(f"{path}: expected a mapping at the top level")

    features = []
    for i, f in enumerate(_require(raw, "features", path, list)):
        if not isinstance(f, dict) or "name" not in f:
            raise SettingError(f"{path}: setting 'features[{i}]' needs a name")
        ftype = f.get("type")
        if ftype not in FEATURE_TYPES:
            raise SettingError(f"{path}: setting 'features[{i}].type' ({f['name']}) must be one of "
                               f"{sorted(FEATURE_TYPES)}, got {ftype!r}")
        cats = f.get("categories")
        if ftype == "categorical" and not cats:
            raise SettingError(f"{path}: setting 'features[{i}].categories' ({f['name']}) is missing")
        features.append(Feature(str(f["name"]), ftype, f.get("min"), f.get("max"),
                                tuple(str(c) for c in cats) if cats else None))
    engineered = []
    for i, f in enumerate(raw.get("engineered_features") or []):
        if not isinstance(f, dict) or not f.get("name") or not f.get("expression"):
            raise SettingError(f"{path}: setting 'engineered_features[{i}]' needs a name and an expression")
        engineered.append(EngineeredFeature(str(f["name"]), str(f["expression"])))

    problem = _require(raw, "target.problem_type", path, str)
    if problem not in PROBLEM_TYPES:
        raise SettingError(f"{path}: setting 'target.problem_type' must be one of {sorted(PROBLEM_TYPES)}, "
                           f"got {problem!r}")
    cadence = _require(raw, "batch.cadence", path, str)
    if cadence not in CADENCES:
        raise SettingError(f"{path}: setting 'batch.cadence' must be one of {sorted(CADENCES)}, got {cadence!r}")
    for key in ("batch.start", "batch.end"):
        value = str(_require(raw, key, path))
        try:
            dt.date.fromisoformat(value)
        except ValueError:
            raise SettingError(f"{path}: setting {key!r} must be a date YYYY-MM-DD, got {value!r}") from None
    split = _require(raw, "training.split", path, dict)
    if set(split) != {"train", "validation", "test"} or abs(sum(split.values()) - 1.0) > 1e-9 \
            or any(v <= 0 for v in split.values()):
        raise SettingError(f"{path}: setting 'training.split' must give train, validation and test "
                           f"fractions > 0 summing to 1, got {split!r}")
    contracts_raw = raw.get("contracts") or {}
    landing_raw = raw.get("landing") or {}
    if not isinstance(contracts_raw, dict) or not isinstance(landing_raw, dict):
        raise SettingError(f"{path}: settings 'contracts' and 'landing' must be mappings")
    timezone = str(contracts_raw.get("timezone", "UTC"))
    try:
        zoneinfo.ZoneInfo(timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise SettingError(f"{path}: setting 'contracts.timezone' must be an IANA timezone such as UTC or "
                           f"Europe/Paris, got {timezone!r}") from None
    unseen = contracts_raw.get("max_unseen_category_fraction", 0.05)
    if isinstance(unseen, bool) or not isinstance(unseen, (int, float)) or not 0 <= unseen < 1:
        raise SettingError(f"{path}: setting 'contracts.max_unseen_category_fraction' must be a number in "
                           f"[0, 1), got {unseen!r}")
    redelivery = landing_raw.get("redelivery", "reject")
    if redelivery not in REDELIVERY_POLICIES:
        raise SettingError(f"{path}: setting 'landing.redelivery' must be one of {sorted(REDELIVERY_POLICIES)}, "
                           f"got {redelivery!r}")
    delay = _require(raw, "label_delay_days", path, int)
    if delay < 0:
        raise SettingError(f"{path}: setting 'label_delay_days' must be >= 0, got {delay}")

    return DatasetSpec(
        name=_require(raw, "name", path, str),
        description=str(raw.get("description", "")),
        loader=str((raw.get("source") or {}).get("loader") or ""),
        drop_columns=tuple(raw.get("source", {}).get("drop_columns") or ()),
        id_column=_require(raw, "id_column", path, str),
        time_column=_require(raw, "time_column", path, str),
        target=_require(raw, "target.name", path, str),
        problem_type=problem,
        positive_class=raw["target"].get("positive_class", 1),
        features=tuple(features),
        engineered_features=tuple(engineered),
        label_delay_days=delay,
        cadence=cadence,
        batch_start=str(raw["batch"]["start"]),
        batch_end=str(raw["batch"]["end"]),
        split={k: float(v) for k, v in split.items()},
        metric=_require(raw, "training.metric", path, str),
        floor=float(_require(raw, "training.floor", path, (int, float))),
        margin=float(_require(raw, "training.margin", path, (int, float))),
        monitoring=dict(raw.get("monitoring") or {}),
        automation=dict(raw.get("automation") or {}),
        freshness={asset: {k: parse_duration(v, f"freshness.{asset}.{k}", path) for k, v in windows.items()}
                   for asset, windows in (raw.get("freshness") or {}).items()},
        timezone=timezone,
        max_unseen_category_fraction=float(unseen),
        redelivery=redelivery,
        path=str(path),
        source_reference=str((raw.get("source") or {}).get("reference") or ""),
        source_production=str((raw.get("source") or {}).get("production") or ""),
        source_labels=str((raw.get("source") or {}).get("labels") or ""),
        source_format=str((raw.get("source") or {}).get("format") or ""),
    )


def parse_duration(value: Any, key: str, path: Path) -> dt.timedelta:
    """'90s', '15m', '36h', '30d' -> timedelta; anything else names the setting."""
    text = str(value).strip()
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    if len(text) >= 2 and text[-1] in units:
        try:
            return dt.timedelta(**{units[text[-1]]: float(text[:-1])})
        except ValueError:
            pass
    raise SettingError(f"{path}: setting {key!r} must be a duration like 90s, 15m, 36h or 30d, got {value!r}")


def environment() -> str:
    """The one place that chooses the environment: MLP_ENV=local (default) or prod."""
    env = os.environ.get("MLP_ENV", "local")
    if env not in ("local", "prod"):
        raise SettingError(f"setting MLP_ENV must be 'local' or 'prod', got {env!r}")
    return env


def dataset_name() -> str:
    """MLP_DATASET: a spec name under platform/datasets/ or a path to a spec file (default car_loan)."""
    value = os.environ.get("MLP_DATASET", "car_loan")
    return load_spec(value).name if value.endswith((".yaml", ".yml")) else value


def dataset_spec() -> "DatasetSpec":
    """The spec chosen by MLP_DATASET (a name under platform/datasets/ or a path)."""
    return load_spec(os.environ.get("MLP_DATASET", "car_loan"))


def state_dir() -> Path:
    """The one folder of local runtime state (lakeFS data, MLflow store, Dagster home, landing zone, DuckDB,
    audit trail, generated settings): MLP_STATE_DIR, default `.state/` in the repo (git-ignored; `make clean`)."""
    return Path(os.environ.get("MLP_STATE_DIR", str(ROOT / ".state")))
