"""CrossQuant activation quantization: against a plain reference, its quantization kernel, the act_quant
step, save/reload, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

import bitsmith
from bitsmith.errors import SpecError
from bitsmith.formats import crossquant, integer
from bitsmith.models import load_model
from bitsmith.recipes import load_recipe
from bitsmith.spec import QuantSpec
from helpers import lm_logits, run_steps, tokens

INT8 = QuantSpec.parse("int8:token:sym")


def _outlier_acts(seed=0, shape=(2, 48, 64)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    x[..., :3] *= 60  # outlier channels, as in LLM activations
    return x


def _reference(x: torch.Tensor, spec: QuantSpec, alpha: float) -> torch.Tensor:
    """Element by element, in float64: Delta_ij = t_i^alpha c_j^(1-alpha) / (2^(b-1) - 1) per sequence."""
    out = torch.empty_like(x, dtype=torch.float64)
    qmax = (1 << (spec.bits - 1)) - 1
    for b in range(x.shape[0]):
        seq = x[b].double()
        t, c = seq.abs().amax(1), seq.abs().amax(0)
        for i in range(seq.shape[0]):
            for j in range(seq.shape[1]):
                delta = t[i] ** alpha * c[j] ** (1 - alpha) * spec.clip_ratio / qmax
                out[b, i, j] = torch.clamp(torch.round(seq[i, j] / delta), -qmax - 1, qmax) * delta
    return out


@pytest.mark.parametrize("spec, alpha", [("int8:token:sym", 0.15), ("int4:token", 0.5), ("int6:token:r0.8", 0.0)])
def test_matches_the_plain_reference(spec, alpha):
    spec = QuantSpec.parse(spec)
    x = _outlier_acts(seed=int(alpha * 100), shape=(2, 12, 20))
    got, ref = crossquant.fake_quantize(x, spec, alpha).double(), _reference(x, spec, alpha)
    step = crossquant.steps(x, spec, alpha).double()
    # float32 vs float64 steps: at most a rare rounding tie lands one level apart
    assert ((got - ref).abs() <= 1.01 * step).all()
    same = (got - ref).abs() <= 1e-5 * ref.abs() + 1e-6 * step
    assert same.float().mean() >= 0.99


def test_alpha_one_is_per_token_bit_for_bit_and_nothing_clips():
    x = _outlier_acts(seed=3)
    for spec in ["int8:token:sym", "int4:token:sym"]:
        spec = QuantSpec.parse(spec)
        assert torch.equal(crossquant.fake_quantize(x, spec, 1.0), integer.fake_quantize(x, spec))
        q, _ = crossquant.codes(x, spec, crossquant.ALPHA)
        assert q.abs().max() <= (1 << (spec.bits - 1)) - 1  # |x| <= min(t, c): never clipped


def test_kernel_is_smaller_than_per_token_with_outlier_channels():
    x = _outlier_acts(seed=5)
    k = crossquant.quantization_kernel(x)
    assert k["per_token"] > 0.05 and k["crossquant"] < 0.5 * k["per_token"]
    assert k["per_token"] == crossquant.kernel_share(x, INT8, 1.0)
    # the kernel counts elements whose code is zero
    q, _ = crossquant.codes(x, INT8, crossquant.ALPHA)
    assert k["crossquant"] == pytest.approx((q == 0).float().mean().item())
    # and the cross-quantized tensor is closer to x
    assert (crossquant.fake_quantize(x, INT8) - x).norm() < (integer.fake_quantize(x, INT8) - x).norm()


def _run(lm, steps):
    return run_steps(lm, steps, tokens(4, 16, seed=1))


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2"])
def test_act_quant_cross_runs_saves_and_reloads_bit_identical(which, request, tmp_path):
    from bitsmith.checkpoint import save_quantized

    folder, _ = request.getfixturevalue(which)
    lm = load_model(str(folder))
    recipe = _run(lm, [{"act_quant": {"spec": "int8:token:sym", "cross": True}}, {"rtn": {"weights": "int8:channel"}}])
    linears = list(lm.adapter.named_block_linears())
    assert linears and all(lin.act_cross == crossquant.ALPHA for _, lin in linears)
    ids = tokens(seed=2)
    # the block linears really quantize with CrossQuant: per-token steps give other logits
    cross_logits = lm_logits(lm, ids)
    lm.quant = {"recipe": "t", "source": str(folder)}
    save_quantized(lm, tmp_path / "q", recipe.to_yaml())
    meta = json.loads((tmp_path / "q" / "bitsmith.json").read_text())
    assert {m["input_cross"] for m in meta["modules"].values()} == {crossquant.ALPHA}
    again = bitsmith.load_model(str(tmp_path / "q"))
    assert torch.equal(lm_logits(again, ids), cross_logits)
    for _, lin in again.adapter.named_block_linears():
        lin.act_cross = None
    assert not torch.equal(lm_logits(again, ids), cross_logits)


@pytest.mark.parametrize("args, message", [
    ({"spec": "int8:token:asym", "cross": 0.15}, "symmetric"),
    ({"spec": "int8:tensor:sym", "cross": 0.15, "static": True}, "dynamic"),
    ({"spec": "int8:token:sym", "cross": 1.5}, r"alpha 1.5 must be a number in \[0, 1\]"),
    ({"spec": "int8:token:sym", "cross": "high"}, "must be a number"),
    ({"spec": "fp8:token", "cross": 0.15}, "not a per-token integer spec"),
    ({"spec": "int8:tensor:sym", "cross": 0.15}, "not a per-token integer spec"),
    ({"spec": "int8:token:mse", "cross": 0.15}, "drop ':mse'"),
])
def test_bad_crossquant_arguments_fail_in_one_line(args, message):
    with pytest.raises(SpecError, match=message) as e:
        load_recipe({"steps": [{"act_quant": args}]})
    assert "\n" not in str(e.value)


def test_builtin_crossquant_recipes_load():
    for name in ["crossquant-w8a8", "crossquant-w4a8"]:
        act, rtn = load_recipe(name).steps
        assert act.alpha == crossquant.ALPHA and str(act.qspec) == "int8:token:sym" and rtn.name == "rtn"
