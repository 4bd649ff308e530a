"""GGUF block types: bytes against gguf-py (llama.cpp's Python twin), specs, GPTQ on the exact grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitsmith.errors import SpecError
from bitsmith.formats import gguf_blocks as gb
from bitsmith.formats.registry import number_format, stored_bits
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import GGUF_TYPES, QuantSpec

gguf = pytest.importorskip("gguf")
LEGACY = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def _weights(rows: int = 24, cols: int = 512, seed: int = 0) -> torch.Tensor:
    """Rows of different scales, heavy tails, an all-zero block, a constant block and exact ties."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 0.1
    w[1] = torch.distributions.StudentT(2.0).sample((cols,)) * 0.01
    w[2, :256] = 0.0
    w[3, :32] = 0.25
    w[4] = torch.round(w[4] * 64) / 64  # many exact multiples: rounding ties
    return w


def _ggml(name: str):
    return gguf.GGMLQuantizationType(gb.TYPES[name].ggml_id)


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_bytes_equal_gguf_reference_quantizer(name):
    w = _weights()
    spec = QuantSpec.parse(name)
    packed = PackedWeight.quantize(w, spec)
    ours = packed.data["qblocks"].numpy()
    ref = gguf.quants.quantize(w.numpy(), _ggml(name))
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_our_bytes_decode_in_gguf_to_our_values(name):
    w = _weights(seed=1)
    spec = QuantSpec.parse(name)
    packed = PackedWeight.quantize(w, spec)
    theirs = gguf.quants.dequantize(packed.data["qblocks"].numpy(), _ggml(name))
    ours = packed.dequantize().numpy()
    assert np.array_equal(theirs, ours)  # exact: same bytes, same float operations
    # round trip through pack/unpack and the stored size
    again = PackedWeight.from_tensors(spec, tuple(w.shape), packed.tensors()).dequantize()
    assert torch.equal(again, packed.dequantize())
    t = gb.TYPES[name]
    assert stored_bits(spec, tuple(w.shape)) == packed.nbits() == w.numel() // t.block * t.type_size * 8


@pytest.mark.parametrize("name", ("q4_k", "q6_k"))
def test_k_quant_pack_unpack_every_code_and_scale(name):
    """Every code value and every sub-block scale/min bit pattern survives pack -> bytes -> unpack."""
    t = gb.TYPES[name]
    g = torch.Generator().manual_seed(3)
    nb = 8
    codes = torch.randint(0, t.levels, (nb, t.block), generator=g).to(torch.uint8)
    d = torch.rand(nb, 1, generator=g).half().float()
    if name == "q4_k":
        sc = torch.arange(64).reshape(8, 8).float()
        c = gb.GGUFCodes(codes, d, torch.rand(nb, 1, generator=g).half().float(), sc, sc.flip(0))
    else:
        c = gb.GGUFCodes(codes, d, None, (torch.arange(128).reshape(8, 16) - 64).float())
    back = gb.unpack(gb.pack(c, t), t)
    for field in ("codes", "d", "m", "sc", "mn"):
        a, b = getattr(c, field), getattr(back, field)
        assert (a is None and b is None) or torch.equal(a.float(), b.float()), field


@pytest.mark.parametrize("name, worse", [("q4_k", "q4_0"), ("q6_k", "q5_1")])
def test_k_quant_search_beats_simpler_types(name, worse):
    """The K-quant scale search earns its bits: Q4_K (4.5 bpw) has lower error than Q4_0 (4.5 bpw)
    and Q6_K (6.56 bpw) lower than Q5_1 (6 bpw), on Gaussian rows; and the search beats the plain
    min-max / absmax grid of the same stored layout."""
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(4)) * 0.02
    err = {}
    for n in (name, worse):
        spec = QuantSpec.parse(n)
        err[n] = (PackedWeight.quantize(w, spec).dequantize() - w).pow(2).mean().item()
    assert err[name] < err[worse]
    t = gb.TYPES[name]
    steps = torch.tensor([15.0]) if name == "q4_k" else torch.tensor([32.0])
    xs = w.reshape(64, -1, t.sub)
    if name == "q4_k":
        s, o = gb._fit_affine(xs, steps, 15)
        q = torch.round((xs - o) / s).clamp(0, 15)
        plain = (s * q + o - xs).pow(2).mean().item()
        s2, o2 = gb._fit_affine(xs, gb._Q4K_STEPS, 15)
        searched = (s2 * torch.round((xs - o2) / s2).clamp(0, 15) + o2 - xs).pow(2).mean().item()
    else:
        s = gb._fit_symmetric(xs, steps, 32)
        plain = (s * (torch.round(xs / s).clamp(-32, 31)) - xs).pow(2).mean().item()
        s2 = gb._fit_symmetric(xs, gb._Q6K_LEVELS, 32)
        searched = (s2 * (torch.round(xs / s2).clamp(-32, 31)) - xs).pow(2).mean().item()
    assert searched <= plain


def test_specs_parse_print_and_refuse():
    for name in GGUF_TYPES:
        spec = QuantSpec.parse(name)
        assert str(spec) == name and QuantSpec.parse(str(spec)) == spec == QuantSpec.from_dict(spec.to_dict())
        assert spec.group_size == gb.TYPES[name].block
    assert QuantSpec.parse("q4_1").symmetric is False and QuantSpec.parse("q4_0").symmetric is True
    for bad, words in [("q4_0:g64", "blocks are 32 elements by the GGUF spec"), ("q4_1:sym", "drop 'sym'"),
                       ("q4_0:asym", "drop 'asym'"), ("q4_0:mse", "llama.cpp's reference rule"),
                       ("q4_k:minmax", "always searched"), ("q4_0:r0.9", "drop r0.9"), ("q4_0:channel", "(GGUF)"),
                       ("q7_0", "must be format and bits")]:
        with pytest.raises(SpecError, match=words.replace("(", r"\(").replace(")", r"\)")):
            QuantSpec.parse(bad)
    with pytest.raises(SpecError, match="256 elements and a row of 576"):
        PackedWeight.quantize(torch.zeros(4, 576), QuantSpec.parse("q4_k"))


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_gptq_rounds_onto_the_exact_stored_grid(name):
    """GPTQ's values are the stored weights bit for bit (its error feedback used what the file holds),
    and it lowers the layer's output error below round-to-nearest on the same grid."""
    from bitsmith.algorithms.gptq import gptq_quantize

    g = torch.Generator().manual_seed(5)
    w = torch.randn(32, 256, generator=g) * 0.05
    x = torch.randn(2048, 256, generator=g) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=g) / 16)
    h = 2 * x.T @ x / x.shape[0]
    spec = QuantSpec.parse(name)
    fmt = number_format(spec)
    codes = gptq_quantize(w, h, spec, block_size=64, act_order=True)
    packed = PackedWeight.from_codes(codes, spec, tuple(w.shape))
    q = packed.dequantize()
    # the dequantized stored bytes equal the format's own dequantization of the codes, and gguf-py's
    assert torch.equal(q, fmt.dequantize(codes, spec).reshape(w.shape))
    assert np.array_equal(gguf.quants.dequantize(packed.data["qblocks"].numpy(), _ggml(name)), q.numpy())
    rtn = PackedWeight.quantize(w, spec).dequantize()
    out_err = lambda v: ((v - w) @ x.T).pow(2).mean().item()  # noqa: E731
    assert out_err(q) < out_err(rtn)
    # without act-order (grids set per group as it starts) too
    codes2 = gptq_quantize(w, h, spec, block_size=64, act_order=False)
    q2 = PackedWeight.from_codes(codes2, spec, tuple(w.shape)).dequantize()
    assert torch.equal(q2, fmt.dequantize(codes2, spec).reshape(w.shape)) and out_err(q2) < out_err(rtn)


def test_gptq_fallback_for_rows_the_super_block_does_not_divide():
    from bitsmith.algorithms.gptq import GPTQ

    step = GPTQ(weights="q4_k", fallback="q5_0")
    assert str(step.spec_for(1536)) == "q4_k" and str(step.spec_for(576)) == "q5_0"
    assert str(GPTQ(weights="q4_0").spec_for(576)) == "q4_0"
