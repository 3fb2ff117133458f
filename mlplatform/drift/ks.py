"""KS layer: the two-sample Kolmogorov-Smirnov statistic of every chunk and its p-value.

``ks`` computes the statistic for all chunks at once from the (chunk, value, count) table and takes the
p-value as ``scipy.stats.ks_2samp(ref, chunk)`` (method 'auto') does:

* ``max(n_ref, n_chunk) <= 10 000``: scipy's exact p-value, obtained by calling the public
  ``scipy.stats.ks_2samp`` on the chunk's values (once for all chunks of one size, ``axis=1``); statistic
  and p-value are taken from it, so they are scipy's;
* otherwise ``kstwo.sf(d, round(n_ref * n_chunk / (n_ref + n_chunk)))``, computed here for all chunks at
  once by ``kstwo_sf`` (<= ~1e-10 relative from scipy's ``kstwo.sf``; cases outside the vectorised branches
  are handed to ``scipy.stats.kstwo.sf`` itself).

``p_mode="asymptotic"`` uses Kolmogorov's limit distribution ``kstwobign`` for every chunk instead.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import special, stats

from mlplatform.drift.kernels import Keys, segments

# ks_2samp(method='auto') computes the exact p-value when max(n1, n2) <= 10 000 (a local constant in scipy).
KS_MAX_AUTO_N = 10_000
_EXACT_BLOCK_VALUES = 2_000_000


def ks(ref_sorted: np.ndarray, pos, vals, cnt, n_chunks: int, p_mode: str = "scipy",
       keys: Keys | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-sample KS statistic and p-value per chunk, identical to ``scipy.stats.ks_2samp``.

    ``vals`` are the distinct values of every chunk, sorted within the chunk, with multiplicities ``cnt``.
    The ECDF difference ``F_ref - F_chunk`` of the pooled sample can only reach its maximum at a chunk value
    or at the last reference value before a chunk value, and its minimum at a chunk value, so evaluating
    ``r/n1 - c/n2`` (chunk value) and ``l/n1 - c_prev/n2`` (just before it) gives exactly scipy's numbers.
    """
    n1 = ref_sorted.size
    d_out = np.full(n_chunks, np.nan)
    p_out = np.full(n_chunks, np.nan)
    starts, present = segments(pos)
    if starts.size == 0:
        return d_out, p_out
    keys = keys if keys is not None else Keys(vals)
    r = keys.searchsorted(ref_sorted, "right")
    l = keys.searchsorted(ref_sorted, "left")
    cum = np.cumsum(cnt)
    ends = np.r_[starts[1:], vals.size]
    seg_len = ends - starts
    offset = np.repeat(cum[starts] - cnt[starts], seg_len)
    c_incl = cum - offset
    c_prev = c_incl - cnt
    n2_seg = c_incl[ends - 1]  # total count per segment (int)
    n2_row = np.repeat(n2_seg, seg_len)
    a = r / n1 - c_incl / n2_row
    b = l / n1 - c_prev / n2_row
    max_s = np.maximum.reduceat(np.maximum(a, b), starts)
    min_s = np.clip(-np.minimum.reduceat(a, starts), 0, 1)
    d = np.where(min_s > max_s, min_s, max_s)
    p = np.empty_like(d)
    asymp = np.ones(d.size, dtype=bool)
    if p_mode == "scipy" and n1 <= KS_MAX_AUTO_N:
        small = np.flatnonzero(n2_seg <= KS_MAX_AUTO_N)
        for n2 in np.unique(n2_seg[small]).tolist():  # chunks of one size go to scipy in one call
            same = small[n2_seg[small] == n2]
            step = max(1, _EXACT_BLOCK_VALUES // n2)  # bound the (chunks x n2) sample matrix to ~16 MB
            for b0 in range(0, same.size, step):
                js = same[b0:b0 + step]
                samples = np.stack([np.repeat(vals[starts[j]:ends[j]], cnt[starts[j]:ends[j]]) for j in js.tolist()])
                d[js], p[js] = _exact_ks_2samp(ref_sorted, samples)
                asymp[js] = False
    if asymp.any():
        m_ = np.maximum(float(n1), n2_seg[asymp].astype(float))
        n_ = np.minimum(float(n1), n2_seg[asymp].astype(float))
        en = m_ * n_ / (m_ + n_)
        if p_mode == "asymptotic":  # Kolmogorov's limit distribution: fast, ~1% relative off kstwo for n ~ 5000
            p[asymp] = stats.kstwobign.sf(d[asymp] * np.sqrt(np.round(en)))
        else:
            p[asymp] = kstwo_sf(d[asymp], np.round(en))
    d_out[present] = d
    p_out[present] = np.clip(p, 0, 1)
    return d_out, p_out


def _exact_ks_2samp(ref: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Statistic and p-value of ``scipy.stats.ks_2samp(ref, sample)`` for every row of ``samples`` (samples of
    one size; ref and samples of at most 10 000 values).

    For these sizes method 'auto' is the exact distribution (statistic rounded to a multiple of 1/lcm(n1, n2));
    if scipy's exact computation fails numerically it falls back to ``kstwo.sf`` and warns, which we silence
    (the answer is the one ``ks_2samp`` returns either way). One call with ``axis=1`` gives the same numbers
    as one call per row, with scipy's argument handling done once.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ks_2samp(ref, samples, method="auto", axis=1)
    return np.asarray(res.statistic, dtype=np.float64), np.asarray(res.pvalue, dtype=np.float64)


def kstwo_sf(d: np.ndarray, n: np.ndarray) -> np.ndarray:
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
    """scipy's Pelz-Good approximation (``_kolmogn_PelzGood(n, x, cdf=True)``) evaluated elementwise on arrays (0 < x < 1)."""
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
