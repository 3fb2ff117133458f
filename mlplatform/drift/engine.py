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

Layout
------
This module is the public engine (configuration, fit, calculate, thresholds, result table). The layers
below it, each importing only the ones listed before it:

* :mod:`drift.dtypes` - which polars dtypes a continuous / categorical feature or a timestamp accepts;
* :mod:`drift.chunking` - ``ChunkSpec``, chunk assignment and the per-chunk (value, count) tables;
* :mod:`drift.reference` - the typed, frozen reference fits (``ContinuousFit``, ``CategoricalFit``,
  ``UnusableReference``);
* :mod:`drift.kernels` - PSI, Jensen-Shannon, Hellinger, L-infinity, chi2 and Wasserstein on all chunks;
* :mod:`drift.ks` - the KS statistic and its p-value (``scipy.stats.ks_2samp`` for small samples, a
  vectorised ``kstwo.sf`` otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl

from mlplatform.drift import kernels
from mlplatform.drift.chunking import Chunks, ChunkSpec, tabulate, table_arrays
from mlplatform.drift.dtypes import CATEGORICAL_TYPES, dtype_name, is_categorical, is_numeric
from mlplatform.drift.kernels import Keys
from mlplatform.drift.ks import KS_MAX_AUTO_N, ks, kstwo_sf
from mlplatform.drift.reference import (
    NANNYML_EXACT_LIMIT,
    NANNYML_WASSERSTEIN_BINS,
    CategoricalFit,
    ContinuousFit,
    FeatureFit,
    UnusableReference,
    fit_categorical,
    fit_continuous,
)

__all__ = [
    "CATEGORICAL_METHODS",
    "CONTINUOUS_METHODS",
    "KS_MAX_AUTO_N",
    "METHODS",
    "NANNYML_EXACT_LIMIT",
    "NANNYML_WASSERSTEIN_BINS",
    "OK",
    "P_VALUE_METHODS",
    "RESULT_SCHEMA",
    "ChunkSpec",
    "DriftEngine",
    "kstwo_sf",
]

METHODS = ("psi", "ks", "chi2", "jensen_shannon", "wasserstein", "hellinger", "l_infinity")
CONTINUOUS_METHODS = ("psi", "ks", "jensen_shannon", "wasserstein", "hellinger")
CATEGORICAL_METHODS = ("psi", "chi2", "jensen_shannon", "hellinger", "l_infinity")
P_VALUE_METHODS = ("ks", "chi2")

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


@dataclass
class _MethodValues:
    """One (feature, method): value, p-value (None for methods without one) and status of every chunk."""

    value: np.ndarray
    p_value: np.ndarray | None
    status: list[str]

    @classmethod
    def problem(cls, n: int, status: str) -> "_MethodValues":
        return cls(np.full(n, np.nan), np.full(n, np.nan), [status] * n)


@dataclass
class _Computed:
    chunks: Chunks
    metrics: dict[tuple[str, str], _MethodValues]


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
        self.fits: dict[str, FeatureFit] = {}
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
        self.fits = {}
        for feature in self.continuous:
            self.fits[feature] = fit_continuous(feature, ref_df, schema, self.psi_bins)
        for feature in self.categorical:
            self.fits[feature] = fit_categorical(feature, ref_df, schema)
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

    def _fit_thresholds(self, raw: _Computed) -> dict[tuple[str, str], tuple[float | None, float | None]]:
        out: dict[tuple[str, str], tuple[float | None, float | None]] = {}
        for (feature, method), res in raw.metrics.items():
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
            ok = np.array([s == OK for s in res.status], dtype=bool)
            vals = res.value[ok]
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

    # ------------------------------------------------------------------ core computation
    def _feature_problem(self, feature: str, schema: pl.Schema, data_name: str) -> str | None:
        fit = self.fits.get(feature)
        if isinstance(fit, UnusableReference):
            return fit.problem
        if feature not in schema:
            return f"column '{feature}' is missing from the {data_name} data"
        dtype = schema[feature]
        if isinstance(fit, ContinuousFit) and not is_numeric(dtype):
            return f"column '{feature}' has type {dtype_name(dtype)}, expected numeric"
        if isinstance(fit, CategoricalFit) and not is_categorical(dtype):
            return f"column '{feature}' has type {dtype_name(dtype)}, expected {CATEGORICAL_TYPES}"
        return None

    def _compute(self, lf: pl.LazyFrame, schema: pl.Schema, spec: ChunkSpec, data_name: str,
                 streaming: bool) -> _Computed:
        features = self._features()
        problems = {f: self._feature_problem(f, schema, data_name) for f in features}
        cols = [f for f in features if problems[f] is None]
        cont = [f for f in cols if isinstance(self.fits[f], ContinuousFit)]
        cat = [f for f in cols if not isinstance(self.fits[f], ContinuousFit)]
        tab = tabulate(lf, schema, spec, cont, cat, data_name, streaming)
        chunks = tab.chunks
        if chunks.problem is not None:
            return self._empty_metrics(chunks, {f: problems[f] or chunks.problem for f in features})

        metrics: dict[tuple[str, str], _MethodValues] = {}
        for f in features:
            methods = self._methods_for(f)
            if problems[f] is not None:
                for m in methods:
                    metrics[(f, m)] = _MethodValues.problem(chunks.n, problems[f])
                continue
            fit = self.fits[f]
            try:
                if isinstance(fit, ContinuousFit):
                    pos, vals, cnt = table_arrays(tab.tables[f], chunks.keys, continuous=True)
                    computed = self._continuous_metrics(fit, methods, pos, vals, cnt, chunks.n)
                else:
                    pos, cats, cnt = table_arrays(tab.tables[f], chunks.keys, continuous=False)
                    computed = self._categorical_metrics(fit, methods, pos, cats, cnt, chunks.n)
            except Exception as exc:  # never surface a stack trace to the caller
                computed = {
                    m: {"value": np.full(chunks.n, np.nan), "p_value": np.full(chunks.n, np.nan),
                        "error": f"internal error computing {m} for column '{f}': {exc!r}"}
                    for m in methods
                }
            base_status = self._chunk_statuses(f, chunks.rows, tab.non_null[f])
            constant = isinstance(fit, ContinuousFit) and fit.constant
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
                    elif m in ("psi", "ks") and constant:
                        status[c] = f"reference column '{f}' is constant: PSI/KS not informative"
                    elif not np.isfinite(value[c]) or (pval is not None and not np.isfinite(pval[c])):
                        status[c] = f"method '{m}' produced a non-finite value for column '{f}' in this chunk"
                bad = np.array([s != OK for s in status], dtype=bool)
                value = np.where(bad, np.nan, value)
                if pval is not None:
                    pval = np.where(bad, np.nan, pval.astype(np.float64))
                metrics[(f, m)] = _MethodValues(value, pval, status)
        return _Computed(chunks, metrics)

    def _empty_metrics(self, chunks: Chunks, problem_by_feature: dict[str, str]) -> _Computed:
        metrics = {}
        for f in self._features():
            for m in self._methods_for(f):
                metrics[(f, m)] = _MethodValues.problem(chunks.n, problem_by_feature[f])
        return _Computed(chunks, metrics)

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

    # ------------------------------------------------------------------ metrics (kernels per feature kind)
    def _continuous_metrics(self, fit: ContinuousFit, methods, pos, vals, cnt, n_chunks) -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {}
        n2 = np.bincount(pos, weights=cnt, minlength=n_chunks)
        keys = Keys(vals)
        with np.errstate(divide="ignore", invalid="ignore"):
            if "psi" in methods:
                inner = fit.psi_inner
                counts = kernels.hist2d(pos, keys.searchsorted(inner, "left"), cnt, n_chunks, inner.size + 1)
                out["psi"] = {"value": kernels.psi(fit.psi_ref_p, counts / n2[:, None], self.psi_smoothing)}
            if "jensen_shannon" in methods or "hellinger" in methods:
                counts = kernels.np_histogram2d(fit.doane_edges, pos, vals, cnt, n_chunks, keys)
                p_ext, q_ext = kernels.with_leftover(fit.doane_p, counts / n2[:, None])
                if "jensen_shannon" in methods:
                    out["jensen_shannon"] = {"value": kernels.jensen_shannon(p_ext, q_ext)}
                if "hellinger" in methods:
                    out["hellinger"] = {"value": kernels.hellinger(p_ext, q_ext)}
            if "ks" in methods:
                d, p = ks(fit.sorted, pos, vals, cnt, n_chunks, self.ks_p_value, keys)
                out["ks"] = {"value": d, "p_value": p}
            if "wasserstein" in methods:
                out["wasserstein"] = {"value": kernels.wasserstein(fit, pos, vals, cnt, n2, n_chunks, keys)}
        return out

    def _categorical_metrics(self, fit: CategoricalFit, methods, pos, cats, cnt, n_chunks) -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {}
        ref_cats, ref_counts, n_ref = fit.categories, fit.counts, fit.n_ref
        all_cats = np.unique(np.concatenate([ref_cats, np.unique(cats)]).astype(str))
        k = all_cats.size
        ref_idx = np.searchsorted(all_cats, ref_cats.astype(str))
        q = kernels.hist2d(pos, np.searchsorted(all_cats, cats.astype(str)), cnt, n_chunks, k)  # (C, K) counts
        r = np.zeros(k)
        r[ref_idx] = ref_counts
        n2 = q.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            q_p = q / n2[:, None]
            if "psi" in methods:
                out["psi"] = {"value": kernels.psi(r / n_ref, q_p, self.psi_smoothing)}
            if "jensen_shannon" in methods or "hellinger" in methods:
                p_ext, q_ext = kernels.with_leftover(ref_counts / n_ref, q[:, ref_idx] / n2[:, None])
                if "jensen_shannon" in methods:
                    out["jensen_shannon"] = {"value": kernels.jensen_shannon(p_ext, q_ext)}
                if "hellinger" in methods:
                    out["hellinger"] = {"value": kernels.hellinger(p_ext, q_ext)}
            if "l_infinity" in methods:
                out["l_infinity"] = {"value": kernels.l_infinity(r / n_ref, q_p)}
            if "chi2" in methods:
                stat, p = kernels.chi2(r, q)
                out["chi2"] = {"value": stat, "p_value": p}
        return out

    # ------------------------------------------------------------------ output
    def _assemble(self, raw: _Computed) -> pl.DataFrame:
        chunks = raw.chunks
        n = chunks.n
        items = list(raw.metrics.items())
        if not items:
            return pl.DataFrame(schema=RESULT_SCHEMA)
        values, pvals, alerts, statuses, features, methods, lowers, uppers = [], [], [], [], [], [], [], []
        nan_block = np.full(n, np.nan)
        for (f, m), res in items:
            lower, upper = self._thresholds.get((f, m), (None, None))
            value = np.asarray(res.value, dtype=np.float64)
            pval = res.p_value if res.p_value is not None else nan_block
            ok = np.array([s == OK for s in res.status], dtype=bool)
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
            statuses.extend(res.status)
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
