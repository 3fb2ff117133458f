"""The bad-input catalogue, against the real lakeFS: each kind of bad landing file (records and labels) is
tried ALONE in its batch and BESIDE a good file of the same batch. In every case:
- main never holds a bad row: the batch on main is exactly the good rows expected (ids, source file, values);
- the bad file is quarantined, its reason naming the file and the column (or the format fault);
- beside a good file, the run succeeds with a WARN `files_quarantined`, and the good rows reach main when the
  run is published; alone (in a batch with nothing else), the run fails a blocking check naming the fault and
  main keeps its commit.
One lakeFS repository and one Dagster instance serve the whole module; each case has its own daily batch.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import dagster as dg
import polars as pl
import pytest

from assets.ingestion import build_ingestion
from mlplatform.batches import window
from resources.io import load_asset
from resources.naming import ns
from resources.lakefs import LakeFSError, LakeFSResource, run_branch
from resources.publish import publish_run
from mlplatform.spec import DatasetSpec, load_spec

from .helpers import resources_for

pytestmark = pytest.mark.services


# --- the world: one repo, one instance, a daily variant of car_loan (enough batches for every case) -------------

@dataclass
class World:
    spec: DatasetSpec
    lakefs: LakeFSResource
    instance: dg.DagsterInstance
    state: Path
    production: pl.DataFrame
    days: list[str]
    base: str = ""                       # a batch published first: its ids are "already published elsewhere"
    base_ids: list[int] = field(default_factory=list)

    @property
    def landing(self) -> Path:
        return self.state / "landing" / self.spec.name

    def next_day(self) -> str:
        return self.days.pop(0)

    def rows(self, partition: str) -> pl.DataFrame:
        start, end = window(self.spec, partition)
        t = self.spec.time_column
        return self.production.filter((pl.col(t) >= start) & (pl.col(t) < end)).select(self.spec.raw_columns)

    def materialize(self, asset: str, partition: str):
        return dg.materialize(build_ingestion(self.spec), selection=[ns(self.spec).key(asset)], partition_key=partition,
                              instance=self.instance, resources=resources_for(self.lakefs, self.state, self.spec),
                              raise_on_error=False)

    def land(self, kind: str, partition: str, name: str, content: bytes, age_s: float) -> Path:
        """Write a landing file as a complete, settled file that arrived `age_s` seconds ago."""
        d = self.landing / kind / partition
        d.mkdir(parents=True, exist_ok=True)
        path = d / name
        path.write_bytes(content)
        stamp = time.time() - age_s
        os.utime(path, (stamp, stamp))
        return path

    def publish(self, kind: str, partition: str, files: list[tuple[str, bytes]]) -> None:
        """Land good files and ingest them in an earlier run, published to main."""
        for i, (name, content) in enumerate(files):
            self.land(kind, partition, name, content, age_s=600 - i)
        result = self.materialize("raw_records" if kind == "records" else "raw_labels", partition)
        assert result.success, failures(result)
        assert publish_run(self.instance, self.lakefs, result.run_id).status == "published"


def make_world(lakefs_env, tmp_path_factory, spec: DatasetSpec) -> tuple[World, pytest.MonkeyPatch]:
    mp = pytest.MonkeyPatch()
    for k, v in lakefs_env.items():
        mp.setenv(k, v)
    repo = f"t-{uuid.uuid4().hex[:10]}"
    mp.setenv("LAKEFS_REPOSITORY", repo)
    state = tmp_path_factory.mktemp(f"bad-inputs-{spec.name}")
    mp.setenv("MLP_STATE_DIR", str(state))
    lakefs = LakeFSResource(endpoint=lakefs_env["LAKEFS_ENDPOINT"], access_key_id=lakefs_env["LAKEFS_ACCESS_KEY_ID"],
                            secret_access_key=lakefs_env["LAKEFS_SECRET_ACCESS_KEY"], repository=repo)
    _, production, _ = spec.load_source()
    prod = pl.from_pandas(production)
    t = spec.time_column
    prod = prod.with_columns(pl.col(t).str.to_datetime(time_unit="us")) if prod.schema[t] == pl.String else prod
    from mlplatform.batches import partition_keys

    counts = prod.group_by(pl.col(t).dt.date().alias("d")).len()
    full = {d.strftime("%Y-%m-%d") for d, n in counts.iter_rows() if n >= 60}
    days = [k for k in partition_keys(spec) if k in full]
    return World(spec, lakefs, None, state, prod, days), mp  # type: ignore[arg-type]


def fast_dir():
    """The instance's SQLite files on tmpfs when there is one: a real Dagster instance, without an fsync
    per event (three times faster on a busy disk)."""
    shm = Path("/dev/shm")
    return tempfile.TemporaryDirectory(prefix="mlp-bad-inputs-", dir=shm if shm.is_dir() else None)


def consolidated(home: str) -> dict:
    """One SQLite event log for all runs (Dagster's consolidated storage) instead of a new database per run."""
    return {"event_log_storage": {"module": "dagster._core.storage.event_log",
                                  "class": "ConsolidatedSqliteEventLogStorage",
                                  "config": {"base_dir": str(Path(home) / "history")}}}


@pytest.fixture(scope="module")
def world(lakefs_env, tmp_path_factory):
    text = Path(load_spec("car_loan").path).read_text().replace("cadence: monthly", "cadence: daily")
    path = tmp_path_factory.mktemp("spec") / "car_loan_daily.yaml"
    path.write_text(text)
    spec = load_spec(path)
    w, mp = make_world(lakefs_env, tmp_path_factory, spec)
    with fast_dir() as home, dg.instance_for_test(temp_dir=home, overrides=consolidated(home)) as instance:
        w.instance = instance
        w.base = w.next_day()
        base = w.rows(w.base)
        w.base_ids = base[spec.id_column].to_list()
        w.publish("records", w.base, [("base.parquet", parquet(base))])
        yield w
    mp.undo()


@pytest.fixture(scope="module")
def price_world(lakefs_env, tmp_path_factory):
    spec = load_spec("car_price")  # regression, daily already
    w, mp = make_world(lakefs_env, tmp_path_factory, spec)
    with fast_dir() as home, dg.instance_for_test(temp_dir=home, overrides=consolidated(home)) as instance:
        w.instance = instance
        yield w
    mp.undo()


# --- file builders -----------------------------------------------------------------------------------------------

def parquet(df: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.write_parquet(buf)
    return buf.getvalue()


def csv(df: pl.DataFrame) -> bytes:
    return df.write_csv().encode()


def first_rows(n: int, expr: pl.Expr, otherwise: str) -> pl.Expr:
    return pl.when(pl.int_range(pl.len()) < n).then(expr).otherwise(pl.col(otherwise)).alias(otherwise)


def failures(result) -> dict[str, str]:
    return {e.check_name: e.description for e in result.get_asset_check_evaluations() if not e.passed}


@dataclass
class Ctx:
    """What a case builds from: the batch, its good file (a.parquet, first half of the day's rows),
    the rows the bad file is made from (second half), and the world."""

    w: World
    partition: str
    good: pl.DataFrame
    rest: pl.DataFrame
    beside: bool

    @property
    def start(self) -> dt.datetime:
        return window(self.w.spec, self.partition)[0]


@dataclass
class Case:
    name: str                                   # the bad file's name
    make: Callable[[Ctx], bytes]                # its content
    reason: str                                 # text its quarantine reason (and, alone, the failed check) names
    # Files published in an earlier run of the same batch, before the bad file lands: (name, content, main rows).
    setup: Callable[[Ctx], list[tuple[str, bytes, pl.DataFrame]]] | None = None


def ts(value: dt.datetime) -> pl.Expr:
    return pl.lit(value).cast(pl.Datetime("us"))


RECORD_CASES: dict[str, Case] = {
    "corrupt_parquet": Case("b.parquet", lambda c: b"PAR1\x00\x01garbage-not-parquet", "b.parquet: cannot be read as parquet"),
    "truncated_parquet": Case("b.parquet", lambda c: parquet(c.rest)[: len(parquet(c.rest)) // 2],
                              "b.parquet: cannot be read as parquet"),
    "truncated_csv": Case("b.csv", lambda c: csv(c.rest)[: csv(c.rest).rindex(b",") - 3],
                          "b.csv: CSV is truncated: its last row is cut off"),
    "wrong_extension": Case("b.json", lambda c: c.rest.write_json().encode(), "b.json: unsupported file format '.json'"),
    "parquet_named_csv": Case("b.csv", lambda c: parquet(c.rest), "b.csv: is not UTF-8 text"),
    "empty_file": Case("b.parquet", lambda c: b"", "b.parquet: is an empty file (0 bytes)"),
    "header_only": Case("b.csv", lambda c: csv(c.rest.head(0)), "b.csv: has no rows"),
    "missing_column": Case("b.parquet", lambda c: parquet(c.rest.drop("car_value")),
                           "b.parquet: schema does not match the contract of car_loan records: missing column(s) ['car_value']"),
    "extra_column": Case("b.parquet", lambda c: parquet(c.rest.with_columns(pl.lit(1).alias("surprise"))),
                         "unexpected column(s) ['surprise']"),
    "renamed_column": Case("b.parquet", lambda c: parquet(c.rest.rename({"loan_length": "loan_term"})),
                           "missing column(s) ['loan_length']; unexpected column(s) ['loan_term']"),
    "wrong_type": Case("b.parquet", lambda c: parquet(c.rest.with_columns(pl.col("car_value").cast(pl.String))
                                                      .with_columns(first_rows(2, pl.lit("lots"), "car_value"))),
                       "b.parquet: column 'car_value' should be Float64 but 2 value(s) are not, e.g. ['lots', 'lots']"),
    "boolean_garbage": Case("b.csv", lambda c: csv(c.rest.with_columns(pl.col("repaid_loan_on_prev_car").cast(pl.String))
                                                   .with_columns(first_rows(1, pl.lit("maybe"), "repaid_loan_on_prev_car"))),
        "b.csv: column 'repaid_loan_on_prev_car' should be Boolean"),
    "nested_list_column": Case("b.parquet", lambda c: parquet(c.rest.with_columns(
        pl.concat_list("car_value", "car_value").alias("car_value"))),
        "b.parquet: column 'car_value' has the nested type List(Float64)"),
    "nested_struct_column": Case("b.parquet", lambda c: parquet(c.rest.with_columns(
        pl.struct("loan_length").alias("loan_length"))), "b.parquet: column 'loan_length' has the nested type Struct"),
    "null_ids": Case("b.parquet", lambda c: parquet(c.rest.with_columns(first_rows(3, pl.lit(None), "id"))),
                     "3 row(s) have no 'id' in ['b.parquet']"),
    "null_times": Case("b.parquet", lambda c: parquet(c.rest.with_columns(
        first_rows(2, pl.lit(None, dtype=pl.Datetime("us")), "timestamp"))), "2 row(s) have no 'timestamp' in ['b.parquet']"),
    "duplicate_ids_in_file": Case("b.parquet", lambda c: parquet(pl.concat([c.rest, c.rest.head(4)])),
                                  "8 row(s) share an id 'id' in ['b.parquet']"),
    "float_ids_not_whole": Case("b.parquet", lambda c: parquet(c.rest.with_columns(pl.col("id").cast(pl.Float64) + 0.5)),
                                "b.parquet: column 'id' holds"),
    "out_of_range": Case("b.parquet", lambda c: parquet(c.rest.with_columns(first_rows(5, pl.lit(7.5),
                                                                                       "debt_to_income_ratio"))),
                         "5 value(s) of 'debt_to_income_ratio' outside [0, 1] in ['b.parquet']"),
    "nan_value": Case("b.parquet", lambda c: parquet(c.rest.with_columns(first_rows(2, pl.lit(float("nan")),
                                                                                    "driver_tenure"))),
                      "2 value(s) of 'driver_tenure' are NaN or infinite in ['b.parquet']"),
    "infinite_value": Case("b.parquet", lambda c: parquet(c.rest.with_columns(first_rows(1, pl.lit(float("inf")),
                                                                                         "car_value"))),
                           "1 value(s) of 'car_value' are NaN or infinite in ['b.parquet']"),
    "time_outside_partition": Case("b.parquet", lambda c: parquet(c.rest.with_columns(
        ts(dt.datetime(2019, 3, 1)).alias("timestamp"))), "have 'timestamp' outside the partition"),
    "future_time": Case("b.parquet", lambda c: parquet(c.rest.with_columns(
        ts(dt.datetime(2099, 1, 1)).alias("timestamp"))), "have 'timestamp' in the future"),
    # 01:00 at UTC+5 is 20:00 UTC the day before: converted explicitly, it falls outside the batch (a naive
    # strip would have kept it inside, shifted by five hours).
    "tz_aware_time": Case("b.parquet", lambda c: parquet(c.rest.with_columns(
        ts(c.start + dt.timedelta(hours=1)).dt.replace_time_zone("Asia/Karachi").alias("timestamp"))),
        "have 'timestamp' outside the partition"),
    "mixed_offsets_csv": Case("b.csv", lambda c: csv(c.rest.with_columns(pl.col("timestamp").dt.strftime(
        "%Y-%m-%dT%H:%M:%S")).with_columns(first_rows(1, pl.col("timestamp") + "+02:00", "timestamp"))),
        "b.csv: column 'timestamp' mixes timestamps with and without a UTC offset"),
    "integer_time": Case("b.parquet", lambda c: parquet(c.rest.with_columns(pl.lit(2018).alias("timestamp"))),
                         "b.parquet: time column 'timestamp' holds numbers (type Int32, range found 2018..2018)"),
    "all_categories_unseen": Case("b.parquet", lambda c: parquet(c.rest.with_columns(pl.lit("1M+ €").alias("salary_range"))),
                                  "(100.0%) of 'salary_range' have unseen categories ['1M+ €']"),
    "unseen_categories_above_limit": Case("b.parquet", lambda c: parquet(c.rest.with_columns(
        first_rows(c.rest.height // 3, pl.lit("100%"), "size_of_downpayment"))),
        "of 'size_of_downpayment' have unseen categories ['100%']"),
    "ids_published_in_another_batch": Case("b.parquet", lambda c: parquet(c.rest.with_columns(
        pl.Series("id", c.w.base_ids[:5] + c.rest["id"].to_list()[5:]))),
        "5 row(s) of ['b.parquet'] have 'id' values already published in batch {base}"),
    # A bad copy of the good file: in the same delivery (beside), or after it was published (alone).
    "copy_of_another_file": Case("z.parquet", lambda c: parquet(c.good),
                                 "z.parquet: {n} 'id' value(s) are already in batch {p} from ['a.parquet']",
                                 setup=lambda c: [] if c.beside else [("a.parquet", parquet(c.good), c.good)]),
    # A corrected file re-delivered under the name of one already published (policy reject by default).
    "redelivered_same_name": Case("s.parquet", lambda c: parquet(c.rest.with_columns(pl.col("car_value") + 1)),
                                  "s.parquet: {r} 'id' value(s) are already in batch {p} from ['s.parquet']",
                                  setup=lambda c: [("s.parquet", parquet(c.rest), c.rest)]),
}


def label_frame(ids, values, target: str = "repaid") -> pl.DataFrame:
    return pl.DataFrame({"id": pl.Series(ids, dtype=pl.Int64), target: pl.Series(values, dtype=pl.Float64)})


LABEL_CASES: dict[str, Case] = {
    "labels_not_binary": Case("b.parquet", lambda c: parquet(label_frame(c.rest["id"], [2.0] * c.rest.height)),
                              "label(s) of 'repaid' are not 0/1 in ['b.parquet']"),
    "label_for_unknown_id": Case("b.parquet", lambda c: parquet(label_frame([*c.rest["id"], 987654321],
                                                                            [1.0] * (c.rest.height + 1))),
                                 "1 label(s) are for ids not in the records of batch {p}, in ['b.parquet']"),
    "label_for_id_of_another_batch": Case("b.parquet", lambda c: parquet(label_frame(c.w.base_ids[:3], [1.0] * 3)),
                                          "3 label(s) are for ids not in the records of batch {p}"),
    "null_label": Case("b.parquet", lambda c: parquet(label_frame(c.rest["id"], [None] + [1.0] * (c.rest.height - 1))),
                       "1 label(s) have no 'repaid' (null or NaN) in ['b.parquet']"),
    "duplicate_label_ids": Case("b.parquet", lambda c: parquet(label_frame([*c.rest["id"], c.rest["id"][0]],
                                                                           [1.0] * (c.rest.height + 1))),
                                "2 label row(s) repeat an id 'id' in ['b.parquet']"),
    "corrupt_label_file": Case("b.parquet", lambda c: b"PAR1 not really", "b.parquet: cannot be read as parquet"),
    "label_file_missing_target": Case("b.csv", lambda c: csv(c.rest.select("id")),
                                      "b.csv: schema does not match the contract of car_loan labels: missing column(s) ['repaid']"),
    "label_ids_not_whole": Case("b.parquet", lambda c: parquet(pl.DataFrame({"id": c.rest["id"].cast(pl.Float64) + 0.25,
                                                                             "repaid": [1.0] * c.rest.height})),
                                "b.parquet: column 'id' holds"),
    "labels_repeating_labelled_ids": Case(
        "z.parquet", lambda c: parquet(label_frame(c.good["id"], [0.0] * c.good.height)),
        "z.parquet: {n} 'id' value(s) are already in batch {p} from ['a.parquet']",
        setup=lambda c: [] if c.beside else [("a.parquet", parquet(label_frame(c.good["id"], [1.0] * c.good.height)),
                                              label_frame(c.good["id"], [1.0] * c.good.height))]),
}

PRICE_LABEL_CASES: dict[str, Case] = {
    "infinite_regression_label": Case("b.parquet", lambda c: parquet(pl.DataFrame(
        {"id": c.rest["id"], "y_true": [float("inf")] + [1000.0] * (c.rest.height - 1)})),
        "1 label(s) of 'y_true' are infinite in ['b.parquet']"),
    "nan_regression_label": Case("b.parquet", lambda c: parquet(pl.DataFrame(
        {"id": c.rest["id"], "y_true": [float("nan")] * c.rest.height})), "label(s) have no 'y_true' (null or NaN)"),
}


# --- the runner --------------------------------------------------------------------------------------------------

def on_main(w: World, asset: str, partition: str, cols: list[str]) -> pl.DataFrame | None:
    try:
        return load_asset(w.lakefs, ns(w.spec).key(asset), partition=partition).select(cols).sort(cols[0])
    except LakeFSError:
        return None


def try_case(w: World, case: Case, beside: bool, kind: str) -> None:
    spec = w.spec
    asset = "raw_records" if kind == "records" else "raw_labels"
    p = w.next_day()
    day = w.rows(p)
    half = day.height // 2
    c = Ctx(w, p, day.head(half), day.slice(half), beside)
    good_file = c.good if kind == "records" else label_frame(c.good["id"], [1.0] * c.good.height, spec.target)
    if kind == "labels":  # the batch's records are on main first; the labels are judged against them
        w.publish("records", p, [("records.parquet", parquet(day))])
    expected: list[pl.DataFrame] = []
    if case.setup:
        setup = case.setup(c)
        if setup:
            w.publish(kind, p, [(n, content) for n, content, _ in setup])
            expected += [rows.with_columns(pl.lit(n).alias("_source_file")) for n, _, rows in setup]
    if beside:
        w.land(kind, p, "a.parquet", parquet(good_file), age_s=120)
        expected.append(good_file.with_columns(pl.lit("a.parquet").alias("_source_file")))
    bad = w.land(kind, p, case.name, case.make(c), age_s=60)
    before = w.lakefs.head()
    result = w.materialize(asset, p)
    fails = failures(result)
    reason_text = case.reason.format(p=p, n=c.good.height, r=c.rest.height, base=w.base)

    # The bad file is quarantined with its reason, naming the file and the column or fault.
    q = w.landing / "quarantine" / kind / p
    assert not bad.exists() and (q / case.name).exists(), f"{case.name} was not quarantined: {fails}"
    reason = json.loads((q / f"{case.name}.reason.json").read_text())
    assert reason_text in reason["reason"], reason["reason"]
    assert case.name in reason["reason"]

    if expected:  # good rows beside (or before) the bad file: the run succeeds and publishes them
        assert result.success, fails
        assert case.name in fails.get("files_quarantined", ""), fails
        assert set(fails) == {"files_quarantined"} | ({"known_categories"} & set(fails)), fails
        assert publish_run(w.instance, w.lakefs, result.run_id).status == "published"
    else:  # nothing good in the batch: a blocking check fails, naming the fault, and main keeps its commit
        assert not result.success
        assert "not_empty" in fails and any(reason_text in text for text in fails.values()), fails
        assert publish_run(w.instance, w.lakefs, result.run_id).status == "kept"
        assert w.lakefs.head() == before
        w.lakefs.delete_branch(run_branch(result.run_id))  # inspected; keeps later runs' branch listing short

    value = {"records": "car_value", "labels": spec.target}[kind]
    cols = [spec.id_column, "_source_file", value]
    held = on_main(w, asset, p, cols)
    if not expected:
        assert held is None, f"main holds {asset}[{p}] although no file was good"
    else:
        want = pl.concat([e.select(cols) for e in expected]).sort(spec.id_column)
        assert held is not None and held.equals(want), (held, want)


@pytest.mark.parametrize("beside", [False, True], ids=["alone", "beside_good_file"])
@pytest.mark.parametrize("kind", sorted(RECORD_CASES))
def test_bad_records_file(world, kind, beside):
    try_case(world, RECORD_CASES[kind], beside, "records")


@pytest.mark.parametrize("beside", [False, True], ids=["alone", "beside_good_file"])
@pytest.mark.parametrize("kind", sorted(LABEL_CASES))
def test_bad_labels_file(world, kind, beside):
    try_case(world, LABEL_CASES[kind], beside, "labels")


@pytest.mark.parametrize("beside", [False, True], ids=["alone", "beside_good_file"])
@pytest.mark.parametrize("kind", sorted(PRICE_LABEL_CASES))
def test_bad_regression_labels_file(price_world, kind, beside):
    try_case(price_world, PRICE_LABEL_CASES[kind], beside, "labels")


def test_the_catalogue_has_at_least_25_kinds():
    assert len(RECORD_CASES) + len(LABEL_CASES) + len(PRICE_LABEL_CASES) >= 25
