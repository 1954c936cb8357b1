"""GOBO: Gaussian outliers kept exact, the rest clustered to 2**b centroids.

Zadeh, Edo, Awad, Moshovos. "GOBO: Quantizing Attention-Based NLP Models for Low Latency
and Energy Efficient Inference." MICRO 2020.

The building blocks here work on 1-D float64 arrays; they are pure and deterministic.
Clustering works on the sorted values with prefix sums, so one refinement step costs
O(k log n) after a single O(n log n) sort.
"""

from __future__ import annotations

import math

import numpy as np

from .. import native

__all__ = [
    "assign",
    "equal_population_init",
    "gaussian_outlier_mask",
    "l1_error",
    "l2_error",
    "refine_l1",
    "refine_lloyd",
    "cluster_sorted",
]

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def gaussian_outlier_mask(w: np.ndarray, threshold: float) -> np.ndarray:
    """True where the log-density of ``w`` under N(mean, std) of ``w`` is below ``threshold``.

    The density is that of the fitted Gaussian, so the cut in standard deviations depends on
    the std itself: ``|z| > sqrt(2 * (-threshold - log(std) - log(sqrt(2 pi))))``.
    """
    mu = float(w.mean(dtype=np.float64))
    sigma = float(w.std(dtype=np.float64))
    if not sigma > 0.0:
        return np.zeros(w.shape, dtype=bool)
    # log N(w) < t  <=>  z^2 > 2 (-t - log sigma - log sqrt(2 pi))
    rhs = 2.0 * (-threshold - math.log(sigma) - LOG_SQRT_2PI)
    if rhs <= 0.0:
        return np.ones(w.shape, dtype=bool)
    zcut = math.sqrt(rhs) * sigma
    return np.abs(w - mu) > zcut


def _prefix(x: np.ndarray) -> np.ndarray:
    """[0, x0, x0 + x1, ...] summed in float64. Widening first and summing in place gives
    the same bits as ``np.cumsum(x, dtype=np.float64)`` several times faster (no casting
    buffers)."""
    p = np.empty(x.size + 1, dtype=np.float64)
    p[0] = 0.0
    p[1:] = x
    np.cumsum(p[1:], out=p[1:])
    return p


def _bounds(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Cluster boundaries in sorted ``x`` for nearest-centroid assignment (ties go low)."""
    mids = ((c[:-1] + c[1:]) * 0.5).astype(x.dtype)  # same dtype: no copy of x
    b = np.empty(c.size + 1, dtype=np.int64)
    b[0] = 0
    b[-1] = x.size
    b[1:-1] = np.searchsorted(x, mids, side="right")
    return b


def equal_population_init(x: np.ndarray, k: int, p: np.ndarray | None = None) -> np.ndarray:
    """Centroids = means of ``k`` equal-population bins of sorted ``x``."""
    if p is None:
        p = _prefix(x)
    n = x.size
    edges = (np.arange(k + 1, dtype=np.int64) * n) // k
    cnt = np.diff(edges)
    sums = p[edges[1:]] - p[edges[:-1]]
    c = np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan)
    return _fill_empty(c, x)


def _fill_empty(c: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Replace NaN centroids (empty clusters) deterministically and keep them sorted."""
    if np.isnan(c).any():
        good = c[~np.isnan(c)]
        fill = good[-1] if good.size else (x[0] if x.size else 0.0)
        c = np.where(np.isnan(c), fill, c)
    return np.sort(c)


def l1_error(x: np.ndarray, c: np.ndarray, p: np.ndarray) -> float:
    """Sum of |x - nearest centroid| over sorted ``x`` (prefix sums ``p``)."""
    b = _bounds(x, c)
    s = np.clip(np.searchsorted(x, c.astype(x.dtype), side="left"), b[:-1], b[1:])
    lo, hi = b[:-1], b[1:]
    left = c * (s - lo) - (p[s] - p[lo])
    right = (p[hi] - p[s]) - c * (hi - s)
    return float(np.sum(left + right))


def l2_error(x: np.ndarray, c: np.ndarray, p: np.ndarray, q: np.ndarray) -> float:
    """Sum of squared errors to the nearest centroid (prefix sums ``p`` of x, ``q`` of x^2)."""
    b = _bounds(x, c)
    lo, hi = b[:-1], b[1:]
    cnt = hi - lo
    s = p[hi] - p[lo]
    ss = q[hi] - q[lo]
    return float(np.sum(ss - 2 * c * s + c * c * cnt))


def _means(x: np.ndarray, c: np.ndarray, p: np.ndarray) -> np.ndarray:
    b = _bounds(x, c)
    cnt = np.diff(b)
    sums = p[b[1:]] - p[b[:-1]]
    return np.where(cnt > 0, sums / np.maximum(cnt, 1), c)  # empty cluster keeps its centroid


def refine_l1(x: np.ndarray, c: np.ndarray, p: np.ndarray, max_iter: int = 200) -> tuple[np.ndarray, int]:
    """The paper's refinement: assign to nearest, move to mean, while the L1 error falls.

    Returns the centroids with the lowest L1 error seen and the iterations run.
    """
    err = l1_error(x, c, p)
    it = 0
    for it in range(1, max_iter + 1):
        nc = np.sort(_means(x, c, p))
        nerr = l1_error(x, nc, p)
        if not nerr < err:
            break
        c, err = nc, nerr
    return c, it


def refine_lloyd(x: np.ndarray, c: np.ndarray, p: np.ndarray, max_iter: int = 200) -> tuple[np.ndarray, int]:
    """Lloyd iterations to a fixed point (a local minimum of the squared error)."""
    it = 0
    for it in range(1, max_iter + 1):
        nc = np.sort(_means(x, c, p))
        if np.array_equal(nc, c):
            break
        c = nc
    return c, it


def cluster_sorted(x: np.ndarray, k: int, clustering: str, max_iter: int = 200, p: np.ndarray | None = None) -> np.ndarray:
    """Centroids (ascending, float64, exactly ``k``) for sorted values ``x``.

    clustering: ``"l1"`` (paper: equal-population init, refine while L1 falls),
    ``"lloyd"`` (same init, Lloyd to convergence) or ``"exact"`` (global optimum of the
    squared error, by dynamic programming). ``p``: the prefix sums of ``x``
    (:func:`_prefix`) when the caller has them (computed otherwise).
    """
    if x.size == 0:
        return np.zeros(k, dtype=np.float64)
    if x.size <= k:
        c = np.empty(k, dtype=np.float64)
        c[: x.size] = x
        c[x.size :] = x[-1]
        return c
    if clustering == "exact":
        from ..native import kmeans1d_exact

        c, _ = kmeans1d_exact(x, k)
        return c
    if p is None:
        p = _prefix(x)
    c = equal_population_init(x, k, p)
    if clustering == "l1":
        c, _ = refine_l1(x, c, p, max_iter)
    elif clustering == "lloyd":
        c, _ = refine_lloyd(x, c, p, max_iter)
    else:
        raise ValueError(f"clustering must be 'l1', 'lloyd' or 'exact', got {clustering!r}")
    return c


def assign(w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (ascending ``c``; ties go to the lower one)."""
    c = np.asarray(c, dtype=np.float64)
    mids = ((c[:-1] + c[1:]) * 0.5).astype(w.dtype)  # same dtype as w: no copy of w
    return np.searchsorted(mids, w, side="left").astype(np.uint8)


# ---------------------------------------------------------------------------- tensor fit


class Prepared:
    """One tensor made ready for GOBO at any bit width: outliers found, rows normalised,
    inliers sorted once. ``centroids(b)`` and ``distortion(b)`` are cheap after that.
    ``bits``: the width the tensor will be built at, where it is known beforehand (every
    tensor at its own width, ``allocate="uniform"``), which activation-weighted outliers are
    chosen at (``config.bits`` when None)."""

    def __init__(self, weight: np.ndarray, config, input_energy: np.ndarray | None = None, bits: int | None = None) -> None:
        w32 = np.ascontiguousarray(weight, dtype=np.float32)
        if w32.ndim < 1 or w32.size == 0:
            raise ValueError("cannot quantize an empty tensor")
        if not np.isfinite(w32).all():
            raise ValueError("the tensor holds NaN or infinite values")
        self.config = config
        self.w32 = w32
        self.rows = w32.shape[0] if w32.ndim > 1 else 1
        w2 = w32.reshape(self.rows, -1)
        mask = gaussian_outlier_mask(w2.reshape(-1), config.outlier_threshold).reshape(w2.shape)
        if mask.all():  # degenerate: keep something to cluster
            mask[:] = False
        self._rows_sorted = None  # per-row codebooks: each row's inliers sorted, made on the way (build uses them)
        if input_energy is not None and config.act_outliers > 0:
            if config.codebook == "row":  # sorted once: the inliers' rows lose only the new outliers
                sorted_rows = _sorted_inliers(w2, mask)
                new = act_outlier_mask(w2, mask, input_energy, config, bits, sorted_rows)
                self._rows_sorted = drop_sorted(*sorted_rows, w2, mask, new & ~mask)
                mask = new
            else:
                mask = act_outlier_mask(w2, mask, input_energy, config, bits)
        self.mask = mask
        self.row_scale = self.row_offset = None
        if config.normalize_rows:
            mu = w2.mean(axis=1, dtype=np.float64)
            sd = w2.std(axis=1, dtype=np.float64)
            # float16 statistics: half the bytes; the codebook absorbs their rounding. A
            # constant row (std 0) gets scale 0 and decodes to exactly its mean, so zero
            # padding rows stay zero; float32 then keeps that mean exact.
            off = mu.astype(np.float16)
            sc = sd.astype(np.float16)
            if (sd == 0).any() or not (np.isfinite(off).all() and np.isfinite(sc).all() and (sc >= 0).all()):
                off = mu.astype(np.float32)
                sc = sd.astype(np.float32)
            self.row_offset, self.row_scale = off, sc
            # normalise with the stored statistics so that encoding and decoding agree
            off32 = off.astype(np.float32)[:, None]
            sc32 = sc.astype(np.float32)[:, None]
            safe = np.where(sc32 > 0, sc32, np.float32(1.0))
            self.z = np.where(sc32 > 0, (w2 - off32) / safe, np.float32(0.0)).astype(np.float32)
            self.energy = float(np.sum(np.square(np.where(sc32 > 0, w2 / safe, np.float32(0.0))), dtype=np.float64))
        else:
            self.z = w2
            self.energy = float(np.sum(np.square(w2), dtype=np.float64))
        self.x: np.ndarray | None = None  # the sorted inliers, made on first use
        self.p: np.ndarray | None = None  # their prefix sums
        self._q: np.ndarray | None = None  # prefix sums of x^2, made on first use
        self._c: dict[int, np.ndarray] = {}

    def sorted_inliers(self) -> np.ndarray:
        """The inliers of the clustered domain, ascending (made on first use)."""
        if self.x is None:
            self.x = np.sort(self.z[~self.mask])
            self.p = _prefix(self.x)
        return self.x

    @property
    def n_outliers(self) -> int:
        return int(self.mask.sum())

    def fixed_nbytes(self) -> int:
        """Bytes stored whatever the bit width: row statistics and outliers (as
        :meth:`QuantizedTensor.nbytes` counts them)."""
        from ..qtensor import outlier_index_nbytes

        stats = sum(a.nbytes for a in (self.row_scale, self.row_offset) if a is not None)
        cols = self.w32.size // self.rows
        return outlier_index_nbytes(self.n_outliers, self.rows, cols, self.config.compact) + 4 * self.n_outliers + stats

    def centroids(self, bits: int) -> np.ndarray:
        """float32 codebook of ``2**bits`` ascending centroids (cached)."""
        if bits not in self._c:
            c = cluster_sorted(self.sorted_inliers(), 1 << bits, self.config.clustering, self.config.max_iter, self.p)
            self._c[bits] = c.astype(np.float32)
        return self._c[bits]

    def distortion(self, bits: int) -> float:
        """Relative squared error at ``bits``: the inliers' error over the tensor's energy
        in the clustered domain (exact without row normalisation, close with it)."""
        x = self.sorted_inliers()
        if x.size == 0:
            return 0.0
        c = self.centroids(bits).astype(np.float64)
        if self._q is None:
            self._q = _prefix(x * x)
        return l2_error(x, c, self.p, self._q) / max(self.energy, 1e-300)

    def release_sorted(self) -> None:
        """Drop the sorted copy (memory) once every centroid set needed is computed."""
        self.x = self.p = self._q = None

    def build(self, bits: int, codes: bool = True) -> "QuantizedTensor":
        """The tensor at ``bits``; with ``codes=False`` its codes are left zero (for a
        caller that chooses them again, as error feedback does)."""
        from ..qtensor import QuantizedTensor

        compact = self.config.compact
        if self.config.codebook == "row":  # one codebook per row
            k = 1 << bits
            cent2 = cluster_rows(self.z, self.mask, k, self.config.max_iter, self._rows_sorted)
            self._rows_sorted = None
            cent2 = _stored(cent2.astype(np.float32), compact)
            group_rows = 1
        else:
            cent2 = _stored(self.centroids(bits)[None, :], compact)
            group_rows = self.rows
        if not codes:
            codes = np.zeros(self.w32.size, dtype=np.uint8)
        elif group_rows == 1:
            codes = assign_rows(self.z, cent2.astype(np.float64)).reshape(-1)
        else:
            codes = assign(self.z.reshape(-1), cent2[0])
        out_idx = np.flatnonzero(self.mask.reshape(-1)).astype(np.int64)
        out_val = self.w32.reshape(-1)[out_idx].copy()
        codes[out_idx] = 0  # unused under an outlier; zero keeps files canonical
        return QuantizedTensor.from_codes(
            codes,
            shape=self.w32.shape,
            bits=bits,
            codebook=cent2,
            group_rows=group_rows,
            row_scale=self.row_scale,
            row_offset=self.row_offset,
            outlier_index=out_idx,
            outlier_value=out_val,
            method="gobo",
            compact=compact,
        )


def _stored(c: np.ndarray, compact: bool) -> np.ndarray:
    """The float32 centroids as the file keeps them: rounded to float16 when ``compact``
    (before any weight is coded, so the codes are nearest to what is stored)."""
    if not compact:
        return c
    h = c.astype(np.float16)
    if not np.isfinite(h).all():
        raise ValueError("compact storage needs centroids within float16 range (|c| <= 65504); quantize without it")
    return h.astype(np.float32)


def act_outlier_mask(w2: np.ndarray, mask: np.ndarray, energy: np.ndarray, config, bits: int | None = None,
                     sorted_rows: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``mask`` plus the ``config.act_outliers`` fraction of ``w2``'s weights (rows x cols)
    whose error, quantized at ``bits`` (``config.bits`` when None) with ``mask`` as outliers, weighs most once
    multiplied by its input's mean square ``energy[col]``: the weights whose error reaches
    the layer's output most. Ties go to the earlier position. ``sorted_rows``: per-row
    codebooks' sorted inliers under ``mask`` (:func:`cluster_rows`), when already made."""
    energy = np.asarray(energy, dtype=np.float64).reshape(-1)
    if w2.ndim != 2 or energy.shape != (w2.shape[1],):
        raise ValueError(f"input energy of {energy.size} features does not fit a weight of shape {w2.shape}")
    k = 1 << (config.bits if bits is None else bits)
    if config.codebook == "row":
        score = act_scores(w2, cluster_rows(w2, mask, k, config.max_iter, sorted_rows), energy, mask).reshape(-1)
    else:
        c = cluster_sorted(np.sort(w2[~mask]), k, config.clustering, config.max_iter).astype(np.float32)
        score = (np.square((w2 - c[assign(w2, c)]).astype(np.float64)) * energy[None, :]).reshape(-1)
        score[mask.reshape(-1)] = -1.0
    extra = min(int(round(config.act_outliers * w2.size)), int((~mask).sum()) - 1)
    out = mask.copy()
    if extra > 0:
        thr = _kth_largest(score, extra)
        take = score > thr
        ties = np.flatnonzero(score == thr)[: extra - int(take.sum())]
        take[ties] = True
        out.reshape(-1)[take] = True
    return out


def _kth_largest(a: np.ndarray, k: int) -> float:
    """The ``k``-th largest value of ``a`` (1-D, no NaN). Exact: the candidates are the
    values at or above a bound read from every 16th value (which leaves at least ``k`` of
    them almost always; otherwise the whole array is searched), so the selection runs on a
    few times ``k`` values rather than all of them."""
    step = 16
    if a.size >= 64 * step and k * step * 4 <= a.size:
        sample = a[::step]
        j = sample.size - min(sample.size, 2 * (-(-k // step)) + 8)  # about twice the share of k the sample holds
        bound = np.partition(sample, j)[j]
        cand = a[a >= bound]
        if cand.size >= k:  # every value left out is below every candidate
            return float(np.partition(cand, cand.size - k)[cand.size - k])
    return float(np.partition(a, a.size - k)[a.size - k])


def fit(weight: np.ndarray, bits: int, config) -> "QuantizedTensor":
    """Quantize one weight tensor with GOBO at ``bits`` (``config``: a GoboConfig).

    Outliers are found on the raw tensor (the paper's Gaussian test). With
    ``normalize_rows`` each row is standardised by its mean and std before one codebook is
    fitted for the whole tensor: the codebook encodes shape, the row statistics scale.
    """
    return Prepared(weight, config).build(bits)


# ---------------------------------------------------------------------------- one codebook per row


def cluster_rows(z: np.ndarray, mask: np.ndarray, k: int, max_iter: int = 200,
                 sorted_rows: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """One codebook per row: ``(rows, k)`` ascending float64 centroids of each row's inliers
    (``~mask``), from equal-population bins refined by Lloyd to a fixed point.

    Every row is sorted once (outliers moved past its end); a Lloyd round then costs one
    binary search per cluster boundary and per-row prefix sums give the cluster means
    (compiled; :func:`cluster_rows_reference` is the same algorithm in numpy, one row at a
    time, and gives the same bits). A row with fewer than ``k`` inliers repeats its last
    value; a row with none gets zeros. ``sorted_rows``: ``_sorted_inliers(z, mask)`` when the
    caller has it (:func:`drop_sorted` makes it from a smaller mask's).
    """
    x, n = _sorted_inliers(z, mask) if sorted_rows is None else sorted_rows
    if native.available():
        return native.cluster_rows(x, n, k, max_iter)
    return _cluster_rows_numpy(x, n, k, max_iter)


def cluster_rows_reference(z: np.ndarray, mask: np.ndarray, k: int, max_iter: int = 200) -> np.ndarray:
    """:func:`cluster_rows` without the compiled routine (for tests and machines without it)."""
    x, n = _sorted_inliers(z, mask)
    return _cluster_rows_numpy(x, n, k, max_iter)


def _sorted_inliers(z: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or mask.shape != z.shape:
        raise ValueError(f"need a 2-D tensor and a mask of its shape, got {z.shape} and {mask.shape}")
    n = (~mask).sum(axis=1).astype(np.int64)
    x = np.where(mask, np.float32(np.inf), z)
    x.sort(axis=1)  # inliers first, ascending; outlier placeholders (inf) after them
    return x, n


def drop_sorted(x: np.ndarray, n: np.ndarray, z: np.ndarray, mask: np.ndarray, drop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_sorted_inliers(z, mask | drop)`` from ``(x, n) = _sorted_inliers(z, mask)`` (``drop``
    outside ``mask``): the compiled routine takes the values at ``drop`` out of each sorted
    row, in place, instead of sorting the rows again: the same values in the same order (zeros
    matched by value: numpy's sort does not keep their signs either, and no sum or
    comparison of the clustering tells them apart)."""
    if not native.available():
        return _sorted_inliers(z, mask | drop)
    rr, cc = np.nonzero(drop)
    vals = np.asarray(z[rr, cc], dtype=np.float32)
    order = np.lexsort((vals, rr))  # row after row, each row's ascending
    native.drop_sorted(x, n, vals[order], np.bincount(rr, minlength=x.shape[0]).astype(np.int64))
    return x, n


def _cluster_rows_numpy(x: np.ndarray, n: np.ndarray, k: int, max_iter: int) -> np.ndarray:
    rows = x.shape[0]
    out = np.zeros((rows, k))
    for r in range(rows):
        nr = int(n[r])
        xr = x[r, :nr].astype(np.float64)
        p = np.zeros(nr + 1)
        np.cumsum(xr, out=p[1:])
        last = xr[-1] if nr else 0.0

        def means(b, old):
            cnt = b[1:] - b[:-1]
            return np.where(cnt > 0, (p[b[1:]] - p[b[:-1]]) / np.maximum(cnt, 1), old)

        b = (np.arange(k + 1, dtype=np.int64) * nr) // k
        c = np.sort(means(b, np.full(k, last)))
        for _ in range(max_iter):
            mids = (c[:-1] + c[1:]) * 0.5
            b = np.concatenate([[0], np.searchsorted(xr, mids, side="left"), [nr]])
            nc = np.sort(means(b, c))
            if np.array_equal(nc, c):
                break
            c = nc
        out[r] = c
    return out


def act_scores(w2: np.ndarray, c: np.ndarray, energy: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Each weight's squared error coded to its row's nearest centroid (``c``: ``(rows, k)``
    ascending float64, rounded to float32 to decode; the difference in float32) times its
    input's energy ``energy[col]`` (float64), -1 at ``mask``: float64 of ``w2``'s shape."""
    w2 = np.ascontiguousarray(w2, dtype=np.float32)
    c = np.ascontiguousarray(c, dtype=np.float64)
    energy = np.ascontiguousarray(energy, dtype=np.float64)
    mask = np.ascontiguousarray(mask, dtype=bool)
    if native.available():
        return native.act_scores(w2, c, energy, mask)
    return act_scores_reference(w2, c, energy, mask)


def act_scores_reference(w2: np.ndarray, c: np.ndarray, energy: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """:func:`act_scores` in numpy (for tests and machines without the compiled routines)."""
    deq = np.take_along_axis(np.asarray(c, np.float64).astype(np.float32), assign_rows(w2, c).astype(np.intp), 1)
    score = np.square((w2 - deq).astype(np.float64)) * np.asarray(energy, np.float64)[None, :]
    score[mask] = -1.0
    return score


def assign_rows(z: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid of each weight's own row codebook (``c``: ``(rows, k)``
    ascending; ties go to the lower one), as uint8 of ``z``'s shape."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    c = np.ascontiguousarray(c, dtype=np.float64)
    if native.available():
        return native.assign_rows(z, c)
    mids = (c[:, 1:] + c[:, :-1]) * 0.5
    out = np.empty(z.shape, dtype=np.uint8)
    for r in range(z.shape[0]):
        out[r] = np.searchsorted(mids[r], z[r].astype(np.float64), side="left")
    return out
