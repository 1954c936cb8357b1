"""CPU kernels that compute with packed weights: a fast path and its pure reference.

A packed matrix is the tensor fields of a :class:`gobo.qtensor.QuantizedTensor` held as torch
tensors (:class:`Packed`). Two paths compute the same things:

* reference (pure torch/numpy, always there): dequantize the whole matrix with
  :meth:`QuantizedTensor.dequantize`, then ``F.linear`` or indexing;
* fast (``gobo._native``, C, AVX2 or AVX-512 chosen at run time), two ways:

  - fused (``gobo_qgemm``, csrc/qgemm.c; x86-64 with AVX2 and FMA): the GEMM's own kernel.
    It decodes 16 rows of codes at a time (32 with AVX-512), bit-identical to
    ``dequantize()``, and transposes them straight into the panels its register-blocked inner
    kernel reads (6 x 16 with AVX2, 8 x 32 with AVX-512: :func:`gemm_isa`), so decoding
    replaces the packing copy every GEMM makes. Only a panel block of ``W`` (128 rows) is ever
    in float32 per thread, and threads split the output features. An optional epilogue adds
    a residual and applies GELU to each tile of the output while it is in cache
    (``linear(..., residual=, act="gelu")``);
  - tiled (elsewhere, or when asked for with ``tile_rows``): decode a tile of rows into a
    float32 scratch buffer and multiply it with ``torch.addmm`` (MKL/oneDNN) straight into
    the tile's columns of the output. The tile is the whole matrix up to
    :data:`DEFAULT_TILE_BYTES`.

Both multiply exactly the decoded bits, so the fast and reference outputs differ only by the
GEMM's summation order (a few float32 ulps). The fused kernel sums every output in one fixed
order (bias, then k ascending, then the residual), whatever the batch size, thread count or
instruction set; its GELU differs from ``torch.nn.functional.gelu`` by float32 rounding only
(the same erf approximation, within 1.5e-7).
"""

from __future__ import annotations

import ctypes
import math
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .qtensor import QuantizedTensor

__all__ = [
    "DECODERS",
    "DEFAULT_TILE_BYTES",
    "Packed",
    "decode_row_list",
    "decode_rows",
    "embedding",
    "embedding_reference",
    "fast_available",
    "ACTIVATIONS",
    "gemm_isa",
    "gemm_threads",
    "linear",
    "linear_reference",
    "simd_enabled",
    "tile_rows_for",
]

#: bytes of decoded float32 weights per tile: large enough that every matrix of a BERT-base or
#: BERT-large encoder is decoded whole and multiplied by one GEMM call. Smaller tiles (1 MiB,
#: about one L2) cost little with 16-128 tokens, but each tile re-reads all of ``x``: on
#: all-mpnet-base-v2 at batch 32 x 128 tokens (2 threads) 1 MiB tiles ran at 0.83x FP32's speed
#: while decoding takes 14 ms of a 6.5 s forward pass.
DEFAULT_TILE_BYTES = 64 * 1024 * 1024

#: activations the fused GEMM can apply to its output (``linear(..., act=)``), by their codes
#: in csrc/qgemm.c
ACTIVATIONS = {"gelu": 1}
#: the fused GEMM's inner kernels (``linear(..., isa=)``), by their codes in csrc/qgemm.c
_ISAS = {"avx2": 1, "avx512": 2}


@dataclass(eq=False)
class Packed:
    """Tensor fields of one quantized (rows, cols) matrix, as torch tensors (see qtensor)."""

    rows: int
    cols: int
    bits: int
    group_rows: int
    codes: torch.Tensor  # uint8, packed LSB-first bit stream
    codebook: torch.Tensor  # float32 (groups, 2**bits)
    row_scale: torch.Tensor | None  # float16/float32 (rows,)
    row_offset: torch.Tensor | None
    outlier_index: torch.Tensor  # int32 or int64 flat positions, sorted
    outlier_value: torch.Tensor  # float32
    col_scale: torch.Tensor | None = None  # float16 (cols,): applied by the callers of the C code (W = W' diag)

    @classmethod
    def from_qtensor(cls, qt: QuantizedTensor) -> "Packed":
        idx = qt.outlier_index.astype(np.int32 if qt.numel < 2**31 else np.int64)
        stat = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a).copy())  # noqa: E731
        return cls(
            rows=qt.rows,
            cols=qt.cols,
            bits=qt.bits,
            group_rows=qt.group_rows,
            codes=torch.from_numpy(qt.codes.copy()),
            codebook=torch.from_numpy(np.ascontiguousarray(qt.codebook).copy()),
            row_scale=stat(qt.row_scale),
            row_offset=stat(qt.row_offset),
            outlier_index=torch.from_numpy(np.ascontiguousarray(idx).copy()),
            outlier_value=torch.from_numpy(np.ascontiguousarray(qt.outlier_value).copy()),
            col_scale=stat(qt.col_scale),
        )

    def to_qtensor(self) -> QuantizedTensor:
        stat = lambda t: None if t is None else t.numpy()  # noqa: E731
        return QuantizedTensor(
            shape=(self.rows, self.cols),
            bits=self.bits,
            codes=self.codes.numpy(),
            codebook=self.codebook.numpy(),
            group_rows=self.group_rows,
            row_scale=stat(self.row_scale),
            row_offset=stat(self.row_offset),
            outlier_index=self.outlier_index.numpy().astype(np.int64),
            outlier_value=self.outlier_value.numpy(),
            col_scale=stat(self.col_scale),
        )

    def dequantize(self) -> torch.Tensor:
        """The whole float32 matrix (reference path only)."""
        return torch.from_numpy(self.to_qtensor().dequantize().reshape(self.rows, self.cols))

    def nbytes(self) -> int:
        ts = [self.codes, self.codebook, self.row_scale, self.row_offset, self.outlier_index, self.outlier_value, self.col_scale]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


# ---------------------------------------------------------------------------- native binding


class QMat(ctypes.Structure):
    """Mirror of ``gobo_qmat`` in csrc/kernels.c."""

    _fields_ = [
        ("codes", ctypes.c_void_p),
        ("nbytes", ctypes.c_int64),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("group_rows", ctypes.c_int64),
        ("codebook", ctypes.c_void_p),
        ("row_scale", ctypes.c_void_p),
        ("row_offset", ctypes.c_void_p),
        ("outlier_index", ctypes.c_void_p),
        ("outlier_value", ctypes.c_void_p),
        ("n_outliers", ctypes.c_int64),
        ("bits", ctypes.c_int32),
        ("stats_f16", ctypes.c_int32),
        ("index32", ctypes.c_int32),
        ("pad_", ctypes.c_int32),
    ]


@lru_cache(maxsize=1)
def _lib():
    from .native import lib

    so = lib()
    so.gobo_kernels_simd.restype = ctypes.c_int
    so.gobo_kernels_simd.argtypes = []
    so.gobo_decode_rows.restype = ctypes.c_int
    so.gobo_decode_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32]
    so.gobo_decode_row_list.restype = ctypes.c_int
    so.gobo_decode_row_list.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32]
    so.gobo_qgemm.restype = ctypes.c_int
    so.gobo_qgemm.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
        ctypes.c_int32, ctypes.c_int32,
    ]
    so.gobo_attention.restype = ctypes.c_int
    so.gobo_attention.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int32, ctypes.c_int32]
    so.gobo_qgemm_isa.restype = ctypes.c_int
    so.gobo_qgemm_isa.argtypes = []
    so.gobo_qgemm_use_openmp.restype = None
    so.gobo_qgemm_use_openmp.argtypes = [ctypes.c_void_p] * 3
    so.gobo_qgemm_openmp.restype = ctypes.c_int
    so.gobo_qgemm_openmp.argtypes = []
    so.gobo_qgemm_use_openmp(*(_torch_openmp() or (None, None, None)))
    return so


def gemm_threads(openmp: bool | None = None) -> str:
    """Which threads the fused GEMM runs on: ``"openmp"`` (torch's own OpenMP team, the
    default where torch uses OpenMP: no second set of threads competes for the cores) or
    ``"pool"`` (gobo's POSIX thread pool). ``openmp`` True/False switches; None only asks.
    Both give the same bits."""
    so = _lib()
    if openmp is not None:
        so.gobo_qgemm_use_openmp(*((_torch_openmp() if openmp else None) or (None, None, None)))
    return "openmp" if so.gobo_qgemm_openmp() else "pool"  # a forked child is back on the pool


def gemm_isa() -> str | None:
    """The fused GEMM's inner kernel on this CPU: ``"avx512"`` (8 x 32, AVX-512F),
    ``"avx2"`` (6 x 16, AVX2 and FMA), or None (no fused GEMM: the tiled path runs). Every
    kernel gives the same bits, the fused GELU's included."""
    if not fast_available():
        return None
    return {v: k for k, v in _ISAS.items()}.get(_lib().gobo_qgemm_isa())


@lru_cache(maxsize=1)
def _torch_openmp() -> tuple[int, int, int] | None:
    """Addresses of ``GOMP_parallel``, ``omp_get_thread_num`` and ``omp_get_num_threads`` in
    the OpenMP runtime torch runs its operators on (GNU libgomp, or a runtime that exports
    the same entry points), or None when torch does not use OpenMP or it cannot be found."""
    if "OpenMP" not in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]:
        return None
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "/lib" in line and ("gomp" in line or "iomp" in line)})
    except OSError:
        return None
    for path in paths:
        try:
            rt = ctypes.CDLL(path)  # already loaded: the same handle, nothing new loads
            fns = [ctypes.cast(getattr(rt, n), ctypes.c_void_p).value for n in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")]
        except (OSError, AttributeError):
            continue
        if all(fns):
            return tuple(fns)
    return None


def fast_available() -> bool:
    """True when the compiled kernels load (else every call takes the reference path)."""
    try:
        _lib()
    except (ImportError, OSError, AttributeError):
        return False
    return True


@lru_cache(maxsize=1)
def simd_enabled() -> bool:
    """True when this CPU runs the AVX2 decoder and the fused GEMM (x86-64 with AVX2 and FMA;
    else the portable C decoder and the tiled path)."""
    return fast_available() and bool(_lib().gobo_kernels_simd())


def _check_tensor(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...]) -> None:
    if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in dtypes:
        raise ValueError(f"{name} must be a contiguous CPU tensor of dtype {dtypes}, got {t.dtype} on {t.device}")


def _qmat(p: Packed) -> QMat:
    """The C view of ``p`` (pointers into its tensors; valid while they live and stay put)."""
    _check_tensor(p.codes, "codes", (torch.uint8,))
    _check_tensor(p.codebook, "codebook", (torch.float32,))
    _check_tensor(p.outlier_index, "outlier_index", (torch.int32, torch.int64))
    _check_tensor(p.outlier_value, "outlier_value", (torch.float32,))
    f16 = 0
    for name, t in (("row_scale", p.row_scale), ("row_offset", p.row_offset)):
        if t is not None:
            _check_tensor(t, name, (torch.float16, torch.float32))
            f16 |= t.dtype == torch.float16
    if p.row_scale is not None and p.row_offset is not None and p.row_scale.dtype != p.row_offset.dtype:
        raise ValueError("row_scale and row_offset must have the same dtype for the fast kernels")
    groups = -(-p.rows // p.group_rows)
    if tuple(p.codebook.shape) != (groups, 1 << p.bits):
        raise ValueError(f"codebook must have shape ({groups}, {1 << p.bits})")
    if p.codes.numel() != (p.rows * p.cols * p.bits + 7) // 8:
        raise ValueError("codes do not match the matrix shape and bits")
    if p.outlier_index.numel() != p.outlier_value.numel():
        raise ValueError("outlier_index and outlier_value differ in length")
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    return QMat(
        codes=ptr(p.codes),
        nbytes=p.codes.numel(),
        rows=p.rows,
        cols=p.cols,
        group_rows=p.group_rows,
        codebook=ptr(p.codebook),
        row_scale=ptr(p.row_scale),
        row_offset=ptr(p.row_offset),
        outlier_index=ptr(p.outlier_index),
        outlier_value=ptr(p.outlier_value),
        n_outliers=p.outlier_index.numel(),
        bits=p.bits,
        stats_f16=int(bool(f16)),
        index32=int(p.outlier_index.dtype == torch.int32),
    )


#: decoder choices of the C library: the fastest for this CPU, the bit-by-bit reference, the
#: portable 64-bit-word decoder, the AVX2 decoder (the word one where AVX2 is missing)
DECODERS = {"auto": 1, "bitwise": 0, "word": 2, "avx2": 3}


def _decoder(path: str) -> int:
    try:
        return DECODERS[path]
    except KeyError:
        raise ValueError(f"path must be one of {', '.join(DECODERS)}, got {path!r}") from None


def decode_rows(p: Packed, r0: int = 0, r1: int | None = None, out: torch.Tensor | None = None, *, path: str = "auto") -> torch.Tensor:
    """Rows ``[r0, r1)`` of the matrix as float32, bit-identical to ``dequantize()[r0:r1]``.

    ``path`` picks the C decoder (all give the same bits; see :data:`DECODERS`).
    """
    r1 = p.rows if r1 is None else r1
    if not 0 <= r0 <= r1 <= p.rows:
        raise ValueError(f"row range [{r0}, {r1}) is outside 0..{p.rows}")
    if out is None:
        out = torch.empty(r1 - r0, p.cols, dtype=torch.float32)
    elif out.dtype != torch.float32 or tuple(out.shape) != (r1 - r0, p.cols) or out.stride(1) != 1:
        raise ValueError(f"out must be float32 of shape ({r1 - r0}, {p.cols}) with unit column stride")
    q = _qmat(p)
    rc = _lib().gobo_decode_rows(ctypes.byref(q), r0, r1, out.data_ptr(), max(out.stride(0), p.cols), _decoder(path))
    if rc:
        raise ValueError("the native decoder rejected its arguments")
    return scale_columns(out, p)


def scale_columns(w: torch.Tensor, p: Packed) -> torch.Tensor:
    """Decoded rows ``w`` (..., cols) times ``p``'s column scale, in place (the C decoders
    give ``W'``; the weight is ``W' diag(col_scale)``, see :mod:`gobo.qtensor`)."""
    if p.col_scale is not None:
        w.mul_(p.col_scale.to(torch.float32))
    return w


def decode_row_list(p: Packed, ids: torch.Tensor, *, path: str = "auto") -> torch.Tensor:
    """Rows ``ids`` (any shape of integers) as float32 of shape ``(*ids.shape, cols)``."""
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(flat.numel(), p.cols, dtype=torch.float32)
    q = _qmat(p)
    rc = _lib().gobo_decode_row_list(ctypes.byref(q), flat.data_ptr(), flat.numel(), out.data_ptr(), _decoder(path))
    if rc == 2:
        raise IndexError(f"an index is out of range for a table of {p.rows} rows")
    if rc:
        raise ValueError("the native decoder rejected its arguments")
    return scale_columns(out, p).reshape(*ids.shape, p.cols)


# ---------------------------------------------------------------------------- linear


def tile_rows_for(cols: int, tile_bytes: int = DEFAULT_TILE_BYTES) -> int:
    """Rows per decoded tile: ``tile_bytes`` of float32, a multiple of 8, at least 8."""
    return max(8, (tile_bytes // (4 * max(cols, 1))) // 8 * 8)


_scratch = threading.local()


def _scratch_buffer(n: int) -> torch.Tensor:
    """A per-thread float32 buffer of at least ``n`` elements, reused across calls."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=torch.float32)
        _scratch.buf = buf
    return buf


_outputs = threading.local()
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _free(t: torch.Tensor) -> bool:
    """True when no tensor but ``t`` itself uses ``t``'s storage (no view of it is alive)."""
    # the storage object asked for here counts once itself
    return _storage_use_count is not None and _storage_use_count(t.untyped_storage()._cdata) <= 2


def _reused_output(n: int) -> torch.Tensor:
    """``n`` float32 elements from this thread's reusable output buffer when nothing made from
    it earlier is alive any more, else from a new buffer that becomes the reusable one.

    For outputs that live briefly and are large, such as a feed-forward's hidden activations
    (4x the model width per token): glibc serves allocations above its mmap threshold (32 MiB
    at most; 50 MB at batch 32 x 128 tokens of a BERT-base model) from fresh pages every
    time, which the kernel has to map and zero; a reused buffer skips that."""
    buf = getattr(_outputs, "buf", None)
    if buf is not None and buf.numel() >= n and _free(buf):
        return buf[:n]
    buf = torch.empty(n, dtype=torch.float32)
    _outputs.buf = buf
    return buf[:n]  # a view: the buffer itself is never handed out


def _epilogue(y: torch.Tensor, residual: torch.Tensor | None, act: str | None, layer_norm: tuple | None = None) -> torch.Tensor:
    if residual is not None:
        y = y + residual
    if act == "gelu":
        y = torch.nn.functional.gelu(y)
    if layer_norm is not None:
        w, b, eps = layer_norm
        y = torch.nn.functional.layer_norm(y, (y.shape[-1],), w, b, eps)
    return y


def _check_layer_norm(layer_norm: tuple | None, n: int) -> None:
    if layer_norm is None:
        return
    if not (isinstance(layer_norm, tuple) and len(layer_norm) == 3):
        raise ValueError("layer_norm must be (weight, bias, eps)")
    w, b, eps = layer_norm
    for name, t in (("weight", w), ("bias", b)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,)):
            raise ValueError(f"layer_norm {name} must be None or a tensor of shape ({n},)")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"layer_norm eps must be a positive number, got {eps!r}")


def _check_native(rc: int, what: str, isa: str | None) -> None:
    """Raises for a non-zero return code of the native GEMM or attention."""
    if rc == 2:
        raise MemoryError(f"no memory for the {what}'s scratch buffers")
    if rc == 3 and isa is not None:
        raise ValueError(f"this CPU cannot run the {isa} kernel")
    if rc:
        raise ValueError(f"the native {what} rejected its arguments")


def _check_isa(isa: str | None) -> None:
    if isa is not None and isa not in _ISAS:
        raise ValueError(f"unknown kernel {isa!r}; expected one of {', '.join(_ISAS)} or None")


def _check_act(act: str | None) -> None:
    if act is not None and act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {', '.join(ACTIVATIONS)} or None")


def linear_reference(x: torch.Tensor, p: Packed, bias: torch.Tensor | None = None, *, residual: torch.Tensor | None = None, act: str | None = None,
                     layer_norm: tuple | None = None) -> torch.Tensor:
    """``LayerNorm(act(F.linear(x, dequantize(), bias) + residual))`` (the LayerNorm only with
    ``layer_norm``): the definition the fast path must match."""
    _check_act(act)
    _check_layer_norm(layer_norm, p.rows)
    return _epilogue(torch.nn.functional.linear(x, p.dequantize(), bias), residual, act, layer_norm)


def linear(
    x: torch.Tensor,
    p: Packed,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    act: str | None = None,
    layer_norm: tuple | None = None,
    isa: str | None = None,
    reuse_output: bool = False,
    tile_rows: int | None = None,
    q: QMat | None = None,
) -> torch.Tensor:
    """``act(x W^T + b + residual)`` with ``W`` decoded from ``p`` (x: (..., cols) float32).

    By default the fused kernel decodes ``W`` block by block straight into its GEMM panels,
    on ``torch.get_num_threads()`` threads, and adds ``residual`` (the output's shape) and
    applies ``act`` (None or ``"gelu"``) to each tile as it finishes; ``layer_norm``
    (``(weight, bias, eps)``, weight and bias None or ``(rows,)``) then normalises each row of
    the output as ``F.layer_norm`` does, on the same threads once they have all finished
    their columns; ``isa`` (``"avx2"`` or
    ``"avx512"``) picks its inner kernel instead of the fastest (:func:`gemm_isa`).
    ``reuse_output`` writes the output into a per-thread buffer that is reused once every
    tensor made from it earlier is gone (for large, short-lived outputs).
    ``tile_rows`` (or a CPU without AVX2/FMA) takes the tiled path instead: ``tile_rows``
    rows decoded at a time, multiplied by ``torch.addmm``, then the residual and activation
    in torch. ``q`` is a cached :func:`_qmat` of ``p`` (the module passes it to skip the
    checks).
    """
    _check_act(act)
    _check_layer_norm(layer_norm, p.rows)
    _check_isa(isa)
    ln_w, ln_b, ln_eps = layer_norm if layer_norm is not None else (None, None, 0.0)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, residual, ln_w, ln_b))
    if needs_grad or x.dtype != torch.float32 or x.device.type != "cpu" or not fast_available():
        return linear_reference(x, p, bias, residual=residual, act=act, layer_norm=layer_norm)  # the fast paths write into out= buffers: no autograd
    lead = x.shape[:-1]
    if x.shape[-1] != p.cols:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {p.cols}")
    if residual is not None and tuple(residual.shape) != (*lead, p.rows):
        raise ValueError(f"residual has shape {tuple(residual.shape)}, the output has {(*lead, p.rows)}")
    x2 = x.reshape(-1, p.cols)
    if p.col_scale is not None:  # x W^T = (x diag(col_scale)) W'^T, W' what the C code decodes
        x2 = x2 * p.col_scale.to(torch.float32)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m, n, k = x2.shape[0], p.rows, p.cols
    y = _reused_output(m * n).view(m, n) if reuse_output else torch.empty(m, n, dtype=torch.float32)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    if q is None:
        q = _qmat(p)
    qref = ctypes.byref(q)
    if tile_rows is None and simd_enabled():
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous() or bias.numel() != n):
            bias = bias.to(torch.float32).contiguous().reshape(n)
        r2 = None
        if residual is not None:
            r2 = residual.reshape(m, n)
            if r2.dtype != torch.float32 or r2.stride() != (n, 1):
                r2 = r2.to(torch.float32).contiguous()
        if ln_w is not None and (ln_w.dtype != torch.float32 or not ln_w.is_contiguous()):
            ln_w = ln_w.detach().to(torch.float32).contiguous()
        if ln_b is not None and (ln_b.dtype != torch.float32 or not ln_b.is_contiguous()):
            ln_b = ln_b.detach().to(torch.float32).contiguous()
        rc = _lib().gobo_qgemm(
            qref, x2.data_ptr(), m, k, y.data_ptr(), n, None if bias is None else bias.data_ptr(),
            None if r2 is None else r2.data_ptr(), n, ACTIVATIONS.get(act, 0),
            int(layer_norm is not None), None if ln_w is None else ln_w.data_ptr(), None if ln_b is None else ln_b.data_ptr(), float(ln_eps),
            _ISAS.get(isa, 0), torch.get_num_threads(),
        )
        _check_native(rc, "GEMM", isa)
        return y.reshape(*lead, n)
    t = min(tile_rows or tile_rows_for(k), n)
    buf = _scratch_buffer(t * k)
    decode = _lib().gobo_decode_rows
    bptr = buf.data_ptr()
    for r0 in range(0, n, t):
        r1 = min(n, r0 + t)
        if decode(qref, r0, r1, bptr, k, 1):
            raise ValueError("the native decoder rejected its arguments")
        w = buf[: (r1 - r0) * k].view(r1 - r0, k)
        if bias is None:
            torch.mm(x2, w.t(), out=y[:, r0:r1])
        else:
            torch.addmm(bias[r0:r1], x2, w.t(), out=y[:, r0:r1])
    return _epilogue(y.reshape(*lead, n), residual, act, layer_norm)


# ---------------------------------------------------------------------------- attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, scale: float | None = None,
              *, isa: str | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` (``scaled_dot_product_attention`` without dropout or
    causal masking) for q ``(B, H, SQ, D)``, k and v ``(B, H, SK, D)``, float32 on the CPU;
    ``mask`` is added to the scaled scores (float, broadcastable to ``(B, H, SQ, SK)``) and
    ``scale`` defaults to ``1 / sqrt(D)``.

    The native kernel runs each (batch, head) pair on one of ``torch.get_num_threads()``
    threads: the scores by the GEMM's inner kernel, a softmax per row (exp within 2 ulp), the
    weighted sum of v by the inner kernel again. The result is a ``(B, H, SQ, D)`` view of a
    ``(B, SQ, H, D)`` tensor, so that ``out.transpose(1, 2).reshape(B, SQ, H * D)`` is free.
    A query whose scores are all -inf gets zeros. Where the kernel does not run (no AVX2/FMA,
    autograd, another dtype or device) this is ``scaled_dot_product_attention``.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k and v must be (batch, heads, positions, features)")
    b, h, sq, d = q.shape
    sk = k.shape[2]
    if tuple(k.shape) != (b, h, sk, d) or tuple(v.shape) != (b, h, sk, d):
        raise ValueError(f"k and v must be {(b, h, 'keys', d)}, got {tuple(k.shape)} and {tuple(v.shape)}")
    _check_isa(isa)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if mask is not None:
        if mask.dtype == torch.bool:
            raise ValueError("the mask must be additive (float), not boolean")
        try:
            mask = mask.expand(b, h, sq, sk)
        except RuntimeError:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to {(b, h, sq, sk)}") from None
    tensors = [t for t in (q, k, v, mask) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if needs_grad or sk == 0 or d == 0 or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors) or not fast_available():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if mask is not None and mask.stride(-1) not in (0, 1):
        mask = mask.contiguous()
    out = torch.empty(b, sq, h, d, dtype=torch.float32)
    strides = [(ctypes.c_int64 * 4)(*t.stride()) for t in (q, k, v)]
    ostride = (ctypes.c_int64 * 3)(sq * h * d, d, h * d)
    mstride = (ctypes.c_int64 * 4)(*mask.stride()) if mask is not None else None
    rc = _lib().gobo_attention(
        q.data_ptr(), strides[0], k.data_ptr(), strides[1], v.data_ptr(), strides[2],
        None if mask is None else mask.data_ptr(), mstride, out.data_ptr(), ostride,
        b, h, sq, sk, d, float(scale), _ISAS.get(isa, 0), torch.get_num_threads(),
    )
    _check_native(rc, "attention", isa)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------- embedding


def embedding_reference(ids: torch.Tensor, p: Packed) -> torch.Tensor:
    """``dequantize()[ids]``."""
    return p.dequantize()[ids]


def embedding(ids: torch.Tensor, p: Packed) -> torch.Tensor:
    """Rows ``ids`` decoded one by one from the packed table (no full table is built)."""
    if not fast_available():
        return embedding_reference(ids, p)
    return decode_row_list(p, ids)
