"""Summaries of a compressed model as plain data (the CLI renders them)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .quantizer import CompressedModel

__all__ = ["ModelSummary", "TensorRow", "summarize"]


@dataclass(frozen=True)
class TensorRow:
    name: str
    shape: tuple[int, ...]
    bits: int
    outlier_fraction: float
    sqnr_db: float
    fp32_bytes: int
    nbytes: int
    bits_per_weight: float
    ratio: float


@dataclass(frozen=True)
class ModelSummary:
    method: str
    config: dict
    n_quantized: int
    n_dense: int
    quantized_weights: int
    fp32_bytes: int  # bytes of every tensor as FP32 (the original weights)
    stored_bytes: int  # bytes of every stored array
    file_bytes: int  # size of the compressed file (0 if not written)
    ratio: float  # fp32_bytes / file_bytes (or / stored_bytes when no file)
    avg_code_bits: float  # average code width over quantized weights
    bits_per_weight: float  # stored bits per quantized weight, everything included
    outlier_fraction: float
    min_sqnr_db: float
    mean_sqnr_db: float
    tensors: tuple[TensorRow, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tensors"] = [asdict(t) for t in self.tensors]
        return d


def summarize(cm: CompressedModel, file_path: str | Path | None = None) -> ModelSummary:
    from .config import config_to_json

    rows = []
    n_w = n_out = 0
    code_bits = 0
    for name in sorted(cm.quantized):
        qt = cm.quantized[name]
        st = cm.stats.get(name)
        sq = st.sqnr_db if st else float("nan")
        rows.append(
            TensorRow(
                name=name,
                shape=qt.shape,
                bits=qt.bits,
                outlier_fraction=qt.n_outliers / max(qt.numel, 1),
                sqnr_db=sq,
                fp32_bytes=qt.numel * 4,
                nbytes=qt.nbytes(),
                bits_per_weight=qt.bits_per_weight(),
                ratio=qt.numel * 4 / max(qt.nbytes(), 1),
            )
        )
        n_w += qt.numel
        n_out += qt.n_outliers
        code_bits += qt.numel * qt.bits
    file_bytes = Path(file_path).stat().st_size if file_path else 0
    stored = cm.nbytes()
    fp32 = cm.fp32_bytes()
    sqnrs = [r.sqnr_db for r in rows if math.isfinite(r.sqnr_db)]
    cfg = config_to_json(cm.config)
    method = cfg["type"]
    if method == "gobo":
        from .config import GoboConfig

        c = cm.config
        if c == GoboConfig.paper(c.bits, outlier_threshold=c.outlier_threshold, max_iter=c.max_iter):
            method = "gobo-paper"
        elif c == GoboConfig.grid(c.bits, average=c.average, synthetic_seed=c.synthetic_seed,
                                  calibration_dtype=c.calibration_dtype):
            method = "gobo-grid"
        elif c == GoboConfig.grid_fast(c.bits, average=c.average, synthetic_seed=c.synthetic_seed,
                                       calibration_dtype=c.calibration_dtype):
            method = "gobo-grid-fast"
        else:
            method = "gobo" + ("+rows" if c.codebook == "row" else "") + ("+grid" if c.codebook == "grid" else "") \
                + ("+sensitivity" if c.allocate == "sensitivity" else "") + ("+feedback" if c.feedback else "") + ("+tables" if c.feedback_embeddings else "") \
                + ("-exclude" if c.feedback_exclude else "") + ("-grouped" if c.feedback_group else "") \
                + ("+bits-for" if c.bits_for else "") \
                + ("+compact" if c.compact else "")
    return ModelSummary(
        method=method,
        config=cfg,
        n_quantized=len(cm.quantized),
        n_dense=len(cm.dense),
        quantized_weights=n_w,
        fp32_bytes=fp32,
        stored_bytes=stored,
        file_bytes=file_bytes,
        ratio=fp32 / max(file_bytes or stored, 1),
        avg_code_bits=code_bits / max(n_w, 1),
        bits_per_weight=8.0 * sum(r.nbytes for r in rows) / max(n_w, 1),
        outlier_fraction=n_out / max(n_w, 1),
        min_sqnr_db=min(sqnrs) if sqnrs else float("nan"),
        mean_sqnr_db=float(np.mean(sqnrs)) if sqnrs else float("nan"),
        tensors=tuple(rows),
    )
