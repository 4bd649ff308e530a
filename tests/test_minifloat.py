import math

import pytest
import torch

from bitsmith.errors import SpecError
from bitsmith.formats import minifloat as mf
from bitsmith.formats.minifloat import Minifloat


def _all_formats() -> list[Minifloat]:
    """Every (e, m) split of 3..8 bits, with every special-value convention that applies."""
    out = []
    for bits in range(3, 9):
        for e in range(1, bits):
            for special in ("ieee", "fn", "none"):
                if special == "ieee" and e < 2:
                    continue
                out.append(Minifloat(e, bits - 1 - e, special))
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: intra-op threads only add barrier waits (seconds on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ALL = _all_formats()
PRESETS = [mf.FP8_E4M3, mf.FP8_E5M2, mf.FP6_E3M2, mf.FP6_E2M3, mf.FP4_E2M1]


def _ref_value(fmt: Minifloat, code: int) -> float:
    """Value of a code straight from its bit fields: (-1)^s * 2^(E-bias) * 1.M, or 0.M * 2^(1-bias)."""
    e, m = fmt.exponent_bits, fmt.mantissa_bits
    sign = -1.0 if (code >> (e + m)) & 1 else 1.0
    exp_field = (code >> m) & ((1 << e) - 1)
    man = code & ((1 << m) - 1)
    bias = 2 ** (e - 1) - 1
    frac = man / 2**m
    if exp_field == 2**e - 1:
        if fmt.special == "ieee":
            return sign * math.inf if man == 0 else math.nan
        if fmt.special == "fn" and man == 2**m - 1:
            return math.nan
    if exp_field == 0:
        return sign * frac * 2.0 ** (1 - bias)
    return sign * (1.0 + frac) * 2.0 ** (exp_field - bias)


def _finite_ref(fmt: Minifloat) -> list[float]:
    half = 1 << (fmt.bits - 1)
    return [v for v in (_ref_value(fmt, c) for c in range(half)) if math.isfinite(v)]


def _nearest_ref(fmt: Minifloat, x: torch.Tensor) -> torch.Tensor:
    """Brute-force nearest representable value by searching the reference table (float64)."""
    mags = torch.tensor(_finite_ref(fmt), dtype=torch.float64)
    a = x.double().abs().clamp_max(mags[-1].item())
    hi = torch.searchsorted(mags, a).clamp_max(mags.numel() - 1)  # first value >= a
    lo = (hi - 1).clamp_min(0)
    assert ((a - mags[lo]) != (mags[hi] - a)).all() or (a == mags[hi]).all(), "random input hit a tie"
    best = torch.where(a - mags[lo] < mags[hi] - a, mags[lo], mags[hi])
    return torch.copysign(best, x.double())


def _fmt_id(fmt: Minifloat) -> str:
    return f"e{fmt.exponent_bits}m{fmt.mantissa_bits}-{fmt.special}"


@pytest.mark.parametrize("fmt", ALL, ids=_fmt_id)
def test_decode_matches_bit_fields(fmt):
    codes = torch.arange(1 << fmt.bits, dtype=torch.uint8)
    got = fmt.decode(codes)
    assert got.dtype == torch.float32
    ref = torch.tensor([_ref_value(fmt, c) for c in range(1 << fmt.bits)], dtype=torch.float32)
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    # the sign bit alone is negative zero
    assert torch.signbit(fmt.decode(torch.tensor([1 << (fmt.bits - 1)], dtype=torch.uint8))).item()


@pytest.mark.parametrize("fmt", ALL, ids=_fmt_id)
def test_magnitudes_and_constants(fmt):
    mags = fmt.magnitudes()
    assert mags.dtype == torch.float64
    assert mags.tolist() == _finite_ref(fmt)
    assert (mags[1:] > mags[:-1]).all()
    assert fmt.bias == 2 ** (fmt.exponent_bits - 1) - 1
    assert fmt.max_value == mags[-1].item()
    assert fmt.min_subnormal == mags[1].item()
    assert fmt.min_normal == _ref_value(fmt, 1 << fmt.mantissa_bits)
    assert 2.0**fmt.emax <= fmt.max_value < 2.0 ** (fmt.emax + 1)


def test_known_values():
    assert mf.FP8_E4M3.max_value == 448 and mf.FP8_E4M3.min_subnormal == 2.0**-9
    assert mf.FP8_E4M3.min_normal == 2.0**-6 and mf.FP8_E4M3.emax == 8
    assert mf.FP8_E5M2.max_value == 57344 and mf.FP8_E5M2.min_subnormal == 2.0**-16 and mf.FP8_E5M2.emax == 15
    assert mf.FP4_E2M1.magnitudes().tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert mf.FP6_E3M2.max_value == 28 and mf.FP6_E3M2.min_subnormal == 0.0625
    assert mf.FP6_E2M3.max_value == 7.5 and mf.FP6_E2M3.min_subnormal == 0.125
    assert [f.bits for f in PRESETS] == [8, 8, 6, 6, 4]
    # E4M3FN: 0x7F/0xFF are the only NaNs, 0x7E is 448; E5M2: 0x7C is inf, 0x7D..0x7F NaN
    dec = mf.FP8_E4M3.decode(torch.tensor([0x7E, 0x7F, 0xFF, 0x78], dtype=torch.uint8)).tolist()
    assert dec[0] == 448 and math.isnan(dec[1]) and math.isnan(dec[2]) and dec[3] == 256
    dec = mf.FP8_E5M2.decode(torch.tensor([0x7B, 0x7C, 0xFC, 0x7D], dtype=torch.uint8)).tolist()
    assert dec[:3] == [57344, math.inf, -math.inf] and math.isnan(dec[3])


@pytest.mark.parametrize("fmt", ALL, ids=_fmt_id)
def test_round_is_nearest_on_dense_random_inputs(fmt):
    g = torch.Generator().manual_seed(fmt.bits * 100 + fmt.exponent_bits * 3 + len(fmt.special))
    n = 3000
    lo, hi = math.log2(fmt.min_subnormal) - 3, math.log2(fmt.max_value) + 3
    logs = torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo
    lin = torch.rand(n, generator=g, dtype=torch.float64) * fmt.max_value * 1.1
    x = torch.cat([torch.exp2(logs), lin])
    x = x * torch.where(torch.rand(2 * n, generator=g) < 0.5, -1.0, 1.0).double()
    for dtype in (torch.float32, torch.float64):
        xt = x.to(dtype)
        got = fmt.round(xt)
        assert got.dtype == dtype
        assert torch.equal(got.double(), _nearest_ref(fmt, xt))


@pytest.mark.parametrize("fmt", ALL, ids=_fmt_id)
def test_round_midpoints_tie_to_even_code(fmt):
    mags = torch.tensor(_finite_ref(fmt), dtype=torch.float64)
    mids = (mags[:-1] + mags[1:]) / 2
    i = torch.arange(mids.numel())
    expect = torch.where(i % 2 == 0, mags[:-1], mags[1:])  # the even magnitude code of the pair
    for dtype in (torch.float32, torch.float64):
        m = mids.to(dtype)
        assert torch.equal(m.double(), mids)  # midpoints are exact in both dtypes
        assert torch.equal(fmt.round(m).double(), expect)
        assert torch.equal(fmt.round(-m).double(), -expect)
        below = torch.nextafter(m, torch.zeros_like(m))
        above = torch.nextafter(m, torch.full_like(m, math.inf))
        assert torch.equal(fmt.round(below).double(), mags[:-1])
        assert torch.equal(fmt.round(above).double(), mags[1:])


@pytest.mark.parametrize("fmt", ALL, ids=_fmt_id)
def test_round_saturates_and_keeps_nan(fmt):
    mx = fmt.max_value
    x = torch.tensor([mx, mx * 1.01, mx * 1.5, mx * 4, 3e38, math.inf, -mx * 2, -math.inf, math.nan])
    got = fmt.round(x)
    assert got[:6].tolist() == [mx] * 6 and got[6:8].tolist() == [-mx, -mx]
    assert math.isnan(got[8].item())
    assert fmt.round(torch.tensor([1e300], dtype=torch.float64)).item() == mx
    assert fmt.decode(fmt.encode(x[:-1])).abs().max().item() == mx
    # the representable set is closed under round (idempotent)
    mags = fmt.magnitudes()
    assert torch.equal(fmt.round(mags), mags) and torch.equal(fmt.round(-mags), -mags)


@pytest.mark.parametrize("fmt", ALL, ids=_fmt_id)
def test_encode_decode_roundtrip(fmt):
    half = 1 << (fmt.bits - 1)
    finite = [c for s in (0, half) for c in range(s, s + fmt.num_finite)]
    codes = torch.tensor(finite, dtype=torch.uint8)
    vals = fmt.decode(codes)
    assert torch.equal(fmt.encode(vals), codes)  # negative zero keeps its sign bit
    assert torch.equal(fmt.encode(vals.double()), codes)
    g = torch.Generator().manual_seed(fmt.bits + 17 * fmt.exponent_bits)
    x = torch.randn(2000, generator=g) * fmt.max_value / 3
    x[:5] = torch.tensor([0.0, -0.0, fmt.min_subnormal / 3, -fmt.min_subnormal / 3, fmt.min_normal])
    c = fmt.encode(x)
    assert c.dtype == torch.uint8 and int(c.max()) < 1 << fmt.bits
    r = fmt.round(x)
    assert torch.equal(fmt.decode(c), r) and torch.equal(torch.signbit(fmt.decode(c)), torch.signbit(r))


def test_nan_handling():
    for fmt in (mf.FP8_E4M3, mf.FP8_E5M2):
        codes = fmt.encode(torch.tensor([math.nan, -math.nan, 1.0]))
        assert torch.isnan(fmt.decode(codes[:2])).all() and fmt.decode(codes[2:]).item() == 1.0
        assert int(codes[0]) == 0x7F
    assert int(mf.FP8_E4M3.encode(torch.tensor([math.nan]))) == 0x7F
    for fmt in (mf.FP6_E3M2, mf.FP6_E2M3, mf.FP4_E2M1):
        assert fmt.nan_code is None
        assert math.isnan(fmt.round(torch.tensor([math.nan])).item())
        with pytest.raises(ValueError, match="no NaN"):
            fmt.encode(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="out of range"):
        mf.FP4_E2M1.decode(torch.tensor([16], dtype=torch.uint8))


def test_round_matches_torch_float8_casts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g) * torch.exp2(torch.randint(-20, 12, (100_000,), generator=g).float())
    for fmt, dtype in ((mf.FP8_E4M3, torch.float8_e4m3fn), (mf.FP8_E5M2, torch.float8_e5m2)):
        xs = x.clamp(-fmt.max_value, fmt.max_value)  # torch casts do not saturate
        assert torch.equal(fmt.round(xs), xs.to(dtype).float())


def test_round_keeps_dtype_and_avoids_double_rounding():
    x = torch.tensor([0.3, -1.7, 5.0, 100.0])
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        got = mf.FP8_E4M3.round(x.to(dtype))
        assert got.dtype == dtype and got.float().tolist() == [0.3125, -1.75, 5.0, 96.0]
    # just above the 1 | 1.125 midpoint: float64 input must not be rounded to float32 first
    v = torch.tensor([1.0625 + 2.0**-40], dtype=torch.float64)
    assert mf.FP8_E4M3.round(v).item() == 1.125
    assert mf.FP8_E4M3.round(v.float()).item() == 1.0  # in float32 it is the tie itself


def test_names_and_validation():
    assert mf.minifloat("e4m3") is mf.FP8_E4M3 and mf.minifloat("E5M2") is mf.FP8_E5M2
    assert mf.minifloat("e3m2") == mf.FP6_E3M2 and mf.minifloat("e2m3") == mf.FP6_E2M3
    assert mf.minifloat(" e2m1 ") == mf.FP4_E2M1
    assert mf.minifloat("e3m4") == Minifloat(3, 4, "none")
    assert str(mf.FP8_E4M3) == "e4m3fn" and str(mf.FP6_E3M2) == "e3m2"
    for bad in ("fp8", "e4", "e0m3", "e4m4", "e1m0", ""):
        with pytest.raises(SpecError):
            mf.minifloat(bad)
    bad_args = [(0, 3, "none"), (4, 4, "none"), (1, 0, "none"), (2, 1, "nan"), (1, 2, "ieee"), (2, -1, "none"), (2.0, 1, "none")]
    for args in bad_args:
        with pytest.raises(SpecError) as info:
            Minifloat(*args)
        assert "\n" not in str(info.value)


def test_absmax_scale_and_fake_quantize():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 32, generator=g)
    x[1, 2] = 0.0
    for fmt in PRESETS:
        s = mf.absmax_scale(x, fmt)
        assert s.shape == (3, 4, 1) and (s > 0).all()
        y = mf.fake_quantize_minifloat(x, fmt, s)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.equal(y, fmt.round(x / s) * s)
        assert torch.equal(y[1, 2], torch.zeros(32))
        # the absmax of each group lands on +-max_value, so it is kept (to float rounding)
        amax = x.abs().amax(-1)
        assert torch.allclose(y.abs().amax(-1), amax, rtol=1e-6)
    y16 = mf.fake_quantize_minifloat(x.half(), mf.FP8_E4M3, mf.absmax_scale(x.half(), mf.FP8_E4M3))
    assert y16.dtype == torch.float16
