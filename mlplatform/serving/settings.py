"""The `serving:` section of a data-set spec, parsed by `ServingSettings` (pydantic, extra keys forbidden).

    serving:
      model_name: car_loan-model          # registered model (default: <spec name>-model)
      reload_seconds: 5                   # how often aliases, tags and the routing file are polled
      routing_file: ""                    # optional YAML/JSON routing file (relative to the spec's folder)
      routing: {mode: champion, canary_percent: 0, variants: {}, shadow: false, kill_switch: false}
      missing: {default_policy: native_missing, features: {car_value: {policy: reject}}}
      unknown_category: native_missing    # reject | native_missing | default (with unknown_category_default)
      log: {enabled: true, batch_rows: 500, flush_seconds: 2.0, queue_rows: 100000}
      max_rows: 10000                     # rows per request

`load_serving_settings(spec)` reads it from the spec file's raw YAML; an absent section gives the defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlplatform.errors import SettingError

if TYPE_CHECKING:
    from mlplatform.spec import DatasetSpec

MissingPolicy = Literal["reject", "default", "native_missing"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeaturePolicy(_Strict):
    """What to do when a feature is absent or null in a request row."""
    policy: MissingPolicy = "native_missing"
    default: float | str | bool | None = None   # the value used by policy `default`

    @model_validator(mode="after")
    def _default_given(self):
        if self.policy == "default" and self.default is None:
            raise ValueError("policy 'default' needs a `default` value")
        return self


class MissingSettings(_Strict):
    default_policy: MissingPolicy = "native_missing"
    default_values: dict[str, float | str | bool] = Field(default_factory=dict)
    features: dict[str, FeaturePolicy] = Field(default_factory=dict)


class RoutingSettings(_Strict):
    """Which model answers. `mode`: champion (all to champion) | canary | ab. Overridden at run time by the
    routing file, then by MLflow tags `serving.*` on the registered model (see mlplatform.serving.routing)."""
    mode: Literal["champion", "canary", "ab"] = "champion"
    canary_percent: float = Field(0.0, ge=0, le=100)
    variants: dict[str, float] = Field(default_factory=dict)  # A/B: alias -> weight
    shadow: bool = False          # score the challenger off the response path, log only
    kill_switch: bool = False     # everything to the champion, no shadow
    sticky_header: str = "x-entity-id"

    @field_validator("variants")
    @classmethod
    def _weights(cls, v: dict[str, float]):
        if any(w < 0 for w in v.values()):
            raise ValueError("variant weights must be >= 0")
        if v and sum(v.values()) <= 0:
            raise ValueError("variant weights must sum to more than 0")
        return v


class LogSettings(_Strict):
    enabled: bool = True
    batch_rows: int = Field(500, ge=1)
    flush_seconds: float = Field(2.0, gt=0)
    queue_rows: int = Field(100_000, ge=1)
    spool_dir: str = ""           # default: <state dir>/landing/<spec name>/online_predictions


class ServingSettings(_Strict):
    model_name: str = ""
    reload_seconds: float = Field(5.0, gt=0)
    routing_file: str = ""
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    missing: MissingSettings = Field(default_factory=MissingSettings)
    unknown_category: MissingPolicy = "native_missing"
    unknown_category_default: dict[str, str] = Field(default_factory=dict)
    log: LogSettings = Field(default_factory=LogSettings)
    max_rows: int = Field(10_000, ge=1)
    compile: bool = True          # compile the Booster with lleaves (exact) for the single-row path
    # The online gate: approve the version awaiting approval once a published online_experiment_report shows it
    # better than the champion and nowhere worse (mlplatform.serving.experiment.gate_verdict).
    experiment_gate: bool = False

    def policy_for(self, feature: str) -> FeaturePolicy:
        if feature in self.missing.features:
            return self.missing.features[feature]
        if feature in self.missing.default_values:
            return FeaturePolicy(policy="default", default=self.missing.default_values[feature])
        if self.missing.default_policy == "default":
            raise SettingError(f"serving.missing.default_policy is 'default' but no default value is given for "
                               f"feature {feature!r} (serving.missing.default_values.{feature})")
        return FeaturePolicy(policy=self.missing.default_policy)


def _error_text(exc: ValidationError) -> str:
    return "; ".join(f"serving.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def parse_serving(raw: Any, spec: DatasetSpec | None = None, where: str = "") -> ServingSettings:
    """ServingSettings from the raw `serving:` mapping (None = defaults); checks feature names against the spec."""
    try:
        settings = ServingSettings.model_validate(raw or {})
    except ValidationError as exc:
        raise SettingError(f"{where}: {_error_text(exc)}") from None
    if spec is not None:
        known = set(spec.feature_names)
        unknown = sorted((set(settings.missing.features) | set(settings.missing.default_values)
                          | set(settings.unknown_category_default)) - known)
        if unknown:
            raise SettingError(f"{where}: serving.missing names unknown feature(s) {unknown}; "
                               f"the spec's features are {sorted(known)}")
        for name in spec.feature_names:
            settings.policy_for(name)  # a `default` policy without a value fails here, naming the feature
    return settings


def load_serving_settings(spec: DatasetSpec) -> ServingSettings:
    """The spec's `serving:` section (typed and checked by mlplatform.spec with the rest of the spec)."""
    return spec.serving
