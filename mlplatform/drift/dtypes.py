"""Which polars dtypes each kind of feature (and the timestamp column) accepts."""

from __future__ import annotations

import polars as pl


def is_numeric(dtype: pl.DataType) -> bool:
    return dtype.is_numeric()


def is_categorical(dtype: pl.DataType) -> bool:
    return (
        dtype == pl.String
        or dtype == pl.Boolean
        or isinstance(dtype, (pl.Categorical, pl.Enum))
        or dtype.is_integer()
    )


def is_temporal(dtype: pl.DataType) -> bool:
    return isinstance(dtype, pl.Datetime) or dtype == pl.Date


def dtype_name(dtype: pl.DataType) -> str:
    return str(dtype)


CATEGORICAL_TYPES = "categorical (string, categorical, enum, boolean or integer)"
