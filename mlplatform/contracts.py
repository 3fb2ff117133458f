"""Data contracts: the checks a raw batch must pass before it may reach `main`.

Plain functions over polars DataFrames, driven by the data-set spec; the assets turn the results into
blocking asset checks. Every violation names the file, the column, how many rows, with examples.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from resources.settings import DatasetSpec

SOURCE_FILE = "_source_file"
ROW_NUMBER = "_source_row"


@dataclass
class Violation:
    check: str          # schema | types | nulls | duplicates | range | time_window | future | empty | categories
    message: str
    column: str | None = None
    file: str | None = None
    rows: int = 0
    examples: list[Any] = field(default_factory=list)
    blocking: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"check": self.check, "column": self.column, "file": self.file, "rows": self.rows,
                "examples": [str(e) for e in self.examples[:5]], "blocking": self.blocking,
                "message": self.message}


NUMERIC = (pl.Float32, pl.Float64, pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32,
           pl.UInt64)


def expected_dtypes(spec: DatasetSpec, with_target: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {spec.id_column: pl.Int64, spec.time_column: pl.Datetime("us")}
    for f in spec.features:
        out[f.name] = {"numeric": pl.Float64, "categorical": pl.String, "boolean": pl.Boolean}[f.type]
    if with_target:
        out[spec.target] = pl.Float64
    return out


class FileRejected(ValueError):
    """A landing file cannot be read as a batch of this data set (format, corruption, schema)."""


def read_landing_file(path: Path) -> pl.DataFrame:
    """Read a landing file by its extension; anything unreadable raises FileRejected with the reason."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            df = pl.read_parquet(path)
        elif suffix == ".csv":
            df = pl.read_csv(path, infer_schema_length=10000)
        else:
            raise FileRejected(f"{path.name}: unsupported file format {suffix or '(none)'!r}; "
                               f"expected .parquet or .csv")
    except FileRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - polars raises many kinds for corrupt input
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise FileRejected(f"{path.name}: cannot be read as {suffix[1:]} ({type(exc).__name__}: {first})") from None
    return df


def conform(df: pl.DataFrame, spec: DatasetSpec, file: str, with_target: bool = False) -> pl.DataFrame:
    """Check the schema of one file and cast it to the contract's types; raise FileRejected if it can't."""
    expected = expected_dtypes(spec, with_target)
    if df.height == 0:
        raise FileRejected(f"{file}: has no rows (header only or empty)")
    missing = [c for c in expected if c not in df.columns]
    extra = [c for c in df.columns if c not in expected and not c.startswith("_")]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing column(s) {missing}")
        if extra:
            parts.append(f"unexpected column(s) {extra}")
        raise FileRejected(f"{file}: schema does not match the contract of {spec.name}: " + "; ".join(parts))
    cols = []
    for name, dtype in expected.items():
        col = pl.col(name)
        src = df.schema[name]
        if dtype == pl.Datetime("us"):
            if src == pl.String:
                col = col.str.to_datetime(strict=False, time_unit="us")
            else:
                col = col.cast(pl.Datetime("us"), strict=False)
        elif dtype == pl.Boolean and src == pl.String:
            col = col.str.to_lowercase().replace_strict({"true": True, "false": False, "1": True, "0": False},
                                                        default=None, return_dtype=pl.Boolean)
        else:
            col = col.cast(dtype, strict=False)
        cols.append(col.alias(name))
    out = df.select(cols)
    # A value that was present but could not be cast means the column has the wrong type.
    for name in expected:
        bad = df.select(pl.col(name)).with_columns(out.select(pl.col(name).alias("_cast")))
        bad = bad.filter(pl.col(name).is_not_null() & pl.col("_cast").is_null())
        if bad.height:
            raise FileRejected(f"{file}: column {name!r} should be {expected[name]} but {bad.height} value(s) "
                               f"are not, e.g. {bad[name].head(3).to_list()} (type {df.schema[name]})")
    return out


def _examples(df: pl.DataFrame, spec: DatasetSpec, mask: pl.Expr, column: str) -> tuple[int, list, list]:
    bad = df.filter(mask)
    files = sorted(set(bad[SOURCE_FILE].to_list())) if SOURCE_FILE in bad.columns else []
    examples = [{"id": r[spec.id_column], column: r[column]} if column in bad.columns else r[spec.id_column]
                for r in bad.head(5).iter_rows(named=True)] if spec.id_column in bad.columns else []
    return bad.height, examples, files


def check_records(df: pl.DataFrame, spec: DatasetSpec, window: tuple[dt.datetime, dt.datetime] | None,
                  now: dt.datetime | None = None) -> list[Violation]:
    """Row-level contract of a (conformed) batch. `window` is the partition's [start, end)."""
    out: list[Violation] = []
    now = now or dt.datetime.now()
    if df.height == 0:
        return [Violation("empty", f"the batch has no rows{f' for {window[0]:%Y-%m-%d}' if window else ''}")]
    for col in (spec.id_column, spec.time_column):
        n, ex, files = _examples(df, spec, pl.col(col).is_null(), col)
        if n:
            out.append(Violation("nulls", f"{n} row(s) have no {col!r} in {files}", col, ", ".join(files), n, ex))
    dup = df.filter(pl.col(spec.id_column).is_duplicated() & pl.col(spec.id_column).is_not_null())
    if dup.height:
        files = sorted(set(dup[SOURCE_FILE].to_list())) if SOURCE_FILE in dup.columns else []
        out.append(Violation("duplicates", f"{dup.height} row(s) share an id {spec.id_column!r} in {files}",
                             spec.id_column, ", ".join(files), dup.height,
                             dup[spec.id_column].unique().head(5).to_list()))
    for f in spec.features:
        if f.type != "numeric" or (f.min is None and f.max is None):
            continue
        mask = pl.lit(False)
        if f.min is not None:
            mask = mask | (pl.col(f.name) < f.min)
        if f.max is not None:
            mask = mask | (pl.col(f.name) > f.max)
        mask = mask | pl.col(f.name).is_nan() | pl.col(f.name).is_infinite()
        n, ex, files = _examples(df, spec, mask.fill_null(False), f.name)
        if n:
            out.append(Violation("range", f"{n} value(s) of {f.name!r} outside [{f.min}, {f.max}] in {files}",
                                 f.name, ", ".join(files), n, ex))
    for f in spec.features:
        if f.type != "categorical" or not f.categories:
            continue
        mask = ~pl.col(f.name).is_in(list(f.categories)) & pl.col(f.name).is_not_null()
        n, ex, files = _examples(df, spec, mask, f.name)
        if n:
            unseen = df.filter(mask)[f.name].unique().head(5).to_list()
            out.append(Violation("categories", f"{n} row(s) of {f.name!r} have unseen categories {unseen} in "
                                 f"{files}", f.name, ", ".join(files), n, ex, blocking=False))
    t = spec.time_column
    if window is not None:
        start, end = window
        n, ex, files = _examples(df, spec, ((pl.col(t) < start) | (pl.col(t) >= end)).fill_null(False), t)
        if n:
            out.append(Violation("time_window", f"{n} row(s) have {t!r} outside the partition "
                                 f"[{start:%Y-%m-%d}, {end:%Y-%m-%d}) in {files}", t, ", ".join(files), n, ex))
    n, ex, files = _examples(df, spec, (pl.col(t) > now).fill_null(False), t)
    if n:
        out.append(Violation("future", f"{n} row(s) have {t!r} in the future (after {now:%Y-%m-%d %H:%M}) "
                             f"in {files}", t, ", ".join(files), n, ex))
    return out


def check_labels(df: pl.DataFrame, spec: DatasetSpec, known_ids: pl.Series | None) -> list[Violation]:
    """Contract of a label batch: id and target present, target valid, ids known."""
    out: list[Violation] = []
    if df.height == 0:
        return [Violation("empty", "the label batch has no rows")]
    n, ex, files = _examples(df, spec, pl.col(spec.target).is_null() | pl.col(spec.target).is_nan(), spec.target)
    if n:
        out.append(Violation("nulls", f"{n} label(s) have no {spec.target!r} in {files}", spec.target,
                             ", ".join(files), n, ex))
    if spec.is_classification:
        n, ex, files = _examples(df, spec, ~pl.col(spec.target).is_in([0.0, 1.0]).fill_null(True), spec.target)
        if n:
            out.append(Violation("range", f"{n} label(s) of {spec.target!r} are not 0/1 in {files}", spec.target,
                                 ", ".join(files), n, ex))
    dup = df.filter(pl.col(spec.id_column).is_duplicated())
    if dup.height:
        out.append(Violation("duplicates", f"{dup.height} label row(s) repeat an id", spec.id_column, None,
                             dup.height, dup[spec.id_column].unique().head(5).to_list()))
    if known_ids is not None:
        n, ex, files = _examples(df, spec, ~pl.col(spec.id_column).is_in(known_ids.implode()), spec.id_column)
        if n:
            out.append(Violation("unknown_id", f"{n} label(s) are for ids never seen in any records batch, "
                                 f"in {files}", spec.id_column, ", ".join(files), n, ex))
    return out
