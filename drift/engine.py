"""A fast univariate drift engine on polars.

Overview
--------
``DriftEngine`` compares the distribution of every feature in every chunk of the analysis data with the
reference data, for a set of methods:

============== ========================= ==========================================================
method         feature types             definition
============== ========================= ==========================================================
psi            continuous, categorical   textbook PSI ``sum((a - r) * ln(a / r))``. Continuous: bins
                                         are the reference quantiles ``np.quantile(ref, linspace(0, 1,
                                         psi_bins + 1)[1:-1])`` (deduplicated), extended to -inf/+inf,
                                         bins are right-closed ``(e_i, e_i+1]``. Categorical: one bin per
                                         category seen in the reference or the chunk. Empty-bin
                                         proportions (either side) are replaced by ``psi_smoothing``.
ks             continuous                two-sample Kolmogorov-Smirnov statistic and p-value, identical
                                         to ``scipy.stats.ks_2samp(ref, chunk)`` (method='auto': exact
                                         p-value if max(n_ref, n_chunk) <= 10 000, else ``kstwo.sf``,
                                         here evaluated for all chunks at once, <= ~1e-10 relative from
                                         scipy; ``ks_p_value="asymptotic"`` uses the limit
                                         ``kstwobign`` instead, ~1% off). NOTE: NannyML
                                         0.13 uses a *binned
                                         estimate* of the KS statistic once the reference has >= 10 000
                                         rows; this engine is always exact.
chi2           categorical               statistic and p-value of ``scipy.stats.chi2_contingency`` on
                                         the (category x [reference, chunk]) count table (with Yates'
                                         correction when dof == 1, as scipy does by default).
jensen_shannon continuous, categorical   as NannyML 0.13.1 (Doane bins fitted on the reference for
                                         continuous features, one bin per reference category for
                                         categoricals, plus a "leftover" bin for chunk mass outside).
hellinger      continuous, categorical   as NannyML 0.13.1 (same bins as jensen_shannon).
wasserstein    continuous                as NannyML 0.13.1: exact ``scipy.stats.wasserstein_distance``
                                         when the reference has < 10 000 non-null values, otherwise
                                         NannyML's binned estimate (10 000 equal-width bins on the
                                         reference range, plus exact tail terms outside that range).
l_infinity     categorical               as NannyML 0.13.1: ``max |p_ref(c) - p_chunk(c)|``.
============== ========================= ==========================================================

A method that does not apply to a feature type (e.g. ``chi2`` for a continuous feature) is skipped: it
yields no rows for that feature.

Null handling: nulls (and float NaN) are dropped per feature before computing, like NannyML does.

Thresholds and alerts
---------------------
``threshold="std"``: for every (feature, method) the values over the *reference chunks* (those with
status ``ok``) give ``mean +/- std_multiplier * std`` with ``ddof=0`` (NannyML's
``StandardDeviationThreshold`` uses ``np.nanmean``/``np.nanstd``). Like NannyML's
``calculate_threshold_values`` a lower threshold ``<= 0`` is replaced by ``0`` (all methods are >= 0) and
the KS upper threshold is capped at 1. A chunk alerts when ``value < lower`` or ``value > upper``.

``threshold="constant"``: ``constant_thresholds={"psi": 0.2, "ks": (None, 0.1), ...}``; a number is the
upper threshold, a ``(lower, upper)`` pair gives both. Methods not listed get no thresholds (no alert).

``ks`` is thresholded like the other distances (on its statistic, like NannyML 0.13), its p-value is
reported in ``p_value`` for information. ``chi2`` alerts on ``p_value < chi2_alpha`` (default 0.05, as
NannyML does) because the chi2 statistic grows with the chunk size; its threshold columns are null -
unless ``threshold="constant"`` and ``constant_thresholds`` has a ``"chi2"`` entry, which is then applied
to the statistic.

Bad input
---------
Configuration errors (unknown method, invalid ``ChunkSpec``) raise ``ValueError`` immediately. Data
problems never raise and never give a silent NaN: the affected rows get ``value = null``,
``p_value = null``, ``alert = False`` and a human-readable ``status`` (anything other than ``"ok"``), e.g.

* ``column 'x' is missing from the analysis data`` / ``... from the reference data``
* ``column 'x' has type String, expected numeric``
* ``column 'x' is all null in this chunk``
* ``column 'x' has only 57 non-null values in this chunk, fewer than the minimum 200``
* ``chunk has 120 rows, fewer than the minimum 200``
* ``reference column 'x' is constant: PSI/KS not informative`` (psi and ks only; the other methods are
  still computed, a constant reference gives zero-spread thresholds so any change alerts)
* ``timestamp column 't' is missing from the analysis data: cannot chunk``

Problem rows never alert (``alert`` is False); callers that must block on them should check
``summary(result)["problems"]`` (non-empty when any row has a status other than ``ok``).

Chunking
--------
``ChunkSpec(kind="size", size=N)``: consecutive rows of N (last chunk may be smaller, as NannyML's
``incomplete='keep'``), ordered by ``timestamp_column`` (stable sort) when given, keys ``"[start:end]"``
(0-based inclusive row positions). ``kind="count"``: ``count`` chunks whose sizes differ by at most one
row (NannyML instead makes ``count`` chunks of ``n // count`` rows plus a remainder chunk).
``kind="period"``: calendar periods ``ts.dt.truncate(period)`` (polars duration strings, e.g. ``"1mo"``,
``"1w"``, ``"1d"``); rows with a null timestamp are ignored; key is the period start; ``chunk_start`` is
the period start and ``chunk_end`` the start of the next period (exclusive). For size/count chunks
``chunk_start``/``chunk_end`` are the first/last timestamp in the chunk (null without timestamp column).
A String timestamp column is parsed with ``str.to_datetime(strict=False)``.

Performance / memory
--------------------
The analysis data is only touched through polars lazy queries selecting the needed columns: one query
for the chunk metadata and one ``group_by([chunk, value]).len()`` per feature, run together with
``pl.collect_all`` (streaming engine for LazyFrame input). For in-memory (non-streaming) input the chunked
frame is materialised once, the timestamp sort is skipped when the data is already in order, and continuous
features are sorted per chunk with numpy (a padded chunks x rows matrix) and run-length encoded into the same
(chunk, value, count) table instead of a polars group-by. All metrics are computed with vectorised numpy
from those (chunk, distinct value, count) tables - never per row in Python. The reference data is
materialised (only the needed columns), so it must fit in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import polars as pl
from scipy import special, stats

METHODS = ("psi", "ks", "chi2", "jensen_shannon", "wasserstein", "hellinger", "l_infinity")
CONTINUOUS_METHODS = ("psi", "ks", "jensen_shannon", "wasserstein", "hellinger")
CATEGORICAL_METHODS = ("psi", "chi2", "jensen_shannon", "hellinger", "l_infinity")
P_VALUE_METHODS = ("ks", "chi2")

# NannyML 0.13.1 switches Wasserstein to its binned estimate at this reference size, with this many bins.
NANNYML_EXACT_LIMIT = 10_000
NANNYML_WASSERSTEIN_BINS = 10_000

# ks_2samp(method='auto') computes the exact p-value when max(n1, n2) <= 10 000 (a local constant in scipy).
_KS_MAX_AUTO_N = 10_000
try:  # scipy's private helper used by ks_2samp; without it we fall back to the asymptotic formula
    from scipy.stats._stats_py import _attempt_exact_2kssamp as _scipy_exact_ks
except Exception:  # pragma: no cover - depends on the scipy version
    _scipy_exact_ks = None



def _is_numeric(dtype: pl.DataType) -> bool:
    return dtype.is_numeric()


def _is_categorical(dtype: pl.DataType) -> bool:
    return dtype == pl.String or dtype == pl.Boolean or isinstance(dtype, (pl.Categorical, pl.Enum)) or dtype.is_integer()


def _is_temporal(dtype: pl.DataType) -> bool:
    return isinstance(dtype, pl.Datetime) or dtype == pl.Date


OK = "ok"
RESULT_SCHEMA = {
    "chunk_index": pl.Int64,
    "chunk_key": pl.String,
    "chunk_start": pl.Datetime("us"),
    "chunk_end": pl.Datetime("us"),
    "rows": pl.Int64,
    "feature": pl.String,
    "method": pl.String,
    "value": pl.Float64,
    "p_value": pl.Float64,
    "lower_threshold": pl.Float64,
    "upper_threshold": pl.Float64,
    "alert": pl.Boolean,
    "status": pl.String,
}


def _dtype_name(dtype: pl.DataType) -> str:
    return str(dtype)


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
class _Chunks:
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


class DriftEngine:
    """Univariate drift between a reference data set and chunks of analysis data (see module docstring)."""

    def __init__(
        self,
        continuous: Sequence[str] = (),
        categorical: Sequence[str] = (),
        methods: Sequence[str] = ("psi", "ks", "jensen_shannon", "wasserstein", "hellinger", "chi2", "l_infinity"),
        psi_bins: int = 10,
        psi_smoothing: float = 1e-4,
        threshold: str = "std",
        std_multiplier: float = 3.0,
        constant_thresholds: Mapping[str, Any] | None = None,
        min_chunk_rows: int = 200,
        chi2_alpha: float = 0.05,
        streaming: bool | None = None,
        ks_p_value: str = "scipy",
    ) -> None:
        if isinstance(continuous, str):
            continuous = [continuous]
        if isinstance(categorical, str):
            categorical = [categorical]
        if isinstance(methods, str):
            methods = [methods]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown drift method(s) {unknown}; choose from {list(METHODS)}")
        overlap = set(continuous) & set(categorical)
        if overlap:
            raise ValueError(f"feature(s) {sorted(overlap)} listed as both continuous and categorical")
        if threshold not in ("std", "constant"):
            raise ValueError(f"threshold must be 'std' or 'constant', got {threshold!r}")
        if threshold == "constant" and not constant_thresholds:
            raise ValueError("threshold='constant' needs constant_thresholds={method: upper or (lower, upper)}")
        if ks_p_value not in ("scipy", "asymptotic"):
            raise ValueError("ks_p_value must be 'scipy' or 'asymptotic'")
        if int(psi_bins) < 2:
            raise ValueError("psi_bins must be >= 2")
        self.continuous = list(dict.fromkeys(continuous))
        self.categorical = list(dict.fromkeys(categorical))
        self.methods = tuple(dict.fromkeys(methods))
        self.psi_bins = int(psi_bins)
        self.psi_smoothing = float(psi_smoothing)
        self.threshold = threshold
        self.std_multiplier = float(std_multiplier)
        self.constant_thresholds = dict(constant_thresholds or {})
        self.min_chunk_rows = int(min_chunk_rows)
        self.chi2_alpha = float(chi2_alpha)
        self.streaming = streaming
        self.ks_p_value = ks_p_value
        self._state: dict[str, dict[str, Any]] = {}
        self._thresholds: dict[tuple[str, str], tuple[float | None, float | None]] = {}
        self.reference_result: pl.DataFrame | None = None
        self.reference_chunk: ChunkSpec | None = None
        self._fitted = False

    # ------------------------------------------------------------------ public API
    def fit(self, reference: pl.DataFrame | pl.LazyFrame, chunk: ChunkSpec) -> "DriftEngine":
        """Fit reference statistics and thresholds (from the values over reference chunks)."""
        lf = reference.lazy() if isinstance(reference, pl.DataFrame) else reference
        schema = lf.collect_schema()
        needed = [c for c in self._features() if c in schema]
        if chunk.timestamp_column and chunk.timestamp_column in schema and chunk.timestamp_column not in needed:
            needed.append(chunk.timestamp_column)
        ref_df = lf.select(needed).collect()
        self._state = {}
        for feature in self.continuous:
            self._state[feature] = self._fit_continuous(feature, ref_df, schema)
        for feature in self.categorical:
            self._state[feature] = self._fit_categorical(feature, ref_df, schema)
        self._fitted = True
        self.reference_chunk = chunk

        raw = self._compute(ref_df.lazy(), ref_df.collect_schema(), chunk, data_name="reference", streaming=False)
        self._thresholds = self._fit_thresholds(raw)
        self.reference_result = self._assemble(raw)
        return self

    def calculate(self, analysis: pl.DataFrame | pl.LazyFrame, chunk: ChunkSpec | None = None) -> pl.DataFrame:
        """Drift of every chunk of ``analysis`` vs the reference, as a long table (see module docstring)."""
        if not self._fitted:
            raise RuntimeError("DriftEngine.calculate called before fit")
        chunk = chunk or self.reference_chunk
        is_lazy = isinstance(analysis, pl.LazyFrame)
        lf = analysis if is_lazy else analysis.lazy()
        streaming = self.streaming if self.streaming is not None else is_lazy
        schema = lf.collect_schema()
        raw = self._compute(lf, schema, chunk, data_name="analysis", streaming=streaming)
        return self._assemble(raw)

    def summary(self, result: pl.DataFrame) -> dict:
        """Short machine-readable summary of a result table."""
        alerts = result.filter(pl.col("alert"))
        by_feature: dict[str, list[str]] = {}
        for feature, method in alerts.select("feature", "method").unique(maintain_order=True).iter_rows():
            by_feature.setdefault(feature, [])
            if method not in by_feature[feature]:
                by_feature[feature].append(method)
        chunks = result.select("chunk_index", "chunk_key").unique(maintain_order=True).sort("chunk_index")
        problems = (
            result.filter(pl.col("status") != OK).get_column("status").unique(maintain_order=True).to_list()
        )
        return {
            "alerts_by_feature": by_feature,
            "alerting_features": list(by_feature),
            "n_alerts": alerts.height,
            "chunks": chunks.get_column("chunk_key").to_list(),
            "problems": problems,
        }

    # ------------------------------------------------------------------ fitting
    def _features(self) -> list[str]:
        return self.continuous + self.categorical

    def _methods_for(self, feature: str) -> list[str]:
        allowed = CONTINUOUS_METHODS if feature in self.continuous else CATEGORICAL_METHODS
        return [m for m in self.methods if m in allowed]

    def _fit_continuous(self, feature: str, ref: pl.DataFrame, schema: pl.Schema) -> dict[str, Any]:
        st: dict[str, Any] = {"kind": "continuous", "problem": None}
        if feature not in schema:
            st["problem"] = f"column '{feature}' is missing from the reference data"
            return st
        if not _is_numeric(schema[feature]):
            st["problem"] = f"reference column '{feature}' has type {_dtype_name(schema[feature])}, expected numeric"
            return st
        values = ref.get_column(feature).cast(pl.Float64).fill_nan(None).drop_nulls().to_numpy()
        if values.size == 0:
            st["problem"] = f"reference column '{feature}' is all null"
            return st
        if not np.all(np.isfinite(values)):
            st["problem"] = f"reference column '{feature}' contains infinite values"
            return st
        n = values.size
        st["n_ref"] = n
        st["sorted"] = np.sort(values)
        st["constant"] = bool(st["sorted"][0] == st["sorted"][-1])
        # Jensen-Shannon / Hellinger: NannyML's Doane bins on the reference.
        edges = np.histogram_bin_edges(values, bins="doane")
        st["doane_edges"] = edges
        st["doane_p"] = np.histogram(values, bins=edges)[0] / n
        # PSI: reference quantile bins, right-closed, extended to -inf/+inf.
        inner = np.unique(np.quantile(values, np.linspace(0.0, 1.0, self.psi_bins + 1)[1:-1]))
        st["psi_inner"] = inner
        st["psi_ref_p"] = np.bincount(np.searchsorted(inner, values, side="left"), minlength=inner.size + 1) / n
        # Wasserstein: NannyML 'auto' -> exact below 10k reference values, binned estimate above.
        if n < NANNYML_EXACT_LIMIT:
            st["w_mode"] = "exact"
        else:
            counts, w_edges = np.histogram(values, bins=NANNYML_WASSERSTEIN_BINS)
            st["w_mode"] = "estimated"
            st["w_edges"] = w_edges
            st["w_ref_cdf"] = np.cumsum(counts / n)
            st["w_width"] = w_edges[1] - w_edges[0]
            st["w_min"] = w_edges[0]
            st["w_max"] = w_edges[-1]
        return st

    def _fit_categorical(self, feature: str, ref: pl.DataFrame, schema: pl.Schema) -> dict[str, Any]:
        st: dict[str, Any] = {"kind": "categorical", "problem": None}
        if feature not in schema:
            st["problem"] = f"column '{feature}' is missing from the reference data"
            return st
        if not _is_categorical(schema[feature]):
            st["problem"] = (
                f"reference column '{feature}' has type {_dtype_name(schema[feature])}, "
                "expected categorical (string, categorical, enum, boolean or integer)"
            )
            return st
        vc = (
            ref.select(pl.col(feature).cast(pl.String).alias("v"))
            .drop_nulls()
            .group_by("v")
            .agg(pl.len().alias("n"))
            .sort("v")
        )
        if vc.height == 0:
            st["problem"] = f"reference column '{feature}' is all null"
            return st
        st["cats"] = vc.get_column("v").to_numpy().astype(object)
        st["counts"] = vc.get_column("n").to_numpy().astype(np.int64)
        st["n_ref"] = int(st["counts"].sum())
        return st

    def _fit_thresholds(self, raw: dict) -> dict[tuple[str, str], tuple[float | None, float | None]]:
        out: dict[tuple[str, str], tuple[float | None, float | None]] = {}
        for (feature, method), res in raw["metrics"].items():
            if self.threshold == "constant":
                spec = self.constant_thresholds.get(method)
                if spec is None:
                    out[(feature, method)] = (None, None)
                elif isinstance(spec, (tuple, list)):
                    lo, up = spec
                    out[(feature, method)] = (None if lo is None else float(lo), None if up is None else float(up))
                else:
                    out[(feature, method)] = (None, float(spec))
                continue
            if method == "chi2":  # p-value based, like NannyML
                out[(feature, method)] = (None, None)
                continue
            ok = np.array([s == OK for s in res["status"]], dtype=bool)
            vals = res["value"][ok]
            vals = vals[np.isfinite(vals)]
            if vals.size == 0:
                out[(feature, method)] = (None, None)
                continue
            mean, std = float(np.mean(vals)), float(np.std(vals))  # ddof=0 like np.nanstd
            lower = mean - self.std_multiplier * std
            upper = mean + self.std_multiplier * std
            if lower <= 0.0:  # NannyML lower_threshold_value_limit=0 for every drift method
                lower = 0.0
            if method == "ks" and upper >= 1.0:  # NannyML upper_threshold_value_limit=1 for KS
                upper = 1.0
            out[(feature, method)] = (lower, upper)
        return out

    # ------------------------------------------------------------------ chunking
    def _chunk_frame(self, lf: pl.LazyFrame, schema: pl.Schema, spec: ChunkSpec, data_name: str,
                     check_sorted: bool = False):
        """Adds ``__chunk`` (Int64 id) and returns (lazyframe, meta aggregations, problem)."""
        ts = spec.timestamp_column
        ts_expr = None
        if ts:
            if ts not in schema:
                return None, None, f"timestamp column '{ts}' is missing from the {data_name} data: cannot chunk"
            dtype = schema[ts]
            if _is_temporal(dtype):
                ts_expr = pl.col(ts)
            elif dtype == pl.String:
                ts_expr = pl.col(ts).str.to_datetime(strict=False)
            else:
                return None, None, (
                    f"timestamp column '{ts}' has type {_dtype_name(dtype)}, expected a datetime, date or "
                    "datetime string: cannot chunk"
                )
            lf = lf.with_columns(ts_expr.alias("__ts"))
        meta: list[pl.Expr] = [pl.len().alias("__rows")]
        if spec.kind in ("size", "count"):
            if ts:
                # A stable sort of data already in timestamp order (nulls last) is the identity: for in-memory
                # data check that cheaply and skip the sort (and the gather of every column) if so.
                if not (check_sorted and _sorted_nulls_last(lf.select("__ts").collect().to_series())):
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

    # ------------------------------------------------------------------ core computation
    def _feature_problem(self, feature: str, schema: pl.Schema, data_name: str) -> str | None:
        st = self._state.get(feature, {})
        if st.get("problem"):
            return st["problem"]
        if feature not in schema:
            return f"column '{feature}' is missing from the {data_name} data"
        dtype = schema[feature]
        if st["kind"] == "continuous" and not _is_numeric(dtype):
            return f"column '{feature}' has type {_dtype_name(dtype)}, expected numeric"
        if st["kind"] == "categorical" and not _is_categorical(dtype):
            return (
                f"column '{feature}' has type {_dtype_name(dtype)}, "
                "expected categorical (string, categorical, enum, boolean or integer)"
            )
        return None

    def _compute(self, lf: pl.LazyFrame, schema: pl.Schema, spec: ChunkSpec, data_name: str, streaming: bool) -> dict:
        features = self._features()
        problems = {f: self._feature_problem(f, schema, data_name) for f in features}
        cols = [f for f in features if problems[f] is None]
        keep = list(cols)
        if spec.timestamp_column and spec.timestamp_column in schema and spec.timestamp_column not in keep:
            keep.append(spec.timestamp_column)
        lf = lf.select(keep) if keep else lf.select(pl.lit(0).alias("__dummy"))
        sub_schema = lf.collect_schema()
        clf, meta_exprs, chunk_problem = self._chunk_frame(lf, sub_schema, spec, data_name, check_sorted=not streaming)

        if chunk_problem is not None:
            chunks = _Chunks(np.array([0]), ["all"], [None], [None], np.array([0]), problem=chunk_problem)
            return self._empty_metrics(chunks, {f: problems[f] or chunk_problem for f in features})

        for i, f in enumerate(cols):
            if self._state[f]["kind"] == "continuous":
                meta_exprs.append(pl.col(f).cast(pl.Float64).fill_nan(None).is_not_null().sum().alias(f"__nn{i}"))
            else:
                meta_exprs.append(pl.col(f).is_not_null().sum().alias(f"__nn{i}"))
        meta_q = clf.group_by("__chunk").agg(meta_exprs).sort("__chunk")
        tables: dict[str, Any] = {}
        if streaming:
            queries = [meta_q]
            for f in cols:
                queries.append(self._value_count_query(clf, f))
            # Lazy input: run the per-feature aggregations one at a time so that only one feature's
            # (chunk, value) table is being built at any moment; this bounds peak memory on large scans.
            frames = [q.collect(engine="streaming") for q in queries]
            meta = frames[0]
            for i, f in enumerate(cols):
                tables[f] = frames[1 + i]
        else:
            # In-memory input: materialise the chunked frame once; continuous features are then sorted per
            # chunk with numpy (much cheaper than a (chunk, value) group-by with ~one group per row).
            cont = [f for f in cols if self._state[f]["kind"] == "continuous"]
            cat = [f for f in cols if self._state[f]["kind"] != "continuous"]
            cdf = clf.with_columns(
                [pl.col(f).cast(pl.Float64).fill_nan(None).alias(f"__cv{i}") for i, f in enumerate(cont)]
            ).collect()
            clazy = cdf.lazy()
            fast = self._numpy_meta(cdf, cols, cont, cat, spec) if spec.kind in ("size", "count") else None
            if fast is not None:
                meta, fast_tables = fast
                tables.update(fast_tables)
                slow_cat = [f for f in cat if f not in fast_tables]
                frames = pl.collect_all([self._value_count_query(clazy, f) for f in slow_cat]) if slow_cat else []
            else:
                slow_cat = cat
                frames = pl.collect_all([clazy.group_by("__chunk").agg(meta_exprs).sort("__chunk")]
                                        + [self._value_count_query(clazy, f) for f in cat])
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
                    tables[f] = _sorted_runs(pos_rows, lengths, v)

        if meta.height == 0:
            chunks = _Chunks(np.array([0]), ["none"], [None], [None], np.array([0]), problem=f"{data_name} data has no rows")
            return self._empty_metrics(chunks, {f: problems[f] or chunks.problem for f in features})

        keys = meta.get_column("__chunk").to_numpy().astype(np.int64)
        rows = meta.get_column("__rows").to_numpy().astype(np.int64)
        if spec.kind == "period":
            starts = meta.get_column("__start").to_list()
            labels = [str(s) for s in starts]
            ends = (
                meta.select(pl.col("__start").dt.offset_by(spec.period)).to_series().to_list()
            )
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
        chunks = _Chunks(keys, labels, starts, ends, rows)

        metrics: dict[tuple[str, str], dict[str, Any]] = {}
        for f in features:
            methods = self._methods_for(f)
            if problems[f] is not None:
                for m in methods:
                    metrics[(f, m)] = _problem_block(chunks.n, problems[f])
                continue
            i = cols.index(f)
            nn = meta.get_column(f"__nn{i}").to_numpy().astype(np.int64)
            table = tables[f]
            st = self._state[f]
            if isinstance(table, tuple):
                pos, vals, cnt = table
            else:
                pos = np.searchsorted(keys, table.get_column("__chunk").to_numpy().astype(np.int64))
                cnt = table.get_column("n").to_numpy().astype(np.int64)
            try:
                if st["kind"] == "continuous":
                    if not isinstance(table, tuple):
                        vals = table.get_column("v").to_numpy().astype(np.float64)
                    computed = self._continuous_metrics(st, methods, pos, vals, cnt, chunks.n)
                else:
                    cats = vals if isinstance(table, tuple) else table.get_column("v").to_numpy().astype(object)
                    computed = self._categorical_metrics(st, methods, pos, cats, cnt, chunks.n)
            except Exception as exc:  # never surface a stack trace to the caller
                computed = {
                    m: {"value": np.full(chunks.n, np.nan), "p_value": np.full(chunks.n, np.nan),
                        "error": f"internal error computing {m} for column '{f}': {exc!r}"}
                    for m in methods
                }
            base_status = self._chunk_statuses(f, rows, nn)
            for m in methods:
                res = computed[m]
                status = list(base_status)
                value = res["value"].astype(np.float64)
                pval = res.get("p_value")
                for c in range(chunks.n):
                    if status[c] != OK:
                        continue
                    if res.get("error"):
                        status[c] = res["error"]
                    elif m in ("psi", "ks") and st.get("constant"):
                        status[c] = f"reference column '{f}' is constant: PSI/KS not informative"
                    elif not np.isfinite(value[c]) or (pval is not None and not np.isfinite(pval[c])):
                        status[c] = f"method '{m}' produced a non-finite value for column '{f}' in this chunk"
                bad = np.array([s != OK for s in status], dtype=bool)
                value = np.where(bad, np.nan, value)
                if pval is not None:
                    pval = np.where(bad, np.nan, pval.astype(np.float64))
                metrics[(f, m)] = {"value": value, "p_value": pval, "status": status}
        return {"chunks": chunks, "metrics": metrics}

    def _numpy_meta(self, cdf: pl.DataFrame, cols: list[str], cont: list[str], cat: list[str], spec: ChunkSpec):
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
        tables: dict[str, Any] = {}
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

    def _value_count_query(self, clf: pl.LazyFrame, f: str) -> pl.LazyFrame:
        if self._state[f]["kind"] == "continuous":
            v = pl.col(f).cast(pl.Float64).fill_nan(None)
        else:
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
            clf.select(pl.col("__chunk"), v.alias("v"))
            .drop_nulls()
            .group_by("__chunk", "v")
            .agg(pl.len().alias("n"))
            .sort("__chunk", "v")
        )

    def _empty_metrics(self, chunks: _Chunks, problem_by_feature: dict[str, str]) -> dict:
        metrics = {}
        for f in self._features():
            for m in self._methods_for(f):
                metrics[(f, m)] = _problem_block(chunks.n, problem_by_feature[f])
        return {"chunks": chunks, "metrics": metrics}

    def _chunk_statuses(self, feature: str, rows: np.ndarray, nn: np.ndarray) -> list[str]:
        out = []
        for r, k in zip(rows.tolist(), nn.tolist()):
            if r < self.min_chunk_rows:
                out.append(f"chunk has {r} rows, fewer than the minimum {self.min_chunk_rows}")
            elif k == 0:
                out.append(f"column '{feature}' is all null in this chunk")
            elif k < self.min_chunk_rows:
                out.append(
                    f"column '{feature}' has only {k} non-null values in this chunk, "
                    f"fewer than the minimum {self.min_chunk_rows}"
                )
            else:
                out.append(OK)
        return out

    # ------------------------------------------------------------------ metrics
    def _continuous_metrics(self, st, methods, pos, vals, cnt, n_chunks) -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {}
        n2 = np.bincount(pos, weights=cnt, minlength=n_chunks)
        keys = _Keys(vals)
        with np.errstate(divide="ignore", invalid="ignore"):
            if "psi" in methods:
                inner = st["psi_inner"]
                counts = _hist2d(pos, keys.searchsorted(inner, "left"), cnt, n_chunks, inner.size + 1)
                out["psi"] = {"value": _psi(st["psi_ref_p"], counts / n2[:, None], self.psi_smoothing)}
            if "jensen_shannon" in methods or "hellinger" in methods:
                counts = _np_histogram2d(st["doane_edges"], pos, vals, cnt, n_chunks, keys)
                p_ext, q_ext = _with_leftover(st["doane_p"], counts / n2[:, None])
                if "jensen_shannon" in methods:
                    out["jensen_shannon"] = {"value": _jensen_shannon(p_ext, q_ext)}
                if "hellinger" in methods:
                    out["hellinger"] = {"value": _hellinger(p_ext, q_ext)}
            if "ks" in methods:
                d, p = _ks(st["sorted"], pos, vals, cnt, n_chunks, self.ks_p_value, keys)
                out["ks"] = {"value": d, "p_value": p}
            if "wasserstein" in methods:
                out["wasserstein"] = {"value": _wasserstein(st, pos, vals, cnt, n2, n_chunks, keys)}
        return out

    def _categorical_metrics(self, st, methods, pos, cats, cnt, n_chunks) -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {}
        ref_cats, ref_counts, n_ref = st["cats"], st["counts"], st["n_ref"]
        all_cats = np.unique(np.concatenate([ref_cats, np.unique(cats)]).astype(str))
        k = all_cats.size
        ref_idx = np.searchsorted(all_cats, ref_cats.astype(str))
        q = _hist2d(pos, np.searchsorted(all_cats, cats.astype(str)), cnt, n_chunks, k)  # (C, K) counts
        r = np.zeros(k)
        r[ref_idx] = ref_counts
        n2 = q.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            q_p = q / n2[:, None]
            if "psi" in methods:
                out["psi"] = {"value": _psi(r / n_ref, q_p, self.psi_smoothing)}
            if "jensen_shannon" in methods or "hellinger" in methods:
                p_ext, q_ext = _with_leftover(ref_counts / n_ref, q[:, ref_idx] / n2[:, None])
                if "jensen_shannon" in methods:
                    out["jensen_shannon"] = {"value": _jensen_shannon(p_ext, q_ext)}
                if "hellinger" in methods:
                    out["hellinger"] = {"value": _hellinger(p_ext, q_ext)}
            if "l_infinity" in methods:
                out["l_infinity"] = {"value": np.max(np.abs(r / n_ref - q_p), axis=1)}
            if "chi2" in methods:
                stat, p = _chi2(r, q)
                out["chi2"] = {"value": stat, "p_value": p}
        return out

    # ------------------------------------------------------------------ output
    def _assemble(self, raw: dict) -> pl.DataFrame:
        chunks: _Chunks = raw["chunks"]
        n = chunks.n
        items = list(raw["metrics"].items())
        if not items:
            return pl.DataFrame(schema=RESULT_SCHEMA)
        values, pvals, alerts, statuses, features, methods, lowers, uppers = [], [], [], [], [], [], [], []
        nan_block = np.full(n, np.nan)
        for (f, m), res in items:
            lower, upper = self._thresholds.get((f, m), (None, None))
            value = np.asarray(res["value"], dtype=np.float64)
            pval = res["p_value"] if res["p_value"] is not None else nan_block
            ok = np.array([s == OK for s in res["status"]], dtype=bool)
            if m == "chi2" and not (self.threshold == "constant" and "chi2" in self.constant_thresholds):
                alert = ok & (pval < self.chi2_alpha)
            else:
                alert = np.zeros(n, dtype=bool)
                if lower is not None:
                    alert |= ok & (value < lower)
                if upper is not None:
                    alert |= ok & (value > upper)
            values.append(value)
            pvals.append(np.asarray(pval, dtype=np.float64) if m in P_VALUE_METHODS else nan_block)
            alerts.append(alert)
            statuses.extend(res["status"])
            features.append(f)
            methods.append(m)
            lowers.append(lower)
            uppers.append(upper)
        k = len(items)
        # Per-chunk columns, built once and gathered (result is ordered by chunk, then (feature, method)).
        chunk_df = pl.DataFrame(
            {
                "chunk_index": np.arange(n, dtype=np.int64),
                "chunk_key": chunks.labels,
                "chunk_start": chunks.starts,
                "chunk_end": chunks.ends,
                "rows": chunks.rows,
            },
            schema_overrides={"chunk_start": pl.Datetime("us"), "chunk_end": pl.Datetime("us")},
            strict=False,
        )
        chunk_df = chunk_df.cast({c: RESULT_SCHEMA[c] for c in chunk_df.columns}, strict=False)
        # metric-major arrays (k, n) -> chunk-major order
        take = np.arange(k * n, dtype=np.int64).reshape(k, n).T.ravel()
        per_metric = pl.DataFrame(
            {
                "feature": pl.Series(features, dtype=pl.String),
                "method": pl.Series(methods, dtype=pl.String),
                "lower_threshold": pl.Series(lowers, dtype=pl.Float64, strict=False),
                "upper_threshold": pl.Series(uppers, dtype=pl.Float64, strict=False),
            }
        )
        metric_idx = np.tile(np.arange(k, dtype=np.int64), n)
        chunk_idx = np.repeat(np.arange(n, dtype=np.int64), k)
        out = pl.concat(
            [
                chunk_df[chunk_idx],
                per_metric[metric_idx].select("feature", "method"),
                pl.DataFrame(
                    {
                        "value": pl.Series(np.concatenate(values)[take]).fill_nan(None),
                        "p_value": pl.Series(np.concatenate(pvals)[take]).fill_nan(None),
                    }
                ),
                per_metric[metric_idx].select("lower_threshold", "upper_threshold"),
                pl.DataFrame(
                    {
                        "alert": np.concatenate(alerts)[take],
                        "status": pl.Series(statuses, dtype=pl.String)[take],
                    }
                ),
            ],
            how="horizontal",
        )
        return out.select(list(RESULT_SCHEMA)).cast(RESULT_SCHEMA, strict=False)


# ---------------------------------------------------------------------- helpers (vectorised numpy)
def _problem_block(n: int, status: str) -> dict[str, Any]:
    return {"value": np.full(n, np.nan), "p_value": np.full(n, np.nan), "status": [status] * n}


def _sorted_nulls_last(ts: pl.Series) -> bool:
    """True when ``ts`` is non-decreasing with all nulls at the end (so a stable sort would not move rows)."""
    nulls = ts.null_count()
    if nulls:
        if ts.tail(nulls).null_count() != nulls:
            return False
        ts = ts.head(ts.len() - nulls)
    return bool(ts.is_sorted())


def _sorted_runs(pos: np.ndarray, lengths: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


class _Keys:
    """Search keys (e.g. the distinct values of every chunk) with a lazily built sorted unique copy, so that
    ``searchsorted(a, keys)`` becomes a linear merge of two sorted arrays plus a gather (same integers)."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys
        self._u = None
        self._inv = None

    def searchsorted(self, a: np.ndarray, side: str) -> np.ndarray:
        if self.keys.size < 2048 or a.size < 64:
            return np.searchsorted(a, self.keys, side=side)
        if self._u is None:
            self._u, self._inv = np.unique(self.keys, return_inverse=True)
        return _merge_searchsorted(a, self._u, side)[self._inv]


def _merge_searchsorted(a: np.ndarray, u: np.ndarray, side: str) -> np.ndarray:
    """``np.searchsorted(a, u, side)`` for sorted ``a`` and sorted ``u`` (no NaN) by a stable merge sort."""
    k = u.size
    if side == "right":  # on ties the elements of ``a`` come first: count of a <= u
        m = np.argsort(np.concatenate([a, u]), kind="stable")
        at = np.flatnonzero(m >= a.size)
    else:  # ties: ``u`` first, count of a < u
        m = np.argsort(np.concatenate([u, a]), kind="stable")
        at = np.flatnonzero(m < k)
    return at - np.arange(k)


def _hist2d(pos: np.ndarray, bins: np.ndarray, cnt: np.ndarray, n_chunks: int, n_bins: int) -> np.ndarray:
    """(n_chunks, n_bins) weighted counts."""
    flat = np.bincount(pos * n_bins + bins, weights=cnt, minlength=n_chunks * n_bins)
    return flat.reshape(n_chunks, n_bins)


def _np_histogram2d(edges: np.ndarray, pos, vals, cnt, n_chunks: int, keys: _Keys | None = None) -> np.ndarray:
    """Per-chunk ``np.histogram(chunk, bins=edges)[0]``: left-closed bins, last bin closed, outside ignored."""
    nb = edges.size - 1
    inside = (vals >= edges[0]) & (vals <= edges[-1])
    if keys is None:
        b = np.minimum(np.searchsorted(edges, vals[inside], side="right") - 1, nb - 1)
    else:
        b = np.minimum(keys.searchsorted(edges, "right")[inside] - 1, nb - 1)
    return _hist2d(pos[inside], b, cnt[inside], n_chunks, nb)


def _with_leftover(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NannyML: if the chunk has mass outside the reference bins, add it as an extra bin (reference 0)."""
    leftover = 1.0 - np.sum(q, axis=1)
    extra = np.where(leftover > 0, leftover, 0.0)
    c = q.shape[0]
    p_ext = np.concatenate([np.broadcast_to(p, q.shape), np.zeros((c, 1))], axis=1)
    q_ext = np.concatenate([q, extra[:, None]], axis=1)
    return p_ext, q_ext


def _jensen_shannon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise ``scipy.spatial.distance.jensenshannon(p, q, base=2)``."""
    p = p / np.sum(p, axis=1, keepdims=True)
    q = q / np.sum(q, axis=1, keepdims=True)
    m = (p + q) / 2.0
    js = np.sum(special.rel_entr(p, m), axis=1) + np.sum(special.rel_entr(q, m), axis=1)
    js /= np.log(2.0)
    return np.sqrt(js / 2.0)


def _hellinger(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum((np.sqrt(p) - np.sqrt(q)) ** 2, axis=1)) / np.sqrt(2)


def _psi(ref_p: np.ndarray, chunk_p: np.ndarray, smoothing: float) -> np.ndarray:
    r = np.where(ref_p == 0, smoothing, ref_p)
    a = np.where(chunk_p == 0, smoothing, chunk_p)
    return np.sum((a - r) * np.log(a / r), axis=1)


def _segments(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets of runs of equal ``pos`` (pos is sorted) and the chunk of each run."""
    if pos.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
    return starts, pos[starts]


def _ks(ref_sorted: np.ndarray, pos, vals, cnt, n_chunks: int, p_mode: str = "scipy",
        keys: _Keys | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-sample KS statistic and p-value per chunk, identical to ``scipy.stats.ks_2samp``.

    ``vals`` are the distinct values of every chunk, sorted within the chunk, with multiplicities ``cnt``.
    The ECDF difference ``F_ref - F_chunk`` of the pooled sample can only reach its maximum at a chunk value
    or at the last reference value before a chunk value, and its minimum at a chunk value, so evaluating
    ``r/n1 - c/n2`` (chunk value) and ``l/n1 - c_prev/n2`` (just before it) gives exactly scipy's numbers.
    """
    n1 = ref_sorted.size
    d_out = np.full(n_chunks, np.nan)
    p_out = np.full(n_chunks, np.nan)
    starts, present = _segments(pos)
    if starts.size == 0:
        return d_out, p_out
    keys = keys if keys is not None else _Keys(vals)
    r = keys.searchsorted(ref_sorted, "right")
    l = keys.searchsorted(ref_sorted, "left")
    cum = np.cumsum(cnt)
    seg_len = np.diff(np.r_[starts, vals.size])
    offset = np.repeat(cum[starts] - cnt[starts], seg_len)
    c_incl = cum - offset
    c_prev = c_incl - cnt
    n2_seg = c_incl[np.r_[starts[1:], vals.size] - 1]  # total count per segment (int)
    n2_row = np.repeat(n2_seg, seg_len)
    a = r / n1 - c_incl / n2_row
    b = l / n1 - c_prev / n2_row
    max_s = np.maximum.reduceat(np.maximum(a, b), starts)
    min_s = np.clip(-np.minimum.reduceat(a, starts), 0, 1)
    d = np.where(min_s > max_s, min_s, max_s)
    p = np.empty_like(d)
    asymp = np.ones(d.size, dtype=bool)
    for j, (n2, dj) in enumerate(zip(n2_seg.tolist(), d.tolist())):
        if p_mode == "scipy" and _scipy_exact_ks is not None and max(n1, n2) <= _KS_MAX_AUTO_N:
            g = math.gcd(n1, n2)
            success, dj2, prob = _scipy_exact_ks(n1, n2, g, dj, "two-sided")
            d[j] = dj2
            if success:
                p[j] = prob
                asymp[j] = False
    if asymp.any():
        m_ = np.maximum(float(n1), n2_seg[asymp].astype(float))
        n_ = np.minimum(float(n1), n2_seg[asymp].astype(float))
        en = m_ * n_ / (m_ + n_)
        if p_mode == "asymptotic":  # Kolmogorov's limit distribution: fast, ~1% relative off kstwo for n ~ 5000
            p[asymp] = stats.kstwobign.sf(d[asymp] * np.sqrt(np.round(en)))
        else:
            p[asymp] = _kstwo_sf(d[asymp], np.round(en))
    d_out[present] = d
    p_out[present] = np.clip(p, 0, 1)
    return d_out, p_out


def _kstwo_sf(d: np.ndarray, n: np.ndarray) -> np.ndarray:
    """``scipy.stats.kstwo.sf(d, n)`` (what ks_2samp uses for large samples), vectorised over all chunks.

    Follows scipy's ``_kolmogn(n, x, cdf=False)`` branch by branch (Simard & L'Ecuyer 2011). The two
    branches that matter for n > 140 are computed for all chunks at once with numpy:

    * ``2.2 <= n x^2 < 370``: ``2 * smirnov(n, x)``. scipy's C ``smirnov`` sums the Birnbaum-Tingey series
      in double-double arithmetic, ~5 ms per call at n ~ 5000; the same (all-positive, so cancellation-free)
      series summed in log space agrees to ~1e-12 relative. Results below 1e-280 (subnormal territory,
      where precision is lost) are recomputed with scipy itself.
    * ``n x^2 < 2.2`` with ``n x^1.5 > 1.4``: ``1 - PelzGood(n, x)``, the same formula evaluated on arrays.

    Everything else (tiny n, the Durbin-matrix branch, Ruben-Gambino edges) goes to ``stats.kstwo.sf``
    itself, once per distinct (d, n) pair.
    """
    d = np.asarray(d, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    out = np.full(d.shape, np.nan)
    if d.size == 0:
        return out
    pairs = np.stack([d.ravel(), n.ravel()], axis=1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    ux, un = uniq[:, 0], uniq[:, 1]
    res = np.full(ux.size, np.nan)
    todo = np.ones(ux.size, dtype=bool)
    ok = np.isfinite(ux) & np.isfinite(un) & (un > 140) & (un == np.floor(un))
    with np.errstate(all="ignore"):
        t = un * ux
        nx2 = t * ux
        mid = ok & (ux > 0) & (ux < 0.5) & (t > 1.0) & (t < un - 1)
        zero = mid & (nx2 >= 370.0)
        res[zero] = 0.0
        todo[zero] = False
        smir = mid & (nx2 >= 2.2) & (nx2 < 370.0) & (un <= _SMIRNOV_SERIES_MAX_N)
        for nv in np.unique(un[smir]):
            sel = np.flatnonzero(smir & (un == nv))
            p = np.clip(2 * _smirnov_series(int(nv), ux[sel]), 0.0, 1.0)
            good = np.isfinite(p) & (p >= 1e-280)
            res[sel[good]] = p[good]
            todo[sel[good]] = False
        pg = mid & (nx2 < 2.2) & ~((un <= 100_000) & (un * ux**1.5 <= 1.4))
        if pg.any():
            cdf = _pelz_good_cdf(un[pg], ux[pg])
            res[pg] = np.clip(1.0 - cdf, 0.0, 1.0)
            todo[pg] = False
    if todo.any():
        res[todo] = stats.kstwo.sf(ux[todo], un[todo])
    out.ravel()[:] = res[inverse.ravel()]
    return out


# Up to this n the log-space series agrees with scipy's smirnov to ~1e-10 relative (error grows with n).
_SMIRNOV_SERIES_MAX_N = 100_000
_SMIRNOV_BLOCK_CELLS = 1 << 19  # bound the (points x series terms) matrices to ~4 MB each


def _smirnov_series(n: int, x: np.ndarray) -> np.ndarray:
    """One-sided Smirnov upper tail P(D+_n >= x) for 0 < x < 1 (Birnbaum & Tingey 1951), vectorised:

    x * sum_{j=0}^{floor(n(1-x))} C(n, j) (1 - x - j/n)^(n-j) (x + j/n)^(j-1), summed in log space.
    """
    j_all = np.arange(n + 1, dtype=np.float64)
    log_binom = special.gammaln(n + 1.0) - special.gammaln(j_all + 1.0) - special.gammaln(n - j_all + 1.0)
    out = np.empty(x.size)
    order = np.argsort(x)  # similar x -> similar series length within a block
    err = np.seterr(all="ignore")
    block = max(1, _SMIRNOV_BLOCK_CELLS // (n + 1))
    for b0 in range(0, x.size, block):
        idx = order[b0:b0 + block]
        xb = x[idx][:, None]
        jmax = np.floor(n * (1.0 - x[idx]))
        length = int(jmax.max()) + 1
        j = j_all[None, :length]
        lt = (log_binom[None, :length] + (n - j) * np.log1p(-xb - j / n) + (j - 1) * np.log(xb + j / n))
        lt = np.where(j <= jmax[:, None], lt, -np.inf)
        m = lt.max(axis=1, keepdims=True)
        s = np.exp(lt - m).sum(axis=1)
        out[idx] = x[idx] * np.exp(m[:, 0]) * s
    np.seterr(**err)
    return out


_PI_SQUARED = np.pi**2
_PI_FOUR = np.pi**4
_PI_SIX = np.pi**6
_SQRT2PI = math.sqrt(2 * np.pi)
_SQRT3 = math.sqrt(3)
_MIN_LOG = -708


def _pelz_good_cdf(n: np.ndarray, x: np.ndarray) -> np.ndarray:
    """scipy.stats._ksstats._kolmogn_PelzGood(n, x, cdf=True) evaluated elementwise on arrays (0 < x < 1)."""
    z = np.sqrt(n) * x
    zsquared, zthree, zfour, zsix = z**2, z**3, z**4, z**6
    qlog = -_PI_SQUARED / 8 / zsquared
    tiny = qlog < _MIN_LOG
    q = np.exp(qlog)
    k1a = -zsquared
    k1b = _PI_SQUARED / 4
    k2a = 6 * zsix + 2 * zfour
    k2b = (2 * zfour - 5 * zsquared) * _PI_SQUARED / 4
    k2c = _PI_FOUR * (1 - 2 * zsquared) / 16
    k3d = _PI_SIX * (5 - 30 * zsquared) / 64
    k3c = _PI_FOUR * (-60 * zsquared + 212 * zfour) / 16
    k3b = _PI_SQUARED * (135 * zfour - 96 * zsix) / 4
    k3a = -30 * zsix - 90 * z**8
    maxk = np.ceil(16 * z / np.pi).astype(np.int64)
    kk = np.zeros((4, z.size))
    for k in range(int(maxk.max(initial=0)), 0, -1):
        active = k <= maxk
        m = 2 * k - 1
        msquared, mfour, msix = m**2, m**4, m**6
        qpower = np.power(q, 8 * k)
        coeffs = np.stack([np.ones(z.size), k1a + k1b * msquared, k2a + k2b * msquared + k2c * mfour,
                           k3a + k3b * msquared + k3c * mfour + k3d * msix])
        kk = np.where(active, kk * qpower + coeffs, kk)
    kk *= q
    kk *= _SQRT2PI
    kk /= np.stack([z, 6 * zfour, 72 * z**7, 6480 * z**10])
    q2 = np.exp(-_PI_SQUARED / 2 / zsquared)
    k2extra = np.zeros(z.size)
    k3extra = np.zeros(z.size)
    sqrt3z = _SQRT3 * z
    for k in range(int(maxk.max(initial=0)), 0, -1):
        active = k <= maxk
        ksq = k * k
        qp = q2**ksq
        kspi = np.pi * k
        k2extra = np.where(active, k2extra + ksq * qp, k2extra)
        k3extra = np.where(active, k3extra + (sqrt3z + kspi) * (sqrt3z - kspi) * ksq * qp, k3extra)
    kk[2] += k2extra * (_PI_SQUARED * _SQRT2PI / (-36 * zthree))
    kk[3] += k3extra * (_PI_SQUARED * _SQRT2PI / (216 * zsix))
    kk /= np.power(n * 1.0, np.arange(4)[:, None] / 2.0)
    cdf = kk[0] + kk[1] + kk[2] + kk[3]
    return np.where(tiny, 0.0, cdf)


def _wasserstein(st, pos, vals, cnt, n2: np.ndarray, n_chunks: int, keys: _Keys | None = None) -> np.ndarray:
    out = np.full(n_chunks, np.nan)
    starts, present = _segments(pos)
    if starts.size == 0:
        return out
    if st["w_mode"] == "exact":
        ref = st["sorted"]
        ends = np.r_[starts[1:], vals.size]
        for s, e, c in zip(starts.tolist(), ends.tolist(), present.tolist()):
            out[c] = stats.wasserstein_distance(ref, vals[s:e], None, cnt[s:e])
        return out
    # NannyML's estimated method. Tail terms: the ECDF integral NannyML computes over the values below the
    # reference minimum (plus the minimum) times (n_smaller + 1) / n equals sum(ref_min - v) / n (same above).
    ref_min, ref_max, edges, width = st["w_min"], st["w_max"], st["w_edges"], st["w_width"]
    ref_cdf = st["w_ref_cdf"]
    small = vals < ref_min
    big = vals > ref_max
    n_small = np.bincount(pos[small], weights=cnt[small], minlength=n_chunks)
    n_big = np.bincount(pos[big], weights=cnt[big], minlength=n_chunks)
    term_small = np.bincount(pos[small], weights=cnt[small] * (ref_min - vals[small]), minlength=n_chunks) / n2
    term_big = np.bincount(pos[big], weights=cnt[big] * (vals[big] - ref_max), minlength=n_chunks) / n2
    amount_small = np.where(n_small > 0, (n_small + 1) / n2, 0.0)
    nb = edges.size - 1
    block = max(1, 131_072 // nb)  # bound the (chunks x bins) work matrix to ~1 MB (cache resident)
    bounds = np.r_[starts, vals.size]
    # bin of every value as np.histogram does it (left-closed, last bin closed, outside ignored)
    inside = (vals >= edges[0]) & (vals <= edges[-1])
    keys = keys if keys is not None else _Keys(vals)
    bin_all = np.minimum(keys.searchsorted(edges, "right") - 1, nb - 1)
    for b0 in range(0, present.size, block):
        b1 = min(present.size, b0 + block)
        s, e = bounds[b0], bounds[b1]
        cs = present[b0:b1]
        ins = inside[s:e]
        local = np.searchsorted(cs, pos[s:e][ins])
        h = np.bincount(local * nb + bin_all[s:e][ins], weights=cnt[s:e][ins], minlength=cs.size * nb)
        h = h.reshape(cs.size, nb)
        h /= n2[cs][:, None]
        np.cumsum(h, axis=1, out=h)
        h += amount_small[cs][:, None]
        np.subtract(ref_cdf, h, out=h)
        np.abs(h, out=h)
        h *= width
        out[cs] = h.sum(axis=1) + term_small[cs] + term_big[cs]
    return out


def _chi2(r: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise ``scipy.stats.chi2_contingency`` on [reference counts, chunk counts] (zero rows dropped)."""
    c, k = q.shape
    obs = np.stack([np.broadcast_to(r, q.shape), q], axis=2)  # (C, K, 2)
    row_sum = obs.sum(axis=2)  # (C, K)
    col_sum = obs.sum(axis=1)  # (C, 2)
    total = col_sum.sum(axis=1)  # (C,)
    live = row_sum > 0
    dof = live.sum(axis=1) - 1
    exp = row_sum[:, :, None] * col_sum[:, None, :] / total[:, None, None]
    obs_c = obs.astype(np.float64).copy()
    yates = dof == 1
    if yates.any():
        diff = exp[yates] - obs_c[yates]
        obs_c[yates] = obs_c[yates] + np.minimum(0.5, np.abs(diff)) * np.sign(diff)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(live[:, :, None], (obs_c - exp) ** 2 / exp, 0.0)
    stat = terms.reshape(c, 2 * k).sum(axis=1)
    p = stats.chi2.sf(stat, np.maximum(dof, 1))
    stat = np.where(dof <= 0, 0.0, stat)
    p = np.where(dof <= 0, 1.0, p)
    empty = q.sum(axis=1) == 0
    return np.where(empty, np.nan, stat), np.where(empty, np.nan, p)
