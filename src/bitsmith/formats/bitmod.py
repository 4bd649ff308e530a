"""BitMoD mixture-of-datatype weight quantization (arXiv 2411.11745), as pure tensor functions.

A sign-magnitude low-bit float spends two codes on zero (+0 and -0). BitMoD re-purposes the -0 code
as one *special value*, so each bit width gets a small family of datatypes; every group of weights
picks the member with the least squared error and stores its id next to the scale. The families
(values in units of the base float; ER = extra resolution, EA = extra asymmetry, named and valued
as in the paper and the authors' released code, whose integer tables are these sets times 2 for
FP4)::

    FP4 base, E2M1:        0, +-0.5, +-1, +-1.5, +-2, +-3, +-4, +-6
      fp4_er_pos / _neg    base plus +5 / -5   (fills the widest gap, between 4 and 6)
      fp4_ea_pos / _neg    base plus +8 / -8   (one side reaches further than the other)
    FP3 base, E2M0 (bias 1): 0, +-1, +-2, +-4
      fp3_er_pos / _neg    base plus +3 / -3
      fp3_ea_pos / _neg    base plus +6 / -6

Each datatype has exactly ``2**bits`` distinct values, one of them 0; with four per family the id
costs 2 bits per group. Groups are grids of the *grouped view* (last dimension = one group sharing
a scale), as in :mod:`bitsmith.formats.integer`.

Scale rule. The paper maps the group's absolute maximum onto the datatype's largest magnitude. An
EA datatype is lopsided (+8 but only -6), so here the element of largest magnitude is mapped onto
the datatype's extreme *on its own side*: ``scale = a / max(values)`` if ``a >= 0`` (ties count
as positive), else ``a / min(values)``. That element is thus never clipped, and EA types pay off
exactly when the long tail is on the side of their special value (the released code divides by
the largest magnitude of either side, which can clip the absmax element itself).

Hardware view. BitMoD's bit-serial PE treats every value, special ones included, in one unified
form ``sign * m * 2**e`` with a small odd integer mantissa ``m`` (1, 3 or 5: 3 bits) and an
exponent ``e``; it multiplies by accumulating the shifted operand over the mantissa bits and then
applies the exponent. :func:`bitmod_dequantize_bitserial` emulates that on the scale and is
bit-exact with the table lookup of :func:`bitmod_dequantize` (each mantissa has at most two set
bits, so shift-and-add rounds once, like the direct product).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import torch

from bitsmith.errors import SpecError
from bitsmith.formats.integer import _store_scale

_BASE = {4: (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0), 3: (1.0, 2.0, 4.0)}
_SPECIAL = {4: {"er": 5.0, "ea": 8.0}, 3: {"er": 3.0, "ea": 6.0}}
DATATYPE_NAMES = {b: tuple(f"fp{b}_{kind}_{side}" for kind in ("er", "ea") for side in ("pos", "neg")) for b in (3, 4)}
ID_BITS = 2  # four datatypes per family: the id stored per group
MANTISSA_BITS = 3  # the widest unified mantissa is 5 = 0b101


@dataclass
class BitMoDCodes:
    """Per-element indices into the chosen datatype, with one scale and one datatype id per group."""

    codes: torch.Tensor  # uint8, grouped shape (..., n): index into the sorted values of the datatype
    scale: torch.Tensor  # float32 values (exactly representable in the storage dtype), shape (..., 1)
    dtype_id: torch.Tensor  # uint8, shape (..., 1): index into datatypes(bits)

    def dequantize(self, bits: int) -> torch.Tensor:
        return bitmod_dequantize(self, bits)


def _check_bits(bits: int) -> None:
    if bits not in _BASE:
        raise SpecError(f"BitMoD bits: {bits!r} is not supported; BitMoD defines 3- and 4-bit datatypes")


def _value_lists(bits: int) -> list[list[float]]:
    _check_bits(bits)
    base = [0.0] + [s * v for v in _BASE[bits] for s in (1.0, -1.0)]
    out = []
    for name in DATATYPE_NAMES[bits]:
        _, kind, side = name.split("_")
        special = _SPECIAL[bits][kind] * (1.0 if side == "pos" else -1.0)
        out.append(sorted(base + [special]))
    return out


def datatypes(bits: int) -> list[torch.Tensor]:
    """The family for ``bits`` (3 or 4), in ``DATATYPE_NAMES`` order: sorted float32 value sets."""
    return [torch.tensor(v, dtype=torch.float32) for v in _value_lists(bits)]


def _table(bits: int, device: torch.device | None = None) -> torch.Tensor:
    """(n_datatypes, 2**bits) value table: row = datatype id, column = code."""
    return torch.tensor(_value_lists(bits), dtype=torch.float32, device=device)


def bitmod_quantize(
    xg: torch.Tensor, bits: int, scale_dtype: torch.dtype = torch.float16, ratios: Sequence[float] = (1.0,)
) -> BitMoDCodes:
    """Quantize each group with every datatype of the family and keep the least squared error.

    Scales follow the module's sign-aware absmax rule and are rounded up to ``scale_dtype``; values
    round to the nearest datatype value (ties towards the lower one). Ties in error keep the
    datatype listed first. ``ratios`` optionally shrinks the mapped extreme (``ratio * a``, a
    clipping search over datatypes and ratios together); the default is the paper's absmax rule.
    """
    table = _table(bits, xg.device)
    x = xg.float()
    hi = x.amax(dim=-1, keepdim=True)
    lo = x.amin(dim=-1, keepdim=True)
    positive = hi >= -lo
    amax = torch.where(positive, hi, -lo)
    best_err = best_codes = best_scale = best_id = None
    for i, ratio, values in ((i, r, v) for r in ratios for i, v in enumerate(table)):
        top = torch.where(positive, values[-1], -values[0])
        scale = _store_scale(amax * ratio / top if ratio != 1.0 else amax / top, scale_dtype)
        codes = torch.bucketize(x / scale, (values[1:] + values[:-1]) / 2)
        err = (values[codes] * scale - x).pow_(2).sum(dim=-1, keepdim=True)
        if best_err is None:
            best_err, best_codes, best_scale = err, codes, scale
            best_id = torch.zeros_like(err, dtype=torch.uint8)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_codes = torch.where(better, codes, best_codes)
        best_scale = torch.where(better, scale, best_scale)
        best_id = torch.where(better, torch.full_like(best_id, i), best_id)
    return BitMoDCodes(best_codes.to(torch.uint8), best_scale, best_id)


def bitmod_dequantize(codes: BitMoDCodes, bits: int) -> torch.Tensor:
    """Direct lookup: ``values[dtype_id][code] * scale`` (float32, grouped shape)."""
    table = _table(bits, codes.codes.device)
    return table[codes.dtype_id.long(), codes.codes.long()] * codes.scale.float()


def _unified(value: float) -> tuple[int, int, int]:
    """``value = sign * m * 2**e`` with ``m`` odd (0, 1, 0 for zero)."""
    if value == 0:
        return 1, 0, 0
    frac = Fraction(abs(value))
    e = 0
    while frac.denominator != 1:
        frac, e = frac * 2, e - 1
    m = frac.numerator
    while m % 2 == 0:
        m, e = m // 2, e + 1
    return (1 if value > 0 else -1), m, e


def unified_tables(bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sign, odd integer mantissa and exponent of every value, each (n_datatypes, 2**bits) int64."""
    parts = [[_unified(v) for v in row] for row in _value_lists(bits)]
    sign, mant, exp = (torch.tensor([[p[k] for p in row] for row in parts]) for k in range(3))
    return sign, mant, exp


def bitmod_dequantize_bitserial(codes: BitMoDCodes, bits: int) -> torch.Tensor:
    """Dequantize as the bit-serial PE does: shift-and-add the scale over the mantissa bits.

    Bit-exact with :func:`bitmod_dequantize`: adding at most two shifted copies of the scale rounds
    once, and the exponent and sign are exact power-of-two and sign changes.
    """
    sign, mant, exp = (t.to(codes.codes.device) for t in unified_tables(bits))
    idx = (codes.dtype_id.long(), codes.codes.long())
    s, m, e = sign[idx], mant[idx], exp[idx]
    scale = codes.scale.float()
    acc = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
    for b in range(MANTISSA_BITS):
        acc = torch.where(((m >> b) & 1).bool(), acc + scale * float(1 << b), acc)
    return s * torch.ldexp(acc, e.float())


def bitmod_bits_per_weight(bits: int, group_size: int, scale_bits: int = 16) -> float:
    """Storage per weight: the code, plus the scale and the datatype id shared by the group."""
    _check_bits(bits)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise SpecError(f"BitMoD group size: {group_size!r} is not a positive integer")
    id_bits = math.ceil(math.log2(len(DATATYPE_NAMES[bits])))
    return bits + (scale_bits + id_bits) / group_size
