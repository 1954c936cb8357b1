"""ctypes bindings to the compiled routines in ``gobo._native`` (built at install time)."""

from __future__ import annotations

import ctypes
from functools import lru_cache

import numpy as np

__all__ = ["act_scores", "assign_rows", "drop_sorted", "available", "byte_counts", "cluster_rows", "feedback_block", "grid_levels", "kmeans1d_exact", "lib", "pack_codes", "rans_decode",
           "rans_encode", "sorted_level_counts", "unpack_codes"]


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    """The native library; raises ImportError with a fix if it was not built."""
    try:
        from . import _native
    except ImportError as exc:
        raise ImportError(
            "gobo's compiled routines are missing; reinstall with 'pip install -e .' (a C compiler is needed)"
        ) from exc
    so = ctypes.CDLL(_native.__file__)
    f = so.gobo_kmeans1d_exact
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p]
    for name in ("gobo_pack_codes", "gobo_unpack_codes"):
        g = getattr(so, name)
        g.restype = None
        g.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p]
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    so.gobo_cluster_rows.restype = ctypes.c_int
    so.gobo_cluster_rows.argtypes = [ptr, ptr, i64, i64, i32, i32, ptr]
    so.gobo_assign_rows.restype = None
    so.gobo_assign_rows.argtypes = [ptr, ptr, i64, i64, i32, ptr]
    so.gobo_drop_sorted.restype = ctypes.c_int
    so.gobo_drop_sorted.argtypes = [ptr, ptr, i64, i64, ptr, ptr]
    so.gobo_act_scores.restype = None
    so.gobo_act_scores.argtypes = [ptr, ptr, i64, i64, i32, ptr, ptr, ptr]
    so.gobo_feedback_block.restype = None
    so.gobo_feedback_block.argtypes = [ptr, i64, ptr, i64, ptr, i64, i64, i64, ptr, i64, ptr, i32, ptr, i64, ptr, i64, ptr, i64,
                                       ptr, i64]
    so.gobo_byte_counts.restype = None
    so.gobo_byte_counts.argtypes = [ptr, i64, ptr]
    so.gobo_grid_levels.restype = i64
    so.gobo_grid_levels.argtypes = [ptr, i64, i64, i64, ptr, i32, ptr, ptr]
    so.gobo_sorted_level_counts.restype = None
    so.gobo_sorted_level_counts.argtypes = [ptr, i64, ctypes.c_float, i32, ptr]
    so.gobo_rans_encode.restype = i64
    so.gobo_rans_encode.argtypes = [ptr, i64, ptr, i32, i32, ptr, i64]
    so.gobo_rans_decode.restype = ctypes.c_int
    so.gobo_rans_decode.argtypes = [ptr, i64, ptr, i32, i32, i64, ptr]
    return so


def pack_codes(codes: np.ndarray, bits: int, out: np.ndarray) -> None:
    """Native version of :func:`gobo.packing.pack_codes` (arguments already checked)."""
    lib().gobo_pack_codes(codes.ctypes.data, codes.size, bits, out.ctypes.data)


def unpack_codes(packed: np.ndarray, bits: int, n: int, out: np.ndarray) -> None:
    """Native version of :func:`gobo.packing.unpack_codes` (arguments already checked)."""
    lib().gobo_unpack_codes(packed.ctypes.data, n, bits, out.ctypes.data)


def available() -> bool:
    try:
        lib()
    except ImportError:
        return False
    return True


def kmeans1d_exact(x_sorted: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Globally optimal 1-D k-means of sorted data: ``(centroids (k,), bounds (k+1,))``."""
    x = np.ascontiguousarray(x_sorted, dtype=np.float64)
    n = x.size
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    cent = np.empty(k, dtype=np.float64)
    bounds = np.empty(k + 1, dtype=np.int64)
    rc = lib().gobo_kmeans1d_exact(x.ctypes.data, n, k, cent.ctypes.data, bounds.ctypes.data)
    if rc == 2:
        need = k * (n + 1) * 4 / 2**30
        raise MemoryError(f"exact clustering of {n} values into {k} clusters needs about {need:.1f} GiB")
    if rc != 0:
        raise ValueError(f"exact clustering rejected its arguments (n={n}, k={k})")
    return cent, bounds


def cluster_rows(x: np.ndarray, n: np.ndarray, k: int, max_iter: int) -> np.ndarray:
    """Native core of :func:`gobo.methods.gobo.cluster_rows`: ``x`` float32 rows whose first
    ``n[r]`` values are row r's inliers, ascending. Returns ``(rows, k)`` float64 centroids."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = np.ascontiguousarray(n, dtype=np.int64)
    rows, cols = x.shape
    if not (1 <= k <= 256 and n.shape == (rows,) and ((n >= 0) & (n <= cols)).all()):
        raise ValueError(f"per-row clustering rejected its arguments (k={k}, shape={x.shape})")
    c = np.empty((rows, k), dtype=np.float64)
    if lib().gobo_cluster_rows(x.ctypes.data, n.ctypes.data, rows, cols, k, max_iter, c.ctypes.data) != 0:
        raise MemoryError("out of memory in per-row clustering")
    return c


def assign_rows(z: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Native core of :func:`gobo.methods.gobo.assign_rows` (``z`` float32, ``c`` float64,
    both C-contiguous, ``c`` ascending per row)."""
    rows, cols = z.shape
    k = c.shape[1]
    if c.shape[0] != rows or not 1 <= k <= 256:
        raise ValueError(f"row assignment rejected its arguments (codebooks {c.shape} for {z.shape})")
    out = np.empty((rows, cols), dtype=np.uint8)
    lib().gobo_assign_rows(z.ctypes.data, c.ctypes.data, rows, cols, k, out.ctypes.data)
    return out


def drop_sorted(x: np.ndarray, n: np.ndarray, vals: np.ndarray, counts: np.ndarray) -> None:
    """Native core of :func:`gobo.methods.gobo.drop_sorted`, in place: ``x`` float32 and ``n``
    int64 (C-contiguous, as :func:`cluster_rows` takes them), ``vals`` float32 and ``counts``
    int64 (one per row)."""
    rows, cols = x.shape
    if not (x.dtype == np.float32 and n.dtype == np.int64 and x.flags.c_contiguous and n.shape == (rows,)
            and counts.shape == (rows,) and vals.dtype == np.float32 and int(counts.sum()) == vals.size):
        raise ValueError(f"drop_sorted rejected its arguments (rows {x.shape}, {vals.size} values)")
    vals = np.ascontiguousarray(vals)
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    if lib().gobo_drop_sorted(x.ctypes.data, n.ctypes.data, rows, cols, vals.ctypes.data, counts.ctypes.data) != 0:
        raise ValueError("a value to drop is not among its row's sorted values")


def act_scores(z: np.ndarray, c: np.ndarray, energy: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Native core of :func:`gobo.methods.gobo.act_scores`: ``z`` float32 (rows x cols), ``c``
    float64 (rows x k, ascending), ``energy`` float64 (cols,), ``mask`` bool (rows x cols), all
    C-contiguous. Returns float64 scores of ``z``'s shape."""
    rows, cols = z.shape
    k = c.shape[1]
    if c.shape[0] != rows or not 1 <= k <= 256 or energy.shape != (cols,) or mask.shape != z.shape:
        raise ValueError(f"act_scores rejected its arguments (codebooks {c.shape}, energy {energy.shape} for {z.shape})")
    out = np.empty((rows, cols), dtype=np.float64)
    lib().gobo_act_scores(z.ctypes.data, c.ctypes.data, rows, cols, k, energy.ctypes.data, mask.view(np.uint8).ctypes.data,
                          out.ctypes.data)
    return out


def feedback_block(w, w0, p, t, cb, mask, codes, val, err) -> None:
    """Native core of one block of :func:`gobo.feedback.feedback_rows`: 2-D float64 (``w``,
    working space of the block's shape; ``w0``, ``t``, ``val``), float32 ``p`` (the earlier
    blocks' push, added to ``w0``; None: nothing to add), float64 ``cb`` (rows x k,
    C-contiguous), uint8 (``mask``, ``codes``) and float32 ``err`` (the errors ``w0 - val``)
    torch tensors or views with unit column stride; ``mask`` None: no outliers."""
    rows, n = w0.shape
    if any(a.stride(1) != 1 for a in (w, w0, p, t, cb, mask, codes, val, err) if a is not None and a.shape[1] > 1):
        raise ValueError("feedback_block needs rows stored contiguously (unit column stride)")
    import torch

    if err.dtype != torch.float32 or tuple(err.shape) != (rows, n) or tuple(w.shape) != (rows, n) \
            or (p is not None and (p.dtype != torch.float32 or tuple(p.shape) != (rows, n))):
        raise ValueError("feedback_block needs float32 errors and push, and working space, of the block's shape")
    lib().gobo_feedback_block(w.data_ptr(), w.stride(0), w0.data_ptr(), w0.stride(0), None if p is None else p.data_ptr(),
                              0 if p is None else p.stride(0), rows, n, t.data_ptr(), t.stride(0),
                              cb.data_ptr(), cb.shape[1], None if mask is None else mask.data_ptr(),
                              0 if mask is None else mask.stride(0), codes.data_ptr(),
                              codes.stride(0), val.data_ptr(), val.stride(0), err.data_ptr(), err.stride(0))


def byte_counts(x: np.ndarray) -> np.ndarray:
    """How often each value 0 .. 255 occurs in ``x`` (uint8, C-contiguous), int64."""
    if not (x.dtype == np.uint8 and x.flags.c_contiguous):
        raise ValueError("byte_counts rejected its arguments")
    out = np.empty(256, dtype=np.int64)
    lib().gobo_byte_counts(x.ctypes.data, x.size, out.ctypes.data)
    return out


def grid_levels(w: np.ndarray, steps: np.ndarray, grid: int, codes: np.ndarray, beyond: np.ndarray) -> int:
    """Native core of :func:`gobo.methods.grid.levels`: ``w`` float32 (rows x cols, unit column
    stride), ``steps`` float32 (rows,), ``codes`` and ``beyond`` uint8 (rows x cols,
    C-contiguous) written; returns how many weights lie beyond the grid."""
    rows, cols = w.shape
    if not (w.dtype == np.float32 and (w.strides[1] == 4 or cols <= 1) and steps.dtype == np.float32
            and steps.shape == (rows,) and steps.flags.c_contiguous and 1 <= grid <= 128
            and all(a.dtype == np.uint8 and a.shape == (rows, cols) and a.flags.c_contiguous for a in (codes, beyond))):
        raise ValueError("grid_levels rejected its arguments")
    return int(lib().gobo_grid_levels(w.ctypes.data, rows, cols, w.strides[0] // 4 if rows > 1 else cols,
                                      steps.ctypes.data, grid, codes.ctypes.data, beyond.ctypes.data))


def sorted_level_counts(zs: np.ndarray, c: float, grid: int) -> np.ndarray:
    """Native core of the grid step search's histogram (:meth:`gobo.methods.grid._Sample.bits`):
    int64 counts of ``clip(rint(zs / float32(c)), -grid - 1, grid) + grid + 1`` over ``zs``
    (float32, 1-D, C-contiguous, sorted ascending), ``2 grid + 2`` of them, found by bisection
    on the runs of each level."""
    if not (zs.dtype == np.float32 and zs.ndim == 1 and zs.flags.c_contiguous and 1 <= grid <= 256):
        raise ValueError("sorted_level_counts rejected its arguments")
    out = np.empty(2 * grid + 2, dtype=np.int64)
    lib().gobo_sorted_level_counts(zs.ctypes.data, zs.size, float(np.float32(c)), grid, out.ctypes.data)
    return out


def rans_encode(codes: np.ndarray, freq: np.ndarray, lanes: int, room: int = 0) -> np.ndarray:
    """Native core of :func:`gobo.rans.encode` (``codes`` uint8 C-contiguous, every one with a
    frequency in the uint16 ``freq``, 1 to 256 lanes). ``room``: bytes the stream is expected
    to fit in (0: the most it can take, two bytes a code); where it does not, it is coded
    again with that."""
    freq = np.ascontiguousarray(freq, dtype=np.uint16)
    if not (codes.dtype == np.uint8 and codes.flags.c_contiguous and 1 <= lanes <= 256 and 1 <= freq.size <= 256):
        raise ValueError("rans_encode rejected its arguments")
    most = 2 * codes.size + 4 * lanes
    for cap in ([room] if 0 < room < most else []) + [most]:
        out = np.empty(cap, dtype=np.uint8)
        n = lib().gobo_rans_encode(codes.ctypes.data, codes.size, freq.ctypes.data, freq.size, lanes, out.ctypes.data,
                                   out.size)
        if n >= 0:
            return out[:n] if cap - n <= max(4096, n // 16) else out[:n].copy()  # no copy of a tight buffer
    raise AssertionError("the rANS coder ran out of room at two bytes a code")


def rans_decode(stream: np.ndarray, freq: np.ndarray, lanes: int, n: int) -> np.ndarray:
    """Native core of :func:`gobo.rans.decode`; ValueError if the stream is damaged."""
    freq = np.ascontiguousarray(freq, dtype=np.uint16)
    if not (stream.dtype == np.uint8 and stream.flags.c_contiguous and 1 <= lanes <= 256 and 1 <= freq.size <= 256):
        raise ValueError("rans_decode rejected its arguments")
    out = np.empty(n, dtype=np.uint8)
    if lib().gobo_rans_decode(stream.ctypes.data, stream.size, freq.ctypes.data, freq.size, lanes, n, out.ctypes.data):
        raise ValueError("the entropy-coded stream is damaged (it does not end where its codes do)")
    return out
