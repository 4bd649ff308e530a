import itertools

import pytest
import torch

from bitsmith.errors import SpecError
from bitsmith.formats import integer, packing
from bitsmith.spec import QuantSpec


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("numel", [1, 7, 8, 9, 64, 1000])
def test_pack_roundtrip_exact(bits, numel):
    g = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(0, 1 << bits, (numel,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packing.packed_nbytes(numel, bits) == (numel + 7) // 8 * bits
    assert torch.equal(packing.unpack(packed, bits, numel), codes)


def test_pack_layout_is_little_endian():
    # 4-bit codes 1, 2 -> first byte 0x21 (low nibble first)
    assert packing.pack(torch.tensor([1, 2, 0, 0, 0, 0, 0, 0]), 4)[0].item() == 0x21
    with pytest.raises(ValueError):
        packing.pack(torch.tensor([16]), 4)


def _fp16_up(v: float) -> float:
    """Smallest fp16 value >= v (scales are stored in fp16, rounded up)."""
    h = torch.tensor(max(v, 6.103515625e-05), dtype=torch.float64).half()
    if float(h) < max(v, 6.103515625e-05):
        h = torch.nextafter(h, torch.tensor(float("inf"), dtype=torch.half))
    return float(h)


def _reference_fake_quant(w: torch.Tensor, bits: int, group: int | None, symmetric: bool) -> torch.Tensor:
    """Plain per-row, per-group loop implementation of min-max RTN."""
    out = torch.empty_like(w)
    cols = w.shape[1] if group is None else group
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], cols):
            x = w[r, c0 : c0 + cols].double()
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                s = _fp16_up(max(x.abs().max().item() / qmax, 6.104e-05))
                q = torch.clamp(torch.round(x / s), -qmax - 1, qmax)
                out[r, c0 : c0 + cols] = (q * s).float()
            else:
                lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
                s = _fp16_up((hi - lo) / (2**bits - 1))
                z = min(max(round(-lo / s), 0), 2**bits - 1)
                q = torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1)
                out[r, c0 : c0 + cols] = ((q - z) * s).float()
    return out


@pytest.mark.parametrize("bits, group, symmetric", list(itertools.product([2, 3, 4, 8], [None, 16], [True, False])))
def test_rtn_matches_reference_loop(bits, group, symmetric):
    g = torch.Generator().manual_seed(bits + (group or 0) + symmetric)
    w = torch.randn(6, 48, generator=g) * torch.rand(6, 1, generator=g) * 3
    spec = QuantSpec(bits=bits, granularity="group" if group else "channel", group_size=group, symmetric=symmetric)
    codes = integer.quantize(integer.group_view(w, spec), spec)
    deq = codes.dequantize(spec).reshape(w.shape)
    ref = _reference_fake_quant(w, bits, group, symmetric)
    assert torch.allclose(deq, ref, atol=1e-6, rtol=0)
    assert int(codes.codes.max()) < 2**bits


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_minmax_error_bound(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(32, 128, generator=g)
    spec = QuantSpec(bits=bits, granularity="group", group_size=32, symmetric=symmetric)
    xg = integer.group_view(w, spec)
    codes = integer.quantize(xg, spec)
    err = (codes.dequantize(spec) - xg).abs()
    # every element is within half a step of its grid point (min-max never clips)
    assert (err <= codes.scale / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_search_never_worse_than_minmax(bits):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 256, generator=g)
    w[0, 0] = 12.0  # an outlier makes clipping worthwhile
    errs = {}
    for clip in ("minmax", "mse"):
        spec = QuantSpec(bits=bits, granularity="group", group_size=64, clip=clip)
        xg = integer.group_view(w, spec)
        errs[clip] = (integer.quantize(xg, spec).dequantize(spec) - xg).pow(2).sum(-1)
    assert (errs["mse"] <= errs["minmax"] + 1e-6).all()
    assert errs["mse"].sum() < 0.9 * errs["minmax"].sum()


def test_fake_quantize_per_token_is_idempotent_and_matches_formula():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 32, generator=g)
    for spec in (QuantSpec.parse("int4:token:asym"), QuantSpec.parse("int8:token:sym"), QuantSpec.parse("int4:token:g8")):
        y = integer.fake_quantize(x, spec)
        # re-quantizing a quantized tensor lands on the same grid (to float rounding of the scale)
        assert torch.allclose(integer.fake_quantize(y, spec), y, atol=1e-5, rtol=0)
        assert y.shape == x.shape
    y = integer.fake_quantize(x, QuantSpec.parse("int8:token:sym"))
    s = x.abs().amax(-1, keepdim=True) / 127
    assert torch.allclose(y, torch.round(x / s) * s, atol=1e-6)


def test_group_size_must_divide():
    with pytest.raises(SpecError, match="does not divide"):
        integer.group_view(torch.zeros(4, 576), QuantSpec.parse("int4:g100"))
