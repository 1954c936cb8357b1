"""Bit-exact packing of b-bit codes (1 <= b <= 8) into bytes.

Layout (format version 1): the codes form one little-endian bit stream. Code ``i``
occupies stream bits ``[i*b, (i+1)*b)``, least significant bit first, and stream bit
``j`` is bit ``j % 8`` of byte ``j // 8``. Eight 3-bit codes therefore fill exactly
three bytes::

    byte 0: c2[1:0] c1[2:0] c0[2:0]      (msb .. lsb)
    byte 1: c5[0]   c4[2:0] c3[2:0] c2[2]
    byte 2: c7[2:0] c6[2:0] c5[2:1]

A tensor of ``n`` codes takes ``ceil(n*b/8)`` bytes; unused high bits of the last
byte are zero. No padding is inserted between rows, so a row of ``k`` codes starts on
a byte boundary whenever ``k*b`` is a multiple of 8 (true for every BERT width).
"""

from __future__ import annotations

import numpy as np

__all__ = ["packed_nbytes", "pack_codes", "unpack_codes", "pack_codes_reference", "unpack_codes_reference"]

#: above this many codes the compiled routine is used when it is available
_NATIVE_MIN = 4096


def _native():
    try:
        from . import native

        return native if native.available() else None
    except ImportError:  # pragma: no cover - the extension is part of the install
        return None


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes needed for ``n`` codes of ``bits`` bits."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integer codes (each < 2**bits) into a uint8 array."""
    _check_bits(bits)
    codes = np.ascontiguousarray(codes).reshape(-1)
    nat = _native() if codes.size >= _NATIVE_MIN else None
    if nat is not None:
        small = codes.dtype == np.uint8  # never below 0, and at 8 bits never too large
        if codes.size and not (small and bits == 8):
            if (not small and int(codes.min()) < 0) or int(codes.max()) >= (1 << bits):
                raise ValueError(f"a code does not fit in {bits} bits")
        c8 = np.ascontiguousarray(codes, dtype=np.uint8)
        out = np.empty(packed_nbytes(c8.size, bits), dtype=np.uint8)
        nat.pack_codes(c8, int(bits), out)
        return out
    return pack_codes_reference(codes, bits)


def pack_codes_reference(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pure-numpy :func:`pack_codes` (the reference the compiled routine is tested against)."""
    _check_bits(bits)
    codes = np.ascontiguousarray(codes).reshape(-1)
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"a code does not fit in {bits} bits")
    codes = codes.astype(np.uint8, copy=False)
    if bits == 8:
        return codes.copy()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, vectorised shifts
        per = 8 // bits
        n = codes.size
        padded = np.zeros(-(-n // per) * per, dtype=np.uint8)
        padded[:n] = codes
        padded = padded.reshape(-1, per)
        out = np.zeros(padded.shape[0], dtype=np.uint8)
        for k in range(per):
            out |= padded[:, k] << np.uint8(k * bits)
        return out
    # general case: expand to bits, pack the stream
    bitplane = np.unpackbits(codes[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(bitplane.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``n`` codes as uint8."""
    nat = _native() if n >= _NATIVE_MIN else None
    if nat is not None:
        _check_bits(bits)
        packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
        need = packed_nbytes(n, bits)
        if packed.size != need:
            raise ValueError(f"{n} codes of {bits} bits need {need} bytes, got {packed.size}")
        out = np.empty(n, dtype=np.uint8)
        nat.unpack_codes(packed, int(bits), int(n), out)
        return out
    return unpack_codes_reference(packed, bits, n)


def unpack_codes_reference(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Pure-numpy :func:`unpack_codes`."""
    _check_bits(bits)
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    need = packed_nbytes(n, bits)
    if packed.size != need:
        raise ValueError(f"{n} codes of {bits} bits need {need} bytes, got {packed.size}")
    if bits == 8:
        return packed.copy()
    if 8 % bits == 0:
        per = 8 // bits
        mask = np.uint8((1 << bits) - 1)
        out = np.empty((packed.size, per), dtype=np.uint8)
        for k in range(per):
            out[:, k] = (packed >> np.uint8(k * bits)) & mask
        return out.reshape(-1)[:n].copy()
    stream = np.unpackbits(packed, bitorder="little")[: n * bits].reshape(n, bits)
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return (stream * weights).sum(axis=1, dtype=np.uint8)
