"""Integer kernels for fully quantized transformer inference.

The non-linear functions follow I-BERT (Kim et al., "I-BERT: Integer-only BERT Quantization",
ICML 2021): ``exp`` from a second-order polynomial on ``(-ln 2, 0]`` times ``2**-z`` (a shift),
``erf`` (for GELU) from a clipped second-order polynomial, the LayerNorm standard deviation from
an integer square root by Newton iteration. Rescaling between two quantization scales multiplies
by a dyadic number ``m / 2**e`` (integer multiply, arithmetic right shift).

Conventions: a quantized value is ``q * scale`` with ``q`` an integer tensor and ``scale`` a
Python float known when the model is built. Scales only serve to derive integer constants (as
an accelerator's compiler would); every tensor a kernel takes or returns is an integer tensor
(int8, uint8, int32 or int64), accumulators are int64 where a product could leave int32.

The polynomial coefficients are themselves put on the input grid (``floor(coef / scale)``, as
I-BERT does); :func:`exp_constants` and :func:`gelu_constants` return those integers, so a float
simulation can evaluate exactly the same polynomials. Beyond them, the kernels are exact or
carry about 30 fractional bits: rounding is to nearest (ties up) after exact dyadic products.

``int_matmul`` has two paths with bit-identical results: the reference multiplies in torch's
integer matmul; the fast path hands integer operands to a float GEMM only when every partial sum
is provably an integer below 2**24 (float32) or 2**53 (float64), where float addition is exact
in any order, and converts the exact result back to int32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "Dyadic",
    "IntLayerNorm",
    "dyadic",
    "exp_constants",
    "gelu_constants",
    "i_exp",
    "i_gelu",
    "i_layernorm",
    "i_softmax",
    "int_matmul",
    "int_matmul_reference",
    "is_int",
    "isqrt",
    "mul_floor",
    "qmax",
    "requantize",
]

INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)

#: I-BERT's exp polynomial: exp(r) ~ a r**2 + b r + c on (-ln2, 0]
EXP_A, EXP_B, EXP_C = 0.35815147, 0.96963238, 1.0
#: I-BERT's erf polynomial, erf(x) ~ sign(x) [a (min(|x|, -b) + b)**2 + 1]; ``a`` rounded to
#: 24 fractional bits so that the GELU output scale is an exact dyadic multiple of the input's
ERF_A, ERF_B = -round(0.2888 * 2**24) / 2**24, -1.769
#: bits of the largest exp value inside the softmax (keeps the row sum below 2**53)
SOFTMAX_SUM_BITS = 52


def is_int(t: torch.Tensor) -> bool:
    return t.dtype in INT_DTYPES


def qmax(bits: int) -> int:
    """Largest code of a symmetric signed ``bits``-bit grid ``[-qmax, qmax]``."""
    return (1 << (bits - 1)) - 1


def _dtype_for(lo: int, hi: int) -> torch.dtype:
    if lo >= 0 and hi <= 255:
        return torch.uint8
    if lo >= -128 and hi <= 127:
        return torch.int8
    if lo >= -(1 << 31) and hi < (1 << 31):
        return torch.int32
    return torch.int64


def _absmax(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return max(abs(int(t.max())), abs(int(t.min())))


def _bit_length(n: torch.Tensor) -> torch.Tensor:
    """Number of bits of each non-negative int64 (0 for 0)."""
    out = torch.zeros_like(n)
    x = n.clone()
    for s in (32, 16, 8, 4, 2, 1):
        big = x >= (1 << s)
        out += big.to(torch.int64) * s
        x = torch.where(big, x >> s, x)
    return out + (x > 0).to(torch.int64)


def _shr(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``floor(x / 2**s)`` for int64 ``x`` and shifts ``s >= 0`` of any size."""
    s = torch.as_tensor(s, dtype=torch.int64)
    if s.numel() and int(s.max()) <= 62:
        return torch.bitwise_right_shift(x, s)
    out = torch.bitwise_right_shift(x, s.clamp(max=62))
    return torch.bitwise_right_shift(out, (s - 62).clamp(min=0, max=62))


# ---------------------------------------------------------------------------- rescaling


@dataclass(frozen=True)
class Dyadic:
    """Multipliers ``m / 2**e`` (scalar or one per channel): int64 ``m`` with ``|m| < 2**31``, int64 ``e``."""

    m: torch.Tensor
    e: torch.Tensor

    def value(self) -> torch.Tensor:
        """The multipliers as float64 (exact: ``m`` has 31 bits)."""
        return self.m.double() * torch.pow(2.0, -self.e.double())

    def index(self, idx) -> "Dyadic":
        return Dyadic(self.m[idx], self.e[idx])


def dyadic(multiplier) -> Dyadic:
    """Closest ``m / 2**e`` to each multiplier with ``2**30 <= |m| < 2**31`` (exact when the
    multiplier's mantissa has at most 31 bits, e.g. a float32 times a power of two)."""
    mult = torch.as_tensor(multiplier, dtype=torch.float64)
    mag = mult.abs()
    e = torch.where(mag > 0, 30 - torch.floor(torch.log2(mag.clamp(min=1e-300))), torch.zeros_like(mag))
    m = torch.round(mag * torch.pow(2.0, e))
    over = m >= 2.0**31  # log2 rounding at a power of two
    e = torch.where(over, e - 1, e)
    m = torch.round(mag * torch.pow(2.0, e))
    if bool((e < 0).any()):
        raise ValueError("a rescaling multiplier is too large (>= 2**31)")
    return Dyadic(m=(torch.sign(mult) * m).to(torch.int64), e=e.to(torch.int64))


def mul_floor(x: torch.Tensor, d: Dyadic, frac: int = 0) -> torch.Tensor:
    """``floor(x * m * 2**(frac - e))`` exactly, for integer ``|x| < 2**62`` (int64 result).

    Products of a wide ``x`` with a 31-bit ``m`` may need 93 bits: ``x`` is split into
    ``x_hi * 2**31 + x_lo`` and the two partial products are shifted separately. The caller
    makes sure the result itself fits in int64.
    """
    sh = d.e - frac
    if bool((sh < 0).any()):
        raise ValueError("mul_floor needs e >= frac")
    if x.dtype != torch.int64 or _absmax(x) < 1 << 31:  # narrower dtypes hold |x| < 2**31
        return _shr(x.to(torch.int64) * d.m, sh)
    hi = torch.bitwise_right_shift(x, 31)
    lo = torch.bitwise_and(x, (1 << 31) - 1)
    a, b = hi * d.m, lo * d.m  # value = a * 2**31 + b, |a|, |b| < 2**62
    wide = _shr(a + _shr(b, torch.full_like(sh, 31)), (sh - 31).clamp(min=0))
    narrow = torch.bitwise_left_shift(a, (31 - sh).clamp(min=0, max=31)) + _shr(b, sh.clamp(max=31))
    return torch.where(sh >= 31, wide, narrow)


def requantize(x: torch.Tensor, d: Dyadic, lo: int, hi: int) -> torch.Tensor:
    """``clamp(round(x * m / 2**e), lo, hi)``, ties rounded up, for integer ``|x| < 2**62``.

    Per-channel multipliers broadcast over the last dimension. The result has the smallest
    integer dtype that holds ``[lo, hi]``.
    """
    if x.dtype == torch.int64:  # |x| beyond what reaches [lo, hi] gives the same result: clamp it first
        lim = torch.ceil((max(abs(lo), abs(hi)) + 2) * torch.pow(2.0, d.e.double()) / d.m.abs().clamp(min=1).double())
        lim = lim.clamp(max=float(1 << 61)).to(torch.int64)
        x = torch.maximum(torch.minimum(x, lim), -lim)
    out = (mul_floor(x, d, frac=1) + 1) >> 1
    return out.clamp_(lo, hi).to(_dtype_for(lo, hi))


# ---------------------------------------------------------------------------- GEMM


def int_matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of integer tensors in torch's integer matmul (int64 accumulation), as int32."""
    out = torch.matmul(a.to(torch.int64), b.to(torch.int64))
    if out.numel() and _absmax(out) >= 1 << 31:
        raise OverflowError("an integer matmul result does not fit in int32")
    return out.to(torch.int32)


def int_matmul(a: torch.Tensor, b: torch.Tensor, a_max: int | None = None, b_max: int | None = None) -> torch.Tensor:
    """``a @ b`` of integer tensors as int32, bit-identical to :func:`int_matmul_reference`.

    Every partial sum is bounded by ``K * max|a| * max|b|``; when that is below 2**24 (2**53)
    float32 (float64) represents every partial sum exactly, so a float GEMM returns the exact
    integer result whatever its summation order. ``a_max``/``b_max``: known bounds on ``|a|``,
    ``|b|`` (measured when not given).
    """
    if not (is_int(a) and is_int(b)):
        raise TypeError(f"int_matmul takes integer tensors, got {a.dtype} and {b.dtype}")
    a_max = _absmax(a) if a_max is None else a_max
    b_max = _absmax(b) if b_max is None else b_max
    bound = a.shape[-1] * a_max * b_max
    if bound < 1 << 24:
        ftype = torch.float32
    elif bound < 1 << 53:
        ftype = torch.float64
    else:
        return int_matmul_reference(a, b)
    out = torch.matmul(a.to(ftype), b.to(ftype))
    if bound >= 1 << 31 and out.numel() and float(out.abs().max()) >= 2.0**31:
        raise OverflowError("an integer matmul result does not fit in int32")
    return out.to(torch.int32)


# ---------------------------------------------------------------------------- square root


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """``floor(sqrt(n))`` of non-negative int64 values below 2**62, by Newton iteration.

    The start ``2**ceil(bits/2)`` is at most twice the root, so the relative error falls from
    1 to below 2**-62 in six steps; a last step fixes the floor exactly.
    """
    if n.dtype != torch.int64:
        raise TypeError(f"isqrt takes int64, got {n.dtype}")
    if n.numel() and (int(n.min()) < 0 or int(n.max()) >= 1 << 62):
        raise ValueError("isqrt takes values in [0, 2**62)")
    x = torch.bitwise_left_shift(torch.ones_like(n), (_bit_length(n) + 1) >> 1)
    for _ in range(7):
        y = (x + torch.div(n, x.clamp(min=1), rounding_mode="floor")) >> 1
        x = torch.minimum(x, y)
    x = x - (x * x > n).to(torch.int64)
    return x + ((x + 1) * (x + 1) <= n).to(torch.int64)


# ---------------------------------------------------------------------------- exp, softmax


def exp_constants(scale: float) -> tuple[int, int, int]:
    """Integer constants of i-exp at input ``scale``: ``(x0, b, c)`` with ``x0 = floor(-ln2 / scale)``,
    ``exp(r * scale) ~ a scale**2 ((r + b) r + c)`` for ``r`` in ``(x0, 0]``."""
    x0 = math.floor(-math.log(2) / scale)
    if x0 >= -1:
        raise ValueError(f"the exp input scale {scale} is too coarse (needs scale < ln 2 / 2)")
    return x0, math.floor(EXP_B / EXP_A / scale), math.floor(EXP_C / (EXP_A * scale * scale))


def i_exp(x: torch.Tensor, scale: float, frac: int = 0) -> tuple[torch.Tensor, float]:
    """``exp(x * scale)`` for ``x <= 0`` as ``(int64 values, their scale)``.

    ``x = z x0 + r`` with ``r`` in ``(x0, 0]`` (``x0`` = -ln2 on the grid); the polynomial gives
    ``exp(r)``, and ``2**-z`` is a shift. ``frac`` extra bits are kept: the result is
    ``poly * 2**(frac - z)``, exact while ``z <= frac`` (smaller values are floored).
    """
    x0, b, c = exp_constants(scale)
    x = torch.clamp(x.to(torch.int64), min=62 * x0)
    z = torch.div(x, x0, rounding_mode="floor")  # 0..62
    r = x - x0 * z
    poly = (r + b) * r + c  # in (c/2, c]
    if (c << frac) >= 1 << 62:
        raise OverflowError("i_exp: too many extra bits for this input scale")
    return torch.bitwise_right_shift(poly << frac, z), EXP_A * scale * scale * 2.0**-frac


def i_softmax(x: torch.Tensor, scale: float, mask: torch.Tensor | None = None, out_bits: int = 8) -> torch.Tensor:
    """Softmax over the last dimension as unsigned codes ``round(p * 2**out_bits)`` (uint8 for 8 bits).

    ``mask`` (bool, broadcastable to ``x``) marks the positions that take part; the others get
    probability 0. The exponentials keep as many bits as the row sum allows (below 2**53); each
    probability is one exact integer division.
    """
    x = x.to(torch.int64)
    if mask is not None:
        x = x.masked_fill(~mask, -(1 << 62))
    x = x - x.amax(dim=-1, keepdim=True)
    _, _, c = exp_constants(scale)
    frac = max(0, SOFTMAX_SUM_BITS - c.bit_length() - max(1, x.shape[-1]).bit_length())
    e, _ = i_exp(x, scale, frac)
    if mask is not None:
        e = e.masked_fill(~mask, 0)
    total = e.sum(dim=-1, keepdim=True).clamp(min=1)
    p = torch.div(e * (1 << (out_bits + 1)) + total, 2 * total, rounding_mode="floor")  # round(e 2**bits / total)
    return p.clamp_(0, (1 << out_bits) - 1).to(_dtype_for(0, (1 << out_bits) - 1))


# ---------------------------------------------------------------------------- GELU


def gelu_constants(scale: float) -> tuple[int, int, int, float]:
    """Integer constants of i-GELU at input ``scale``: ``(b, c, one, out_scale)``.

    With ``s = scale / sqrt 2`` (the grid of ``x / sqrt 2``): ``b = floor(ERF_B / s)``,
    ``c = floor(1 / (ERF_A s**2))``, ``one = floor(1 / (-ERF_A s**2))``; the GELU output is
    ``x (one - sign(x) ((min(|x|, -b) + b)**2 + c))`` at ``out_scale = -ERF_A scale**3 / 4``.
    """
    s2 = scale * scale / 2.0
    return (math.floor(ERF_B / (scale / math.sqrt(2.0))), math.floor(1.0 / (ERF_A * s2)),
            math.floor(1.0 / (-ERF_A * s2)), -ERF_A * scale**3 / 4.0)


def i_gelu(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """``gelu(x * scale) = x/2 (1 + erf(x / sqrt 2))`` as ``(int64 values, their scale)``; ``|x| < 2**16``.

    ``erf`` is I-BERT's ``sign(x) [a (min(|x|, -b) + b)**2 + 1]``; the product is exact.
    """
    b, c, one, out_scale = gelu_constants(scale)
    x = x.to(torch.int64)
    ax = x.abs()
    t = ax.clamp(max=-b) + b
    # x (one - sign(x) (t**2 + c)) = x one - |x| (t**2 + c); erf(x / sqrt2) = sign(x) (t**2 + c) a s**2, a < 0
    return x * one - ax * (t * t + c), out_scale


# ---------------------------------------------------------------------------- LayerNorm


@dataclass(frozen=True)
class IntLayerNorm:
    """Integer constants of one LayerNorm: ``out = round(gamma n / out_scale + beta / out_scale)``.

    ``mult`` is ``gamma sqrt(H) / out_scale`` per channel; ``beta`` is ``beta / out_scale`` with 31
    fractional bits; ``eps`` is ``eps H**3 / in_scale**2`` (the variance term's units).
    """

    mult: Dyadic
    beta: torch.Tensor  # int64 (H,)
    eps: int
    bits: int

    @classmethod
    def build(cls, gamma: torch.Tensor, beta: torch.Tensor, eps: float, in_scale: float, out_scale: float,
              bits: int) -> "IntLayerNorm":
        h = gamma.numel()
        mult = dyadic(gamma.double() * math.sqrt(h) / out_scale)
        lim = float(1 << (bits + 2))  # larger |beta| / out_scale saturates the output anyway
        b = torch.round((beta.double() / out_scale).clamp(-lim, lim) * 2.0**31).to(torch.int64)
        e = min(round(eps * h**3 / in_scale**2), 1 << 60)
        return cls(mult=mult, beta=b, eps=int(e), bits=bits)


def i_layernorm(x: torch.Tensor, ln: IntLayerNorm) -> torch.Tensor:
    """LayerNorm over the last dimension of integer ``x`` (``|x| < 2**16``), ``ln.bits`` output codes.

    ``y = H x - sum(x)`` is ``H (x - mean)`` exactly; ``V = sum(y**2) + eps`` is ``H**3 (var + eps)``.
    ``sqrt(V)`` comes from :func:`isqrt` after scaling ``V`` to 62 bits (31 correct bits), the
    normalised value from a two-step integer division per element (61 fractional bits).
    """
    x = x.to(torch.int64)
    h = x.shape[-1]
    y = h * x - x.sum(dim=-1, keepdim=True)  # |y| < 2**26
    v = (y * y).sum(dim=-1, keepdim=True) + ln.eps  # < 2**61
    k = (62 - _bit_length(v)) >> 1
    root = isqrt(torch.bitwise_left_shift(v, 2 * k)).clamp(min=1)  # ~ sqrt(V) 2**k, in [2**30, 2**31)
    # u = floor(y 2**61 / root) = n 2**(61-k) / sqrt(H), in two exact division steps (|u| < 2**62)
    num = torch.bitwise_left_shift(y, 36)
    hi = torch.div(num, root, rounding_mode="floor")
    lo = torch.div(torch.bitwise_left_shift(num - hi * root, 25), root, rounding_mode="floor")
    u = torch.bitwise_left_shift(hi, 25) + lo
    # t = (n gamma / out_scale) 2**31 = u * mult * 2**(31 + k - 61)
    t = mul_floor(u, Dyadic(ln.mult.m, ln.mult.e + 61 - k), frac=31)
    q = qmax(ln.bits)
    out = (t + ln.beta + (1 << 30)) >> 31
    return out.clamp_(-q, q).to(_dtype_for(-q, q))
