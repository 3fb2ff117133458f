"""Reference fits: what the engine keeps of the reference data, one typed, immutable record per feature.

``fit_continuous`` / ``fit_categorical`` return a ``ContinuousFit`` / ``CategoricalFit``, or an
``UnusableReference`` that carries the reason (missing column, wrong type, all null, infinite values) so
that every chunk of that feature reports it as its status instead of raising. The arrays in a fit are
read-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
import polars as pl

from mlplatform.drift.dtypes import CATEGORICAL_TYPES, dtype_name, is_categorical, is_numeric

# NannyML 0.13.1 switches Wasserstein to its binned estimate at this reference size, with this many bins.
NANNYML_EXACT_LIMIT = 10_000
NANNYML_WASSERSTEIN_BINS = 10_000


def _frozen(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.setflags(write=False)


@dataclass(frozen=True, eq=False)
class BinnedWasserstein:
    """NannyML's binned Wasserstein estimate: equal-width bins over the reference range."""

    edges: np.ndarray  # NANNYML_WASSERSTEIN_BINS + 1 edges, edges[0] = reference min, edges[-1] = max
    ref_cdf: np.ndarray  # cumulative reference proportion at the right edge of every bin
    width: float  # edges[1] - edges[0]

    def __post_init__(self) -> None:
        _frozen(self.edges, self.ref_cdf)

    @property
    def low(self) -> float:
        return self.edges[0]

    @property
    def high(self) -> float:
        return self.edges[-1]


@dataclass(frozen=True, eq=False)
class ContinuousFit:
    feature: str
    n_ref: int  # non-null reference values
    sorted: np.ndarray  # the non-null reference values, sorted (KS, exact Wasserstein)
    constant: bool  # all reference values equal: PSI and KS are not informative
    doane_edges: np.ndarray  # Jensen-Shannon / Hellinger bins (NannyML: np.histogram_bin_edges 'doane')
    doane_p: np.ndarray  # reference proportion per Doane bin
    psi_inner: np.ndarray  # inner PSI edges (reference quantiles, deduplicated); bins are right-closed
    psi_ref_p: np.ndarray  # reference proportion per PSI bin (inner.size + 1 bins, outer ones open-ended)
    wasserstein: BinnedWasserstein | None  # None: exact Wasserstein (reference < NANNYML_EXACT_LIMIT values)

    kind = "continuous"

    def __post_init__(self) -> None:
        _frozen(self.sorted, self.doane_edges, self.doane_p, self.psi_inner, self.psi_ref_p)


@dataclass(frozen=True, eq=False)
class CategoricalFit:
    feature: str
    categories: np.ndarray  # the reference categories as strings (object array), sorted
    counts: np.ndarray  # int64 reference count per category
    n_ref: int  # non-null reference values

    kind = "categorical"

    def __post_init__(self) -> None:
        _frozen(self.categories, self.counts)


@dataclass(frozen=True)
class UnusableReference:
    """The reference data cannot be used for this feature; ``problem`` says why (becomes every status)."""

    feature: str
    kind: Literal["continuous", "categorical"]
    problem: str


FeatureFit = Union[ContinuousFit, CategoricalFit, UnusableReference]


def fit_continuous(feature: str, ref: pl.DataFrame, schema: pl.Schema, psi_bins: int) -> ContinuousFit | UnusableReference:
    def unusable(problem: str) -> UnusableReference:
        return UnusableReference(feature, "continuous", problem)

    if feature not in schema:
        return unusable(f"column '{feature}' is missing from the reference data")
    if not is_numeric(schema[feature]):
        return unusable(f"reference column '{feature}' has type {dtype_name(schema[feature])}, expected numeric")
    values = ref.get_column(feature).cast(pl.Float64).fill_nan(None).drop_nulls().to_numpy()
    if values.size == 0:
        return unusable(f"reference column '{feature}' is all null")
    if not np.all(np.isfinite(values)):
        return unusable(f"reference column '{feature}' contains infinite values")
    n = values.size
    ordered = np.sort(values)
    # Jensen-Shannon / Hellinger: NannyML's Doane bins on the reference.
    edges = np.histogram_bin_edges(values, bins="doane")
    # PSI: reference quantile bins, right-closed, extended to -inf/+inf.
    inner = np.unique(np.quantile(values, np.linspace(0.0, 1.0, psi_bins + 1)[1:-1]))
    # Wasserstein: NannyML 'auto' -> exact below 10k reference values, binned estimate above.
    binned = None
    if n >= NANNYML_EXACT_LIMIT:
        counts, w_edges = np.histogram(values, bins=NANNYML_WASSERSTEIN_BINS)
        binned = BinnedWasserstein(edges=w_edges, ref_cdf=np.cumsum(counts / n), width=w_edges[1] - w_edges[0])
    return ContinuousFit(
        feature=feature,
        n_ref=n,
        sorted=ordered,
        constant=bool(ordered[0] == ordered[-1]),
        doane_edges=edges,
        doane_p=np.histogram(values, bins=edges)[0] / n,
        psi_inner=inner,
        psi_ref_p=np.bincount(np.searchsorted(inner, values, side="left"), minlength=inner.size + 1) / n,
        wasserstein=binned,
    )


def fit_categorical(feature: str, ref: pl.DataFrame, schema: pl.Schema) -> CategoricalFit | UnusableReference:
    def unusable(problem: str) -> UnusableReference:
        return UnusableReference(feature, "categorical", problem)

    if feature not in schema:
        return unusable(f"column '{feature}' is missing from the reference data")
    if not is_categorical(schema[feature]):
        return unusable(
            f"reference column '{feature}' has type {dtype_name(schema[feature])}, expected {CATEGORICAL_TYPES}"
        )
    vc = (
        ref.select(pl.col(feature).cast(pl.String).alias("v"))
        .drop_nulls()
        .group_by("v")
        .agg(pl.len().alias("n"))
        .sort("v")
    )
    if vc.height == 0:
        return unusable(f"reference column '{feature}' is all null")
    counts = vc.get_column("n").to_numpy().astype(np.int64)
    return CategoricalFit(
        feature=feature,
        categories=vc.get_column("v").to_numpy().astype(object),
        counts=counts,
        n_ref=int(counts.sum()),
    )
