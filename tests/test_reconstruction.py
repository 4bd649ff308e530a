"""Block reconstruction (FlexRound, LRQ, CBQ): RTN at iteration 0, frozen weights equal to the learned
ones, a plain reference formula, less block output error than RTN on real calibration data."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import run_steps, tokens

import bitsmith
from bitsmith.algorithms.cbq import CBQ, CBQQuantizer, outlier_threshold
from bitsmith.algorithms.flexround import FlexRoundQuantizer
from bitsmith.algorithms.lrq import LRQQuantizer
from bitsmith.algorithms.reconstruction import (
    FloatActivations,
    Reconstruction,
    TrainConfig,
    _first,
    install,
    observe_linear_inputs,
    run_blocks,
    slice_kwargs,
    train_blocks,
)
from bitsmith.errors import BitsmithError
from bitsmith.formats import gguf_blocks as gb
from bitsmith.models import load_model
from bitsmith.pipeline import capture_block_inputs
from bitsmith.recipes import load_recipe
from bitsmith.runtime.modules import QuantLinear
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import QuantSpec

SPECS = ["int4:channel:asym", "int3:g32:asym", "int4:g16:sym", "int2:tensor:asym"]


def _quantizer(kind: str, w: torch.Tensor, spec: str):
    spec = QuantSpec.parse(spec)
    gen = torch.Generator().manual_seed(1)
    if kind == "flexround":
        return FlexRoundQuantizer(w, spec)
    if kind == "lrq":
        return LRQQuantizer(w, spec, 4, gen)
    return CBQQuantizer(w, spec, 4, gen)


def _perturb(q, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("kind", ["flexround", "lrq", "cbq"])
@pytest.mark.parametrize("spec", SPECS)
def test_iteration_zero_is_rtn_exactly(kind, spec):
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    q = _quantizer(kind, w, spec)
    rtn = PackedWeight.quantize(w, QuantSpec.parse(spec))
    frozen = q.freeze()
    assert frozen.tensors().keys() == rtn.tensors().keys()
    for name, t in rtn.tensors().items():
        assert torch.equal(frozen.tensors()[name], t), name
    assert torch.equal(q.fake_weight(), rtn.dequantize())  # the training forward too, not only the frozen one


GGUF_SPECS = ["q4_0", "q5_0", "q8_0"]


@pytest.mark.parametrize("kind", ["flexround", "lrq", "cbq"])
@pytest.mark.parametrize("spec", GGUF_SPECS)
def test_gguf_iteration_zero_is_rtn_on_the_stored_grid(kind, spec):
    """On a GGUF type the start is round-to-nearest on the type's stored grid: llama.cpp's reference
    block scale, or after ``search_grid`` the importance-weighted one GPTQ uses; frozen as the type's records."""
    t = gb.TYPES[spec]
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    w[5, :32] = 0  # an all-zero block
    wb = w.reshape(48, 2, 32)
    imp = torch.rand(64, generator=torch.Generator().manual_seed(1)) ** 4
    for grid, importance in ((gb.grid_params(wb, t), None),
                             (gb.grid_params(wb, t, (imp + 1e-8 * imp.mean()).reshape(2, 32).expand(48, 2, 32), search=True), imp)):
        q = _quantizer(kind, w, spec)
        if importance is not None:
            q.search_grid(importance)
        _, values = gb.round_to_grid(wb, grid, t)
        frozen = q.freeze()
        assert str(frozen.spec) == spec and set(frozen.tensors()) == {"qblocks"}
        assert torch.equal(frozen.dequantize(), values.reshape(48, 64))
        assert torch.equal(q.fake_weight(), values.reshape(48, 64))
    ref = _quantizer(kind, w, spec)
    assert not torch.equal(q.s0, ref.s0)  # the weighted search moved the grid


def test_search_grid_is_only_for_gguf_types():
    with pytest.raises(BitsmithError, match="not a GGUF type"):
        _quantizer("flexround", torch.randn(8, 32), "int4:g32:sym").search_grid(torch.ones(32))


@pytest.mark.parametrize("kind", ["flexround", "lrq", "cbq"])
@pytest.mark.parametrize("spec", SPECS + GGUF_SPECS)
def test_frozen_weights_equal_what_the_learned_parameters_imply(kind, spec):
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    q = _quantizer(kind, w, spec)
    _perturb(q)
    implied = q.fake_weight(storage=True)
    packed = q.freeze()
    assert not torch.equal(packed.dequantize(), PackedWeight.quantize(w, QuantSpec.parse(spec)).dequantize())
    assert torch.equal(packed.dequantize(), implied)
    lin = torch.nn.Linear(64, 48)
    lin.weight.data.copy_(w)
    m = QuantLinear.from_linear(lin)
    m.set_packed(packed)
    assert torch.equal(m.weight, implied)


def test_learned_weights_match_the_papers_formulas_in_float64():
    """FlexRound ``s1*round(W/(s1*exp(S2+s3+s4)))``, LRQ ``... exp(LU+r+c)``, CBQ ``s*round(W/s + tanh(AB)/2)``,
    written out plainly per output channel (asymmetric, zero points fixed)."""
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(5))
    for kind in ("flexround", "lrq", "cbq"):
        q = _quantizer(kind, w, "int3:channel:asym")
        _perturb(q, 7)
        s = (q.s0 * torch.exp(q.log_s)).double()
        z = q.zero.double()
        wd = w.double()
        if kind == "flexround":
            x = wd / (s * torch.exp(q.log_S2 + q.log_s3 + q.log_s4).double())
        elif kind == "lrq":
            x = wd / (s * torch.exp(q.L @ q.U + q.r + q.c).double())
        else:
            x = wd / s + 0.5 * torch.tanh((q.A @ q.B).double())
        ref = (torch.clamp(torch.round(x) + z, 0, 7) - z) * s
        got = q.fake_weight().double()
        changed = (ref - got).abs() > 1e-5
        assert changed.float().mean() < 0.01, kind  # float32 vs float64 can flip a weight sitting on a half
        assert torch.allclose(got[~changed], ref[~changed], atol=1e-6), kind


def test_straight_through_rounding_gives_every_parameter_a_gradient():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(5))
    for kind in ("flexround", "lrq", "cbq"):
        q = _quantizer(kind, w, "int4:channel:asym")
        (q.fake_weight() * torch.randn(24, 40)).sum().backward()
        for name, p in q.named_parameters():
            if name not in ("U", "B"):  # U, B: their partner factor (L, A) starts at zero, so no gradient yet
                assert p.grad.abs().sum() > 0, (kind, name)


def test_lrq_learns_far_fewer_parameters_than_flexround():
    w = torch.randn(96, 128)
    spec = "int4:channel:asym"
    full, low = _quantizer("flexround", w, spec), _quantizer("lrq", w, spec)
    assert full.learned_parameters() == 96 * 128 + 96 + 128 + 96
    assert low.learned_parameters() == 4 * (96 + 128) + 96 + 128 + 96


def test_lrq_lora_init_starts_U_small_and_L_at_zero():
    w = torch.randn(48, 400)
    spec = QuantSpec.parse("int4:channel:asym")
    lora = LRQQuantizer(w, spec, 16, torch.Generator().manual_seed(0))
    normal = LRQQuantizer(w, spec, 16, torch.Generator().manual_seed(0), init="normal")
    assert torch.equal(lora.L, torch.zeros(48, 16)) and torch.equal(normal.L, torch.zeros(48, 16))
    u_lora, u_normal = lora.U.detach(), normal.U.detach()
    assert float(u_lora.abs().max()) <= 400**-0.5 and float(u_lora.std()) > 0.5 * (3 * 400) ** -0.5
    assert float(u_normal.std()) == pytest.approx(16**-0.5, rel=0.1)


@pytest.mark.parametrize("steps, message", [
    ([{"lrq": {"weights": "int4:channel:asym", "rank": 0}}], "rank"),
    ([{"flexround": {"weights": "fp4:channel"}}], "integer grids"),
    ([{"lrq": {"weights": "q4_1"}}], "q4_0"),
    ([{"cbq": {"weights": "q4_k"}}], "q4_0"),
    ([{"lrq": {"weights": "int4:ic"}}], "per ic"),
    ([{"cbq": {"weights": "int4:channel:asym", "window": 0}}], "window"),
    ([{"cbq": {"weights": "int4:channel:asym", "block_targets": "yes"}}], "block_targets"),
    ([{"lrq": {"weights": "int4:channel:asym", "init": "zeros"}}], "init"),
    ([{"flexround": {"weights": "int4:channel:asym", "iters": -1}}], "iters"),
    ([{"lrq": {"weights": "int4:channel:asym", "loss": "kl"}}], "loss 'kl' must be one of mse, normalized"),
])
def test_bad_arguments_fail_at_parse_time(steps, message):
    with pytest.raises(BitsmithError, match=message):
        load_recipe({"name": "bad", "steps": steps})


def test_rank_larger_than_the_weight_is_a_clear_error():
    with pytest.raises(BitsmithError, match="rank 80 is larger"):
        LRQQuantizer(torch.randn(48, 64), QuantSpec.parse("int4:channel:asym"), 80, torch.Generator())


def test_reconstruction_cannot_share_a_recipe_with_gptq(tiny_llama):
    folder, _ = tiny_llama
    with pytest.raises(BitsmithError, match="cannot share a recipe"):
        run_steps(load_model(str(folder)), [{"gptq": {"weights": "int4:channel:asym"}},
                                            {"lrq": {"weights": "int4:channel:asym", "iters": 1}}], tokens(4, 16))


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["flexround", "lrq", "cbq"])
def test_pipeline_at_iteration_zero_equals_rtn(tiny_llama, method):
    folder, _ = tiny_llama
    ids = tokens(2, 16, 9)
    rtn = load_model(str(folder))
    run_steps(rtn, [{"rtn": {"weights": "int3:g32:asym"}}], tokens(4, 16))
    lm = load_model(str(folder))
    args = {"weights": "int3:g32:asym", "iters": 0}
    if method == "cbq":
        args["scale_activations"] = False
    run_steps(lm, [{method: args}], tokens(4, 16))
    assert torch.equal(_logits(lm, ids), _logits(rtn, ids))


def _block_io(lm, ids) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every decoder block of ``lm`` on ``ids``."""
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, out: seen.append((a[0].clone(), _first(out)))) for b in lm.adapter.blocks()]
    _logits(lm, ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("method, window", [("flexround", 1), ("cbq", 2)])
def test_pipeline_targets_are_the_float_models_activations_and_inputs_the_quantized_ones(tiny_llama, monkeypatch,
                                                                                         method, window):
    """Block ``i`` is fed the quantized blocks' outputs and trained towards the float model's activations
    after each window block (the papers' ``||W X - W_hat X_q||``), not the float block's outputs on the
    quantized inputs; with ``float_inputs`` both are the float model's. Iteration 0: the quantized
    blocks before ``i`` are RTN."""
    folder, _ = tiny_llama
    calib = tokens(4, 16, 1)
    float_io = _block_io(load_model(str(folder)), calib)
    rtn = load_model(str(folder))
    run_steps(rtn, [{"rtn": {"weights": "int3:g32:asym"}}], calib)
    rtn_io = _block_io(rtn, calib)
    assert not torch.allclose(rtn_io[1][0], float_io[1][0], atol=1e-4)  # the streams differ
    seen = []
    orig = Reconstruction.reconstruct  # what every method's reconstruct ends in (CBQ's via super())

    def spy(self, ctx, blocks, first, inputs, kwargs, kw_batch, targets, last):
        seen.append((first, inputs.clone(), [t.clone() for t in targets]))
        return orig(self, ctx, blocks, first, inputs, kwargs, kw_batch, targets, last)

    monkeypatch.setattr(Reconstruction, "reconstruct", spy)
    for float_inputs in (False, True):
        seen.clear()
        args = {"weights": "int3:g32:asym", "iters": 0, "float_inputs": float_inputs}
        args |= {"window": window, "scale_activations": False} if method == "cbq" else {}
        run_steps(load_model(str(folder)), [{method: args}], calib)
        assert [s[0] for s in seen] == list(range(3 - window))
        for first, inputs, targets in seen:
            fed = float_io if float_inputs else rtn_io
            assert torch.allclose(inputs, fed[first][0], atol=1e-5)
            assert len(targets) == window
            for j, t in enumerate(targets):
                assert torch.allclose(t, float_io[first + j][1], atol=1e-5)


@pytest.mark.parametrize("method, args", [("flexround", {}), ("lrq", {"rank": 4}), ("cbq", {"rank": 4}),
                                          ("lrq", {"rank": 4, "float_inputs": True})])
def test_pipeline_learns_lower_block_error_than_rtn_and_is_deterministic(tiny_llama, method, args):
    folder, _ = tiny_llama
    calib = tokens(8, 24, 1)
    runs = []
    for _ in range(2):
        lm = load_model(str(folder))
        rec = run_steps(lm, [{method: {"weights": "int3:channel:asym", "iters": 30, **args}}], calib)
        runs.append(lm)
    report = rec.steps[0].report
    assert len(report) == (1 if method == "cbq" else 2)  # CBQ: one window of both blocks
    assert all(r["loss"] < 0.9 * r["loss_init"] and r["kept"] for r in report)
    ids = tokens(2, 16, 9)
    assert torch.equal(_logits(runs[0], ids), _logits(runs[1], ids))
    for m in runs[0].model.modules():
        if isinstance(m, QuantLinear):
            assert m.packed is not None and str(m.packed.spec) == "int3:channel:asym"


@pytest.mark.parametrize("method", ["flexround", "cbq"])
def test_gguf_grid_starts_from_the_importance_of_the_calibration_inputs(tiny_llama, method):
    """At iteration 0 a GGUF recipe equals round-to-nearest on the grid searched with each linear's mean
    squared calibration input (computed here from the float model: block 0 sees the same inputs); trained,
    it lowers the block error below that start and every linear holds Q4_0 records."""
    folder, _ = tiny_llama
    calib = tokens(8, 24, 1)
    lm = load_model(str(folder))
    float_lm = load_model(str(folder))
    t = gb.TYPES["q4_0"]
    lin = float_lm.adapter.block_linears(float_lm.adapter.blocks()[0])["gate"]
    seen = []
    h = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        float_lm.model(input_ids=calib)
    h.remove()
    imp = torch.cat(seen).pow(2).mean(0)
    wb = lin.weight.detach().reshape(lin.weight.shape[0], -1, 32)
    grid = gb.grid_params(wb, t, (imp + 1e-8 * imp.mean()).reshape(-1, 32).expand_as(wb), search=True)
    _, expect = gb.round_to_grid(wb, grid, t)
    args = {"weights": "q4_0", "iters": 0} | ({"rank": 4, "scale_activations": False} if method == "cbq" else {})
    run_steps(lm, [{method: args}], calib)
    got = lm.adapter.block_linears(lm.adapter.blocks()[0])["gate"]
    assert torch.allclose(got.weight, expect.reshape(got.weight.shape), rtol=0, atol=1e-6 * float(expect.abs().max()))
    lm = load_model(str(folder))
    rec = run_steps(lm, [{method: {**args, "iters": 30, "lr": 5e-3, "scale_lr": 1e-3}}], calib)
    assert all(r["kept"] and r["loss"] < 0.9 * r["loss_init"] for r in rec.steps[0].report)
    for m in lm.model.modules():
        if isinstance(m, QuantLinear):
            assert str(m.packed.spec) == "q4_0" and set(m.packed.tensors()) == {"qblocks"}


def test_per_block_targets_sum_each_blocks_own_error(tiny_llama):
    """With one target per window block, the loss is the sum of each block's mean squared error
    against its own target (iteration 0: RTN weights, nothing learned)."""
    folder, _ = tiny_llama
    lm = load_model(str(folder))
    ad = lm.adapter
    hidden, kwargs = capture_block_inputs(lm.model, ad, tokens(4, 16))
    x = torch.cat(hidden)
    blocks = ad.blocks()
    spec = QuantSpec.parse("int3:g32:asym")
    with torch.no_grad():
        t0 = run_blocks(blocks[:1], x, kwargs[0])
        t1 = run_blocks(blocks[1:], t0, kwargs[0])
        qs = [{r: CBQQuantizer(lin.weight, spec, 4, torch.Generator().manual_seed(j))
               for r, lin in ad.block_linears(b).items()} for j, b in enumerate(blocks)]
        rtn = copy.deepcopy(blocks)
        for b, q in zip(rtn, qs):
            install(ad, b, q)
        o0 = run_blocks(rtn[:1], x, kwargs[0])
        o1 = run_blocks(rtn[1:], o0, kwargs[0])
    cfg = TrainConfig(0, 2, 1e-2, 1e-3, 0, 0)
    both = train_blocks(ad, blocks, qs, x, kwargs[0], x.shape[0], [t0, t1], cfg, progress=False)
    last = train_blocks(ad, blocks, qs, x, kwargs[0], x.shape[0], t1, cfg, progress=False)
    expect = float((o0 - t0).pow(2).mean() + (o1 - t1).pow(2).mean())
    assert both.loss_init == pytest.approx(expect, rel=1e-5)
    assert last.loss_init == pytest.approx(float((o1 - t1).pow(2).mean()), rel=1e-5)
    with pytest.raises(BitsmithError, match="2 blocks"):
        train_blocks(ad, blocks, qs, x, kwargs[0], x.shape[0], [t1], cfg, progress=False)


def test_normalized_loss_weighs_each_token_by_its_targets_mean_square(tiny_llama):
    """``loss: normalized``: every token's squared error is divided by its target's mean square (so a token
    with a huge activation, an attention sink, weighs no more than any other); checked at iteration 0 against
    the plain formula, on targets whose first token is 1000x the others, and a recipe with it learns."""
    folder, _ = tiny_llama
    lm = load_model(str(folder))
    ad = lm.adapter
    hidden, kwargs = capture_block_inputs(lm.model, ad, tokens(4, 16))
    x = torch.cat(hidden)
    block = ad.blocks()[0]
    spec = QuantSpec.parse("int3:g32:asym")
    with torch.no_grad():
        t = run_blocks([block], x, kwargs[0])
        t[:, 0] *= 1000
        qs = {r: LRQQuantizer(lin.weight, spec, 4, torch.Generator().manual_seed(0))
              for r, lin in ad.block_linears(block).items()}
        rtn = copy.deepcopy(block)
        install(ad, rtn, qs)
        e = (run_blocks([rtn], x, kwargs[0]) - t).pow(2)
    plain = train_blocks(ad, [block], [qs], x, kwargs[0], x.shape[0], t, TrainConfig(0, 2, 1e-2, 1e-3, 0, 0),
                         progress=False)
    norm = train_blocks(ad, [block], [qs], x, kwargs[0], x.shape[0], t, TrainConfig(0, 2, 1e-2, 1e-3, 0, 0, "normalized"),
                        progress=False)
    per_token = e / t.pow(2).mean(-1, keepdim=True)
    assert plain.loss_init == pytest.approx(float(e.mean()), rel=1e-5)
    assert norm.loss_init == pytest.approx(float(per_token.mean()), rel=1e-5)
    with pytest.raises(BitsmithError, match="loss 'l1'"):
        train_blocks(ad, [block], [qs], x, kwargs[0], x.shape[0], t, TrainConfig(0, 2, 1e-2, 1e-3, 0, 0, "l1"),
                     progress=False)
    lm = load_model(str(folder))
    rec = run_steps(lm, [{"lrq": {"weights": "int3:channel:asym", "iters": 30, "rank": 4, "lr": 5e-3,
                                  "loss": "normalized"}}], tokens(8, 24, 1))
    assert all(r["kept"] and r["loss"] < 0.9 * r["loss_init"] for r in rec.steps[0].report)


def test_cbq_block_targets_learn_every_window_block(tiny_llama):
    folder, _ = tiny_llama
    lm = load_model(str(folder))
    rec = run_steps(lm, [{"cbq": {"weights": "int3:channel:asym", "iters": 30, "rank": 4, "block_targets": True}}],
                    tokens(8, 24, 1))
    report = rec.steps[0].report
    assert len(report) == 1 and report[0]["window"] == 2
    assert report[0]["kept"] and report[0]["loss"] < 0.9 * report[0]["loss_init"]


def test_w4a8_keeps_activation_quantization_and_learns_under_it(tiny_llama):
    folder, _ = tiny_llama
    lm = load_model(str(folder))
    rec = run_steps(lm, [{"act_quant": {"spec": "int8:token:asym"}},
                         {"lrq": {"weights": "int4:channel:asym", "iters": 30, "rank": 4, "lr": 5e-3}}], tokens(8, 24, 1))
    assert all(r["loss"] < r["loss_init"] for r in rec.steps[1].report)
    linears = [m for m in lm.model.model.layers.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 14
    assert all(str(m.act_spec) == "int8:token:asym" and m.packed is not None for m in linears)


def test_after_smoothing_the_block_is_learned_as_it_will_run(tiny_llama):
    """SmoothQuant (an input-transforming step) runs on each block before its weights are learned."""
    folder, _ = tiny_llama
    lm = load_model(str(folder))
    rec = run_steps(lm, [{"smoothquant": {}}, {"act_quant": {"spec": "int8:token:asym"}},
                         {"flexround": {"weights": "int4:channel:asym", "iters": 10}}], tokens(8, 24, 1))
    assert len(rec.steps[2].report) == 2
    norm = lm.model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(norm, torch.ones_like(norm))  # smoothing folded its scales into the norm


def test_streamed_reconstruction_equals_in_memory(tiny_llama, tmp_path, calib_file):
    folder, _ = tiny_llama
    rec = {"name": "lrq-t", "calibration": {"samples": 4, "seq": 24},
           "steps": [{"lrq": {"weights": "int4:channel:asym", "iters": 5, "rank": 4}}]}
    bitsmith.quantize(str(folder), rec, out=str(tmp_path / "mem"), calib=calib_file, progress=False)
    bitsmith.quantize(str(folder), rec, out=str(tmp_path / "str"), calib=calib_file, progress=False, stream=True)
    ids = tokens(2, 16, 9)
    assert torch.equal(_logits(load_model(str(tmp_path / "mem")), ids), _logits(load_model(str(tmp_path / "str")), ids))
    cbq = {**rec, "name": "cbq-t", "steps": [{"cbq": {"weights": "int4:channel:asym", "iters": 1}}]}
    with pytest.raises(BitsmithError, match="streamed"):
        bitsmith.quantize(str(folder), cbq, out=str(tmp_path / "cbq"), calib=calib_file, progress=False, stream=True)


def test_outlier_threshold_separates_the_far_values():
    v = torch.cat([torch.linspace(0, 1, 100), torch.tensor([3.0, 3.2, 9.0, 9.5])])
    assert outlier_threshold(v) == pytest.approx(3.2)  # 3.0/3.2 rejoin the inliers; 9, 9.5 are the outliers
    assert outlier_threshold(torch.linspace(0, 1, 50)) == pytest.approx(1.0)


def test_cbq_activation_scaling_preserves_the_float_block(tiny_llama):
    folder, _ = tiny_llama
    lm = load_model(str(folder))
    ad = lm.adapter
    block = ad.blocks()[0]
    for role, lin in ad.block_linears(block).items():
        ad.set_block_linear(block, role, QuantLinear.from_linear(lin, QuantSpec.parse("int8:token:asym")))
    with torch.no_grad():
        block.input_layernorm.weight[5] *= 40  # an outlier channel in the q/k/v input
    from bitsmith.pipeline import Context, capture_block_inputs

    hidden, kwargs = capture_block_inputs(lm.model, ad, tokens(4, 16))
    x = torch.cat(hidden)
    step = CBQ(weights="int4:channel:asym")
    with torch.no_grad():
        with FloatActivations([block]):
            before = run_blocks([block], x, kwargs[0])
        step._scale_activation_outliers(Context(lm, None, progress=False), [block], x, kwargs[0], x.shape[0])
        with FloatActivations([block]):
            after = run_blocks([block], x, kwargs[0])
    assert step.scaled_channels >= 1
    assert block.input_layernorm.weight[5].abs() < 40 * 0.5
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def real_block0(default_lm):
    """Block 0 of the default model (a copy), its inputs on 12 real calibration windows of 128 tokens
    (8 to train, 4 held out) and the float block's outputs."""
    from bitsmith.data.text import builtin_text, calibration_batch
    from bitsmith.pipeline import capture_block_inputs

    ad = default_lm.adapter
    toks = calibration_batch(default_lm.tokenizer, builtin_text("calib"), 12, 128, seed=0)
    with torch.no_grad():
        hidden, kwargs = capture_block_inputs(default_lm.model, ad, toks)
        x = torch.cat(hidden)
        y = run_blocks([ad.blocks()[0]], x, kwargs[0])
    return ad, copy.deepcopy(ad.blocks()[0]), x, y, kwargs[0], hidden[0].shape[0]


@pytest.mark.parametrize("kind", ["flexround", "lrq", "cbq"])
def test_block_output_error_below_rtn_on_real_calibration_data(real_block0, kind):
    ad, block, x, y, kw, kw_batch = real_block0
    block = copy.deepcopy(block)
    spec = QuantSpec.parse("int3:channel:asym")
    gen = torch.Generator().manual_seed(0)
    make = {"flexround": lambda w: FlexRoundQuantizer(w, spec), "lrq": lambda w: LRQQuantizer(w, spec, 8, gen),
            "cbq": lambda w: CBQQuantizer(w, spec, 8, gen)}[kind]
    qs = {r: make(lin.weight) for r, lin in ad.block_linears(block).items()}
    res = train_blocks(ad, [block], [qs], x[:8], kw, kw_batch, y[:8], TrainConfig(25, 2, 5e-3, 2e-3, 0, 0), progress=False)
    assert res.kept and res.loss < 0.85 * res.loss_init
    rtn = copy.deepcopy(block)
    for r, lin in ad.block_linears(rtn).items():
        q = QuantLinear.from_linear(lin)
        q.set_packed(PackedWeight.quantize(lin.weight, spec))
        ad.set_block_linear(rtn, r, q)
    install(ad, block, qs)
    with torch.no_grad():
        kw4 = slice_kwargs(kw, kw_batch, 4)
        err = (run_blocks([block], x[8:], kw4) - y[8:]).pow(2).mean()
        err_rtn = (run_blocks([rtn], x[8:], kw4) - y[8:]).pow(2).mean()
    assert err < 0.9 * err_rtn, (kind, float(err), float(err_rtn))


def test_q4_0_flexround_beats_its_importance_weighted_start_on_real_data(real_block0):
    """The flexround-q4_0 setting on block 0 of the default model: started from the importance-weighted
    Q4_0 grid (the importance-matrix quantization), training lowers the held-out block error below it."""
    ad, block, x, y, kw, kw_batch = real_block0
    block = copy.deepcopy(block)
    spec = QuantSpec.parse("q4_0")
    imp = {}
    observe_linear_inputs([block], ad.block_linears(block), x[:8], kw, kw_batch,
                          lambda r, v: imp.__setitem__(r, imp.get(r, 0) + v.pow(2).reshape(-1, v.shape[-1]).sum(0)))
    qs = {r: FlexRoundQuantizer(lin.weight, spec) for r, lin in ad.block_linears(block).items()}
    for r, q in qs.items():
        q.search_grid(imp[r])
    start = copy.deepcopy(block)
    install(ad, start, copy.deepcopy(qs))
    res = train_blocks(ad, [block], [qs], x[:8], kw, kw_batch, y[:8], TrainConfig(25, 2, 5e-3, 1.25e-3, 0, 0), progress=False)
    assert res.kept and res.loss < 0.9 * res.loss_init
    install(ad, block, qs)
    with torch.no_grad():
        kw4 = slice_kwargs(kw, kw_batch, 4)
        err = (run_blocks([block], x[8:], kw4) - y[8:]).pow(2).mean()
        err_start = (run_blocks([start], x[8:], kw4) - y[8:]).pow(2).mean()
    assert err < 0.95 * err_start, (float(err), float(err_start))


def test_after_a_rotation_iteration_zero_still_equals_rtn(tiny_llama):
    """QuaRot (folded rotations and online Hadamards) first: the learned steps see the rotated block."""
    folder, _ = tiny_llama
    ids = tokens(2, 16, 9)
    rtn = load_model(str(folder))
    run_steps(rtn, [{"quarot": {}}, {"rtn": {"weights": "int4:channel:asym"}}], tokens(4, 16))
    lm = load_model(str(folder))
    run_steps(lm, [{"quarot": {}}, {"lrq": {"weights": "int4:channel:asym", "iters": 0, "rank": 4}}], tokens(4, 16))
    assert torch.equal(_logits(lm, ids), _logits(rtn, ids))
    assert lm.adapter.blocks()[0].mlp.down_proj.input_transform is not None
