"""Chunking layer: split data into chunks and count every feature's values per chunk.

``tabulate`` is the only entry point the engine needs. It runs the polars queries (lazy, streaming for
LazyFrame input) and returns

* ``Chunks``: the chunk metadata (keys, labels, start/end, rows), or a ``problem`` when the data cannot be
  chunked or has no rows;
* per feature, the non-null count of every chunk and a (chunk, distinct value, count) table, sorted by
  (chunk, value): a polars frame with columns ``__chunk``, ``v``, ``n``, or already numpy arrays
  ``(chunk position, value, count)`` (``table_arrays`` turns either into arrays).

See the "Chunking" and "Performance / memory" sections of :mod:`drift.engine` for the semantics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np
import polars as pl

from mlplatform.drift.dtypes import dtype_name, is_temporal

# (chunk position, distinct value, count) arrays, sorted by (chunk, value)
ValueCounts = tuple[np.ndarray, np.ndarray, np.ndarray]
Table = Union[pl.DataFrame, ValueCounts]


@dataclass(frozen=True)
class ChunkSpec:
    """How to split data into chunks: ``kind`` is ``"size"``, ``"count"`` or ``"period"``."""

    kind: str = "size"
    size: int | None = None
    count: int | None = None
    period: str | None = None
    timestamp_column: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "size":
            if not isinstance(self.size, (int, np.integer)) or isinstance(self.size, bool) or self.size <= 0:
                raise ValueError(f"ChunkSpec(kind='size') needs a positive integer size, got {self.size!r}")
        elif self.kind == "count":
            if not isinstance(self.count, (int, np.integer)) or isinstance(self.count, bool) or self.count <= 0:
                raise ValueError(f"ChunkSpec(kind='count') needs a positive integer count, got {self.count!r}")
        elif self.kind == "period":
            if not self.period or not isinstance(self.period, str):
                raise ValueError("ChunkSpec(kind='period') needs a polars duration string, e.g. period='1mo'")
            if not self.timestamp_column:
                raise ValueError("ChunkSpec(kind='period') needs timestamp_column")
        else:
            raise ValueError(f"ChunkSpec kind must be 'size', 'count' or 'period', got {self.kind!r}")


@dataclass
class Chunks:
    """Chunk metadata of one data set (positions 0..C-1 in chunk order)."""

    keys: np.ndarray  # int64 internal chunk ids, sorted
    labels: list[str]
    starts: list[Any]
    ends: list[Any]
    rows: np.ndarray  # int64
    problem: str | None = None

    @property
    def n(self) -> int:
        return len(self.keys)

    @classmethod
    def unusable(cls, label: str, problem: str) -> "Chunks":
        """One placeholder chunk carrying the reason the data could not be chunked."""
        return cls(np.array([0]), [label], [None], [None], np.array([0]), problem=problem)


@dataclass
class Tabulation:
    """The chunks of one data set and, per usable feature, its non-null counts and value-count table."""

    chunks: Chunks
    non_null: dict[str, np.ndarray] = field(default_factory=dict)
    tables: dict[str, Table] = field(default_factory=dict)


def tabulate(lf: pl.LazyFrame, schema: pl.Schema, spec: ChunkSpec, continuous: Sequence[str],
             categorical: Sequence[str], data_name: str, streaming: bool) -> Tabulation:
    """Chunk ``lf`` by ``spec`` and count the values of the (usable) ``continuous`` and ``categorical`` columns.

    Continuous values are cast to Float64 with NaN as null; nulls are dropped from the value counts.
    """
    cont, cat = list(continuous), list(categorical)
    cols = cont + cat
    keep = list(cols)
    if spec.timestamp_column and spec.timestamp_column in schema and spec.timestamp_column not in keep:
        keep.append(spec.timestamp_column)
    lf = lf.select(keep) if keep else lf.select(pl.lit(0).alias("__dummy"))
    sub_schema = lf.collect_schema()
    clf, meta_exprs, chunk_problem = _chunk_frame(lf, sub_schema, spec, data_name, check_sorted=not streaming)
    if chunk_problem is not None:
        return Tabulation(Chunks.unusable("all", chunk_problem))

    for i, f in enumerate(cols):
        if f in cont:
            meta_exprs.append(pl.col(f).cast(pl.Float64).fill_nan(None).is_not_null().sum().alias(f"__nn{i}"))
        else:
            meta_exprs.append(pl.col(f).is_not_null().sum().alias(f"__nn{i}"))
    meta_q = clf.group_by("__chunk").agg(meta_exprs).sort("__chunk")
    tables: dict[str, Table] = {}
    if streaming:
        queries = [meta_q]
        for f in cols:
            queries.append(_value_count_query(clf, f, f in cont))
        # Lazy input: run the per-feature aggregations one at a time so that only one feature's
        # (chunk, value) table is being built at any moment; this bounds peak memory on large scans.
        frames = [q.collect(engine="streaming") for q in queries]
        meta = frames[0]
        for i, f in enumerate(cols):
            tables[f] = frames[1 + i]
    else:
        # In-memory input: materialise the chunked frame once; continuous features are then sorted per
        # chunk with numpy (much cheaper than a (chunk, value) group-by with ~one group per row).
        cdf = clf.with_columns(
            [pl.col(f).cast(pl.Float64).fill_nan(None).alias(f"__cv{i}") for i, f in enumerate(cont)]
        ).collect()
        clazy = cdf.lazy()
        fast = _numpy_meta(cdf, cols, cont, spec) if spec.kind in ("size", "count") else None
        if fast is not None:
            meta, fast_tables = fast
            tables.update(fast_tables)
            slow_cat = [f for f in cat if f not in fast_tables]
            frames = pl.collect_all([_value_count_query(clazy, f, False) for f in slow_cat]) if slow_cat else []
        else:
            slow_cat = cat
            frames = pl.collect_all([clazy.group_by("__chunk").agg(meta_exprs).sort("__chunk")]
                                    + [_value_count_query(clazy, f, False) for f in cat])
            meta, frames = frames[0], frames[1:]
        for i, f in enumerate(slow_cat):
            tables[f] = frames[i]
        if meta.height and cont:
            keys0 = meta.get_column("__chunk").to_numpy().astype(np.int64)
            chunk_ids = cdf.get_column("__chunk").to_numpy().astype(np.int64)
            if keys0[0] == 0 and keys0[-1] == keys0.size - 1:
                pos_rows = chunk_ids
            else:
                pos_rows = np.searchsorted(keys0, chunk_ids)
            order = None
            if pos_rows.size > 1 and not bool(np.all(pos_rows[1:] >= pos_rows[:-1])):
                order = np.argsort(pos_rows, kind="stable")
                pos_rows = pos_rows[order]
            lengths = np.bincount(pos_rows, minlength=keys0.size)
            for i, f in enumerate(cont):
                v = cdf.get_column(f"__cv{i}").to_numpy().astype(np.float64, copy=False)
                if order is not None:
                    v = v[order]
                tables[f] = sorted_runs(pos_rows, lengths, v)

    if meta.height == 0:
        return Tabulation(Chunks.unusable("none", f"{data_name} data has no rows"))
    non_null = {f: meta.get_column(f"__nn{i}").to_numpy().astype(np.int64) for i, f in enumerate(cols)}
    return Tabulation(_chunks_from_meta(meta, spec), non_null, tables)


def table_arrays(table: Table, keys: np.ndarray, continuous: bool) -> ValueCounts:
    """(chunk position, value, count) arrays of a value-count table (values Float64 or object strings)."""
    if isinstance(table, tuple):
        return table
    pos = np.searchsorted(keys, table.get_column("__chunk").to_numpy().astype(np.int64))
    cnt = table.get_column("n").to_numpy().astype(np.int64)
    vals = table.get_column("v").to_numpy()
    return pos, vals.astype(np.float64) if continuous else vals.astype(object), cnt


def _chunks_from_meta(meta: pl.DataFrame, spec: ChunkSpec) -> Chunks:
    keys = meta.get_column("__chunk").to_numpy().astype(np.int64)
    rows = meta.get_column("__rows").to_numpy().astype(np.int64)
    if spec.kind == "period":
        starts = meta.get_column("__start").to_list()
        labels = [str(s) for s in starts]
        ends = meta.select(pl.col("__start").dt.offset_by(spec.period)).to_series().to_list()
    else:
        rmin = meta.get_column("__rmin").to_list()
        rmax = meta.get_column("__rmax").to_list()
        labels = [f"[{a}:{b}]" for a, b in zip(rmin, rmax)]
        if spec.timestamp_column:
            starts = meta.get_column("__start").to_list()
            ends = meta.get_column("__end").to_list()
        else:
            starts = [None] * len(keys)
            ends = [None] * len(keys)
    return Chunks(keys, labels, starts, ends, rows)


def _chunk_frame(lf: pl.LazyFrame, schema: pl.Schema, spec: ChunkSpec, data_name: str,
                 check_sorted: bool = False):
    """Adds ``__chunk`` (Int64 id) and returns (lazyframe, meta aggregations, problem)."""
    ts = spec.timestamp_column
    ts_expr = None
    if ts:
        if ts not in schema:
            return None, None, f"timestamp column '{ts}' is missing from the {data_name} data: cannot chunk"
        dtype = schema[ts]
        if is_temporal(dtype):
            ts_expr = pl.col(ts)
        elif dtype == pl.String:
            ts_expr = pl.col(ts).str.to_datetime(strict=False)
        else:
            return None, None, (
                f"timestamp column '{ts}' has type {dtype_name(dtype)}, expected a datetime, date or "
                "datetime string: cannot chunk"
            )
        lf = lf.with_columns(ts_expr.alias("__ts"))
    meta: list[pl.Expr] = [pl.len().alias("__rows")]
    if spec.kind in ("size", "count"):
        if ts:
            # A stable sort of data already in timestamp order (nulls last) is the identity: for in-memory
            # data check that cheaply and skip the sort (and the gather of every column) if so.
            if not (check_sorted and sorted_nulls_last(lf.select("__ts").collect().to_series())):
                lf = lf.sort("__ts", maintain_order=True, nulls_last=True)
            meta += [pl.col("__ts").min().alias("__start"), pl.col("__ts").max().alias("__end")]
        lf = lf.with_row_index("__row")
        if spec.kind == "size":
            chunk_expr = pl.col("__row").cast(pl.Int64) // int(spec.size)
        else:
            n = lf.select(pl.len()).collect().item()
            chunk_expr = (pl.col("__row").cast(pl.Int64) * int(spec.count)) // max(int(n), 1)
        lf = lf.with_columns(chunk_expr.alias("__chunk"))
        meta += [pl.col("__row").min().alias("__rmin"), pl.col("__row").max().alias("__rmax")]
    else:
        trunc = pl.col("__ts").dt.truncate(spec.period)
        lf = lf.filter(pl.col("__ts").is_not_null()).with_columns(
            trunc.alias("__pstart"), trunc.to_physical().cast(pl.Int64).alias("__chunk")
        )
        meta += [pl.col("__pstart").first().alias("__start")]
    return lf, meta, None


def _numpy_meta(cdf: pl.DataFrame, cols: list[str], cont: list[str], spec: ChunkSpec):
    """Chunk metadata of an in-memory size/count-chunked frame computed with numpy from the chunk boundaries
    (``__chunk`` is non-decreasing along the rows), the same table as ``group_by("__chunk").agg(meta)``.
    Also returns the (chunk, value, count) tables of Boolean categorical features. None = use polars."""
    n = cdf.height
    if n == 0:
        return None
    ts = cdf.get_column("__ts") if spec.timestamp_column else None
    if ts is not None and ts.null_count():
        return None
    chunk_ids = cdf.get_column("__chunk").to_numpy().astype(np.int64, copy=False)
    bounds = np.flatnonzero(chunk_ids[1:] != chunk_ids[:-1]) + 1
    if bounds.size and bool(np.any(chunk_ids[bounds] < chunk_ids[bounds - 1])):
        return None
    starts = np.r_[0, bounds].astype(np.int64)
    ends = np.r_[bounds, n].astype(np.int64)
    rows = ends - starts
    c = starts.size
    data: dict[str, Any] = {"__chunk": chunk_ids[starts], "__rows": rows}
    if ts is not None:
        data["__start"] = ts.gather(starts)
        data["__end"] = ts.gather(ends - 1)
    data["__rmin"] = starts
    data["__rmax"] = ends - 1
    tables: dict[str, Table] = {}
    cont_idx = {f: i for i, f in enumerate(cont)}
    for i, f in enumerate(cols):
        if f in cont_idx:
            col = cdf.get_column(f"__cv{cont_idx[f]}")
            if col.null_count() == 0:
                nn = rows
            else:
                nn = np.add.reduceat(col.is_not_null().to_numpy().astype(np.int64), starts)
        else:
            col = cdf.get_column(f)
            has_null = col.null_count() > 0
            if has_null:
                nn = np.add.reduceat(col.is_not_null().to_numpy().astype(np.int64), starts)
            else:
                nn = rows
            if col.dtype == pl.Boolean:
                labels = pl.Series([False, True]).cast(pl.String).to_numpy().astype(object)
                b = col.fill_null(False).to_numpy().astype(np.int64)
                seg = np.repeat(np.arange(c, dtype=np.int64), rows)
                key = seg * 2 + b
                if has_null:
                    key = key[col.is_not_null().to_numpy()]
                counts = np.bincount(key, minlength=2 * c)
                nz = np.flatnonzero(counts)
                tables[f] = (nz // 2, labels[nz % 2], counts[nz].astype(np.int64))
        data[f"__nn{i}"] = nn
    return pl.DataFrame(data), tables


def _value_count_query(clf: pl.LazyFrame, f: str, continuous: bool) -> pl.LazyFrame:
    if not continuous:
        # group by the raw value and cast the (small) result: the cast to String is one-to-one for
        # categorical dtypes (string, categorical, enum, boolean, integer), so the counts are the same.
        return (
            clf.select(pl.col("__chunk"), pl.col(f).alias("v"))
            .drop_nulls()
            .group_by("__chunk", "v")
            .agg(pl.len().alias("n"))
            .with_columns(pl.col("v").cast(pl.String))
            .sort("__chunk", "v")
        )
    return (
        clf.select(pl.col("__chunk"), pl.col(f).cast(pl.Float64).fill_nan(None).alias("v"))
        .drop_nulls()
        .group_by("__chunk", "v")
        .agg(pl.len().alias("n"))
        .sort("__chunk", "v")
    )


def sorted_nulls_last(ts: pl.Series) -> bool:
    """True when ``ts`` is non-decreasing with all nulls at the end (so a stable sort would not move rows)."""
    nulls = ts.null_count()
    if nulls:
        if ts.tail(nulls).null_count() != nulls:
            return False
        ts = ts.head(ts.len() - nulls)
    return bool(ts.is_sorted())


def sorted_runs(pos: np.ndarray, lengths: np.ndarray, v: np.ndarray) -> ValueCounts:
    """(chunk position, distinct value, count) of the non-NaN values, sorted by (chunk, value).

    ``pos`` is non-decreasing (one entry per row), ``lengths`` the rows per chunk, ``v`` the values (NaN = null).
    Gives the same table as ``group_by(chunk, value).len().sort(chunk, value)``.
    """
    n = v.size
    c = lengths.size
    width = int(lengths.max(initial=0))
    if n == 0 or width == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0, dtype=np.int64)
    if c * width <= 2 * n + 4096:
        # Padded (chunks x width) matrix, NaN-filled: a row-wise sort puts every chunk's nulls/padding last.
        mat = np.full(c * width, np.nan)
        if c == 1 or bool(np.all(lengths[:-1] == width)):
            mat[:n] = v
        else:
            starts = np.cumsum(lengths) - lengths
            mat[pos * width + (np.arange(n) - np.repeat(starts, lengths))] = v
        mat = mat.reshape(c, width)
        mat.sort(axis=1)
        valid = ~np.isnan(mat)
        n_valid = valid.sum(axis=1)
        sv = mat[valid]
        sp = np.repeat(np.arange(c, dtype=np.int64), n_valid)
    else:
        keep = ~np.isnan(v)
        sv, sp = v[keep], pos[keep]
        o = np.lexsort((sv, sp))
        sv, sp = sv[o], sp[o]
    m = sv.size
    if m == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0, dtype=np.int64)
    new = np.empty(m, dtype=bool)
    new[0] = True
    np.not_equal(sv[1:], sv[:-1], out=new[1:])
    new[1:] |= sp[1:] != sp[:-1]
    idx = np.flatnonzero(new)
    cnt = np.diff(np.append(idx, m))
    return sp[idx], sv[idx], cnt.astype(np.int64)
