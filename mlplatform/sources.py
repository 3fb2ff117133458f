"""Where a data set's rows come from: a Python loader named by the spec (`source.loader: module:function`),
returning (reference, production, production_labels) frames. Its output is cached as Parquet under the state
dir, and the time column is checked before anyone relies on it."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from mlplatform.spec import ROOT, DatasetSpec, SettingError


def check_time_column(spec: DatasetSpec, frame, part: str) -> None:
    """The source's time column must hold timestamps, and production ones must fall inside a batch
    period: otherwise every caller (simulator, reference_data) would silently see zero batches."""
    import pandas as pd

    t = spec.time_column
    if t not in frame.columns:
        raise SettingError(f"{spec.path}: setting 'time_column' names {t!r}, which the {part} data of "
                           f"{spec.loader!r} does not have (columns: {list(frame.columns)[:20]})")
    col = frame[t]
    if col.dtype.kind in "iufb":
        raise SettingError(
            f"{spec.path}: setting 'time_column' {t!r} holds numbers in the {part} data of {spec.loader!r} "
            f"(range found {col.min()}..{col.max()}), not timestamps: convert it to dates/times in the loader")
    try:
        values = pd.to_datetime(col, utc=False) if col.dtype.kind != "M" else col
    except (ValueError, TypeError) as exc:
        raise SettingError(f"{spec.path}: setting 'time_column' {t!r} of the {part} data of {spec.loader!r} "
                           f"cannot be read as timestamps ({exc})") from None
    if getattr(values.dt, "tz", None) is not None:
        values = values.dt.tz_convert(spec.timezone).dt.tz_localize(None)
    if part != "production" or values.isna().all():
        return
    start, end = pd.Timestamp(spec.batch_start), pd.Timestamp(spec.batch_end)
    inside = ((values >= start) & (values < end)).sum()
    if inside == 0:
        raise SettingError(
            f"{spec.path}: no production value of time_column {t!r} falls inside the batch periods "
            f"[{spec.batch_start}, {spec.batch_end}) (settings 'batch.start'/'batch.end'); range found "
            f"{values.min()}..{values.max()}")

def load_source(spec: DatasetSpec):
    """(reference, production, production_labels) from the spec's loader, as pandas.

    The loader's output is cached as Parquet under the state dir: importing a package such as
    nannyml costs ~10 s, and the source does not change for a given loader.
    """
    import pandas as pd

    cache = Path(os.environ.get("MLP_CACHE_DIR", str(ROOT / ".state" / "cache"))) / "sources" \
        / spec.loader.replace(":", "__")
    parts = ("reference", "production", "labels")
    if all((cache / f"{p}.parquet").exists() for p in parts):
        frames = [pd.read_parquet(cache / f"{p}.parquet") for p in parts]
    else:
        module, _, func = spec.loader.partition(":")
        os.environ.setdefault("NML_DISABLE_USAGE_LOGGING", "1")
        try:
            fn = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as exc:
            raise SettingError(f"{spec.path}: source.loader {spec.loader!r} cannot be imported: {exc}") from None
        frames = list(fn())
        cache.mkdir(parents=True, exist_ok=True)
        for p, f in zip(parts, frames):
            f.to_parquet(cache / f".{p}.tmp")
            (cache / f".{p}.tmp").replace(cache / f"{p}.parquet")
    reference, production, labels = frames
    check_time_column(spec, reference, "reference")
    check_time_column(spec, production, "production")
    drop = set(spec.drop_columns)
    return (reference.drop(columns=[c for c in drop if c in reference.columns]),
            production.drop(columns=[c for c in drop if c in production.columns]),
            labels)
