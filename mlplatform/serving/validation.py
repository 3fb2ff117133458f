"""Request rows -> the model's feature vector, with the spec's types, ranges and categories and the
serving settings' missing-feature and unknown-category policies. Every refusal names the field.

The vector is the one `mlplatform.modeling.feature_matrix` builds in batch: numeric as float, categorical as
its index in the spec's category list, boolean as 0/1, missing as NaN, then the engineered features.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlplatform.serving.expressions import FeatureValueError, OnlineFeatures
from mlplatform.serving.settings import ServingSettings
from mlplatform.spec import DatasetSpec


class RequestError(ValueError):
    """A request the server refuses with a 4xx; `loc` names the field (e.g. ["rows", 3, "car_value"])."""

    def __init__(self, loc: list, message: str, status: int = 422):
        super().__init__(message)
        self.loc, self.message, self.status = loc, message, status

    def detail(self) -> dict:
        return {"loc": ["body", *self.loc], "msg": self.message, "field": str(self.loc[-1]) if self.loc else ""}


@dataclass
class Prepared:
    matrix: np.ndarray                 # rows x model features, float64
    raw: list[dict]                    # the validated raw rows (after policies), for the log
    engineered: list[list[float]]
    flags: list[dict[str, str]]        # per row: feature -> policy applied
    entity_ids: list[Any]
    event_times: list[dt.datetime | None] = field(default_factory=list)


_TYPE_NAMES = {"numeric": "a number", "categorical": "a string (one of the spec's categories)",
               "boolean": "a boolean"}


class RowValidator:
    def __init__(self, spec: DatasetSpec, settings: ServingSettings):
        self.spec, self.settings = spec, settings
        self.features = spec.features
        self.codes = {f.name: {c: float(i) for i, c in enumerate(f.categories or ())} for f in spec.features
                      if f.type == "categorical"}
        self.policies = {f.name: settings.policy_for(f.name) for f in spec.features}
        self.allowed = set(spec.feature_names) | {spec.id_column, spec.time_column}
        self.online = OnlineFeatures(spec)
        self.width = len(spec.model_feature_names)

    # --- one value ---------------------------------------------------------------------------------
    def _value(self, f, v: Any, loc: list, flags: dict) -> tuple[Any, float]:
        """(raw value for the expressions and the log, encoded model value)."""
        if v is None:
            pol = self.policies[f.name]
            if pol.policy == "reject":
                raise RequestError(loc, f"feature {f.name!r} is required (serving policy 'reject') and is "
                                        f"missing or null")
            if pol.policy == "native_missing":
                flags[f.name] = "missing:native_missing"
                return None, math.nan
            flags[f.name] = "missing:default"
            return self._value(f, pol.default, loc, {})  # the default is validated like a request value
        if f.type == "numeric":
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RequestError(loc, f"feature {f.name!r} must be {_TYPE_NAMES[f.type]}, got "
                                        f"{type(v).__name__} {v!r:.40}")
            try:
                x = float(v)
            except OverflowError:
                x = math.inf
            if not math.isfinite(x):
                raise RequestError(loc, f"feature {f.name!r} must be a finite number, got {v!r}")
            if (f.min is not None and x < f.min) or (f.max is not None and x > f.max):
                raise RequestError(loc, f"feature {f.name!r} = {v!r} is out of the spec's range "
                                        f"[{f.min}, {f.max}]")
            return x, x
        if f.type == "boolean":
            if isinstance(v, bool):
                return v, 1.0 if v else 0.0
            if isinstance(v, int) and v in (0, 1):
                return bool(v), float(v)
            raise RequestError(loc, f"feature {f.name!r} must be {_TYPE_NAMES[f.type]}, got "
                                    f"{type(v).__name__} {v!r:.40}")
        # categorical
        if not isinstance(v, str):
            raise RequestError(loc, f"feature {f.name!r} must be {_TYPE_NAMES[f.type]}, got "
                                    f"{type(v).__name__} {v!r:.40}")
        code = self.codes[f.name].get(v)
        if code is not None:
            return v, code
        pol = self.settings.unknown_category
        if pol == "reject":
            raise RequestError(loc, f"feature {f.name!r} = {v!r:.60} is not one of the spec's categories "
                                    f"{list(f.categories or ())} (serving.unknown_category: reject)")
        if pol == "default" and f.name in self.settings.unknown_category_default:
            flags[f.name] = "unknown_category:default"
            d = self.settings.unknown_category_default[f.name]
            return d, self.codes[f.name].get(d, math.nan)
        # native_missing: the model sees a missing code, as the batch feature matrix does for an unseen
        # category; the engineered features still see the raw value, as dbt's SQL does.
        flags[f.name] = "unknown_category:native_missing"
        return v, math.nan

    # --- rows --------------------------------------------------------------------------------------
    def prepare(self, rows: Any) -> Prepared:
        if not isinstance(rows, list) or not rows:
            raise RequestError(["rows"], "expected a non-empty list of rows (objects of feature values)")
        if len(rows) > self.settings.max_rows:
            raise RequestError(["rows"], f"{len(rows)} rows exceed serving.max_rows = {self.settings.max_rows}",
                               status=413)
        n = len(rows)
        matrix = np.empty((n, self.width), dtype=np.float64)
        raw_rows, flags_all, ids, times = [], [], [], []
        idc, tc = self.spec.id_column, self.spec.time_column
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise RequestError(["rows", i], f"row {i} must be an object of feature values, got "
                                                f"{type(row).__name__}")
            extra = [k for k in row if k not in self.allowed]
            if extra:
                raise RequestError(["rows", i, extra[0]], f"unknown field {extra[0]!r:.60}; the spec's fields are "
                                                          f"{sorted(self.allowed)}")
            flags: dict[str, str] = {}
            raw: dict[str, Any] = {}
            for j, f in enumerate(self.features):
                raw[f.name], matrix[i, j] = self._value(f, row.get(f.name), ["rows", i, f.name], flags)
            ent = row.get(idc)
            if ent is not None and (isinstance(ent, bool) or not isinstance(ent, (int, str))):
                raise RequestError(["rows", i, idc], f"{idc!r} must be an integer or a string")
            ids.append(ent)
            times.append(self._time(row.get(tc), ["rows", i, tc]))
            raw_rows.append(raw)
            flags_all.append(flags)
        try:
            engineered = self.online.compute(raw_rows)
        except FeatureValueError as exc:
            bad = next((i for i, r in enumerate(raw_rows) if _fails(self.online, r)), 0)
            raise RequestError(["rows", bad, exc.column], f"engineered feature input {exc.column!r}: {exc}") from None
        if engineered and self.spec.engineered_features:
            matrix[:, len(self.features):] = np.asarray(engineered, dtype=np.float64)
        return Prepared(matrix, raw_rows, engineered, flags_all, ids, times)

    @staticmethod
    def _time(v: Any, loc: list) -> dt.datetime | None:
        if v is None:
            return None
        if isinstance(v, str):
            try:
                t = dt.datetime.fromisoformat(v)
            except ValueError:
                raise RequestError(loc, f"{loc[-1]!r} must be an ISO-8601 date-time, got {v!r:.40}") from None
            return t.astimezone(dt.timezone.utc).replace(tzinfo=None) if t.tzinfo else t
        raise RequestError(loc, f"{loc[-1]!r} must be an ISO-8601 date-time string")


def _fails(online: OnlineFeatures, row: dict) -> bool:
    try:
        online.compute([row])
        return False
    except FeatureValueError:
        return True
