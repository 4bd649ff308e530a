"""Hardware cost of one multiply-accumulate (MAC) for integer and minifloat operands: a first-order area model.

The minifloat design-space study ("Post-Training Quantization with Low-precision Minifloats and
Integers on FPGAs", arXiv 2311.12359) weighs each format's accuracy against the hardware cost of
its MAC unit, which it takes from an FPGA resource (LUT) model, and finds integers often
Pareto-optimal. This module is a first-order analogue for any width pair, counted in *full-adder
(FA) cell equivalents* instead of LUTs. It decomposes a MAC the same way (significand multiplier,
exponent adder, alignment into a wide fixed-point accumulator) but its figures are estimates of
relative silicon area, not the paper's numbers, and not a synthesis result.

Each operand (weight or activation) is described by its significand width ``s``, its exponent
width ``e`` and the number of binades its values span, ``span``:

* ``int<b>``: ``s = b`` (two's complement), ``e = 0``, ``span = 0``: a plain fixed-point number.
* ``fp<b>:eXmY``: ``s = Y + 1`` (the hidden bit; subnormals reuse the same array), ``e = X``,
  ``span = emax - emin`` with ``emin = 1 - bias``: the positions the significand can be shifted
  to, less one (E4M3FN: 8 - (-6) = 14; E2M1: 2 - 0 = 2; E5M2, whose top exponent is reserved:
  15 - (-14) = 29; any E1MY: 0, since E1MY is an integer grid).
* ``None`` (no quantization, e.g. the activations of a weight-only scheme): fp16 E5M10,
  ``s = 11``, ``e = 5``, ``span = 29``.

For a weight ``w`` and an activation ``a``, with ``S = span_w + span_a`` and the signed product
width ``P = s_w + s_a + [either operand is sign-magnitude, i.e. a float]``, the cost is

    multiplier    s_w * s_a                      array multiplier: one AND + FA cell per partial-product bit
                                                 (Baugh-Wooley for two's complement, Baugh & Wooley 1973)
    exponent add  max(e_w, e_a) if both spans > 0, else 0
                                                 ripple-carry adder of the two exponents (one exponent
                                                 alone drives the shifter directly)
    shifter       MUX2 * ceil(log2(S + 1)) * (P + S)
                                                 logarithmic barrel shifter aligning the product into the
                                                 accumulator; a 2:1 mux counts MUX2 = 0.5 FA (about 12 vs 28
                                                 transistors in static CMOS, Weste & Harris, CMOS VLSI Design)
    accumulator   A = P + S + ceil(log2 terms)   Kulisch-style exact fixed-point accumulator (U. Kulisch,
                                                 Computer Arithmetic and Validity, 2008): wide enough for
                                                 every product of the two formats and ``terms`` of them
                                                 summed without overflow; a ripple-carry adder of A cells
    group rescale (FP16_SIGNIFICAND + 1) * A / g when a scale changes every ``g`` elements along the
                                                 reduction (weights ``g<N>``, activations ``token:g<N>``):
                                                 the partial sum is multiplied by the fp16 scale and added
                                                 to an outer accumulator once per group (smallest g of the two)

Integers therefore cost ``b_w * b_a + b_w + b_a + ceil(log2 terms)``: int8 x int8 is 92 cells and
int4 x int4 36 for the default 4096 terms (ratio 23/9). Minifloats trade multiplier cells for
the shifter and a wider accumulator: E4M3 x E4M3 is 16 + 4 + 92.5 + 49 = 161.5, E2M1 x E2M1 is
4 + 2 + 13.5 + 21 = 40.5.

Not counted (stated so the comparison stays honest): registers and pipelining (they depend on the
clock target), the sign XOR and the conditional negation of sign-magnitude products (a row of XOR
gates and the adder's carry-in), zero points (a per-output correction ``z * sum(w)``), per-channel
and per-token scales (applied once per dot product), normalisation and rounding (none with exact
accumulation), control, and above all memory and data movement, which dominate energy per
operation (M. Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014,
whose 45 nm figures also show multiplier cost growing about quadratically with width, as the
array term here does). Use the model to rank formats at equal width and to draw accuracy-vs-cost
fronts, not to predict a chip's area.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from bitsmith.errors import BitsmithError, SpecError
from bitsmith.spec import QuantSpec

MUX2 = 0.5  # a 2:1 multiplexer in full-adder cell equivalents
FP16_SIGNIFICAND = 11  # fp16 scales: 10 mantissa bits + the hidden bit
DEFAULT_TERMS = 4096  # products summed into one accumulator (a dot product of 4096: 12 guard bits)

SpecLike = QuantSpec | str | Mapping[str, Any] | None


@dataclass(frozen=True)
class Operand:
    """What the MAC datapath sees of one operand's number format."""

    name: str
    significand_bits: int  # width entering the multiplier array (hidden bit included for floats)
    exponent_bits: int  # 0 for integers
    span: int  # binades the values span beyond the first: shift positions - 1 (0 for integers)
    sign_magnitude: bool  # floats carry a separate sign; integers are two's complement
    group_size: int | None = None  # a scale changes every group_size elements along the reduction


FP16 = Operand("fp16", FP16_SIGNIFICAND, 5, 29, True)


def operand(spec: SpecLike) -> Operand:
    """The datapath view of a spec (``None``: an fp16 operand, i.e. not quantized)."""
    if spec is None:
        return FP16
    q = QuantSpec.coerce(spec)
    if q.format == "int":
        return Operand(str(q), q.bits, 0, 0, False, _reduction_group(q))
    if q.format == "fp":
        from bitsmith.formats.minifloat import minifloat

        fmt = minifloat(q.element)
        span = fmt.emax - (1 - fmt.bias)
        return Operand(str(q), fmt.mantissa_bits + 1, fmt.exponent_bits, span, True, _reduction_group(q))
    raise SpecError(f"hwcost: no MAC model for '{q}' (format {q.format!r}); the model covers int<b> and fp<b>:eXmY specs")


def _reduction_group(q: QuantSpec) -> int | None:
    """Group size along the reduced dimension, or None when the scale is constant over a dot product."""
    if q.granularity == "ic":  # per-IC weights: the scale changes with every input column
        return 1
    if q.granularity == "group" or (q.granularity in ("token", "head") and q.group_size is not None):
        return q.group_size
    return None


def _check_terms(terms: int) -> int:
    if isinstance(terms, bool) or not isinstance(terms, int) or terms < 1:
        raise BitsmithError(f"hwcost: terms (products summed per accumulator) must be a positive integer, got {terms!r}")
    return terms


def mac_breakdown(weight_spec: SpecLike, act_spec: SpecLike = None, terms: int = DEFAULT_TERMS) -> dict[str, float]:
    """Cost of one weight x activation MAC by part, in full-adder cells (see the module docstring).

    Keys: ``multiplier``, ``exponent``, ``shifter``, ``accumulator``, ``rescale``, ``total``, and the
    widths behind them: ``product_bits`` (P), ``shift_span`` (S), ``accumulator_bits`` (A).
    """
    w, a = operand(weight_spec), operand(act_spec)
    guard = math.ceil(math.log2(_check_terms(terms)))
    shift = w.span + a.span
    product = w.significand_bits + a.significand_bits + (1 if (w.sign_magnitude or a.sign_magnitude) else 0)
    acc_bits = product + shift + guard
    multiplier = float(w.significand_bits * a.significand_bits)
    exponent = float(max(w.exponent_bits, a.exponent_bits)) if (w.span and a.span) else 0.0
    shifter = MUX2 * shift.bit_length() * (product + shift)  # bit_length(S) = ceil(log2(S + 1))
    groups = [g for g in (w.group_size, a.group_size) if g]
    rescale = (FP16_SIGNIFICAND + 1) * acc_bits / min(groups) if groups else 0.0
    total = multiplier + exponent + shifter + acc_bits + rescale
    return {"multiplier": multiplier, "exponent": exponent, "shifter": shifter, "accumulator": float(acc_bits),
            "rescale": rescale, "total": total, "product_bits": product, "shift_span": shift, "accumulator_bits": acc_bits}


def mac_cost(weight_spec: SpecLike, act_spec: SpecLike = None, terms: int = DEFAULT_TERMS) -> float:
    """Area of one weight x activation MAC in full-adder cells (``act_spec=None``: fp16 activations)."""
    return mac_breakdown(weight_spec, act_spec, terms)["total"]


def relative_cost(weight_spec: SpecLike, act_spec: SpecLike = None, terms: int = DEFAULT_TERMS) -> float:
    """``mac_cost`` as a multiple of an int8 x int8 MAC with the same ``terms``."""
    return mac_cost(weight_spec, act_spec, terms) / mac_cost("int8:channel", "int8:token", terms)
