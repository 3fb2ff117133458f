"""Data contracts: the checks a landing file must pass before its rows may reach `main`.

Plain functions over polars DataFrames, driven by the data-set spec; the ingestion assets turn the
results into quarantined files and blocking asset checks. Every violation names the file, the column,
how many rows, with examples.

The order is the one a careful operator expects:
1. per file: readable, flat schema of the contract's columns and types, ids and times present, values in
   range and finite, event times inside the batch period and not in the future, ids unique in the file,
   ids not already published in another batch, categories mostly known (`check_records`);
2. across the files that survived (and the rows already in the batch): the re-delivery policy of the spec
   decides what happens to ids that are already there (`merge_deliveries`).
A file failing step 1 is quarantined alone; it never takes a good file with it.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import re
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlplatform.lazy import lazy_import
pl = lazy_import("polars")

from mlplatform.spec import DatasetSpec

SOURCE_FILE = "_source_file"
ROW_NUMBER = "_source_row"
ARRIVED_AT = "_arrived_at"

# How a time string says it is tz-aware: a trailing Z or a UTC offset such as +02:00 / -0500.
_OFFSET = r"(Z|[+-]\d\d:?\d\d)$"


@dataclass
class Violation:
    # unreadable | schema | types | empty | nulls | duplicates | range | time_window | future | categories
    # | unseen_categories | ids_elsewhere | redelivery | unknown_id
    check: str
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


def numeric_dtypes() -> tuple:
    """polars' numeric column types (a function: polars is imported on first use, not with this module)."""
    return (pl.Float32, pl.Float64, pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32,
            pl.UInt64)


def expected_dtypes(spec: DatasetSpec, with_target: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {spec.id_column: pl.Int64, spec.time_column: pl.Datetime("us")}
    for f in spec.features:
        out[f.name] = {"numeric": pl.Float64, "categorical": pl.String, "boolean": pl.Boolean}[f.type]
    if with_target:
        out[spec.target] = pl.Float64
    return out


class FileRejected(ValueError):
    """A landing file cannot be taken as a batch of this data set; the message names the file and column."""

    def __init__(self, message: str, check: str = "unreadable", column: str | None = None):
        super().__init__(message)
        self.check = check
        self.column = column

    def violation(self, file: str) -> Violation:
        return Violation(self.check, str(self), self.column, file)


def file_digest(path: Path) -> str:
    """sha256 of a landing file: tells a file already ingested from a re-delivery under the same name."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _check_csv_shape(data: bytes, name: str) -> None:
    """A cut-off or ragged CSV (a row with fewer or more fields than the header) is rejected, not read
    with nulls filled in: polars would silently pad a truncated last row."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileRejected(f"{name}: is not UTF-8 text, so not a CSV (byte {exc.start}: {exc.reason})") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        raise FileRejected(f"{name}: has no header line (empty CSV)", "empty")
    width = len(header)
    bad = None
    rows = 0
    for row in reader:
        rows += 1
        if bad is None and row and len(row) != width:
            bad = (reader.line_num, rows, row)
    if bad is not None:
        line, index, row = bad
        if index == rows and len(row) < width:
            what = "truncated: its last row is cut off"
        else:
            what = "ragged"
        raise FileRejected(f"{name}: CSV is {what} (line {line} has {len(row)} field(s), the header has "
                           f"{width}): {','.join(row)[:80]!r}")


def read_landing_file(path: Path) -> pl.DataFrame:
    """Read a landing file by its extension; anything unreadable raises FileRejected with the reason."""
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise FileRejected(f"{path.name}: unsupported file format {suffix or '(none)'!r}; expected .parquet or .csv")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FileRejected(f"{path.name}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not data:
        raise FileRejected(f"{path.name}: is an empty file (0 bytes)", "empty")
    try:
        if suffix == ".parquet":
            df = pl.read_parquet(io.BytesIO(data))
        else:
            _check_csv_shape(data, path.name)
            df = pl.read_csv(io.BytesIO(data), infer_schema_length=None)
    except FileRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - polars raises many kinds for corrupt input
        raise FileRejected(f"{path.name}: cannot be read as {suffix[1:]} ({type(exc).__name__}: "
                           f"{_first_line(exc)})") from None
    return df


def _reject_nested(df: pl.DataFrame, file: str) -> None:
    for name, dtype in df.schema.items():
        if name.startswith("_"):
            continue  # writer bookkeeping, dropped below
        if dtype.is_nested() or dtype == pl.Object:
            raise FileRejected(f"{file}: column {name!r} has the nested type {dtype}; the contract allows only "
                               f"flat columns (numbers, text, booleans, timestamps)", "types", name)


def _check_columns(df: pl.DataFrame, expected: dict[str, Any], file: str, what: str) -> None:
    if df.height == 0:
        raise FileRejected(f"{file}: has no rows (header only or empty)", "empty")
    missing = [c for c in expected if c not in df.columns]
    extra = [c for c in df.columns if c not in expected and not c.startswith("_")]  # _x: writer bookkeeping
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing column(s) {missing}")
        if extra:
            parts.append(f"unexpected column(s) {extra}")
        raise FileRejected(f"{file}: schema does not match the contract of {what}: " + "; ".join(parts),
                           "schema", (missing or extra)[0])


def _whole_ids(df: pl.DataFrame, name: str, file: str) -> pl.Expr:
    """An id column as Int64; float ids that are not whole numbers are rejected, never truncated."""
    src = df.schema[name]
    if src.is_integer():
        return pl.col(name).cast(pl.Int64, strict=False)
    if src.is_float():
        col = df[name]
        bad = df.filter(col.is_not_null() & (col.is_nan() | col.is_infinite() | (col != col.round(0))))
        if bad.height:
            raise FileRejected(f"{file}: column {name!r} holds {bad.height} id(s) that are not whole numbers, "
                               f"e.g. {bad[name].head(3).to_list()}: ids are never truncated", "types", name)
        return pl.col(name).cast(pl.Int64, strict=False)
    if src == pl.String:
        return pl.col(name).str.strip_chars().cast(pl.Int64, strict=False)
    raise FileRejected(f"{file}: column {name!r} should hold integer ids but has type {src}", "types", name)


def _timestamps(df: pl.DataFrame, name: str, file: str, tz: str) -> pl.Expr:
    """A time column as naive Datetime in the spec's timezone. tz-aware values (a Datetime with a zone, or
    strings with Z / an offset) are converted to that timezone explicitly, never just stripped."""
    src = df.schema[name]
    if isinstance(src, pl.Datetime):
        col = pl.col(name)
        if src.time_zone is not None:
            col = col.dt.convert_time_zone(tz).dt.replace_time_zone(None)
        return col.cast(pl.Datetime("us"))
    if src == pl.Date:
        return pl.col(name).cast(pl.Datetime("us"))
    if src == pl.String:
        present = df[name].drop_nulls()
        aware = present.str.contains(_OFFSET)
        if aware.any() and not aware.all():
            mixed = present.filter(~aware).head(2).to_list() + present.filter(aware).head(2).to_list()
            raise FileRejected(f"{file}: column {name!r} mixes timestamps with and without a UTC offset, "
                               f"e.g. {mixed}: their order cannot be known", "types", name)
        if aware.any():
            return (pl.col(name).str.replace(" ", "T").str.to_datetime(format="%+", strict=False, time_unit="us")
                    .dt.convert_time_zone(tz).dt.replace_time_zone(None))
        return pl.col(name).str.to_datetime(strict=False, time_unit="us")
    if src.is_numeric():
        col = df[name]
        raise FileRejected(f"{file}: time column {name!r} holds numbers (type {src}, range found "
                           f"{col.min()}..{col.max()}), not timestamps", "types", name)
    raise FileRejected(f"{file}: time column {name!r} should hold timestamps but has type {src}", "types", name)


def _declared_times(df: pl.DataFrame, name: str, file: str, spec: DatasetSpec) -> pl.Expr:
    """A time column stored as the spec declares (`time_column.type`: date, iso_string, year, epoch_s,
    epoch_ms), read by the same parser as the source files (mlplatform.sources.parse_times)."""
    from mlplatform.sources import TimeValuesError, parse_times

    try:
        return pl.lit(parse_times(df[name], spec.time_type, spec.timezone))
    except TimeValuesError as exc:
        raise FileRejected(f"{file}: {exc}", "types", name) from None


def _cast(df: pl.DataFrame, name: str, dtype: Any, file: str) -> pl.Expr:
    src = df.schema[name]
    col = pl.col(name)
    if dtype == pl.Float64:
        if src == pl.Boolean or isinstance(src, (pl.Datetime, pl.Date, pl.Duration)):
            raise FileRejected(f"{file}: column {name!r} should be numeric (Float64) but has type {src}",
                               "types", name)
        return (col.str.strip_chars() if src == pl.String else col).cast(pl.Float64, strict=False)
    if dtype == pl.Boolean:
        if src == pl.String:
            return col.str.strip_chars().str.to_lowercase().replace_strict(
                {"true": True, "false": False, "1": True, "0": False}, default=None, return_dtype=pl.Boolean)
        if src.is_integer():
            return pl.when(col.is_in([0, 1])).then(col.cast(pl.Boolean)).otherwise(None)
        if src == pl.Boolean:
            return col
        raise FileRejected(f"{file}: column {name!r} should be boolean but has type {src}", "types", name)
    if dtype == pl.String:
        if src == pl.String:
            return col
        if isinstance(src, (pl.Categorical, pl.Enum)):  # pandas `category`, polars Categorical/Enum
            return col.cast(pl.String)
        if src.is_numeric() or src == pl.Boolean:
            return col.cast(pl.String)
        raise FileRejected(f"{file}: column {name!r} should be text (a category) but has type {src}", "types", name)
    return col.cast(dtype, strict=False)


def _conform(df: pl.DataFrame, spec: DatasetSpec, file: str, expected: dict[str, Any], what: str) -> pl.DataFrame:
    _reject_nested(df, file)
    _check_columns(df, expected, file, what)
    cols = []
    for name, dtype in expected.items():
        if name == spec.id_column:
            expr = _whole_ids(df, name, file)
        elif name == spec.time_column:
            expr = _timestamps(df, name, file, spec.timezone) if spec.time_type == "datetime" \
                else _declared_times(df, name, file, spec)
        else:
            expr = _cast(df, name, dtype, file)
        cols.append(expr.alias(name))
    out = df.select(cols)
    # A value that was present but could not be cast means the column has the wrong type.
    for name in expected:
        lost = df[name].is_not_null() & out[name].is_null()
        if lost.any():
            bad = df.filter(lost)[name]
            raise FileRejected(f"{file}: column {name!r} should be {expected[name]} but {bad.len()} value(s) "
                               f"are not, e.g. {bad.head(3).to_list()} (type {df.schema[name]})", "types", name)
    return out


def conform(df: pl.DataFrame, spec: DatasetSpec, file: str, with_target: bool = False) -> pl.DataFrame:
    """Check the schema of one file and cast it to the contract's types; raise FileRejected if it can't.
    Never raises anything else: an unexpected input is a rejected file, not a crashed run."""
    try:
        return _conform(df, spec, file, expected_dtypes(spec, with_target), f"{spec.name} records")
    except FileRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - any other failure is the file's, and is reported as such
        raise FileRejected(f"{file}: does not match the contract of {spec.name} ({type(exc).__name__}: "
                           f"{_first_line(exc)[:200]})", "types") from None


def conform_labels(df: pl.DataFrame, spec: DatasetSpec, file: str) -> pl.DataFrame:
    """A label file: exactly the id and target columns, ids whole numbers, targets numbers."""
    expected = {spec.id_column: pl.Int64, spec.target: pl.Float64}
    try:
        return _conform(df, spec, file, expected, f"{spec.name} labels")
    except FileRejected:
        raise
    except Exception as exc:  # noqa: BLE001
        raise FileRejected(f"{file}: labels do not match the contract ({type(exc).__name__}: "
                           f"{_first_line(exc)[:200]})", "types") from None


def _examples(df: pl.DataFrame, spec: DatasetSpec, mask: pl.Expr, column: str) -> tuple[int, list, list]:
    bad = df.filter(mask)
    files = sorted(set(bad[SOURCE_FILE].to_list())) if SOURCE_FILE in bad.columns else []
    examples = [{"id": r[spec.id_column], column: r[column]} if column in bad.columns else r[spec.id_column]
                for r in bad.head(5).iter_rows(named=True)] if spec.id_column in bad.columns else []
    return bad.height, examples, files


def now_in(spec: DatasetSpec) -> dt.datetime:
    """Now as a naive datetime in the spec's timezone (the event times are naive in that timezone)."""
    return dt.datetime.now(zoneinfo.ZoneInfo(spec.timezone)).replace(tzinfo=None)


def check_records(df: pl.DataFrame, spec: DatasetSpec, window: tuple[dt.datetime, dt.datetime] | None,
                  now: dt.datetime | None = None) -> list[Violation]:
    """Row-level contract of (conformed) records. `window` is the partition's [start, end)."""
    out: list[Violation] = []
    now = now or now_in(spec)
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
        if f.type != "numeric":
            continue
        n, ex, files = _examples(df, spec, (pl.col(f.name).is_nan() | pl.col(f.name).is_infinite())
                                 .fill_null(False), f.name)
        if n:
            out.append(Violation("range", f"{n} value(s) of {f.name!r} are NaN or infinite in {files}",
                                 f.name, ", ".join(files), n, ex))
        if f.min is None and f.max is None:
            continue
        mask = pl.lit(False)
        if f.min is not None:
            mask = mask | (pl.col(f.name) < f.min)
        if f.max is not None:
            mask = mask | (pl.col(f.name) > f.max)
        n, ex, files = _examples(df, spec, mask.fill_null(False) & pl.col(f.name).is_finite(), f.name)
        if n:
            out.append(Violation("range", f"{n} value(s) of {f.name!r} outside [{_bound(f.min)}, {_bound(f.max)}] in {files}",
                                 f.name, ", ".join(files), n, ex))
    limit = spec.max_unseen_category_fraction
    for f in spec.features:
        if f.type != "categorical" or not f.categories:
            continue
        mask = ~pl.col(f.name).is_in(list(f.categories)) & pl.col(f.name).is_not_null()
        n, ex, files = _examples(df, spec, mask, f.name)
        if n:
            present = int(df[f.name].is_not_null().sum())
            share = n / present if present else 1.0
            unseen = df.filter(mask)[f.name].unique().sort().head(5).to_list()
            blocking = share > limit or share >= 1.0
            verdict = (f"above the limit {limit:.0%} (contracts.max_unseen_category_fraction)" if blocking
                       else f"within the limit {limit:.0%}")
            out.append(Violation("unseen_categories" if blocking else "categories",
                                 f"{n} row(s) ({share:.1%}) of {f.name!r} have unseen categories {unseen} in "
                                 f"{files}, {verdict}", f.name, ", ".join(files), n, ex, blocking=blocking))
    t = spec.time_column
    if window is not None:
        start, end = window
        mask = ((pl.col(t) < start) | (pl.col(t) >= end)).fill_null(False)
        n, ex, files = _examples(df, spec, mask, t)
        if n:
            outside = df.filter(mask)[t]
            out.append(Violation("time_window", f"{n} row(s) have {t!r} outside the partition "
                                 f"[{start:%Y-%m-%d}, {end:%Y-%m-%d}) in {files} (range found "
                                 f"{outside.min()}..{outside.max()})", t, ", ".join(files), n, ex))
    n, ex, files = _examples(df, spec, (pl.col(t) > now).fill_null(False), t)
    if n:
        out.append(Violation("future", f"{n} row(s) have {t!r} in the future (after {now:%Y-%m-%d %H:%M} "
                             f"{spec.timezone}) in {files}", t, ", ".join(files), n, ex))
    return out


def check_ids_elsewhere(df: pl.DataFrame, spec: DatasetSpec, elsewhere: dict[str, pl.Series]) -> list[Violation]:
    """Ids already published in another batch (or the reference history) name another entity: taking them
    would give these records that entity's label in the joins. Such records are rejected."""
    out = []
    if df.height == 0:
        return out
    ids = df[spec.id_column].drop_nulls()
    for where, other in sorted(elsewhere.items()):
        hit = ids.filter(ids.is_in(other.implode()))
        if hit.len():
            n, ex, files = _examples(df, spec, pl.col(spec.id_column).is_in(hit.implode()), spec.id_column)
            label = "the reference history" if where == "reference" else f"batch {where}"
            out.append(Violation("ids_elsewhere", f"{n} row(s) of {files} have {spec.id_column!r} values already "
                                 f"published in {label}, e.g. {hit.head(5).to_list()}: an id names one entity, "
                                 f"so these records would be joined to another entity's label",
                                 spec.id_column, ", ".join(files), n, ex))
    return out


def check_labels(df: pl.DataFrame, spec: DatasetSpec, known_ids: pl.Series | None,
                 partition: str | None = None) -> list[Violation]:
    """Contract of labels: id and target present and finite, 0/1 for classification, one label per id,
    and only for ids in the records of their batch (`known_ids`; None = not judged)."""
    out: list[Violation] = []
    if df.height == 0:
        return [Violation("empty", "the label batch has no rows")]
    y, i = spec.target, spec.id_column
    n, ex, files = _examples(df, spec, pl.col(i).is_null(), i)
    if n:
        out.append(Violation("nulls", f"{n} label row(s) have no {i!r} in {files}", i, ", ".join(files), n, ex))
    n, ex, files = _examples(df, spec, pl.col(y).is_null() | pl.col(y).is_nan(), y)
    if n:
        out.append(Violation("nulls", f"{n} label(s) have no {y!r} (null or NaN) in {files}", y,
                             ", ".join(files), n, ex))
    n, ex, files = _examples(df, spec, pl.col(y).is_infinite().fill_null(False), y)
    if n:
        out.append(Violation("range", f"{n} label(s) of {y!r} are infinite in {files}", y, ", ".join(files), n, ex))
    if spec.is_classification:
        mask = ~pl.col(y).is_in([0.0, 1.0]).fill_null(True) & pl.col(y).is_not_nan().fill_null(True)
        n, ex, files = _examples(df, spec, mask, y)
        if n:
            out.append(Violation("range", f"{n} label(s) of {y!r} are not 0/1 in {files}", y, ", ".join(files),
                                 n, ex))
    dup = df.filter(pl.col(i).is_duplicated() & pl.col(i).is_not_null())
    if dup.height:
        files = sorted(set(dup[SOURCE_FILE].to_list())) if SOURCE_FILE in dup.columns else []
        out.append(Violation("duplicates", f"{dup.height} label row(s) repeat an id {i!r} in {files}", i,
                             ", ".join(files), dup.height, dup[i].unique().head(5).to_list()))
    if known_ids is not None:
        n, ex, files = _examples(df, spec, ~pl.col(i).is_in(known_ids.implode()) & pl.col(i).is_not_null(), i)
        if n:
            where = f"batch {partition}" if partition else "their batch"
            out.append(Violation("unknown_id", f"{n} label(s) are for ids not in the records of {where}, "
                                 f"in {files}", i, ", ".join(files), n, ex))
    return out


# --- across files: what is already in the batch, and the re-delivery policy ------------------------------------

@dataclass
class Delivery:
    """A landing file that passed its per-file checks, in arrival order."""

    name: str
    digest: str
    frame: pl.DataFrame  # conformed rows, with SOURCE_FILE


@dataclass
class Merged:
    frame: pl.DataFrame                  # the batch after this run: previous rows + accepted files
    ledger: dict[str, str | None]        # file name -> sha256 of every file whose rows the batch accounts for
    accepted: list[str] = field(default_factory=list)
    rejected: list[tuple[str, Violation]] = field(default_factory=list)
    replaced: dict[str, int] = field(default_factory=dict)   # file -> rows of earlier files it replaced


def already_ingested(name: str, digest: str, ledger: dict[str, str | None]) -> bool:
    """The file's rows are already in the batch (same name and content; an unknown digest means a ledger
    from before digests were kept, where the name alone is the record)."""
    return name in ledger and ledger[name] in (None, digest)


def merge_deliveries(previous: pl.DataFrame | None, deliveries: list[Delivery], ledger: dict[str, str | None],
                     spec: DatasetSpec, schema: dict[str, Any], partition: str = "") -> Merged:
    """Add the surviving files to the rows already in the batch, in arrival order, under the spec's
    re-delivery policy. Rows already in the batch are never dropped, except rows whose id a later file
    replaces under `replace_by_id`. A later file repeating ids is judged; the earlier one never is."""
    i = spec.id_column
    typed = [pl.col(c).cast(t) for c, t in schema.items()]
    current = previous.select(typed) if previous is not None else pl.DataFrame(schema=schema)
    out = Merged(current, dict(ledger))
    for d in deliveries:
        frame = d.frame.select(typed)
        ids = frame[i].drop_nulls()
        overlap_mask = current[i].is_in(ids.implode())
        overlap = current.filter(overlap_mask)
        renamed = d.name in out.ledger
        if spec.redelivery == "reject" and (overlap.height or renamed):
            origin = sorted(set(overlap[SOURCE_FILE].to_list())) if SOURCE_FILE in overlap.columns else []
            if overlap.height:
                msg = (f"{d.name}: {overlap.height} {i!r} value(s) are already in batch {partition} from "
                       f"{origin}, e.g. {overlap[i].head(5).to_list()}")
            else:
                msg = f"{d.name}: a file of this name was already ingested into batch {partition} with other content"
            msg += (f"; re-delivery rejected by the policy landing.redelivery: reject in {spec.path or spec.name} "
                    f"(set it to replace_by_id to let a later file replace those rows)")
            out.rejected.append((d.name, Violation("redelivery", msg, i, d.name, overlap.height,
                                                   overlap[i].head(5).to_list())))
            continue
        if overlap.height:  # replace_by_id: the later file's rows replace the rows with the same ids
            current = current.filter(~overlap_mask)
            out.replaced[d.name] = overlap.height
        current = pl.concat([current, frame], how="vertical")
        out.ledger[d.name] = d.digest
        out.accepted.append(d.name)
    out.frame = current
    return out


def _bound(value: float | None) -> str:
    """A range bound as the spec wrote it (0 not 0.0, 1000000 not 1e+06); a missing bound as None."""
    if value is None:
        return "None"
    return str(int(value)) if float(value).is_integer() else repr(float(value))
