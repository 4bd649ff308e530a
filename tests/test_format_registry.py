"""The format registry: RTN weights equal the standalone numerics, exact bits, storage, dynamic
fake quantization (activations, KV), and GPTQ on the new grids."""

from __future__ import annotations

import math

import pytest
import torch

from bitsmith.algorithms.gptq import gptq_quantize
from bitsmith.formats import bitmod, blocks, fp6_split, integer, minifloat, olive, packing
from bitsmith.formats.registry import fake_quantize, number_format, stored_bits
from bitsmith.runtime.kvcache import KVQuantizer
from bitsmith.runtime.modules import QuantLinear
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import QuantSpec


def _weight(rows=16, cols=128, seed=0, half=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 0.1
    w[0, 5] = 0.9  # an outlier
    return w.half().float() if half else w


def _fp16_up(v: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value >= v, elementwise (independent of the library's helper)."""
    out = []
    for x in v.reshape(-1).tolist():
        h = torch.tensor(x, dtype=torch.float64).half()
        if float(h) < x:
            h = torch.nextafter(h, torch.tensor(float("inf"), dtype=torch.half))
        out.append(float(h))
    return torch.tensor(out).reshape(v.shape)


# -- RTN = the standalone module -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["fp8:e4m3:channel", "fp8:e5m2:g32", "fp6:e3m2:channel", "fp6:e2m3:g64",
                                  "fp4:e2m1:g32", "fp3:e2m0:g64", "fp5:e2m2:tensor"])
def test_minifloat_rtn_is_the_minifloat_module_with_fp16_absmax_scales(text):
    spec = QuantSpec.parse(text)
    fmt = minifloat.minifloat(spec.element)
    w = _weight()
    xg = integer.group_view(w, spec)
    scale = _fp16_up(xg.abs().amax(-1, keepdim=True) / fmt.max_value)
    expected = minifloat.fake_quantize_minifloat(xg, fmt, scale).reshape(w.shape)
    packed = PackedWeight.quantize(w, spec)
    assert torch.equal(packed.scale.float(), scale) and packed.scale.dtype == torch.float16
    assert torch.equal(packed.dequantize(), expected)


def test_nf4_rtn_is_the_nf4_module():
    w = _weight(half=True)  # fp16-exact absmax: the stored fp16 scale is the absmax itself
    packed = PackedWeight.quantize(w, QuantSpec.parse("nf4:g64"))
    assert torch.equal(packed.dequantize(), blocks.nf4_fake_quantize(w, 64))
    codes, _ = blocks.nf4_quantize(w, 64)
    assert torch.equal(packing.unpack(packed.tensors()["qcodes"], 4, w.numel()).view(w.shape), codes)


@pytest.mark.parametrize("text, element", [("mxfp4", "fp4_e2m1"), ("mxfp6:e3m2", "fp6_e3m2"), ("mxfp6:e2m3", "fp6_e2m3"),
                                           ("mxfp8:e4m3", "fp8_e4m3"), ("mxfp8:e5m2", "fp8_e5m2"), ("mxint8", "int8")])
def test_mx_rtn_is_the_mx_module(text, element):
    w = _weight()
    packed = PackedWeight.quantize(w, QuantSpec.parse(text))
    ref = blocks.mx_quantize(w, element)
    assert torch.equal(packed.dequantize(), blocks.mx_dequantize(ref, element))
    assert torch.equal(packed.dequantize(), blocks.mx_fake_quantize(w, element))
    assert torch.equal(packed.tensors()["qexp"], ref.exponents)


@pytest.mark.parametrize("bits", [3, 4])
def test_bitmod_rtn_is_the_bitmod_module(bits):
    w = _weight()
    spec = QuantSpec.parse(f"bitmod{bits}:g32")
    ref = bitmod.bitmod_quantize(integer.group_view(w, spec), bits)
    packed = PackedWeight.quantize(w, spec)
    assert torch.equal(packed.dequantize(), bitmod.bitmod_dequantize(ref, bits).reshape(w.shape))
    ids = packing.unpack(packed.tensors()["qdtype"], 2, ref.dtype_id.numel()).view(ref.dtype_id.shape)
    assert torch.equal(ids, ref.dtype_id)
    # the MSE variant searches clipping jointly with the datatype: never worse per group
    mse = PackedWeight.quantize(w, QuantSpec.parse(f"bitmod{bits}:g32:mse")).dequantize()
    err = lambda d: (integer.group_view(d - w, spec)).pow(2).sum(-1)  # noqa: E731
    assert (err(mse) <= err(packed.dequantize()) + 1e-9).all() and err(mse).sum() < err(packed.dequantize()).sum()


def test_olive_rtn_is_the_olive_module():
    w = _weight()
    spec = QuantSpec.parse("olive4:g64")
    ref = olive.olive_quantize(integer.group_view(w, spec))
    packed = PackedWeight.quantize(w, spec)
    assert torch.equal(packed.dequantize(), olive.olive_dequantize(ref).reshape(w.shape))
    assert torch.equal(packed.tensors()["qcodes"], ref.codes.reshape(-1))
    # minmax: ratio 1, no outlier pairs, i.e. int4 levels -7..7 times absmax/7
    plain = PackedWeight.quantize(w, QuantSpec.parse("olive4:g64:minmax")).dequantize()
    assert torch.equal(plain, olive.olive_dequantize(olive.olive_quantize(integer.group_view(w, spec), grid=[1.0])).reshape(w.shape))


# -- storage and exact bits ------------------------------------------------------------------------


def _expected_bits(text: str, rows: int, cols: int) -> tuple[int, dict[str, torch.dtype]]:
    """Independent bit count: codes at their width, fp16 scales, 8-bit E8M0 exponents, 2-bit BitMoD ids."""
    n = rows * cols
    table = {
        "fp8:e4m3:channel": (n * 8 + rows * 16, {"qcodes": torch.uint8, "qscale": torch.float16}),
        "fp6:e3m2:channel": (n * 6 + rows * 16, {"qhigh": torch.uint8, "qlow": torch.uint8, "qscale": torch.float16}),
        "fp4:e2m1:g32": (n * 4 + n // 32 * 16, {"qcodes": torch.uint8, "qscale": torch.float16}),
        "fp3:e2m0:g64": (n * 3 + n // 64 * 16, {"qcodes": torch.uint8, "qscale": torch.float16}),
        "nf4:g64": (n * 4 + n // 64 * 16, {"qcodes": torch.uint8, "qscale": torch.float16}),
        "mxfp4": (n * 4 + n // 32 * 8, {"qcodes": torch.uint8, "qexp": torch.uint8}),
        "mxfp6:e2m3": (n * 6 + n // 32 * 8, {"qhigh": torch.uint8, "qlow": torch.uint8, "qexp": torch.uint8}),
        "mxfp8": (n * 8 + n // 32 * 8, {"qcodes": torch.uint8, "qexp": torch.uint8}),
        "mxint8": (n * 8 + n // 32 * 8, {"qcodes": torch.uint8, "qexp": torch.uint8}),
        "bitmod3:g64": (n * 3 + n // 64 * (16 + 2), {"qcodes": torch.uint8, "qscale": torch.float16, "qdtype": torch.uint8}),
        "bitmod4:g32": (n * 4 + n // 32 * (16 + 2), {"qcodes": torch.uint8, "qscale": torch.float16, "qdtype": torch.uint8}),
        "olive4:g64": (n * 4 + n // 64 * 16, {"qcodes": torch.uint8, "qscale": torch.float16}),
        "int3:g64:asym": (n * 3 + n // 64 * (16 + 3), {"qcodes": torch.uint8, "qscale": torch.float16, "qzero": torch.uint8}),
    }
    return table[text]


@pytest.mark.parametrize("text", ["fp8:e4m3:channel", "fp6:e3m2:channel", "fp4:e2m1:g32", "fp3:e2m0:g64", "nf4:g64",
                                  "mxfp4", "mxfp6:e2m3", "mxfp8", "mxint8", "bitmod3:g64", "bitmod4:g32", "olive4:g64",
                                  "int3:g64:asym"])
def test_bits_are_exact_and_reload_is_bit_identical(text):
    rows, cols = 32, 256  # group counts divisible by 8: packed ids and zero points have no padding
    spec = QuantSpec.parse(text)
    w = _weight(rows, cols, seed=3)
    packed = PackedWeight.quantize(w, spec)
    bits, dtypes = _expected_bits(text, rows, cols)
    assert packed.nbits() == bits == stored_bits(spec, (rows, cols))
    assert {k: v.dtype for k, v in packed.tensors().items()} == dtypes
    again = PackedWeight.from_tensors(spec, (rows, cols), {k: v.clone() for k, v in packed.tensors().items()} | {"bias": w[0]})
    assert torch.equal(again.dequantize(), packed.dequantize())
    with pytest.raises(KeyError):
        PackedWeight.from_tensors(spec, (rows, cols), {"qcodes": packed.tensors().get("qcodes")})


def test_fp6_is_stored_as_4_plus_2_planes():
    spec = QuantSpec.parse("fp6:e3m2:channel")
    w = _weight()
    packed = PackedWeight.quantize(w, spec)
    t = packed.tensors()
    assert t["qhigh"].shape == (16, 64) and t["qlow"].shape == (16, 32)
    scale = packed.scale.float()
    codes = minifloat.FP6_E3M2.encode(w / scale)
    high, low = fp6_split.split_pack(codes)
    assert torch.equal(t["qhigh"], high) and torch.equal(t["qlow"], low)
    assert torch.equal(packed.dequantize(), minifloat.FP6_E3M2.decode(codes) * scale)


@pytest.mark.parametrize("element", ["e4m3", "e5m2", "e3m2", "e2m3", "e2m1", "e2m0", "e3m1", "e1m2", "e4m2", "e5m0"])
def test_fast_minifloat_rounding_is_the_reference_bit_for_bit(element):
    from bitsmith.formats.scaled import minifloat_encode, minifloat_round

    fmt = minifloat.minifloat(element)
    g = torch.Generator().manual_seed(1)
    y = torch.randn(100_000, generator=g) * torch.exp2(torch.randint(-26, 16, (100_000,), generator=g).float())
    mags = fmt.magnitudes().float()
    ties = (mags[1:] + mags[:-1]) / 2  # exact midpoints: ties to even
    big = torch.tensor([0.0, -0.0, 1e9, -1e9, fmt.max_value * 1.2, fmt.min_subnormal / 2, -fmt.min_subnormal / 2])
    x = torch.cat([y, ties, -ties, mags, -mags, big])
    r = minifloat_round(fmt, x)
    assert torch.equal(r, fmt.round(x)) and torch.equal(torch.signbit(r), torch.signbit(fmt.round(x)))
    assert torch.equal(minifloat_encode(fmt, x), fmt.encode(x))
    nan = torch.tensor([1.0, float("nan")])
    assert torch.isnan(minifloat_round(fmt, nan)[1]) and minifloat_round(fmt, nan)[0] == 1.0


# -- dynamic fake quantization: activations and the KV cache ------------------------------------------


def test_activation_dispatch_per_format():
    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(64, 8)
    x = torch.randn(2, 5, 64, generator=g)
    x[..., 3] *= 20  # an outlier channel
    e4m3 = minifloat.FP8_E4M3
    cases = {
        "fp8:e4m3:token": minifloat.fake_quantize_minifloat(x, e4m3, minifloat.absmax_scale(x, e4m3)),
        "fp8:e5m2:tensor": minifloat.fake_quantize_minifloat(
            x.reshape(1, -1), minifloat.FP8_E5M2, minifloat.absmax_scale(x.reshape(1, -1), minifloat.FP8_E5M2)).reshape(x.shape),
        "mxfp4": blocks.mx_fake_quantize(x, "fp4_e2m1"),
        "mxfp8": blocks.mx_fake_quantize(x, "fp8_e4m3"),
        "mxint8": blocks.mx_fake_quantize(x, "int8"),
        "int8:token:asym": integer.fake_quantize(x, QuantSpec.parse("int8:token:asym")),
    }
    for text, xq in cases.items():
        q = QuantLinear(lin.weight, lin.bias, QuantSpec.parse(text))
        assert torch.equal(fake_quantize(x, QuantSpec.parse(text)), xq), text
        assert torch.equal(q(x), torch.nn.functional.linear(xq, lin.weight, lin.bias)), text
        assert not torch.equal(xq, x)


def test_olive_activations_keep_outliers_and_stay_on_the_pair_grid():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 128, generator=g)
    x[:, 10] *= 40  # a loud channel, as in LLM activations
    spec = QuantSpec.parse("olive4:token")
    y = fake_quantize(x, spec)
    q, scale = olive.olive_search(x, torch.float32)
    assert torch.equal(y, q * scale)
    olive.encode_pairs(q)  # raises unless every pair is two int4 normals or an outlier and a victim
    assert torch.equal(y, olive.olive_dequantize(olive.olive_quantize(x, torch.float32)))  # the paper's full search
    err = lambda z: (z - x).pow(2).sum(-1)  # noqa: E731
    int4 = integer.fake_quantize(x, QuantSpec.parse("int4:token"))
    assert (err(y) <= err(int4)).all()  # ratio 1 (plain int4 absmax) is on the grid
    assert err(y).sum() < 0.1 * err(int4).sum()  # outlier pairs: far better than int4 on a loud channel
    assert (y[:, 11] == 0).all()  # the loud channel's neighbour is its victim
    assert ((y[:, 10] - x[:, 10]).abs() < 0.1 * x[:, 10].abs()).all()


def test_kv_cache_quantizes_in_the_new_formats():
    g = torch.Generator().manual_seed(5)
    k = torch.randn(1, 2, 7, 64, generator=g)
    v = torch.randn(1, 2, 7, 64, generator=g)
    q = torch.randn(1, 4, 7, 64, generator=g)
    kvq = KVQuantizer(QuantSpec.parse("fp8:e4m3:head"), QuantSpec.parse("mxfp4"))
    _, kq, vq = kvq(q, k, v)
    assert torch.equal(kq, minifloat.fake_quantize_minifloat(k, minifloat.FP8_E4M3, minifloat.absmax_scale(k, minifloat.FP8_E4M3)))
    assert torch.equal(vq, blocks.mx_fake_quantize(v, "fp4_e2m1"))  # blocks of 32 along the head dimension
    tok = KVQuantizer(QuantSpec.parse("fp8:e5m2:token"))
    _, kt, _ = tok(q, k, v)
    flat = k.transpose(1, 2).reshape(1, 7, 128)
    ref = minifloat.fake_quantize_minifloat(flat, minifloat.FP8_E5M2, minifloat.absmax_scale(flat, minifloat.FP8_E5M2))
    assert torch.equal(kt, ref.view(1, 7, 2, 64).transpose(1, 2))
    assert KVQuantizer.from_description(kvq.describe()).value == QuantSpec.parse("mxfp4")


# -- GPTQ on the new grids --------------------------------------------------------------------------


def _layer(rows=24, cols=128, n=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.05
    x = torch.randn(n, cols, generator=gen) @ (torch.randn(cols, cols, generator=gen) * 0.3)  # correlated inputs
    x[:, :3] *= 8
    return w, x, 2 * x.T @ x / n


def _out_err(w, q, x):
    return ((w - q) @ x.T).pow(2).sum().item()


def _deq(codes, spec, shape):
    return number_format(spec).dequantize(codes, spec).reshape(shape)


@pytest.mark.parametrize("text", ["fp4:e2m1:channel", "fp4:e2m1:g32", "fp6:e3m2:channel", "fp8:e4m3:channel", "fp3:e2m0:g32:mse",
                                  "nf4:g32", "mxfp4", "mxfp6:e2m3", "mxint8", "bitmod3:g32", "bitmod4:g32:mse"])
def test_gptq_beats_rtn_on_the_same_grid(text):
    spec = QuantSpec.parse(text)
    w, x, h = _layer()
    codes = gptq_quantize(w, h, spec, block_size=32)  # act-order, grids fixed from the original weights
    rtn = number_format(spec).quantize(w, spec)
    for name in ("scale", "exponents", "dtype_id"):  # the same grid as RTN's
        if hasattr(rtn, name):
            assert torch.equal(getattr(codes, name), getattr(rtn, name)), name
    gq, rq = _deq(codes, spec, w.shape), _deq(rtn, spec, w.shape)
    assert _out_err(w, gq, x) < 0.6 * _out_err(w, rq, x)
    packed = PackedWeight.from_codes(codes, spec, w.shape)
    assert torch.equal(packed.dequantize(), gq)  # the codes pack and unpack exactly


def _reference(w, h, spec, damp=0.01):
    """Plain column-by-column GPTQ (float64 updates, explicit inverse), on the format's rounding: the oracle."""
    fmt = number_format(spec)
    w = w.double().clone()
    rows, cols = w.shape
    h = h.double() + damp * torch.diag(h.double()).mean() * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    group = spec.group_size if spec.granularity == "group" else cols
    out = torch.empty(rows, cols, dtype=torch.float64)
    for j in range(cols):
        if j % group == 0:
            params = fmt.grid(w[:, j : j + group].float(), spec)
        q, value = fmt.round(w[:, j].float(), params, spec)
        out[:, j] = value.double()
        err = (w[:, j] - value.double()) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return out


@pytest.mark.parametrize("text", ["fp4:e2m1:channel", "nf4:g16", "mxfp4"])
def test_blocked_gptq_matches_the_column_by_column_reference(text):
    spec = QuantSpec.parse(text)
    w, x, h = _layer(rows=12, cols=64, seed=1)
    fast = _deq(gptq_quantize(w, h, spec, block_size=16, act_order=False), spec, w.shape)
    ref = _reference(w, h, spec).float()
    assert (fast == ref).float().mean() >= 0.99  # float32 vs float64 updates: at most a rare rounding flips
    assert math.isclose(_out_err(w, fast, x), _out_err(w, ref, x), rel_tol=0.05)


def test_gptq_splits_stacked_rows_for_every_format():
    from torch import nn

    from bitsmith.algorithms.gptq import GPTQ

    w, x, h = _layer(rows=20, cols=64)
    for text in ("mxfp4", "bitmod3:g32", "fp6:e3m2:channel"):
        parts = {"q": nn.Linear(64, 12, bias=False), "k": nn.Linear(64, 8, bias=False)}
        with torch.no_grad():
            parts["q"].weight.copy_(w[:12])
            parts["k"].weight.copy_(w[12:])
        step = GPTQ(weights=text)
        together = step.solve(parts, h)
        joint = _deq(gptq_quantize(w, h, step.spec), step.spec, w.shape)
        assert torch.equal(torch.cat([together["q"].weight, together["k"].weight]), joint), text


def test_shared_input_is_quantized_once_and_changes_are_seen(monkeypatch):
    """q/k/v read the same tensor: one dynamic quantization serves all three, unless the tensor changed."""
    import bitsmith.runtime.modules as modules

    calls = []
    real = modules.fake_quantize
    monkeypatch.setattr(modules, "fake_quantize", lambda x, spec: calls.append(1) or real(x, spec))
    spec = QuantSpec.parse("olive4:token")
    lins = [QuantLinear(torch.randn(8, 64), None, spec) for _ in range(3)]
    x = torch.randn(2, 3, 64)
    outs = [lin(x) for lin in lins]
    assert len(calls) == 1
    for lin, out in zip(lins, outs):
        assert torch.equal(out, fake_quantize(x, spec) @ lin.weight.T)
    x.mul_(2)  # changed in place: the copy comparison sees it
    assert torch.equal(lins[0](x), fake_quantize(x, spec) @ lins[0].weight.T)
    assert len(calls) == 2
    lins[1](x.clone())  # same values, another tensor: quantized again
    assert len(calls) == 3
