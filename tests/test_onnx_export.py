"""The ONNX export (mlplatform/serving/export.py) answers like the Booster on each bundled data set's test split,
within float32 precision, and the difference it records is the one a reader of the file would measure."""

import numpy as np
import polars as pl
import pytest

from mlplatform import modeling
from mlplatform.serving import export
from mlplatform.spec import load_spec
from tooling.testbed import quick_training_set


@pytest.fixture(scope="module", params=["car_loan", "car_price"])
def trained(request):
    spec = load_spec(request.param)
    ts = quick_training_set(spec, n=4000)
    booster = modeling.train(ts, spec, modeling.lgb_params(spec, {"num_leaves": 15}, 0), 120, 20).booster
    return spec, ts, booster


def test_the_onnx_export_scores_the_test_split_like_the_booster_within_float32_precision(trained):
    spec, ts, booster = trained
    data = export.to_onnx(booster)
    test_rows = modeling.feature_matrix(ts.filter(pl.col("split") == "test"), spec).to_numpy(dtype=float)
    scores = export.predict_onnx(data, test_rows)
    assert scores.shape == (len(test_rows),)  # one score per row: the positive-class probability or the value
    absolute, relative = export.differences(data, booster, test_rows)
    # float32 inputs, thresholds and sums: ~1e-7 relative to the output's scale
    assert relative <= 1e-4, (spec.name, absolute, relative)
    if spec.problem_type == "binary_classification":
        assert absolute <= 1e-5 and np.all((scores >= 0) & (scores <= 1))


def test_the_recorded_difference_is_measured_on_rows_that_cross_every_split(trained):
    _, _, booster = trained
    rows = export.spread_rows(booster, n=500)
    assert rows.shape == (500, booster.num_feature()) and np.isnan(rows).any()
    # each feature takes values on both sides of its splits: every tree's leaves are reached more than once
    leaves = booster.predict(rows, pred_leaf=True)
    assert all(len(np.unique(leaves[:, t])) > 1 for t in range(min(leaves.shape[1], 20)))
    data = export.to_onnx(booster)
    absolute, _ = export.differences(data, booster, rows)
    assert absolute == pytest.approx(float(np.max(np.abs(export.predict_onnx(data, rows)
                                                         - booster.predict(rows)))))
