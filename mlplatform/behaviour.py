"""Behavioural tests of a model: the expectations a data-set spec declares (`behaviour:`), evaluated on a frame of
rows (the test split) against a predict function. Plain logic, no Dagster; the gate (assets/evaluation.py with
mlplatform.registry.decide) turns a failed expectation into a rejected candidate.

Three kinds (the settings are defined and validated in mlplatform.spec):
- invariance: perturbing a feature (numeric: +/- delta; categorical/boolean: each value) must not move the
  prediction by more than epsilon, on more than max_violation_fraction of the rows;
- direction: raising a feature (by delta, to a quantile, or to a value) must not move the prediction the forbidden
  way by more than tolerance, on more than max_violation_fraction of the rows the change touches;
- minimum_functionality: the metric on a named slice (column == value, or a SQL condition) is no worse than a floor.

`predict` takes a frame of raw columns and returns one prediction per row (probability of the positive class, or
the regression value); `model_predictor` builds it from a LightGBM booster, recomputing the engineered features
from the perturbed raw row with the same SQL the serving path runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mlplatform.lazy import lazy_import
np = lazy_import("numpy")
pl = lazy_import("polars")

from mlplatform.errors import SettingError
from mlplatform.spec import (LOWER_IS_BETTER, DatasetSpec, DirectionExpectation, InvarianceExpectation,
                             MinimumFunctionalityExpectation)

Predict = Callable[["pl.DataFrame"], "np.ndarray"]


@dataclass(frozen=True)
class Result:
    """One expectation's outcome. `measured` is compared with `threshold` (a violating fraction for invariance and
    direction, the slice's metric for minimum functionality)."""

    name: str
    kind: str
    feature: str
    passed: bool
    measured: float
    threshold: float
    rows: int             # rows judged (the slice, or the rows the change touches)
    violating_rows: int   # rows breaking the expectation (minimum functionality: all of the slice when it fails)
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_predictor(booster, spec: DatasetSpec) -> Predict:
    """predict(raw rows) for a LightGBM booster: engineered features recomputed (mlplatform.features), then scored."""
    from mlplatform import modeling
    from mlplatform.features import online_features

    def predict(df: pl.DataFrame) -> np.ndarray:
        return modeling.predict(booster, online_features(df.select(spec.raw_columns), spec), spec)

    return predict


# --- evaluation -------------------------------------------------------------------------------------------------------
def evaluate(spec: DatasetSpec, frame: pl.DataFrame, predict: Predict,
             expectations: Sequence[Any] | None = None) -> list[Result]:
    """Every expectation (default: the spec's) on `frame` (raw feature columns, and the target for slices)."""
    expectations = spec.behaviour if expectations is None else expectations
    if not expectations:
        return []
    if frame.height == 0:
        raise ValueError("behavioural expectations need rows to be evaluated on; the frame is empty")
    base = np.asarray(predict(frame), dtype=float)
    out = []
    for i, e in enumerate(expectations):
        if isinstance(e, InvarianceExpectation):
            out.append(_invariance(spec, e, frame, predict, base))
        elif isinstance(e, DirectionExpectation):
            out.append(_direction(spec, e, frame, predict, base))
        elif isinstance(e, MinimumFunctionalityExpectation):
            out.append(_minimum(spec, e, i, frame, base))
        else:
            raise TypeError(f"{spec.path}: setting 'behaviour[{i}]' is not a behavioural expectation: {e!r}")
    return out


def failures(results: Sequence[Result]) -> list[Result]:
    return [r for r in results if not r.passed]


def failure_reasons(results: Sequence[Result]) -> list[str]:
    """One line per failed expectation, naming it (what the gate's reason carries)."""
    return [f"{r.name} ({r.message})" for r in failures(results)]


def _numeric(frame: pl.DataFrame, name: str) -> pl.Expr:
    return pl.col(name).cast(pl.Float64)


def _invariance(spec: DatasetSpec, e: InvarianceExpectation, frame: pl.DataFrame, predict: Predict,
                base: np.ndarray) -> Result:
    feature = spec.feature(e.feature)
    variants: list[tuple[str, pl.Expr]] = []
    if feature.type == "numeric":
        lo = feature.min if feature.min is not None else None
        hi = feature.max if feature.max is not None else None
        for sign, label in ((-1, f"-{e.delta:g}"), (1, f"+{e.delta:g}")):
            variants.append((label, (_numeric(frame, e.feature) + sign * e.delta).clip(lo, hi)))
    elif feature.type == "boolean":
        variants = [(str(v).lower(), pl.lit(v, dtype=frame.schema[e.feature])) for v in (False, True)]
    else:
        values = e.values or feature.categories or ()
        variants = [(v, pl.lit(v, dtype=frame.schema[e.feature])) for v in values]
    worst = np.zeros(frame.height)
    for _, expr in variants:
        moved = np.asarray(predict(frame.with_columns(expr.alias(e.feature))), dtype=float)
        worst = np.fmax(worst, np.abs(moved - base))
    violating = int((worst > e.epsilon).sum())
    share = violating / frame.height
    passed = share <= e.max_violation_fraction
    change = f"+/- {e.delta:g}" if feature.type == "numeric" else f"set to each of {[v for v, _ in variants]}"
    message = (f"{e.feature} {change}: {violating} of {frame.height} rows ({share:.1%}) moved by more than "
               f"{e.epsilon:g} (largest move {float(worst.max()):.4f}); at most {e.max_violation_fraction:.1%} allowed")
    return Result(e.name, e.kind, e.feature, passed, share, e.max_violation_fraction, frame.height, violating, message)


def _direction(spec: DatasetSpec, e: DirectionExpectation, frame: pl.DataFrame, predict: Predict,
               base: np.ndarray) -> Result:
    feature = spec.feature(e.feature)
    if e.delta is not None:
        expr = (_numeric(frame, e.feature) + e.delta).clip(None, feature.max)
        change = f"raised by {e.delta:g}"
    elif e.to_quantile is not None:
        q = frame[e.feature].cast(pl.Float64).quantile(e.to_quantile)
        expr = pl.max_horizontal(_numeric(frame, e.feature), pl.lit(q))
        change = f"raised to at least its {e.to_quantile:g} quantile ({q:.4g})"
    else:
        expr = pl.lit(e.to, dtype=frame.schema[e.feature])
        change = f"set to {e.to!r}"
    changed = frame.with_columns(expr.alias(e.feature))
    touched = (changed[e.feature].cast(pl.String) != frame[e.feature].cast(pl.String)).fill_null(False).to_numpy()
    n = int(touched.sum())
    if n == 0:
        return Result(e.name, e.kind, e.feature, False, float("nan"), e.max_violation_fraction, 0, 0,
                      f"{e.feature} {change} changes no row: the expectation cannot be checked")
    moved = np.asarray(predict(changed.filter(pl.Series(touched))), dtype=float) - base[touched]
    bad = moved > e.tolerance if e.expect == "not_increase" else moved < -e.tolerance
    violating = int(bad.sum())
    share = violating / n
    passed = share <= e.max_violation_fraction
    way = "rose" if e.expect == "not_increase" else "fell"
    message = (f"{e.feature} {change}: the prediction {way} by more than {e.tolerance:g} on {violating} of {n} "
               f"changed rows ({share:.1%}; mean change {float(moved.mean()):+.4f}); at most "
               f"{e.max_violation_fraction:.1%} allowed")
    return Result(e.name, e.kind, e.feature, passed, share, e.max_violation_fraction, n, violating, message)


def _metric(name: str, y: np.ndarray, p: np.ndarray) -> float:
    from sklearn import metrics as m

    if name == "roc_auc":
        return float(m.roc_auc_score(y, p))
    if name == "pr_auc":
        return float(m.average_precision_score(y, p))
    if name == "rmse":
        return float(np.sqrt(m.mean_squared_error(y, p)))
    if name == "mae":
        return float(m.mean_absolute_error(y, p))
    raise ValueError(f"metric {name!r} is not supported for behavioural slices")


def slice_mask(spec: DatasetSpec, e: MinimumFunctionalityExpectation, index: int, frame: pl.DataFrame) -> np.ndarray:
    if e.where is not None:
        try:
            mask = frame.select(pl.sql_expr(e.where).alias("in_slice"))["in_slice"]
        except Exception as exc:  # noqa: BLE001 - polars raises several types for bad SQL or unknown columns
            raise SettingError(f"{spec.path}: setting 'behaviour[{index}].where' ({e.where!r}) cannot be evaluated "
                               f"on the test rows: {type(exc).__name__}: {str(exc)[:300]}") from None
        return mask.cast(pl.Boolean).fill_null(False).to_numpy()
    values = frame[e.column]
    if values.dtype == pl.Boolean:
        return (values == bool(e.equals)).fill_null(False).to_numpy()
    if values.dtype.is_numeric() and not isinstance(e.equals, str):
        return (values.cast(pl.Float64) == float(e.equals)).fill_null(False).to_numpy()
    return (values.cast(pl.String) == str(e.equals)).fill_null(False).to_numpy()


def slice_label(e: MinimumFunctionalityExpectation) -> str:
    return e.where if e.where is not None else f"{e.column} == {e.equals!r}"


def _minimum(spec: DatasetSpec, e: MinimumFunctionalityExpectation, index: int, frame: pl.DataFrame,
             base: np.ndarray) -> Result:
    metric = e.metric or spec.metric
    mask = slice_mask(spec, e, index, frame)
    n = int(mask.sum())
    label = slice_label(e)
    feature = e.column or ""
    if n < e.min_rows:
        return Result(e.name, e.kind, feature, False, float("nan"), e.floor, n, n,
                      f"slice {label}: {n} rows, fewer than min_rows {e.min_rows}: the model cannot be shown to work")
    y = frame[spec.target].to_numpy()[mask]
    if spec.is_classification and len(np.unique(y)) < 2:
        return Result(e.name, e.kind, feature, False, float("nan"), e.floor, n, n,
                      f"slice {label}: {n} rows of a single class: {metric} is undefined")
    value = _metric(metric, y, base[mask])
    lower = metric in LOWER_IS_BETTER
    passed = value <= e.floor if lower else value >= e.floor
    message = f"slice {label}: {metric}={value:.4f} on {n} rows; {'<=' if lower else '>='} {e.floor:g} required"
    return Result(e.name, e.kind, feature, passed, value, e.floor, n, 0 if passed else n, message)


# --- presentation -----------------------------------------------------------------------------------------------------
def markdown_table(results: Sequence[Result]) -> str:
    if not results:
        return "No behavioural expectations declared (spec setting 'behaviour')."
    lines = ["| expectation | kind | result | measured | threshold | rows | violating | detail |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.kind} | {'PASS' if r.passed else '**FAIL**'} | {r.measured:.4f} | "
                     f"{r.threshold:g} | {r.rows} | {r.violating_rows} | {r.message.replace('|', '/')} |")
    return "\n".join(lines)
