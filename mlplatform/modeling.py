"""Model logic as plain functions: point-in-time examples, splits, the feature matrix, training, metrics.

LightGBM and scikit-learn are imported inside the functions that need them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from mlplatform.lazy import lazy_import
np = lazy_import("numpy")
pl = lazy_import("polars")

from mlplatform.spec import DatasetSpec

SPLITS = ("train", "validation", "test")


class TrainingDataError(ValueError):
    """The training data cannot give a valid model; the message names the split and column."""


# --- point-in-time examples ---------------------------------------------------------------------------
def point_in_time_examples(features: pl.DataFrame, labels: pl.DataFrame, spec: DatasetSpec,
                           cutoff: dt.datetime) -> pl.DataFrame:
    """Features joined with the labels known at `cutoff`; a label known later is never used."""
    t, idc = spec.time_column, spec.id_column
    known = labels.filter(pl.col("label_available_at") <= cutoff).select(idc, "label", "label_available_at")
    return (features.filter(pl.col(t) <= cutoff)
            .join(known, on=idc, how="inner")
            .filter(pl.col(t) <= pl.col("label_available_at"))
            .rename({"label": spec.target})
            .sort(t, idc))


def leakage_violations(examples: pl.DataFrame, spec: DatasetSpec, cutoff: dt.datetime) -> list[str]:
    out = []
    late = examples.filter(pl.col("label_available_at") > cutoff)
    if late.height:
        out.append(f"{late.height} label(s) became known after the cut-off {cutoff}, e.g. ids "
                   f"{late[spec.id_column].head(3).to_list()}")
    early = examples.filter(pl.col(spec.time_column) > pl.col("label_available_at"))
    if early.height:
        out.append(f"{early.height} feature row(s) are later than their label's availability, e.g. ids "
                   f"{early[spec.id_column].head(3).to_list()}")
    return out


def time_split(examples: pl.DataFrame, spec: DatasetSpec) -> pl.DataFrame:
    """Time-ordered train / validation / test split by the spec's fractions (a `split` column)."""
    df = examples.sort(spec.time_column, spec.id_column)
    n = df.height
    n_train = int(round(n * spec.split["train"]))
    n_val = int(round(n * spec.split["validation"]))
    idx = np.arange(n)
    split = np.where(idx < n_train, "train", np.where(idx < n_train + n_val, "validation", "test"))
    return df.with_columns(pl.Series("split", split))


def training_set_problems(ts: pl.DataFrame, spec: DatasetSpec) -> list[str]:
    """What makes a training set unusable: an empty split, one class, NaN or infinite targets."""
    out = []
    y = spec.target
    for s in SPLITS:
        part = ts.filter(pl.col("split") == s)
        if part.height == 0:
            out.append(f"split {s!r} is empty ({ts.height} labelled rows in all)")
            continue
        bad = part.filter(pl.col(y).is_null() | pl.col(y).is_nan() | pl.col(y).is_infinite())
        if bad.height:
            out.append(f"split {s!r}: {bad.height} target value(s) of {y!r} are NaN, null or infinite")
        if spec.is_classification and part[y].drop_nans().n_unique() < 2:
            out.append(f"split {s!r}: target {y!r} has a single class {part[y].unique().to_list()}")
    return out


# --- feature matrix -------------------------------------------------------------------------------------
def feature_matrix(df: pl.DataFrame, spec: DatasetSpec):
    """The model's input as pandas: categoricals as integer codes in the spec's order, booleans as 0/1."""
    missing = [c for c in spec.model_feature_names if c not in df.columns]
    if missing:
        raise TrainingDataError(f"input is missing the model feature column(s) {missing}")
    exprs = []
    for f in spec.features:
        if f.type == "categorical":
            mapping = {c: i for i, c in enumerate(f.categories or ())}
            exprs.append(pl.col(f.name).cast(pl.String).replace_strict(mapping, default=None,
                                                                       return_dtype=pl.Float64).alias(f.name))
        else:
            exprs.append(pl.col(f.name).cast(pl.Float64).alias(f.name))
    exprs += [pl.col(f.name).cast(pl.Float64).alias(f.name) for f in spec.engineered_features]
    return df.select(exprs).to_pandas()


# --- training -------------------------------------------------------------------------------------------
def lgb_params(spec: DatasetSpec, overrides: dict[str, Any], seed: int) -> dict[str, Any]:
    params = {
        "objective": "binary" if spec.is_classification else "regression",
        "metric": "auc" if spec.is_classification else "rmse",
        "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 40, "feature_fraction": 0.9,
        "bagging_fraction": 0.9, "bagging_freq": 1, "lambda_l2": 1.0,
        # Determinism: fixed seeds, one thread, row-wise histograms.
        "seed": seed, "deterministic": True, "force_row_wise": True, "num_threads": 1, "verbosity": -1,
    }
    params.update(overrides)
    return params


@dataclass
class Trained:
    booster: Any
    params: dict
    best_iteration: int
    validation_score: float


def train(ts: pl.DataFrame, spec: DatasetSpec, params: dict, num_boost_round: int,
          early_stopping_rounds: int) -> Trained:
    import lightgbm as lgb

    problems = training_set_problems(ts, spec)
    if problems:
        raise TrainingDataError("; ".join(problems))
    tr, va = ts.filter(pl.col("split") == "train"), ts.filter(pl.col("split") == "validation")
    cats = spec.categorical_features
    dtrain = lgb.Dataset(feature_matrix(tr, spec), label=tr[spec.target].to_numpy(), categorical_feature=cats,
                         free_raw_data=False)
    dval = lgb.Dataset(feature_matrix(va, spec), label=va[spec.target].to_numpy(), reference=dtrain,
                       categorical_feature=cats)
    evals: dict = {}
    booster = lgb.train(params, dtrain, num_boost_round=num_boost_round, valid_sets=[dval], valid_names=["validation"],
                        callbacks=[lgb.early_stopping(early_stopping_rounds, verbose=False),
                                   lgb.record_evaluation(evals)])
    metric = params["metric"]
    score = float(evals["validation"][metric][booster.best_iteration - 1]) if booster.best_iteration else float("nan")
    return Trained(booster, params, int(booster.best_iteration or num_boost_round), score)


def predict(booster, df: pl.DataFrame, spec: DatasetSpec) -> np.ndarray:
    return booster.predict(feature_matrix(df, spec), num_iteration=booster.best_iteration or None)


# --- metrics --------------------------------------------------------------------------------------------
def metrics(y: np.ndarray, p: np.ndarray, spec: DatasetSpec) -> dict[str, float]:
    from sklearn import metrics as m

    if spec.is_classification:
        pc = np.clip(p, 1e-15, 1 - 1e-15)
        out = {"roc_auc": float(m.roc_auc_score(y, p)) if len(np.unique(y)) > 1 else float("nan"),
               "pr_auc": float(m.average_precision_score(y, p)) if len(np.unique(y)) > 1 else float("nan"),
               "log_loss": float(m.log_loss(y, pc, labels=[0, 1])),
               "brier": float(m.brier_score_loss(y, p)),
               "calibration_error": expected_calibration_error(y, p)}
    else:
        out = {"rmse": float(np.sqrt(m.mean_squared_error(y, p))), "mae": float(m.mean_absolute_error(y, p)),
               "r2": float(m.r2_score(y, p))}
    return out


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    err = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            err += mask.mean() * abs(y[mask].mean() - p[mask].mean())
    return float(err)


def metric_fn(spec: DatasetSpec):
    from sklearn import metrics as m

    name = spec.metric
    if name == "roc_auc":
        return m.roc_auc_score
    if name == "rmse":
        return lambda y, p: float(np.sqrt(m.mean_squared_error(y, p)))
    if name == "mae":
        return m.mean_absolute_error
    if name == "pr_auc":
        return m.average_precision_score
    raise ValueError(f"{spec.path}: setting 'training.metric' {name!r} is not supported")


def rank_roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC of 0/1 labels as the Mann-Whitney statistic (ties get average ranks): the value of
    sklearn's roc_auc_score without its per-call validation, for the bootstrap's hundreds of resamples."""
    from scipy.stats import rankdata

    pos = y == 1
    n_pos = int(pos.sum())
    n_neg = len(y) - n_pos
    return float((rankdata(p)[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def paired_bootstrap(y: np.ndarray, p_new: np.ndarray, p_old: np.ndarray, spec: DatasetSpec,
                     n: int = 300, seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """CI of (metric(new) - metric(old)) on the same resampled rows, oriented so positive = better."""
    fn = metric_fn(spec)
    binary = spec.is_classification and set(np.unique(y).tolist()) <= {0, 1}
    boot_fn = rank_roc_auc if spec.metric == "roc_auc" and binary else fn
    rng = np.random.default_rng(seed)
    sign = 1.0 if spec.higher_is_better else -1.0
    diffs = []
    size = len(y)
    for _ in range(n):
        i = rng.integers(0, size, size)
        if spec.is_classification and len(np.unique(y[i])) < 2:
            continue
        diffs.append(sign * (boot_fn(y[i], p_new[i]) - boot_fn(y[i], p_old[i])))
    d = np.array(diffs)
    return {"diff": float(sign * (fn(y, p_new) - fn(y, p_old))), "ci_low": float(np.quantile(d, alpha / 2)),
            "ci_high": float(np.quantile(d, 1 - alpha / 2)), "n_boot": int(len(d))}


def slice_metrics(df: pl.DataFrame, p: np.ndarray, spec: DatasetSpec, min_rows: int = 30) -> list[dict]:
    rows = []
    y = df[spec.target].to_numpy()
    fn = metric_fn(spec)
    for col in spec.categorical_features:
        values = df[col].to_numpy()
        for v in sorted(set(values.tolist()), key=str):
            mask = values == v
            if mask.sum() < min_rows or (spec.is_classification and len(np.unique(y[mask])) < 2):
                continue
            rows.append({"feature": col, "value": str(v), "rows": int(mask.sum()),
                         spec.metric: float(fn(y[mask], p[mask]))})
    return rows
