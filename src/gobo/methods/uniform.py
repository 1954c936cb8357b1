"""DirectQ: round-to-nearest uniform quantization with one [min, max] range per row.

The naive baseline of Q-BERT (Shen et al., AAAI 2020). Codes are the integer levels
0 .. 2**bits - 1; a weight is ``row_min + code * step`` with ``step = (max - min) / (2**bits - 1)``.
With ``granularity="tensor"`` (Q-BERT's DirectQ) the whole matrix shares one range, stored as
a single codebook row of levels ``min + k * step`` and no row statistics.
"""

from __future__ import annotations

import numpy as np

__all__ = ["as_rows", "fit"]


def as_rows(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(w32, w2)``: the weights as contiguous float32 and as a (rows, cols) view; ValueError
    for an empty tensor or one with NaN or infinite values."""
    from . import row_blocks

    w32 = np.ascontiguousarray(weight, dtype=np.float32)
    if w32.size == 0:
        raise ValueError("cannot quantize an empty tensor")
    w2 = w32.reshape(w32.shape[0] if w32.ndim > 1 else 1, -1)
    if not all(np.isfinite(w2[a:b]).all() for a, b in row_blocks(*w2.shape)):
        raise ValueError("the tensor holds NaN or infinite values")
    return w32, w2


def fit(weight: np.ndarray, bits: int, granularity: str = "row") -> "QuantizedTensor":
    from ..qtensor import QuantizedTensor

    if granularity == "tensor":
        from .groupwise import fit as groupwise_fit

        w = np.asarray(weight)
        qt = groupwise_fit(w, bits, group_rows=w.shape[0] if w.ndim > 1 else 1, symmetric=False)
        qt.method = "directq"
        return qt

    w32, w2 = as_rows(weight)
    rows = w2.shape[0]
    levels = (1 << bits) - 1
    lo = w2.min(axis=1)
    hi = w2.max(axis=1)
    step = ((hi.astype(np.float64) - lo) / levels).astype(np.float32)
    step = np.where(step > 0, step, np.float32(1.0)).astype(np.float32)
    codes = np.clip(np.rint((w2 - lo[:, None]) / step[:, None]), 0, levels).astype(np.uint8)
    return QuantizedTensor.from_codes(
        codes,
        shape=w32.shape,
        bits=bits,
        codebook=np.arange(levels + 1, dtype=np.float32)[None, :],
        group_rows=rows,
        row_scale=step,
        row_offset=lo.astype(np.float32),
        method="directq",
    )
