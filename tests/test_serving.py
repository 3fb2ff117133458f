"""Serving logic without services: request validation and the missing / unknown-category policies, the
serving settings, routing shares and stickiness, the prediction log."""

import math

import polars as pl
import pytest

from mlplatform.serving.predlog import PredictionLog, wait_written
from mlplatform.serving.routing import CHALLENGER, CHAMPION, Router, bucket, effective_routing, routing_from_tags
from mlplatform.serving.settings import RoutingSettings, ServingSettings, parse_serving
from mlplatform.serving.validation import RequestError, RowValidator
from mlplatform.spec import SettingError, load_spec


@pytest.fixture(scope="module")
def spec():
    return load_spec("car_loan")


def good_row(**over):
    row = {"car_value": 35000.0, "salary_range": "40K - 60K €", "debt_to_income_ratio": 0.35, "loan_length": 48,
           "repaid_loan_on_prev_car": True, "size_of_downpayment": "20%", "driver_tenure": 4.5}
    row.update(over)
    return row


def refused(validator, rows) -> RequestError:
    with pytest.raises(RequestError) as info:
        validator.prepare(rows)
    return info.value


@pytest.mark.parametrize("value,status,words", [
    ("35000", 422, "must be a number"), (True, 422, "must be a number"), (-5.0, 422, "out of the spec's range"),
    (2_000_000, 422, "out of the spec's range"), ([1], 422, "must be a number")])
def test_a_wrong_type_or_out_of_range_value_is_refused_naming_the_field(spec, value, status, words):
    err = refused(RowValidator(spec, ServingSettings()), [good_row(), good_row(car_value=value)])
    assert err.status == status and words in err.message
    assert err.loc == ["rows", 1, "car_value"] and "car_value" in err.message


def test_unknown_fields_and_bad_shapes_are_refused_naming_them(spec):
    v = RowValidator(spec, ServingSettings())
    assert refused(v, [good_row(colour="red")]).loc == ["rows", 0, "colour"]
    assert refused(v, []).loc == ["rows"]
    assert refused(v, [1]).loc == ["rows", 0]
    assert refused(v, [good_row(repaid_loan_on_prev_car="yes")]).loc == ["rows", 0, "repaid_loan_on_prev_car"]
    assert refused(v, [good_row(id=1.5)]).loc == ["rows", 0, "id"]
    assert refused(v, [good_row(timestamp="yesterday")]).loc == ["rows", 0, "timestamp"]
    big = ServingSettings(max_rows=2)
    assert refused(RowValidator(spec, big), [good_row()] * 3).status == 413


def test_missing_feature_policies_reject_default_or_native_missing(spec):
    settings = parse_serving({"missing": {"default_policy": "native_missing", "features": {
        "car_value": {"policy": "reject"}, "driver_tenure": {"policy": "default", "default": 3.0}}}}, spec)
    v = RowValidator(spec, settings)
    err = refused(v, [{k: x for k, x in good_row().items() if k != "car_value"}])
    assert err.status == 422 and err.loc == ["rows", 0, "car_value"] and "reject" in err.message
    p = v.prepare([good_row(driver_tenure=None, loan_length=None)])
    names = spec.model_feature_names
    assert p.matrix[0, names.index("driver_tenure")] == 3.0
    assert math.isnan(p.matrix[0, names.index("loan_length")])
    assert p.flags[0] == {"driver_tenure": "missing:default", "loan_length": "missing:native_missing"}
    # the engineered features see what the batch SQL would: loan_length NULL -> NULL -> NaN
    assert math.isnan(p.matrix[0, names.index("tenure_per_loan_month")])
    q = v.prepare([good_row(driver_tenure=None, loan_length=12)])
    assert q.matrix[0, names.index("tenure_per_loan_month")] == 3.0 / 12


def test_unknown_categories_follow_their_policy(spec):
    rej = RowValidator(spec, ServingSettings(unknown_category="reject"))
    err = refused(rej, [good_row(size_of_downpayment="50%")])
    assert err.loc == ["rows", 0, "size_of_downpayment"] and "categories" in err.message
    native = RowValidator(spec, ServingSettings()).prepare([good_row(size_of_downpayment="50%")])
    names = spec.model_feature_names
    assert math.isnan(native.matrix[0, names.index("size_of_downpayment")])
    assert native.matrix[0, names.index("downpayment_fraction")] == 0.5  # dbt's SQL sees the raw value too
    assert native.flags[0] == {"size_of_downpayment": "unknown_category:native_missing"}
    dflt = RowValidator(spec, ServingSettings(unknown_category="default",
                                              unknown_category_default={"size_of_downpayment": "10%"}))
    p = dflt.prepare([good_row(size_of_downpayment="50%")])
    assert p.matrix[0, names.index("size_of_downpayment")] == 1.0
    assert p.flags[0] == {"size_of_downpayment": "unknown_category:default"}
    # a raw value the feature SQL cannot cast is refused, naming the field (dbt's cast would fail too)
    assert refused(RowValidator(spec, ServingSettings()), [good_row(size_of_downpayment="lots")]).loc[-1] \
        == "size_of_downpayment"


def test_serving_settings_errors_name_the_setting(spec):
    with pytest.raises(SettingError, match="serving.routing.canary_percent"):
        parse_serving({"routing": {"canary_percent": 150}}, spec, "car_loan.yaml")
    with pytest.raises(SettingError, match="serving.colour"):
        parse_serving({"colour": 1}, spec, "car_loan.yaml")
    with pytest.raises(SettingError, match="unknown feature"):
        parse_serving({"missing": {"features": {"nope": {"policy": "reject"}}}}, spec, "car_loan.yaml")
    with pytest.raises(SettingError, match="default"):
        parse_serving({"missing": {"features": {"car_value": {"policy": "default"}}}}, spec, "car_loan.yaml")
    assert parse_serving(None, spec) == ServingSettings()


@pytest.mark.parametrize("percent", [5, 10, 37.5, 50])
def test_canary_share_is_within_two_points_over_10000_ids_and_sticky(percent):
    router = Router(RoutingSettings(mode="canary", canary_percent=percent), {CHAMPION, CHALLENGER})
    ids = range(1_000_000, 1_010_000)
    picks = [router.decide(i).variant for i in ids]
    share = 100 * picks.count(CHALLENGER) / len(picks)
    assert abs(share - percent) <= 2, share
    assert [router.decide(i).variant for i in ids] == picks  # same id, same variant
    # raising the share only moves ids to the challenger
    more = Router(RoutingSettings(mode="canary", canary_percent=percent + 10), {CHAMPION, CHALLENGER})
    assert all(more.decide(i).variant == CHALLENGER for i, p in zip(ids, picks) if p == CHALLENGER)


def test_ab_weights_kill_switch_and_shadow():
    ab = Router(RoutingSettings(mode="ab", variants={"champion": 3, "challenger": 1}), {CHAMPION, CHALLENGER})
    picks = [ab.decide(f"user-{i}").variant for i in range(10_000)]
    assert abs(100 * picks.count(CHALLENGER) / 10_000 - 25) <= 2
    kill = Router(RoutingSettings(mode="canary", canary_percent=100, shadow=True, kill_switch=True),
                  {CHAMPION, CHALLENGER})
    assert {kill.decide(i) for i in range(500)} == {kill.decide(0)} and kill.decide(0).variant == CHAMPION
    assert kill.decide(0).shadow is None and kill.aliases_needed() == {CHAMPION}
    shadow = Router(RoutingSettings(shadow=True), {CHAMPION, CHALLENGER})
    assert shadow.decide(7).variant == CHAMPION and shadow.decide(7).shadow == CHALLENGER
    # no challenger registered: the canary falls back to the champion, nothing fails
    lone = Router(RoutingSettings(mode="canary", canary_percent=50, shadow=True), {CHAMPION})
    assert {lone.decide(i).variant for i in range(100)} == {CHAMPION} and lone.decide(1).shadow is None
    assert bucket(12345) == bucket("12345")  # an id sent as a number or a string is the same entity


def test_routing_file_and_mlflow_tags_override_the_spec_in_order():
    base = RoutingSettings(mode="canary", canary_percent=10)
    r = effective_routing(base, {"canary_percent": 20, "shadow": True},
                          routing_from_tags({"serving.canary_percent": "30", "other": "x"}))
    assert (r.mode, r.canary_percent, r.shadow) == ("canary", 30.0, True)
    with pytest.raises(SettingError, match="routing file"):
        effective_routing(base, {"canary_percent": -1}, {})
    with pytest.raises(SettingError, match="MLflow tags"):
        effective_routing(base, {}, {"mode": "everything"})


def test_the_prediction_log_writes_batches_of_rows_as_parquet_per_partition(spec, tmp_path):
    import datetime as dt

    plog = PredictionLog(spec, tmp_path, batch_rows=10, flush_seconds=0.2)
    rows = [{"request_id": f"r{i}", "entity_id": str(i), "predicted_at": dt.datetime(2026, 1, 1),
             "event_time": dt.datetime(2019, 3 + i % 2, 5), "variant": "champion", "model_version": "1",
             "shadow": False, "routing_mode": "champion", "prediction": i / 100, "policy_flags": "{}",
             "latency_ms": 0.5, **good_row()} for i in range(25)]
    plog.add(rows)
    assert wait_written(plog, 25)
    plog.close()
    parts = sorted(p.name for p in tmp_path.iterdir())
    assert parts == ["2019-03-01", "2019-04-01"]
    df = pl.read_parquet(tmp_path / "*" / "*.parquet")
    assert df.height == 25 and sorted(df["request_id"].to_list()) == sorted(f"r{i}" for i in range(25))
    assert df.schema["car_value"] == pl.Float64 and df.schema["salary_range"] == pl.String
    assert not list(tmp_path.rglob(".*"))  # no half-written files left behind


def mutations(spec, seed: int = 0, n: int = 3000):
    """Rows with wrong types, out-of-range and odd values, missing and extra keys, odd shapes."""
    import random

    rnd = random.Random(seed)
    odd = [None, "", "x" * 300, -1, 0, 1, 2 ** 70, -2 ** 70, 1e308, -1e308, 0.5, True, False, [], {}, [1, 2],
           {"a": 1}, "NaN", "1e999", "20%", "50%", "0 - 20K €", "\u0000", "2019-01-01T00:00:00", float("inf")]
    keys = [*spec.feature_names, spec.id_column, spec.time_column, "extra", ""]
    for _ in range(n):
        row = good_row()
        for _ in range(rnd.randint(1, 3)):
            k = rnd.choice(keys)
            if rnd.random() < 0.15:
                row.pop(k, None)
            else:
                row[k] = rnd.choice(odd)
        yield [row] if rnd.random() < 0.9 else rnd.choice([row, [], [row, 5], "rows", None])


def test_any_malformed_row_is_a_4xx_naming_a_field_never_another_error(spec):
    for settings in (ServingSettings(), ServingSettings(unknown_category="reject"),
                     parse_serving({"missing": {"default_policy": "reject"}}, spec)):
        v = RowValidator(spec, settings)
        for rows in mutations(spec):
            try:
                p = v.prepare(rows)
            except RequestError as exc:
                assert 400 <= exc.status < 500 and exc.loc and exc.loc[0] == "rows", (rows, exc.loc)
                continue
            assert p.matrix.shape == (len(rows), len(spec.model_feature_names))


def test_shadow_scores_in_batches_off_the_response_path_with_the_same_results(spec):
    import lightgbm as lgb
    import numpy as np

    from mlplatform.serving.models import ServedModel
    from mlplatform.serving.shadow import ShadowScorer

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, len(spec.model_feature_names)))
    booster = lgb.train({"objective": "binary", "verbosity": -1, "num_threads": 1}, lgb.Dataset(x, label=x[:, 0] > 0),
                        num_boost_round=20)
    model = ServedModel("7", booster)
    v = RowValidator(spec, ServingSettings())
    got = {}
    scorer = ShadowScorer(lambda m, p, preds, rid, *rest: got.__setitem__(rid, (m.version, list(preds))),
                          interval=3600, max_queue=5)  # drained by hand below
    prepared = [v.prepare([good_row(car_value=1000.0 * i), good_row(loan_length=i + 1)]) for i in range(6)]
    accepted = [scorer.submit(model, p, f"r{i}", "challenger", "champion", None) for i, p in enumerate(prepared)]
    assert accepted == [True] * 5 + [False] and scorer.skipped == 2  # a full queue drops, never waits
    scorer.drain()
    assert sorted(got) == [f"r{i}" for i in range(5)]
    for i in range(5):
        assert got[f"r{i}"] == ("7", list(booster.predict(prepared[i].matrix)))
    scorer.close()
