"""The data-set spec: typed settings with their defaults in one place (mlplatform.spec), errors that name the file
and the setting path, and a committed JSON Schema that is the one generated from the same models."""

import copy
import dataclasses
import datetime as dt
import json

import pytest
import yaml

from mlplatform import spec as specmod
from mlplatform.spec import DATASETS_DIR, SCHEMA_PATH, SettingError, load_spec

BUNDLED = sorted(p.stem for p in DATASETS_DIR.glob("*.yaml"))


def raw(name="car_loan") -> dict:
    return yaml.safe_load((DATASETS_DIR / f"{name}.yaml").read_text())


def write(tmp_path, data: dict, name="variant.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False))
    return path


def variant(tmp_path, change, name="variant.yaml"):
    data = copy.deepcopy(raw())
    change(data)
    return write(tmp_path, data, name)


def test_both_bundled_specs_load():
    assert BUNDLED == ["car_loan", "car_price"]
    loan, price = load_spec("car_loan"), load_spec("car_price")
    assert (loan.problem_type, loan.cadence, loan.metric, loan.estimated_metric) == \
        ("binary_classification", "monthly", "roc_auc", "roc_auc")
    assert (price.problem_type, price.cadence, price.metric, price.estimated_metric) == \
        ("regression", "daily", "rmse", "rmse")
    assert (loan.time_column, loan.time_type, loan.loader) == \
        ("timestamp", "datetime", "nannyml:load_synthetic_car_loan_dataset")
    assert loan.feature("salary_range").categories[0] == "0 - 20K €"
    assert loan.automation.drift.min_alerting_features == 4 and price.automation.rollback.margin == 200.0
    assert loan.freshness["candidate_model"].fail == dt.timedelta(days=30)
    assert loan.freshness["raw_records"].warn == dt.timedelta(hours=36)


def test_an_unknown_key_is_rejected_naming_it_and_the_closest_known_one(tmp_path):
    path = variant(tmp_path, lambda d: d["monitoring"].update(psi_binz=5))
    with pytest.raises(SettingError, match=r"variant\.yaml: setting 'monitoring\.psi_binz' is not a known setting "
                                           r"\(did you mean 'psi_bins'\?\)"):
        load_spec(path)
    path = variant(tmp_path, lambda d: d["features"][0].update(maximum=5))
    with pytest.raises(SettingError, match=r"setting 'features\[0\]\.maximum' \(car_value\) is not a known setting"):
        load_spec(path)
    path = variant(tmp_path, lambda d: d.update(monitorring={}))
    with pytest.raises(SettingError, match=r"setting 'monitorring' is not a known setting \(did you mean "
                                           r"'monitoring'\?\)"):
        load_spec(path)


def test_a_wrong_type_names_the_file_and_the_setting_path(tmp_path):
    path = variant(tmp_path, lambda d: d["automation"]["drift"].update(min_alerting_features="x"), "car_loan.yaml")
    with pytest.raises(SettingError, match=r"car_loan\.yaml: setting 'automation\.drift\.min_alerting_features' "
                                           r"must be an integer, got 'x'"):
        load_spec(path)
    # strict: text that looks like a number is still text
    path = variant(tmp_path, lambda d: d.update(label_delay_days="30"))
    with pytest.raises(SettingError, match=r"setting 'label_delay_days' must be an integer, got '30'"):
        load_spec(path)
    path = variant(tmp_path, lambda d: d["freshness"]["features"].update(warn="3 days"))
    with pytest.raises(SettingError, match=r"setting 'freshness\.features\.warn' must be a positive duration like 90s"):
        load_spec(path)
    path = variant(tmp_path, lambda d: d["features"][1]["categories"].append(True))
    with pytest.raises(SettingError, match=r"'features\[1\]\.categories' \(salary_range\) holds true .*quote"):
        load_spec(path)


def test_every_problem_is_reported_on_its_own_line(tmp_path):
    def two(d):
        d["batch"]["cadence"] = "fortnightly"
        d["landing"]["redelivery"] = "overwrite"
    with pytest.raises(SettingError) as info:
        load_spec(variant(tmp_path, two))
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and all(line.startswith(str(tmp_path / "variant.yaml")) for line in lines)
    assert "setting 'batch.cadence' must be one of 'hourly', 'daily', 'weekly', 'monthly', 'yearly', got " \
           "'fortnightly'" in lines[0]
    assert "setting 'landing.redelivery' must be one of 'reject', 'replace_by_id'" in lines[1]


def test_omitted_sections_get_the_documented_defaults(tmp_path):
    def strip(d):
        for key in ("monitoring", "automation", "freshness", "contracts", "landing", "engineered_features"):
            del d[key]
        del d["training"]["split"]
        del d["target"]["positive_class"]
        d["training"]["floor"] = 0.7
    s = load_spec(variant(tmp_path, strip))
    assert s.monitoring.estimated_metrics == ("roc_auc",)  # the training metric
    assert (s.monitoring.min_chunk_rows, s.monitoring.psi_bins, s.monitoring.reference_chunk_rows,
            s.monitoring.std_multiplier) == (200, 10, 5000, 3.0)
    assert s.monitoring.drift_methods == ("psi", "ks", "chi2", "jensen_shannon", "wasserstein", "hellinger",
                                          "l_infinity")
    a = s.automation
    assert (a.retrain_schedule, a.min_minutes_between_retrains) == ("", 60)
    assert (a.volume.enabled, a.volume.min_new_labelled_rows, a.volume.min_fraction) == (True, None, 0.5)
    assert (a.drift.enabled, a.drift.min_alerting_features, a.drift.method, a.drift.on_multivariate_alert) == \
        (True, 1, None, False)
    assert (a.performance.floor, a.performance.margin_below_champion_test) == (0.7, None)  # training.floor
    assert (a.rollback.enabled, a.rollback.margin) == (True, 0.02)
    assert s.freshness == {}
    assert (s.timezone, s.max_unseen_category_fraction, s.redelivery) == ("UTC", 0.05, "reject")
    assert s.split == {"train": 0.6, "validation": 0.2, "test": 0.2}
    assert s.positive_class == 1 and s.engineered_features == ()
    # a setting given wins over its default, and a partial section keeps the other defaults
    s = load_spec(variant(tmp_path, lambda d: d.update(monitoring={"psi_bins": 20}, automation={"drift": {
        "method": "ks"}})))
    assert (s.monitoring.psi_bins, s.monitoring.min_chunk_rows, s.automation.drift.method,
            s.automation.drift.min_alerting_features) == (20, 200, "ks", 1)


def test_required_settings_are_named_when_missing(tmp_path):
    with pytest.raises(SettingError, match=r"setting 'training\.metric' is missing"):
        load_spec(variant(tmp_path, lambda d: d["training"].pop("metric")))
    with pytest.raises(SettingError, match=r"setting 'target' is missing"):
        load_spec(variant(tmp_path, lambda d: d.pop("target")))


def test_a_source_is_a_loader_or_files_never_both_nor_neither(tmp_path):
    with pytest.raises(SettingError, match=r"setting 'source' gives both 'loader' and 'reference'"):
        load_spec(variant(tmp_path, lambda d: d["source"].update(reference="ref.parquet")))
    with pytest.raises(SettingError, match=r"setting 'source' needs either 'loader' .* or 'reference'"):
        load_spec(variant(tmp_path, lambda d: d["source"].pop("loader")))
    with pytest.raises(SettingError, match=r"setting 'source\.labels' applies to file sources"):
        load_spec(variant(tmp_path, lambda d: d["source"].update(labels="labels.csv")))
    with pytest.raises(SettingError, match=r"setting 'source\.loader' must be module:function, got 'nannyml'"):
        load_spec(variant(tmp_path, lambda d: d["source"].update(loader="nannyml")))

    files = {"reference": "data/reference-*.parquet", "production": "data/production.csv",
             "labels": "data/labels.csv", "drop_columns": ["y_pred"]}
    s = load_spec(variant(tmp_path, lambda d: d.update(source=files)))
    assert (s.loader, s.source_reference, s.source_production, s.source_labels, s.source_format,
            s.drop_columns) == ("", "data/reference-*.parquet", "data/production.csv", "data/labels.csv", "",
                                ("y_pred",))
    # a file without a known extension asks for `source.format` when it is read (tests/test_sources.py)
    s = load_spec(variant(tmp_path, lambda d: d.update(source={"reference": "r.txt", "format": "csv"})))
    assert (s.source_reference, s.source_format, s.source_production) == ("r.txt", "csv", "")
    with pytest.raises(SettingError, match=r"setting 'source\.format' must be one of 'parquet', 'csv', got 'xlsx'"):
        load_spec(variant(tmp_path, lambda d: d.update(source={"reference": "r.xlsx", "format": "xlsx"})))


def test_time_column_is_a_name_or_a_mapping_with_its_storage_type(tmp_path):
    s = load_spec(variant(tmp_path, lambda d: d.update(time_column={"name": "year", "type": "year"})))
    assert (s.time_column, s.time_type) == ("year", "year")
    assert s.raw_columns[:2] == ["id", "year"]
    s = load_spec(variant(tmp_path, lambda d: d.update(time_column={"name": "ts"})))
    assert (s.time_column, s.time_type) == ("ts", "datetime")
    with pytest.raises(SettingError, match=r"setting 'time_column\.type' must be one of 'datetime', 'date', "
                                           r"'iso_string', 'year', 'epoch_s', 'epoch_ms', got 'weeks'"):
        load_spec(variant(tmp_path, lambda d: d.update(time_column={"name": "ts", "type": "weeks"})))
    with pytest.raises(SettingError, match=r"setting 'time_column' must be a column name or a mapping"):
        load_spec(variant(tmp_path, lambda d: d.update(time_column=5)))
    with pytest.raises(SettingError, match=r"setting 'time_column\.name' is missing"):
        load_spec(variant(tmp_path, lambda d: d.update(time_column={"type": "date"})))


def test_settings_that_depend_on_each_other_are_checked_together(tmp_path):
    with pytest.raises(SettingError, match=r"setting 'training\.metric' must be one of \['roc_auc', 'pr_auc'\] for "
                                           r"binary_classification, got 'rmse'"):
        load_spec(variant(tmp_path, lambda d: d["training"].update(metric="rmse")))
    with pytest.raises(SettingError, match=r"setting 'automation\.drift\.method' 'psi' is not among "
                                           r"monitoring\.drift_methods \['ks'\]"):
        load_spec(variant(tmp_path, lambda d: (d["monitoring"].update(drift_methods=["ks"]),
                                               d["automation"]["drift"].update(method="psi"))))
    with pytest.raises(SettingError, match=r"setting 'batch\.end' \(2018-01-01\) must be after batch\.start"):
        load_spec(variant(tmp_path, lambda d: d["batch"].update(end="2018-01-01")))
    with pytest.raises(SettingError, match=r"setting 'engineered_features\[0\]\.name' \(car_value\) is given twice"):
        load_spec(variant(tmp_path, lambda d: d["engineered_features"][0].update(name="car_value")))
    with pytest.raises(SettingError, match=r"setting 'freshness\.features\.warn' \(50h\) must be shorter than fail "
                                           r"\(2d\)"):
        load_spec(variant(tmp_path, lambda d: d["freshness"]["features"].update(warn="50h")))


def test_a_variant_made_with_dataclasses_replace_keeps_the_other_settings():
    s = load_spec("car_loan")
    hourly = dataclasses.replace(s, cadence="hourly", batch_start="2018-10-01 00:00:00")
    assert (hourly.cadence, hourly.batch_start, hourly.metric, hourly.monitoring) == \
        ("hourly", "2018-10-01 00:00:00", s.metric, s.monitoring)


def test_the_vocabularies_are_the_libraries():
    from mlplatform import batches
    from mlplatform.drift.engine import METHODS

    assert specmod.CADENCES == set(batches.CADENCES)
    assert set(specmod.DRIFT_METHODS) == set(METHODS)


def test_the_committed_schema_is_the_generated_one(capsys):
    assert SCHEMA_PATH.read_text() == specmod.schema_text(), \
        "platform/datasets/spec.schema.json is stale: run `python -m mlplatform.spec --schema` and commit it"
    assert specmod.main(["--schema", "--stdout"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(SCHEMA_PATH.read_text())


@pytest.mark.parametrize("name", BUNDLED)
def test_each_bundled_spec_validates_against_the_schema_and_points_editors_to_it(name):
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    text = (DATASETS_DIR / f"{name}.yaml").read_text()
    assert text.splitlines()[0] == "# yaml-language-server: $schema=spec.schema.json"
    assert [e.message for e in validator.iter_errors(yaml.safe_load(text))] == []
    # the schema is as strict as the models: a typo'd key and a categorical feature without categories fail it
    bad = yaml.safe_load(text)
    bad["monitoring"] = {"psi_binz": 5}
    bad["features"].append({"name": "colour", "type": "categorical"})
    messages = sorted(e.message for e in validator.iter_errors(bad))
    assert messages == ["'categories' is a required property",
                        "Additional properties are not allowed ('psi_binz' was unexpected)"]


def test_behavioural_expectations_load_as_typed_entries_of_the_three_kinds():
    loan = load_spec("car_loan")
    kinds = [e.kind for e in loan.behaviour]
    assert len(kinds) >= 2 and {"invariance", "direction", "minimum_functionality"} <= set(kinds)
    direction = next(e for e in loan.behaviour if e.kind == "direction")
    assert direction.feature in loan.feature_names and direction.expect in ("not_increase", "not_decrease")


@pytest.mark.parametrize("index,change,message", [
    (0, {"feature": "dti"}, r"setting 'behaviour\[0\]\.feature' 'dti' is not a raw feature; the features are "
                            r"\['car_value'"),
    (0, {"kind": "directional"}, r"setting 'behaviour\[0\]' must be a mapping whose 'kind' is one of invariance, "
                                 r"direction, minimum_functionality"),
    (0, {"delta": 0.1}, r"setting 'behaviour\[0\]' needs exactly one of delta, to_quantile, to; got \['delta', 'to'\]"),
    (0, {"expect": "up"}, r"setting 'behaviour\[0\]\.expect' must be one of 'not_increase', 'not_decrease'"),
    (1, {"delta": None}, r"setting 'behaviour\[1\]\.delta' is needed: car_value is numeric"),
    (1, {"epsilonn": 0.1}, r"setting 'behaviour\[1\]\.epsilonn' is not a known setting \(did you mean 'epsilon'\?\)"),
    (1, {"epsilon": 0}, r"setting 'behaviour\[1\]\.epsilon' must be > 0"),
    (2, {"equals": "100K"}, r"setting 'behaviour\[2\]\.equals' '100K' is not a category of salary_range"),
    (2, {"equals": None}, r"setting 'behaviour\[2\]' needs a slice: 'column' with 'equals', or 'where'"),
    (2, {"metric": "rmse"}, r"setting 'behaviour\[2\]\.metric' must be one of \['roc_auc', 'pr_auc'\]"),
    (2, {"column": "car_colour"}, r"setting 'behaviour\[2\]\.column' 'car_colour' is not a feature"),
    (3, {"name": "low_salary_slice_works"}, r"setting 'behaviour\[3\]\.name' 'low_salary_slice_works' is given twice"),
])
def test_a_bad_behavioural_expectation_is_rejected_naming_its_setting(tmp_path, index, change, message):
    def edit(d):
        entry = d["behaviour"][index]
        for k, v in change.items():
            if v is None:
                entry.pop(k, None)
            else:
                entry[k] = v

    with pytest.raises(SettingError, match=r"variant\.yaml: " + message):
        load_spec(variant(tmp_path, edit))


def test_a_direction_change_must_fit_the_feature_type(tmp_path):
    bad = {"kind": "direction", "name": "x", "feature": "salary_range", "delta": 1, "expect": "not_increase"}
    with pytest.raises(SettingError, match=r"setting 'behaviour\[4\]\.delta' applies to numeric features; "
                                           r"salary_range is categorical \(use 'to'\)"):
        load_spec(variant(tmp_path, lambda d: d["behaviour"].append(bad)))
    numeric_to = {**bad, "feature": "car_value", "to": 5.0}
    del numeric_to["delta"]
    with pytest.raises(SettingError, match=r"setting 'behaviour\[4\]\.to' applies to boolean or categorical"):
        load_spec(variant(tmp_path, lambda d: d["behaviour"].append(numeric_to)))
