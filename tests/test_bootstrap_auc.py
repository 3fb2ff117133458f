"""The evaluation's paired bootstrap computes ROC AUC by ranks: the same values as sklearn's roc_auc_score."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from mlplatform import modeling

from .helpers import car_loan


def test_rank_roc_auc_equals_sklearn_with_ties_and_float_labels():
    rng = np.random.default_rng(3)
    for size in (10, 500, 4000):
        y = (rng.random(size) < 0.3).astype(float)
        y[:2] = [0.0, 1.0]
        p = np.round(rng.random(size), 2)  # many ties
        assert abs(modeling.rank_roc_auc(y, p) - roc_auc_score(y, p)) < 1e-12


def test_paired_bootstrap_of_roc_auc_matches_the_sklearn_bootstrap():
    spec = car_loan()
    assert spec.metric == "roc_auc" and spec.higher_is_better
    rng = np.random.default_rng(5)
    y = (rng.random(2000) < 0.4).astype(int)
    p_old = np.clip(y * 0.2 + rng.random(2000) * 0.8, 0, 1)
    p_new = np.clip(y * 0.3 + rng.random(2000) * 0.7, 0, 1)
    got = modeling.paired_bootstrap(y, p_new, p_old, spec, n=200, seed=0)
    # the reference: sklearn on the same resamples
    boot, diffs = np.random.default_rng(0), []
    for _ in range(200):
        i = boot.integers(0, len(y), len(y))
        if len(np.unique(y[i])) < 2:
            continue
        diffs.append(roc_auc_score(y[i], p_new[i]) - roc_auc_score(y[i], p_old[i]))
    assert got["n_boot"] == len(diffs)
    assert abs(got["ci_low"] - np.quantile(diffs, 0.025)) < 1e-12
    assert abs(got["ci_high"] - np.quantile(diffs, 0.975)) < 1e-12
    assert abs(got["diff"] - (roc_auc_score(y, p_new) - roc_auc_score(y, p_old))) < 1e-12
