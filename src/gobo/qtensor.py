"""QuantizedTensor: a plain container for one compressed weight matrix.

Dequantization (exact, float32, in this order)::

    v[r, c] = codebook[r // group_rows, code[r, c]]
    v[r, c] = v[r, c] * row_scale[r]      if row_scale is present (float16/32, widened to float32)
    v[r, c] = v[r, c] + row_offset[r]     if row_offset is present (likewise)
    v.flat[outlier_index] = outlier_value
    v[r, c] = v[r, c] * col_scale[c]      if col_scale is present (float16, widened to float32)

``code`` is stored packed (see :mod:`gobo.packing`), row-major over ``(rows, cols)`` where
``rows = shape[0]`` and ``cols = prod(shape[1:])``. Every operation is elementwise in
float32, so any implementation that follows the recipe reproduces the same bits.

A ``compact`` tensor (format version 2) holds the same values in fewer bytes: its centroids
are float16 numbers (rounded so before any weight is coded), stored as float16, and when it
has more outliers than rows and fewer than 65,536 columns its outlier positions are stored
row by row: ``outlier_count[r]`` (uint16) outliers in row ``r``, at columns ``outlier_col``
(uint16, ascending within a row), instead of flat int32 positions. In memory both are the
float32 codebook and the flat positions above, whichever way the file holds them.

* GOBO keeps one codebook of ``2**bits`` centroids per group of rows (the paper: one group,
  the whole tensor) and its Gaussian outliers exact.
* Uniform (DirectQ) codes are integer levels ``codebook = [0, 1, ..., 2**bits - 1]`` scaled
  and shifted per row (``row_scale`` = step, ``row_offset`` = minimum).
* A grid tensor (:mod:`gobo.methods.grid`, format version 3) is compact, its codebook the
  integer levels ``lo, lo + 1, ...``, its step per row ``row_scale`` and, when it was fed
  back, a scale per input column ``col_scale``; it is ``entropy`` coded: the file holds its
  codes as an rANS stream (:mod:`gobo.rans`, field ``codes``) under a static model (field
  ``code_freq``) instead of packed. In memory its codes are packed like any other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .methods import row_blocks
from .packing import pack_codes, packed_nbytes, unpack_codes

__all__ = ["QuantizedTensor", "FIELDS", "ROW_FIELDS", "outlier_index_nbytes"]

#: tensor fields, in file order; each is optional except codes and codebook
FIELDS = ("codes", "codebook", "row_scale", "row_offset", "outlier_index", "outlier_value", "col_scale", "code_freq")
#: the file's row-by-row outlier positions of a compact tensor (in memory: ``outlier_index``)
ROW_FIELDS = ("outlier_col", "outlier_count")


@dataclass(eq=False)
class QuantizedTensor:
    shape: tuple[int, ...]
    bits: int
    codes: np.ndarray  # uint8, packed, packed_nbytes(numel, bits) bytes
    codebook: np.ndarray  # float32 (groups, 2**bits)
    group_rows: int  # rows sharing one codebook row
    row_scale: np.ndarray | None = None  # float16 or float32 (rows,)
    row_offset: np.ndarray | None = None  # float16 or float32 (rows,)
    outlier_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # sorted flat positions
    outlier_value: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    method: str = "gobo"
    compact: bool = False  # float16 centroids, row-by-row outlier positions in the file
    col_scale: np.ndarray | None = None  # float16 (cols,): a grid tensor's scale of each input column
    entropy: bool = False  # the file holds the codes rANS-coded (gobo.rans); needs compact
    _stream: tuple | None = field(default=None, repr=False)  # (stream, freq) once coded, for an entropy tensor

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.validate()

    # ------------------------------------------------------------------ shape helpers
    @property
    def rows(self) -> int:
        return _rows_cols(self.shape)[0]

    @property
    def cols(self) -> int:
        return _rows_cols(self.shape)[1]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def n_outliers(self) -> int:
        return int(self.outlier_index.size)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ValueError if the fields are inconsistent (used on load, too)."""
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be from 1 to 8, got {self.bits}")
        if self.codes.dtype != np.uint8 or self.codes.ndim != 1:
            raise ValueError("codes must be a 1-D uint8 array")
        if self.codes.size != packed_nbytes(self.numel, self.bits):
            raise ValueError(
                f"codes hold {self.codes.size} bytes, {self.numel} codes of {self.bits} bits need "
                f"{packed_nbytes(self.numel, self.bits)}"
            )
        k = 1 << self.bits
        if self.group_rows < 1:
            raise ValueError("group_rows must be >= 1")
        groups = -(-self.rows // self.group_rows)
        if self.codebook.dtype != np.float32 or self.codebook.shape != (groups, k):
            raise ValueError(f"codebook must be float32 of shape ({groups}, {k}), got {self.codebook.dtype} {self.codebook.shape}")
        for name in ("row_scale", "row_offset"):
            a = getattr(self, name)
            if a is not None and (a.dtype not in (np.float16, np.float32) or a.shape != (self.rows,)):
                raise ValueError(f"{name} must be float16 or float32 of shape ({self.rows},)")
        if self.outlier_index.ndim != 1 or self.outlier_index.shape != self.outlier_value.shape:
            raise ValueError("outlier_index and outlier_value must be 1-D and of equal length")
        if self.outlier_value.dtype != np.float32:
            raise ValueError("outlier_value must be float32")
        if self.col_scale is not None and (self.col_scale.dtype != np.float16 or self.col_scale.shape != (self.cols,)):
            raise ValueError(f"col_scale must be float16 of shape ({self.cols},)")
        if self.entropy and not self.compact:
            raise ValueError("an entropy-coded tensor must be compact")
        if self.compact and not np.array_equal(self.codebook.astype(np.float16).astype(np.float32), self.codebook):
            raise ValueError("a compact tensor's centroids must be float16 numbers")
        if self.outlier_index.size:
            idx = self.outlier_index
            if int(idx.min()) < 0 or int(idx.max()) >= self.numel or np.any(np.diff(idx) <= 0):
                raise ValueError("outlier positions must be sorted, unique and inside the tensor")

    # ------------------------------------------------------------------ maths
    def unpacked_codes(self) -> np.ndarray:
        """Codes as uint8 of shape ``(rows, cols)``."""
        return unpack_codes(self.codes, self.bits, self.numel).reshape(self.rows, self.cols)

    def dequantize(self) -> np.ndarray:
        """The float32 weight this tensor stands for (see the module docstring)."""
        codes = self.unpacked_codes()
        v = np.empty((self.rows, self.cols), dtype=np.float32)
        for a, b in row_blocks(self.rows, self.cols):
            v[a:b] = self.dequantize_rows(a, b, codes)
        return v.reshape(self.shape)

    def dequantize_rows(self, start: int, stop: int, codes: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` of :meth:`dequantize` (float32, rows x cols), the same bits;
        ``codes``: :meth:`unpacked_codes`, when already at hand."""
        codes = (self.unpacked_codes() if codes is None else codes)[start:stop]
        k = self.codebook.shape[1]
        rows = np.arange(start, stop, dtype=np.intp)
        v = self.codebook.reshape(-1).take(codes + (rows // self.group_rows * k)[:, None])  # each row's codebook
        if self.row_scale is not None:
            v *= self.row_scale[start:stop].astype(np.float32)[:, None]
        if self.row_offset is not None:
            v += self.row_offset[start:stop].astype(np.float32)[:, None]
        if self.outlier_index.size:
            lo, hi = np.searchsorted(self.outlier_index, [start * self.cols, stop * self.cols])
            v.reshape(-1)[self.outlier_index[lo:hi] - start * self.cols] = self.outlier_value[lo:hi]
        if self.col_scale is not None:  # W = W' diag(col_scale): the input's columns scaled
            v *= self.col_scale.astype(np.float32)[None, :]
        return v

    # ------------------------------------------------------------------ size
    def nbytes_by_part(self) -> dict[str, int]:
        """Bytes the file holds for the codes, the centroids, the outliers (positions and
        values) and the row statistics."""
        return {
            "codes": sum(int(a.nbytes) for a in self.coded()) if self.entropy else int(self.codes.nbytes),
            "centroids": int(self.codebook.size * (2 if self.compact else 4)),
            "outliers": int(self.outlier_value.nbytes) + outlier_index_nbytes(self.n_outliers, self.rows, self.cols, self.compact),
            "row_stats": sum(int(a.nbytes) for a in (self.row_scale, self.row_offset, self.col_scale) if a is not None),
        }

    def coded(self) -> tuple[np.ndarray, np.ndarray]:
        """``(stream, freq)``: an entropy tensor's codes as the file holds them (coded once)."""
        if not self.entropy:
            raise ValueError("only an entropy-coded tensor has a coded stream")
        if self._stream is None:
            from . import rans

            self._stream = rans.encode_modelled(self.unpacked_codes(), 1 << self.bits)
        return self._stream

    def nbytes(self) -> int:
        """Bytes of all stored arrays, as the file holds them."""
        return sum(self.nbytes_by_part().values())

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / max(self.numel, 1)

    # ------------------------------------------------------------------ (de)serialisation
    def to_tensors(self) -> dict[str, np.ndarray]:
        """Field name -> array, for the file (absent optional fields are left out)."""
        out = {"codes": self.codes, "codebook": self.codebook.astype(np.float16) if self.compact else self.codebook}
        if self.row_scale is not None:
            out["row_scale"] = self.row_scale
        if self.row_offset is not None:
            out["row_offset"] = self.row_offset
        if self.outlier_index.size:
            if _by_rows(self.n_outliers, self.rows, self.cols, self.compact):
                row, col = np.divmod(self.outlier_index, self.cols)
                out["outlier_col"] = col.astype(np.uint16)
                out["outlier_count"] = np.bincount(row, minlength=self.rows).astype(np.uint16)
            else:
                out["outlier_index"] = self.outlier_index.astype(np.int32 if self.numel < 2**31 else np.int64)
            out["outlier_value"] = self.outlier_value
        if self.col_scale is not None:
            out["col_scale"] = self.col_scale
        if self.entropy:
            out["codes"], out["code_freq"] = self.coded()
        return out

    def meta(self) -> dict:
        """JSON-able attributes that, with :meth:`to_tensors`, rebuild the tensor."""
        out = {
            "shape": list(self.shape),
            "bits": self.bits,
            "group_rows": self.group_rows,
            "method": self.method,
        }
        if self.compact:  # left out otherwise: files of format version 1 keep their bytes
            out["compact"] = True
        if self.entropy:  # likewise for versions 1 and 2
            out["entropy"] = True
        return out

    @classmethod
    def from_tensors(cls, meta: dict, tensors: dict[str, np.ndarray]) -> "QuantizedTensor":
        """Inverse of :meth:`meta` + :meth:`to_tensors`; validates everything."""
        compact = meta.get("compact", False)
        entropy = meta.get("entropy", False)
        if not isinstance(compact, bool) or not isinstance(entropy, bool):
            raise ValueError("compact and entropy must be true or false")
        unknown = set(tensors) - set(FIELDS) - (set(ROW_FIELDS) if compact else set())
        if not entropy and "code_freq" in tensors:
            unknown.add("code_freq")
        if unknown:
            raise ValueError(f"unexpected fields {sorted(unknown)}")
        for req in ("codes", "codebook"):
            if req not in tensors:
                raise ValueError(f"missing field {req!r}")
        shape = tuple(int(s) for s in meta["shape"])
        codebook = tensors["codebook"]
        if codebook.dtype != (np.float16 if compact else np.float32):
            raise ValueError(f"codebook must be {'float16' if compact else 'float32'}, got {codebook.dtype}")
        idx = tensors.get("outlier_index")
        if "outlier_col" in tensors or "outlier_count" in tensors:
            if idx is not None:
                raise ValueError("outlier positions are stored twice")
            idx = _flat_positions(tensors.get("outlier_col"), tensors.get("outlier_count"), shape)
        val = tensors.get("outlier_value")
        if (idx is None) != (val is None):
            raise ValueError("outlier positions and values must come together")
        bits = int(meta["bits"])
        codes = np.ascontiguousarray(tensors["codes"])
        stream = None
        if entropy:
            from . import rans

            freq = tensors.get("code_freq")
            if not 1 <= bits <= 8 or freq is None or freq.dtype != np.uint16 or freq.shape != (1 << bits,):
                raise ValueError("an entropy-coded tensor needs code_freq: uint16, one per code value")
            if codes.dtype != np.uint8 or codes.ndim != 1:
                raise ValueError("codes must be a 1-D uint8 array")
            stream = (codes, np.ascontiguousarray(freq))
            codes = pack_codes(rans.decode(codes, freq, int(np.prod(shape, dtype=np.int64))), bits)
        return cls(
            shape=shape,
            bits=bits,
            codes=codes,
            codebook=np.ascontiguousarray(codebook.astype(np.float32)),
            group_rows=int(meta["group_rows"]),
            row_scale=tensors.get("row_scale"),
            row_offset=tensors.get("row_offset"),
            outlier_index=np.zeros(0, np.int64) if idx is None else idx.astype(np.int64),
            outlier_value=np.zeros(0, np.float32) if val is None else np.ascontiguousarray(val),
            method=str(meta.get("method", "gobo")),
            compact=compact,
            col_scale=tensors.get("col_scale"),
            entropy=entropy,
            _stream=stream,
        )

    @classmethod
    def from_codes(cls, codes: np.ndarray, **kw) -> "QuantizedTensor":
        """Build from unpacked codes (any shape; row-major order is kept)."""
        return cls(codes=pack_codes(codes, kw["bits"]), **kw)


def _by_rows(n_outliers: int, rows: int, cols: int, compact: bool) -> bool:
    """Whether a file stores these outlier positions row by row (uint16 columns and per-row
    counts, ``2 * (n_outliers + rows)`` bytes) rather than flat (int32, ``4 * n_outliers``):
    only compact tensors, only where a column fits in uint16 and only where it is smaller."""
    return compact and cols < 2**16 and n_outliers > rows


def outlier_index_nbytes(n_outliers: int, rows: int, cols: int, compact: bool = False) -> int:
    """Bytes the file spends on the positions of ``n_outliers`` outliers."""
    if not n_outliers:
        return 0
    if _by_rows(n_outliers, rows, cols, compact):
        return 2 * (n_outliers + rows)
    return n_outliers * (4 if rows * cols < 2**31 else 8)


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, cols)`` of a tensor of ``shape``: its first dimension and the rest flattened."""
    return (shape[0] if shape else 1), (int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1)


def _flat_positions(col, count, shape: tuple[int, ...]) -> np.ndarray:
    """Flat positions from the row-by-row outlier fields (ValueError if they disagree)."""
    rows, cols = _rows_cols(shape)
    if col is None or count is None:
        raise ValueError("row-by-row outlier positions need both outlier_col and outlier_count")
    if col.dtype != np.uint16 or count.dtype != np.uint16 or col.ndim != 1 or count.shape != (rows,):
        raise ValueError(f"outlier_col must be 1-D uint16 and outlier_count uint16 of shape ({rows},)")
    if int(count.sum(dtype=np.int64)) != col.size:
        raise ValueError("outlier_count does not add up to the number of outlier columns")
    if col.size and int(col.max()) >= cols:
        raise ValueError("an outlier column lies outside the tensor")
    row = np.repeat(np.arange(rows, dtype=np.int64), count.astype(np.int64))
    return row * cols + col.astype(np.int64)
