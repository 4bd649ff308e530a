import math

import pytest
import torch

from bitsmith.errors import SpecError
from bitsmith.formats import blocks


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors here are tiny: intra-op threads only add barrier waits (seconds on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# (element, bits, e, m, emax of the largest normal) from the OCP MX v1.0 tables; INT8 has m = 6
# fraction bits after the binary point.
MX_TABLE = {
    "fp8_e4m3": (8, 4, 3, 8),
    "fp8_e5m2": (8, 5, 2, 15),
    "fp6_e3m2": (6, 3, 2, 4),
    "fp6_e2m3": (6, 2, 3, 2),
    "fp4_e2m1": (4, 2, 1, 2),
    "int8": (8, None, 6, 0),
}
ELEMENTS = list(MX_TABLE)

# QLoRA's published NF4 table (bitsandbytes' NF4 code book)
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def _element_value(element: str, code: int) -> float:
    """Value of one element code, straight from its bits (OCP conventions; E4M3 = E4M3FN)."""
    bits, e, m, _ = MX_TABLE[element]
    if e is None:  # INT8: two's complement with an implicit 2**-6
        return (code - 256 if code >= 128 else code) / 64
    sign = -1.0 if code >> (bits - 1) else 1.0
    ef, man, bias = (code >> m) & ((1 << e) - 1), code & ((1 << m) - 1), 2 ** (e - 1) - 1
    if element == "fp8_e4m3" and ef == 15 and man == 7:
        return math.nan
    if element == "fp8_e5m2" and ef == 31:
        return sign * math.inf if man == 0 else math.nan
    return sign * (man / 2**m * 2.0 ** (1 - bias) if ef == 0 else (1 + man / 2**m) * 2.0 ** (ef - bias))


def _element_grid(element: str) -> list[tuple[float, int]]:
    """(value, code) of every value quantization may produce, ascending.

    Negative zero is left out, and so is INT8's -128 (-2): MXINT8 is clamped to +-(1 + 63/64).
    """
    bits = MX_TABLE[element][0]
    pairs = [(_element_value(element, c), c) for c in range(1 << bits)]
    pairs = [(v, c) for v, c in pairs if math.isfinite(v) and not (v == 0 and c != 0)]
    pairs = [(v, c) for v, c in pairs if not (element == "int8" and c == 0x80)]
    return sorted(pairs)


def _reference_mx(x: torch.Tensor, element: str, block: int) -> tuple[list[int], list[float]]:
    """Spec pseudocode on one row, in Python floats: shared exponent then nearest element value."""
    emax = MX_TABLE[element][3]
    grid = _element_grid(element)
    values = [v for v, _ in grid]
    exps, out = [], []
    for b0 in range(0, x.numel(), block):
        vals = x[b0 : b0 + block].tolist()
        amax = max(abs(v) for v in vals)
        shared = -127 if amax == 0 else max(-127, min(127, math.frexp(amax)[1] - 1 - emax))
        exps.append(shared + 127)
        for v in vals:
            y = min(max(v / 2.0**shared, values[0]), values[-1])  # saturate
            best = min(grid, key=lambda vc: abs(vc[0] - y))[0]  # random data: no ties
            out.append(best * 2.0**shared)
    return exps, out


@pytest.mark.parametrize("element", ELEMENTS)
def test_mx_matches_spec_pseudocode_and_per_element_dequantization(element):
    g = torch.Generator().manual_seed(len(element))
    x = torch.randn(3, 64, generator=g) * torch.exp2(torch.randint(-30, 30, (3, 1), generator=g).float())
    x[2, 32:] = 0.0  # an all-zero block
    q = blocks.mx_quantize(x, element)
    assert q.codes.shape == x.shape and q.codes.dtype == torch.uint8
    assert q.exponents.shape == (3, 2) and q.exponents.dtype == torch.uint8 and q.block == 32
    deq = blocks.mx_dequantize(q, element)
    assert deq.dtype == torch.float32 and deq.shape == x.shape
    for r in range(3):
        exps, ref = _reference_mx(x[r].double(), element, 32)
        assert q.exponents[r].tolist() == exps
        assert deq[r].tolist() == ref
        # dequantization element by element: element value times 2**(E - 127)
        manual = [
            _element_value(element, int(q.codes[r, i])) * 2.0 ** (int(q.exponents[r, i // 32]) - 127)
            for i in range(64)
        ]
        assert deq[r].tolist() == manual
    assert q.exponents[2, 1].item() == 0 and torch.equal(deq[2, 32:], torch.zeros(32))
    assert torch.equal(blocks.mx_fake_quantize(x, element), deq)


@pytest.mark.parametrize("element", ELEMENTS)
def test_mx_scale_is_power_of_two_and_saturation_is_bounded(element):
    g = torch.Generator().manual_seed(11)
    block_scale = torch.exp2(torch.randint(-12, 12, (64, 4, 1), generator=g).float())
    x = (torch.randn(64, 4, 32, generator=g) * block_scale).reshape(64, 128)
    q = blocks.mx_quantize(x, element)
    scale = blocks.e8m0_to_scale(q.exponents)
    mant, _ = torch.frexp(scale)
    assert (mant == 0.5).all()  # exact powers of two
    emax = MX_TABLE[element][3]
    y = x.reshape(64, 4, 32) / scale[..., None]
    # the block absmax lands in [2**emax, 2**(emax+1)): nothing is scaled past that binade
    amax = y.abs().amax(-1)
    assert (amax >= 2.0**emax).all() and (amax < 2.0 ** (emax + 1)).all()
    deq = blocks.mx_dequantize(q, element).reshape(64, 4, 32) / scale[..., None]
    top = max(v for v, _ in _element_grid(element))
    assert deq.abs().max().item() <= top
    # only elements beyond the element format's largest value are clipped, and only to it
    clipped = y.abs() > top
    assert torch.equal(deq[clipped].abs(), torch.full_like(deq[clipped], top))
    fmt = blocks.MX_ELEMENTS[element]
    if fmt is not None:
        assert not torch.isnan(fmt.decode(q.codes)).any()
    else:
        assert not (q.codes == 0x80).any()
        minus_two = blocks.MXCodes(torch.full((1, 32), 0x80, dtype=torch.uint8), torch.full((1, 1), 127, dtype=torch.uint8))
        assert blocks.mx_dequantize(minus_two, element).eq(-2).all()  # decodable, never produced


ERROR_BOUNDS = {"fp8_e4m3": 0.04, "fp8_e5m2": 0.07, "fp6_e3m2": 0.07, "fp6_e2m3": 0.04, "fp4_e2m1": 0.15, "int8": 0.012}


@pytest.mark.parametrize("element, bound", ERROR_BOUNDS.items())
def test_mx_random_error_is_small(element, bound):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(128, 256, generator=g)
    y = blocks.mx_fake_quantize(x, element)
    rel = ((y - x).norm() / x.norm()).item()
    assert 0 < rel < bound
    # fake quantization is idempotent: the grid maps onto itself
    assert torch.equal(blocks.mx_fake_quantize(y, element), y)


@pytest.mark.parametrize("element", ELEMENTS)
def test_mx_codes_round_trip(element):
    """Quantizing a dequantized tensor gives back the same codes and exponents."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 96, generator=g) * 3
    q = blocks.mx_quantize(x, element)
    q2 = blocks.mx_quantize(blocks.mx_dequantize(q, element), element)
    assert torch.equal(q2.exponents, q.exponents)
    assert torch.equal(q2.codes, q.codes)  # negative zero included: -0.0 * scale stays -0.0
    assert torch.equal(blocks.mx_dequantize(q2, element), blocks.mx_dequantize(q, element))


def test_mx_bits_per_element_and_names():
    assert blocks.mx_bits_per_element("fp8_e4m3") == 8.25
    assert blocks.mx_bits_per_element("fp6_e3m2", 32) == 6.25
    assert blocks.mx_bits_per_element("fp4_e2m1") == 4.25
    assert blocks.mx_bits_per_element("int8", 16) == 8.5
    for element, (bits, *_rest) in MX_TABLE.items():
        assert blocks.mx_bits_per_element(element, 64) == bits + 0.125
        q = blocks.mx_quantize(torch.randn(2, 128), element, 64)
        assert (q.codes.numel() * bits + q.exponents.numel() * 8) / q.codes.numel() == bits + 0.125
        assert blocks.mx_emax(element) == MX_TABLE[element][3]
    assert blocks.mx_element("MXFP8_E4M3") == "fp8_e4m3" and blocks.mx_element("e2m1") == "fp4_e2m1"
    assert blocks.mx_element("mxint8") == "int8" and blocks.mx_element("fp4") == "fp4_e2m1"
    with pytest.raises(SpecError, match="unknown"):
        blocks.mx_element("fp5")


def test_mx_block_must_divide_and_special_blocks():
    with pytest.raises(SpecError, match="does not divide the last dimension 48"):
        blocks.mx_quantize(torch.zeros(2, 48), "fp8_e4m3")
    with pytest.raises(SpecError, match="not a positive integer"):
        blocks.mx_quantize(torch.zeros(2, 64), "fp8_e4m3", 0)
    with pytest.raises(SpecError):
        blocks.nf4_quantize(torch.zeros(3, 100))
    x = torch.zeros(3, 32)
    x[1, 3] = math.nan
    x[2, 0] = math.inf
    for element in ELEMENTS:
        q = blocks.mx_quantize(x, element)
        assert q.exponents[:, 0].tolist() == [0, 255, 255]
        deq = blocks.mx_dequantize(q, element)
        assert torch.equal(deq[0], torch.zeros(32)) and torch.isnan(deq[1:]).all()
    # tiny and huge blocks clamp the shared exponent to the E8M0 range
    t = torch.tensor([[1e-45] * 32, [1e38] * 32])
    q = blocks.mx_quantize(t, "fp4_e2m1")
    assert q.exponents[:, 0].tolist() == [0, 127 + 126 - 2]
    assert blocks.mx_quantize(torch.full((1, 32), 1e300, dtype=torch.float64), "int8").exponents.item() == 254


def test_mx_dtypes():
    x = torch.randn(4, 64)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        y = blocks.mx_fake_quantize(x.to(dtype), "fp8_e4m3")
        assert y.dtype == dtype
        assert torch.allclose(y.float(), blocks.mx_fake_quantize(x.to(dtype).float(), "fp8_e4m3"))


def test_nf4_levels_match_qlora():
    levels = blocks.nf4_levels()
    assert levels.dtype == torch.float32 and levels.shape == (16,)
    assert torch.allclose(levels.double(), torch.tensor(NF4_PUBLISHED, dtype=torch.float64), atol=1e-4, rtol=0)
    assert levels[7].item() == 0 and levels[0].item() == -1 and levels[15].item() == 1
    assert (levels[1:] > levels[:-1]).all()


def test_nf4_nearest_level_and_per_element_dequantization():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 128, generator=g) * 2
    x[3, 64:] = 0
    codes, absmax = blocks.nf4_quantize(x)
    assert codes.shape == x.shape and codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert absmax.shape == (4, 2) and absmax.dtype == torch.float32
    assert torch.equal(absmax, x.reshape(4, 2, 64).abs().amax(-1))
    deq = blocks.nf4_dequantize(codes, absmax)
    for r in range(4):
        for i in range(128):
            a = absmax[r, i // 64].item()
            assert deq[r, i].item() == pytest.approx(NF4_PUBLISHED[int(codes[r, i])] * a, abs=1e-4 * a + 1e-12)
            if a:  # nearest level to the normalized value (brute force)
                v = x[r, i].item() / a
                dist = [abs(v - lv) for lv in blocks.nf4_levels().tolist()]
                assert abs(dist[int(codes[r, i])] - min(dist)) < 1e-6
    assert torch.equal(deq[3, 64:], torch.zeros(64)) and (codes[3, 64:] == 7).all()
    # block extremes are kept exactly
    assert torch.equal(deq.reshape(4, 2, 64).abs().amax(-1), absmax)


def test_nf4_round_trip_and_error():
    levels = blocks.nf4_levels()
    codes = torch.arange(16, dtype=torch.uint8).repeat(2, 4)  # each block holds every level
    absmax = torch.tensor([[1.0], [0.25]])
    deq = blocks.nf4_dequantize(codes, absmax)
    assert torch.equal(deq[0], levels.repeat(4)) and torch.equal(deq[1], levels.repeat(4) * 0.25)
    c2, a2 = blocks.nf4_quantize(deq, block=64)
    assert torch.equal(c2, codes) and torch.equal(a2, absmax)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=g)
    y = blocks.nf4_fake_quantize(x)
    assert y.dtype == x.dtype and 0 < ((y - x).norm() / x.norm()).item() < 0.12
    assert blocks.nf4_fake_quantize(x.half(), 32).dtype == torch.float16
    with pytest.raises(ValueError):
        blocks.nf4_dequantize(codes, torch.ones(2, 3))
