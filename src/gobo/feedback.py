"""Error feedback: choose each Linear's codes so that its *outputs*, not its weights, stay close.

GOBO picks every weight's code on its own (nearest centroid). With the second moments of a
Linear's inputs, ``H = E[x x^T]``, the codes can be chosen column by column so that the error
already made is pushed onto the columns not yet coded, where the next choices can absorb it:
the optimal-brain-compression update of GPTQ (Frantar et al., 2023), here with GOBO's
codebooks (one per tensor or one per row) instead of a uniform grid. The codebooks, outlier
positions and file layout stay as GOBO made them; only the codes change, and each outlier
keeps the value that absorbs the error that reached it (still stored exactly).

``H`` comes from a forward pass of the FP32 model over calibration sentences: synthetic ones
drawn from the tokenizer alone (:func:`gobo.calibrate.synthetic_batch`, data-free) or texts the
user gives. Every real token counts, the start and end tokens included: in some models
(all-mpnet-base-v2) those carry activations orders of magnitude above the words', and leaving
them out of ``H`` lets the feedback move error exactly where they read it (measured: 74.7%
agreement instead of 91.8% on all-mpnet-base-v2).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import numpy as np

from .qtensor import QuantizedTensor

__all__ = ["BATCH", "CALIBRATION_STEP", "DAMP", "apply", "calibration_batch", "error_feedback", "feedback_rows", "input_energy",
           "input_moments", "inverse_moments_factor", "linear_weights", "requantize", "requantize_group", "texts_sha256"]

#: diagonal damping, as a fraction of the mean diagonal of H (``GoboConfig.feedback_damp``
#: sets it for gobo.quantize, 0.1 by default: moments of synthetic sentences are only an
#: estimate of those of text: on all-mpnet-base-v2 the layers' output error on real inputs
#: was 10% lower with 0.1 than with 0.01, and level from 0.1 to 0.3)
DAMP = 0.01
#: columns coded before the error of a block is pushed on to the rest at once
BLOCK = 128
#: the name :func:`apply` reports progress with after each batch of calibration sentences
CALIBRATION_STEP = "calibration.sentences"
#: sentences per forward pass of :func:`input_moments`
BATCH = 32


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


def input_moments(model, input_ids, attention_mask, weights: Sequence[str], batch: int = BATCH, diagonal: bool = False,
                  shared: dict | None = None, progress: Callable[[], None] | None = None) -> dict:
    """``E[x x^T]`` (float64 torch tensors) of the input of every nn.Linear whose weight is
    named in ``weights``, over the real tokens of the batch (each batch's products in float32:
    relative rounding about 1e-6, well below what the sample of sentences moves); with
    ``diagonal`` only its diagonal ``E[x_j^2]`` (in float64), one value per input feature
    (much cheaper). A dict given as
    ``shared`` receives, for each weight, the first of ``weights`` whose Linear reads the same
    input tensor (a layer's query, key and value share one). ``progress()`` is called after
    each batch of ``batch`` sentences."""
    import torch

    mods = dict(model.named_modules())
    sums: dict = {}
    count: dict = {}
    cur: dict = {"last": None}
    first: dict = {}
    hooks = []
    for w in weights:
        m = mods.get(w.rsplit(".", 1)[0])
        if not isinstance(m, torch.nn.Linear):
            continue

        def hook(mod, inp, out, w=w):
            x = inp[0]
            if x.dim() != 3:
                return
            # Linears called one after the other on the same tensor (query, key and value)
            # share one product; the last input is held, so its memory cannot be reused
            last = cur["last"]
            if last is None or last[0] is not x:
                xm = x[cur["mask"]]
                if diagonal:
                    prod = (xm.to(torch.float64) ** 2).sum(0)
                else:  # one batch's products in float32 (twice as fast), their sum over batches in float64
                    prod = (xm.to(torch.float32).T @ xm.to(torch.float32)).to(torch.float64)
                last = cur["last"] = (x, prod, xm.shape[0], w)
            first.setdefault(w, last[3])
            sums[w] = sums.get(w, 0) + last[1]
            count[w] = count.get(w, 0) + last[2]

        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for s in range(0, input_ids.shape[0], batch):
                cur["mask"] = attention_mask[s : s + batch].bool()
                cur["last"] = None
                model(input_ids=input_ids[s : s + batch], attention_mask=attention_mask[s : s + batch])
                if progress is not None:
                    progress()
    finally:
        for h in hooks:
            h.remove()
        cur["last"] = None
    if shared is not None:
        shared.update(first)
    return {w: sums[w] / count[w] for w in sums}


def input_energy(model, tokenizer, weights: Sequence[str], n: int, texts: Sequence[str] | None = None,
                 punctuation: bool = False, seed: int = 0) -> dict:
    """``E[x_j^2]`` (float64 numpy, one value per input feature) of the input of every
    nn.Linear named in ``weights``, on ``n`` synthetic sentences (``texts`` None; drawn with
    ``seed``) or the first ``n`` of ``texts``: what ``GoboConfig.act_outliers`` weighs errors by."""
    ids, mask = calibration_batch(tokenizer, texts, n, seed=seed, punctuation=punctuation)
    return {w: m.numpy() for w, m in input_moments(model, ids, mask, weights, diagonal=True).items()}


def inverse_moments_factor(h, damp: float = DAMP):
    """``(U, perm, dead)``: the columns' coding order ``perm`` (decreasing diagonal of ``h``,
    stable), the upper-triangular ``U`` (float64) with ``U^T U`` the inverse of the damped
    moments in that order (what :func:`error_feedback` and :func:`feedback_rows` feed errors
    forward with), and the columns no input reaches (zero diagonal; given a unit diagonal
    here). Computed as ``J L^-1 J`` with ``L`` the Cholesky factor of the moments in reversed
    order (``J``): one factorisation and one triangular inverse, not a factorisation of the
    inverse."""
    import torch

    H = torch.as_tensor(h).to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    H = H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    L = torch.linalg.cholesky(H.flip(0, 1))
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1).contiguous()
    return U, perm, dead


def error_feedback(weight, h, quantize: Callable, damp: float = DAMP, block: int = BLOCK):
    """Code the columns of ``weight`` (rows x cols) one at a time, pushing each column's error
    onto the columns not yet coded (GPTQ, Frantar et al., 2023), under input moments ``h``.

    Columns go in order of decreasing ``h`` diagonal; columns no input reaches (zero
    diagonal) are zeroed. ``quantize(col, j)`` codes column ``j`` (original index) given its
    fed-forward float64 values and returns ``(value, code)``, two (rows,) tensors. Returns
    ``(codes, values)`` (rows x cols, int64 and float64) in the original column order.
    """
    import torch

    W = weight.detach().to(torch.float64).clone()
    cols = W.shape[1]
    U, perm, dead = inverse_moments_factor(h, damp)
    W[:, dead] = 0.0
    W = W[:, perm]
    codes = torch.zeros(W.shape, dtype=torch.int64)
    values = torch.zeros_like(W)
    order = perm.tolist()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            v, c = quantize(col, order[i1 + i])
            codes[:, i1 + i], values[:, i1 + i] = c, v
            e = (col - v) / U1[i, i]
            W1[:, i + 1 :] -= e[:, None] * U1[i, i + 1 :][None, :]
            E1[:, i] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    inv = torch.argsort(perm)
    return codes[:, inv], values[:, inv]


def feedback_rows(weight, h, codebook, mask, damp: float = DAMP, block: int = BLOCK, threads: int | None = None):
    """:func:`error_feedback` with nearest-centroid coding against one codebook per row,
    compiled: ``weight`` (rows x cols), ``codebook`` (rows x k ascending), ``mask`` (rows x
    cols, True at outliers, which keep their fed-forward value rounded to float32). Each
    block of columns is coded row by row in C, then its error is pushed onto the columns
    after it by one matrix product. Rows are shared among ``threads`` threads (torch's count
    by default); a row's codes do not depend on that split. Returns ``(codes, values)``
    (uint8 and float64, rows x cols) in the original column order."""
    import torch
    from concurrent.futures import ThreadPoolExecutor

    from . import native

    W = torch.as_tensor(np.asarray(weight, dtype=np.float32)).to(torch.float64)
    rows, cols = W.shape
    U, perm, dead = inverse_moments_factor(h, damp)
    W[:, dead] = 0.0
    W = W[:, perm].contiguous()
    M = torch.as_tensor(np.ascontiguousarray(mask, dtype=np.uint8))[:, perm].contiguous()
    cb = torch.as_tensor(np.ascontiguousarray(codebook, dtype=np.float64)).contiguous()
    codes = torch.zeros((rows, cols), dtype=torch.uint8)
    values = torch.zeros((rows, cols), dtype=torch.float64)
    err = torch.empty((rows, min(block, cols)), dtype=torch.float64)
    t = max(1, min(threads or torch.get_num_threads(), rows))
    cuts = [rows * i // t for i in range(t + 1)]
    with ThreadPoolExecutor(max_workers=t) as pool:
        for i1 in range(0, cols, block):
            i2 = min(i1 + block, cols)
            E1 = err[:, : i2 - i1]

            def part(j, i1=i1, i2=i2, E1=E1):
                a, b = cuts[j], cuts[j + 1]
                native.feedback_block(W[a:b, i1:i2], U[i1:i2, i1:i2], cb[a:b], M[a:b, i1:i2], codes[a:b, i1:i2],
                                      values[a:b, i1:i2], E1[a:b])

            list(pool.map(part, range(t)))
            if i2 < cols:
                W[:, i2:] -= E1 @ U[i1:i2, i2:]
    inv = torch.argsort(perm)
    return codes[:, inv].numpy(), values[:, inv].numpy()


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
    at a time."""
    import torch

    from . import native

    for qt in qts:
        if qt.row_scale is not None or qt.row_offset is not None:
            raise ValueError("error feedback needs codebooks without row statistics (normalize_rows=False)")
    if len({qt.cols for qt in qts}) != 1:
        raise ValueError("Linears fed back together must read inputs of one width")
    if len({qt.bits for qt in qts}) != 1:  # one codebook width per compiled call
        return [requantize_group([qt], [w], h, damp, block)[0] for qt, w in zip(qts, weights)]
    cbs, masks, ws = [], [], []
    for qt, w in zip(qts, weights):
        cbs.append(np.repeat(np.asarray(qt.codebook, np.float32), qt.group_rows, axis=0)[: qt.rows].astype(np.float64))
        m = np.zeros(qt.rows * qt.cols, dtype=bool)
        m[qt.outlier_index] = True
        masks.append(m.reshape(qt.rows, qt.cols))
        ws.append(np.asarray(w, dtype=np.float32).reshape(qt.rows, qt.cols))
    if native.available():
        codes, values = feedback_rows(np.concatenate(ws), h, np.concatenate(cbs), np.concatenate(masks), damp, block)
    else:  # the reference: one Linear at a time, in torch
        parts = []
        for cb_, m_, w_ in zip(cbs, masks, ws):
            cb = torch.from_numpy(cb_)
            mids = ((cb[:, 1:] + cb[:, :-1]) * 0.5).contiguous()
            mask = torch.from_numpy(m_)

            def nearest(col, j, cb=cb, mids=mids, mask=mask):
                idx = (col[:, None] > mids).sum(1)  # nearest centroid, ties to the lower one
                m = mask[:, j]
                v = torch.where(m, col.to(torch.float32).to(torch.float64), cb.gather(1, idx[:, None])[:, 0])
                return v, torch.where(m, 0, idx)

            c, v = error_feedback(torch.from_numpy(w_), h, nearest, damp, block)
            parts.append((c.numpy(), v.numpy()))
        codes = np.concatenate([p[0] for p in parts])
        values = np.concatenate([p[1] for p in parts])
    out, r0 = [], 0
    for qt in qts:
        c = codes[r0 : r0 + qt.rows].reshape(-1)
        v = values[r0 : r0 + qt.rows].reshape(-1)
        r0 += qt.rows
        out.append(QuantizedTensor.from_codes(
            c.astype(np.uint8),
            shape=qt.shape,
            bits=qt.bits,
            codebook=qt.codebook,
            group_rows=qt.group_rows,
            outlier_index=qt.outlier_index,
            outlier_value=v[qt.outlier_index].astype(np.float32),
            method=qt.method,
            compact=qt.compact,
        ))
    return out


def apply(model, tokenizer, quantized: dict, state: dict, texts: Sequence[str] | None, n: int,
          damp: float = DAMP, punctuation: bool = False, seed: int = 0, moments: tuple | None = None,
          progress: Callable[[str], None] | None = None) -> dict:
    """Re-code every quantized nn.Linear weight of ``quantized`` by :func:`requantize` under
    the input moments of the FP32 ``model`` on ``n`` calibration sentences (``texts`` None:
    synthetic, drawn with ``seed``, with punctuation if asked), or under ``moments`` (what
    :func:`input_moments` returned and the ``shared`` dict it filled) when given. Linears that
    read one input are fed back together. Returns the replaced tensors (name -> QuantizedTensor).
    ``progress(name)`` is called after each batch of sentences (name ``"calibration.sentences"``)
    and once for each nn.Linear weight of ``quantized`` (fed back or, when the sentences did
    not reach it as a batch of sequences, left as it is)."""
    if moments is None:
        ids, mask = calibration_batch(tokenizer, texts, n, seed=seed, punctuation=punctuation)
        shared: dict = {}
        h = input_moments(model, ids, mask, list(quantized), shared=shared,
                          progress=None if progress is None else (lambda: progress(CALIBRATION_STEP)))
    else:
        h, shared = moments
    groups: dict = {}
    for name in quantized:
        if name in h:
            groups.setdefault(shared.get(name, name), []).append(name)
    out = {}
    for key, names in groups.items():
        done = requantize_group([quantized[n] for n in names], [state[n] for n in names], h[key], damp=damp)
        for n, qt in zip(names, done):
            out[n] = qt
            if progress is not None:
                progress(n)
    if progress is not None:  # Linears the sentences did not reach as 3-D inputs (a pooler) keep their codes
        for name in linear_weights(model, [n for n in quantized if n not in h]):
            progress(name)
    return out
