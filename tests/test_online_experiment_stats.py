"""The statistics of the online experiment report, without services: a clearly better or worse variant is
called so with an interval that excludes 0 and a small p-value, equal variants are inconclusive, a shadow
challenger is paired with the champion on the same requests, and too few labels say so."""

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from mlplatform.serving.experiment import (BETTER, INCONCLUSIVE, INSUFFICIENT, WORSE, compare, experiment_table,
                                           gate_verdict, per_row_loss)

from .helpers import car_loan


def scores(rng, y, signal: float) -> np.ndarray:
    """Probabilities whose separation of the classes grows with `signal`."""
    z = signal * (2 * y - 1) + rng.normal(0, 1, len(y))
    return 1 / (1 + np.exp(-z))


def test_a_clearly_better_challenger_is_better_with_an_interval_excluding_zero():
    rng = np.random.default_rng(1)
    yb, yv = rng.integers(0, 2, 1500), rng.integers(0, 2, 1500)
    pb, pv = scores(rng, yb, 0.5), scores(rng, yv, 1.5)
    c = compare(yb, pb, yv, pv, metric="roc_auc", classification=True, paired=False, n_boot=300)
    assert c.verdict == BETTER
    assert c.difference == pytest.approx(roc_auc_score(yv, pv) - roc_auc_score(yb, pb))
    assert 0 < c.ci_low < c.difference < c.ci_high
    assert c.p_value < 1e-6 and c.loss_variant < c.loss_baseline
    assert (c.n_baseline, c.n_variant) == (1500, 1500) and c.test.startswith("Welch")


def test_the_same_model_on_both_arms_is_inconclusive_and_its_interval_holds_zero():
    rng = np.random.default_rng(2)
    yb, yv = rng.integers(0, 2, 1000), rng.integers(0, 2, 1000)
    c = compare(yb, scores(rng, yb, 1.0), yv, scores(rng, yv, 1.0), metric="roc_auc", classification=True,
                paired=False, n_boot=300)
    assert c.verdict == INCONCLUSIVE
    assert c.ci_low < 0 < c.ci_high and c.p_value > 0.05


def test_a_worse_regression_variant_is_worse_and_its_rmse_difference_is_positive():
    rng = np.random.default_rng(3)
    yb, yv = rng.normal(10, 3, 800), rng.normal(10, 3, 800)
    pb, pv = yb + rng.normal(0, 1, 800), yv + rng.normal(0, 2, 800)
    c = compare(yb, pb, yv, pv, metric="rmse", classification=False, paired=False, n_boot=300)
    assert c.verdict == WORSE
    assert c.difference == pytest.approx(np.sqrt(np.mean((yv - pv) ** 2)) - np.sqrt(np.mean((yb - pb) ** 2)))
    assert 0 < c.ci_low < c.ci_high


def test_pairing_finds_a_small_improvement_on_the_same_rows_that_independent_arms_miss():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 600)
    noise = rng.normal(0, 1, 600)
    pb = 1 / (1 + np.exp(-(0.8 * (2 * y - 1) + noise)))
    pv = 1 / (1 + np.exp(-(0.9 * (2 * y - 1) + noise)))  # the same rows, slightly sharper
    paired = compare(y, pb, y, pv, metric="roc_auc", classification=True, paired=True, n_boot=300)
    assert paired.verdict == BETTER and paired.p_value < 0.001 and paired.test.startswith("paired")
    half = compare(y[:300], pb[:300], y[300:], pv[300:], metric="roc_auc", classification=True, paired=False,
                   n_boot=300)
    assert half.verdict == INCONCLUSIVE


def test_too_few_labelled_rows_or_a_single_class_is_insufficient_data():
    y = np.array([0, 1] * 10)
    assert compare(y, y * 0.8, y, y * 0.9, metric="roc_auc", classification=True, paired=False).verdict == INSUFFICIENT
    ones = np.ones(100)
    c = compare(ones, ones * 0.7, ones, ones * 0.9, metric="roc_auc", classification=True, paired=False)
    assert c.verdict == INSUFFICIENT and np.isnan(c.difference)


def test_per_row_loss_is_log_loss_or_squared_error():
    y, p = np.array([1.0, 0.0]), np.array([0.8, 0.25])
    assert per_row_loss(y, p, True) == pytest.approx([-np.log(0.8), -np.log(0.75)])
    assert per_row_loss(y, p, False) == pytest.approx([0.04, 0.0625])


def log_frame(rng, n: int, variant: str, version: str, signal: float, shadow: bool = False, start: int = 0,
              y=None) -> pl.DataFrame:
    y = rng.integers(0, 2, n) if y is None else y
    return pl.DataFrame({"request_id": [f"r{start + i}" for i in range(n)], "row_index": [0] * n,
                         "variant": variant, "model_version": version, "shadow": shadow,
                         "prediction": scores(rng, y, signal), "repaid": y})


def test_the_table_compares_canary_and_shadow_variants_and_the_gate_reads_it():
    spec = car_loan()
    assert spec.metric == "roc_auc" and spec.target == "repaid"
    rng = np.random.default_rng(5)
    champ = log_frame(rng, 1200, "champion", "1", 0.6)
    canary = log_frame(rng, 400, "challenger", "2", 0.6, start=5000)
    shadow = log_frame(rng, 1200, "challenger", "2", 1.6, shadow=True, y=champ["repaid"].to_numpy())
    table = experiment_table(pl.concat([champ, canary, shadow]), spec, n_boot=200)
    assert table.select("variant", "shadow", "paired", "n_baseline", "n_variant", "model_version",
                        "baseline_version").rows() == [("challenger", False, False, 1200, 400, "2", "1"),
                                                       ("challenger", True, True, 1200, 1200, "2", "1")]
    by_shadow = {r["shadow"]: r for r in table.to_dicts()}
    assert by_shadow[True]["verdict"] == BETTER
    ok, why = gate_verdict(table, "2")
    assert ok and "shadow" in why and "better" in why
    worse = table.with_columns(pl.lit(WORSE).alias("verdict"))
    assert gate_verdict(worse, "2")[0] is False
    assert gate_verdict(table, "7") == (False, "v7: no online comparison in the report")
