"""Settings: the data-set spec and the one function that chooses the environment (local / prod).

A data set is described by one YAML file under platform/datasets/. The pydantic models below are the spec's
single definition: every setting, its type, its default and its checks live here, nowhere else. `load_spec`
validates a file against them and returns a `DatasetSpec`: a flat, frozen object (the names callers use:
`spec.cadence`, `spec.time_column`, ...) with the typed sections `monitoring`, `automation` and `freshness`.
Any error names the file and the setting path (`car_loan.yaml: setting 'batch.cadence' must be one of ...`).
The JSON Schema editors use (platform/datasets/spec.schema.json) is generated from the same models:
`python -m mlplatform.spec --schema`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import json
import os
import re
import sys
import types
import typing
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field,
                      PlainValidator, Tag, ValidationError, WithJsonSchema, model_validator)
from pydantic_core import PydanticCustomError

ROOT = Path(__file__).resolve().parent.parent
DATASETS_DIR = ROOT / "platform" / "datasets"
SCHEMA_PATH = DATASETS_DIR / "spec.schema.json"


from mlplatform.errors import SettingError  # re-exported: callers import it from here
from mlplatform.serving.settings import ServingSettings


# --- the vocabularies -----------------------------------------------------------------------------------------------
FeatureType = Literal["numeric", "categorical", "boolean"]
ProblemType = Literal["binary_classification", "regression"]
Cadence = Literal["hourly", "daily", "weekly", "monthly", "yearly"]  # = mlplatform.batches.CADENCES (a test holds it)
Redelivery = Literal["reject", "replace_by_id"]
TimeType = Literal["datetime", "date", "iso_string", "year", "epoch_s", "epoch_ms"]
FileFormat = Literal["parquet", "csv"]
# = mlplatform.drift.engine.METHODS (a test holds it; the engine is not imported here: it pulls numpy and polars)
DriftMethod = Literal["psi", "ks", "chi2", "jensen_shannon", "wasserstein", "hellinger", "l_infinity"]

FEATURE_TYPES = set(typing.get_args(FeatureType))
PROBLEM_TYPES = set(typing.get_args(ProblemType))
CADENCES = set(typing.get_args(Cadence))
REDELIVERY_POLICIES = set(typing.get_args(Redelivery))
TIME_TYPES = set(typing.get_args(TimeType))
DRIFT_METHODS = typing.get_args(DriftMethod)
FILE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
# training.metric: what mlplatform.modeling.metric_fn can score (the promotion gate's bootstrap)
TRAINING_METRICS = {"binary_classification": ("roc_auc", "pr_auc"), "regression": ("rmse", "mae")}
# monitoring.estimated_metrics: what NannyML can estimate (CBPE / DLE) AND modeling.metrics realizes later
ESTIMATED_METRICS = {"binary_classification": ("roc_auc",), "regression": ("rmse", "mae")}
LOWER_IS_BETTER = {"rmse", "mae", "log_loss", "brier"}


# --- value types ----------------------------------------------------------------------------------------------------
def _problem(at: str, message: str) -> PydanticCustomError:
    """An error inside a model's own check, pointed at one of its settings (`at`, relative to the model)."""
    return PydanticCustomError("setting", message, {"at": at} if at else {})


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


T = typing.TypeVar("T")
Seq = Annotated[tuple[T, ...], BeforeValidator(_as_tuple)]  # a YAML list, held as a tuple (frozen)


def parse_duration(value: Any) -> dt.timedelta:
    """'90s', '15m', '36h', '30d' -> timedelta."""
    if isinstance(value, dt.timedelta):
        return value
    text = str(value).strip()
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    if isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?[smhd]", text) and float(text[:-1]) > 0:
        return dt.timedelta(**{units[text[-1]]: float(text[:-1])})
    raise PydanticCustomError("duration", "must be a positive duration like 90s, 15m, 36h or 30d")


def _duration_text(value: dt.timedelta) -> str:
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


Duration = Annotated[dt.timedelta, PlainValidator(parse_duration),
                     WithJsonSchema({"type": "string", "pattern": r"^\d+(\.\d+)?[smhd]$",
                                     "description": "a duration: 90s, 15m, 36h, 30d"})]


def _bound(value: Any) -> str:
    """A batch bound: a date (YYYY-MM-DD) or, for hourly batches, a date and time; held as text."""
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None).isoformat(sep=" ")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, str):
        try:
            return value if len(value) == 10 and dt.date.fromisoformat(value) else \
                dt.datetime.fromisoformat(value).replace(tzinfo=None).isoformat(sep=" ")
        except ValueError:
            pass
    raise PydanticCustomError("bound", "must be a date YYYY-MM-DD (or 'YYYY-MM-DD HH:MM' for hourly batches)")


BatchBound = Annotated[str, PlainValidator(_bound),
                       WithJsonSchema({"type": "string",
                                       "pattern": r"^\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2})?)?$"})]


def _timezone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise PydanticCustomError("timezone", "must be an IANA timezone such as UTC or Europe/Paris") from None
    return value


def _fraction(value: float) -> float:
    if not 0 <= value < 1:
        raise PydanticCustomError("fraction", "must be a number in [0, 1)")
    return value


def _scalar(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)):
        return value
    raise PydanticCustomError("scalar", "must be a single value (a number, text or true/false)")


Scalar = Annotated[Any, PlainValidator(_scalar), WithJsonSchema({"type": ["string", "number", "boolean"]})]


def _categories(value: Any) -> Any:
    """YAML reads yes/no/on/off as booleans and 1 as a number; a category is text."""
    if not isinstance(value, list):
        return value
    out = []
    for i, c in enumerate(value):
        if isinstance(c, bool):
            raise PydanticCustomError("setting", f"holds {str(c).lower()} at position {i}: YAML reads "
                                      "yes/no/on/off/true/false as booleans; quote the category")
        out.append(str(c) if isinstance(c, (int, float)) else c)
    return tuple(out)


class _Section(BaseModel):
    # strict: YAML's "5" is not the number 5; extra="forbid": a typo'd key is an error naming it
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)


# --- the sections ---------------------------------------------------------------------------------------------------
class Source(_Section):
    """Where the rows come from: either a Python loader, or files (Parquet or CSV)."""

    loader: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """`module:function` returning (reference, production, production_labels) as pandas DataFrames."""
    reference: str | None = None
    """Files source: path or glob of the reference (training history) rows, relative to the spec's folder."""
    production: str | None = None
    """Files source: path or glob of the production rows (the batches to score)."""
    labels: str | None = None
    """Files source: path or glob of the production labels (id and target)."""
    format: FileFormat | None = None
    """Files source: parquet or csv; default: by each file's extension (.parquet, .pq, .csv)."""
    drop_columns: Seq[str] = ()
    """Source columns to drop (for example, another model's predictions)."""

    @model_validator(mode="after")
    def _one_kind(self) -> Source:
        if self.loader and self.reference:
            raise _problem("", "gives both 'loader' and 'reference': a source is either a loader or files")
        if not self.loader and not self.reference:
            raise _problem("", "needs either 'loader' (module:function) or 'reference' (a file or glob)")
        if self.loader:
            for key in ("production", "labels", "format"):
                if getattr(self, key) is not None:
                    raise _problem(key, f"applies to file sources ('reference'), not to 'loader' {self.loader}")
        # Without `format`, each matched file's extension decides (a glob may mix CSV and Parquet); a file
        # with no known extension is named by mlplatform.sources when it is read.
        return self


class TimeColumn(_Section):
    """The event-time column and how it is stored."""

    name: str
    type: TimeType = "datetime"
    """datetime (timestamps) | date | iso_string (ISO-8601 text) | year (integer) | epoch_s | epoch_ms."""


def _time_column_form(value: Any) -> str | None:
    return "column-name" if isinstance(value, str) else "column-mapping" if isinstance(value, dict) else None


TimeColumnSetting = Annotated[
    Union[Annotated[str, Tag("column-name")], Annotated[TimeColumn, Tag("column-mapping")]],
    Discriminator(_time_column_form, custom_error_type="setting",
                  custom_error_message="must be a column name or a mapping {name: ..., type: ...}")]
_UNION_TAGS = {"column-name", "column-mapping", "invariance", "direction", "minimum_functionality"}


class Target(_Section):
    name: str
    """The label column."""
    problem_type: ProblemType
    positive_class: Scalar = 1
    """Binary classification: the label value counted as positive."""


class Feature(_Section):
    """A raw input column the model reads: numeric (optional min/max), categorical (its categories) or boolean."""

    name: str
    type: FeatureType
    min: float | None = None
    """Numeric: the smallest valid value (contracts count values below it as out of range)."""
    max: float | None = None
    """Numeric: the largest valid value."""
    categories: Annotated[Seq[str] | None, BeforeValidator(_categories)] = None
    """Categorical (required): the known categories; others count as unseen."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"properties": {"type": {"const": "categorical"}}}, "then": {"required": ["categories"]}}]})

    @model_validator(mode="after")
    def _by_type(self) -> Feature:
        if self.type == "categorical" and not self.categories:
            raise _problem("categories", "is missing: a categorical feature lists its categories")
        if self.type != "categorical" and self.categories is not None:
            raise _problem("categories", f"applies to categorical features, not to a {self.type} one")
        for key in ("min", "max"):
            if self.type != "numeric" and getattr(self, key) is not None:
                raise _problem(key, f"applies to numeric features, not to a {self.type} one")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise _problem("max", f"({self.max}) is below min ({self.min})")
        return self


class EngineeredFeature(_Section):
    """A row-level feature defined once: dbt builds it in batch, the serving path runs the same SQL."""

    name: str = Field(min_length=1)
    expression: str = Field(min_length=1)
    """DuckDB SQL over the raw columns."""


class Batch(_Section):
    cadence: Cadence
    """One production partition per period."""
    start: BatchBound
    """The first period starts at the first boundary at or after this."""
    end: BatchBound
    """Exclusive."""

    @model_validator(mode="after")
    def _ordered(self) -> Batch:
        if dt.datetime.fromisoformat(self.end) <= dt.datetime.fromisoformat(self.start):
            raise _problem("end", f"({self.end}) must be after batch.start ({self.start})")
        return self


class Contracts(_Section):
    """What a landing file must satisfy (else it is quarantined with its reason)."""

    timezone: Annotated[str, AfterValidator(_timezone)] = "UTC"
    """Naive event times are in this timezone; tz-aware ones are converted to it."""
    max_unseen_category_fraction: Annotated[float, AfterValidator(_fraction)] = 0.05
    """Above this share of unseen categories in a column, a file is quarantined."""


class Landing(_Section):
    redelivery: Redelivery = "reject"
    """A file repeating ids already in its batch: reject (quarantine) | replace_by_id."""


class Split(_Section):
    """Time-ordered fractions of the reference rows."""

    train: float = Field(0.6, gt=0)
    validation: float = Field(0.2, gt=0)
    test: float = Field(0.2, gt=0)

    @model_validator(mode="after")
    def _sums_to_one(self) -> Split:
        if abs(self.train + self.validation + self.test - 1.0) > 1e-9:
            raise _problem("", "must give train, validation and test fractions > 0 summing to 1, got "
                               f"{self.as_dict()}")
        return self

    def as_dict(self) -> dict[str, float]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


class Training(_Section):
    split: Split = Split()
    metric: str
    """roc_auc | pr_auc (binary classification), rmse | mae (regression)."""
    floor: float
    """A candidate scoring worse than this is never promoted."""
    margin: float = Field(ge=0)
    """Not promoted if the CI of (candidate - champion) admits a loss bigger than this."""


class Monitoring(_Section):
    estimated_metrics: Seq[str] = ()
    """Metrics NannyML estimates before labels arrive (the first one is used); default: the training metric."""
    min_chunk_rows: int = Field(200, ge=1)
    """Drift: chunks with fewer rows are not judged."""
    reference_chunk_rows: int = Field(5000, ge=1)
    """Drift: the reference is cut into chunks of this many rows to set the thresholds."""
    psi_bins: int = Field(10, ge=2)
    drift_methods: Seq[DriftMethod] = DRIFT_METHODS
    std_multiplier: float = Field(3.0, gt=0)
    """Drift thresholds: the reference chunks' mean +/- this many standard deviations."""
    drift_plot_batches: int = Field(12, ge=1)
    """Drift over time: a batch's report plots it beside this many earlier published batch reports."""


class VolumeTrigger(_Section):
    """Retrain when enough new labelled rows arrived since the last training (either threshold)."""

    enabled: bool = True
    min_new_labelled_rows: int | None = Field(None, ge=1)
    """Absent: no row-count threshold."""
    min_fraction: float | None = Field(0.5, gt=0)
    """New labelled rows as a fraction of the last training set; null: no fraction threshold."""


class DriftTrigger(_Section):
    """Retrain when the latest drift report alerts on enough features (or multivariate)."""

    enabled: bool = True
    min_alerting_features: int = Field(1, ge=1)
    method: DriftMethod | None = None
    """Count only alerts by this method (one of monitoring.drift_methods); absent: any method."""
    on_multivariate_alert: bool = False


class PerformanceTrigger(_Section):
    """Retrain when the estimated performance of the champion falls below a floor or its test score."""

    enabled: bool = True
    floor: float | None = None
    """Absent: training.floor."""
    margin_below_champion_test: float | None = Field(None, ge=0)
    """Also retrain when the estimate is worse than the champion's test score by more than this; absent: off."""


class Rollback(_Section):
    """Roll the champion back when its realized metric is worse than the previous champion's by more than margin."""

    enabled: bool = True
    margin: float = Field(0.02, ge=0)
    """In the estimated metric's units."""


class Automation(_Section):
    retrain_schedule: str = Field("", pattern=r"^$|^\S+( \S+){4}$")
    """Cron (5 fields) for scheduled retraining; empty: off."""
    volume: VolumeTrigger = VolumeTrigger()
    drift: DriftTrigger = DriftTrigger()
    performance: PerformanceTrigger = PerformanceTrigger()
    min_minutes_between_retrains: float = Field(60, ge=0)
    rollback: Rollback = Rollback()


class FreshnessWindow(_Section):
    """An asset's freshness SLA: warn / fail when its last materialization is older."""

    warn: Duration | None = None
    fail: Duration

    @model_validator(mode="after")
    def _warn_first(self) -> FreshnessWindow:
        if self.warn is not None and self.warn >= self.fail:
            raise _problem("warn", f"({_duration_text(self.warn)}) must be shorter than fail "
                                   f"({_duration_text(self.fail)})")
        return self


AlertKind = Literal["run_failure", "check_failure", "freshness", "drift", "estimate", "retrain", "promotion",
                    "rollback"]  # = mlplatform.alerts.KINDS (a test holds it)


class AlertWebhook(_Section):
    """A webhook alerts are POSTed to: a generic JSON payload or a Slack-compatible one ({text, blocks})."""

    url: str = Field(pattern=r"^https?://")
    format: Literal["json", "slack"] = "json"


class Alerts(_Section):
    """Alerts delivered to webhooks (more webhooks: MLP_ALERT_WEBHOOKS; keep secret URLs there, not here)."""

    enabled: bool = True
    webhooks: Seq[AlertWebhook] = ()
    events: Seq[AlertKind] = ("run_failure", "check_failure", "freshness", "drift", "estimate", "retrain",
                              "promotion", "rollback")
    """The event kinds that alert; the others are recorded only."""
    rate_limit: int = Field(10, ge=1)
    """At most this many alerts of one kind per rate_window; the rest are suppressed (and counted)."""
    rate_window: Duration = Field("1h", validate_default=True)
    retry_for: Duration = Field("24h", validate_default=True)
    """A failed delivery is retried (with a growing delay) for this long after the alert, then dropped."""
    dagster_url: str = Field("http://127.0.0.1:3000", pattern=r"^https?://")
    """The Dagster UI that alert links point to (MLP_DAGSTER_URL overrides it)."""


# --- behavioural expectations (the gate's behavioural tests; mlplatform.behaviour evaluates them) ----------------
BehaviourKind = Literal["invariance", "direction", "minimum_functionality"]
BEHAVIOUR_KINDS = typing.get_args(BehaviourKind)
ExpectationName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]


class InvarianceExpectation(_Section):
    """Perturbing `feature` must not move the prediction by more than `epsilon` (on more than
    `max_violation_fraction` of the test rows). Numeric: x - delta and x + delta (clipped to the feature's min/max);
    categorical or boolean: every value in `values` (default: all categories, or true and false)."""

    kind: Literal["invariance"]
    name: ExpectationName
    description: str = ""
    feature: str
    """A raw feature (engineered features are recomputed from the perturbed row, as in serving)."""
    delta: float | None = Field(None, gt=0)
    """Numeric: the perturbation (both ways)."""
    values: Annotated[Seq[str] | None, BeforeValidator(_categories)] = None
    """Categorical: the values to substitute (default: all its categories)."""
    epsilon: float = Field(gt=0)
    """The largest allowed change of the prediction (probability for classification, target units otherwise)."""
    max_violation_fraction: Annotated[float, AfterValidator(_fraction)] = 0.0
    """The share of rows allowed to move by more than epsilon."""


class DirectionExpectation(_Section):
    """Raising `feature` (by `delta`, to at least the `to_quantile` of the test rows, or to the value `to`) must not
    move the prediction the forbidden way: `expect: not_increase` or `not_decrease`, by more than `tolerance`,
    on more than `max_violation_fraction` of the rows (rows the change does not touch count as passing)."""

    kind: Literal["direction"]
    name: ExpectationName
    description: str = ""
    feature: str
    """A raw feature."""
    expect: Literal["not_increase", "not_decrease"]
    delta: float | None = Field(None, gt=0)
    """Numeric: add this (clipped to the feature's max)."""
    to_quantile: float | None = Field(None, gt=0, lt=1)
    """Numeric: raise each value to at least this quantile of the test rows."""
    to: Scalar | None = None
    """Boolean or categorical: set the feature to this value (a boolean: true; a categorical: a category)."""
    tolerance: float = Field(0.0, ge=0)
    """A move the forbidden way smaller than this is not a violation."""
    max_violation_fraction: Annotated[float, AfterValidator(_fraction)] = 0.0

    @model_validator(mode="after")
    def _one_change(self) -> DirectionExpectation:
        given = [k for k in ("delta", "to_quantile", "to") if getattr(self, k) is not None]
        if len(given) != 1:
            raise _problem("", f"needs exactly one of delta, to_quantile, to; got {given or 'none'}")
        return self


class MinimumFunctionalityExpectation(_Section):
    """On a named slice of the test rows (`column` == `equals`, or a SQL `where` over the feature columns), the
    metric must be no worse than `floor` (>= for roc_auc / pr_auc, <= for rmse / mae)."""

    kind: Literal["minimum_functionality"]
    name: ExpectationName
    description: str = ""
    column: str | None = None
    """A feature column (raw or engineered) the slice is defined on."""
    equals: Scalar | None = None
    where: str | None = Field(None, min_length=1)
    """A SQL condition over the feature columns, e.g. "debt_to_income_ratio >= 0.8" (instead of column/equals)."""
    metric: str | None = None
    """Default: training.metric."""
    floor: float
    min_rows: int = Field(30, ge=1)
    """A slice with fewer test rows fails (it cannot show the model works there)."""

    @model_validator(mode="after")
    def _one_slice(self) -> MinimumFunctionalityExpectation:
        if self.where is not None and (self.column is not None or self.equals is not None):
            raise _problem("where", "gives a slice twice: use either 'where' or 'column' with 'equals'")
        if self.where is None and (self.column is None or self.equals is None):
            raise _problem("", "needs a slice: 'column' with 'equals', or 'where'")
        return self


def _expectation_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return getattr(value, "kind", None)
    kind = value.get("kind") if isinstance(value, dict) else None
    return kind if kind in BEHAVIOUR_KINDS else None


Expectation = Annotated[
    Union[Annotated[InvarianceExpectation, Tag("invariance")], Annotated[DirectionExpectation, Tag("direction")],
          Annotated[MinimumFunctionalityExpectation, Tag("minimum_functionality")]],
    Discriminator(_expectation_kind, custom_error_type="setting",
                  custom_error_message="must be a mapping whose 'kind' is one of invariance, direction, "
                                       "minimum_functionality")]


class SpecModel(_Section):
    """A data set: its source, columns, batches, contracts, training, monitoring and automation."""

    model_config = ConfigDict(title="Data-set spec")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str = ""
    source: Source
    id_column: str
    time_column: TimeColumnSetting
    """A datetime column's name, or {name: ..., type: datetime|date|iso_string|year|epoch_s|epoch_ms}."""
    target: Target
    features: Seq[Feature] = Field(min_length=1)
    engineered_features: Seq[EngineeredFeature] = ()
    label_delay_days: int = Field(ge=0)
    """A label arrives this long after its batch period ends."""
    batch: Batch
    contracts: Contracts = Contracts()
    landing: Landing = Landing()
    training: Training
    monitoring: Monitoring = Monitoring()
    automation: Automation = Automation()
    freshness: dict[str, FreshnessWindow] = {}
    """Per asset name: its warn / fail window (the UI shows each asset's SLA); absent: none."""
    alerts: Alerts = Field(default_factory=Alerts)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    """The online server: routing, missing-feature and unknown-category policies, the prediction log."""
    behaviour: Seq[Expectation] = ()
    """Behavioural expectations the promotion gate checks on the test rows: invariance, direction, minimum
    functionality on named slices. A candidate failing one is not promoted."""

    @model_validator(mode="after")
    def _across_sections(self) -> SpecModel:
        problem = self.target.problem_type
        if self.training.metric not in TRAINING_METRICS[problem]:
            raise _problem("training.metric", f"must be one of {list(TRAINING_METRICS[problem])} for {problem}, "
                                              f"got {self.training.metric!r}")
        estimated = self.monitoring.estimated_metrics or (self.training.metric,)
        for i, m in enumerate(estimated):
            if m not in ESTIMATED_METRICS[problem]:
                at = f"monitoring.estimated_metrics[{i}]" if self.monitoring.estimated_metrics else \
                    "monitoring.estimated_metrics"
                raise _problem(at, f"must be one of {list(ESTIMATED_METRICS[problem])} for {problem} (estimated "
                                   f"by NannyML, then realized once labels land), got {m!r}")
        method = self.automation.drift.method
        if method is not None and method not in self.monitoring.drift_methods:
            raise _problem("automation.drift.method", f"{method!r} is not among monitoring.drift_methods "
                                                      f"{list(self.monitoring.drift_methods)}: it could never fire")
        names = [f.name for f in self.features] + [f.name for f in self.engineered_features]
        time_name = self.time_column if isinstance(self.time_column, str) else self.time_column.name
        reserved = {self.id_column: "id_column", time_name: "time_column", self.target.name: "target.name"}
        for i, n in enumerate(names):
            at = f"features[{i}].name" if i < len(self.features) else \
                f"engineered_features[{i - len(self.features)}].name"
            if n in names[:i]:
                raise _problem(at, "is given twice")
            if n in reserved:
                raise _problem(at, f"is also {reserved[n]}")
            if n in self.source.drop_columns:
                raise _problem(at, "is also in source.drop_columns")
        raw_names = [f.name for f in self.features]
        unknown = sorted((set(self.serving.missing.features) | set(self.serving.missing.default_values)
                          | set(self.serving.unknown_category_default)) - set(raw_names))
        if unknown:
            raise _problem("serving.missing", f"names unknown feature(s) {unknown}; the features are {raw_names}")
        for n in raw_names:
            if n not in self.serving.missing.features and n not in self.serving.missing.default_values \
                    and self.serving.missing.default_policy == "default":
                raise _problem(f"serving.missing.default_values.{n}",
                               "is needed: serving.missing.default_policy is 'default'")
        self._check_behaviour(problem)
        # Defaults that depend on another setting, filled here (still the one place defaults live).
        if not self.monitoring.estimated_metrics:
            object.__setattr__(self, "monitoring", self.monitoring.model_copy(update={"estimated_metrics": estimated}))
        if self.automation.performance.floor is None:
            perf = self.automation.performance.model_copy(update={"floor": self.training.floor})
            object.__setattr__(self, "automation", self.automation.model_copy(update={"performance": perf}))
        return self

    def _check_behaviour(self, problem: str) -> None:
        features = {f.name: f for f in self.features}
        model_features = list(features) + [f.name for f in self.engineered_features]
        seen: set[str] = set()
        for i, e in enumerate(self.behaviour):
            at = f"behaviour[{i}]"
            if e.name in seen:
                raise _problem(f"{at}.name", f"{e.name!r} is given twice")
            seen.add(e.name)
            if isinstance(e, MinimumFunctionalityExpectation):
                if e.column is not None and e.column not in model_features:
                    raise _problem(f"{at}.column", f"{e.column!r} is not a feature; the features are {model_features}")
                if e.column in features and features[e.column].type == "categorical" \
                        and str(e.equals) not in (features[e.column].categories or ()):
                    raise _problem(f"{at}.equals", f"{e.equals!r} is not a category of {e.column}: "
                                                   f"{list(features[e.column].categories or ())}")
                metric = e.metric or self.training.metric
                if metric not in TRAINING_METRICS[problem]:
                    raise _problem(f"{at}.metric", f"must be one of {list(TRAINING_METRICS[problem])} for {problem}, "
                                                   f"got {metric!r}")
                continue
            if e.feature not in features:
                raise _problem(f"{at}.feature", f"{e.feature!r} is not a raw feature; the features are "
                                                f"{list(features)}")
            ftype = features[e.feature].type
            if isinstance(e, InvarianceExpectation):
                if ftype == "numeric" and e.delta is None:
                    raise _problem(f"{at}.delta", f"is needed: {e.feature} is numeric (perturbed by +/- delta)")
                if ftype != "numeric" and e.delta is not None:
                    raise _problem(f"{at}.delta", f"applies to numeric features; {e.feature} is {ftype} (use "
                                                  "'values', or nothing for all its values)")
                if e.values is not None:
                    known = features[e.feature].categories if ftype == "categorical" else None
                    if known is None:
                        raise _problem(f"{at}.values", f"applies to categorical features; {e.feature} is {ftype}")
                    unknown = [v for v in e.values if v not in known]
                    if unknown:
                        raise _problem(f"{at}.values", f"{unknown} are not categories of {e.feature}: {list(known)}")
            else:  # direction
                if ftype == "numeric" and e.to is not None:
                    raise _problem(f"{at}.to", f"applies to boolean or categorical features; {e.feature} is numeric "
                                               "(use delta or to_quantile)")
                if ftype != "numeric" and e.to is None:
                    raise _problem(f"{at}.{'delta' if e.delta is not None else 'to_quantile'}",
                                   f"applies to numeric features; {e.feature} is {ftype} (use 'to')")
                if ftype == "boolean" and not isinstance(e.to, bool):
                    raise _problem(f"{at}.to", f"must be true or false: {e.feature} is boolean, got {e.to!r}")
                if ftype == "categorical" and str(e.to) not in (features[e.feature].categories or ()):
                    raise _problem(f"{at}.to", f"{e.to!r} is not a category of {e.feature}: "
                                               f"{list(features[e.feature].categories or ())}")


_TAGGED_MODELS = {"invariance": InvarianceExpectation, "direction": DirectionExpectation,
                  "minimum_functionality": MinimumFunctionalityExpectation}


# --- the flat object callers use -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A validated spec, flat. Built only by `load_spec` (from SpecModel, which holds every default);
    `dataclasses.replace(spec, cadence=...)` gives a variant."""

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
    monitoring: Monitoring
    automation: Automation
    freshness: dict[str, FreshnessWindow]
    alerts: Alerts
    serving: ServingSettings
    behaviour: tuple  # the behavioural expectations (Invariance/Direction/MinimumFunctionalityExpectation)
    # Landing-zone contract: the timezone naive event times are in (tz-aware ones are converted to it),
    # the fraction of unseen categories a file may hold before it is quarantined, the re-delivery policy.
    timezone: str
    max_unseen_category_fraction: float
    redelivery: str
    path: str
    # Sources given as files instead of a loader: paths or globs (relative to the spec's folder), read as
    # Parquet or CSV ("" = by extension). `time_type` says how the time column is stored.
    source_reference: str
    source_production: str
    source_labels: str
    source_format: str
    time_type: str

    @classmethod
    def from_model(cls, m: SpecModel, path: str | Path) -> DatasetSpec:
        tc = m.time_column if isinstance(m.time_column, TimeColumn) else TimeColumn(name=m.time_column)
        return cls(
            name=m.name, description=m.description, loader=m.source.loader or "",
            drop_columns=m.source.drop_columns, id_column=m.id_column, time_column=tc.name, target=m.target.name,
            problem_type=m.target.problem_type, positive_class=m.target.positive_class, features=m.features,
            engineered_features=m.engineered_features, label_delay_days=m.label_delay_days,
            cadence=m.batch.cadence, batch_start=m.batch.start, batch_end=m.batch.end,
            split=m.training.split.as_dict(), metric=m.training.metric, floor=m.training.floor,
            margin=m.training.margin, monitoring=m.monitoring, automation=m.automation, freshness=dict(m.freshness),
            alerts=m.alerts, serving=m.serving, behaviour=m.behaviour,
            timezone=m.contracts.timezone, max_unseen_category_fraction=m.contracts.max_unseen_category_fraction,
            redelivery=m.landing.redelivery, path=str(path), source_reference=m.source.reference or "",
            source_production=m.source.production or "", source_labels=m.source.labels or "",
            source_format=m.source.format or "", time_type=tc.type)

    @property
    def is_classification(self) -> bool:
        return self.problem_type == "binary_classification"

    @property
    def estimated_metric(self) -> str:
        """The metric NannyML estimates and the monitoring compares (monitoring.estimated_metrics[0])."""
        return self.monitoring.estimated_metrics[0]

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
        return self.metric not in LOWER_IS_BETTER

    def load_source(self):
        """(reference, production, production_labels) as pandas: see mlplatform.sources."""
        from mlplatform.sources import load_source

        return load_source(self)


# --- loading --------------------------------------------------------------------------------------------------------
def _setting_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap(tp: Any) -> Any:
    """Annotated[X, ...] -> X; X | None -> X; the time_column union -> TimeColumn (the one model in it)."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
        elif typing.get_origin(tp) in (Union, types.UnionType):
            inner = [_unwrap(a) for a in typing.get_args(tp) if a is not type(None)]
            structured = [a for a in inner if typing.get_origin(a) in (tuple, dict)
                          or isinstance(a, type) and issubclass(a, BaseModel)]
            if len(structured) != 1:
                return tp
            tp = structured[0]
        else:
            return tp


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model whose settings sit at `loc` (for naming the known keys next to a typo)."""
    cur: Any = SpecModel
    for part in loc:
        if isinstance(cur, type) and issubclass(cur, BaseModel):
            field = cur.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            cur = field.annotation
        elif isinstance(part, int) and typing.get_origin(cur) is tuple:
            cur = typing.get_args(cur)[0]
        elif typing.get_origin(cur) is dict:
            cur = typing.get_args(cur)[1]
        else:
            return None
        cur = _unwrap(cur)
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _describe(err: dict, raw: Any) -> str:
    loc = tuple(p for p in err["loc"] if p not in _UNION_TAGS)
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "setting" and ctx.get("at"):
        loc = loc + tuple(int(p) if p.isdigit() else p
                          for p in re.findall(r"[^.\[\]]+", str(ctx["at"])))
    setting = _setting_path(loc) or "(top level)"
    about = ""  # the feature a features[i] error is about
    if len(loc) >= 2 and loc[0] in ("features", "engineered_features") and isinstance(loc[1], int):
        try:
            about = f" ({raw[loc[0]][loc[1]]['name']})"
        except (KeyError, IndexError, TypeError):
            pass
    got = f", got {value!r}"
    if kind == "missing":
        return f"setting {setting!r}{about} is missing"
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1]) or next((_TAGGED_MODELS[p] for p in err["loc"] if p in _TAGGED_MODELS), None)
        known = list(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        return (f"setting {setting!r}{about} is not a known setting"
                + (f" (did you mean {close[0]!r}?)" if close else "") + (f"; known here: {known}" if known else ""))
    if kind == "literal_error":
        return f"setting {setting!r}{about} must be one of {ctx.get('expected', '').replace(' or ', ', ')}{got}"
    what = {"int_type": "must be an integer", "int_parsing": "must be an integer",
            "int_from_float": "must be a whole number", "float_type": "must be a number",
            "float_parsing": "must be a number", "bool_type": "must be true or false",
            "bool_parsing": "must be true or false", "string_type": "must be text",
            "model_type": "must be a mapping", "model_attributes_type": "must be a mapping",
            "dict_type": "must be a mapping", "tuple_type": "must be a list", "list_type": "must be a list",
            "greater_than": f"must be > {ctx.get('gt')}", "greater_than_equal": f"must be >= {ctx.get('ge')}",
            "less_than": f"must be < {ctx.get('lt')}", "less_than_equal": f"must be <= {ctx.get('le')}",
            "too_short": f"must have at least {ctx.get('min_length')} item(s)",
            "string_too_short": "must not be empty",
            "string_pattern_mismatch": {"loader": "must be module:function", "name": "must be a lower-case "
                                        "identifier (a-z, 0-9, _)", "retrain_schedule": "must be a cron "
                                        "expression of 5 fields, or empty"}.get(
                                            str(loc[-1]) if loc else "", f"must match {ctx.get('pattern')}")}.get(kind)
    if what is None:  # our own checks (PydanticCustomError) and anything else: pydantic's message
        what = err["msg"]
    # a whole section's check names its values itself
    named = isinstance(value, (dict, BaseModel)) or "got " in what
    return f"setting {setting!r}{about} {what}" + ("" if named else got)


def validate_spec(raw: Any, path: str | Path) -> SpecModel:
    """Validate a parsed spec; every problem is named with its file and setting path (one per line)."""
    if not isinstance(raw, dict):
        raise SettingError(f"{path}: expected a mapping at the top level")
    try:
        return SpecModel.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: {_describe(e, raw)}" for e in exc.errors(include_url=False)]
        raise SettingError("\n".join(lines)) from None


def load_spec(name_or_path: str | Path) -> DatasetSpec:
    """Read and validate a data-set spec; every error names the file and the setting."""
    path = Path(name_or_path)
    if not path.suffix:
        path = DATASETS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in DATASETS_DIR.glob("*.yaml"))
        raise SettingError(f"data-set spec {path} does not exist (MLP_DATASET); known: {known}")
    try:
        # libyaml's loader when PyYAML has it: a code location loads every live spec (~10x faster than pure Python)
        raw = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise SettingError(f"{path}: not valid YAML: {exc}") from None
    return DatasetSpec.from_model(validate_spec(raw, path), path)


def json_schema() -> dict:
    """The JSON Schema of a spec file, generated from SpecModel (editors: yaml-language-server)."""
    schema = SpecModel.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


# --- environment ----------------------------------------------------------------------------------------------------
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


def bundled_specs() -> list[str]:
    """Every spec file shipped under platform/datasets/, by name."""
    return sorted(p.stem for p in DATASETS_DIR.glob("*.yaml"))


def live_dataset_names() -> list[str]:
    """The spec names or paths of the live data sets (one code location serves them all):
    MLP_DATASETS (comma-separated names under platform/datasets/ or paths to spec files), else MLP_DATASET
    (exactly that one data set), else every *.yaml spec under platform/datasets/."""
    many = os.environ.get("MLP_DATASETS", "").strip()
    if many:
        return [v.strip() for v in many.split(",") if v.strip()]
    one = os.environ.get("MLP_DATASET", "").strip()
    return [one] if one else bundled_specs()


def dataset_specs(names: list[str] | None = None) -> list["DatasetSpec"]:
    """The live data sets' specs (`live_dataset_names`, or `names`), in the order given. Two specs with the same
    `name` are an error naming both files: a data set's name is its namespace (asset keys, jobs, MLflow model)."""
    specs = [load_spec(v) for v in (names if names is not None else live_dataset_names())]
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            raise SettingError(f"data sets {seen[spec.name]} and {spec.path} are both named {spec.name!r} "
                               f"(setting 'name'): each data set needs its own name (MLP_DATASETS)")
        seen[spec.name] = spec.path
    if not specs:
        raise SettingError(f"no data set is live: MLP_DATASETS names none and {DATASETS_DIR} holds no *.yaml spec")
    return specs


def state_dir() -> Path:
    """The one folder of local runtime state (lakeFS data, MLflow store, Dagster home, landing zone, DuckDB,
    audit trail, generated settings): MLP_STATE_DIR, default `.state/` in the repo (git-ignored; `make clean`)."""
    return Path(os.environ.get("MLP_STATE_DIR", str(ROOT / ".state")))


def main(argv: list[str]) -> int:
    """`python -m mlplatform.spec --schema [--stdout]`: (re)write platform/datasets/spec.schema.json (or print it);
    `python -m mlplatform.spec NAME_OR_PATH...`: validate specs."""
    if "--schema" in argv:
        if "--stdout" in argv:
            sys.stdout.write(schema_text())
        else:
            SCHEMA_PATH.write_text(schema_text())
            print(f"wrote {SCHEMA_PATH.relative_to(ROOT)}")
        return 0
    names = [a for a in argv if not a.startswith("-")] or sorted(p.stem for p in DATASETS_DIR.glob("*.yaml"))
    status = 0
    for name in names:
        try:
            spec = load_spec(name)
            print(f"{spec.path}: ok")
        except SettingError as exc:
            print(exc, file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
