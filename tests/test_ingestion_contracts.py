"""The contract functions on their own (no services): per-file checks, type conversions, the re-delivery
policy, the spec settings that drive them, and the source's time column."""

import dataclasses
import datetime as dt
import math

import pandas as pd
import polars as pl
import pytest

from mlplatform import contracts
from mlplatform.spec import SettingError, load_spec

from .helpers import car_loan

WINDOW = (dt.datetime(2018, 11, 1), dt.datetime(2018, 12, 1))


@pytest.fixture(scope="module")
def spec():
    return car_loan()


def rows(n=4, start_id=50000, **over) -> pl.DataFrame:
    base = {
        "id": list(range(start_id, start_id + n)),
        "timestamp": [dt.datetime(2018, 11, 5, 10) + dt.timedelta(minutes=i) for i in range(n)],
        "car_value": [12000.0 + i for i in range(n)],
        "salary_range": ["20K - 40K €"] * n,
        "debt_to_income_ratio": [0.3] * n,
        "loan_length": [24.0] * n,
        "repaid_loan_on_prev_car": [True] * n,
        "size_of_downpayment": ["10%"] * n,
        "driver_tenure": [3.0] * n,
    }
    base.update(over)
    return pl.DataFrame(base)


def with_source(df, name="a.parquet"):
    return df.with_columns(pl.lit(name).alias(contracts.SOURCE_FILE))


# --- reading and conforming a file -------------------------------------------------------------------------------

def test_a_truncated_csv_is_rejected_not_padded_with_nulls(tmp_path):
    path = tmp_path / "b.csv"
    rows().write_csv(path)
    data = path.read_bytes()
    path.write_bytes(data[: data.rindex(b",") - 2])  # cut inside the last row
    with pytest.raises(contracts.FileRejected, match=r"b\.csv: CSV is truncated: its last row is cut off"):
        contracts.read_landing_file(path)


def test_an_empty_file_and_a_wrong_extension_are_rejected_by_name(tmp_path):
    (tmp_path / "e.parquet").write_bytes(b"")
    with pytest.raises(contracts.FileRejected, match=r"e\.parquet: is an empty file \(0 bytes\)") as exc:
        contracts.read_landing_file(tmp_path / "e.parquet")
    assert exc.value.check == "empty"
    (tmp_path / "w.txt").write_text("id\n1\n")
    with pytest.raises(contracts.FileRejected, match=r"unsupported file format '\.txt'"):
        contracts.read_landing_file(tmp_path / "w.txt")


def test_nested_columns_are_rejected_instead_of_crashing(spec):
    df = rows().with_columns(pl.col("car_value").map_elements(lambda v: [v, v], return_dtype=pl.List(pl.Float64)))
    with pytest.raises(contracts.FileRejected, match=r"column 'car_value' has the nested type List") as exc:
        contracts.conform(df, spec, "n.parquet")
    assert exc.value.column == "car_value"
    df = rows().with_columns(pl.struct(pl.col("loan_length")).alias("loan_length"))
    with pytest.raises(contracts.FileRejected, match=r"'loan_length' has the nested type Struct"):
        contracts.conform(df, spec, "s.parquet")


def test_float_ids_that_are_not_whole_numbers_are_rejected_not_truncated(spec):
    df = rows().with_columns(pl.col("id").cast(pl.Float64) + pl.Series([0.0, 0.5, 0.0, 0.0]))
    with pytest.raises(contracts.FileRejected, match=r"f\.parquet: column 'id' holds 1 id\(s\) that are not whole "
                                                     r"numbers, e\.g\. \[50001\.5\]"):
        contracts.conform(df, spec, "f.parquet")
    whole = contracts.conform(rows().with_columns(pl.col("id").cast(pl.Float64)), spec, "w.parquet")
    assert whole["id"].to_list() == [50000, 50001, 50002, 50003]


def test_tz_aware_times_are_converted_to_the_spec_timezone_not_stripped(spec):
    aware = rows().with_columns(pl.col("timestamp").dt.replace_time_zone("Asia/Karachi"))  # UTC+5
    out = contracts.conform(aware, spec, "tz.parquet")
    assert out["timestamp"][0] == dt.datetime(2018, 11, 5, 5, 0)  # 10:00 +05:00 is 05:00 UTC
    text = rows(2).with_columns(pl.Series("timestamp", ["2018-11-01T01:00:00+05:00", "2018-11-02 08:00:00Z"]))
    out = contracts.conform(text, spec, "tz.csv")
    assert out["timestamp"].to_list() == [dt.datetime(2018, 10, 31, 20, 0), dt.datetime(2018, 11, 2, 8, 0)]
    paris = dataclasses.replace(spec, timezone="Europe/Paris")
    assert contracts.conform(aware, paris, "tz.parquet")["timestamp"][0] == dt.datetime(2018, 11, 5, 6, 0)


def test_mixed_naive_and_offset_times_are_rejected(spec):
    df = rows(2).with_columns(pl.Series("timestamp", ["2018-11-01T01:00:00+05:00", "2018-11-02 08:00:00"]))
    with pytest.raises(contracts.FileRejected, match="mixes timestamps with and without a UTC offset"):
        contracts.conform(df, spec, "m.csv")


def test_an_integer_time_column_names_the_column_and_the_range_found(spec):
    df = rows(3).with_columns(pl.Series("timestamp", [2017, 2018, 2019]))
    with pytest.raises(contracts.FileRejected, match=r"y\.parquet: time column 'timestamp' holds numbers "
                                                     r"\(type Int64, range found 2017\.\.2019\)"):
        contracts.conform(df, spec, "y.parquet")


def test_wrong_types_name_the_column_and_examples(spec):
    df = rows().with_columns(pl.Series("car_value", ["1", "lots", "2", "3"]))
    with pytest.raises(contracts.FileRejected, match=r"column 'car_value' should be Float64 but 1 value\(s\) are "
                                                     r"not, e\.g\. \['lots'\]"):
        contracts.conform(df, spec, "t.csv")
    df = rows().with_columns(pl.Series("repaid_loan_on_prev_car", ["true", "maybe", "0", "1"]))
    with pytest.raises(contracts.FileRejected, match=r"'repaid_loan_on_prev_car' should be Boolean .*'maybe'"):
        contracts.conform(df, spec, "b.csv")


def test_categorical_and_enum_columns_are_accepted_as_text_for_categorical_features(spec, tmp_path):
    """A pandas `category` column (polars Categorical once read) or a polars Enum is a categorical feature
    written as a category type: its values are kept as text, not rejected as the wrong type."""
    values = ["20K - 40K €", "40K - 60K €", None, "20K - 40K €"]
    pdf = rows().to_pandas()
    pdf["salary_range"] = pd.Series(values, dtype="category")
    path = tmp_path / "c.parquet"
    pdf.to_parquet(path)
    read = contracts.read_landing_file(path)
    assert isinstance(read.schema["salary_range"], pl.Categorical)
    out = contracts.conform(read, spec, "c.parquet")
    assert out.schema["salary_range"] == pl.String and out["salary_range"].to_list() == values
    enum = rows().with_columns(pl.Series("size_of_downpayment", ["10%", "20%", "10%", "30%"],
                                         dtype=pl.Enum(["10%", "20%", "30%"])))
    out = contracts.conform(enum, spec, "e.parquet")
    assert out.schema["size_of_downpayment"] == pl.String
    assert out["size_of_downpayment"].to_list() == ["10%", "20%", "10%", "30%"]


# --- row checks ----------------------------------------------------------------------------------------------------

def test_infinite_and_nan_values_are_out_of_range(spec):
    df = with_source(contracts.conform(rows().with_columns(
        pl.Series("driver_tenure", [1.0, math.inf, math.nan, 2.0])), spec, "a.parquet"))
    found = [v for v in contracts.check_records(df, spec, WINDOW) if v.check == "range"]
    assert found and "2 value(s) of 'driver_tenure' are NaN or infinite in ['a.parquet']" in found[0].message


def test_unseen_categories_warn_below_the_limit_and_block_above_it(spec):
    n = 100
    few = with_source(contracts.conform(rows(n, salary_range=["1M+ €"] * 3 + ["20K - 40K €"] * (n - 3)),
                                        spec, "a.parquet"))
    (v,) = [v for v in contracts.check_records(few, spec, WINDOW) if "salary_range" == v.column]
    assert not v.blocking and "3 row(s) (3.0%)" in v.message and "within the limit 5%" in v.message
    many = with_source(contracts.conform(rows(n, salary_range=["1M+ €"] * 30 + ["20K - 40K €"] * (n - 30)),
                                         spec, "a.parquet"))
    (v,) = [v for v in contracts.check_records(many, spec, WINDOW) if "salary_range" == v.column]
    assert v.blocking and v.check == "unseen_categories" and "above the limit 5%" in v.message
    everything = with_source(contracts.conform(rows(n, salary_range=["1M+ €"] * n), spec, "a.parquet"))
    lax = dataclasses.replace(spec, max_unseen_category_fraction=0.99)
    (v,) = [v for v in contracts.check_records(everything, lax, WINDOW) if "salary_range" == v.column]
    assert v.blocking, "a batch whose values are 100% unseen always blocks"


def test_times_outside_the_partition_name_the_range_found(spec):
    df = with_source(contracts.conform(rows(2, timestamp=[dt.datetime(2019, 3, 1), dt.datetime(2019, 4, 2)]),
                                       spec, "a.parquet"))
    (v,) = [v for v in contracts.check_records(df, spec, WINDOW) if v.check == "time_window"]
    assert "outside the partition [2018-11-01, 2018-12-01)" in v.message
    assert "range found 2019-03-01 00:00:00..2019-04-02 00:00:00" in v.message


def test_ids_published_in_another_batch_are_rejected(spec):
    df = with_source(contracts.conform(rows(3), spec, "a.parquet"))
    found = contracts.check_ids_elsewhere(df, spec, {"2018-10-01": pl.Series([1, 50001]),
                                                     "reference": pl.Series([7, 8])})
    assert len(found) == 1 and found[0].check == "ids_elsewhere" and found[0].rows == 1
    assert "already published in batch 2018-10-01, e.g. [50001]" in found[0].message
    assert contracts.check_ids_elsewhere(df, spec, {"reference": pl.Series([7, 8])}) == []


def test_label_contract(spec):
    df = with_source(pl.DataFrame({"id": [1, 2, 3, 3, 9], "repaid": [1.0, 2.0, float("nan"), 0.0, 1.0]}), "l.parquet")
    found = {v.check: v for v in contracts.check_labels(df, spec, pl.Series([1, 2, 3]), "2018-11-01")}
    assert "1 label(s) of 'repaid' are not 0/1" in found["range"].message
    assert "no 'repaid' (null or NaN)" in found["nulls"].message
    assert found["duplicates"].examples == [3]
    assert "1 label(s) are for ids not in the records of batch 2018-11-01" in found["unknown_id"].message
    price = load_spec("car_price")
    reg = with_source(pl.DataFrame({"id": [1, 2], "y_true": [1.0, float("inf")]}), "r.parquet")
    (v,) = contracts.check_labels(reg, price, pl.Series([1, 2]))
    assert v.check == "range" and "1 label(s) of 'y_true' are infinite" in v.message


def test_float_label_ids_are_not_truncated(spec):
    df = pl.DataFrame({"id": [1.0, 2.5], "repaid": [1.0, 0.0]})
    with pytest.raises(contracts.FileRejected, match="not whole numbers"):
        contracts.conform_labels(df, spec, "l.parquet")


# --- across files: the re-delivery policy ------------------------------------------------------------------------

def _schema(spec):
    return {**contracts.expected_dtypes(spec), contracts.SOURCE_FILE: pl.String}


def _delivery(spec, name, df):
    return contracts.Delivery(name, f"sha-{name}", with_source(contracts.conform(df, spec, name), name))


def test_a_later_file_repeating_ids_is_rejected_and_the_earlier_one_kept(spec):
    a = _delivery(spec, "a.parquet", rows(4))
    b = _delivery(spec, "b.parquet", rows(4, start_id=50002))  # overlaps 50002, 50003
    m = contracts.merge_deliveries(None, [a, b], {}, spec, _schema(spec), "2018-11-01")
    assert m.accepted == ["a.parquet"] and [n for n, _ in m.rejected] == ["b.parquet"]
    reason = m.rejected[0][1].message
    assert "b.parquet: 2 'id' value(s) are already in batch 2018-11-01 from ['a.parquet']" in reason
    assert "landing.redelivery: reject" in reason
    assert m.frame["id"].to_list() == [50000, 50001, 50002, 50003]
    assert m.ledger == {"a.parquet": "sha-a.parquet"}


def test_rows_already_in_the_batch_are_never_dropped(spec):
    previous = with_source(contracts.conform(rows(3), spec, "a.parquet"), "a.parquet")
    m = contracts.merge_deliveries(previous, [], {"a.parquet": "x"}, spec, _schema(spec))
    assert m.frame.equals(previous.select(_schema(spec).keys()))
    c = _delivery(spec, "c.parquet", rows(2, start_id=60000))
    m = contracts.merge_deliveries(previous, [c], {"a.parquet": "x"}, spec, _schema(spec))
    assert sorted(m.frame["id"].to_list()) == [50000, 50001, 50002, 60000, 60001]


def test_replace_by_id_lets_a_later_file_replace_those_rows(spec):
    replace = dataclasses.replace(spec, redelivery="replace_by_id")
    previous = with_source(contracts.conform(rows(3), spec, "a.parquet"), "a.parquet")
    fix = _delivery(spec, "fix.parquet", rows(2, start_id=50001, car_value=[1.0, 2.0]))
    m = contracts.merge_deliveries(previous, [fix], {"a.parquet": None}, replace, _schema(spec))
    assert m.accepted == ["fix.parquet"] and m.replaced == {"fix.parquet": 2}
    out = m.frame.sort("id")
    assert out["id"].to_list() == [50000, 50001, 50002]
    assert out["car_value"].to_list() == [12000.0, 1.0, 2.0]
    assert out[contracts.SOURCE_FILE].to_list() == ["a.parquet", "fix.parquet", "fix.parquet"]


def test_a_same_name_file_with_new_content_is_a_redelivery(spec):
    assert contracts.already_ingested("a.parquet", "sha1", {"a.parquet": "sha1"})
    assert contracts.already_ingested("a.parquet", "sha2", {"a.parquet": None})
    assert not contracts.already_ingested("a.parquet", "sha2", {"a.parquet": "sha1"})
    again = _delivery(spec, "a.parquet", rows(2, start_id=70000))
    m = contracts.merge_deliveries(None, [again], {"a.parquet": "sha1"}, spec, _schema(spec), "2018-11-01")
    assert m.accepted == [] and "already ingested into batch 2018-11-01 with other content" in m.rejected[0][1].message


# --- the spec settings ---------------------------------------------------------------------------------------------

def _spec_with(tmp_path, extra: str):
    """car_loan's spec with one block replaced (a repeated top-level key: YAML keeps the last one)."""
    path = tmp_path / "s.yaml"
    path.write_text(open(load_spec("car_loan").path).read() + "\n" + extra + "\n")
    return path


def test_the_landing_settings_are_validated_by_name(tmp_path):
    spec = load_spec("car_loan")
    assert (spec.timezone, spec.max_unseen_category_fraction, spec.redelivery) == ("UTC", 0.05, "reject")
    with pytest.raises(SettingError, match=r"setting 'landing.redelivery' must be one of"):
        load_spec(_spec_with(tmp_path, "landing: {redelivery: overwrite}"))
    with pytest.raises(SettingError, match=r"setting 'contracts.timezone' must be an IANA timezone"):
        load_spec(_spec_with(tmp_path, "contracts: {timezone: Mars/Olympus}"))
    with pytest.raises(SettingError, match=r"'contracts.max_unseen_category_fraction' must be a number in \[0, 1\)"):
        load_spec(_spec_with(tmp_path, "contracts: {max_unseen_category_fraction: 5}"))


def test_a_source_time_column_of_integers_or_outside_every_batch_is_an_error(spec):
    from mlplatform.sources import check_time_column

    years = pd.DataFrame({"timestamp": [2017, 2018, 2019]})
    with pytest.raises(SettingError, match=r"'time_column' 'timestamp' holds numbers .*range found 2017\.\.2019"):
        check_time_column(spec, years, "production")
    late = pd.DataFrame({"timestamp": ["2025-01-01 00:00:00", "2025-02-01 00:00:00"]})
    with pytest.raises(SettingError, match=r"no production value of time_column 'timestamp' falls inside the batch "
                                           r"periods \[2018-10-01, 2019-09-01\).*range found 2025-01-01"):
        check_time_column(spec, late, "production")
    check_time_column(spec, late, "reference")  # the history may lie anywhere
    check_time_column(spec, pd.DataFrame({"timestamp": ["2018-11-02 10:00:00"]}), "production")


def test_a_csv_row_with_a_missing_field_in_the_middle_is_ragged(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("id,timestamp\n1,2018-11-01\n2\n3,2018-11-02\n")
    with pytest.raises(contracts.FileRejected, match=r"r\.csv: CSV is ragged \(line 3 has 1 field\(s\), the header has 2\)"):
        contracts.read_landing_file(path)
