"""Entropy coding of codes: interleaved rANS with one static model per tensor.

A grid tensor's codes (see :mod:`gobo.methods.grid`) are far from uniform: the levels near
zero are common, the outer ones rare. Stored as plain b-bit codes they would waste most of a
bit; coded here they take their empirical entropy plus about 0.01 bit.

Format (format version 3), byte-wise rANS (Duda 2013) in the layout of Giesen's
interleaved ``ryg_rans``:

* ``freq``: uint16, one entry per code value (``2**bits``), summing to ``M = 2**14``; every
  value that occurs has a frequency of at least 1 (:func:`model`). ``cum[s]`` is the sum of
  the frequencies below ``s``.
* ``lanes`` (:func:`lanes_for`) interleaved coders; code ``i`` belongs to lane ``i % lanes``.
  A state ``x`` lies in ``[L, 256 L)``, ``L = 2**23``.
* The stream: the lanes' initial states as little-endian uint32 (lane 0 first), then the
  renormalisation bytes. Decoding code ``i`` (lane ``l``)::

      slot = x[l] % M;  s = the value with cum[s] <= slot < cum[s] + freq[s]
      x[l] = freq[s] * (x[l] // M) + slot - cum[s]
      while x[l] < L: x[l] = x[l] * 256 + next byte

* After the last code every state is ``L`` again and every byte has been read; a stream that
  ends otherwise is damaged.

The pure numpy coder here moves all lanes one step at a time (the reference, and the path
when the compiled one is missing); :mod:`gobo.native` codes one symbol at a time in C. Both
give the same bytes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["PROB_BITS", "decode", "encode", "encode_modelled", "lanes_for", "model", "nbytes"]

PROB_BITS = 14
M = 1 << PROB_BITS
L = 1 << 23
#: at most this many lanes; a tensor gets one lane per 4,096 codes up to it (:func:`lanes_for`)
MAX_LANES = 256
#: above this many codes the compiled coder is used when it is available
_NATIVE_MIN = 1 << 12


def lanes_for(n: int) -> int:
    """Interleaved lanes of a stream of ``n`` codes: one per 4,096 codes, 1 to 256. Each
    costs 4 bytes (its state), under 0.01 bit per code; more lanes make the numpy coder's
    steps wider (fewer of them)."""
    return int(min(MAX_LANES, max(1, n >> 12)))


def model(codes: np.ndarray, nsym: int) -> np.ndarray:
    """The static model of ``codes`` (integers below ``nsym``): uint16 frequencies summing
    to ``M``, proportional to the counts, at least 1 for every value that occurs.

    Each count is scaled and rounded; the rounding's surplus or shortfall is then taken from
    or given to the most frequent values, one unit each, largest first (ties: the lower
    value), never below 1. Deterministic."""
    return _model(np.bincount(np.asarray(codes).reshape(-1), minlength=nsym).astype(np.int64), nsym)


def _model(counts: np.ndarray, nsym: int) -> np.ndarray:
    """:func:`model` from the counts of the codes' values."""
    if counts.size > nsym:
        raise ValueError(f"a code is not below {nsym}")
    if nsym > M:
        raise ValueError(f"at most {M} code values, got {nsym}")
    n = int(counts.sum())
    freq = np.zeros(nsym, dtype=np.int64)
    if n == 0:
        freq[0] = M
        return freq.astype(np.uint16)
    seen = counts > 0
    freq[seen] = np.maximum(1, (counts[seen] * M + n // 2) // n)
    order = np.lexsort((np.arange(nsym), -counts))  # most frequent first, ties to the lower value
    diff = M - int(freq.sum())
    while diff:
        for s in order[: int(seen.sum())]:
            if diff > 0:
                freq[s] += 1
                diff -= 1
            elif freq[s] > 1:
                freq[s] -= 1
                diff += 1
            if not diff:
                break
    return freq.astype(np.uint16)


def _check_model(freq: np.ndarray) -> np.ndarray:
    freq = np.asarray(freq)
    if freq.dtype != np.uint16 or freq.ndim != 1 or not 1 <= freq.size <= 256 or int(freq.sum(dtype=np.int64)) != M:
        raise ValueError(f"an entropy model must be 1 to 256 uint16 frequencies summing to {M}")
    return freq.astype(np.int64)


def _native():
    try:
        from . import native

        return native if native.available() else None
    except ImportError:  # pragma: no cover - the extension is part of the install
        return None


def encode(codes: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """The stream (uint8) of ``codes`` (uint8, any shape, read row-major) under model ``freq``.
    ValueError if a code has frequency 0."""
    f = _check_model(freq)
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if codes.size and (int(codes.max()) >= f.size or not f[np.unique(codes)].all()):
        raise ValueError("a code has no frequency in the entropy model")
    return _encode(codes, np.asarray(freq))


def _encode(codes: np.ndarray, freq: np.ndarray, room: int = 0) -> np.ndarray:
    """:func:`encode` of flat uint8 ``codes`` that all have a frequency in ``freq``: the
    compiled coder for long streams, the numpy one otherwise. ``room``: the bytes the stream
    is expected to take (0: unknown), so that the compiled coder writes into no more memory
    than it needs."""
    nat = _native() if codes.size >= _NATIVE_MIN else None
    if nat is not None:
        return nat.rans_encode(codes, freq, lanes_for(codes.size), room)
    return encode_reference(codes, freq)


def encode_modelled(codes: np.ndarray, nsym: int) -> tuple[np.ndarray, np.ndarray]:
    """``(stream, freq)``: ``codes`` (uint8, integers below ``nsym``) under their own static
    model (:func:`model`), counted once: every value that occurs has a frequency, so
    :func:`encode`'s check is not needed."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    n = counts(codes, nsym)
    freq = _model(n, nsym)
    # the stream is its code length to within a byte a lane, and the lanes' final states
    room = int(_length(n, freq) / 8) + 6 * lanes_for(codes.size) + 64
    return _encode(codes, freq, room), freq


def code_length(counts: np.ndarray, nsym: int) -> float:
    """Bits that codes with these ``counts`` of each value (below ``nsym``) take under their
    own static model (:func:`model`): the stream :func:`encode_modelled` writes, to within
    the coder's renormalisation and its lanes' final states."""
    n = np.zeros(nsym, dtype=np.int64)
    n[: len(counts)] = counts
    return _length(n, _model(n, nsym))


def _length(n: np.ndarray, freq: np.ndarray) -> float:
    """Bits of codes with counts ``n`` under model ``freq`` (the same length)."""
    f = np.asarray(freq, dtype=np.float64)[: len(n)]
    seen = n[: len(f)] > 0
    return float(np.dot(n[: len(f)][seen], np.log2(M / f[seen])))


def counts(codes: np.ndarray, nsym: int) -> np.ndarray:
    """How often each value below ``nsym`` occurs in flat uint8 ``codes`` (int64), counted a
    block at a time, compiled (numpy's count would widen every code to 8 bytes first)."""
    n = np.zeros(max(nsym, 256), dtype=np.int64)
    nat = _native() if codes.size >= _NATIVE_MIN else None
    if nat is not None:
        n[:256] = nat.byte_counts(np.ascontiguousarray(codes, dtype=np.uint8))
    else:
        for a in range(0, codes.size, 1 << 18):
            n[:256] += np.bincount(codes[a : a + (1 << 18)], minlength=256)
    return n[: max(nsym, int(np.flatnonzero(n)[-1]) + 1 if codes.size else 0)]


def decode(stream: np.ndarray, freq: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` codes (uint8) of ``stream`` under model ``freq``; ValueError if the stream is
    damaged (too short or too long, or the lanes do not end where they began)."""
    _check_model(freq)
    stream = np.ascontiguousarray(stream, dtype=np.uint8).reshape(-1)
    nat = _native() if n >= _NATIVE_MIN else None
    if nat is not None:
        return nat.rans_decode(stream, np.asarray(freq), lanes_for(n), int(n))
    return decode_reference(stream, freq, n)


def nbytes(codes: np.ndarray, freq: np.ndarray) -> int:
    """Bytes of the stream of ``codes`` (what :func:`encode` returns)."""
    return int(encode(codes, freq).size)


def encode_reference(codes: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """:func:`encode` in numpy: all lanes one step at a time, from the last step back."""
    f = _check_model(freq)
    cum = np.concatenate([[0], np.cumsum(f)[:-1]])
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    n = codes.size
    lanes = lanes_for(n)
    x = np.full(lanes, L, dtype=np.int64)
    buf = np.zeros(2 * n + 4 * lanes, dtype=np.uint8)  # a code emits at most 2 bytes
    pos = buf.size
    for t in range(-(-n // lanes) - 1, -1, -1):
        s = codes[t * lanes : (t + 1) * lanes].astype(np.int64)
        m = s.size
        xs, fs = x[:m], f[s]
        xmax = ((L >> PROB_BITS) << 8) * fs  # a state at or above this emits a byte first
        k = (xs >= xmax).astype(np.int64) + (xs >= (xmax << 8))
        total = int(k.sum())
        off = pos - total + np.cumsum(k) - k  # lane 0's bytes first, the high one before the low
        one, two = k == 1, k == 2
        buf[off[one]] = xs[one] & 0xFF
        buf[off[two]] = (xs[two] >> 8) & 0xFF
        buf[off[two] + 1] = xs[two] & 0xFF
        xs = xs >> (8 * k)
        x[:m] = ((xs // fs) << PROB_BITS) + xs % fs + cum[s]
        pos -= total
    pos -= 4 * lanes
    buf[pos : pos + 4 * lanes] = x.astype("<u4").view(np.uint8)
    return buf[pos:].copy()


def decode_reference(stream: np.ndarray, freq: np.ndarray, n: int) -> np.ndarray:
    """:func:`decode` in numpy: all lanes one step at a time."""
    f = _check_model(freq)
    cum = np.concatenate([[0], np.cumsum(f)[:-1]])
    sym = np.repeat(np.arange(f.size, dtype=np.int64), f)
    stream = np.ascontiguousarray(stream, dtype=np.uint8).reshape(-1)
    lanes = lanes_for(n)
    if stream.size < 4 * lanes:
        raise ValueError("the entropy-coded stream is shorter than its lanes' states")
    x = stream[: 4 * lanes].view("<u4").astype(np.int64)
    if ((x < L) | (x >= L << 8)).any():
        raise ValueError("the entropy-coded stream starts with an invalid state")
    pos = 4 * lanes
    out = np.empty(n, dtype=np.uint8)
    for t in range(-(-n // lanes)):
        xs = x[: min(lanes, n - t * lanes)]
        slot = xs & (M - 1)
        s = sym[slot]
        out[t * lanes : t * lanes + xs.size] = s
        xs = f[s] * (xs >> PROB_BITS) + slot - cum[s]
        k = (xs < L).astype(np.int64) + (xs < (L >> 8))
        total = int(k.sum())
        if pos + total > stream.size:
            raise ValueError("the entropy-coded stream ends too early")
        off = pos + np.cumsum(k) - k
        read = k >= 1
        xs[read] = (xs[read] << 8) | stream[off[read]]
        two = k == 2
        xs[two] = (xs[two] << 8) | stream[off[two] + 1]
        x[: xs.size] = xs
        pos += total
    if pos != stream.size or (x != L).any():
        raise ValueError("the entropy-coded stream is damaged (it does not end where its codes do)")
    return out
