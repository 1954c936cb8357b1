"""Bit-exact checks of gobo.packing: round trips, the documented layout, pinned bytes."""

from __future__ import annotations

import numpy as np
import pytest

from gobo.packing import pack_codes, packed_nbytes, unpack_codes

ALL_BITS = range(1, 9)
AWKWARD_SIZES = (0, 1, 7, 8, 9, 1_000_003)


def reference_pack(codes: np.ndarray, bits: int) -> bytes:
    """The docstring's layout, literally: code i is stream bits [i*b, (i+1)*b), lsb first,
    and stream bit j is bit j % 8 of byte j // 8. Slow; for small inputs only."""
    out = bytearray(packed_nbytes(len(codes), bits))
    for i, code in enumerate(int(c) for c in codes):
        for t in range(bits):
            j = i * bits + t
            out[j // 8] |= ((code >> t) & 1) << (j % 8)
    return bytes(out)


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("n", AWKWARD_SIZES)
def test_round_trip_is_bit_exact(bits: int, n: int) -> None:
    rng = np.random.default_rng(1000 * bits + n % 1000)
    codes = rng.integers(0, 1 << bits, size=n, dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert packed.size == packed_nbytes(n, bits) == -(-n * bits // 8)
    back = unpack_codes(packed, bits, n)
    assert back.dtype == np.uint8 and back.shape == (n,)
    assert np.array_equal(back, codes)
    used = n * bits % 8
    if used:  # unused high bits of the last byte are zero
        assert int(packed[-1]) >> used == 0


@pytest.mark.parametrize("bits", ALL_BITS)
def test_matches_the_documented_layout(bits: int) -> None:
    rng = np.random.default_rng(bits)
    # past 4,096 codes the compiled routine packs (eight codes at a time, then the rest)
    for n in (1, 2, 3, 5, 8, 13, 64, 333, 4096, 4101, 4103):
        codes = rng.integers(0, 1 << bits, size=n)
        want = reference_pack(codes, bits)
        assert pack_codes(codes, bits).tobytes() == want, (bits, n)
        assert np.array_equal(unpack_codes(np.frombuffer(want, dtype=np.uint8), bits, n), codes), (bits, n)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64, np.uint16])
def test_input_dtype_and_shape_do_not_change_the_bytes(dtype) -> None:
    codes = np.arange(24, dtype=np.int64) % 8
    want = pack_codes(codes.astype(np.uint8), 3)
    assert np.array_equal(pack_codes(codes.astype(dtype), 3), want)
    assert np.array_equal(pack_codes(codes.astype(dtype).reshape(4, 6), 3), want)  # row-major


# ---------------------------------------------------------------------- layout by hand
@pytest.mark.parametrize(
    "bits, codes, expected",
    [
        # byte 0 = c2[1:0] c1 c0 = 11 010 001; byte 1 = c5[0] c4 c3 c2[2] = 0 101 100 0;
        # byte 2 = c7 c6 c5[2:1] = 000 111 11
        (3, [1, 2, 3, 4, 5, 6, 7, 0], b"\xd1\x58\x1f"),
        (3, [7], b"\x07"),
        (1, [1, 0, 1, 1, 0, 0, 0, 0, 1], b"\x0d\x01"),  # 0b00001101, then one bit
        (2, [0, 1, 2, 3], b"\xe4"),  # 11 10 01 00
        (2, [3, 0, 0, 0, 2], b"\x03\x02"),
        (4, [0xA, 0x5, 0xF], b"\x5a\x0f"),  # low nibble first
        (5, [31, 1], b"\x3f\x00"),  # c1's lsb is stream bit 5
        (6, [0x3F, 0x00, 0x15, 0x2A], b"\x3f\x50\xa9"),
        (7, [1, 127], b"\x81\x3f"),  # c1 = stream bits 7..13
        (8, [0x00, 0x7F, 0x80, 0xFF], b"\x00\x7f\x80\xff"),
    ],
)
def test_tiny_cases_computed_by_hand(bits: int, codes: list[int], expected: bytes) -> None:
    packed = pack_codes(np.array(codes), bits)
    assert packed.tobytes() == expected
    assert unpack_codes(np.frombuffer(expected, dtype=np.uint8), bits, len(codes)).tolist() == codes


# ---------------------------------------------------------------------- golden bytes
# One fixed sequence; for b bits the codes are its low b bits. Bytes were produced by the
# format-1 implementation and checked by hand for 1, 2 and 4 bits
# (1 bit: codes 0,1,0,1,1,0,1,0 -> 0b01011010 = 0x5a; 4 bits: 0,15 -> 0xf0, 10,5 -> 0x5a).
GOLDEN_SOURCE = bytes.fromhex("00ff5aa5018037c49e126bf00f3ce17d42b829")  # 19 codes: ragged tail

GOLDEN = {
    1: {  # format version 1 (gobo 0.1)
        1: "5ad404",
        2: "6c313a5312",
        3: "b81a9cd670a64200",
        4: "f05a01472e0bcfd18209",
        5: "e0eb12c0255e2ef878e80227",
        6: "c0af950170139eb4c20f1ff6029e02",
        7: "80bfb61400dc881ec91afee085fb425c0a",
        8: "00ff5aa5018037c49e126bf00f3ce17d42b829",
    },
}


def golden_codes(bits: int) -> np.ndarray:
    return np.frombuffer(GOLDEN_SOURCE, dtype=np.uint8) & np.uint8((1 << bits) - 1)


@pytest.mark.parametrize("version, bits", [(v, b) for v, table in GOLDEN.items() for b in table])
def test_golden_bytes(version: int, bits: int) -> None:
    want = bytes.fromhex(GOLDEN[version][bits])
    codes = golden_codes(bits)
    if version == max(GOLDEN):  # the current writer produces the newest format
        assert pack_codes(codes, bits).tobytes() == want
    # every format ever written keeps reading back
    assert np.array_equal(unpack_codes(np.frombuffer(want, dtype=np.uint8), bits, codes.size), codes)


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("bits", [0, 9, -1, 16])
def test_bits_out_of_range(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_codes(np.zeros(4, dtype=np.uint8), bits)
    with pytest.raises(ValueError, match="bits"):
        unpack_codes(np.zeros(4, dtype=np.uint8), bits, 4)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_code_too_large(bits: int) -> None:
    codes = np.zeros(10, dtype=np.int64)
    codes[7] = 1 << bits
    with pytest.raises(ValueError, match="fit"):
        pack_codes(codes, bits)


def test_negative_code_is_rejected() -> None:
    with pytest.raises(ValueError):
        pack_codes(np.array([0, -1, 2]), 3)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("n", [1, 9, 100])
def test_wrong_packed_length(bits: int, n: int) -> None:
    packed = pack_codes(np.zeros(n, dtype=np.uint8), bits)
    for bad in (packed[:-1], np.concatenate([packed, np.zeros(1, np.uint8)])):
        with pytest.raises(ValueError, match="bytes"):
            unpack_codes(bad, bits, n)
