"""DGQ (arXiv 2310.04836): the dual-grained format, its two-phase search, the int8 product, the recipe step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import bitsmith
from bitsmith.algorithms.dgq import percentile_scales
from bitsmith.algorithms.gptq import gptq_quantize
from bitsmith.errors import SpecError
from bitsmith.formats.dual_grained import COARSE_GRID, dual_grained_quantize, fine_params, scale_limit
from bitsmith.formats.integer import group_view
from bitsmith.formats.registry import fake_quantize, number_format, slice_rows, stored_bits
from bitsmith.models import load_model
from bitsmith.recipes import load_recipe
from bitsmith.runtime.int8_matmul import Int8Linear, int8_weight, quantize_tokens
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import QuantSpec
from helpers import lm_logits, rel, run_steps, tokens

A8 = QuantSpec.parse("int8:token:sym")
TINY_RECIPE = {"name": "dgq-tiny", "calibration": {"samples": 4, "seq": 32},
               "steps": [{"dgq": {"weights": "dg4:g32", "percentile": 90}}, {"act_quant": {"spec": "int8:token:sym"}}]}


def _weights(seed: int, rows: int = 6, cols: int = 64) -> torch.Tensor:
    """Random weights with the awkward cases: an outlier column, an all-positive, an all-negative and a zero group."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    w[:, 5] *= 12
    w[0, :16] = w[0, :16].abs()
    w[1, 16:32] = -w[1, 16:32].abs()
    w[2, 32:48] = 0.0
    return w


def _fp16_up(x: float) -> float:
    h = torch.tensor(max(x, 2.0**-24), dtype=torch.float32).half()
    if float(h) < x:
        h = torch.nextafter(h, torch.tensor(float("inf"), dtype=torch.float16))
    return float(h)


def _reference_best(w: torch.Tensor, spec: QuantSpec) -> list[float]:
    """Plain phase 2 per row, element by element in Python floats, over the same grid of ``s1``;
    phase 1 is the project's clip search. Returns each row's least squared error."""
    wg = group_view(w, spec)
    fine, zero = fine_params(wg, spec)
    top = (1 << spec.bits) - 1
    best = []
    for r in range(wg.shape[0]):
        scales, zeros = fine[r, :, 0].tolist(), zero[r, :, 0].tolist()
        limits = [math.floor(127 / max(z, top - z)) for z in zeros]
        base = max(s / lim for s, lim in zip(scales, limits))
        errors = []
        for m in COARSE_GRID:
            s1, e = _fp16_up(base * m), 0.0
            for gi, (s, z, lim) in enumerate(zip(scales, zeros, limits)):
                step = s1 * min(max(round(s / s1), 1), lim)
                for v in wg[r, gi].tolist():
                    q = min(max(round(v / step) + z, 0), top)
                    e += ((q - z) * step - v) ** 2
            errors.append(e)
        best.append(min(errors))
    return best


@pytest.mark.parametrize("text", ["dg4:g16", "dg4:g16:sym", "dg4:g32:minmax"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_phase_search_against_brute_force(text, seed):
    spec = QuantSpec.parse(text)
    w = _weights(seed)
    codes = dual_grained_quantize(group_view(w, spec), spec)
    deq = codes.dequantize(spec).reshape(w.shape)
    ours = (deq.double() - w.double()).pow(2).sum(1).tolist()
    for mine, ref in zip(ours, _reference_best(w, spec)):
        assert mine <= ref * (1 + 1e-5) + 1e-12  # never worse than the best s1 of the same grid

    # INT8-safe: W_s8 = S2 * (q - z) in [-127, 127], computed wide; S2 within its zero point's limit
    z = codes.zero_points(spec).long()
    s2 = codes.group_scale.long()
    w8 = s2 * (codes.codes.long() - z)
    assert w8.abs().max() <= 127
    assert (s2 >= 1).all() and (s2 <= scale_limit(z, spec.bits).long()).all()
    assert torch.equal(codes.int8_weight(spec).long(), w8)
    # dequantization is exactly s1 * S2 * (q - z), and the packed weight stores exactly that
    exact = (codes.channel_scale.double() * s2.double() * (codes.codes.double() - z.double())).reshape(w.shape)
    assert torch.equal(deq.double(), exact)
    packed = PackedWeight.quantize(w, spec)
    assert torch.equal(packed.dequantize().double(), exact)
    assert codes.channel_scale.half().float().equal(codes.channel_scale)  # fp16-exact


def test_int8_limits_are_exact():
    """Each zero point's limit is the largest S2 for which every code fits int8."""
    for z in range(16):
        lim = int(scale_limit(torch.tensor([float(z)]), 4))
        worst = max(z, 15 - z)
        assert lim * worst <= 127 < (lim + 1) * worst
    assert int(scale_limit(torch.tensor([8.0]), 4)) == 15  # :sym (zero point 8)


@pytest.mark.parametrize("text", ["dg4:g16", "dg4:g16:sym"])
def test_pack_unpack_and_stored_bits(text):
    spec = QuantSpec.parse(text)
    w = _weights(3, rows=10, cols=48)
    fmt = number_format(spec)
    codes = fmt.quantize(w, spec)
    packed = PackedWeight.from_codes(codes, spec, tuple(w.shape))
    back = fmt.unpack(packed.tensors(), spec, tuple(w.shape))
    for name in ("codes", "group_scale", "channel_scale"):
        assert torch.equal(getattr(back, name), getattr(codes, name))
    assert (back.zero is None) == spec.symmetric and (spec.symmetric or torch.equal(back.zero, codes.zero))
    t = packed.tensors()
    assert t["qgscale"].dtype == torch.int8 and t["qscale"].dtype == torch.float16 and t["qcodes"].dtype == torch.uint8
    groups = 10 * 48 // 16
    zero_bits = (groups + 7) // 8 * 4 * 8  # 4-bit zero points packed 8 to 4 bytes
    expected = 10 * 48 * 4 + groups * 8 + 10 * 16 + (0 if spec.symmetric else zero_bits)
    assert packed.nbits() == stored_bits(spec, (10, 48)) == expected
    # rows split as GPTQ does for q/k/v
    part = slice_rows(codes, 2, 5)
    assert torch.equal(fmt.dequantize(part, spec), fmt.dequantize(codes, spec)[2:5])


def test_gptq_runs_on_the_dual_grained_grid():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
    w = torch.randn(24, 64, generator=g)
    h = 2 * x.T @ x / x.shape[0]
    spec = QuantSpec.parse("dg4:g16")
    q = PackedWeight.from_codes(gptq_quantize(w, h, spec), spec, tuple(w.shape))
    w8, _ = int8_weight(q)
    assert w8.abs().max() <= 127
    err = lambda d: float(((d - w) @ h * (d - w)).sum())  # noqa: E731
    assert err(q.dequantize()) < err(PackedWeight.quantize(w, spec).dequantize())
    with pytest.raises(SpecError, match="act_order or static_groups"):
        gptq_quantize(w, h, spec, act_order=False)


@pytest.mark.parametrize("text, field", [
    ("dg4", "group_size"), ("dg3:g64", "bits"), ("dg8:g64", "bits"), ("dg4:channel", "granularity"),
    ("dg4:token", "granularity"), ("dg4:ic:g64", "granularity"), ("dg4:g64:e2m1", "element"), ("dg4:g0", "group_size"),
])
def test_bad_specs_fail_in_one_line(text, field):
    with pytest.raises(SpecError) as e:
        QuantSpec.parse(text)
    assert f"'{field}'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("args, words", [
    ({"weights": "int4:g64"}, "not dual-grained"), ({"weights": "dg4:g64", "percentile": 0}, "percentile"),
    ({"weights": "dg4:g64", "percentile": 101}, "percentile"), ({"weights": "dg4:g64", "percentile": "p99"}, "percentile"),
    ({"weights": None, "percentile": None}, "does nothing"), ({"weights": "dg4"}, "group size"),
    ({"weights": "dg4:g64", "layers": "some"}, "layers"),
])
def test_bad_step_arguments_fail_in_one_line(args, words):
    with pytest.raises(SpecError) as e:
        load_recipe({"name": "bad", "steps": [{"dgq": args}]})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_group_size_that_does_not_divide_fails_before_calibration(tiny_llama, calib_file):
    folder, _ = tiny_llama
    recipe = {"name": "bad", "steps": [{"dgq": {"weights": "dg4:g48"}}]}
    with pytest.raises(SpecError) as e:
        bitsmith.quantize(str(folder), recipe, calib=calib_file, progress=False)
    assert "g48" in str(e.value) and "does not divide" in str(e.value) and "\n" not in str(e.value)


def test_int8_product_matches_fake_quant_on_random_inputs():
    g = torch.Generator().manual_seed(5)
    spec = QuantSpec.parse("dg4:g32")
    for m, k, n in [(1, 96, 40), (3, 64, 24), (33, 128, 72)]:
        w = torch.randn(n, k, generator=g)
        x = torch.randn(2, m, k, generator=g) * 3
        x[..., 7] *= 40  # an outlier channel
        bias = torch.randn(n, generator=g)
        packed = PackedWeight.quantize(w, spec)
        lin = Int8Linear.from_packed(packed, bias)
        y = lin(x)
        ref = F.linear(fake_quantize(x, A8), packed.dequantize(), bias)
        assert y.shape == ref.shape and lin.kernel
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    for text in ("int8:token:sym", "int8:tensor:sym", "int8:token:sym:mse", "int8:token:r0.9"):
        aspec = QuantSpec.parse(text)
        xq, sx = quantize_tokens(x, aspec)  # exactly the activation quantizer's grid
        assert xq.dtype == torch.int8 and torch.equal((xq.float() * sx).reshape(x.shape), fake_quantize(x, aspec))
    with pytest.raises(SpecError, match="int8:token:sym"):
        quantize_tokens(x, QuantSpec.parse("int4:token:sym"))
    with pytest.raises(SpecError, match="not dual-grained"):
        int8_weight(PackedWeight.quantize(w, QuantSpec.parse("int4:g32")))



@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2"])
def test_percentile_smoothing_keeps_the_float_function(which, request):
    folder, _ = request.getfixturevalue(which)
    ids = tokens()
    ref = lm_logits(load_model(str(folder)), ids)
    lm = load_model(str(folder))
    recipe = run_steps(lm, [{"dgq": {"weights": None, "percentile": 75}}], tokens(8, 32, seed=1))
    assert rel(lm_logits(lm, ids), ref) < 1e-5
    fresh = load_model(str(folder)).adapter.blocks()[0]
    assert not torch.allclose(lm.adapter.blocks()[0].input_layernorm.weight, fresh.input_layernorm.weight, rtol=1e-3)
    assert len(recipe.steps[0].choices) == 2 * 4  # blocks x (qkv, o, gate/up, down)


def test_percentile_scales_match_the_definition():
    a = torch.rand(200, generator=torch.Generator().manual_seed(6)) + 0.1
    a[[3, 50]] = torch.tensor([40.0, 9.0])
    s = percentile_scales(a, 95)
    ranked = sorted(a.tolist())
    pos = 0.95 * (len(ranked) - 1)
    p95 = ranked[int(pos)] + (pos - int(pos)) * (ranked[int(pos) + 1] - ranked[int(pos)])
    expected = torch.tensor([max(1.0, v / p95) for v in a.tolist()], dtype=torch.float64)
    torch.testing.assert_close(s, expected, rtol=1e-12, atol=0)
    assert (a.double() / s).max() <= p95 * (1 + 1e-12) and int((s > 1).sum()) == 10
    assert torch.equal(percentile_scales(a, 100), torch.ones(200, dtype=torch.float64))


def test_recipe_round_trips_bit_identical_and_runs_on_int8(tiny_llama, tmp_path, calib_file):
    folder, float_model = tiny_llama
    builtin = load_recipe("dgq-w4a8").raw
    assert [next(iter(s)) for s in builtin["steps"]] == ["dgq", "act_quant"]
    out = tmp_path / "q"
    q = bitsmith.quantize(str(folder), TINY_RECIPE, out=str(out), calib=calib_file, progress=False)
    back = bitsmith.load_model(str(out))
    ids = tokens()
    with torch.no_grad():
        la, lb = q.model(input_ids=ids).logits, back.model(input_ids=ids).logits
        assert torch.equal(la, lb) and not torch.equal(la, float_model(input_ids=ids).logits)
    for lm in (q, back):
        for block in lm.adapter.blocks():
            for lin in lm.adapter.block_linears(block).values():
                assert str(lin.packed.spec) == "dg4:g32:asym" and lin.act_spec == A8

    # the int8 path on a real layer input: equal to the fake-quantized module (QuantLinear)
    block = back.adapter.blocks()[0]
    seen = {}

    def catch(role):
        def hook(_module, args, out) -> None:
            seen.setdefault(role, (args[0], out))
        return hook

    handles = [lin.register_forward_hook(catch(r)) for r, lin in back.adapter.block_linears(block).items()]
    with torch.no_grad():
        back.model(input_ids=ids)
    for h in handles:
        h.remove()
    for role, lin in back.adapter.block_linears(block).items():
        x, y = seen[role]
        y8 = Int8Linear.from_packed(lin.packed, lin.bias)(x)
        assert rel(y8.double(), y.double()) < 1e-5, role


def test_dgq_beats_per_channel_int4_on_outlier_channels():
    """Layer output error with int8 per-token inputs: DGQ (percentile smoothing + dg4:g64) against plain
    per-channel INT4 RTN (asymmetric, MSE-clipped) on random data with four outlier channels."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(512, 256, generator=g)
    x[:, [3, 70, 150, 200]] *= 50
    w = torch.randn(128, 256, generator=g) * 0.05
    ref = x @ w.T
    s = percentile_scales(x.abs().amax(0), 99).float()
    dgq = fake_quantize(x / s, A8) @ PackedWeight.quantize(w * s, QuantSpec.parse("dg4:g64")).dequantize().T
    rtn = fake_quantize(x, A8) @ PackedWeight.quantize(w, QuantSpec.parse("int4:channel:asym:mse")).dequantize().T
    unsmoothed = fake_quantize(x, A8) @ PackedWeight.quantize(w, QuantSpec.parse("dg4:g64")).dequantize().T
    assert rel(dgq, ref) < rel(unsmoothed, ref) < rel(rtn, ref)


def test_smoothing_only_composes_with_gptq_on_the_dg_grid(tiny_llama, calib_file):
    """``weights: null`` keeps the percentile smoothing only (norm-fed groups), GPTQ rounds on dg4 after it."""
    folder, _ = tiny_llama
    recipe = {"name": "dgq-gptq", "calibration": {"samples": 4, "seq": 32}, "steps": [
        {"dgq": {"weights": None, "percentile": 90, "layers": "norms"}}, {"gptq": {"weights": "dg4:g32"}},
        {"act_quant": {"spec": "int8:token:sym"}}]}
    lm = bitsmith.quantize(str(folder), recipe, calib=calib_file, progress=False)
    for block in lm.adapter.blocks():
        for lin in lm.adapter.block_linears(block).values():
            assert str(lin.packed.spec) == "dg4:g32:asym" and int8_weight(lin.packed)[0].abs().max() <= 127
    with torch.no_grad():
        assert torch.isfinite(lm.model(input_ids=tokens()).logits).all()
    assert not load_recipe({"name": "w", "steps": [{"dgq": {"weights": "dg4:g64", "percentile": None}}]}).steps[0].transforms_inputs
