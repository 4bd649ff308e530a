"""Per-IC weight groups (``ic`` specs) and AdaDim's per-layer choice of dimension: spec grammar, RTN and
GPTQ against plain references, exact storage, the choice on layers with outliers, save/reload."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bitsmith
from bitsmith.algorithms.adadim import AdaDim, dimension_pair, output_error
from bitsmith.algorithms.gptq import gptq_quantize, gptq_reference
from bitsmith.errors import BitsmithError, SpecError
from bitsmith.formats import packing
from bitsmith.formats.registry import stored_bits
from bitsmith.models import load_model
from bitsmith.recipes import load_recipe
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import QuantSpec
from helpers import lm_logits, run_steps, tokens


def test_ic_spec_grammar():
    s = QuantSpec.parse("int4:g64:ic:asym")
    assert (s.granularity, s.group_size, str(s)) == ("ic", 64, "int4:ic:g64:asym")
    assert QuantSpec.parse(str(s)) == s == QuantSpec.from_dict(s.to_dict())
    assert QuantSpec.parse("int4:ic").group_size is None and str(QuantSpec.parse("fp4:ic:g32")) == "fp4:e2m1:ic:g32"
    assert [str(x) for x in dimension_pair(s)] == ["int4:g64:asym", "int4:ic:g64:asym"]
    assert [str(x) for x in dimension_pair(QuantSpec.parse("int3:channel"))] == ["int3:channel:sym", "int3:ic:sym"]


@pytest.mark.parametrize("text, role, message", [
    ("mxfp4:ic", None, "drop 'ic'"),
    ("int8:ic", "activations", "does not apply to activations"),
    ("int4:ic:g7", "shape", "group size 7 does not divide"),
])
def test_bad_ic_specs_fail_in_one_line(text, role, message):
    from bitsmith.spec import ACTIVATION_GRANULARITIES

    with pytest.raises(SpecError, match=message) as e:
        spec = QuantSpec.parse(text)
        if role == "activations":
            spec.require(ACTIVATION_GRANULARITIES, role)
        else:
            PackedWeight.quantize(torch.randn(32, 16), spec)
    assert "\n" not in str(e.value)


def _rtn_ic_reference(w: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """Symmetric min-max per input column and group of ``g`` output rows, fp16 scales rounded up."""
    out = torch.empty_like(w)
    qmax = (1 << (bits - 1)) - 1
    for j in range(w.shape[1]):
        for r in range(0, w.shape[0], g):
            col = w[r : r + g, j]
            exact = col.abs().max() / qmax
            s16 = exact.to(torch.float16)
            if s16.float() < exact:
                s16 = torch.nextafter(s16, torch.tensor(float("inf"), dtype=torch.float16))
            s = s16.float()
            out[r : r + g, j] = torch.clamp(torch.round(col / s), -qmax - 1, qmax) * s
    return out


def test_rtn_per_ic_matches_the_plain_reference_and_counts_bits_exactly():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 24, generator=gen)
    for spec, g in [("int4:ic:g8", 8), ("int3:ic", 32)]:
        spec = QuantSpec.parse(spec)
        packed = PackedWeight.quantize(w, spec)
        assert torch.equal(packed.dequantize(), _rtn_ic_reference(w, spec.bits, g))
        groups = 24 * 32 // g
        assert packed.nbits() == stored_bits(spec, (32, 24)) == packing.packed_nbytes(32 * 24, spec.bits) * 8 + groups * 16
    asym = QuantSpec.parse("int4:ic:g8:asym")
    assert stored_bits(asym, (32, 24)) == PackedWeight.quantize(w, asym).nbits() == 32 * 24 * 4 + 96 * 16 + 96 * 4
    # any scaled format goes through the same transposition
    fp = QuantSpec.parse("fp4:ic:g8")
    assert torch.equal(PackedWeight.quantize(w, fp).dequantize(), PackedWeight.quantize(w.T, QuantSpec.parse("fp4:g8")).dequantize().T)


def _layer(rows=32, cols=64, n=300, seed=0, weight_cols=(), act_cols=(), loud_rows=()):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    w[:, list(weight_cols)] *= 20  # input channels whose weights are outliers
    w[list(loud_rows)] *= 20  # output channels whose weights are outliers
    x = torch.randn(n, cols, generator=gen) @ (torch.eye(cols) + 0.2 * torch.randn(cols, cols, generator=gen))
    x[:, list(act_cols)] *= 10  # activation outlier channels
    return w, 2 * x.T @ x / n


@pytest.mark.parametrize("spec", ["int4:ic:g16:asym", "int3:ic", "int4:ic:g8:sym:mse"])
def test_gptq_per_ic_matches_the_column_by_column_reference(spec):
    spec = QuantSpec.parse(spec)
    w, h = _layer(seed=1, weight_cols=(3,), act_cols=(5,))
    fast = PackedWeight.from_codes(gptq_quantize(w, h, spec, block_size=16, act_order=False), spec, tuple(w.shape))
    ref_codes = gptq_reference(w, h, spec)
    codes = fast.data["qcodes"]
    from bitsmith.formats import packing as pk

    got = pk.unpack(codes, spec.bits, w.numel()).view(w.shape[1], w.shape[0]).T.float()
    assert (got == ref_codes).float().mean() >= 0.995  # float32 vs float64: a rare tie may flip
    rtn = PackedWeight.quantize(w, spec).dequantize()
    for kw in ({"act_order": False}, {"act_order": True}, {"static_groups": True}):
        q = PackedWeight.from_codes(gptq_quantize(w, h, spec, **kw), spec, tuple(w.shape)).dequantize()
        assert output_error(w, q, h) < output_error(w, rtn, h), kw


def test_adadim_picks_per_ic_for_input_channel_outliers_and_per_oc_for_row_outliers():
    for solver in ("rtn", "gptq"):
        step = AdaDim(weights="int4:g16:asym", solver=solver)
        cases = {"ic": _layer(seed=2, weight_cols=(1, 17, 40), act_cols=(9,)), "oc": _layer(seed=2, loud_rows=(0, 20))}
        for want, (w, h) in cases.items():
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                lin.weight.copy_(w)
            chosen = step.solve({"x": lin}, h)["x"]
            errs = step.choices[-1]["errors"]
            assert (chosen.packed.spec.granularity == "ic") == (want == "ic"), (solver, want, errs)
            err = output_error(w, chosen.weight, h)
            assert err == pytest.approx(min(errs.values()), rel=1e-6) and err < max(errs.values())
            if want == "ic":  # outlier weight columns spoil every per-OC group they sit in
                assert err < 0.5 * max(errs.values())


def _run(lm, steps):
    return run_steps(lm, steps, tokens(8, 32, seed=1))


@pytest.mark.parametrize("solver", ["rtn", "gptq"])
def test_adadim_in_the_pipeline_saves_and_reloads_bit_identical(tiny_llama, solver, tmp_path):
    from bitsmith.checkpoint import save_quantized
    from bitsmith.eval.size import size_stats

    folder, _ = tiny_llama
    lm = load_model(str(folder))
    with torch.no_grad():  # outlier weight columns in one layer, outlier rows in another
        lm.adapter.blocks()[0].self_attn.o_proj.weight[:, [2, 30, 51]] *= 25
        # a loud row in every group of 16 rows (as in _layer): per-IC groups would all be spoilt
        lm.adapter.blocks()[1].mlp.up_proj.weight[list(range(0, 128, 17))] *= 25
    recipe = _run(lm, [{"adadim": {"weights": "int4:g16:asym", "solver": solver}}])
    choices = recipe.steps[0].choices
    assert len(choices) == 2 * 7 and {c["spec"] for c in choices} <= {"int4:g16:asym", "int4:ic:g16:asym"}
    assert choices[3]["role"] == "o" and choices[3]["spec"] == "int4:ic:g16:asym"
    up = [c for c in choices[7:] if c["role"] == "up"]
    assert up[0]["spec"] == "int4:g16:asym", up
    linears = dict(lm.adapter.named_block_linears())
    bits = sum(stored_bits(lin.packed.spec, tuple(lin.weight.shape)) for lin in linears.values())
    assert size_stats(lm)["bpw"] == bits / sum(lin.weight.numel() for lin in linears.values())
    lm.quant = {"recipe": "t", "source": str(folder)}
    save_quantized(lm, tmp_path / "q", recipe.to_yaml())
    again = bitsmith.load_model(str(tmp_path / "q"))
    ids = tokens(seed=2)
    assert torch.equal(lm_logits(lm, ids), lm_logits(again, ids))
    assert str(again.adapter.blocks()[0].self_attn.o_proj.packed.spec) == "int4:ic:g16:asym"


def test_gptq_step_solves_per_ic_roles_one_by_one(tiny_qwen2):
    """q/k/v share an input but per-IC row groups must not straddle them: each role alone."""
    folder, _ = tiny_qwen2
    lm = load_model(str(folder))
    _run(lm, [{"gptq": {"weights": "int4:ic:g16"}}])
    for _, lin in lm.adapter.named_block_linears():
        assert lin.packed.spec.granularity == "ic" and lin.packed.dequantize().shape == lin.weight.shape


@pytest.mark.parametrize("args, message", [
    ({"weights": "int4:tensor"}, "no dimension to choose"),
    ({"weights": "int4:g64", "solver": "awq"}, "solver 'awq' is unknown"),
    ({"weights": "olive4:g64"}, "not supported"),
    ({"weights": "int4:g64", "damp": 2}, "damp"),
    ({"weights": "mxfp4"}, "drop 'ic'"),
])
def test_bad_adadim_arguments_fail_in_one_line(args, message):
    with pytest.raises((SpecError, BitsmithError), match=message) as e:
        load_recipe({"steps": [{"adadim": args}]})
    assert "\n" not in str(e.value)


def test_builtin_adadim_recipes_load():
    for name, solver in [("adadim-w4a16-g64", "rtn"), ("adadim-gptq-w3a16-g64", "gptq")]:
        (step,) = load_recipe(name).steps
        assert step.solver == solver and step.calibrated and step.candidates[1].granularity == "ic"
