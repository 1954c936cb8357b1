"""Entropy-coded uniform grid: GOBO's storage budget spent where it buys the most accuracy.

A clustered codebook of ``2**b`` centroids spends exactly ``b`` bits on every weight,
whether the weight sits in the crowded middle of its row or in a rare tail. Entropy-coded
scalar quantization does better at the same size: round every weight to a uniform grid of
many levels, then store the levels with an entropy coder (:mod:`gobo.rans`), so that the
common small levels cost under ``b`` bits and the rare large ones more. For a Gaussian
source at 3 bits this lowers the mean squared error by about a third
(Gish and Pierce, 1968: 1.53 dB from the rate-distortion bound, against 3.4 dB for the
best 8-level quantizer), and real weights, with their heavier tails, gain more.

The grid of a tensor (``GoboConfig(codebook="grid")``):

* Row ``r`` has step ``c * std(row r)`` (float16), with one ``c`` for every tensor of the
  model, chosen so that the file spends the config's bits per weight, all in (codes,
  steps, models, outliers). The levels are integers; a weight farther than 127 steps from
  zero is kept exact (an outlier; none is on BERT-family models at 3 bits).
* With error feedback (:mod:`gobo.feedback`), each input column ``j`` gets a scale
  ``s_j = D_j^{-1/2}`` (float16, geometric mean 1), ``D`` the diagonal of the damped input
  moments' LDL factor: what an error in column ``j`` still costs once the feedback has
  pushed it onto the columns coded after it. The grid then codes ``W' = W diag(s)^{-1}``
  under the moments of ``x diag(s)``, which gives every column the same cost per unit of
  squared error (the high-rate optimum). On all-mpnet-base-v2 (layers 0, 5 and 11, output
  error under real texts' moments) this lowered the error by 10% at equal size.
* With ``feedback_embeddings`` (in ``gobo-grid``) the embedding tables are fed back too.
  Their rows have no input; what an error in a row costs is seen at the table's output,
  where it meets the rest of the model: ``e^T G e``, ``G`` the moments of the gradient of
  the last hidden state (along random directions) at the looked-up vectors
  (:class:`gobo.calibrate.JacobianSensitivity`, the gains' own passes). ``G`` then takes the
  place of a Linear's input moments, for the column scales and the feedback alike. On
  all-MiniLM-L6-v2 this lowered the output error by about 5% at equal size.
* The tensors the feedback does not reach (other embeddings, a pooler) take up the difference
  between what the fed-back tensors came to and the budget: their ``c`` is chosen after the
  feedback, from their exact sizes.

Decoding needs the rANS decoder once, at load time; after that a grid tensor is an ordinary
packed tensor (integer levels, a step per row and a scale per column).
"""

from __future__ import annotations

import math
from typing import Callable, Collection, Mapping, Sequence

import numpy as np

from . import row_blocks, tensor_pool

__all__ = ["GRID", "column_scale", "finish", "levels", "quantize", "row_steps", "tensor_bits"]

#: levels -GRID .. GRID - 1 while coding (codes 0 .. 255); farther weights are outliers
GRID = 128
#: allocate="sensitivity": synthetic sentences (with punctuation, at most 32 words) the gains are
#: measured on. 16 rather than the 8 of the clustered allocation: on all-mpnet-base-v2 at 3 bits
#: per weight, seeds 1 and 3 of the feedback's sentences, the agreement with FP32 rose from
#: 95.81% and 95.61% to 96.03% and 95.64%, and the accuracy delta from -0.62 and -0.59 points
#: to -0.28 and -0.51
SENSITIVITY_SENTENCES = 16
#: shared_pass: the gains' sentences per forward and backward pass (shortest first): all-mpnet-base-v2's
#: 16 sentences of 11 to 39 tokens fill 624 positions padded to 39 in one pass, 488 in two of 8
SENSITIVITY_BATCH = 8
#: allocate="sensitivity": no tensor's relative step is more than this many times the geometric
#: mean of all tensors' steps, nor less than its inverse
MAX_FACTOR = 4.0
#: what an outlier costs at most: its float32 value and its position (uint16 column, or int32)
OUTLIER_BITS = 64
#: rows sampled per tensor when the step is searched for (all rows of smaller tensors)
_SAMPLE = 1 << 17
#: blocks of rows (:func:`row_blocks`) per piece of work of :func:`_blockwise`, so that a large
#: table's per-row work is shared among the threads
_STAT_BLOCKS = 32


def _f16(a) -> np.ndarray:
    """float32 values as the float16 numbers the file holds (positive, finite)."""
    tiny = 2.0**-14  # float16's smallest normal: no step rounds to zero
    return np.clip(np.nan_to_num(np.asarray(a, dtype=np.float64), nan=tiny), tiny, 65504.0).astype(np.float16)


class _Scaled:
    """``W' = W diag(s)^{-1}`` (float32, rows x cols), divided a block of rows at a time
    where it is read rather than held whole: ``[rows]`` gives those rows' values,
    :meth:`flat` the values at flat positions."""

    def __init__(self, w: np.ndarray, s: np.ndarray) -> None:
        self.w, self.s = w, s.astype(np.float32)
        self.shape, self.size = w.shape, w.size

    def __getitem__(self, rows) -> np.ndarray:
        return self.w[rows] / self.s

    def flat(self, idx: np.ndarray) -> np.ndarray:
        return self.w.reshape(-1)[idx] / self.s[idx % self.shape[1]]


def _flat(w2, idx: np.ndarray) -> np.ndarray:
    """The values of ``w2`` (an array or :class:`_Scaled`) at flat positions ``idx``."""
    return w2.flat(idx) if isinstance(w2, _Scaled) else w2.reshape(-1)[idx]


def _spread(w2: np.ndarray, sds: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Each row's standard deviation (float64); a constant row gets its largest magnitude,
    or 1 when it is all zeros, so that it still has a step. ``sds``: the deviations of its
    :func:`row_blocks` in order, when already computed (:func:`_row_sds`)."""
    if sds is None:
        sds = _row_sds(w2, list(row_blocks(*w2.shape)))
    sd = np.concatenate(sds) if len(sds) else np.empty(0)
    flat = sd <= 0
    if flat.any():
        sd[flat] = np.where(np.abs(w2[flat]).max(axis=1) > 0, np.abs(w2[flat]).max(axis=1), 1.0)
    return sd


def _row_sds(w2: np.ndarray, blocks: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """The standard deviation (float64) of each row of each block of rows ``[a, b)``."""
    return [w2[a:b].std(axis=1, dtype=np.float64) for a, b in blocks]


def _blockwise(pool, shapes: Mapping[str, tuple[int, int]], work: Callable) -> dict[str, list]:
    """``work(name, blocks)`` on :data:`_STAT_BLOCKS` of the :func:`row_blocks` of each tensor
    at a time, the pieces on ``pool``'s threads (a large tensor's shared among them): for
    each name of ``shapes`` (rows x cols), its pieces' results in the order of its rows."""
    parts = []
    for n, shape in shapes.items():
        blocks = list(row_blocks(*shape))
        parts += [(n, blocks[i : i + _STAT_BLOCKS]) for i in range(0, len(blocks), _STAT_BLOCKS)]
    out: dict[str, list] = {n: [] for n in shapes}
    for (n, _), got in zip(parts, pool.map(lambda part: work(*part), parts)):
        out[n].append(got)
    return out


def row_steps(w2: np.ndarray, c: float, spread: np.ndarray | None = None) -> np.ndarray:
    """float16 step of each row of ``w2`` (rows x cols) at relative step ``c``; ``spread``:
    its rows' :func:`_spread`, when already known."""
    return _f16(c * (_spread(w2) if spread is None else spread))


def column_scale(h, damp: float) -> np.ndarray:
    """float16 ``s_j = D_j^{-1/2}`` of the damped moments ``h`` (geometric mean 1). The
    factorisation rounds by torch's thread count: :func:`quantize` runs it on one thread
    (:func:`gobo.feedback.one_per_thread`)."""
    from ..feedback import ldl_diagonal

    d = ldl_diagonal(h, damp)
    d = np.where(d > 0, d, d[d > 0].min() if (d > 0).any() else 1.0)
    s = d**-0.5
    return _f16(s / math.exp(float(np.mean(np.log(s)))))


def _quotients(w2: np.ndarray, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(q, s, beyond)``: each weight's level ``rint(w / step)`` (float32), the steps as a
    float32 column, and the mask of levels outside ``-GRID .. GRID - 1``."""
    s = steps.astype(np.float32)[:, None]
    q = w2 / s
    np.rint(q, out=q)
    return q, s, (q < -GRID) | (q > GRID - 1)


def levels(w2: np.ndarray, steps: np.ndarray, codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, outlier)``: ``w2`` rounded to its rows' grids as codes ``level + GRID``
    (uint8; written into ``codes`` when given, C-contiguous of ``w2``'s shape) and the mask
    of weights beyond the grid (their code is that of level 0)."""
    from .. import native

    codes = np.empty(w2.shape, dtype=np.uint8) if codes is None else codes
    out = np.empty(w2.shape, dtype=bool)
    whole = isinstance(w2, np.ndarray) and w2.dtype == np.float32
    if native.available() and (whole or isinstance(w2, _Scaled)):  # compiled: the same quotients, no temporaries
        s = np.ascontiguousarray(steps, dtype=np.float32)
        for a, b in [(0, w2.shape[0])] if whole else row_blocks(*w2.shape):
            native.grid_levels(np.ascontiguousarray(w2[a:b]), s[a:b], GRID, codes[a:b], out[a:b].view(np.uint8))
        return codes, out
    for a, b in row_blocks(*w2.shape):
        q, _, out[a:b] = _quotients(w2[a:b], steps[a:b])
        q[out[a:b]] = 0
        q += GRID
        codes[a:b] = q
    return codes, out


def _entropy_bits(codes: np.ndarray) -> float:
    """Empirical entropy of ``codes`` times their number (bits)."""
    return _entropy_of(np.bincount(codes.reshape(-1), minlength=2 * GRID))


def _entropy_of(counts: np.ndarray) -> float:
    """Empirical entropy times the number of values, from the counts of each value (bits)."""
    n = counts.astype(np.float64)
    n = n[n > 0]
    return float(-(n * np.log2(n / n.sum())).sum())


def tensor_bits(qt) -> int:
    """Bits the file spends on grid tensor ``qt`` (coded stream and model, steps, scales,
    levels, outliers)."""
    return 8 * qt.nbytes()


def _overhead_bits(rows: int, cols: int, scaled: bool, span: int) -> float:
    """Everything but the stream's renormalisation bytes: lane states, the model and the
    levels (``2**b`` float16 and uint16 each, ``b`` the width of ``span`` levels), steps,
    column scales."""
    from .. import rans

    k = 1 << max(1, (span - 1).bit_length())
    return 32 * rans.lanes_for(rows * cols) + 32 * k + 16 * rows + (16 * cols if scaled else 0)


class _Sample:
    """Rows of one tensor, divided by their own spread (and its column scale), for the step
    search: the code entropy at relative step ``c`` is estimated on them."""

    def __init__(self, w2: np.ndarray, scaled: bool, spread: np.ndarray) -> None:
        rows, cols = w2.shape
        take = max(1, min(rows, _SAMPLE // max(cols, 1)))
        self.pick = np.linspace(0, rows - 1, take).round().astype(np.int64)
        # the sampled weights over their rows' spread, flat and sorted: each level's weights are
        # one run of them, counted by bisection
        self.z = np.sort((w2[self.pick] / spread[self.pick][:, None]).astype(np.float32), axis=None)
        self.n, self.rows, self.cols, self.scaled = rows * cols, rows, cols, scaled
        self.added = 0.0  # bits per weight that error feedback adds to the rounded codes' (see _fed_excess)

    def bits(self, c: float) -> float:
        counts = _level_counts(self.z, c)
        beyond = int(counts[0] + counts[-1])
        n = counts[1:-1].copy()
        n[GRID] += beyond  # a weight beyond the grid has the code of level 0
        used = np.flatnonzero(n)
        h = (_entropy_of(n) + OUTLIER_BITS * beyond) / self.z.size + self.added
        return self.n * h + _overhead_bits(self.rows, self.cols, self.scaled, int(used[-1] - used[0]) + 1)


def _level_counts(z: np.ndarray, c: float) -> np.ndarray:
    """How many of ``z`` (float32, flat, ascending) fall on each level of the grid at step
    ``c``: levels ``-GRID .. GRID - 1`` at 1 .. 2 GRID, those beyond the grid at 0 and
    2 GRID + 1 (int64); compiled, by bisection on the runs of each level."""
    from .. import native

    if native.available():
        return native.sorted_level_counts(z, c, GRID)
    q = z / np.float32(c)
    np.rint(q, out=q)
    u = q.astype(np.int64)
    np.clip(u, -GRID - 1, GRID, out=u)
    return np.bincount((u + (GRID + 1)).reshape(-1), minlength=2 * GRID + 2)


def _fed_excess(sample: _Sample, w2: np.ndarray, w: np.ndarray, spread: np.ndarray, scale: np.ndarray, h, damp: float,
                c: float) -> float:
    """Bits per weight that error feedback under ``h`` adds to the codes of ``sample``'s rows
    at relative step ``c``: their fed-back codes' entropy less their rounded codes'. Rows are
    fed back independently, so the sample's excess is the tensor's, to its sampling error."""
    from ..feedback import requantize

    pick = sample.pick
    steps = row_steps(w2[pick], c, spread[pick])
    qt = coding_form(w2[pick], steps, scale, (len(pick), w2.shape[1]))
    fed = requantize(qt, w[pick], h, damp=damp)

    def entropy(t) -> float:
        codes = t.unpacked_codes().reshape(-1)
        return (_entropy_bits(codes) + OUTLIER_BITS * len(t.outlier_index)) / codes.size

    return entropy(fed) - entropy(qt)


def _solve(bits_of: Callable[[float], float], budget: float) -> float:
    """The smallest relative step ``c`` (to 0.1%) whose bits do not exceed ``budget`` (bits
    fall as ``c`` grows); the largest tried when none does."""
    lo, hi = math.log(2.0**-10), math.log(64.0)
    if bits_of(math.exp(hi)) > budget:
        return math.exp(hi)
    if bits_of(math.exp(lo)) <= budget:
        return math.exp(lo)
    while hi - lo > 1e-3:
        mid = 0.5 * (lo + hi)
        if bits_of(math.exp(mid)) > budget:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


def coding_form(w2: np.ndarray, steps: np.ndarray, scale: np.ndarray | None, shape: tuple[int, ...],
                rounded: bool = True):
    """The tensor as error feedback codes it: one codebook per row (its grid's levels times
    its step, in float32), codes by rounding, weights beyond the grid exact; ``w2`` is
    ``W'``, already divided by ``scale``. ``rounded`` False: the codes are left at 0 for the
    feedback to choose (it reads the codebooks and the weights beyond the grid alone), and
    only those weights are looked for."""
    from ..qtensor import QuantizedTensor

    cb = (np.arange(2 * GRID, dtype=np.float32) - GRID)[None, :] * steps.astype(np.float32)[:, None]
    if rounded:
        codes, out = levels(w2, steps)
        idx = np.flatnonzero(out.reshape(-1)).astype(np.int64)
    else:
        codes, idx = np.zeros(int(np.prod(shape)), dtype=np.uint8), _beyond(w2, steps)
    # 8-bit codes are their own packed form: this call's new array is stored as it is
    return QuantizedTensor(codes=codes.reshape(-1), shape=shape, bits=8, codebook=cb, group_rows=1, outlier_index=idx,
                           outlier_value=_flat(w2, idx).astype(np.float32), col_scale=scale, method="gobo")


def _beyond(w2, steps: np.ndarray) -> np.ndarray:
    """Flat positions (int64, increasing) of the weights of ``w2`` beyond their rows' grids:
    the outliers of :func:`levels`, found from each row's largest and smallest weight (a
    division by a positive step and rounding keep the order, so no level of the row lies
    beyond theirs), the rows' own levels formed only where one of those two lies beyond."""
    found = []
    cols = w2.shape[1]
    for a, b in row_blocks(*w2.shape):
        x = w2[a:b]
        s = steps[a:b].astype(np.float32)
        hi, lo = np.rint(x.max(axis=1) / s), np.rint(x.min(axis=1) / s)
        far = np.flatnonzero((hi > GRID - 1) | (lo < -GRID))
        if far.size:
            out = _quotients(x[far], steps[a:b][far])[2]
            r, c = np.nonzero(out)
            found.append((a + far[r]).astype(np.int64) * cols + c)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def finish(qt, steps: np.ndarray):
    """A coded tensor in its stored form: integer levels ``lo .. lo + 2**b - 1`` (``b`` the
    fewest bits that hold the levels used), the steps as ``row_scale``, entropy coded.
    Dequantizes to exactly the same values as ``qt`` (its codebook rows are the levels times
    the steps, in float32)."""
    return _finished(qt.unpacked_codes().reshape(-1), qt.shape, steps, qt.outlier_index, qt.outlier_value, qt.col_scale)


def _finished(codes: np.ndarray, shape: tuple[int, ...], steps: np.ndarray, outlier_index: np.ndarray,
              outlier_value: np.ndarray, col_scale: np.ndarray | None):
    """:func:`finish` of flat codes ``level + GRID`` (uint8, changed in place) with the
    outliers at ``outlier_index``."""
    from .. import rans
    from ..qtensor import QuantizedTensor

    codes[outlier_index] = GRID  # unused under an outlier: level 0, the commonest, the cheapest code
    lo, hi = int(codes.min()), int(codes.max())
    bits = max(1, (hi - lo).bit_length())
    codes -= np.uint8(lo)  # levels less the lowest
    return QuantizedTensor.from_codes(
        codes, shape=shape, bits=bits, _stream=rans.encode_modelled(codes, 1 << bits),  # coded from these codes
        codebook=(lo - GRID + np.arange(1 << bits, dtype=np.float32))[None, :], group_rows=len(steps),
        row_scale=np.asarray(steps, dtype=np.float16), outlier_index=outlier_index, outlier_value=outlier_value,
        method="gobo", compact=True, col_scale=col_scale, entropy=True)


def _rounded_levels(w2s: Mapping[str, np.ndarray], steps: Mapping[str, np.ndarray], names: Sequence[str],
                    pool) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(codes, outlier_index, outlier_value)`` of each tensor ``w2s[n]`` rounded to its rows'
    grids, as :func:`_finished` takes them (the codes flat, a weight beyond the grid at level
    0): what :func:`finish` of :func:`coding_form` without feedback starts from. Blocks of
    rows go to ``pool``'s threads, a large table's shared among them."""
    codes = {n: np.empty(w2s[n].shape, dtype=np.uint8) for n in names}

    def part(n: str, blocks: Sequence[tuple[int, int]]) -> np.ndarray:
        a, b = blocks[0][0], blocks[-1][1]
        out = levels(w2s[n][a:b], steps[n][a:b], codes[n][a:b])[1]
        return np.flatnonzero(out.reshape(-1)).astype(np.int64) + a * w2s[n].shape[1]

    found = _blockwise(pool, {n: w2s[n].shape for n in names}, part)
    out = {}
    for n in names:
        idx = np.concatenate(found[n]) if found[n] else np.zeros(0, dtype=np.int64)
        out[n] = (codes[n].reshape(-1), idx, _flat(w2s[n], idx).astype(np.float32))
    return out


def _model_bits(codes: np.ndarray, outliers: int, rows: int, cols: int) -> float:
    """Bits of the :func:`_finished` tensor of these levels (no column scale) with this many
    outliers, but for the coder's own rounding: the levels' code length under the static
    model the coder will use (:func:`gobo.rans.code_length`), outliers' values, lanes, model,
    steps."""
    from .. import rans

    n = rans.counts(codes, 2 * GRID)  # outliers among level 0's, as :func:`levels` codes them
    used = np.flatnonzero(n)
    lo, span = int(used[0]), int(used[-1] - used[0]) + 1
    levels_bits = rans.code_length(n[lo : lo + span], 1 << max(1, (span - 1).bit_length()))
    return levels_bits + 32 * outliers + _overhead_bits(rows, cols, False, span)


def step_factors(state: Mapping[str, np.ndarray], names: Sequence[str], sensitivity: Callable[[str, np.ndarray], float],
                 probe: float = 0.5, expected: bool = False) -> dict[str, float]:
    """``allocate="sensitivity"``: each tensor's step relative to the others',
    ``sqrt(n_t / g_t)`` (geometric mean 1), ``n_t`` its weights and ``g_t`` its gain, the
    relative output error per unit of relative weight error (``sensitivity``, on synthetic
    sentences: :class:`gobo.calibrate.JacobianSensitivity` in :func:`gobo.quantize`) with the
    tensor rounded to its grid at relative step ``probe``; with ``expected`` (first-order gains
    only), under the error rounding is expected to make instead, in proportion to each row's
    spread: ``g_t = sum_r var_r S_r / (cols sum_r var_r) * |W_t|^2 / |h|^2``, ``S_r`` the sum of
    row ``r``'s ``|J_i|^2``, one pass over the squared gradients and no rounding (the rounded
    error's ``d_i^2`` is that expectation plus noise). The output error ``sum g_t c_t^2 / 12`` at a fixed size
    ``sum n_t (h_t - log2 c_t)`` is least when ``c_t^2`` is proportional to ``n_t / g_t``.
    Bounded to ``[1 / MAX_FACTOR, MAX_FACTOR]``."""
    from .uniform import as_rows

    columns = getattr(sensitivity, "columns_of", None)  # first-order gains: weighed here, rows at a time
    row_sums = getattr(sensitivity, "rows_of", None)

    def relative(n: str) -> float:
        w32, w = as_rows(state[n])
        col = None if columns is None else columns(n).reshape(w.shape)
        q = np.empty_like(w) if col is None else None  # the rounded tensor, for a sensitivity that runs it
        sums = [0.0, 0.0, 0.0]  # of d^2, of w^2, of d^2 |J|^2
        step = max(1, _SAMPLE // w.shape[1])
        for r in range(0, w.shape[0], step):  # a few rows at a time, in cache
            wr = w[r : r + step]
            qr = _rounded(wr, row_steps(wr, probe))
            if q is not None:
                q[r : r + step] = qr
            d = wr.astype(np.float64) - qr
            d *= d
            sums[0] += float(d.sum())
            sums[1] += float(np.square(wr, dtype=np.float64).sum())
            if col is not None:
                sums[2] += float(np.dot(d.reshape(-1), col[r : r + step].reshape(-1).astype(np.float64)))
        err = sums[0] / max(sums[1], 1e-300)
        if err <= 0:
            g = 0.0
        elif col is not None:
            g = sums[2] / max(sensitivity.energy, 1e-300) / err
        else:
            g = sensitivity(n, q.reshape(w32.shape)) / err
        return _relative_step(w.size, g)

    def row_stats(w: np.ndarray, blocks: Sequence[tuple[int, int]]) -> list[tuple[np.ndarray, float]]:
        """Each block's rows' variances and its sum of squares (a constant row's rounding
        makes no error)."""
        return [(w[a:b].var(axis=1, dtype=np.float64), float(np.square(w[a:b], dtype=np.float64).sum()))
                for a, b in blocks]

    def expected_relative(n: str, w: np.ndarray, stats: list[tuple[np.ndarray, float]]) -> float:
        gained = row_sums(n)  # each row's sum of |J_i|^2
        var = np.concatenate([v for v, _ in stats])  # each row's variance
        sq = 0.0
        for _, s in stats:  # summed block after block
            sq += s
        g = float(np.dot(var, gained)) / max(w.shape[1] * float(var.sum()), 1e-300) * sq / max(sensitivity.energy, 1e-300)
        return _relative_step(w.size, g)

    if expected and row_sums is None:
        raise ValueError("expected gains need first-order gains (a sensitivity with rows_of)")
    if not expected and getattr(sensitivity, "rows_only", False):
        raise ValueError("gains under a rounding need each weight's |J_i|^2: these gains kept their rows' sums alone")
    if columns is None:  # a sensitivity that runs the model: one tensor at a time
        out = {n: relative(n) for n in names}
    elif expected:  # the rows' statistics a few blocks at a time, side by side (numpy releases the GIL)
        with tensor_pool(len(names)) as pool:
            rows = dict(zip(names, pool.map(lambda n: as_rows(state[n])[1], names)))  # each checked once
            stats = _blockwise(pool, {n: rows[n].shape for n in names}, lambda n, blocks: row_stats(rows[n], blocks))
        out = {n: expected_relative(n, rows[n], [s for got in stats[n] for s in got]) for n in names}
    else:  # the tensors side by side (numpy releases the GIL)
        with tensor_pool(len(names)) as pool:
            out = dict(zip(names, pool.map(relative, names)))
    mean = math.exp(float(np.mean([math.log(v) for v in out.values()])))
    # bounded: a tensor whose error does not reach the last hidden state (a pooler) may still
    # feed an output the sentences do not measure; it gets steps at most MAX_FACTOR times the
    # middle one (about 2 bits fewer), not none
    return {n: min(max(v / mean, 1 / MAX_FACTOR), MAX_FACTOR) for n, v in out.items()}


def _relative_step(size: int, gain: float) -> float:
    """``sqrt(size / gain)``, the gain rounded to 3 digits: float noise in its measurement
    cannot move a step."""
    return math.sqrt(size / float(f"{max(gain, 1e-6):.3g}"))


def _rounded(w2: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """``w2`` rounded to its rows' grids (float32), the weights beyond them kept: the values
    :func:`levels` codes (a level times its step, in float32)."""
    q, s32, beyond = _quotients(w2, steps)
    q *= s32
    np.copyto(q, w2, where=beyond)
    return q


def quantize(state: Mapping[str, np.ndarray], names: Sequence[str], config, moments: tuple | None = None,
             fed: Sequence[str] = (), feed: Callable[[dict], dict] | None = None,
             progress: Callable[[str], None] | None = None, factors: Mapping[str, float] | None = None,
             measured: Collection[str] = ()) -> tuple[dict, dict]:
    """``(quantized, steps)``: every tensor of ``names`` as a grid tensor, the file spending
    ``config.average or config.bits`` bits per weight on them all in.

    ``moments`` (``(h, shared)`` as :func:`gobo.feedback.input_moments` gives them) and
    ``fed`` (the Linear weights error feedback re-codes) give the column scales; ``feed``
    (the coding-form tensors of ``fed`` -> their fed-back versions, :func:`gobo.feedback.apply`)
    re-codes them. The other tensors' step is then chosen to fill the budget exactly.
    ``factors`` (:func:`step_factors`; None: all 1) multiply each tensor's relative step.
    ``progress(name)`` is called once per tensor when it is finished. ``measured``: fed
    tensors whose feedback adds bits the rounded codes do not show (the embedding tables: 0.4%
    of all-MiniLM-L6-v2's word table, where a Linear's is 0.0-0.2%); the excess is measured by
    feeding back a sample of their rows, and the step chosen with it, so that the tensors coded
    last do not pay for it.
    """
    with tensor_pool(len(names)) as pool:
        return _quantize(state, names, config, moments, fed, feed, progress, factors, measured, pool)


def _quantize(state, names, config, moments, fed, feed, progress, factors, measured, pool) -> tuple[dict, dict]:
    """:func:`quantize`, its work on each tensor spread over ``pool`` (sums in name order:
    the same bytes on any number of threads)."""
    from .uniform import as_rows

    target = float(config.average or config.bits)
    h, shared = moments if moments is not None else ({}, {})
    fed = [n for n in names if n in fed and shared.get(n, n) in h]
    rest = [n for n in names if n not in fed]
    keys = list(dict.fromkeys(shared.get(n, n) for n in fed))  # one scale per input (q, k and v share theirs)
    scales: dict[str, np.ndarray] = {}
    if keys:  # the inputs' factorisations side by side, each on one thread: the same scales on any machine
        from ..feedback import one_per_thread

        with one_per_thread() as solo:
            scales = dict(zip(keys, solo.map(lambda k: column_scale(h[k], config.feedback_damp), keys)))

    def coding_weights(n: str):
        w = as_rows(state[n])[1]
        return _Scaled(w, scales[shared.get(n, n)]) if n in fed else w

    w2 = dict(zip(names, pool.map(coding_weights, names)))
    total = sum(w2[n].size for n in names)
    budget = target * total
    m = {n: 1.0 if factors is None else float(factors[n]) for n in names}
    # each row's, once (steps are multiples of it), a large tensor's blocks side by side
    sds = _blockwise(pool, {n: w2[n].shape for n in names}, lambda n, blocks: _row_sds(w2[n], blocks))
    spread = {n: _spread(w2[n], [sd for got in sds[n] for sd in got]) for n in names}
    samples = dict(zip(names, pool.map(lambda n: _Sample(w2[n], n in fed, spread[n]), names)))

    def bits_of(these: Sequence[str]) -> Callable[[float], float]:
        return lambda c: sum(pool.map(lambda n: samples[n].bits(c * m[n]), these))

    c = _solve(bits_of(names), budget)
    probed = [n for n in fed if n in measured]
    if probed:  # side by side, one thread each (the factorisations): the same excess on any machine
        from ..feedback import one_per_thread

        def excess(n: str) -> float:
            key = shared.get(n, n)
            return _fed_excess(samples[n], w2[n], as_rows(state[n])[1], spread[n], scales[key], h[key],
                               config.feedback_damp, c * m[n])

        with one_per_thread() as solo:
            for n, added in zip(probed, solo.map(excess, probed)):
                samples[n].added = added
        c = _solve(bits_of(names), budget)
    out: dict = {}
    steps: dict[str, np.ndarray] = {}
    if fed:
        for n in fed:
            steps[n] = row_steps(w2[n], c * m[n], spread[n])
        coding = dict(zip(fed, pool.map(
            lambda n: coding_form(w2[n], steps[n], scales[shared.get(n, n)], tuple(np.shape(state[n])),
                                  rounded=feed is None), fed)))
        done = feed(coding) if feed is not None else coding
        for n, qt in zip(fed, pool.map(lambda n: finish(done[n], steps[n]), fed)):
            out[n] = qt
            if progress is not None:
                progress(n)
    if rest:
        left = budget - sum(pool.map(lambda n: tensor_bits(out[n]), fed))
        c_rest = _solve(bits_of(rest), left) if fed else c
        n_rest = sum(w2[n].size for n in rest)

        def coarser(c: float, excess: float) -> float:  # about one bit fewer per doubling of the step
            return c * 2.0 ** (excess / n_rest) * 1.001

        for _ in range(4):  # the samples' estimate, corrected on the exact sizes while they exceed the budget
            for _ in range(4):  # first on the levels' code length under their model: not coded while over it
                for n in rest:
                    steps[n] = row_steps(w2[n], c_rest * m[n], spread[n])
                rounded = _rounded_levels(w2, steps, rest, pool)
                excess = sum(pool.map(lambda n: _model_bits(rounded[n][0], len(rounded[n][1]), *w2[n].shape), rest)) - left
                if excess <= 0:
                    break
                c_rest = coarser(c_rest, excess)
            out.update(zip(rest, pool.map(lambda n: _finished(rounded[n][0], tuple(np.shape(state[n])), steps[n],
                                                              *rounded[n][1:], None), rest)))
            excess = sum(pool.map(lambda n: tensor_bits(out[n]), rest)) - left
            if excess <= 0:
                break
            c_rest = coarser(c_rest, excess)
        if progress is not None:
            for n in rest:
                progress(n)
    return {n: out[n] for n in names}, steps
