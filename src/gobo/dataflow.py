"""GOBO's accelerator dataflow as a functional model, with exact operation counts.

Zadeh et al., MICRO 2020, Section V: instead of one multiply-accumulate per weight, the
accelerator adds up, for each output, the inputs whose weights share a centroid index, then
multiplies each of those sums once by its centroid and adds the few outlier products::

    y[t, r] = sum_j  codebook[g(r), j] * S[t, r, j]   +   sum_{(r, c) outlier} value * x[t, c]
    S[t, r, j] = sum_{c : code[r, c] == j, (r, c) not an outlier} x[t, c]

For tensors with per-row statistics (gobo's row-normalised default), the weight is
``codebook[g(r), code] * scale[r] + offset[r]``, so the row result is::

    y[t, r] = scale[r] * sum_j codebook[g(r), j] S[t, r, j]  +  offset[r] * sum_j S[t, r, j]  +  outliers

Counting rules (per output value, i.e. per token and output row; the bias is left out of
both the dataflow and the dense count). With ``K`` inputs, ``O`` outliers in the row and
``B`` non-empty buckets (centroid indices used by the row's non-outlier weights):

* ``bucket_adds = (K - O) - B``: each bucket starts from its first input, every further input
  is one addition;
* ``centroid_mults = B`` and ``combine_adds = B - 1`` (summing the B products);
* ``outlier_macs = O``: one multiply-accumulate into the row result per outlier;
* row statistics, when ``B > 0``: a scale costs 1 multiplication; an offset costs ``B - 1``
  additions (summing the bucket sums), 1 multiplication and 1 addition.

The dense reference is ``K`` multiply-accumulates per output value. ``additions`` and
``multiplications`` below exclude the outlier MACs, which are reported on their own.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from .qtensor import QuantizedTensor

__all__ = ["LayerReport", "ModelReport", "OpCounts", "count_ops", "dataflow_linear", "trace_model"]


@dataclass(frozen=True)
class OpCounts:
    """Exact operation counts of one matrix product under the GOBO dataflow."""

    rows: int  # output features
    cols: int  # input features
    tokens: int  # input vectors
    dense_macs: int  # rows * cols * tokens
    bucket_adds: int
    centroid_mults: int
    combine_adds: int
    outlier_macs: int
    stat_mults: int  # row scale / offset multiplications
    stat_adds: int  # row offset additions

    @property
    def additions(self) -> int:
        return self.bucket_adds + self.combine_adds + self.stat_adds

    @property
    def multiplications(self) -> int:
        return self.centroid_mults + self.stat_mults

    @property
    def mult_ratio(self) -> float:
        """Multiplications (outlier MACs included) per dense MAC."""
        return (self.multiplications + self.outlier_macs) / max(self.dense_macs, 1)

    def __add__(self, other: "OpCounts") -> "OpCounts":
        return OpCounts(
            rows=self.rows + other.rows,
            cols=max(self.cols, other.cols),
            tokens=max(self.tokens, other.tokens),
            **{k: getattr(self, k) + getattr(other, k) for k in _SUMMED},
        )


_SUMMED = ("dense_macs", "bucket_adds", "centroid_mults", "combine_adds", "outlier_macs", "stat_mults", "stat_adds")


def _row_parts(qt: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (rows, cols), outlier mask (rows, cols), bucket sizes (rows, 2**bits))."""
    if len(qt.shape) != 2:
        raise ValueError(f"the dataflow model needs a 2-D weight, got shape {qt.shape}")
    codes = qt.unpacked_codes()
    out = np.zeros(qt.numel, dtype=bool)
    out[qt.outlier_index] = True
    out = out.reshape(qt.rows, qt.cols)
    k = 1 << qt.bits
    keys = (np.arange(qt.rows)[:, None] * k + codes)[~out]
    sizes = np.bincount(keys, minlength=qt.rows * k).reshape(qt.rows, k)
    return codes, out, sizes


def count_ops(qt: QuantizedTensor, tokens: int = 1) -> OpCounts:
    """Operation counts of ``tokens`` input vectors times ``qt`` (see the module docstring)."""
    _, out, sizes = _row_parts(qt)
    return _counts(qt, out, sizes, tokens)


def _counts(qt: QuantizedTensor, out: np.ndarray, sizes: np.ndarray, tokens: int) -> OpCounts:
    k_in = qt.cols
    o = out.sum(axis=1).astype(np.int64)  # outliers per row
    b = (sizes > 0).sum(axis=1).astype(np.int64)  # non-empty buckets per row
    used = b > 0
    bucket_adds = int(((k_in - o) - b).sum())
    combine = int(np.maximum(b - 1, 0).sum())
    stat_mults = stat_adds = 0
    if qt.row_scale is not None:
        stat_mults += int(used.sum())
    if qt.row_offset is not None:
        stat_mults += int(used.sum())
        stat_adds += int((np.maximum(b - 1, 0) + used).sum())
    t = int(tokens)
    return OpCounts(
        rows=qt.rows,
        cols=qt.cols,
        tokens=t,
        dense_macs=qt.rows * qt.cols * t,
        bucket_adds=bucket_adds * t,
        centroid_mults=int(b.sum()) * t,
        combine_adds=combine * t,
        outlier_macs=int(o.sum()) * t,
        stat_mults=stat_mults * t,
        stat_adds=stat_adds * t,
    )


def dataflow_linear(x, qt: QuantizedTensor) -> tuple[np.ndarray, OpCounts]:
    """``x @ W^T`` (no bias) computed the GOBO way, in float64, with its operation counts.

    ``x`` is ``(tokens, cols)`` (numpy or torch). Bucket sums are one sparse 0/1 product (an
    addition per non-outlier weight and token); centroids multiply the sums afterwards.
    """
    xs = torch.as_tensor(np.asarray(x, dtype=np.float64) if not isinstance(x, torch.Tensor) else x.detach().to(torch.float64))
    if xs.ndim != 2 or xs.shape[1] != qt.cols:
        raise ValueError(f"x must be (tokens, {qt.cols}), got {tuple(xs.shape)}")
    codes, out, sizes = _row_parts(qt)
    n, kcols, k = qt.rows, qt.cols, 1 << qt.bits
    t = xs.shape[0]
    # bucket matrix A[(r, j), c] = 1 when weight (r, c) is not an outlier and has code j
    keep = ~out
    r_idx, c_idx = np.nonzero(keep)
    bucket = r_idx * k + codes[r_idx, c_idx]
    order = np.argsort(bucket, kind="stable")
    bucket, c_idx = bucket[order], c_idx[order]
    crow = np.zeros(n * k + 1, dtype=np.int64)
    np.cumsum(np.bincount(bucket, minlength=n * k), out=crow[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        a = torch.sparse_csr_tensor(
            torch.from_numpy(crow),
            torch.from_numpy(c_idx.astype(np.int64)),
            torch.ones(c_idx.size, dtype=torch.float64),
            size=(n * k, kcols),
            check_invariants=False,  # built sorted and in range just above
        )
    s = (a @ xs.T.contiguous()).reshape(n, k, t)  # bucket sums S[r, j, t]: additions only
    groups = np.arange(n) // qt.group_rows
    cent = torch.from_numpy(qt.codebook.astype(np.float64)[groups])  # (n, k)
    y = (s * cent[:, :, None]).sum(dim=1)  # one multiply per bucket sum: (n, t)
    if qt.row_scale is not None:
        y = y * torch.from_numpy(qt.row_scale.astype(np.float64))[:, None]
    if qt.row_offset is not None:
        y = y + torch.from_numpy(qt.row_offset.astype(np.float64))[:, None] * s.sum(dim=1)
    if qt.n_outliers:
        rows = torch.from_numpy(qt.outlier_index // kcols)
        cols = torch.from_numpy(qt.outlier_index % kcols)
        prod = xs[:, cols].T * torch.from_numpy(qt.outlier_value.astype(np.float64))[:, None]  # (n_out, t)
        y = y.index_add(0, rows, prod)
    return y.T.contiguous().numpy(), _counts(qt, out, sizes, t)


# ---------------------------------------------------------------------------- whole models


@dataclass(frozen=True)
class LayerReport:
    name: str
    counts: OpCounts
    max_abs_error: float  # |dataflow - dense matmul| over the layer's outputs
    max_abs_output: float


@dataclass
class ModelReport:
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def total(self) -> OpCounts:
        tot = self.layers[0].counts
        for lr in self.layers[1:]:
            tot = tot + lr.counts
        return tot

    @property
    def max_relative_error(self) -> float:
        return max(lr.max_abs_error / max(lr.max_abs_output, 1e-30) for lr in self.layers)


def trace_model(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], quantized: Mapping[str, QuantizedTensor] | None = None) -> ModelReport:
    """Run ``model(**inputs)`` and replay every quantized linear layer through the dataflow.

    Layers are the :class:`gobo.nn.QuantLinear` modules of a packed model, or, when
    ``quantized`` is given, the nn.Linear modules whose ``NAME.weight`` it holds. Each layer's
    dataflow output is compared with the dense product ``x @ dequantize()^T`` in float64.
    """
    from .nn import QuantLinear

    layers: dict[str, tuple[torch.nn.Module, QuantizedTensor]] = {}
    for name, mod in model.named_modules():
        if quantized is None and isinstance(mod, QuantLinear):
            layers[name] = (mod, mod.packed().to_qtensor())
        elif quantized is not None and isinstance(mod, torch.nn.Linear) and f"{name}.weight" in quantized:
            layers[name] = (mod, quantized[f"{name}.weight"])
    if not layers:
        raise ValueError("the model has no quantized linear layers")
    captured: dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_hook(lambda m, args, out, n=name: captured.__setitem__(n, args[0].detach().reshape(-1, args[0].shape[-1]).clone())) for name, (mod, _) in layers.items()]
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    report = ModelReport()
    for name, (_, qt) in layers.items():
        x = captured[name].to(torch.float64)
        y, counts = dataflow_linear(x, qt)
        dense = (x @ torch.from_numpy(qt.dequantize()).to(torch.float64).T).numpy()
        report.layers.append(LayerReport(name, counts, float(np.abs(y - dense).max()), float(np.abs(dense).max())))
    return report
