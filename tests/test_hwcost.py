"""The first-order MAC area model (bitsmith.eval.hwcost): its formula, by hand, and its errors."""

import math

import pytest

from bitsmith.errors import BitsmithError, SpecError
from bitsmith.eval.hwcost import DEFAULT_TERMS, FP16, MUX2, mac_breakdown, mac_cost, operand, relative_cost
from bitsmith.spec import QuantSpec

G = math.ceil(math.log2(DEFAULT_TERMS))  # accumulator guard bits


def _int(b: int) -> float:
    """Integer MAC by the formula: b*b array cells plus a (2b + G)-bit accumulator."""
    return b * b + 2 * b + G


@pytest.mark.parametrize("bits", range(2, 9))
def test_integer_matches_formula(bits):
    assert mac_cost(f"int{bits}", f"int{bits}:token:asym") == _int(bits)
    parts = mac_breakdown(f"int{bits}:channel", f"int{bits}:token")
    assert parts["exponent"] == parts["shifter"] == parts["rescale"] == 0.0


def test_int8_vs_int4_ratio_is_the_formulas():
    ratio = mac_cost("int8", "int8:token") / mac_cost("int4", "int4:token")
    assert ratio == (64 + 16 + G) / (16 + 8 + G)
    assert mac_cost("int8", "int8:token") == 92.0 and mac_cost("int4", "int4:token") == 36.0  # default 4096 terms
    assert relative_cost("int8", "int8:token") == 1.0


def test_fp_e4m3_by_hand():
    # s = 4 (3 mantissa + hidden), e = 4, span = emax - emin = 8 - (-6) = 14 per operand.
    s, span = 4, 14
    S, P = 2 * span, 2 * s + 1  # shift positions - 1; signed product width
    want = {"multiplier": s * s, "exponent": 4, "shifter": MUX2 * 5 * (P + S), "accumulator": P + S + G}
    got = mac_breakdown("fp8:e4m3:channel", "fp8:e4m3:token")
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert got["total"] == 16 + 4 + 92.5 + 49 == 161.5
    assert got["shift_span"] == 28 and got["product_bits"] == 9 and got["accumulator_bits"] == 49


def test_fp_e2m1_by_hand():
    # s = 2, e = 2, span = 2 - 0 = 2; S = 4 -> 3 shifter stages over P + S = 9 bits.
    got = mac_breakdown("fp4:e2m1", "fp4:e2m1:token")
    assert (got["multiplier"], got["exponent"], got["shifter"], got["accumulator"]) == (4, 2, 13.5, 21)
    assert got["total"] == 40.5


def test_operand_spans():
    assert operand("fp8:e5m2").span == 29  # top exponent reserved (IEEE-like)
    assert operand("fp6:e3m2").span == 6 and operand("fp6:e2m3").span == 2
    assert operand("fp3:e2m0").significand_bits == 1 and operand("fp3:e2m0").span == 2
    e1 = operand("fp5:e1m3")  # E1MY is a uniform grid: no shifter, no exponent adder
    assert e1.span == 0
    assert mac_breakdown("fp5:e1m3", "fp5:e1m3:token")["shifter"] == 0.0
    assert operand(None) == FP16
    assert operand(QuantSpec.parse("int4:g64")) == operand({"format": "int", "bits": 4, "granularity": "group", "group_size": 64})


@pytest.mark.parametrize("family", [
    [f"int{b}" for b in range(2, 9)],
    [f"fp{b}:e2m{b - 3}" for b in range(3, 9)],  # fixed exponent, growing mantissa
    [f"fp{b}:e3m{b - 4}" for b in range(4, 9)],
])
def test_monotonic_in_width(family):
    costs = [mac_cost(s, s + ":token") for s in family]  # W = A
    assert all(x < y for x, y in zip(costs, costs[1:])), costs
    wonly = [mac_cost(s) for s in family]  # weight-only, fp16 activations
    assert all(x < y for x, y in zip(wonly, wonly[1:])), wonly


def test_monotonic_in_each_operand_and_default_splits():
    for b in range(2, 8):
        assert mac_cost(f"int{b}", "int8:token") < mac_cost(f"int{b + 1}", "int8:token")
        assert mac_cost("int8", f"int{b}:token") < mac_cost("int8", f"int{b + 1}:token")
    defaults = [mac_cost(f"fp{b}", f"fp{b}:token") for b in (3, 4, 6, 8)]
    assert all(x < y for x, y in zip(defaults, defaults[1:]))
    # More exponent bits at equal width cost more here (shifter and accumulator grow with 2**e).
    assert mac_cost("fp8:e5m2", "fp8:e5m2:token") > mac_cost("fp8:e4m3", "fp8:e4m3:token")
    assert mac_cost("fp8:e4m3", "fp8:e4m3:token") > mac_cost("int8", "int8:token")


def test_group_rescale_and_terms():
    base = mac_breakdown("int4:channel")
    g64 = mac_breakdown("int4:g64")
    assert g64["rescale"] == pytest.approx(12 * base["accumulator_bits"] / 64)
    assert mac_cost("int4:g32") > mac_cost("int4:g64") > mac_cost("int4:channel")
    assert mac_breakdown("int8", "int8:token:g32")["rescale"] == pytest.approx(12 * 28 / 32)
    assert mac_cost("int8", "int8:token", terms=256) == 64 + 16 + 8
    assert mac_cost("int8", "int8:token", terms=1) == 80


@pytest.mark.parametrize("bad, kind", [
    ("nf4", SpecError), ("mxfp4", SpecError), ("bitmod3:g64", SpecError), ("olive4", SpecError),
    ("int9", SpecError), ("fp5", SpecError), ("fp4:e3m2", SpecError), ("int4:bogus", SpecError), (42, SpecError),
])
def test_bad_specs_are_one_line_errors(bad, kind):
    with pytest.raises(kind) as e:
        mac_cost(bad)
    assert "\n" not in str(e.value) and str(e.value)
    with pytest.raises(kind):
        mac_cost("int8", bad)


@pytest.mark.parametrize("terms", [0, -4, 2.5, True, "4096"])
def test_bad_terms(terms):
    with pytest.raises(BitsmithError, match="terms") as e:
        mac_cost("int8", "int8:token", terms=terms)
    assert "\n" not in str(e.value)
