"""Error feedback: choose each Linear's codes so that its *outputs*, not its weights, stay close.

GOBO picks every weight's code on its own (nearest centroid). With the second moments of a
Linear's inputs, ``H = E[x x^T]``, the codes can be chosen column by column so that the error
already made is pushed onto the columns not yet coded, where the next choices can absorb it:
the optimal-brain-compression update of GPTQ (Frantar et al., 2023), here with GOBO's
codebooks (one per tensor or one per row) instead of a uniform grid. The codebooks, outlier
positions and file layout stay as GOBO made them; only the codes change, and each outlier
keeps the value that absorbs the error that reached it (still stored exactly).

``H`` comes from a forward pass of the model (its FP32 weights; the pass in bfloat16 where
the processor multiplies it natively, :func:`input_moments`) over calibration sentences: synthetic ones
drawn from the tokenizer alone (:func:`gobo.calibrate.synthetic_batch`, data-free) or texts the
user gives. Every real token counts, the start and end tokens included: in some models
(all-mpnet-base-v2) those carry activations orders of magnitude above the words', and leaving
them out of ``H`` lets the feedback move error exactly where they read it (measured: 74.7%
agreement instead of 91.8% on all-mpnet-base-v2).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from typing import Callable, Collection, Sequence

import numpy as np

from .qtensor import QuantizedTensor

__all__ = ["BATCH", "CALIBRATION_DTYPES", "CALIBRATION_STEP", "DAMP", "GroupedMoments", "apply", "calibration_batch", "diagonal",
           "embedding_tables", "error_feedback", "fast_dtype", "feedback_rows", "input_energy", "input_moments", "ldl_diagonal", "linear_weights",
           "moments_factor", "one_per_thread", "requantize", "requantize_group", "scaled_moments", "texts_sha256"]

#: diagonal damping, as a fraction of the mean diagonal of H (``GoboConfig.feedback_damp``
#: sets it for gobo.quantize, 0.1 by default: moments of synthetic sentences are only an
#: estimate of those of text: on all-mpnet-base-v2 the layers' output error on real inputs
#: was 10% lower with 0.1 than with 0.01, and level from 0.1 to 0.3)
DAMP = 0.01
#: columns coded together: the errors of the columns before a block reach it in one product.
#: Within a block each error is pushed onto the block's later columns one by one (float64,
#: compiled), between blocks by float32 matrix products; narrower blocks move work from the
#: first to the second. 32 quantized all-mpnet-base-v2 (the mixed setting, grouped feedback)
#: in 8.97-9.13 s against 9.24-9.62 s with 128
BLOCK = 32
#: the name :func:`apply` reports progress with after each batch of calibration sentences
CALIBRATION_STEP = "calibration.sentences"
#: sentences per forward pass of :func:`input_moments`
BATCH = 32
#: rows of a weight fed back together at most (:func:`feedback_rows`): their copies in coding order
#: and their errors stay small (under 2 MB at 768 inputs), in cache and out of fresh memory
SHARE_ROWS = 256
#: precisions of the calibration pass (:func:`input_moments`): "float32", or "bfloat16"
#: (autocast forward, the moments still summed in float32), or "auto" (:func:`fast_dtype`'s
#: choice). On all-mpnet-base-v2, 64 synthetic
#: sentences, the output error of the fed-back Linears of layers 0, 5 and 11 under real
#: texts' moments was the same either way (0.00881 and 0.00881 on one seed of sentences, 0.00876
#: and 0.00877 on another); the forward pass took half the time.
CALIBRATION_DTYPES = ("float32", "bfloat16", "auto")


def fast_dtype() -> str:
    """"bfloat16" where the processor multiplies bfloat16 natively (AVX-512 BF16 or AMX, as
    torch reports them), else "float32" (elsewhere bfloat16 products are emulated, slower)."""
    import torch

    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        f = getattr(cpu, probe, None)
        try:
            if f is not None and f():
                return "bfloat16"
        except Exception:  # a torch without the probe's backend
            continue
    return "float32"


def texts_sha256(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def calibration_batch(tokenizer, texts: Sequence[str] | None, n: int, max_len: int = 128, seed: int = 0,
                      punctuation: bool = False):
    """``(input_ids, attention_mask)``: ``n`` synthetic sentences (``texts`` None, up to 46
    words, with punctuation if asked: :func:`gobo.calibrate.synthetic_batch`) or the first
    ``n`` of ``texts`` (truncated to ``max_len`` tokens)."""
    if texts is None:
        from .calibrate import synthetic_batch

        return synthetic_batch(tokenizer, n_seqs=n, max_len=48, seed=seed, punctuation=punctuation)
    b = tokenizer(list(texts)[:n], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return b["input_ids"], b["attention_mask"]


def linear_weights(model, names: Sequence[str]) -> list[str]:
    """Those of ``names`` that are the weight of an nn.Linear of ``model`` (what error
    feedback re-codes), in order."""
    import torch

    mods = dict(model.named_modules())
    return [n for n in names if isinstance(mods.get(n.rsplit(".", 1)[0]), torch.nn.Linear)]


def embedding_tables(model, names: Sequence[str]) -> list[str]:
    """Those of ``names`` that are the weight of an nn.Embedding of ``model``, in order."""
    import torch

    mods = dict(model.named_modules())
    return [n for n in names if isinstance(mods.get(n.rsplit(".", 1)[0]), torch.nn.Embedding)]


def input_moments(model, input_ids, attention_mask, weights: Sequence[str], batch: int = BATCH,
                  diagonal: bool | Collection[str] = False,
                  shared: dict | None = None, progress: Callable[[], None] | None = None, dtype: str = "float32",
                  group: int = 0, recorder: "MomentsRecorder | None" = None) -> dict:
    """``E[x x^T]`` (float32 torch tensors) of the input of every nn.Linear whose weight is
    named in ``weights``, over the real tokens of the batch (products and their sums over
    batches in float32: relative rounding about 1e-6, well below what the sample of
    sentences moves); with
    ``diagonal`` only its diagonal ``E[x_j^2]`` (in float64), one value per input feature
    (much cheaper): for every weight (``True``) or for those named in it (a collection). A dict given as
    ``shared`` receives, for each weight, the first of ``weights`` whose Linear reads the same
    input tensor (a layer's query, key and value share one, and get one tensor, not to be
    changed in place). ``progress()`` is called after each batch of ``batch`` sentences.

    The sentences go through the model shortest first, each batch cut to the span of
    positions its own sentences fill: the moments are sums over tokens, so the grouping only
    saves the work spent on padding.

    ``dtype="bfloat16"`` runs the model under bfloat16 autocast (its matrix products in
    bfloat16, LayerNorm and softmax in float32); the moments of the inputs it gives are still
    summed in float32 (products of bfloat16 values are exact there, so ``H`` stays positive
    semi-definite; bfloat16 products rounded batch by batch did not, next to MPNet's loudest
    features). Twice as fast a forward pass where the processor multiplies bfloat16 natively
    (:func:`fast_dtype`, what ``dtype="auto"`` chooses), and the moments move by less than
    the sample of sentences moves them (see :data:`CALIBRATION_DTYPES`).

    ``group`` > 0: the full moments of an input wider than ``group`` features are not
    formed. Its features are ranked by ``E[x_j^2]`` and cut into groups of about ``group``
    (the loudest ``group``, the next, ...), and only each group's own block of the moments
    is formed: a :class:`GroupedMoments` (the inputs are kept until the pass ends, when the
    ranking is known). On a 3072-wide input cut into four groups that is a quarter of the
    products.

    ``recorder``: a :class:`MomentsRecorder` already open on ``model`` (for these
    ``weights``, ``diagonal`` and ``group``), whose sums so far count too: the moments of
    the passes it saw and of these sentences together. It is closed either way."""
    import torch

    if dtype not in CALIBRATION_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(CALIBRATION_DTYPES)}, got {dtype!r}")
    half = (fast_dtype() if dtype == "auto" else dtype) == "bfloat16"
    from .calibrate import _batches

    rec = recorder if recorder is not None else MomentsRecorder(model, weights, diagonal, group)
    mask = attention_mask.bool()
    try:
        with torch.inference_mode():
            for rows, span in _batches(mask, batch):
                rec.batch(mask[rows, span])
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
                    model(input_ids=input_ids[rows, span], attention_mask=attention_mask[rows, span])
                if progress is not None:
                    progress()
    finally:
        rec.close()
    return rec.means(shared)


class MomentsRecorder:
    """Hooks on ``model`` that sum what :func:`input_moments` returns over every forward
    pass while open, whoever runs it (the gains' passes, :class:`gobo.calibrate.JacobianSensitivity`,
    count as well as :func:`input_moments`' own): before each pass, :meth:`batch` gives the
    mask of its real tokens. :meth:`close` removes the hooks, :meth:`means` gives the moments."""

    def __init__(self, model, weights: Sequence[str], diagonal: bool | Collection[str] = False, group: int = 0) -> None:
        import torch

        self.group = group
        only_diag = set(weights) if diagonal is True else set(diagonal or ())
        mods = dict(model.named_modules())
        sums = self.sums = {}
        count = self.count = {}
        cur = self.cur = {"last": None, "mask": None}
        first = self.first = {}
        kept = self.kept = {}  # grouped inputs: their real tokens, batch by batch
        self.hooks = []
        for w in weights:
            m = mods.get(w.rsplit(".", 1)[0])
            if not isinstance(m, torch.nn.Linear):
                continue

            def hook(mod, inp, out, w=w):
                x = inp[0]
                if x.dim() != 3:
                    return
                # Linears called one after the other on the same tensor (query, key and value)
                # share one product, summed once under the first one's name (a diagonal one
                # shared only by those that need no more)
                diag = w in only_diag
                last = cur["last"]
                if last is None or last[0] is not x or (last[2] and not diag):
                    last = cur["last"] = (x, w, diag)
                    xm = x.detach()[cur["mask"]]  # no gradient through the sums, in a pass that takes them
                    if diag:
                        prod = (xm.to(torch.float64) ** 2).sum(0)
                        sums[w] = sums[w] + prod if w in sums else prod
                    elif group and xm.shape[1] > group:
                        kept.setdefault(w, []).append(xm)
                    else:  # float32 sums of the upper bands only: the lower ones are their mirror image
                        xm = xm.to(torch.float32)
                        acc = sums.get(w)
                        if acc is None:  # a normal tensor, not an inference one: returned without a copy
                            with torch.inference_mode(False):
                                acc = sums[w] = torch.zeros((xm.shape[1], xm.shape[1]), dtype=torch.float32)
                        _add_upper(acc, xm)
                    count[w] = count.get(w, 0) + xm.shape[0]
                first.setdefault(w, last[1])

            self.hooks.append(m.register_forward_hook(hook))

    def batch(self, mask) -> None:
        """The next pass's real tokens (bool, sentences x positions)."""
        self.cur["mask"], self.cur["last"] = mask, None

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.cur["last"] = None

    def means(self, shared: dict | None = None) -> dict:
        """The moments of every input seen (:func:`input_moments`' result); ``shared`` as there."""
        import torch

        if shared is not None:
            shared.update(self.first)
        means = {}
        for k, acc in self.sums.items():
            mean = _mirror(acc) if acc.dim() == 2 else acc.clone()  # the diagonal's sums are inference tensors
            means[k] = mean.div_(self.count[k])
        for k, xs in self.kept.items():
            means[k] = GroupedMoments.of(torch.cat(xs), self.group)
        return {w: means[self.first[w]] for w in self.first}


def _add_upper(acc, x) -> None:
    """Add to ``acc`` the upper bands (:func:`_bands`) of ``x^T x``, ``x`` float32 (tokens x
    features)."""
    for a, b in _bands(x.shape[1]):
        acc[a:b, a:].addmm_(x[:, a:b].T, x[:, a:])


def _mirror(acc):
    """``acc`` with its lower bands set to the mirror image of its upper ones (in place)."""
    bands = _bands(acc.shape[0])
    for i, (a, b) in enumerate(bands):
        for c, d in bands[i + 1 :]:
            acc[c:d, a:b] = acc[a:b, c:d].T
    return acc


def _gram(x):
    """``x^T x`` (float32) of a float32 ``x`` (tokens x features)."""
    import torch

    acc = torch.zeros((x.shape[1], x.shape[1]), dtype=torch.float32)
    _add_upper(acc, x)
    return _mirror(acc)


class GroupedMoments:
    """Block-diagonal input moments: ``index[g]`` (int64, the features of group ``g`` in
    increasing order) and ``blocks[g]`` (float32, ``E[x_i x_j]`` for ``i, j`` in group ``g``),
    the groups cutting the features ranked by ``E[x_j^2]`` into consecutive runs; ``mean``
    is the mean of the whole diagonal (what the damping is a fraction of, as with the full
    moments). Error feedback under them (:func:`requantize_group`) codes each group's
    columns on their own, exactly as under the full moments with every term between two
    groups set to zero.

    Why ranked groups: GPTQ's update carries a column's error to the columns correlated with
    it, and the loud features are where most of it goes. On all-mpnet-base-v2's feed-forward
    output matrices (3072-wide inputs; layers 0, 5 and 11, 64 synthetic sentences, the output
    error under 400 test texts' moments), four ranked groups kept 77% of what full moments
    gain over nearest-centroid codes (0.00164 against 0.00153 and 0.00200, geometric mean),
    four groups of consecutive features 62%, two ranked groups 89%.
    """

    def __init__(self, index, blocks, mean: float) -> None:
        self.index, self.blocks, self.mean = list(index), list(blocks), float(mean)
        self.shape = (sum(len(i) for i in self.index),) * 2

    @classmethod
    def of(cls, x, group: int) -> "GroupedMoments":
        """The moments of inputs ``x`` (real tokens x features), in groups of about ``group``."""
        import torch

        x = x.to(torch.float32)
        n, width = x.shape[0], x.shape[1]
        # ranked by float32 sums of squares: the blocks' diagonals (the energies used) are exact
        # sums of products; a near-tie the ranking breaks the other way only moves a feature to
        # the next group
        order = torch.argsort(x.square().sum(0), descending=True, stable=True)
        k = -(-width // group)
        index = [torch.sort(order[width * i // k : width * (i + 1) // k]).values for i in range(k)]
        blocks = [_gram(torch.index_select(x, 1, g)).div_(n) for g in index]  # in feature order: a fast gather
        mean = float(sum(torch.diagonal(b).to(torch.float64).sum() for b in blocks)) / width
        return cls(index, blocks, mean)

    def diagonal(self):
        """``E[x_j^2]`` (float32) in feature order, from the blocks."""
        import torch

        d = torch.empty(self.shape[0], dtype=torch.float32)
        for g, b in zip(self.index, self.blocks):
            d[g] = torch.diagonal(b)
        return d

    def dense(self):
        """The full matrix with zeros between groups (for checks; feedback never forms it)."""
        import torch

        h = torch.zeros(self.shape, dtype=torch.float32)
        for g, b in zip(self.index, self.blocks):
            h[g[:, None], g[None, :]] = b
        return h


def diagonal(h) -> np.ndarray:
    """``E[x_j^2]`` (float64 numpy) of moments as :func:`input_moments` returns them: a
    matrix, its diagonal alone, or :class:`GroupedMoments`."""
    import torch

    if isinstance(h, GroupedMoments):
        h = h.diagonal()
    return (torch.diagonal(h) if h.dim() == 2 else h).numpy().astype(np.float64)


def _bands(n: int) -> list[tuple[int, int]]:
    """Up to four bands of rows ``[a, b)`` of an ``n x n`` product: each needs only its
    columns from ``a`` on (those left of ``a`` mirror an earlier band's), 10/16 of the work."""
    k = max(1, min(4, n // 256))
    return [(n * i // k, n * (i + 1) // k) for i in range(k)]


def input_energy(model, tokenizer, weights: Sequence[str], n: int, texts: Sequence[str] | None = None,
                 punctuation: bool = False, seed: int = 0, dtype: str = "float32") -> dict:
    """``E[x_j^2]`` (float64 numpy, one value per input feature) of the input of every
    nn.Linear named in ``weights``, on ``n`` synthetic sentences (``texts`` None; drawn with
    ``seed``) or the first ``n`` of ``texts``: what ``GoboConfig.act_outliers`` weighs errors by.
    ``dtype``: the precision of the forward pass (:func:`input_moments`)."""
    ids, mask = calibration_batch(tokenizer, texts, n, seed=seed, punctuation=punctuation)
    return {w: m.numpy() for w, m in input_moments(model, ids, mask, weights, diagonal=True, dtype=dtype).items()}


def moments_factor(h, damp: float = DAMP):
    """``(T, perm, dead)``: the columns' coding order ``perm`` (decreasing diagonal of ``h``,
    stable), the unit upper-triangular ``T`` (float64) with the damped moments in that order
    equal to ``T D T^T`` for some positive diagonal ``D`` (what :func:`error_feedback` and
    :func:`feedback_rows` feed errors forward with), and the columns no input reaches (zero
    diagonal; given a unit diagonal here). One Cholesky factorisation of the moments in
    reversed order (``J``): ``J L J`` is upper triangular with ``(J L J)(J L J)^T`` the
    moments, and ``T`` is it with its columns divided by their diagonal. No inverse is formed:
    coding column ``i`` and adding ``(w_i - q_i) T[i, j]`` to every later column ``j`` (``w_i``
    the original weight) is GPTQ's update (the LDL form of Chee et al., 2023). The
    factorisation runs in float32, in float64 where that fails: on all-mpnet-base-v2's
    3072-wide moments, damped by 0.01 to 1, the output error of the codes was the same to
    0.3% either way, at half the time."""
    F, diag, _, perm, dead = _factor_parts(h, damp)
    return (F.mT.to(diag.dtype) / diag[None, :]).contiguous(), perm, dead


def _factor_transposed(h, damp: float, scale: float | None = None):
    """``(F, perm, dead)`` of :func:`moments_factor` with ``F`` the transpose of ``J L J``
    (before its columns are divided by their diagonal), in the precision the factorisation
    ran in, rows contiguous. LAPACK's factor is column-major, so this transpose is the layout
    it comes in: a flip, no transposing copy. ``scale``: what the damping is a fraction of
    (None: the mean diagonal of ``h``; one group of :class:`GroupedMoments` gives its whole
    input's)."""
    import torch

    H = torch.as_tensor(h)
    d = torch.diag(H).to(torch.float64)
    dead = d == 0
    d[dead] = 1.0
    perm = torch.argsort(d, descending=True, stable=True)
    rev = perm.flip(0)
    for dtype in (torch.float32, torch.float64):  # float32 unless it fails
        Hd = H.to(dtype).index_select(0, rev).index_select(1, rev)  # rows, then columns: 3x faster than one 2-D gather
        Hd.diagonal().copy_(d[rev]).add_(damp * (float(torch.mean(d)) if scale is None else scale))
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            break
    else:
        raise ValueError("the damped input moments are not positive definite; raise the damping (feedback_damp)")
    return L.mT.flip(0, 1), perm, dead


def _factor_parts(h, damp: float, scale: float | None = None):
    """``(F, diag, Tt32, perm, dead)``: :func:`_factor_transposed`'s factor with its diagonal
    (float64; ``T`` is ``F^T`` with its columns divided by it) and the float32 ``T^T`` that
    :func:`_fed_block` feeds earlier blocks' errors forward with."""
    import torch

    F, perm, dead = _factor_transposed(h, damp, scale)
    diag = torch.diag(F).to(torch.float64)
    return F, diag, F.to(torch.float32) / diag.to(torch.float32)[:, None], perm, dead


def error_feedback(weight, h, quantize: Callable, damp: float = DAMP, block: int = BLOCK, scale: float | None = None):
    """Code the columns of ``weight`` (rows x cols) one at a time, pushing each column's error
    onto the columns not yet coded (GPTQ, Frantar et al., 2023), under input moments ``h``.

    Columns go in order of decreasing ``h`` diagonal; columns no input reaches (zero
    diagonal) are zeroed. ``quantize(col, j)`` codes column ``j`` (original index) given its
    fed-forward float64 values and returns ``(value, code)``, two (rows,) tensors. Returns
    ``(codes, values)`` (rows x cols, int64 and float64) in the original column order.
    Within a block of ``block`` columns each error reaches the later columns at once, in
    float64; the errors of earlier blocks reach a block in one float32 product
    (:func:`_fed_block`), as in the compiled :func:`feedback_rows`. ``scale``: what the
    damping is a fraction of (None: the mean diagonal of ``h``).
    """
    import torch

    W0, T, Tt32, perm = _coding_order(weight.detach().to(torch.float64), h, damp, scale)
    cols = W0.shape[1]
    codes = torch.zeros(W0.shape, dtype=torch.int64)
    values = torch.zeros_like(W0)
    err = torch.zeros(W0.shape, dtype=torch.float32)
    order = perm.tolist()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = _fed_block(W0, err, Tt32, i1, i2)
        T1 = T[i1:i2, i1:i2]
        for i in range(i2 - i1):
            v, c = quantize(W1[:, i], order[i1 + i])
            codes[:, i1 + i], values[:, i1 + i] = c, v
            e = W0[:, i1 + i] - v
            W1[:, i + 1 :] += e[:, None] * T1[i, i + 1 :][None, :]
        err[:, i1:i2] = W0[:, i1:i2] - values[:, i1:i2]
    inv = torch.argsort(perm)
    return codes[:, inv], values[:, inv]


def _coding_order(w64, h, damp: float, scale: float | None = None):
    """``(W0, T, Tt32, perm)`` for feeding back ``w64`` (float64) under moments ``h``: the
    weights in coding order with the columns no input reaches zeroed, the factor of
    :func:`moments_factor` (``T``, float64, what each block's columns are coded with) and the
    float32 transpose of ``T`` that the pushes between blocks use (:func:`_fed_block`), and
    the order."""
    F, diag, Tt32, perm, dead = _factor_parts(h, damp, scale)
    return _ordered(w64, perm, dead), F.mT.to(diag.dtype) / diag[None, :], Tt32, perm


def _ordered(w, perm, dead):
    """The weights ``w`` (a float tensor or array, rows x cols) in coding order as a new
    float64 tensor, the columns no input reaches zeroed. The columns are gathered in
    ``w``'s own precision by numpy (several times faster than torch's indexing along
    columns), then widened."""
    import torch

    out = torch.from_numpy(np.take(np.asarray(w), perm.numpy(), axis=1)).to(torch.float64)
    if bool(dead.any()):
        out[:, dead[perm]] = 0.0
    return out


def _columns(a, order):
    """``a[:, order]`` (``a`` a 2-D tensor or array, ``order`` a torch index) as a numpy array."""
    return np.take(np.asarray(a), order.numpy(), axis=1)


def _fed_block(W0, err, Tt32, i1: int, i2: int):
    """Columns ``i1:i2`` of the weights (float64, a new tensor) with the errors of every column
    before them fed forward: ``W0 + err[:, :i1] @ T[:i1, i1:i2]``, one float32 product
    (``err`` the float32 errors against the original weights, ``Tt32`` the float32 ``T^T``).
    Gathered when the block is reached rather than pushed onto all later columns after each
    block, so the weights after a block are never rewritten; the product's rounding (relative
    1e-7) is far below a code step."""
    if not i1:
        return W0[:, i1:i2].clone()
    return W0[:, i1:i2] + _push(err, Tt32, i1, i2)  # added in float64, as the product widened first


def _push(err, Tt32, i1: int, i2: int):
    """What the errors of the columns before ``i1`` add to columns ``i1:i2`` (float32):
    ``err[:, :i1] @ T[:i1, i1:i2]``, one product."""
    return err[:, :i1] @ Tt32[i1:i2, :i1].mT


def feedback_rows(weight, h, codebook, mask, damp: float = DAMP, block: int = BLOCK, threads: int | None = None):
    """:func:`error_feedback` with nearest-centroid coding against one codebook per row,
    compiled: ``weight`` (rows x cols), ``codebook`` (rows x k ascending), ``mask`` (rows x
    cols, True at outliers, which keep their fed-forward value rounded to float32; None: no
    outliers). Each block of columns gets the errors of the columns before it by one matrix
    product, then is coded row by row in C. Rows are shared among ``threads`` threads
    (torch's count by default); a row's codes do not depend on that split. Returns ``(codes,
    values)`` (uint8 and float64, rows x cols) in the original column order."""
    import torch

    codes, values, perm = _feedback_rows(weight, h, codebook, mask, damp, block, threads)
    inv = torch.argsort(perm)
    return _columns(codes, inv), _columns(values, inv)


@functools.lru_cache(maxsize=None)
def _pool(threads: int):
    """A pool of ``threads`` threads, kept for the compiled feedback's later calls (a call
    per Linear, or per group of columns, would otherwise start its own)."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gobo-feedback")


def _feedback_rows(weight, h, codebook, mask, damp: float, block: int, threads: int | None,
                   scale: float | None = None, values: bool = True):
    """:func:`feedback_rows` with ``(codes, values, perm)`` in coding order (torch tensors):
    column ``k`` of ``codes`` and ``values`` is column ``perm[k]`` of the weight. ``values``
    False: the values are only kept where ``mask`` is True anywhere (else None), what a
    caller that reads the outliers' alone needs."""
    import torch

    from . import native

    F, diag, Tt32, perm, dead = _factor_parts(h, damp, scale)
    weight = np.asarray(weight, dtype=np.float32)
    rows, cols = weight.shape
    M = None if mask is None else torch.from_numpy(_columns(np.asarray(mask, dtype=bool).view(np.uint8), perm))
    cb = torch.as_tensor(np.ascontiguousarray(codebook, dtype=np.float64)).contiguous()
    codes = torch.empty((rows, cols), dtype=torch.uint8)
    kept = torch.empty((rows, cols), dtype=torch.float64) if values or (M is not None and bool(M.any())) else None
    t = max(1, min(threads or torch.get_num_threads(), rows))
    n = 1 if t == 1 else min(4 * t, max(t, rows // 64))  # shares of the rows, taken by the threads as they come free
    n = max(n, -(-rows // SHARE_ROWS))  # each share's own arrays small enough to stay in cache
    cuts = [rows * i // n for i in range(n + 1)]
    # each block's factor in float64, as moments_factor computes it
    starts = range(0, cols, block)
    Tbs = [(F[i1 : i1 + block, i1 : i1 + block].to(torch.float64) / diag[i1 : i1 + block, None]).mT.contiguous()
           for i1 in starts]

    def share(a, b):  # rows a:b through every block: rows are fed back independently
        W0 = _ordered(weight[a:b], perm, dead)
        err = torch.empty((b - a, cols), dtype=torch.float32)
        val = kept[a:b] if kept is not None else torch.empty((b - a, min(block, cols)), dtype=torch.float64)
        work = torch.empty((b - a, min(block, cols)), dtype=torch.float64)  # the block's fed values, as it is coded
        for i1, Tb in zip(starts, Tbs):
            i2 = min(i1 + block, cols)
            v = val[:, i1:i2] if kept is not None else val[:, : i2 - i1]
            # the block's weights plus the earlier columns' push (what _fed_block forms), added in C
            native.feedback_block(work[:, : i2 - i1], W0[:, i1:i2], _push(err, Tt32, i1, i2) if i1 else None, Tb,
                                  cb[a:b], None if M is None else M[a:b, i1:i2], codes[a:b, i1:i2], v, err[:, i1:i2])

    # Each thread takes shares of the rows through all the blocks, its products one-threaded:
    # no thread waits for another between blocks, and torch's own threads, which would spin
    # between its products, are not woken.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    todo = iter(range(n))  # shared: next() on it hands each share to one thread

    def work():
        for j in todo:
            share(cuts[j], cuts[j + 1])

    rest = []
    try:
        rest = [_pool(t).submit(work) for _ in range(1, t)]
        work()  # this thread takes shares too
    finally:
        try:
            for f in rest:  # every share ends before the thread count is put back
                f.result()
        finally:
            torch.set_num_threads(threads_before)
    return codes, kept, perm


def requantize(qt: QuantizedTensor, weight: np.ndarray, h, damp: float = DAMP, block: int = BLOCK) -> QuantizedTensor:
    """``qt`` with its codes chosen by :func:`error_feedback` under input moments ``h``.

    Each column's code is its weight's nearest centroid (of the row's codebook) after the
    error of the columns before has been fed forward. Outliers keep their positions and take
    the fed-forward value (stored exactly, so they add no error of their own).
    """
    return requantize_group([qt], [weight], h, damp, block)[0]


def requantize_group(qts: Sequence[QuantizedTensor], weights: Sequence[np.ndarray], h, damp: float = DAMP,
                     block: int = BLOCK) -> list[QuantizedTensor]:
    """:func:`requantize` for Linears that read the same input (a layer's query, key and
    value): their rows are fed back together, under one factorisation of ``h``, and each
    row gets the same codes as on its own. Linears of different bit widths are fed back one
    at a time. ``h`` may be :class:`GroupedMoments`: each group's columns are then fed back
    on their own, under its block."""
    for qt in qts:
        if qt.row_scale is not None or qt.row_offset is not None:
            raise ValueError("error feedback needs codebooks without row statistics (normalize_rows=False)")
    if len({qt.cols for qt in qts}) != 1:
        raise ValueError("Linears fed back together must read inputs of one width")
    scale = qts[0].col_scale
    if any((qt.col_scale is None) != (scale is None) or (scale is not None and not np.array_equal(qt.col_scale, scale))
           for qt in qts):
        raise ValueError("Linears fed back together must share their column scale")
    if len({qt.bits for qt in qts}) != 1:  # one codebook width per compiled call (each scaled on its own)
        return [requantize_group([qt], [w], h, damp, block)[0] for qt, w in zip(qts, weights)]
    # the Linears' rows one under the other, W' = W diag(s)^{-1} where scaled (W' is coded under
    # the moments of the scaled inputs x s), written once; outliers' masks only where there are any
    rows = [qt.rows for qt in qts]
    cols = qts[0].cols
    s32 = None if scale is None else scale.astype(np.float32)
    W = np.empty((sum(rows), cols), dtype=np.float32)
    cbs, masks, r0 = [], None, 0
    if any(qt.n_outliers for qt in qts):
        masks = np.zeros((sum(rows), cols), dtype=bool)
    for qt, w in zip(qts, weights):
        w = np.asarray(w, dtype=np.float32).reshape(qt.rows, qt.cols)
        if s32 is not None:
            np.divide(w, s32, out=W[r0 : r0 + qt.rows])
        else:
            W[r0 : r0 + qt.rows] = w
        cbs.append(np.repeat(np.asarray(qt.codebook, np.float32), qt.group_rows, axis=0)[: qt.rows].astype(np.float64))
        if masks is not None:
            masks.reshape(-1)[r0 * cols + qt.outlier_index] = True
        r0 += qt.rows
    cb = np.concatenate(cbs) if len(cbs) > 1 else cbs[0]
    if s32 is not None:
        h = scaled_moments(h, s32)
    if isinstance(h, GroupedMoments):
        if h.shape[0] != cols:
            raise ValueError(f"moments of {h.shape[0]} features for Linears that read {cols}")
        codes = np.empty((sum(rows), cols), dtype=np.uint8)
        which, where, parts = np.empty(cols, np.int64), np.empty(cols, np.int64), []
        for k, (g, hb) in enumerate(zip(h.index, h.blocks)):
            g = g.numpy()
            c, value_at = _coded(np.take(W, g, axis=1), cb, None if masks is None else np.take(masks, g, axis=1), rows,
                                 hb, damp, block, h.mean)
            codes[:, g], which[g], where[g] = c, k, np.arange(len(g))
            parts.append(value_at)

        def values_at(r: np.ndarray, c: np.ndarray) -> np.ndarray:
            out = np.empty(len(r), dtype=np.float64)
            for k, value_at in enumerate(parts):
                s = which[c] == k
                out[s] = value_at(r[s], where[c[s]])
            return out
    else:
        codes, values_at = _coded(W, cb, masks, rows, h, damp, block, None)
    out, r0 = [], 0
    for qt in qts:
        r, c = np.divmod(qt.outlier_index, qt.cols)
        out.append(_recoded(qt, codes[r0 : r0 + qt.rows].reshape(-1), values_at(r0 + r, c)))
        r0 += qt.rows
    return out


def _coded(W, cb, mask, rows: Sequence[int], h, damp: float, block: int, scale: float | None):
    """``(codes, values_at)`` of the rows of ``W`` (float32, the rows of every Linear one
    under the other, ``rows`` of each) fed back under ``h``: the codes (uint8, rows x cols,
    column order) and a function giving the fed-forward values at rows ``r`` and columns
    ``c`` (what outliers keep). ``cb``: each row's codebook, ``mask``: True at outliers
    (None: there are none)."""
    import torch

    from . import native

    if native.available():  # codes put back in column order; of the values, only the outliers' are read
        codes, ordered, perm = _feedback_rows(W, h, cb, mask, damp, block, None, scale, values=False)
        inv = torch.argsort(perm)
        if ordered is None:  # no outliers: no values to read
            return _columns(codes, inv), lambda r, c: np.zeros(len(r))
        at, ordered = inv.numpy(), ordered.numpy()
        return _columns(codes, inv), lambda r, c: ordered[r, at[c]]
    parts, r0 = [], 0  # the reference: one Linear at a time, in torch
    for n in rows:
        cb_ = torch.from_numpy(cb[r0 : r0 + n])
        mids = ((cb_[:, 1:] + cb_[:, :-1]) * 0.5).contiguous()
        m_ = torch.zeros((n, W.shape[1]), dtype=torch.bool) if mask is None else torch.from_numpy(mask[r0 : r0 + n])

        def nearest(col, j, cb=cb_, mids=mids, mask=m_):
            idx = (col[:, None] > mids).sum(1)  # nearest centroid, ties to the lower one
            m = mask[:, j]
            v = torch.where(m, col.to(torch.float32).to(torch.float64), cb.gather(1, idx[:, None])[:, 0])
            return v, torch.where(m, 0, idx)

        c, v = error_feedback(torch.from_numpy(np.ascontiguousarray(W[r0 : r0 + n])), h, nearest, damp, block, scale)
        parts.append((c.numpy(), v.numpy()))
        r0 += n
    values = np.concatenate([p[1] for p in parts])
    return np.concatenate([p[0] for p in parts]).astype(np.uint8), lambda r, c: values[r, c]


def _recoded(qt: QuantizedTensor, codes: np.ndarray, outlier_value: np.ndarray) -> QuantizedTensor:
    """``qt`` with new codes (flat, row-major) and new outlier values (at its positions)."""
    return QuantizedTensor.from_codes(
        codes.astype(np.uint8, copy=False),
        shape=qt.shape,
        bits=qt.bits,
        codebook=qt.codebook,
        group_rows=qt.group_rows,
        outlier_index=qt.outlier_index,
        outlier_value=outlier_value.astype(np.float32),
        method=qt.method,
        compact=qt.compact,
        col_scale=qt.col_scale,
    )


def scaled_moments(h, s: np.ndarray):
    """The moments of the inputs ``x * s`` (``s`` one factor per feature) from those of ``x``:
    a matrix or :class:`GroupedMoments`, float32 like them."""
    import torch

    st = torch.from_numpy(np.asarray(s, dtype=np.float32))
    if isinstance(h, GroupedMoments):
        blocks = [b * torch.outer(st[g], st[g]) for g, b in zip(h.index, h.blocks)]
        mean = float(sum(torch.diagonal(b).to(torch.float64).sum() for b in blocks)) / h.shape[0]
        return GroupedMoments(h.index, blocks, mean)
    return h.to(torch.float32) * torch.outer(st, st)


def ldl_diagonal(h, damp: float) -> np.ndarray:
    """``D`` (float64, in feature order) of the damped moments ``h = T D T^T`` that error
    feedback factors (:func:`moments_factor`; each group of :class:`GroupedMoments` on its
    own): the variance of each input feature left once the features coded before it are
    known, what an error in that column costs after the feedback has done its work."""
    if isinstance(h, GroupedMoments):
        out = np.empty(h.shape[0])
        for g, b in zip(h.index, h.blocks):
            _, diag, _, perm, _ = _factor_parts(b, damp, h.mean)
            out[g.numpy()[perm.numpy()]] = diag.numpy() ** 2
        return out
    _, diag, _, perm, _ = _factor_parts(h, damp)
    out = np.empty(h.shape[0])
    out[perm.numpy()] = diag.numpy() ** 2
    return out


@contextlib.contextmanager
def one_per_thread():
    """A pool of as many threads as torch uses, with torch set to one thread while it runs
    (put back after): for independent pieces of work (a Linear's feedback, the factorisation
    of one input's moments), each one-threaded, side by side. No thread waits for another,
    and each result is the same whatever the number of threads: a factorisation run on
    several threads can round differently from one run on one."""
    import torch
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gobo-feedback") as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


def _feedback_cost(h, rows: int) -> int:
    """About how much work feeding back ``rows`` rows under moments ``h`` takes: the
    factorisation of each block of the moments and each row's pass over its columns."""
    widths = [len(g) for g in h.index] if isinstance(h, GroupedMoments) else [h.shape[0]]
    return sum(w**3 // 3 + rows * w * w for w in widths)


def apply(model, tokenizer, quantized: dict, state: dict, texts: Sequence[str] | None, n: int,
          damp: float = DAMP, punctuation: bool = False, seed: int = 0, moments: tuple | None = None,
          progress: Callable[[str], None] | None = None, dtype: str = "float32", skip: Collection[str] = (),
          group: int = 0) -> dict:
    """Re-code every quantized nn.Linear weight of ``quantized`` (but those named in ``skip``,
    which keep their codes) by :func:`requantize` under
    the input moments of the FP32 ``model`` on ``n`` calibration sentences (``texts`` None:
    synthetic, drawn with ``seed``, with punctuation if asked), or under ``moments`` (what
    :func:`input_moments` returned and the ``shared`` dict it filled) when given. Linears that
    read one input are fed back together. ``dtype``: the precision of that pass
    (:func:`input_moments`). ``group``: inputs wider than this many features are fed back in
    groups (:func:`input_moments`, :class:`GroupedMoments`). Returns the replaced tensors
    (name -> QuantizedTensor).
    ``progress(name)`` is called after each batch of sentences (name ``"calibration.sentences"``)
    and once for each nn.Linear weight of ``quantized`` (fed back or, when the sentences did
    not reach it as a batch of sequences, left as it is).
    The Linears (or groups of them) are fed back side by side, one per thread, with torch set
    to one thread meanwhile (put back after): each one's codes are those it gets on its own,
    and do not depend on the thread count."""
    if moments is None:
        ids, mask = calibration_batch(tokenizer, texts, n, seed=seed, punctuation=punctuation)
        shared: dict = {}
        h = input_moments(model, ids, mask, [n for n in quantized if n not in skip], shared=shared, dtype=dtype,
                          progress=None if progress is None else (lambda: progress(CALIBRATION_STEP)), group=group)
    else:
        h, shared = moments
    groups: dict = {}
    for name in quantized:
        if name in h and name not in skip:
            groups.setdefault(shared.get(name, name), []).append(name)
    fed: dict = {}
    # one-threaded products, one Linear per thread: every step of each (its factorisation and
    # orderings too) runs in parallel, and no thread waits for another between blocks; the
    # costliest first, so that the last to finish are short ones
    keys = sorted(groups, key=lambda key: -_feedback_cost(h[key], sum(quantized[n].rows for n in groups[key])))
    with one_per_thread() as pool:
        done = pool.map(lambda key: requantize_group([quantized[n] for n in groups[key]], [state[n] for n in groups[key]],
                                                     h[key], damp=damp), keys)
        for key, qts in zip(keys, done):
            for n, qt in zip(groups[key], qts):
                fed[n] = qt
                if progress is not None:
                    progress(n)
    out = {n: fed[n] for n in quantized if n in fed}
    if progress is not None:  # Linears skipped or not reached as 3-D inputs (a pooler) keep their codes
        for name in linear_weights(model, [n for n in quantized if n not in h or n in skip]):
            progress(name)
    return out
