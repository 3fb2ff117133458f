"""Behavioural expectations (mlplatform.behaviour) without services: invariance, direction and minimum
functionality measured against plain predict functions and a tiny LightGBM model, and the gate's rule that a
failed expectation rejects the candidate, naming it."""

import datetime as dt

import numpy as np
import polars as pl
import pytest

from mlplatform import behaviour, modeling, registry
from mlplatform.spec import (DirectionExpectation, InvarianceExpectation, MinimumFunctionalityExpectation,
                             SettingError, load_spec)


from .helpers import node  # the tests' data set: car_loan


@pytest.fixture(scope="module")
def spec():
    return load_spec("car_loan")


def frame(n=400, seed=0) -> pl.DataFrame:
    """Rows with the car-loan raw columns (and engineered ones are not needed by plain predict functions)."""
    rng = np.random.default_rng(seed)
    salaries = ["0 - 20K €", "20K - 40K €", "40K - 60K €", "60K+ €"]
    return pl.DataFrame({
        "id": np.arange(n), "timestamp": [dt.datetime(2018, 1, 1) + dt.timedelta(hours=i) for i in range(n)],
        "car_value": rng.uniform(5_000, 50_000, n), "salary_range": [salaries[i % 4] for i in range(n)],
        "debt_to_income_ratio": np.linspace(0.0, 0.9, n), "loan_length": rng.integers(6, 60, n).astype(float),
        "repaid_loan_on_prev_car": [bool(i % 2) for i in range(n)],
        "size_of_downpayment": [["0%", "10%", "20%", "30%", "40%"][i % 5] for i in range(n)],
        "driver_tenure": rng.uniform(0, 20, n), "repaid": (np.arange(n) % 3 == 0).astype(float)})


def direction(**kw):
    return DirectionExpectation(**{"kind": "direction", "name": "d", "feature": "debt_to_income_ratio",
                                   "expect": "not_increase", **kw})


def test_a_prediction_rising_with_the_feature_breaks_a_not_increase_expectation_on_every_changed_row(spec):
    rows = frame()
    rising = lambda df: df["debt_to_income_ratio"].to_numpy() * 0.5  # noqa: E731
    falling = lambda df: 1 - df["debt_to_income_ratio"].to_numpy() * 0.5  # noqa: E731
    e = direction(delta=0.1, tolerance=0.01)
    bad, = behaviour.evaluate(spec, rows, rising, [e])
    # +0.1 clipped at the feature's max (1.0): every row changes; each prediction rises by 0.05 > 0.01
    assert (bad.passed, bad.rows, bad.violating_rows, bad.measured) == (False, 400, 400, 1.0)
    assert "rose by more than 0.01 on 400 of 400" in bad.message
    good, = behaviour.evaluate(spec, rows, falling, [e])
    assert (good.passed, good.violating_rows, good.measured) == (True, 0, 0.0)
    # a move smaller than the tolerance is no violation
    loose, = behaviour.evaluate(spec, rows, rising, [direction(delta=0.1, tolerance=0.06)])
    assert loose.passed and loose.violating_rows == 0


def test_a_direction_expectation_allows_its_share_of_violating_rows_and_counts_only_changed_rows(spec):
    rows = frame()
    # rises with the ratio only for salary band 60K+ (a quarter of the rows)
    def predict(df):
        rich = (df["salary_range"] == "60K+ €").to_numpy()
        return np.where(rich, df["debt_to_income_ratio"].to_numpy(), 0.5)

    strict, = behaviour.evaluate(spec, rows, predict, [direction(delta=0.05)])
    assert strict.violating_rows == 100 and strict.measured == pytest.approx(0.25) and not strict.passed
    allowed, = behaviour.evaluate(spec, rows, predict, [direction(delta=0.05, max_violation_fraction=0.3)])
    assert allowed.passed and allowed.threshold == 0.3
    # to_quantile: rows already above the quantile are not changed, so they are not judged
    q, = behaviour.evaluate(spec, rows, predict, [direction(to_quantile=0.5)])
    assert q.rows == 200 and q.violating_rows == 50
    # a boolean set to true: only the rows that were false are changed
    prev = lambda df: np.where(df["repaid_loan_on_prev_car"].to_numpy(), 0.2, 0.8)  # noqa: E731
    flag, = behaviour.evaluate(spec, rows, prev, [direction(feature="repaid_loan_on_prev_car", to=True,
                                                            expect="not_decrease")])
    assert (flag.passed, flag.rows, flag.violating_rows) == (False, 200, 200)


def test_invariance_counts_rows_moved_more_than_epsilon_by_a_numeric_perturbation(spec):
    rows = frame()
    step = lambda df: (df["car_value"].to_numpy() > 20_000).astype(float)  # noqa: E731 - a cliff at 20 000
    e = InvarianceExpectation(kind="invariance", name="cv", feature="car_value", delta=1000, epsilon=0.05)
    r, = behaviour.evaluate(spec, rows, step, [e])
    near = int(((rows["car_value"] > 19_000) & (rows["car_value"] <= 21_000)).sum())
    assert near > 0 and (r.violating_rows, r.passed) == (near, False)
    assert r.measured == pytest.approx(near / 400)
    smooth = lambda df: df["car_value"].to_numpy() / 1e6  # noqa: E731 - moves 1e-3 per 1000
    assert behaviour.evaluate(spec, rows, smooth, [e])[0].passed
    allowed = e.model_copy(update={"max_violation_fraction": 0.5})
    assert behaviour.evaluate(spec, rows, step, [allowed])[0].passed


def test_invariance_across_categories_substitutes_each_value(spec):
    rows = frame()
    ignores = lambda df: np.full(df.height, 0.3)  # noqa: E731
    uses = lambda df: (df["salary_range"] == "60K+ €").to_numpy() * 0.2  # noqa: E731
    e = InvarianceExpectation(kind="invariance", name="salary", feature="salary_range", epsilon=0.1)
    assert behaviour.evaluate(spec, rows, ignores, [e])[0].passed
    r, = behaviour.evaluate(spec, rows, uses, [e])
    assert not r.passed and r.violating_rows == 400  # every row moves by 0.2 for some value
    only_low = e.model_copy(update={"values": ("0 - 20K €", "20K - 40K €")})
    r, = behaviour.evaluate(spec, rows, uses, [only_low])
    assert r.violating_rows == 100  # only the 60K+ rows move (down) when given a low band


def test_minimum_functionality_scores_a_named_slice_against_its_floor(spec):
    rows = frame()
    y = rows["repaid"].to_numpy()
    # perfect on the first salary band, random elsewhere
    rng = np.random.default_rng(1)
    band = (rows["salary_range"] == "0 - 20K €").to_numpy()
    p = np.where(band, y, rng.uniform(0, 1, rows.height))
    predict = lambda df: p  # noqa: E731
    good = MinimumFunctionalityExpectation(kind="minimum_functionality", name="low", column="salary_range",
                                           equals="0 - 20K €", floor=0.9)
    bad = MinimumFunctionalityExpectation(kind="minimum_functionality", name="high", column="salary_range",
                                          equals="60K+ €", floor=0.9)
    where = MinimumFunctionalityExpectation(kind="minimum_functionality", name="debt",
                                            where="debt_to_income_ratio >= 0.45", floor=0.9)
    tiny = MinimumFunctionalityExpectation(kind="minimum_functionality", name="tiny",
                                           where="debt_to_income_ratio > 0.899", floor=0.5)
    r_good, r_bad, r_where, r_tiny = behaviour.evaluate(spec, rows, predict, [good, bad, where, tiny])
    assert r_good.passed and r_good.measured == 1.0 and r_good.rows == 100
    assert not r_bad.passed and r_bad.measured < 0.9 and r_bad.violating_rows == 100
    assert r_where.rows == int((rows["debt_to_income_ratio"] >= 0.45).sum())
    assert not r_tiny.passed and "fewer than min_rows 30" in r_tiny.message
    table = behaviour.markdown_table([r_good, r_bad])
    assert "| high | minimum_functionality | **FAIL**" in table and "| low | minimum_functionality | PASS" in table


def test_a_slice_condition_that_cannot_be_evaluated_names_the_setting(spec):
    broken = MinimumFunctionalityExpectation(kind="minimum_functionality", name="x", where="no_such_column > 1",
                                             floor=0.5)
    with pytest.raises(SettingError, match=r"car_loan\.yaml: setting 'behaviour\[1\]\.where'"):
        behaviour.evaluate(spec, frame(), lambda df: np.zeros(df.height), [direction(delta=0.1), broken])


def test_a_tiny_lightgbm_model_is_judged_on_engineered_features_recomputed_from_the_perturbed_row(spec):
    # The label depends only on financed_value (an engineered feature: car_value * (1 - downpayment)).
    from mlplatform.features import online_features

    rows = frame(n=1200, seed=3)
    feats = online_features(rows.select(spec.raw_columns), spec)
    fin = feats["financed_value"].to_numpy()
    labelled = feats.with_columns(pl.Series("repaid", (fin > np.median(fin)).astype(float)))
    ts = modeling.time_split(labelled, spec)
    params = modeling.lgb_params(spec, {"min_data_in_leaf": 5, "learning_rate": 0.3}, seed=1)
    booster = modeling.train(ts, spec, params, num_boost_round=30, early_stopping_rounds=10).booster
    predict = behaviour.model_predictor(booster, spec)
    test = ts.filter(pl.col("split") == "test")
    raising = direction(feature="car_value", delta=30_000, tolerance=0.05)
    r, = behaviour.evaluate(spec, test, predict, [raising])
    # Raising the car value raises the financed value, hence the prediction: only visible if the engineered
    # column is recomputed from the perturbed raw row.
    assert not r.passed and r.violating_rows > 0.3 * r.rows
    assert behaviour.evaluate(spec, test, predict, [raising.model_copy(update={"expect": "not_decrease"})])[0].passed


def test_the_gate_rejects_a_candidate_failing_an_expectation_and_names_it(spec):
    comparison = {"diff": 0.02, "ci_low": 0.01, "ci_high": 0.03}
    assert registry.decide(spec, 0.95, comparison)[0]
    passed, reason = registry.decide(spec, 0.95, comparison, ["dti_does_not_raise_repayment (23% of rows)"])
    assert not passed
    assert reason.startswith("behavioural expectation(s) failed: dti_does_not_raise_repayment (23% of rows)")
    assert "roc_auc=0.9500" in reason  # the metric part of the decision is still reported
    results = [behaviour.Result("a", "direction", "x", False, 0.2, 0.05, 10, 2, "rose"),
               behaviour.Result("b", "invariance", "y", True, 0.0, 0.0, 10, 0, "ok")]
    assert behaviour.failure_reasons(results) == ["a (rose)"]


def test_the_bundled_car_loan_spec_declares_at_least_two_expectations(spec):
    kinds = {e.kind for e in spec.behaviour}
    assert len(spec.behaviour) >= 2 and {"direction", "invariance", "minimum_functionality"} <= kinds


# --- the gate, on the real services -------------------------------------------------------------------------------
TEXTBOOK_DTI = {"name": "dti_does_not_raise_repayment", "kind": "direction",
                "description": "Raising the debt-to-income ratio must not raise the predicted repayment probability.",
                "feature": "debt_to_income_ratio", "delta": 0.1, "expect": "not_increase", "tolerance": 0.02,
                "max_violation_fraction": 0.05}


@pytest.mark.services
def test_a_model_violating_a_directional_expectation_stays_out_of_production_and_the_failure_is_named(
        spec, lakefs, state, instance, mlflow_uri, tmp_path):
    """In the synthetic car-loan data repayment rises with the debt-to-income ratio, so a model fit to it breaks
    the textbook expectation that raising the ratio must not raise the predicted repayment."""
    import yaml

    from mlplatform.audit import AuditTrail
    from mlplatform.spec import DATASETS_DIR
    from resources.publish import publish_run

    from .helpers import quick_training_set
    from .test_models import mlflow_res, train

    ts = quick_training_set(spec, n=8000)
    m = mlflow_res(spec, mlflow_uri)
    # A champion under the bundled spec: its expectations hold for a normally trained model.
    first = train(spec, ts, lakefs, state, instance, mlflow_uri, num_boost_round=8, num_leaves=3, learning_rate=0.1)
    checks = {e.check_name: e for e in first.get_asset_check_evaluations()}
    assert first.success and {f"behaviour_{e.name}" for e in spec.behaviour} <= set(checks)
    assert all(checks[f"behaviour_{e.name}"].passed for e in spec.behaviour)
    card = first.asset_materializations_for_node(node("model_card"))[0].metadata["card"].value
    assert f"All {len(spec.behaviour)} hold." in card and "| car_value_rounding_invariance | invariance | PASS" in card
    publish_run(instance, lakefs, first.run_id, m)
    assert registry.aliases(m) == {"champion": "1"}

    raw = yaml.safe_load((DATASETS_DIR / "car_loan.yaml").read_text())
    raw["behaviour"].append(TEXTBOOK_DTI)
    path = tmp_path / "car_loan_textbook.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))
    strict = load_spec(path)
    second = train(strict, ts, lakefs, state, instance, mlflow_uri)  # a better model by the metrics
    assert not second.success  # the blocking checks failed: nothing downstream, nothing published
    checks = {e.check_name: e for e in second.get_asset_check_evaluations()}
    dti = checks["behaviour_dti_does_not_raise_repayment"]
    assert not dti.passed and dti.metadata["violating_rows"].value > 0
    assert dti.metadata["measured"].value > 0.05 and "rose by more than 0.02" in dti.description
    gate = checks["promotion_gate"]
    assert not gate.passed and gate.metadata["decision"].text == "reject"
    assert gate.metadata["failed_expectations"].text == "dti_does_not_raise_repayment"
    assert "behavioural expectation(s) failed: dti_does_not_raise_repayment" in gate.description
    # The other expectations still hold for this model.
    assert all(checks[f"behaviour_{e.name}"].passed for e in spec.behaviour)

    report = second.asset_materializations_for_node(node("evaluation_report"))[0].metadata
    assert "| dti_does_not_raise_repayment | direction | **FAIL**" in report["behaviour"].value
    card = report["card"].value  # model_card is skipped after a failed blocking check: the report writes it
    assert "## Gate: reject" in card and "Failed: dti_does_not_raise_repayment" in card
    run_id = m.client().get_model_version(m.model_name, "2").run_id
    logged = m.client().download_artifacts(run_id, "model_card.md", str(tmp_path))
    assert "dti_does_not_raise_repayment | direction | **FAIL**" in open(logged).read()

    assert publish_run(instance, lakefs, second.run_id, m).status == "kept"
    assert registry.aliases(m) == {"champion": "1"}
    assert registry.version_tags(m, "2")["gate"] == "reject"
    decision = AuditTrail().history(m.model_name, "2")[-1]
    assert decision.action == "gate_decision" and decision.evidence["failed_expectations"] == [
        "dti_does_not_raise_repayment"]
