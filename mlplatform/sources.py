"""Where a data set's rows come from, as (reference, production, production_labels) pandas frames:

- a Python loader named by the spec (`source.loader: module:function`) returning the three frames, or
- files, without code: `source.reference` (required), `source.production` and `source.labels` (optional),
  each a path, a glob or a folder relative to the spec file's folder, read as Parquet or CSV (by extension, or
  `source.format`). Without production files the data set has no replay (the simulator has nothing to release;
  batches are landed by whoever produces them). Without a labels file, production labels are the target
  column of the production files, if they have it.

The time column is stored as `time_column.type` says (datetime, date, iso_string, year, epoch_s, epoch_ms) and
is normalized to naive datetimes in the spec's timezone (`contracts.timezone`), then checked. The same parser
reads the time column of landing files (mlplatform.contracts). Reads are cached as Parquet under the state dir:
a loader's output by the loader's name, files by their paths, sizes and modification times (a changed file is
re-read).
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import json
import os
from pathlib import Path

from mlplatform.lazy import lazy_import
pl = lazy_import("polars")

from mlplatform.spec import ROOT, DatasetSpec, SettingError

TIME_TYPES = ("datetime", "date", "iso_string", "year", "epoch_s", "epoch_ms")
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
PARTS = ("reference", "production", "labels")
_OFFSET = r"(Z|[+-]\d\d:?\d\d)$"


# --- time column types -------------------------------------------------------------------------------

class TimeValuesError(ValueError):
    """Values of a time column cannot be read as its declared type; the message names the column, the type
    and a bad example. Callers prefix where the values came from (a setting, a landing file)."""


def _examples(values: pl.Series, n: int = 3) -> list:
    return values.drop_nulls().head(n).to_list()


def parse_times(values: pl.Series, time_type: str, tz: str = "UTC") -> pl.Series:
    """A time column stored as `time_type`, as naive Datetime("us") in the timezone `tz`.

    datetime: timestamps or text such as 2019-01-31 12:00 (tz-aware ones converted to `tz`); iso_string: ISO 8601
    text, with or without a UTC offset; date: dates or text YYYY-MM-DD (midnight); year: whole numbers such as
    2019 (January 1st); epoch_s / epoch_ms: seconds / milliseconds since 1970-01-01 UTC (converted to `tz`).
    Values that are already timestamps or dates are taken whatever the declared type: they are unambiguous.
    """
    name = values.name
    if time_type not in TIME_TYPES:
        raise TimeValuesError(f"time column {name!r}: unknown type {time_type!r}; expected one of {list(TIME_TYPES)}")
    if isinstance(values.dtype, (pl.Categorical, pl.Enum)):  # e.g. a pandas `category` column of text
        values = values.cast(pl.String)
    src = values.dtype
    if isinstance(src, pl.Datetime):
        if src.time_zone is not None:
            values = values.dt.convert_time_zone(tz).dt.replace_time_zone(None)
        return values.cast(pl.Datetime("us"))
    if src == pl.Date or src == pl.Null:
        return values.cast(pl.Datetime("us"))

    def wrong(hint: str) -> TimeValuesError:
        return TimeValuesError(f"time column {name!r} (declared type {time_type!r}) holds {src} values, "
                               f"e.g. {_examples(values)}: {hint}")

    numeric = src.is_numeric()
    if time_type in ("datetime", "iso_string", "date") and numeric:
        raise wrong("numbers, not timestamps; declare `time_column: {name: ..., type: epoch_s | epoch_ms | year}` "
                    "if they count seconds, milliseconds or years")
    if time_type in ("datetime", "iso_string", "date") and src != pl.String:
        raise wrong("expected text or timestamps")
    if time_type in ("year", "epoch_s", "epoch_ms") and not (numeric or src == pl.String):
        raise wrong("expected whole numbers")

    try:
        out, what = _parse(values, time_type, tz)
    except pl.exceptions.PolarsError as exc:  # e.g. no format can be inferred from the first value
        raise TimeValuesError(f"time column {name!r} (declared type {time_type!r}): its values cannot be read "
                              f"({str(exc).strip().splitlines()[0][:120]}), e.g. {_examples(values)}") from None
    out = out.alias(name)
    lost = values.is_not_null() & out.is_null()
    if lost.any():
        bad = values.filter(lost)
        raise TimeValuesError(f"time column {name!r} (declared type {time_type!r}): {bad.len()} value(s) cannot "
                              f"be read as {what}, e.g. {bad.head(3).to_list()}")
    return out


def _parse(values: pl.Series, time_type: str, tz: str) -> tuple[pl.Series, str]:
    name, src = values.name, values.dtype
    if time_type == "date":
        out = values.str.strip_chars().str.to_date(strict=False).cast(pl.Datetime("us"))
        what = "dates YYYY-MM-DD"
    elif time_type in ("datetime", "iso_string"):
        present = values.drop_nulls()
        aware = present.str.contains(_OFFSET)
        if aware.any() and not aware.all():
            mixed = present.filter(~aware).head(2).to_list() + present.filter(aware).head(2).to_list()
            raise TimeValuesError(f"time column {name!r} (declared type {time_type!r}) mixes timestamps with and "
                                  f"without a UTC offset, e.g. {mixed}: their order cannot be known")
        if aware.any():
            out = (values.str.replace(" ", "T").str.to_datetime(format="%+", strict=False, time_unit="us")
                   .dt.convert_time_zone(tz).dt.replace_time_zone(None))
        else:
            out = values.str.to_datetime(strict=False, time_unit="us")
        what = "ISO 8601 timestamps" if time_type == "iso_string" else "timestamps"
    else:
        number = values.str.strip_chars().cast(pl.Float64, strict=False) if src == pl.String \
            else values.cast(pl.Float64)
        n = pl.col("n")
        if time_type == "year":  # a whole number of a calendar year; anything else is not read
            ok = (n % 1 == 0) & (n >= 1) & (n <= 9999)
            expr = pl.datetime(pl.when(ok).then(n).cast(pl.Int64), 1, 1, time_unit="us")
            what = "whole years such as 2019"
        else:
            scale = 1_000_000 if time_type == "epoch_s" else 1_000
            micros = (n * scale).round(0)
            expr = (pl.from_epoch(pl.when(micros.abs() < 2 ** 53).then(micros).cast(pl.Int64), time_unit="us")
                    .dt.replace_time_zone("UTC").dt.convert_time_zone(tz).dt.replace_time_zone(None))
            what = f"{'seconds' if time_type == 'epoch_s' else 'milliseconds'} since 1970-01-01 UTC"
        out = pl.DataFrame({"n": number}).select(expr).to_series()
    return out, what


def format_times(values: pl.Series, time_type: str, tz: str = "UTC") -> pl.Series:
    """The inverse of `parse_times`: naive timestamps (in `tz`) written the way `time_type` stores them. The
    simulator lands records so, as the data set's producer would."""
    if time_type == "date":
        return values.dt.date()
    if time_type == "year":
        return values.dt.year().cast(pl.Int64)
    if time_type == "iso_string":
        return values.dt.to_string("%Y-%m-%dT%H:%M:%S%.f")
    if time_type in ("epoch_s", "epoch_ms"):
        aware = values.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null")
        return aware.dt.epoch("s" if time_type == "epoch_s" else "ms")
    return values


# --- reading files -----------------------------------------------------------------------------------

def source_name(spec: DatasetSpec, part: str) -> str:
    """How a part of the source is named in messages: the loader, or the setting and its pattern."""
    if spec.loader:
        return f"{spec.loader} ({part})"
    return f"source.{part} {getattr(spec, f'source_{part}')!r}"


def _base(spec: DatasetSpec) -> Path:
    return Path(spec.path).parent if spec.path else Path.cwd()


def source_files(spec: DatasetSpec, part: str) -> list[Path]:
    """The files of `source.<part>` in sorted order: a path, a glob (`**` recurses) or a folder (its Parquet and
    CSV files), relative to the spec file's folder unless absolute. Raises SettingError if nothing matches."""
    pattern = getattr(spec, f"source_{part}")
    full = os.path.expanduser(pattern)
    if not os.path.isabs(full):
        full = str(_base(spec) / full)
    if os.path.isdir(full):
        found = [p for p in Path(full).iterdir() if p.is_file() and p.suffix.lower() in FORMATS]
    else:
        found = [Path(p) for p in glob.glob(full, recursive=True) if os.path.isfile(p)]
    found = sorted(p for p in found if not p.name.startswith((".", "_")))
    if not found:
        raise SettingError(f"{spec.path}: setting 'source.{part}' ({pattern!r}) matches no file "
                           f"(looked for {full})")
    return found


def _format(spec: DatasetSpec, part: str, path: Path) -> str:
    if spec.source_format:
        if spec.source_format not in ("parquet", "csv"):
            raise SettingError(f"{spec.path}: setting 'source.format' must be parquet or csv, "
                               f"got {spec.source_format!r}")
        return spec.source_format
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SettingError(f"{spec.path}: setting 'source.{part}' matches {path}, whose extension "
                           f"{path.suffix or '(none)'!r} is neither .parquet nor .csv: set 'source.format'")
    return fmt


def _read_file(spec: DatasetSpec, part: str, path: Path) -> pl.DataFrame:
    fmt = _format(spec, part, path)
    try:
        if fmt == "parquet":
            return pl.read_parquet(path)
        return pl.read_csv(path, infer_schema_length=None)
    except Exception as exc:  # noqa: BLE001 - polars raises many kinds for unreadable input
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SettingError(f"{spec.path}: setting 'source.{part}' ({getattr(spec, f'source_{part}')!r}): file "
                           f"{path} cannot be read as {fmt} ({type(exc).__name__}: {first[:300]})") from None


def _with_times(spec: DatasetSpec, part: str, path: Path, df: pl.DataFrame) -> pl.DataFrame:
    """The file's time column (if it has one) read as `time_column.type`: files of one source may store it
    differently (text in CSV, timestamps in Parquet) and still agree."""
    t = spec.time_column
    if t not in df.columns:
        return df
    try:
        return df.with_columns(parse_times(df[t], spec.time_type, spec.timezone))
    except TimeValuesError as exc:
        raise SettingError(f"{spec.path}: setting 'source.{part}' ({getattr(spec, f'source_{part}')!r}): file "
                           f"{path}: {exc}") from None


def read_files(spec: DatasetSpec, part: str, files: list[Path]) -> pl.DataFrame:
    """The files of one part as one frame, the time column read as its declared type. Every file must have the
    same columns (in any order) and the same kind of values in each column (whole and decimal numbers mix;
    numbers and text do not)."""
    pattern = getattr(spec, f"source_{part}")
    where = f"{spec.path}: setting 'source.{part}' ({pattern!r})"
    frames = [(p, _with_times(spec, part, p, _read_file(spec, part, p))) for p in files]
    first_path, first = frames[0]
    columns = first.columns
    for path, df in frames[1:]:
        missing = [c for c in columns if c not in df.columns]
        extra = [c for c in df.columns if c not in columns]
        if missing or extra:
            col = (missing or extra)[0]
            raise SettingError(f"{where}: file {path} {'lacks' if missing else 'has'} column {col!r}, which "
                               f"{first_path.name} {'has' if missing else 'lacks'} (the files of one source must "
                               f"have the same columns; missing {missing}, extra {extra})")
    for col in columns:
        seen: dict = {}
        for path, df in frames:
            dtype = df.schema[col]
            if dtype == pl.Null:
                continue
            kind = "number" if dtype.is_numeric() else dtype.base_type()
            if seen and kind not in seen:
                other_path, other = next(iter(seen.values()))
                raise SettingError(f"{where}: column {col!r} is {dtype} in file {path} but {other} in file "
                                   f"{other_path} (the files of one source must agree)")
            seen.setdefault(kind, (path, dtype))
    try:
        return pl.concat([df.select(columns) for _, df in frames], how="vertical_relaxed")
    except Exception as exc:  # noqa: BLE001 - e.g. timestamps in different time zones
        raise SettingError(f"{where}: the files cannot be combined ({type(exc).__name__}: "
                           f"{str(exc).strip()[:300]})") from None


def _cache_dir() -> Path:
    return Path(os.environ.get("MLP_CACHE_DIR", str(ROOT / ".state" / "cache"))) / "sources"


def _read_part_cached(spec: DatasetSpec, part: str) -> pl.DataFrame:
    """One part's files, cached by their paths, sizes and mtimes (and the settings that say how to read them)."""
    files = source_files(spec, part)
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    how = [spec.source_format, spec.time_column, spec.time_type, spec.timezone]
    key = hashlib.sha256(json.dumps([stats, how]).encode()).hexdigest()[:20]
    cache = _cache_dir() / "files"
    stem = f"{spec.name}-{part}-"
    path = cache / f"{stem}{key}.parquet"
    if path.exists():
        try:
            return pl.read_parquet(path)
        except Exception:  # noqa: BLE001 - a damaged cache entry is read again from the files
            pass
    df = read_files(spec, part, files)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{path.name}.{os.getpid()}.tmp"
        df.write_parquet(tmp)
        tmp.replace(path)
        for old in cache.glob(f"{stem}*.parquet"):  # earlier versions of these files
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:
        pass  # the cache is an optimisation only
    return df


def _files_source(spec: DatasetSpec):
    """(reference, production, labels) as polars frames from the spec's files."""
    if not spec.source_reference:
        raise SettingError(f"{spec.path}: setting 'source.reference' is missing: give either source.loader "
                           f"(module:function) or source.reference (a file or glob of Parquet/CSV files)")
    reference = _read_part_cached(spec, "reference")
    if spec.target not in reference.columns:
        raise SettingError(f"{spec.path}: the reference files ({source_name(spec, 'reference')}) have no target "
                           f"column {spec.target!r} (setting 'target.name'); columns: {reference.columns[:20]}")
    ids, y = spec.id_column, spec.target
    empty_labels = pl.DataFrame(schema={ids: pl.Int64, y: pl.Float64})
    if spec.source_production:
        production = _read_part_cached(spec, "production")
    else:  # no replay: an empty production period with the reference's columns
        production = reference.clear()
    if spec.source_labels:
        labels = _read_part_cached(spec, "labels")
        for col in (ids, y):
            if col not in labels.columns:
                raise SettingError(f"{spec.path}: the label files ({source_name(spec, 'labels')}) have no column "
                                   f"{col!r} (settings 'id_column' / 'target.name'); columns: {labels.columns[:20]}")
        labels = labels.select(ids, y)
    elif y in production.columns and ids in production.columns:
        labels = production.select(ids, y)
    else:
        labels = empty_labels
    if y in production.columns:
        production = production.drop(y)
    return reference, production, labels


# --- the source --------------------------------------------------------------------------------------

def normalize_time_column(spec: DatasetSpec, frame, part: str):
    """The frame (pandas) with its time column read as `time_column.type` into naive datetimes in the spec's
    timezone. Text under the type `datetime` is left as it is (it is checked, and read by each consumer)."""
    import pandas as pd

    t = spec.time_column
    if t not in frame.columns:
        raise SettingError(f"{spec.path}: setting 'time_column' names {t!r}, which the {part} data of "
                           f"{source_name(spec, part)} does not have (columns: {list(frame.columns)[:20]})")
    if spec.time_type not in TIME_TYPES:
        raise SettingError(f"{spec.path}: setting 'time_column.type' must be one of {list(TIME_TYPES)}, "
                           f"got {spec.time_type!r}")
    col = frame[t]
    if spec.time_type == "datetime" and (pd.api.types.is_object_dtype(col) or pd.api.types.is_string_dtype(col)
                                         or (col.dtype.kind == "M" and getattr(col.dt, "tz", None) is None)):
        return frame
    try:
        parsed = parse_times(pl.from_pandas(col.reset_index(drop=True)).alias(t), spec.time_type, spec.timezone)
    except TimeValuesError as exc:
        raise SettingError(f"{spec.path}: the {part} data of {source_name(spec, part)}: {exc}") from None
    frame = frame.copy()
    frame[t] = parsed.to_pandas().to_numpy()
    return frame


def check_time_column(spec: DatasetSpec, frame, part: str) -> None:
    """The source's time column must hold timestamps, and production ones must fall inside a batch
    period: otherwise every caller (simulator, reference_data) would silently see zero batches."""
    import pandas as pd

    t = spec.time_column
    if t not in frame.columns:
        raise SettingError(f"{spec.path}: setting 'time_column' names {t!r}, which the {part} data of "
                           f"{source_name(spec, part)} does not have (columns: {list(frame.columns)[:20]})")
    col = frame[t]
    if col.dtype.kind in "iufb":
        raise SettingError(
            f"{spec.path}: setting 'time_column' {t!r} holds numbers in the {part} data of {source_name(spec, part)} "
            f"(range found {col.min()}..{col.max()}), not timestamps: convert it to dates/times in the loader, or "
            f"declare its type (time_column: {{name: {t}, type: epoch_s | epoch_ms | year}})")
    try:
        values = pd.to_datetime(col, utc=False) if col.dtype.kind != "M" else col
    except (ValueError, TypeError) as exc:
        raise SettingError(f"{spec.path}: setting 'time_column' {t!r} of the {part} data of "
                           f"{source_name(spec, part)} cannot be read as timestamps ({exc})") from None
    if getattr(values.dt, "tz", None) is not None:
        values = values.dt.tz_convert(spec.timezone).dt.tz_localize(None)
    if part != "production" or values.isna().all():
        return
    start, end = pd.Timestamp(spec.batch_start), pd.Timestamp(spec.batch_end)
    inside = ((values >= start) & (values < end)).sum()
    if inside == 0:
        typed = f" (read as type {spec.time_type!r})" if spec.time_type != "datetime" else ""
        raise SettingError(
            f"{spec.path}: no production value of time_column {t!r}{typed} falls inside the batch periods "
            f"[{spec.batch_start}, {spec.batch_end}) (settings 'batch.start'/'batch.end'); range found "
            f"{values.min()}..{values.max()}")


def has_production(spec: DatasetSpec) -> bool:
    """Whether the source has a production period to replay (a loader always does; files only with
    `source.production`)."""
    return bool(spec.loader or spec.source_production)


def _loader_source(spec: DatasetSpec):
    """The loader's output, cached as Parquet under the state dir: importing a package such as nannyml costs
    ~10 s, and the source does not change for a given loader."""
    import pandas as pd

    cache = _cache_dir() / spec.loader.replace(":", "__")
    if all((cache / f"{p}.parquet").exists() for p in PARTS):
        return [pd.read_parquet(cache / f"{p}.parquet") for p in PARTS]
    module, _, func = spec.loader.partition(":")
    os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        raise SettingError(f"{spec.path}: source.loader {spec.loader!r} cannot be imported: {exc}") from None
    frames = list(fn())
    cache.mkdir(parents=True, exist_ok=True)
    for p, f in zip(PARTS, frames):
        f.to_parquet(cache / f".{p}.tmp")
        (cache / f".{p}.tmp").replace(cache / f"{p}.parquet")
    return frames


def load_source(spec: DatasetSpec):
    """(reference, production, production_labels) as pandas, from the spec's loader or its files; the time
    column read as its declared type and checked. `production` is empty when the source has none."""
    if spec.loader:
        reference, production, labels = _loader_source(spec)
    else:
        reference, production, labels = (f.to_pandas() for f in _files_source(spec))
    reference = normalize_time_column(spec, reference, "reference")
    production = normalize_time_column(spec, production, "production")
    check_time_column(spec, reference, "reference")
    check_time_column(spec, production, "production")
    drop = set(spec.drop_columns)
    return (reference.drop(columns=[c for c in drop if c in reference.columns]),
            production.drop(columns=[c for c in drop if c in production.columns]),
            labels)
