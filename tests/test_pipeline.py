"""The calibration pipeline: staged block forward, block-by-block GPTQ against a whole-model run."""

from __future__ import annotations

import copy

import pytest
import torch

import bitsmith
from bitsmith.algorithms.gptq import GPTQ, Hessian
from bitsmith.models import adapter_for, load_model
from bitsmith.pipeline import capture_block_inputs, run_block
from bitsmith.runtime.modules import QuantLinear


def _tokens(n=6, seq=24, seed=0):
    return torch.randint(3, 96, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2"])
def test_staged_blocks_equal_the_model_forward(which, request):
    _, model = request.getfixturevalue(which)
    model = copy.deepcopy(model)
    ad = adapter_for(model)
    tokens = _tokens()
    with torch.no_grad():
        ref = model(input_ids=tokens, output_hidden_states=True).hidden_states
        hidden, kwargs = capture_block_inputs(model, ad, tokens, chunk_tokens=48)  # 2 sequences a chunk
        assert len(hidden) == 3
        assert torch.equal(torch.cat(hidden), ref[0])
        for i, block in enumerate(ad.blocks()):
            run_block(ad, block, hidden, kwargs, solvers=[])
            got = torch.cat(hidden)
            expected = ref[i + 1] if i + 1 < len(ad.blocks()) else None
            if expected is None:  # the last entry of hidden_states is after the final norm
                got, expected = ad.final_norm()(got), ref[-1]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _whole_model_gptq(model, tokens, step):
    """Reference: for each group of linears in order, run the *whole* model (earlier groups already
    quantized) over all tokens with a hook on the group's input, then solve it."""
    ad = adapter_for(model)
    groups = [("q", "k", "v"), ("o",), ("gate", "up"), ("down",)]
    for block in ad.blocks():
        for roles in groups:
            linears = ad.block_linears(block)
            acc = Hessian(linears[roles[0]].weight.shape[1])
            handle = linears[roles[0]].register_forward_pre_hook(lambda m, a: acc.add(a[0]))
            with torch.no_grad():
                model(input_ids=tokens, use_cache=False)
            handle.remove()
            for role, module in step.solve({r: linears[r] for r in roles}, acc.value()).items():
                ad.set_block_linear(block, role, module)
    return model


@pytest.mark.parametrize("spec", ["int4:g16:asym", "int3:channel"])
def test_block_by_block_equals_whole_model_run(tiny_llama, spec):
    folder, _ = tiny_llama
    tokens = _tokens()
    step = GPTQ(weights=spec)
    ref = _whole_model_gptq(load_model(str(folder)).model, tokens, step)

    lm = load_model(str(folder))
    from bitsmith.pipeline import Context, run_calibrated

    ctx = Context(lm, None, progress=False)
    ctx._calib = tokens
    run_calibrated(ctx, [step])
    ad_ref, ad = adapter_for(ref), lm.adapter
    total = equal = 0
    for b_ref, b in zip(ad_ref.blocks(), ad.blocks()):
        for role, q in ad.block_linears(b).items():
            r = ad_ref.block_linears(b_ref)[role]
            assert isinstance(q, QuantLinear) and isinstance(r, QuantLinear)
            total += q.weight.numel()
            equal += (q.weight == r.weight).sum().item()
    assert equal / total > 0.999  # chunked vs whole-batch Hessians differ only by float rounding
    with torch.no_grad():
        a = lm.model(input_ids=tokens).logits
        b = ref(input_ids=tokens).logits
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_gptq_recipe_is_deterministic_and_round_trips(tiny_llama, tmp_path, calib_file):
    folder, _ = tiny_llama
    recipe = {"name": "gptq-tiny", "calibration": {"samples": 8, "seq": 32},
              "steps": [{"gptq": {"weights": "int4:g32:asym:mse", "lm_head": True}}]}
    a = bitsmith.quantize(str(folder), recipe, out=str(tmp_path / "a"), calib=calib_file, seed=3, progress=False)
    b = bitsmith.quantize(str(folder), recipe, calib=calib_file, seed=3, progress=False)
    c = bitsmith.quantize(str(folder), recipe, calib=calib_file, seed=4, progress=False)
    tokens = _tokens()
    with torch.no_grad():
        la, lb, lc = (m.model(input_ids=tokens).logits for m in (a, b, c))
        assert torch.equal(la, lb)
        assert not torch.equal(la, lc)  # another seed draws other calibration windows
        assert isinstance(a.adapter.lm_head(), QuantLinear) and a.quant["calibration"] == {"samples": 8, "seq": 32}
        back = load_model(str(tmp_path / "a"))
        assert torch.equal(back.model(input_ids=tokens).logits, la)


def test_gptq_composes_with_activation_and_kv_quantization(tiny_llama, calib_file):
    folder, _ = tiny_llama
    recipe = {"name": "gptq-w4a8kv8", "calibration": {"samples": 4, "seq": 32}, "steps": [
        {"gptq": {"weights": "int4:channel"}},
        {"act_quant": {"spec": "int8:token:asym"}},
        {"kv_quant": {"key": "int8:head:asym", "value": "int8:head:asym"}},
    ]}
    lm = bitsmith.quantize(str(folder), recipe, calib=calib_file, progress=False)
    for block in lm.adapter.blocks():
        for q in lm.adapter.block_linears(block).values():
            assert q.packed is not None and str(q.packed.spec) == "int4:channel:sym"
            assert q.act_spec is not None and q.act_spec.bits == 8
        assert lm.adapter.attention(block).bitsmith_kv is not None
    with torch.no_grad():
        assert torch.isfinite(lm.model(input_ids=_tokens()).logits).all()


def test_gptq_builtin_recipes_load():
    from bitsmith.recipes import load_recipe

    for name in ["gptq-w4a16-g64", "gptq-w4a16", "gptq-w3a16-g64", "gptq-w2a16-g32"]:
        rec = load_recipe(name)
        assert rec.steps[0].calibrated and rec.calibration == {"samples": 128, "seq": 512}


SMOOTH_RTN = [("smoothquant", {"alpha": "search"}), ("act_quant", {"spec": "int8:tensor:sym", "static": True}),
              ("rtn", {"weights": "int4:g16:asym"})]  # folds the o and down input scales into v and up


@pytest.mark.parametrize("recipe", [[("gptq", {"weights": "int4:g16:asym"})], SMOOTH_RTN], ids=["gptq", "smoothquant"])
def test_inner_activations_kept_or_computed_again_give_the_same_result(tiny_llama, recipe):
    """run_block keeps a branch's inner activations within ``hold_bytes`` and computes the others
    again for the branch output: all, some or none kept, the blocks and their outputs are the same,
    also when a step folds a change of that input into the layers producing it (smoothquant)."""
    import math

    from bitsmith.pipeline import Context
    from bitsmith.registry import make_step

    folder, _ = tiny_llama
    tokens = _tokens()
    results = []
    for hold in (math.inf, "one chunk", 0):
        lm = load_model(str(folder))
        ad = lm.adapter
        steps = [make_step(name, args) for name, args in recipe]
        ctx = Context(lm, None, progress=False)
        ctx._calib = tokens
        with torch.no_grad():
            for s in steps:
                s.prepare(ctx)
            hidden, kwargs = capture_block_inputs(lm.model, ad, tokens, chunk_tokens=48)  # 3 chunks
            if hold == "one chunk":  # one attention chunk fits (its inner is as wide as the hidden states), no MLP chunk
                hold = hidden[0].nbytes
            solvers = [s for s in steps if s.calibrated and not s.transforms_inputs]
            transformers = [s for s in steps if s.transforms_inputs]
            for block in ad.blocks():
                for s in steps:
                    s.apply_block(ctx, block)
                run_block(ad, block, hidden, kwargs, solvers, transformers, ctx, hold_bytes=hold)
        results.append((torch.cat(hidden), {k: v.clone() for k, v in lm.model.state_dict().items()}))
    (h_ref, sd_ref), *others = results
    assert any(isinstance(m, QuantLinear) for m in lm.model.modules())
    for h, sd in others:
        assert torch.equal(h, h_ref)
        assert sd.keys() == sd_ref.keys() and all(torch.equal(sd[k], sd_ref[k]) for k in sd)
