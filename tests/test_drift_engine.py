"""DriftEngine checked against scipy and NannyML 0.13.1 on NannyML's synthetic car-loan data."""

from __future__ import annotations

import os

os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")

import math
import warnings

import numpy as np
import polars as pl
import pytest
from scipy import stats

from mlplatform.drift.engine import ChunkSpec, DriftEngine

CONTINUOUS = ["car_value", "debt_to_income_ratio", "loan_length", "driver_tenure"]
CATEGORICAL = ["salary_range", "size_of_downpayment", "repaid_loan_on_prev_car"]
ALL_METHODS = ("psi", "ks", "jensen_shannon", "wasserstein", "hellinger", "chi2", "l_infinity")
NML_CONT = ["jensen_shannon", "wasserstein", "hellinger"]
NML_CAT = ["jensen_shannon", "hellinger", "l_infinity", "chi2"]
SPEC = ChunkSpec(kind="size", size=5000, timestamp_column="timestamp")
KS_P_RTOL = 1e-9  # p-value relative tolerance vs scipy.stats.ks_2samp (same code path, so ~exact)


def _to_polars(df) -> pl.DataFrame:
    return pl.from_pandas(df).with_columns(pl.col("timestamp").str.to_datetime())


@pytest.fixture(scope="module")
def car_loan():
    import nannyml as nml

    reference, analysis, _ = nml.load_synthetic_car_loan_dataset()
    return reference, analysis


@pytest.fixture(scope="module")
def frames(car_loan):
    reference, analysis = car_loan
    return _to_polars(reference), _to_polars(analysis)


@pytest.fixture(scope="module")
def engine_and_result(frames):
    ref, ana = frames
    engine = DriftEngine(continuous=CONTINUOUS, categorical=CATEGORICAL, methods=ALL_METHODS)
    engine.fit(ref, SPEC)
    return engine, engine.calculate(ana, SPEC)


@pytest.fixture(scope="module")
def nannyml_result(car_loan):
    """One NannyML run (fit + calculate) with the same chunks and +/-3 std thresholds."""
    import nannyml as nml
    from nannyml.thresholds import StandardDeviationThreshold

    reference, analysis = car_loan
    thresholds = {m: StandardDeviationThreshold(3, 3) for m in ["jensen_shannon", "wasserstein", "hellinger", "l_infinity"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calc = nml.UnivariateDriftCalculator(
            column_names=CONTINUOUS + CATEGORICAL,
            treat_as_categorical=["repaid_loan_on_prev_car"],
            continuous_methods=NML_CONT,
            categorical_methods=NML_CAT,
            chunk_size=5000,
            timestamp_column_name="timestamp",
            thresholds=thresholds,
        ).fit(reference)
        res = calc.calculate(analysis)
    return res.filter(period="reference").data, res.filter(period="analysis").data


def _chunks(df: pl.DataFrame, size: int = 5000) -> list[pl.DataFrame]:
    df = df.sort("timestamp", maintain_order=True)
    return [df.slice(i, size) for i in range(0, df.height, size)]


def _values(result: pl.DataFrame, feature: str, method: str, col: str = "value") -> np.ndarray:
    return result.filter(feature=feature, method=method).sort("chunk_index").get_column(col).to_numpy()


# ---------------------------------------------------------------------------------------------- scipy
def test_ks_statistic_and_p_value_equal_scipy_ks_2samp(frames, engine_and_result):
    ref, ana = frames
    _, result = engine_and_result
    for feature in CONTINUOUS:
        ref_values = ref.get_column(feature).drop_nulls().to_numpy()
        stat = _values(result, feature, "ks")
        pval = _values(result, feature, "ks", "p_value")
        assert len(stat) == len(pval) == len(_chunks(ana)) == 10, feature  # every chunk compared, none extra
        for i, chunk in enumerate(_chunks(ana)):
            expected = stats.ks_2samp(ref_values, chunk.get_column(feature).drop_nulls().to_numpy())
            assert abs(stat[i] - expected.statistic) < 1e-9, (feature, i)
            assert math.isclose(pval[i], expected.pvalue, rel_tol=KS_P_RTOL, abs_tol=1e-300), (feature, i)
    assert _values(result, "loan_length", "ks").max() > 0.05  # real drift, not an all-zero comparison


def test_ks_exact_p_value_path_for_small_samples_equals_scipy():
    rng = np.random.default_rng(1)
    ref = pl.DataFrame({"x": rng.normal(size=3000).round(2)})  # ties, n <= 10 000 -> scipy's exact p-value
    ana = pl.DataFrame({"x": np.r_[rng.normal(size=1000), rng.normal(0.2, size=700)].round(2)})
    engine = DriftEngine(continuous=["x"], methods=("ks",), min_chunk_rows=10)
    engine.fit(ref, ChunkSpec(kind="size", size=1000))
    result = engine.calculate(ana, ChunkSpec(kind="size", size=1000))
    assert len(_values(result, "x", "ks")) == 2
    for i, chunk in enumerate([ana[:1000], ana[1000:]]):
        expected = stats.ks_2samp(ref["x"].to_numpy(), chunk["x"].to_numpy())
        assert abs(_values(result, "x", "ks")[i] - expected.statistic) < 1e-9
        assert math.isclose(_values(result, "x", "ks", "p_value")[i], expected.pvalue, rel_tol=1e-9)


@pytest.mark.parametrize(
    "n_ref,chunk_size,n_ana",
    [
        (3000, 1000, 2500),  # n1 != n2 with a common divisor, last chunk smaller
        (2000, 2000, 4000),  # n1 == n2: scipy's other exact formula
        (9973, 4001, 8002),  # coprime sizes near the 10 000 limit
    ],
)
def test_ks_small_samples_give_exactly_scipy_ks_2samp(n_ref, chunk_size, n_ana):
    """Below 10 000 values the engine's KS statistic and p-value are the ones ks_2samp returns, bit for bit."""
    rng = np.random.default_rng(n_ref)
    ref = pl.DataFrame({"x": rng.normal(size=n_ref).round(2)})
    ana = pl.DataFrame({"x": rng.normal(0.25, 1.2, size=n_ana).round(2)})
    spec = ChunkSpec(kind="size", size=chunk_size)
    engine = DriftEngine(continuous=["x"], methods=("ks",), min_chunk_rows=10).fit(ref, spec)
    result = engine.calculate(ana, spec)
    stat, pval = _values(result, "x", "ks"), _values(result, "x", "ks", "p_value")
    chunks = [ana[i:i + chunk_size] for i in range(0, n_ana, chunk_size)]
    assert len(stat) == len(chunks) >= 2
    for i, chunk in enumerate(chunks):
        expected = stats.ks_2samp(ref["x"].to_numpy(), chunk["x"].to_numpy())
        assert stat[i] == expected.statistic, (i, stat[i], expected.statistic)
        assert pval[i] == expected.pvalue, (i, pval[i], expected.pvalue)
    assert 0 < pval.min() < 0.05  # the drift is seen: not a comparison of p-values that are all 1


def test_ks_small_samples_equal_ks_2samp_when_scipy_calls_are_split_in_blocks(monkeypatch):
    from mlplatform import drift
    import mlplatform.drift.ks  # noqa: F401

    monkeypatch.setattr(drift.ks, "_EXACT_BLOCK_VALUES", 1000)  # 2 chunks of 500 per call to ks_2samp
    rng = np.random.default_rng(3)
    ref = pl.DataFrame({"x": rng.normal(size=1200).round(1)})
    ana = pl.DataFrame({"x": rng.normal(0.2, size=2700).round(1)})  # 5 chunks of 500, one of 200
    spec = ChunkSpec(kind="size", size=500)
    result = DriftEngine(continuous=["x"], methods=("ks",), min_chunk_rows=10).fit(ref, spec).calculate(ana, spec)
    stat, pval = _values(result, "x", "ks"), _values(result, "x", "ks", "p_value")
    assert len(stat) == 6
    for i in range(6):
        expected = stats.ks_2samp(ref["x"].to_numpy(), ana["x"].to_numpy()[i * 500:(i + 1) * 500])
        assert (stat[i], pval[i]) == (expected.statistic, expected.pvalue), i


def test_ks_identical_chunk_has_statistic_zero_and_p_value_one():
    values = np.arange(500, dtype=float)
    engine = DriftEngine(continuous=["x"], methods=("ks",), min_chunk_rows=10)
    engine.fit(pl.DataFrame({"x": values}), ChunkSpec(kind="count", count=1))
    result = engine.calculate(pl.DataFrame({"x": values[::-1]}), ChunkSpec(kind="count", count=1))
    assert _values(result, "x", "ks").tolist() == [0.0]
    assert _values(result, "x", "ks", "p_value").tolist() == [1.0]


def test_drift_package_uses_no_private_scipy_api():
    import pathlib
    import re

    from mlplatform import drift
    import mlplatform.drift.ks  # noqa: F401

    sources = {p.name: p.read_text() for p in pathlib.Path(drift.__file__).parent.glob("*.py")}
    assert "ks.py" in sources and "engine.py" in sources
    private = {name: re.findall(r"scipy(?:\.\w+)*\._\w+|_attempt_exact_2kssamp", text) for name, text in sources.items()}
    assert {name: hits for name, hits in private.items() if hits} == {}


def test_reference_fits_are_typed_and_read_only(small_engine):
    from dataclasses import FrozenInstanceError

    from mlplatform.drift.reference import CategoricalFit, ContinuousFit

    engine, _ = small_engine
    fit = engine.fits["x"]
    assert isinstance(fit, ContinuousFit) and fit.n_ref == 2000 and not fit.constant
    assert engine.fits["const"].constant
    assert isinstance(engine.fits["c"], CategoricalFit) and engine.fits["c"].categories.tolist() == ["a", "b", "c"]
    with pytest.raises(FrozenInstanceError):
        fit.n_ref = 1
    with pytest.raises(ValueError, match="read-only"):
        fit.sorted[0] = 0.0


def test_chi2_statistic_and_p_value_equal_scipy_chi2_contingency(frames, engine_and_result):
    ref, ana = frames
    _, result = engine_and_result
    for feature in CATEGORICAL:
        ref_counts = ref.get_column(feature).cast(pl.String).value_counts()
        stat = _values(result, feature, "chi2")
        pval = _values(result, feature, "chi2", "p_value")
        assert len(stat) == len(pval) == len(_chunks(ana)) == 10, feature
        for i, chunk in enumerate(_chunks(ana)):
            counts = chunk.get_column(feature).cast(pl.String).value_counts()
            table = ref_counts.join(counts, on=feature, how="full", coalesce=True).fill_null(0)
            expected_stat, expected_p, _, _ = stats.chi2_contingency(table.select(pl.exclude(feature)).to_numpy())
            assert math.isclose(stat[i], expected_stat, rel_tol=1e-9), (feature, i)
            assert math.isclose(pval[i], expected_p, rel_tol=1e-9, abs_tol=1e-300), (feature, i)
    # the binary feature exercises scipy's Yates correction (dof == 1)
    assert _values(result, "repaid_loan_on_prev_car", "chi2").max() > 10


# -------------------------------------------------------------------------------------------- NannyML
@pytest.mark.parametrize(
    "feature,method",
    [(f, m) for f in CONTINUOUS for m in NML_CONT] + [(f, m) for f in CATEGORICAL for m in NML_CAT],
)
def test_values_equal_nannyml_univariate_drift_calculator(feature, method, engine_and_result, nannyml_result):
    engine, result = engine_and_result
    nml_ref, nml_ana = nannyml_result
    expected = nml_ana[(feature, method, "value")].to_numpy(dtype=float)
    got = _values(result, feature, method)
    assert got.shape == expected.shape == (10,)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # and on the reference chunks (those feed the thresholds)
    np.testing.assert_allclose(
        _values(engine.reference_result, feature, method), nml_ref[(feature, method, "value")].to_numpy(float), atol=1e-6
    )


@pytest.mark.parametrize(
    "feature,method",
    [(f, m) for f in CONTINUOUS for m in NML_CONT] + [(f, m) for f in CATEGORICAL for m in NML_CAT],
)
def test_alerts_and_thresholds_equal_nannyml(feature, method, engine_and_result, nannyml_result):
    _, result = engine_and_result
    _, nml_ana = nannyml_result
    expected_alerts = nml_ana[(feature, method, "alert")].to_numpy(dtype=bool)
    np.testing.assert_array_equal(_values(result, feature, method, "alert"), expected_alerts)
    if method != "chi2":
        upper = nml_ana[(feature, method, "upper_threshold")].iloc[0]
        lower = nml_ana[(feature, method, "lower_threshold")].iloc[0]
        assert abs(_values(result, feature, method, "upper_threshold")[0] - upper) < 1e-9
        assert abs(_values(result, feature, method, "lower_threshold")[0] - lower) < 1e-9


def test_drift_found_by_nannyml_jensen_shannon_is_found_by_engine(engine_and_result, nannyml_result):
    engine, result = engine_and_result
    _, nml_ana = nannyml_result
    nml_alerts = {
        (f, i)
        for f in CONTINUOUS + CATEGORICAL
        for i, a in enumerate(nml_ana[(f, "jensen_shannon", "alert")].to_numpy(dtype=bool))
        if a
    }
    ours = set(
        result.filter(method="jensen_shannon", alert=True).select("feature", "chunk_index").iter_rows()
    )
    assert nml_alerts, "NannyML should find drift in the car-loan analysis data"
    assert ours == nml_alerts
    summary = engine.summary(result)
    assert {f for f, _ in nml_alerts} <= set(summary["alerting_features"])
    assert summary["problems"] == []
    assert summary["n_alerts"] == result["alert"].sum()


def test_reference_chunks_raise_no_alert(engine_and_result):
    engine, _ = engine_and_result
    ref_result = engine.reference_result
    assert ref_result.height == 10 * (4 * 5 + 3 * 5)
    assert (ref_result["status"] == "ok").all()
    assert not ref_result["alert"].any()


# --------------------------------------------------------------------------------------------- PSI
def test_psi_equals_textbook_formula_on_reference_quantile_bins(frames, engine_and_result):
    ref, ana = frames
    engine, result = engine_and_result
    eps = engine.psi_smoothing
    for feature in CONTINUOUS + CATEGORICAL:
        assert len(_values(result, feature, "psi")) == len(_chunks(ana)) == 10, feature
    for feature in ["car_value", "loan_length"]:
        r = ref.get_column(feature).to_numpy()
        inner = np.unique(np.quantile(r, np.linspace(0, 1, engine.psi_bins + 1)[1:-1]))
        edges = np.r_[-np.inf, inner, np.inf]
        for i, chunk in enumerate(_chunks(ana)):
            a = chunk.get_column(feature).to_numpy()
            # right-closed bins (e_k, e_k+1]
            r_p = np.array([np.mean((r > lo) & (r <= hi)) for lo, hi in zip(edges[:-1], edges[1:])])
            a_p = np.array([np.mean((a > lo) & (a <= hi)) for lo, hi in zip(edges[:-1], edges[1:])])
            r_p[r_p == 0] = eps
            a_p[a_p == 0] = eps
            expected = float(np.sum((a_p - r_p) * np.log(a_p / r_p)))
            assert abs(_values(result, feature, "psi")[i] - expected) < 1e-12, (feature, i)
    for feature in CATEGORICAL:
        r = ref.get_column(feature).cast(pl.String).to_list()
        for i, chunk in enumerate(_chunks(ana)):
            a = chunk.get_column(feature).cast(pl.String).to_list()
            cats = sorted(set(r) | set(a))
            r_p = np.array([r.count(c) / len(r) for c in cats])
            a_p = np.array([a.count(c) / len(a) for c in cats])
            r_p[r_p == 0] = eps
            a_p[a_p == 0] = eps
            expected = float(np.sum((a_p - r_p) * np.log(a_p / r_p)))
            assert abs(_values(result, feature, "psi")[i] - expected) < 1e-12, (feature, i)


def test_psi_smoothing_applies_to_categories_missing_on_one_side():
    ref = pl.DataFrame({"c": ["a"] * 500 + ["b"] * 500})
    ana = pl.DataFrame({"c": ["a"] * 500 + ["new"] * 500})
    engine = DriftEngine(categorical=["c"], methods=("psi",), psi_smoothing=1e-4)
    engine.fit(ref, ChunkSpec(kind="count", count=1))
    value = engine.calculate(ana, ChunkSpec(kind="count", count=1))["value"][0]
    expected = (0.5 - 0.5) * 0 + (1e-4 - 0.5) * np.log(1e-4 / 0.5) + (0.5 - 1e-4) * np.log(0.5 / 1e-4)
    assert abs(value - expected) < 1e-12


# ------------------------------------------------------------------------------------- lazy vs eager
def test_lazy_input_gives_same_result_as_eager(frames, engine_and_result, tmp_path):
    ref, ana = frames
    _, eager = engine_and_result
    path = tmp_path / "analysis.parquet"
    ana.write_parquet(path)
    engine = DriftEngine(continuous=CONTINUOUS, categorical=CATEGORICAL, methods=ALL_METHODS)
    engine.fit(ref.lazy(), SPEC)
    lazy = engine.calculate(pl.scan_parquet(path), SPEC)
    assert lazy.select(pl.exclude("value", "p_value")).equals(eager.select(pl.exclude("value", "p_value")))
    np.testing.assert_allclose(lazy["value"].to_numpy(), eager["value"].to_numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        lazy["p_value"].fill_null(-1).to_numpy(), eager["p_value"].fill_null(-1).to_numpy(), rtol=1e-12, atol=0
    )


def test_count_and_period_chunking(frames):
    ref, ana = frames
    engine = DriftEngine(continuous=["car_value"], categorical=["salary_range"], methods=("jensen_shannon",))
    engine.fit(ref, ChunkSpec(kind="count", count=7))
    by_count = engine.calculate(ana, ChunkSpec(kind="count", count=7))
    rows = by_count.filter(feature="car_value").get_column("rows")
    assert rows.len() == 7 and rows.sum() == ana.height and rows.max() - rows.min() <= 1
    by_month = engine.calculate(ana, ChunkSpec(kind="period", period="1mo", timestamp_column="timestamp"))
    months = ana.get_column("timestamp").dt.truncate("1mo").value_counts().sort("timestamp")
    got = by_month.filter(feature="car_value").sort("chunk_index")
    assert got.get_column("rows").to_list() == months.get_column("count").to_list()
    assert got.get_column("chunk_start").to_list() == months.get_column("timestamp").to_list()


# ------------------------------------------------------------------------------------------ bad input
def _no_nan_with_ok(result: pl.DataFrame) -> None:
    assert result.height > 0  # the checks below must cover rows
    ok = result.filter(pl.col("status") == "ok")
    assert ok.get_column("value").null_count() == 0
    assert not ok.get_column("value").is_nan().any()
    bad = result.filter(pl.col("status") != "ok")
    assert bad.get_column("value").null_count() == bad.height
    assert not bad.get_column("alert").any()
    assert not result.get_column("value").is_nan().any()


@pytest.fixture(scope="module")
def small_engine():
    rng = np.random.default_rng(7)
    n = 2000
    ref = pl.DataFrame(
        {
            "x": rng.normal(size=n),
            "y": rng.normal(size=n),
            "const": np.full(n, 3.0),
            "c": rng.choice(["a", "b", "c"], size=n),
        }
    )
    engine = DriftEngine(continuous=["x", "y", "const"], categorical=["c"], methods=ALL_METHODS, min_chunk_rows=200)
    engine.fit(ref, ChunkSpec(kind="size", size=500))
    return engine, rng


def test_missing_column_yields_status_not_exception(small_engine):
    engine, rng = small_engine
    ana = pl.DataFrame({"x": rng.normal(size=1000), "const": np.full(1000, 3.0), "c": ["a"] * 1000})
    result = engine.calculate(ana, ChunkSpec(kind="size", size=500))
    y = result.filter(feature="y")
    assert y.height == 2 * 5
    assert set(y["status"]) == {"column 'y' is missing from the analysis data"}
    assert result.filter(feature="x")["status"].to_list() == ["ok"] * 10
    _no_nan_with_ok(result)


def test_all_null_column_in_a_chunk_yields_status(small_engine):
    engine, rng = small_engine
    x = rng.normal(size=1000)
    x[500:] = np.nan  # NaN counts as missing, like None
    ana = pl.DataFrame(
        {"x": x, "y": [None] * 500 + rng.normal(size=500).tolist(), "const": np.full(1000, 3.0), "c": ["a"] * 500 + [None] * 500}
    )
    result = engine.calculate(ana, ChunkSpec(kind="size", size=500))
    assert set(result.filter(feature="x", chunk_index=1)["status"]) == {"column 'x' is all null in this chunk"}
    assert set(result.filter(feature="y", chunk_index=0)["status"]) == {"column 'y' is all null in this chunk"}
    assert set(result.filter(feature="c", chunk_index=1)["status"]) == {"column 'c' is all null in this chunk"}
    assert set(result.filter(feature="x", chunk_index=0)["status"]) == {"ok"}
    _no_nan_with_ok(result)


def test_wrong_type_yields_status(small_engine):
    engine, rng = small_engine
    ana = pl.DataFrame(
        {"x": ["1.0"] * 600, "y": rng.normal(size=600), "const": np.full(600, 3.0), "c": [[1, 2]] * 600}
    )
    result = engine.calculate(ana, ChunkSpec(kind="size", size=600))
    assert set(result.filter(feature="x")["status"]) == {"column 'x' has type String, expected numeric"}
    assert set(result.filter(feature="c")["status"]) == {
        "column 'c' has type List(Int64), expected categorical (string, categorical, enum, boolean or integer)"
    }
    assert set(result.filter(feature="y")["status"]) == {"ok"}
    _no_nan_with_ok(result)


def test_chunk_below_minimum_rows_yields_status(small_engine):
    engine, rng = small_engine
    ana = pl.DataFrame({"x": rng.normal(size=620), "y": rng.normal(size=620), "const": np.full(620, 3.0), "c": ["b"] * 620})
    result = engine.calculate(ana, ChunkSpec(kind="size", size=500))
    last = result.filter(chunk_index=1)
    assert set(last["status"]) == {"chunk has 120 rows, fewer than the minimum 200"}
    assert set(last["rows"]) == {120}
    _no_nan_with_ok(result)


def test_constant_reference_column_yields_status_for_psi_and_ks(small_engine):
    engine, rng = small_engine
    ana = pl.DataFrame({"x": rng.normal(size=500), "y": rng.normal(size=500), "const": rng.normal(3, 1, 500), "c": ["a"] * 500})
    result = engine.calculate(ana, ChunkSpec(kind="size", size=500))
    const = result.filter(feature="const")
    msg = "reference column 'const' is constant: PSI/KS not informative"
    assert set(const.filter(pl.col("method").is_in(["psi", "ks"]))["status"]) == {msg}
    # the remaining methods stay computable: a constant reference has zero-spread thresholds, so change alerts
    others = const.filter(pl.col("method").is_in(["jensen_shannon", "hellinger", "wasserstein"]))
    assert set(others["status"]) == {"ok"} and others["alert"].all()
    _no_nan_with_ok(result)
    assert msg in engine.summary(result)["problems"]


def test_missing_timestamp_and_empty_data_yield_status(small_engine):
    engine, _ = small_engine
    result = engine.calculate(pl.DataFrame({"x": [1.0]}), ChunkSpec(kind="period", period="1d", timestamp_column="ts"))
    assert set(result.filter(feature="x")["status"]) == {
        "timestamp column 'ts' is missing from the analysis data: cannot chunk"
    }
    assert set(result.filter(feature="y")["status"]) == {"column 'y' is missing from the analysis data"}
    empty = engine.calculate(pl.DataFrame(schema={"x": pl.Float64, "y": pl.Float64, "const": pl.Float64, "c": pl.String}))
    assert set(empty["status"]) == {"analysis data has no rows"}
    _no_nan_with_ok(result)
    _no_nan_with_ok(empty)


def test_reference_problems_are_reported_not_raised():
    ref = pl.DataFrame({"x": [None] * 300, "s": ["a"] * 300}, schema={"x": pl.Float64, "s": pl.String})
    engine = DriftEngine(continuous=["x", "s", "gone"], methods=("psi", "ks", "wasserstein"))
    engine.fit(ref, ChunkSpec(kind="size", size=300))
    result = engine.calculate(ref, ChunkSpec(kind="size", size=300))
    statuses = dict(result.select("feature", "status").unique().iter_rows())
    assert statuses == {
        "x": "reference column 'x' is all null",
        "s": "reference column 's' has type String, expected numeric",
        "gone": "column 'gone' is missing from the reference data",
    }
    _no_nan_with_ok(result)


def test_asymptotic_ks_p_value_option_keeps_statistic_and_approximates_scipy(frames, engine_and_result):
    ref, ana = frames
    _, exact = engine_and_result
    engine = DriftEngine(continuous=["loan_length", "driver_tenure"], methods=("ks",), ks_p_value="asymptotic")
    engine.fit(ref, SPEC)
    fast = engine.calculate(ana, SPEC)
    for feature in ["loan_length", "driver_tenure"]:
        np.testing.assert_allclose(_values(fast, feature, "ks"), _values(exact, feature, "ks"), rtol=0, atol=1e-12)
        p_fast, p_exact = _values(fast, feature, "ks", "p_value"), _values(exact, feature, "ks", "p_value")
        big = p_exact > 1e-6
        assert big.sum() >= 3, (feature, p_exact)  # the comparison below must cover real chunks
        np.testing.assert_allclose(p_fast[big], p_exact[big], rtol=0.05)


def test_vectorised_kstwo_sf_matches_scipy_kstwo_sf():
    """The engine's vectorised kstwo.sf (smirnov series / Pelz-Good / scipy fallback) vs scipy, rel 1e-9."""
    from mlplatform.drift.ks import kstwo_sf as _kstwo_sf

    rng = np.random.default_rng(7)
    for n in (141, 909, 4545, 9091, 45455):
        d = np.unique(np.r_[rng.uniform(0, 0.1, 60), rng.uniform(0, 1, 20), np.arange(1, 120) / n, 0.0, 1.0])
        ours = _kstwo_sf(d, np.full(d.size, float(n)))
        expected = stats.kstwo.sf(d, n)
        assert ours.shape == expected.shape == d.shape and d.size > 100
        for a, b in zip(ours.tolist(), expected.tolist()):
            assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-300), (n, a, b)
