"""Metric kernels: vectorised numpy distances between the reference and every chunk at once.

The chunk side is always a (chunk position, distinct value, count) table sorted by (chunk, value)
(see :mod:`drift.chunking`); the binned metrics take (chunks x bins) proportion matrices. The KS statistic
and its p-value live in :mod:`drift.ks`.
"""

from __future__ import annotations

import numpy as np
from scipy import special, stats

from mlplatform.drift.reference import ContinuousFit


class Keys:
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
        return merge_searchsorted(a, self._u, side)[self._inv]


def merge_searchsorted(a: np.ndarray, u: np.ndarray, side: str) -> np.ndarray:
    """``np.searchsorted(a, u, side)`` for sorted ``a`` and sorted ``u`` (no NaN) by a stable merge sort."""
    k = u.size
    if side == "right":  # on ties the elements of ``a`` come first: count of a <= u
        m = np.argsort(np.concatenate([a, u]), kind="stable")
        at = np.flatnonzero(m >= a.size)
    else:  # ties: ``u`` first, count of a < u
        m = np.argsort(np.concatenate([u, a]), kind="stable")
        at = np.flatnonzero(m < k)
    return at - np.arange(k)


def segments(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start offsets of runs of equal ``pos`` (pos is sorted) and the chunk of each run."""
    if pos.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
    return starts, pos[starts]


def hist2d(pos: np.ndarray, bins: np.ndarray, cnt: np.ndarray, n_chunks: int, n_bins: int) -> np.ndarray:
    """(n_chunks, n_bins) weighted counts."""
    flat = np.bincount(pos * n_bins + bins, weights=cnt, minlength=n_chunks * n_bins)
    return flat.reshape(n_chunks, n_bins)


def np_histogram2d(edges: np.ndarray, pos, vals, cnt, n_chunks: int, keys: Keys | None = None) -> np.ndarray:
    """Per-chunk ``np.histogram(chunk, bins=edges)[0]``: left-closed bins, last bin closed, outside ignored."""
    nb = edges.size - 1
    inside = (vals >= edges[0]) & (vals <= edges[-1])
    if keys is None:
        b = np.minimum(np.searchsorted(edges, vals[inside], side="right") - 1, nb - 1)
    else:
        b = np.minimum(keys.searchsorted(edges, "right")[inside] - 1, nb - 1)
    return hist2d(pos[inside], b, cnt[inside], n_chunks, nb)


def with_leftover(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """NannyML: if the chunk has mass outside the reference bins, add it as an extra bin (reference 0)."""
    leftover = 1.0 - np.sum(q, axis=1)
    extra = np.where(leftover > 0, leftover, 0.0)
    c = q.shape[0]
    p_ext = np.concatenate([np.broadcast_to(p, q.shape), np.zeros((c, 1))], axis=1)
    q_ext = np.concatenate([q, extra[:, None]], axis=1)
    return p_ext, q_ext


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise ``scipy.spatial.distance.jensenshannon(p, q, base=2)``."""
    p = p / np.sum(p, axis=1, keepdims=True)
    q = q / np.sum(q, axis=1, keepdims=True)
    m = (p + q) / 2.0
    js = np.sum(special.rel_entr(p, m), axis=1) + np.sum(special.rel_entr(q, m), axis=1)
    js /= np.log(2.0)
    return np.sqrt(js / 2.0)


def hellinger(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum((np.sqrt(p) - np.sqrt(q)) ** 2, axis=1)) / np.sqrt(2)


def psi(ref_p: np.ndarray, chunk_p: np.ndarray, smoothing: float) -> np.ndarray:
    r = np.where(ref_p == 0, smoothing, ref_p)
    a = np.where(chunk_p == 0, smoothing, chunk_p)
    return np.sum((a - r) * np.log(a / r), axis=1)


def l_infinity(ref_p: np.ndarray, chunk_p: np.ndarray) -> np.ndarray:
    return np.max(np.abs(ref_p - chunk_p), axis=1)


def wasserstein(fit: ContinuousFit, pos, vals, cnt, n2: np.ndarray, n_chunks: int,
                keys: Keys | None = None) -> np.ndarray:
    """Per-chunk Wasserstein distance as NannyML 0.13.1 computes it (exact or binned, see ``fit.wasserstein``)."""
    out = np.full(n_chunks, np.nan)
    starts, present = segments(pos)
    if starts.size == 0:
        return out
    if fit.wasserstein is None:
        ref = fit.sorted
        ends = np.r_[starts[1:], vals.size]
        for s, e, c in zip(starts.tolist(), ends.tolist(), present.tolist()):
            out[c] = stats.wasserstein_distance(ref, vals[s:e], None, cnt[s:e])
        return out
    # NannyML's estimated method. Tail terms: the ECDF integral NannyML computes over the values below the
    # reference minimum (plus the minimum) times (n_smaller + 1) / n equals sum(ref_min - v) / n (same above).
    binned = fit.wasserstein
    ref_min, ref_max, edges, width = binned.low, binned.high, binned.edges, binned.width
    ref_cdf = binned.ref_cdf
    small = vals < ref_min
    big = vals > ref_max
    n_small = np.bincount(pos[small], weights=cnt[small], minlength=n_chunks)
    term_small = np.bincount(pos[small], weights=cnt[small] * (ref_min - vals[small]), minlength=n_chunks) / n2
    term_big = np.bincount(pos[big], weights=cnt[big] * (vals[big] - ref_max), minlength=n_chunks) / n2
    amount_small = np.where(n_small > 0, (n_small + 1) / n2, 0.0)
    nb = edges.size - 1
    block = max(1, 131_072 // nb)  # bound the (chunks x bins) work matrix to ~1 MB (cache resident)
    bounds = np.r_[starts, vals.size]
    # bin of every value as np.histogram does it (left-closed, last bin closed, outside ignored)
    inside = (vals >= edges[0]) & (vals <= edges[-1])
    keys = keys if keys is not None else Keys(vals)
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


def chi2(r: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
