"""The public verbs: quantize, save, load, evaluate."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from .config import DirectQConfig, GoboConfig, QBertConfig, method_config
from .quantizer import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, CompressedModel, quantize_state, select

__all__ = ["quantize", "save", "load", "load_compressed"]


def quantize(
    model: str | os.PathLike,
    config: GoboConfig | DirectQConfig | QBertConfig | None = None,
    *,
    method: str = "gobo",
    bits: int = 3,
    include: Iterable[str] = DEFAULT_INCLUDE,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    progress: Callable[[str, int], None] | None = None,
) -> CompressedModel:
    """Quantize a local model directory or a bundled model (``minilm-l6``, ``mpnet-base``).

    Every nn.Linear and nn.Embedding weight whose name matches ``include`` and not
    ``exclude`` is quantized; biases, LayerNorms and the rest stay as they are.
    A :class:`QBertConfig` with ``mixed`` and no ``layer_bits`` first measures each layer's
    Hessian sensitivity on the benchmark's training split (:mod:`gobo.hessian`, cached), and
    the file records the resulting plan.
    ``progress(name, total)`` is called after each tensor.
    """
    from .assets import resolve_model
    from .hf import load_source, quantizable_names, state_numpy, weights_sha256

    if config is None:
        config = method_config(method, bits)
    model_dir = resolve_model(model)
    src = load_source(model_dir)
    if isinstance(config, QBertConfig):  # head size from the model; mixed precision: Hessian-ranked plan
        from .hessian import resolve_qbert

        config = resolve_qbert(config, src, model_dir)
    names = select(quantizable_names(src), include, exclude)
    state = state_numpy(src)
    total = len(names)
    cb = None if progress is None else (lambda name: progress(name, total))
    sens = None
    if isinstance(config, GoboConfig) and config.allocate == "sensitivity":  # data-free: synthetic sentences
        from transformers import AutoTokenizer

        from .calibrate import OutputSensitivity

        sens = OutputSensitivity(src, AutoTokenizer.from_pretrained(model_dir))
    cm = quantize_state(state, names, config, progress=cb, sensitivity=sens)
    cm.source = {
        "name": str(model),
        "model_type": getattr(src.config, "model_type", "unknown"),
        "weights_sha256": weights_sha256(Path(model_dir)),
        "dir": str(Path(model_dir).resolve()),
    }
    return cm


def save(cm: CompressedModel, outdir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the compressed model and its source's config/tokenizer files to ``outdir``."""
    from .io import write_compressed

    src = cm.source.get("dir")
    return write_compressed(cm, outdir, source_dir=src if src and Path(src).is_dir() else None, overwrite=overwrite)


def load_compressed(outdir: str | os.PathLike) -> CompressedModel:
    """The compressed tensors of ``outdir``, validated, without building a model."""
    from .io import read_compressed

    return read_compressed(outdir)


def load(outdir: str | os.PathLike, *, packed: bool = False):
    """A transformers model in eval mode whose weights are the dequantized values.

    With ``packed=True`` the quantized weights stay packed in memory: every quantized
    nn.Linear / nn.Embedding is replaced by :class:`gobo.nn.QuantLinear` /
    :class:`gobo.nn.QuantEmbedding`, which decode on the fly (CPU kernels in
    :mod:`gobo.kernels`); outputs match the dequantized model's.
    """
    cm = load_compressed(outdir)
    if packed:
        from .nn import build_packed_model

        return build_packed_model(outdir, cm)
    from .hf import build_model

    return build_model(outdir, cm.state_dict())
