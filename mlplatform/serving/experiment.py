"""Online experiments: logged predictions joined to their labels, each variant compared with the champion.

For every variant other than the baseline (the `champion` alias by default) one row says: rows per variant,
the spec's metric (training.metric) per variant, the difference (variant - baseline), a bootstrap percentile
confidence interval on that difference, the mean per-row loss (log loss or squared error) per variant and
the p-value of a test on the loss, and a verdict.

- Canary / A/B variants answered different requests: the bootstrap resamples each variant independently and
  the loss is compared with Welch's t-test (unequal variances).
- A shadow challenger scored the same requests as the champion: rows are paired by (request_id, row_index),
  the bootstrap resamples pairs and the loss is compared with a paired t-test, which is far more sensitive.

Verdict: `better` / `worse` when the interval excludes 0 on that side AND the loss test agrees
(p < alpha, same direction); `insufficient_data` when a variant has fewer than `min_rows` labelled rows (or,
for AUC-like metrics, a single class); else `inconclusive`. `gate_verdict` turns a report into the answer a
promotion gate reads (see README "Online serving").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlplatform.spec import LOWER_IS_BETTER, DatasetSpec

BETTER, WORSE, INCONCLUSIVE, INSUFFICIENT = "better", "worse", "inconclusive", "insufficient_data"
NEEDS_BOTH_CLASSES = {"roc_auc", "pr_auc"}


def metric_fn(name: str):
    from sklearn import metrics as m

    fns = {"roc_auc": m.roc_auc_score, "pr_auc": m.average_precision_score,
           "log_loss": lambda y, p: m.log_loss(y, np.clip(p, 1e-15, 1 - 1e-15), labels=[0, 1]),
           "brier": m.brier_score_loss, "rmse": lambda y, p: float(np.sqrt(np.mean((y - p) ** 2))),
           "mae": lambda y, p: float(np.mean(np.abs(y - p))), "r2": m.r2_score}
    if name not in fns:
        raise ValueError(f"online experiment: metric {name!r} (training.metric) is not one of {sorted(fns)}")
    return fns[name]


def per_row_loss(y: np.ndarray, p: np.ndarray, classification: bool) -> np.ndarray:
    """Log loss per row (classification) or squared error (regression): lower is better."""
    if classification:
        pc = np.clip(p, 1e-15, 1 - 1e-15)
        return -(y * np.log(pc) + (1 - y) * np.log(1 - pc))
    return (y - p) ** 2


@dataclass(frozen=True)
class Comparison:
    variant: str
    baseline: str
    paired: bool
    n_baseline: int
    n_variant: int
    metric: str
    metric_baseline: float
    metric_variant: float
    difference: float            # variant - baseline
    ci_low: float
    ci_high: float
    loss_baseline: float
    loss_variant: float
    p_value: float
    test: str
    verdict: str


def _usable(metric: str, y: np.ndarray, min_rows: int) -> bool:
    return len(y) >= min_rows and (metric not in NEEDS_BOTH_CLASSES or len(np.unique(y)) > 1)


def _bootstrap(fn, yb, pb, yv, pv, paired: bool, n_boot: int, rng, needs_both: bool) -> np.ndarray:
    diffs = []
    for _ in range(n_boot):
        if paired:
            i = rng.integers(0, len(yb), len(yb))
            j = i
        else:
            i, j = rng.integers(0, len(yb), len(yb)), rng.integers(0, len(yv), len(yv))
        if needs_both and (len(np.unique(yb[i])) < 2 or len(np.unique(yv[j])) < 2):
            continue
        diffs.append(fn(yv[j], pv[j]) - fn(yb[i], pb[i]))
    return np.asarray(diffs, dtype=float)


def compare(y_base: np.ndarray, p_base: np.ndarray, y_var: np.ndarray, p_var: np.ndarray, *, metric: str,
            classification: bool, paired: bool, variant: str = "challenger", baseline: str = "champion",
            n_boot: int = 1000, alpha: float = 0.05, min_rows: int = 30, seed: int = 0) -> Comparison:
    """One variant against the baseline. `paired`: the arrays are aligned row by row (the same requests)."""
    from scipy import stats

    y_base, p_base = np.asarray(y_base, float), np.asarray(p_base, float)
    y_var, p_var = np.asarray(y_var, float), np.asarray(p_var, float)
    if paired and len(y_base) != len(y_var):
        raise ValueError(f"paired comparison of {variant} with {baseline}: {len(y_var)} vs {len(y_base)} rows")
    nan = float("nan")
    lb, lv = per_row_loss(y_base, p_base, classification), per_row_loss(y_var, p_var, classification)
    base = dict(variant=variant, baseline=baseline, paired=paired, n_baseline=len(y_base), n_variant=len(y_var),
                metric=metric, loss_baseline=float(lb.mean()) if len(lb) else nan,
                loss_variant=float(lv.mean()) if len(lv) else nan,
                test="paired t-test on per-row loss" if paired else "Welch t-test on per-row loss")
    if not (_usable(metric, y_base, min_rows) and _usable(metric, y_var, min_rows)):
        return Comparison(**base, metric_baseline=nan, metric_variant=nan, difference=nan, ci_low=nan, ci_high=nan,
                          p_value=nan, verdict=INSUFFICIENT)
    fn = metric_fn(metric)
    mb, mv = float(fn(y_base, p_base)), float(fn(y_var, p_var))
    rng = np.random.default_rng(seed)
    diffs = _bootstrap(fn, y_base, p_base, y_var, p_var, paired, n_boot, rng, metric in NEEDS_BOTH_CLASSES)
    lo, hi = (float(np.quantile(diffs, alpha / 2)), float(np.quantile(diffs, 1 - alpha / 2))) if len(diffs) \
        else (nan, nan)
    if paired:
        d = lv - lb
        p = 1.0 if np.allclose(d, 0) else float(stats.ttest_rel(lv, lb).pvalue)
    else:
        p = 1.0 if (np.allclose(lb, lb.mean()) and np.allclose(lv, lv.mean()) and np.isclose(lb.mean(), lv.mean())) \
            else float(stats.ttest_ind(lv, lb, equal_var=False).pvalue)
    higher_better = metric not in LOWER_IS_BETTER
    variant_better_metric = lo > 0 if higher_better else hi < 0
    variant_worse_metric = hi < 0 if higher_better else lo > 0
    significant = p < alpha
    if variant_better_metric and significant and lv.mean() < lb.mean():
        verdict = BETTER
    elif variant_worse_metric and significant and lv.mean() > lb.mean():
        verdict = WORSE
    else:
        verdict = INCONCLUSIVE
    return Comparison(**base, metric_baseline=mb, metric_variant=mv, difference=mv - mb, ci_low=lo, ci_high=hi,
                      p_value=p, verdict=verdict)


def experiment_table(joined, spec: DatasetSpec, baseline: str = "champion", n_boot: int = 1000,
                     alpha: float = 0.05, min_rows: int = 30, seed: int = 0):
    """One row per non-baseline variant of `joined` (the prediction log joined to labels: columns variant,
    model_version, shadow, request_id, row_index, prediction and the spec's target), as a polars DataFrame."""
    import polars as pl

    metric, target = spec.metric, spec.target
    live = joined.filter(~pl.col("shadow"))
    base = live.filter(pl.col("variant") == baseline)
    rows = []
    groups = joined.filter(pl.col("variant") != baseline).select("variant", "shadow").unique() \
        .sort("shadow", "variant").rows()
    for variant, shadow in groups:
        v = joined.filter((pl.col("variant") == variant) & (pl.col("shadow") == shadow))
        if shadow:  # scored the same requests as the answering champion: pair them
            pairs = base.join(v.select("request_id", "row_index", pl.col("prediction").alias("_pv")),
                              on=["request_id", "row_index"])
            yb = yv = pairs[target].to_numpy()
            pb, pv = pairs["prediction"].to_numpy(), pairs["_pv"].to_numpy()
        else:
            yb, pb = base[target].to_numpy(), base["prediction"].to_numpy()
            yv, pv = v[target].to_numpy(), v["prediction"].to_numpy()
        c = compare(yb, pb, yv, pv, metric=metric, classification=spec.is_classification, paired=bool(shadow),
                    variant=variant, baseline=baseline, n_boot=n_boot, alpha=alpha, min_rows=min_rows, seed=seed)
        versions = v["model_version"].unique().sort().to_list()
        base_versions = base["model_version"].unique().sort().to_list()
        rows.append({**c.__dict__, "shadow": bool(shadow), "model_version": ",".join(map(str, versions)),
                     "baseline_version": ",".join(map(str, base_versions))})
    schema = {"variant": pl.String, "baseline": pl.String, "paired": pl.Boolean, "n_baseline": pl.Int64,
              "n_variant": pl.Int64, "metric": pl.String, "metric_baseline": pl.Float64,
              "metric_variant": pl.Float64, "difference": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
              "loss_baseline": pl.Float64, "loss_variant": pl.Float64, "p_value": pl.Float64, "test": pl.String,
              "verdict": pl.String, "shadow": pl.Boolean, "model_version": pl.String,
              "baseline_version": pl.String}
    return pl.DataFrame(rows, schema=schema)


def gate_verdict(report, version: str) -> tuple[bool, str]:
    """What a promotion gate reads from a published `online_experiment_report`: (may promote, why).
    A version may be promoted when some comparison of it says `better` and none says `worse`."""
    import polars as pl

    mine = report.filter(pl.col("model_version").str.split(",").list.contains(str(version)))
    if mine.height == 0:
        return False, f"v{version}: no online comparison in the report"
    verdicts = mine["verdict"].to_list()
    desc = "; ".join(f"{r['variant']}{' (shadow)' if r['shadow'] else ''}: {r['verdict']} "
                     f"({r['metric']} {r['difference']:+.4g}, CI [{r['ci_low']:.4g}, {r['ci_high']:.4g}], "
                     f"p={r['p_value']:.3g}, n={r['n_variant']}/{r['n_baseline']})" for r in mine.to_dicts())
    return (BETTER in verdicts and WORSE not in verdicts), f"v{version}: {desc}"
