"""Quantize a model's weights: choose tensors by name pattern, apply a method, collect results.

Pure with respect to files: takes a ``{name: array}`` state and returns a
:class:`CompressedModel`; :mod:`gobo.io` writes and reads it, :mod:`gobo.hf` deals with
transformers.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Mapping

import numpy as np

from .config import DirectQConfig, GoboConfig, QBertConfig
from .methods import gobo as gobo_method
from .methods import groupwise as groupwise_method
from .methods import row_blocks, tensor_pool
from .methods import uniform as uniform_method
from .qtensor import QuantizedTensor

__all__ = ["CompressedModel", "TensorStats", "allocate_bits", "layer_gains", "quantize_state", "select"]

#: default patterns: every weight of an nn.Linear / nn.Embedding (the caller lists those)
DEFAULT_INCLUDE = ("*",)
DEFAULT_EXCLUDE: tuple[str, ...] = ()


@dataclass(frozen=True)
class TensorStats:
    """What quantization did to one tensor, measured against its FP32 original."""

    shape: tuple[int, ...]
    bits: int
    sqnr_db: float  # 10 log10(|w|^2 / |w - q|^2)
    outlier_fraction: float
    fp32_bytes: int
    nbytes: int  # bytes stored for this tensor

    @classmethod
    def measure(cls, w: np.ndarray, qt: QuantizedTensor) -> "TensorStats":
        """The stats of ``qt`` as the compressed form of FP32 tensor ``w``."""
        return cls(shape=tuple(w.shape), bits=qt.bits, sqnr_db=_sqnr_of(w, qt),
                   outlier_fraction=qt.n_outliers / max(qt.numel, 1), fp32_bytes=w.size * 4, nbytes=qt.nbytes())

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / max(self.nbytes, 1)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(int(np.prod(self.shape)), 1)


def measure_all(state: Mapping[str, np.ndarray], quantized: Mapping[str, QuantizedTensor]) -> dict[str, TensorStats]:
    """:meth:`TensorStats.measure` of every tensor of ``quantized`` against its FP32
    original in ``state``, the tensors side by side."""
    names = list(quantized)
    with tensor_pool(len(names)) as pool:
        return dict(zip(names, pool.map(
            lambda n: TensorStats.measure(np.asarray(state[n], dtype=np.float32), quantized[n]), names)))


@dataclass
class CompressedModel:
    """Quantized tensors, the tensors kept as they were, and how they were made."""

    quantized: dict[str, QuantizedTensor]
    dense: dict[str, np.ndarray]
    config: GoboConfig | DirectQConfig
    stats: dict[str, TensorStats] = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # model_type, sha256 of the source weights, name

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every tensor, quantized ones dequantized (float32), in name order."""
        out = dict(self.dense)
        for name, qt in self.quantized.items():
            out[name] = qt.dequantize()
        return dict(sorted(out.items()))

    def fp32_bytes(self) -> int:
        return sum(int(np.prod(q.shape)) * 4 for q in self.quantized.values()) + sum(
            a.size * 4 if a.dtype.kind == "f" else a.nbytes for a in self.dense.values()
        )

    def nbytes(self) -> int:
        return sum(q.nbytes() for q in self.quantized.values()) + sum(a.nbytes for a in self.dense.values())


def select(names: Iterable[str], include: Iterable[str] = DEFAULT_INCLUDE, exclude: Iterable[str] = DEFAULT_EXCLUDE) -> list[str]:
    """Names that match an include glob and no exclude glob (fnmatch syntax), in order."""
    include, exclude = tuple(include), tuple(exclude)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include) and not any(fnmatch.fnmatchcase(n, p) for p in exclude)]


def unmatched(patterns: Iterable[str], names: Iterable[str]) -> str | None:
    """The first of ``patterns`` that matches none of ``names`` (a typo, not a choice), or None."""
    names = list(names)
    return next((p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)), None)


#: elements per partial sum of :func:`sqnr_db`
_CHUNK = 16384


def sqnr_db(w: np.ndarray, q: np.ndarray) -> float:
    w = np.asarray(w, dtype=np.float32).ravel()
    return _sqnr(*_sums(w, np.asarray(q, dtype=np.float32).ravel()))


def _sums(w: np.ndarray, q: np.ndarray, e: float = 0.0, s: float = 0.0) -> tuple[float, float]:
    """``(e + |w - q|^2, s + |w|^2)`` of flat float32 arrays: float32 dot products of short
    chunks, added in float64 one at a time (no large temporaries)."""
    for a in range(0, w.size, _CHUNK):
        wc = w[a : a + _CHUNK]
        d = wc - q[a : a + _CHUNK]
        e += float(np.dot(d, d))
        s += float(np.dot(wc, wc))
    return e, s


def _sqnr_of(w: np.ndarray, qt: QuantizedTensor) -> float:
    """:func:`sqnr_db` of ``w`` against ``qt.dequantize()``, the tensor dequantized a block of
    rows at a time: blocks of whole chunks, so that the sums are those of :func:`sqnr_db`."""
    w = np.asarray(w, dtype=np.float32).reshape(qt.rows, qt.cols)
    per = _CHUNK // math.gcd(_CHUNK, qt.cols)  # rows in a whole number of chunks
    if per >= qt.rows:
        return sqnr_db(w, qt.dequantize())
    codes = qt.unpacked_codes()
    e = s = 0.0
    blocks = [(a * per, b * per) for a, b in row_blocks(qt.rows // per, per * qt.cols)]
    if qt.rows % per:  # the rows left, fewer than a chunk's worth
        blocks.append((qt.rows // per * per, qt.rows))
    for a, b in blocks:
        e, s = _sums(w[a:b].ravel(), qt.dequantize_rows(a, b, codes).ravel(), e, s)
    return _sqnr(e, s)


def _sqnr(e: float, s: float) -> float:
    if e == 0.0:
        return math.inf
    return 10.0 * math.log10(s / e) if s > 0 else -math.inf


# ---------------------------------------------------------------------------- allocation


def allocate_bits(
    curves: Mapping[str, Mapping[int, float]],
    sizes: Mapping[str, int],
    budget_bytes: float,
    fixed_bytes: Mapping[str, int] | None = None,
    size_exponent: float = 0.0,
) -> dict[str, int]:
    """Bits per tensor minimising the sum of relative errors within a byte budget.

    A tensor's relative error weighs ``sizes[n] ** size_exponent`` (0: every tensor alike;
    GoboConfig uses 0.5, so larger tensors matter more but less than in proportion), while
    its cost is its bytes: codes (``sizes[n] * b / 8``), a codebook of ``2**b`` float32, and
    ``fixed_bytes[n]`` (row statistics, outliers). Large tensors therefore get fewer bits. Greedy on marginal gain
    per byte from the lowest width up (optimal for convex curves); ties break by name.
    """
    fixed_bytes = fixed_bytes or {}
    names = sorted(curves)

    def cost(n: str, b: int) -> float:
        return sizes[n] * b / 8.0 + 4.0 * (1 << b) + fixed_bytes.get(n, 0)

    bits = {n: min(curves[n]) for n in names}
    left = budget_bytes - sum(cost(n, bits[n]) for n in names)
    while True:
        best = None
        for n in names:
            b = bits[n]
            if b + 1 not in curves[n]:
                continue
            extra = cost(n, b + 1) - cost(n, b)
            if extra > left + 1e-9:
                continue
            gain = (curves[n][b] - curves[n][b + 1]) * sizes[n] ** size_exponent / extra
            if best is None or gain > best[0]:
                best = (gain, n, extra)
        if best is None:
            return bits
        bits[best[1]] += 1
        left -= best[2]


def _gain(name: str, prep, weight_error: float, bits: int, sensitivity) -> float:
    """Output error per unit of relative weight error, rounded to 3 significant digits so
    that float noise in the measurement cannot change the allocation."""
    out = sensitivity(name, prep.build(bits).dequantize())
    g = out / weight_error if weight_error > 0 else 0.0
    g = max(g, 1e-6)  # a tensor that does not reach the output still costs something
    return float(f"{g:.3g}")


def _weigh(curve: Mapping[int, float], gain: float) -> dict[int, float]:
    return {b: e * gain for b, e in curve.items()}


def layer_gains(all_names: Iterable[str], names: Iterable[str], layer_omega: tuple[float, ...]) -> dict[str, float]:
    """``allocate="hessian"``: each of ``names`` weighs its encoder layer's Omega over the mean
    Omega; a tensor outside every layer (embeddings, pooler) weighs 1.

    The layers are the prefixes :func:`gobo.hessian.layer_prefixes` finds among ``all_names``
    (every tensor of the model), layer 0 first; ``layer_omega`` must have one entry per layer.
    """
    from .hessian import layer_prefixes

    if not layer_omega:
        raise ValueError("allocate='hessian' needs layer_omega (the Hessian Omega of each encoder layer); "
                         "gobo.quantize measures it, or give it in the config")
    prefixes = layer_prefixes(all_names)
    if len(prefixes) != len(layer_omega):
        raise ValueError(f"layer_omega has {len(layer_omega)} entries but the model has {len(prefixes)} encoder layers")
    mean = sum(layer_omega) / len(layer_omega)
    out = {}
    for n in names:
        j = next((j for j, p in enumerate(prefixes) if n.startswith(p + ".")), None)
        out[n] = 1.0 if j is None else layer_omega[j] / mean
    return out


# ---------------------------------------------------------------------------- driver


def check_names(state: Mapping[str, np.ndarray], names: list[str], config) -> None:
    """KeyError or ValueError, in one sentence, unless ``names`` are finite floating-point
    tensors of ``state``, at least one, and every ``bits_for`` pattern of ``config`` matches one."""
    missing = [n for n in names if n not in state]
    if missing:
        raise KeyError(f"no tensor named {missing[0]!r} in the model")
    for n in names:
        a = state[n]
        if a.dtype.kind != "f":
            raise ValueError(f"{n} is not a floating-point tensor")
        if not np.isfinite(a).all():
            raise ValueError(f"{n} holds NaN or infinite values; the model is damaged")
    if not names:
        raise ValueError("no weights to quantize: the model has no Linear or Embedding weights matching the patterns")
    glob = unmatched((g for g, _ in getattr(config, "bits_for", ())), names)
    if glob is not None:
        raise ValueError(f"bits_for pattern {glob!r} matches none of the tensors to quantize")


def quantize_state(
    state: Mapping[str, np.ndarray],
    names: Iterable[str],
    config: GoboConfig | DirectQConfig,
    progress: Callable[[str], None] | None = None,
    sensitivity: Callable[[str, np.ndarray], float] | None = None,
    input_energy: Mapping[str, np.ndarray] | None = None,
    recoded: Collection[str] = (),
) -> CompressedModel:
    """Quantize ``state[name]`` for each of ``names``; every other tensor is kept as it is.

    ``progress(name)`` is called after each tensor (for progress bars).
    ``sensitivity(name, w)`` (needed by ``allocate="sensitivity"``, e.g. a
    :class:`gobo.calibrate.OutputSensitivity`) gives the relative output error when tensor
    ``name`` is replaced by ``w``; it is called once per tensor with its ``bits`` version.
    ``allocate="hessian"`` reads the per-layer Omega from ``config.layer_omega`` (see
    :func:`layer_gains`; ValueError when it is empty).
    ``input_energy[name]`` (needed by ``act_outliers``): the mean square of each input
    feature of the Linear whose weight is ``name``; tensors without one (embeddings) keep
    only their Gaussian outliers.
    Tensors named in ``recoded`` are those whose codes the caller chooses again (error
    feedback, :func:`gobo.feedback.apply`): they get their codebooks and outliers, but
    their codes are left zero and they get no :class:`TensorStats` (the caller measures
    the replacements).
    """
    names = list(names)
    check_names(state, names, config)

    def finish(n: str, w: np.ndarray, qt: QuantizedTensor) -> None:
        quantized[n] = qt
        if n not in recoded:
            stats[n] = TensorStats.measure(w, qt)

    quantized: dict[str, QuantizedTensor] = {}
    stats: dict[str, TensorStats] = {}
    if isinstance(config, GoboConfig) and config.codebook == "grid":  # no feedback here (gobo.quantize feeds back)
        from .methods import grid

        if config.allocate == "sensitivity" and sensitivity is None:
            raise ValueError("allocate='sensitivity' needs the model to measure output sensitivity; use gobo.quantize")
        factors = (grid.step_factors(state, names, sensitivity, expected=config.expected_gains)
                   if config.allocate == "sensitivity" else None)
        quantized, _ = grid.quantize(state, names, config, progress=progress, factors=factors)
        stats = measure_all(state, {n: qt for n, qt in quantized.items() if n not in recoded})
        dense = {k: np.ascontiguousarray(v) for k, v in state.items() if k not in quantized}
        return CompressedModel(quantized=quantized, dense=dense, config=config, stats=stats)
    arrays = {n: np.asarray(state[n], dtype=np.float32) for n in names}
    with tensor_pool(len(names)) as pool:
        if isinstance(config, GoboConfig):
            gains = layer_gains(state.keys(), names, config.layer_omega) if config.allocate == "hessian" else None
            if config.act_outliers and input_energy is None:
                raise ValueError("act_outliers needs the input energy of every Linear; use gobo.quantize")
            energy = input_energy if config.act_outliers else {}
            if config.allocate == "sensitivity" and sensitivity is None:
                raise ValueError("allocate='sensitivity' needs the model to measure output sensitivity; use gobo.quantize")
            if config.allocate == "uniform":  # each tensor's width is known now: its outliers are chosen at it, and it
                # is built at once (what its preparation holds is freed tensor by tensor)
                built = pool.map(lambda n: gobo_method.Prepared(arrays[n], config, energy.get(n), config.bits_of(n)).build(
                    config.bits_of(n), codes=n not in recoded), names)
            else:  # a mixed allocation: every tensor's error curve first
                preps = dict(zip(names, pool.map(lambda n: gobo_method.Prepared(arrays[n], config, energy.get(n)), names)))
                rng = range(config.min_bits, config.max_bits + 1)

                def curve(n: str) -> dict[int, float]:
                    out = {b: preps[n].distortion(b) for b in rng}
                    preps[n].release_sorted()
                    return out

                curves = dict(zip(names, pool.map(curve, names)))
                sizes = {n: arrays[n].size for n in names}
                fixed = {n: preps[n].fixed_nbytes() for n in names}
                exponent = config.size_exponent
                if config.allocate == "sensitivity":
                    curves = {n: _weigh(curves[n], _gain(n, preps[n], curves[n][config.bits], config.bits, sensitivity)) for n in names}
                    exponent = 0.0
                elif gains is not None:  # Hessian: size weight times the layer's Omega / mean Omega
                    curves = {n: _weigh(curves[n], gains[n]) for n in names}
                # all-in budget: everything stored for these tensors fits in `bits` per weight
                bits_of = allocate_bits(curves, sizes, (config.average or config.bits) * sum(sizes.values()) / 8.0, fixed, exponent)
                built = pool.map(lambda n: preps[n].build(bits_of[n], codes=n not in recoded), names)
        elif isinstance(config, DirectQConfig):
            built = pool.map(lambda n: uniform_method.fit(arrays[n], config.bits, config.granularity), names)
        elif isinstance(config, QBertConfig):
            how = groupwise_method.plan({n: arrays[n].shape for n in names}, config)
            built = pool.map(lambda n: groupwise_method.fit(arrays[n], *how[n], symmetric=config.symmetric), names)
        else:
            raise TypeError(f"unsupported config {type(config).__name__}")
        for n, qt in zip(names, built):
            finish(n, arrays[n], qt)
            if progress is not None:
                progress(n)
    dense = {k: np.ascontiguousarray(v) for k, v in state.items() if k not in quantized}
    return CompressedModel(quantized=quantized, dense=dense, config=config, stats=stats)
