"""Sources without code: reference / production / labels read from Parquet or CSV files and globs, with clear
errors naming the setting, pattern, file and column; the time column stored as datetime, date, ISO text, year or
epoch seconds/milliseconds, read into naive datetimes in the spec's timezone, by the sources and by the landing
contract alike."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import time

import polars as pl
import pytest

from mlplatform import contracts
from mlplatform.batches import Landing
from mlplatform.sources import TIME_TYPES, TimeValuesError, format_times, load_source, parse_times
from mlplatform.spec import SettingError
from tooling.simulator import Simulator

from .file_specs import write_spec


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLP_CACHE_DIR", str(tmp_path / "cache"))


def rows(first_id: int, n: int, start: dt.datetime, step: dt.timedelta, target: bool = True) -> pl.DataFrame:
    """Valid car-price-like rows: ids first_id.., event times start, start+step, ..."""
    df = pl.DataFrame({
        "id": list(range(first_id, first_id + n)),
        "car_age": [float(i % 20) for i in range(n)],
        "km_driven": [1000.0 * (i % 90) for i in range(n)],
        "price_new": [20000.0 + 10 * i for i in range(n)],
        "accident_count": [float(i % 3) for i in range(n)],
        "door_count": [float(3 + i % 3) for i in range(n)],
        "fuel": [["diesel", "electric", "gas"][i % 3] for i in range(n)],
        "transmission": [["automatic", "manual"][i % 2] for i in range(n)],
        "timestamp": [start + i * step for i in range(n)],
    })
    return df.with_columns((pl.col("price_new") / 10).alias("y_true")) if target else df


REF = rows(0, 40, dt.datetime(2017, 2, 10), dt.timedelta(hours=1))
PROD = rows(1000, 60, dt.datetime(2017, 2, 17), dt.timedelta(hours=1))  # 2017-02-17 00:00 .. 02-19 11:00


def write(df: pl.DataFrame, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_csv(path) if path.suffix == ".csv" else df.write_parquet(path)
    return path


# --- readers ---------------------------------------------------------------------------------------

def test_reference_and_production_are_read_from_csv_and_parquet_without_code(tmp_path):
    write(REF, tmp_path / "data" / "reference.csv")
    write(PROD, tmp_path / "data" / "production.parquet")
    spec = write_spec(tmp_path, {"reference": "data/reference.csv", "production": "data/production.parquet"})
    assert spec.loader == ""
    reference, production, labels = load_source(spec)
    assert reference["id"].tolist() == REF["id"].to_list()
    assert reference["y_true"].tolist() == REF["y_true"].to_list()
    assert "y_true" not in production.columns, "production records carry no target: it goes to the labels"
    assert production["id"].tolist() == PROD["id"].to_list()
    # labels come from the production files' target column when no labels file is given
    assert labels.columns.tolist() == ["id", "y_true"]
    assert labels["y_true"].tolist() == PROD["y_true"].to_list()


def test_a_glob_reads_its_files_in_sorted_order_and_mixes_csv_and_parquet(tmp_path):
    write(PROD.slice(40, 20), tmp_path / "prod" / "c.parquet")
    write(PROD.slice(0, 20), tmp_path / "prod" / "a.csv")
    write(PROD.slice(20, 20), tmp_path / "prod" / "b.parquet")
    write(REF, tmp_path / "ref" / "2017" / "part-1.parquet")
    spec = write_spec(tmp_path, {"reference": "ref/**/*.parquet", "production": "prod/*"})
    reference, production, _ = load_source(spec)
    assert production["id"].tolist() == PROD["id"].to_list()
    assert len(reference) == REF.height
    # a folder is read as its Parquet and CSV files
    _, production2, _ = load_source(dataclasses.replace(spec, source_production="prod"))
    assert production2["id"].tolist() == PROD["id"].to_list()


def test_an_absolute_path_is_read_from_where_it_points(tmp_path):
    ref = write(REF, tmp_path / "elsewhere" / "reference.parquet")
    (tmp_path / "specs").mkdir()
    spec = write_spec(tmp_path / "specs", {"reference": str(ref)})
    assert len(load_source(spec)[0]) == REF.height


def test_a_pattern_that_matches_nothing_names_the_setting_and_the_pattern(tmp_path):
    write(REF, tmp_path / "reference.csv")
    spec = write_spec(tmp_path, {"reference": "reference.csv", "production": "incoming/*.parquet"})
    with pytest.raises(SettingError) as err:
        load_source(spec)
    assert "source.production" in str(err.value) and "incoming/*.parquet" in str(err.value)
    assert "matches no file" in str(err.value)


def test_an_unreadable_file_names_the_setting_and_the_file(tmp_path):
    write(REF, tmp_path / "ref" / "a.parquet")
    (tmp_path / "ref" / "b.parquet").write_bytes(b"not parquet at all")
    spec = write_spec(tmp_path, {"reference": "ref/*.parquet"})
    with pytest.raises(SettingError) as err:
        load_source(spec)
    assert "source.reference" in str(err.value) and "b.parquet" in str(err.value)
    assert "cannot be read as parquet" in str(err.value)


def test_an_unknown_extension_asks_for_the_format_setting(tmp_path):
    write(REF, tmp_path / "ref.csv").rename(tmp_path / "ref.txt")
    spec = write_spec(tmp_path, {"reference": "ref.txt"})
    with pytest.raises(SettingError, match="source.format"):
        load_source(spec)
    reference, _, _ = load_source(dataclasses.replace(spec, source_format="csv"))
    assert len(reference) == REF.height


def test_files_missing_a_column_name_the_file_and_the_column(tmp_path):
    write(PROD.slice(0, 30), tmp_path / "prod" / "a.parquet")
    write(PROD.slice(30, 30).drop("door_count"), tmp_path / "prod" / "b.parquet")
    write(REF, tmp_path / "ref.parquet")
    spec = write_spec(tmp_path, {"reference": "ref.parquet", "production": "prod/*.parquet"})
    with pytest.raises(SettingError) as err:
        load_source(spec)
    msg = str(err.value)
    assert "b.parquet" in msg and "'door_count'" in msg and "source.production" in msg


def test_files_whose_column_types_disagree_name_the_file_and_the_column(tmp_path):
    write(PROD.slice(0, 30), tmp_path / "prod" / "a.parquet")
    write(PROD.slice(30, 30).with_columns(pl.col("km_driven").cast(pl.String) + " km"),
          tmp_path / "prod" / "b.parquet")
    write(REF, tmp_path / "ref.parquet")
    spec = write_spec(tmp_path, {"reference": "ref.parquet", "production": "prod/*.parquet"})
    with pytest.raises(SettingError) as err:
        load_source(spec)
    msg = str(err.value)
    assert "'km_driven'" in msg and "b.parquet" in msg and "a.parquet" in msg


def test_whole_and_decimal_numbers_mix_across_files(tmp_path):
    write(PROD.slice(0, 30).with_columns(pl.col("car_age").cast(pl.Int64)), tmp_path / "prod" / "a.csv")
    write(PROD.slice(30, 30), tmp_path / "prod" / "b.parquet")
    write(REF, tmp_path / "ref.parquet")
    spec = write_spec(tmp_path, {"reference": "ref.parquet", "production": "prod/*"})
    _, production, _ = load_source(spec)
    assert production["car_age"].tolist() == PROD["car_age"].to_list()


def test_reference_files_without_the_target_are_refused(tmp_path):
    write(REF.drop("y_true"), tmp_path / "ref.csv")
    spec = write_spec(tmp_path, {"reference": "ref.csv"})
    with pytest.raises(SettingError, match="no target column 'y_true'"):
        load_source(spec)


def test_a_labels_file_gives_the_production_labels(tmp_path):
    write(REF, tmp_path / "ref.csv")
    write(PROD.drop("y_true"), tmp_path / "prod.csv")
    write(PROD.select("id", (pl.col("y_true") + 1).alias("y_true"), pl.lit("x").alias("note")),
          tmp_path / "labels.csv")
    spec = write_spec(tmp_path, {"reference": "ref.csv", "production": "prod.csv", "labels": "labels.csv"})
    _, production, labels = load_source(spec)
    assert labels.columns.tolist() == ["id", "y_true"]
    assert labels["y_true"].tolist() == [y + 1 for y in PROD["y_true"].to_list()]
    write(PROD.select("id"), tmp_path / "labels.csv")
    with pytest.raises(SettingError, match="label files.*no column 'y_true'"):
        load_source(spec)


def test_production_without_target_or_labels_file_has_no_labels_and_the_simulator_lands_none(tmp_path):
    write(REF, tmp_path / "ref.csv")
    write(PROD.drop("y_true"), tmp_path / "prod.parquet")
    spec = write_spec(tmp_path, {"reference": "ref.csv", "production": "prod.parquet"})
    _, production, labels = load_source(spec)
    assert len(production) == PROD.height and len(labels) == 0
    landing = Landing(tmp_path / "landing")
    released = Simulator(spec, landing).release(3)
    assert released.records == ["2017-02-17", "2017-02-18", "2017-02-19"]
    assert not list((tmp_path / "landing").glob("labels/*/*.parquet")), "empty label files are not landed"


def test_without_production_files_the_data_set_has_no_replay(tmp_path):
    write(REF, tmp_path / "ref.csv")
    spec = write_spec(tmp_path, {"reference": "ref.csv"})
    reference, production, labels = load_source(spec)
    assert len(reference) == REF.height and len(production) == 0 and len(labels) == 0
    with pytest.raises(SettingError) as err:
        Simulator(spec, Landing(tmp_path / "landing")).release(1)
    assert "source.production" in str(err.value) and "nothing to release" in str(err.value)


def test_a_changed_file_is_read_again_and_an_unchanged_one_comes_from_the_cache(tmp_path):
    ref = write(REF, tmp_path / "ref.csv")
    spec = write_spec(tmp_path, {"reference": "ref.csv"})
    first_id = REF["id"][0]
    assert load_source(spec)[0]["id"].iloc[0] == first_id
    cached = list((tmp_path / "cache" / "sources" / "files").glob("files_demo-reference-*.parquet"))
    assert len(cached) == 1
    # same path, size and mtime: served from the cache (a digit changed in place, the mtime put back)
    st = ref.stat()
    text = ref.read_text()
    header, row, rest = text.split("\n", 2)
    assert row.startswith(f"{first_id},")
    ref.write_text(f"{header}\n9{row[1:]}\n{rest}")
    os.utime(ref, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ref.stat().st_size == st.st_size
    assert load_source(spec)[0]["id"].iloc[0] == first_id
    # a changed mtime: read again, and the old entry replaced
    os.utime(ref, (time.time() + 10,) * 2)
    assert load_source(spec)[0]["id"].iloc[0] == 9
    now = list((tmp_path / "cache" / "sources" / "files").glob("files_demo-reference-*.parquet"))
    assert len(now) == 1 and now != cached


# --- time column types -----------------------------------------------------------------------------

def stored(df: pl.DataFrame, time_type: str, tz: str = "UTC") -> pl.DataFrame:
    return df.with_columns(format_times(df["timestamp"], time_type, tz).alias("timestamp"))


def expected_times(df: pl.DataFrame, time_type: str) -> list[dt.datetime]:
    t = df["timestamp"]
    if time_type == "date":
        t = t.dt.truncate("1d")
    elif time_type == "year":
        t = t.dt.truncate("1y")
    elif time_type == "epoch_s":
        t = t.dt.truncate("1s")
    return t.to_list()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("time_type", TIME_TYPES)
def test_each_time_type_is_read_into_naive_datetimes(tmp_path, time_type, fmt):
    ref, prod = REF, PROD
    window = {}
    if time_type == "year":  # one row a year: production years fall into yearly batches
        ref = rows(0, 5, dt.datetime(2010, 1, 1), dt.timedelta(days=366))
        prod = rows(1000, 3, dt.datetime(2017, 1, 1), dt.timedelta(days=366))
        window = {"cadence": "yearly", "start": "2017-01-01", "end": "2020-01-01"}
    write(stored(ref, time_type), tmp_path / f"ref.{fmt}")
    write(stored(prod, time_type), tmp_path / f"prod.{fmt}")
    spec = write_spec(tmp_path, {"reference": f"ref.{fmt}", "production": f"prod.{fmt}"}, time_type, **window)
    reference, production, _ = load_source(spec)
    for frame, want in ((reference, ref), (production, prod)):
        got = pl.from_pandas(frame)["timestamp"]
        assert got.dtype == pl.Datetime("us", None)
        assert got.to_list() == expected_times(want, time_type)


def test_epoch_times_are_converted_to_the_spec_timezone(tmp_path):
    write(stored(REF, "epoch_ms"), tmp_path / "ref.parquet")
    spec = write_spec(tmp_path, {"reference": "ref.parquet"}, "epoch_ms")
    spec = dataclasses.replace(spec, timezone="Europe/Paris")
    got = load_source(spec)[0]["timestamp"].tolist()
    assert got[0] == dt.datetime(2017, 2, 10, 1, 0)  # midnight UTC is 01:00 in Paris in February


@pytest.mark.parametrize("time_type, bad", [("epoch_ms", "soon"), ("year", "2017.5"), ("date", "31/02/2017"),
                                            ("iso_string", "yesterday"), ("epoch_s", "1e400")])
def test_a_bad_time_value_names_the_column_the_type_and_the_value(tmp_path, time_type, bad):
    ref = stored(REF, time_type).with_columns(pl.col("timestamp").cast(pl.String))
    ref = ref.with_columns(pl.when(pl.col("id") == 7).then(pl.lit(bad)).otherwise(pl.col("timestamp"))
                           .alias("timestamp"))
    write(ref, tmp_path / "ref.parquet")
    spec = write_spec(tmp_path, {"reference": "ref.parquet"}, time_type)
    with pytest.raises(SettingError) as err:
        load_source(spec)
    msg = str(err.value)
    assert "'timestamp'" in msg and repr(time_type) in msg and bad in msg and "source.reference" in msg


def test_numbers_declared_as_datetimes_point_to_the_epoch_types(tmp_path):
    write(stored(REF, "epoch_s"), tmp_path / "ref.csv")
    spec = write_spec(tmp_path, {"reference": "ref.csv"})
    with pytest.raises(SettingError, match="epoch_s | epoch_ms"):
        load_source(spec)


def test_epoch_milliseconds_read_as_seconds_say_why_no_batch_matches(tmp_path):
    write(REF, tmp_path / "ref.parquet")
    write(stored(PROD, "epoch_s"), tmp_path / "prod.parquet")
    spec = write_spec(tmp_path, {"reference": "ref.parquet", "production": "prod.parquet"}, "epoch_ms")
    with pytest.raises(SettingError, match="read as type 'epoch_ms'.*1970-01"):
        load_source(spec)


def test_parse_times_reads_an_offset_and_refuses_a_mix():
    got = parse_times(pl.Series("t", ["2017-02-17T10:00:00+02:00", "2017-02-17T08:30:00Z"]), "iso_string")
    assert got.to_list() == [dt.datetime(2017, 2, 17, 8), dt.datetime(2017, 2, 17, 8, 30)]
    as_category = pl.Series("t", ["2017-02-17", "2017-02-18"], dtype=pl.Categorical)
    assert parse_times(as_category, "date").to_list() == [dt.datetime(2017, 2, 17), dt.datetime(2017, 2, 18)]
    with pytest.raises(TimeValuesError, match="mixes"):
        parse_times(pl.Series("t", ["2017-02-17T10:00:00+02:00", "2017-02-17T08:30:00"]), "iso_string")


# --- the landing contract reads the same types ---------------------------------------------------------

@pytest.mark.parametrize("time_type", TIME_TYPES)
def test_landed_files_in_the_declared_time_type_conform(tmp_path, time_type):
    write(REF, tmp_path / "ref.parquet")
    spec = write_spec(tmp_path, {"reference": "ref.parquet"}, time_type)
    batch = stored(PROD.drop("y_true"), time_type)
    for name in ("batch.csv", "batch.parquet"):
        path = write(batch, tmp_path / "landing" / name)
        out = contracts.conform(contracts.read_landing_file(path), spec, name)
        assert out["timestamp"].dtype == pl.Datetime("us")
        assert out["timestamp"].to_list() == expected_times(PROD, time_type)


@pytest.mark.parametrize("time_type", [t for t in TIME_TYPES if t != "datetime"])
def test_a_landed_file_with_a_bad_time_value_is_rejected_with_column_type_and_value(tmp_path, time_type):
    write(REF, tmp_path / "ref.parquet")
    spec = write_spec(tmp_path, {"reference": "ref.parquet"}, time_type)
    batch = stored(PROD.drop("y_true"), time_type).with_columns(pl.col("timestamp").cast(pl.String))
    batch = batch.with_columns(pl.when(pl.col("id") == 1003).then(pl.lit("later")).otherwise(pl.col("timestamp"))
                               .alias("timestamp"))
    with pytest.raises(contracts.FileRejected) as err:
        contracts.conform(batch, spec, "batch-7.csv")
    msg = str(err.value)
    assert "batch-7.csv" in msg and "'timestamp'" in msg and repr(time_type) in msg and "later" in msg
    assert err.value.column == "timestamp" and err.value.check == "types"


def test_the_simulator_lands_records_in_the_declared_time_type_and_they_conform(tmp_path):
    write(stored(REF, "epoch_ms"), tmp_path / "ref.csv")
    write(stored(PROD, "epoch_ms"), tmp_path / "prod.parquet")
    spec = write_spec(tmp_path, {"reference": "ref.csv", "production": "prod.parquet"}, "epoch_ms")
    landing = Landing(tmp_path / "landing")
    released = Simulator(spec, landing).release(2)
    assert released.records == ["2017-02-17", "2017-02-18"] and released.labels == released.records
    path = landing.records_dir("2017-02-18") / "batch-2017-02-18.parquet"
    landed = pl.read_parquet(path)
    assert landed["timestamp"].dtype == pl.Int64, "landed as the producer stores it: epoch milliseconds"
    out = contracts.conform(landed, spec, path.name)
    assert contracts.check_records(out, spec, (dt.datetime(2017, 2, 18), dt.datetime(2017, 2, 19))) == []
    assert out["timestamp"].min() == dt.datetime(2017, 2, 18)
    labels = pl.read_parquet(landing.labels_dir("2017-02-18") / "labels-2017-02-18.parquet")
    assert labels.height == 24 and labels.columns == ["id", "y_true"]


@pytest.mark.parametrize("cadence, time_type, first", [("hourly", "iso_string", ["2017-02-17-00:00",
                                                                                "2017-02-17-01:00"]),
                                                       ("yearly", "year", ["2017", "2018"])])
def test_the_simulator_replays_files_at_hourly_and_yearly_cadences(tmp_path, cadence, time_type, first):
    prod = PROD if cadence == "hourly" else rows(1000, 3, dt.datetime(2017, 1, 1), dt.timedelta(days=366))
    write(stored(REF, time_type), tmp_path / "ref.parquet")
    write(stored(prod, time_type), tmp_path / "prod.csv")
    end = "2017-02-18" if cadence == "hourly" else "2020-01-01"
    spec = write_spec(tmp_path, {"reference": "ref.parquet", "production": "prod.csv"}, time_type,
                      cadence=cadence, start="2017-01-01" if cadence == "yearly" else "2017-02-17", end=end)
    landing = Landing(tmp_path / "landing")
    released = Simulator(spec, landing).release(2)
    assert released.records == first
    landed = pl.read_parquet(landing.records_dir(first[1]) / f"batch-{first[1]}.parquet")
    out = contracts.conform(landed, spec, "batch")
    assert out.height == 1 and out["timestamp"][0] == dt.datetime.strptime(
        first[1], "%Y-%m-%d-%H:%M" if cadence == "hourly" else "%Y")
