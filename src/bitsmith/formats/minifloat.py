"""Minifloats: small sign-magnitude floating-point formats (FP8, FP6, FP4) as pure tensor functions.

Post-training quantization to minifloats is studied in "Post-Training Quantization with
Low-precision Minifloats and Integers on FPGAs" (arXiv 2311.12359); the conventions follow the OCP
8-bit Floating Point spec (OFP8: E4M3 and E5M2) and OCP Microscaling Formats v1.0 (FP6 E3M2 and
E2M3, FP4 E2M1).

A format has one sign bit, ``e`` exponent bits with bias ``2**(e-1) - 1`` and ``m`` mantissa bits.
Exponent field 0 holds zero and the subnormals ``M * 2**(1 - bias - m)``; field ``E > 0`` holds the
normals ``(2**m + M) * 2**(E - bias - m)``. The top exponent field depends on ``special``:

* ``"ieee"``: reserved, as in IEEE 754 and E5M2 (mantissa 0 is infinity, the rest NaN);
* ``"fn"``: normal numbers except the all-ones code, the only NaN (E4M3FN: no infinities);
* ``"none"``: normal numbers, every code is finite (the MX FP6 and FP4 element formats).

A code is the ``bits``-wide pattern in a uint8 with the sign in its top bit. Below the sign, the
*magnitude code* orders the values: ``magnitudes()[c]`` is the value of magnitude code ``c``.

Rounding is to nearest with ties to even (the even magnitude code, i.e. even mantissa LSB) and
saturates: anything beyond ``max_value``, infinities included, becomes ``+-max_value``, because a
quantizer that emits infinities or NaNs from finite data would poison whole matrix products.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from bitsmith.errors import SpecError
from bitsmith.tensor_cache import tensor_cache

SPECIALS = ("ieee", "fn", "none")

_CHUNK = 1 << 18  # elements per elementwise pass in round (1-2 MB: stays in cache)

# Per working dtype: the integer view, the exponent-field mask, the mantissa width and the bias.
_LAYOUT = {
    torch.float32: (torch.int32, 0x7F800000, 23, 127),
    torch.float64: (torch.int64, 0x7FF0000000000000, 52, 1023),
}


@dataclass(frozen=True)
class Minifloat:
    """A sign-magnitude floating-point format with ``1 + exponent_bits + mantissa_bits`` bits."""

    exponent_bits: int
    mantissa_bits: int
    special: str = "none"

    def __post_init__(self) -> None:
        e, m = self.exponent_bits, self.mantissa_bits
        for name, v in (("exponent_bits", e), ("mantissa_bits", m)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise SpecError(f"minifloat {name} {v!r} is not an integer")
        if e < 1 or m < 0:
            raise SpecError(f"minifloat e{e}m{m}: needs at least 1 exponent bit and no negative mantissa bits")
        if not 3 <= 1 + e + m <= 8:
            raise SpecError(f"minifloat e{e}m{m}: 1 + e + m = {1 + e + m} bits is outside 3..8")
        if self.special not in SPECIALS:
            raise SpecError(f"minifloat special {self.special!r} is not one of {', '.join(SPECIALS)}")
        if self.special == "ieee" and e < 2:
            raise SpecError(f"minifloat e{e}m{m}: 'ieee' reserves the top exponent, so it needs e >= 2")

    def __str__(self) -> str:
        return f"e{self.exponent_bits}m{self.mantissa_bits}" + ("fn" if self.special == "fn" else "")

    # -- constants ----------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        return (1 << (self.exponent_bits - 1)) - 1

    @property
    def num_finite(self) -> int:
        """Number of finite non-negative values (= finite magnitude codes, zero included)."""
        n = 1 << (self.exponent_bits + self.mantissa_bits)
        if self.special == "ieee":
            return n - (1 << self.mantissa_bits)
        return n - 1 if self.special == "fn" else n

    @property
    def max_value(self) -> float:
        """Largest finite value."""
        return self._value(self.num_finite - 1)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (a subnormal when m > 0, else equal to ``min_normal``)."""
        return math.ldexp(1.0, 1 - self.bias - self.mantissa_bits)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, 1 - self.bias)

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest finite value (OCP MX's ``emax_elem``)."""
        return math.frexp(self.max_value)[1] - 1

    @property
    def nan_code(self) -> int | None:
        """Magnitude code written for NaN (all ones), or None when every code is finite."""
        return None if self.special == "none" else (1 << (self.exponent_bits + self.mantissa_bits)) - 1

    def _value(self, code: int) -> float:
        """Value of one finite magnitude code."""
        m = self.mantissa_bits
        field, man = code >> m, code & ((1 << m) - 1)
        if field == 0:
            return math.ldexp(man, 1 - self.bias - m)
        return math.ldexp((1 << m) + man, field - self.bias - m)

    # -- tables -------------------------------------------------------------------------------
    def magnitudes(self) -> torch.Tensor:
        """All finite non-negative values, float64, sorted: index ``i`` is magnitude code ``i``."""
        return _magnitudes(self).clone()

    # -- conversions --------------------------------------------------------------------------
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Values (float32) of ``bits``-wide codes; NaN codes give nan, infinity codes +-inf."""
        idx = codes.to(torch.int64)
        if idx.numel() and (idx.min() < 0 or idx.max() >= 1 << self.bits):
            raise ValueError(f"codes out of range for the {self.bits}-bit format {self}")
        return _code_table(self)[idx]

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest representable value, ties to even, saturating; NaN stays NaN; ``x``'s dtype."""
        return self._round(x.to(_work_dtype(x)), signed=True).to(x.dtype)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 codes of ``round(x)``.

        The sign bit is kept, so ``-0.0`` and negatives that round to zero get the negative-zero
        code and ``decode(encode(x))`` equals ``round(x)`` bit for bit. NaN gets the all-ones
        magnitude code; formats with ``special="none"`` have no NaN and raise ValueError.
        """
        xf = x.to(_work_dtype(x))
        out = torch.empty(xf.shape, dtype=torch.uint8)
        src, dst = xf.reshape(-1), out.view(-1)
        n = min(_CHUNK, src.numel())
        a_buf, q_buf = torch.empty(n, dtype=xf.dtype), torch.empty(n, dtype=xf.dtype)
        for start in range(0, src.numel(), _CHUNK):
            xc = src[start : start + _CHUNK]
            a = a_buf[: xc.numel()]
            self._round_chunk(xc, a, q_buf[: xc.numel()])
            sign = torch.signbit(xc).to(torch.int32) << (self.bits - 1)
            dst[start : start + _CHUNK].copy_(self._magnitude_codes(a) | sign)
        return out

    def _magnitude_codes(self, a: torch.Tensor) -> torch.Tensor:
        """int codes of rounded magnitudes ``a`` (representable, or NaN)."""
        m = self.mantissa_bits
        itype, _, width, native_bias = _LAYOUT[a.dtype]
        # Normals: the float's exponent field and top m mantissa bits, rebiased.
        mag = (a.view(itype) >> (width - m)).sub_((native_bias - self.bias) << m)
        # Subnormals and zero: the mantissa field alone, a / min_subnormal.
        mag = torch.where(a < self.min_normal, (a * (1.0 / self.min_subnormal)).to(itype), mag)
        # NaN (a positive NaN after abs) lands above every finite code by the formula above.
        if self.nan_code is not None:
            return mag.clamp_max_(self.nan_code)
        if mag.numel() and mag.max() >= self.num_finite:
            raise ValueError(f"cannot encode NaN in {self}, which has no NaN code")
        return mag

    def _round(self, xf: torch.Tensor, signed: bool) -> torch.Tensor:
        """``round(xf)`` (or its magnitude) as a new contiguous tensor of ``xf``'s float32/64 dtype.

        Works through the flattened input in cache-sized chunks: the eight elementwise passes
        then hit cache instead of memory, about three times faster on large tensors.
        """
        out = torch.empty(xf.shape, dtype=xf.dtype)
        src, dst = xf.reshape(-1), out.view(-1)
        quantum = torch.empty(min(_CHUNK, src.numel()), dtype=xf.dtype)
        for start in range(0, src.numel(), _CHUNK):
            x = src[start : start + _CHUNK]
            self._round_chunk(x, dst[start : start + _CHUNK], quantum[: x.numel()])
            if signed:
                dst[start : start + _CHUNK].copysign_(x)
        return out

    def _round_chunk(self, x: torch.Tensor, a: torch.Tensor, quantum: torch.Tensor) -> None:
        """Write ``|round(x)|`` into ``a``, using ``quantum`` as scratch (1-D, same size)."""
        m = self.mantissa_bits
        # Saturate first: values past max_value end there anyway, and inf never reaches the division.
        torch.abs(x, out=a).clamp_max_(self.max_value)
        # Quantum of a's binade, 2**(floor(log2 a) - m), floored at the subnormal spacing.
        _pow2_floor(a, out=quantum).mul_(2.0**-m).clamp_min_(self.min_subnormal)
        if m == 0:
            # No mantissa: a tie 1.5 * 2**k sits between codes k + bias and k + bias + 1, and
            # torch.round always picks the upper one; pick the even code instead.
            itype, _, width, native_bias = _LAYOUT[a.dtype]
            lower_code_odd = ((a.view(itype) >> width) + (self.bias - native_bias)) & 1
            tie_down = a.div_(quantum).eq(1.5).logical_and_(lower_code_odd.eq_(0))
            a.round_().sub_(tie_down.to(a.dtype)).mul_(quantum)
            return
        # a / quantum is exact (a power of two) and below 2**(m+1); round_ ties to even, and an
        # even scaled value is an even mantissa LSB, so an even code.
        a.div_(quantum).round_().mul_(quantum)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _pow2_floor(a: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``2**floor(log2 a)`` for normal non-negative floats by masking the exponent field.

    Zero and float subnormals give 0, NaN and inf give inf. This is ``frexp`` without the
    mantissa, and several times faster.
    """
    itype, mask, _, _ = _LAYOUT[a.dtype]
    if out is None:
        return (a.view(itype) & mask).view(a.dtype)
    torch.bitwise_and(a.view(itype), mask, out=out.view(itype))
    return out


@tensor_cache()
def _magnitudes(fmt: Minifloat) -> torch.Tensor:
    return torch.tensor([fmt._value(c) for c in range(fmt.num_finite)], dtype=torch.float64)


@tensor_cache()
def _code_table(fmt: Minifloat) -> torch.Tensor:
    """float32 value of every ``bits``-wide code."""
    half = 1 << (fmt.bits - 1)
    mags = torch.full((half,), float("nan"), dtype=torch.float64)
    mags[: fmt.num_finite] = _magnitudes(fmt)
    if fmt.special == "ieee":
        mags[fmt.num_finite] = float("inf")
    return torch.cat([mags, -mags]).float()


FP8_E4M3 = Minifloat(4, 3, "fn")
FP8_E5M2 = Minifloat(5, 2, "ieee")
FP6_E3M2 = Minifloat(3, 2, "none")
FP6_E2M3 = Minifloat(2, 3, "none")
FP4_E2M1 = Minifloat(2, 1, "none")

_PRESETS = {"e4m3": FP8_E4M3, "e5m2": FP8_E5M2}


def minifloat(name: str) -> Minifloat:
    """Format from its name ``eXmY`` (case-insensitive).

    ``e4m3`` is OCP E4M3FN and ``e5m2`` is OCP E5M2 (IEEE-like); every other ``eXmY`` is the
    all-finite ``special="none"`` format, as the OCP MX FP6 (``e3m2``, ``e2m3``) and FP4
    (``e2m1``) elements are. Build :class:`Minifloat` directly for other choices.
    """
    key = name.strip().lower() if isinstance(name, str) else ""
    if key in _PRESETS:
        return _PRESETS[key]
    match = re.fullmatch(r"e(\d+)m(\d+)", key)
    if not match:
        raise SpecError(f"minifloat {name!r}: expected a name such as 'e4m3', 'e2m1' or 'e<X>m<Y>'")
    return Minifloat(int(match.group(1)), int(match.group(2)), "none")


def absmax_scale(xg: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """float32 scale per last-dim group mapping the group's absmax onto ``fmt.max_value``.

    All-zero groups get the smallest normal float32 so dividing by the scale stays finite.
    """
    amax = xg.abs().amax(dim=-1, keepdim=True).float()
    return (amax / fmt.max_value).clamp_min_(torch.finfo(torch.float32).tiny)


def fake_quantize_minifloat(xg: torch.Tensor, fmt: Minifloat, scale: torch.Tensor) -> torch.Tensor:
    """``round(x / scale) * scale`` in float32 (float64 for float64 input), returned in ``xg``'s dtype."""
    work = _work_dtype(xg)
    s = scale.to(work)
    return (fmt.round(xg.to(work) / s) * s).to(xg.dtype)
