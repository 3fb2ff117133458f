"""The online path: the same feature SQL the dbt model runs, applied in DuckDB to request rows."""

from __future__ import annotations

from typing import Any

import polars as pl

from mlplatform.spec import DatasetSpec


def feature_sql(spec: DatasetSpec, relation: str) -> str:
    """The row-level feature SELECT of dbt's `features` model, rendered for `relation` (same expressions)."""
    cols = [f'"{spec.id_column}"', f'"{spec.time_column}"'] + [f'"{f.name}"' for f in spec.features]
    cols += [f'{f.expression} as "{f.name}"' for f in spec.engineered_features]
    return f"select {', '.join(cols)} from {relation}"


def online_features(rows: list[dict[str, Any]] | pl.DataFrame, spec: DatasetSpec) -> pl.DataFrame:
    import duckdb

    df = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(rows)
    con = duckdb.connect()
    try:
        con.register("request_rows", df.to_arrow())
        return con.execute(feature_sql(spec, "request_rows")).pl()
    finally:
        con.close()


def score(rows: list[dict[str, Any]] | pl.DataFrame, spec: DatasetSpec, booster) -> pl.DataFrame:
    from mlplatform import modeling

    feats = online_features(rows, spec)
    return feats.select(spec.id_column).with_columns(pl.Series("prediction", modeling.predict(booster, feats, spec)))
