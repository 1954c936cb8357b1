"""Q-BERT group-wise uniform quantization (Shen et al., "Q-BERT: Hessian Based Ultra Low
Precision Quantization of BERT", AAAI 2020, section 3.3).

A weight matrix ``(rows, cols)`` (rows = output features) is cut into groups of
``group_rows`` consecutive rows; each group has its own range and ``2**bits`` evenly spaced
levels over it, and every weight is rounded to the nearest level of its group. That is
exactly :class:`~gobo.qtensor.QuantizedTensor`'s per-group codebook: codebook row ``g`` holds
group ``g``'s levels (or, where that is smaller, each row stores its group's step and lowest
level; see :func:`fit`)::

    symmetric (default)  step = max|w| / (2**(bits-1) - 1)   levels step * k,  k = -2**(bits-1) .. 2**(bits-1) - 1
    min/max              step = (max w - min w) / (2**bits - 1)  levels min w + step * k,  k = 0 .. 2**bits - 1

The symmetric grid is the signed-integer one of Q-BERT's code (zero is a level, the weights
use the ``2**bits - 1`` levels from ``-max|w|`` to ``max|w|``; the most negative code stays
unused); at 1 bit it is ``{-max|w|, +max|w|}``. Min/max spends every code on the group's
range but has no exact zero.

Groups follow the paper: the query, key and value matrices are split per attention head
(a head is a block of ``head_size`` rows) and each head into row buckets, so a group never
straddles two heads. The attention output matrix mixes heads along its *input* (columns),
which a row-group codebook cannot follow; it and the feed-forward and embedding matrices
get plain row buckets. Either way a matrix has at least ``groups`` groups (128 in the paper
for BERT-base).

Mixed precision (:func:`mixed_plan`) gives each encoder layer LOW or HIGH bits by the rank
of its Hessian sensitivity (see :mod:`gobo.hessian`).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Mapping, Sequence

import numpy as np

__all__ = ["EMBEDDING_PATTERNS", "HEAD_PATTERNS", "LAYER_PATTERN", "fit", "group_rows_for", "layer_index", "mixed_plan", "plan", "row_levels"]

#: matrices whose rows are attention heads (BERT/RoBERTa/ELECTRA, DistilBERT, MPNet names)
HEAD_PATTERNS = (
    "*.query.weight", "*.key.weight", "*.value.weight",
    "*.q_lin.weight", "*.k_lin.weight", "*.v_lin.weight",
    "*.attn.q.weight", "*.attn.k.weight", "*.attn.v.weight",
)
#: embedding tables (word, position, token type): kept at ``embedding_bits``
EMBEDDING_PATTERNS = ("*embeddings.*",)
#: the encoder layer in a tensor name: "encoder.layer.3.attention..." -> 3 (group 1)
LAYER_PATTERN = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The encoder layer a tensor belongs to (``...layer.3....`` -> 3), or None."""
    m = LAYER_PATTERN.search(name)
    return int(m.group(1)) if m else None


def group_rows_for(rows: int, groups: int, head_size: int = 0) -> int:
    """Rows per group: the largest bucket that still gives at least ``groups`` groups.

    With ``head_size`` (rows a multiple of it), the bucket also divides the head or is a
    whole number of heads, so every group lies inside one head (or covers whole heads).
    """
    target = max(1, rows // max(groups, 1))
    if head_size <= 0 or rows % head_size:
        return target
    ok = [d for d in range(1, rows + 1) if rows % d == 0 and (head_size % d == 0 or d % head_size == 0)]
    return max(d for d in ok if d <= target)


def _nonzero(step: np.ndarray) -> np.ndarray:
    """A group whose weights are all equal gets step 1 (its weights sit exactly on a level)."""
    return np.where(step > 0, step, 1.0)


def fit(weight: np.ndarray, bits: int, group_rows: int, symmetric: bool = True, storage: str = "auto") -> "QuantizedTensor":
    """Round every weight to the nearest of its group's ``2**bits`` uniform levels.

    ``storage`` says how the levels are written, with identical dequantized values:
    ``"groups"``, one codebook row of levels per group (``groups * 2**bits`` float32);
    ``"rows"``, the integer levels ``0 .. 2**bits - 1`` once, scaled and shifted by float32
    ``row_scale`` (the step) and ``row_offset`` (the lowest level) of each row
    (``2 * rows`` float32); ``"auto"``, whichever is smaller.
    """
    if storage not in ("auto", "groups", "rows"):
        raise ValueError(f"storage must be 'auto', 'groups' or 'rows', got {storage!r}")
    from ..qtensor import QuantizedTensor

    from .uniform import as_rows

    w32, w2 = as_rows(weight)  # (rows, cols)
    rows = w2.shape[0]
    group_rows = min(max(1, int(group_rows)), rows)
    starts = np.arange(0, rows, group_rows)
    top = (1 << bits) - 1
    if symmetric:
        m = np.maximum.reduceat(np.abs(w2).max(axis=1), starts).astype(np.float64)  # (groups,)
        if bits == 1:
            step, k_lo, k_hi = 2.0 * m, 0, 1  # levels -m, +m
            lo = -m
        else:
            half = 1 << (bits - 1)
            step, k_lo, k_hi = _nonzero(m / (half - 1)), 1, top  # codes 1 .. top: -(half-1) .. half-1 steps
            lo = -half * step  # code 0, never chosen: -half steps
    else:
        lo = np.minimum.reduceat(w2.min(axis=1), starts).astype(np.float64)
        hi = np.maximum.reduceat(w2.max(axis=1), starts)
        step, k_lo, k_hi = (hi - lo) / top, 0, top
    step = _nonzero(step).astype(np.float32)
    lo = np.asarray(lo, dtype=np.float32)
    codebook = (lo[:, None] + np.arange(top + 1, dtype=np.float32)[None, :] * step[:, None]).astype(np.float32)  # (groups, 2**bits)
    g = np.arange(rows) // group_rows  # group of each row
    codes = np.clip(np.rint((w2 - lo[g][:, None]) / step[g][:, None]), k_lo, k_hi).astype(np.uint8)
    if storage == "rows" or (storage == "auto" and 2 * rows < codebook.size):
        # k * step + lo per row: the same float32 operations as the codebook's lo + k * step
        return QuantizedTensor.from_codes(
            codes, shape=w32.shape, bits=bits, codebook=np.arange(top + 1, dtype=np.float32)[None, :], group_rows=rows,
            row_scale=step[g], row_offset=lo[g], method="qbert",
        )
    return QuantizedTensor.from_codes(
        codes, shape=w32.shape, bits=bits, codebook=codebook, group_rows=group_rows, method="qbert"
    )


def row_levels(qt) -> np.ndarray:
    """``(rows, 2**bits)``: the levels each row of a fitted tensor can take, however stored."""
    levels = qt.codebook[np.arange(qt.rows) // qt.group_rows]
    if qt.row_scale is not None:
        levels = levels * qt.row_scale.astype(np.float32)[:, None]
    if qt.row_offset is not None:
        levels = levels + qt.row_offset.astype(np.float32)[:, None]
    return levels


def plan(shapes: Mapping[str, tuple[int, ...]], config) -> dict[str, tuple[int, int]]:
    """``{name: (bits, group_rows)}`` for every tensor under a :class:`~gobo.config.QBertConfig`.

    Embedding tables get ``embedding_bits``; a tensor of encoder layer ``i`` gets
    ``layer_bits[i]`` (or ``bits`` without a plan); any other (a pooler) gets ``bits``.
    """
    if config.mixed and not config.layer_bits:
        raise ValueError(
            "a mixed-precision Q-BERT config needs its per-layer plan: quantize with gobo.quantize, "
            "which measures the Hessian sensitivity, or give layer_bits"
        )
    layers = {i for i in map(layer_index, shapes) if i is not None}
    if config.layer_bits and layers and len(config.layer_bits) != max(layers) + 1:
        raise ValueError(f"layer_bits gives {len(config.layer_bits)} layers but the model has {max(layers) + 1}")
    out = {}
    for name, shape in shapes.items():
        rows = int(shape[0]) if len(shape) > 1 else 1
        i = layer_index(name)
        if any(fnmatch.fnmatchcase(name, p) for p in EMBEDDING_PATTERNS):
            bits = config.embedding_bits
        elif i is not None and config.layer_bits:
            bits = config.layer_bits[i]
        else:
            bits = config.bits
        per_head = config.head_size > 0 and any(fnmatch.fnmatchcase(name, p) for p in HEAD_PATTERNS)
        out[name] = (bits, group_rows_for(rows, config.groups, config.head_size if per_head else 0))
    return out


def mixed_plan(omega: Sequence[float], low: int, high: int, average: float = 0.0) -> tuple[int, ...]:
    """Per-layer widths: the most sensitive layers (largest Omega) get ``high``, the rest ``low``.

    As many layers as the ``average`` width allows (never above it; 0 means halfway between
    ``low`` and ``high``) go to ``high``; ties in Omega go to the earlier layer.
    """
    n = len(omega)
    if not 1 <= low < high <= 8:
        raise ValueError(f"mixed precision needs 1 <= low < high <= 8, got {low}/{high}")
    average = average or (low + high) / 2.0
    if not low <= average <= high:
        raise ValueError(f"average ({average}) must lie between {low} and {high}")
    n_high = int(np.floor((average - low) * n / (high - low) + 1e-9))
    order = sorted(range(n), key=lambda i: (-float(omega[i]), i))
    bits = [low] * n
    for i in order[:n_high]:
        bits[i] = high
    return tuple(bits)
