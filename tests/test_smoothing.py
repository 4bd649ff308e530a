"""SmoothQuant and OS+ (smoothing/shifting folded into the model) and static activation scales."""

from __future__ import annotations

import copy

import pytest
import torch

import bitsmith
from bitsmith.errors import BitsmithError, SpecError
from bitsmith.models import load_model
from bitsmith.recipes import load_recipe
from bitsmith.runtime.modules import QuantLinear
from bitsmith.runtime.online import OnlineShift
from helpers import lm_logits as _logits, rel as _rel, run_steps, tokens as _tokens

STATIC8 = {"act_quant": {"spec": "int8:tensor:sym", "static": True}}



@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("step", [{"smoothquant": {"alpha": 0.5}}, {"osplus": {"threshold": 0.05}}])
def test_smoothing_alone_keeps_the_float_function(which, step, request):
    folder, _ = request.getfixturevalue(which)
    tokens = _tokens()
    ref = _logits(load_model(str(folder)), tokens)
    lm = load_model(str(folder))
    run_steps(lm, [step], _tokens(8, 32, seed=1))
    assert _rel(_logits(lm, tokens), ref) < 1e-5
    block = lm.adapter.blocks()[0]
    fresh = load_model(str(folder)).adapter.blocks()[0]
    assert not torch.allclose(block.input_layernorm.weight, fresh.input_layernorm.weight, rtol=1e-3)  # it really acted
    lin = lm.adapter.block_linears(block)
    if "osplus" in step:  # shift: online after the norms, in v's bias for o, nothing for down
        assert isinstance(lin["q"].input_transform, OnlineShift) and isinstance(lin["gate"].input_transform, OnlineShift)
        assert lin["v"].bias is not None and lin["o"].bias is not None
        assert getattr(lin["down"], "input_transform", None) is None


def test_smoothing_keeps_the_default_model_function(default_lm):
    """The real model (GQA 9/3 heads, outlier channels): smoothing and shifting alone leave its logits unchanged."""
    from bitsmith.data.text import builtin_text

    ids = default_lm.tokenizer(builtin_text("eval").text[:4000], return_tensors="pt").input_ids[:, :128]
    calib = default_lm.tokenizer(builtin_text("calib").text[:4000], return_tensors="pt").input_ids[:, :256].reshape(2, 128)
    ref = _logits(default_lm, ids)
    lm = copy.deepcopy(default_lm)
    run_steps(lm, [{"smoothquant": {"alpha": 0.5}}, {"osplus": {"threshold": 0.1}}], calib)
    assert _rel(_logits(lm, ids), ref) < 1e-5


def _plain_smoothing_scales(x, weights, alpha):
    """Reference: s_j = max_t |x_tj|^alpha / max_{i,o} |W_i[o, j]|^(1 - alpha), one channel at a time."""
    s = []
    for j in range(x.shape[1]):
        a = max(abs(float(v)) for v in x[:, j])
        w = max(abs(float(v)) for wt in weights for v in wt[:, j])
        s.append(max(a, 1e-5) ** alpha / max(w, 1e-5) ** (1 - alpha))
    return torch.tensor(s, dtype=torch.float64)


def test_smoothing_scales_match_the_reference_formula(tiny_llama):
    """On fresh random inputs: the q/k/v scale (through the norm) and the GQA-shared o scale (through v)."""
    folder, model = tiny_llama
    calib = _tokens(6, 24, seed=7)
    caught = {}

    def keep(name):
        def hook(_m, args):
            caught[name] = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        return hook

    attn = model.model.layers[0].self_attn
    handles = [attn.q_proj.register_forward_pre_hook(keep("qkv")), attn.o_proj.register_forward_pre_hook(keep("o"))]
    with torch.no_grad():
        model(input_ids=calib)
    for h in handles:
        h.remove()
    lm = load_model(str(folder))
    old = copy.deepcopy(lm.adapter.blocks()[0])
    run_steps(lm, [{"smoothquant": {"alpha": 0.6}}], calib)
    new = lm.adapter.blocks()[0]

    ref = _plain_smoothing_scales(caught["qkv"], [old.self_attn.q_proj.weight, old.self_attn.k_proj.weight,
                                                  old.self_attn.v_proj.weight], 0.6)
    got = old.input_layernorm.weight.double() / new.input_layernorm.weight.double()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)

    heads, kv, hd = 4, 2, 16  # o: channel (head h, d) is fed by v's (kv head h // 2, d); the scale is shared
    per_q = _plain_smoothing_scales(caught["o"], [old.self_attn.o_proj.weight], 0.6)  # without the sharing
    x = caught["o"].reshape(-1, heads, hd)
    w = old.self_attn.o_proj.weight.double().reshape(-1, heads, hd)
    ref_kv = torch.empty(kv, hd, dtype=torch.float64)
    for g in range(kv):
        for d in range(hd):
            a = max(float(x[:, h, d].abs().max()) for h in range(g * 2, g * 2 + 2))
            m = max(float(w[:, h, d].abs().max()) for h in range(g * 2, g * 2 + 2))
            ref_kv[g, d] = a ** 0.6 / m ** 0.4
    v_cols_smoothed = old.self_attn.v_proj.weight.double() * got  # v also reads the smoothed q/k/v input
    got_kv = (v_cols_smoothed / new.self_attn.v_proj.weight.double()).mean(1).reshape(kv, hd)
    torch.testing.assert_close(got_kv, ref_kv, rtol=1e-4, atol=0)
    assert not torch.allclose(per_q.reshape(heads, hd)[0::2], ref_kv, rtol=1e-3)  # sharing mattered


def test_static_scales_save_and_reload_bit_identical(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    steps = [{"osplus": {}}, {"act_quant": {"spec": "int8:tensor:asym", "static": True}}, {"rtn": {"weights": "int8:channel"}}]
    lm = load_model(str(folder))
    recipe = run_steps(lm, steps, _tokens(8, 32, seed=1))
    lm.quant = {"recipe": "t", "source": str(folder)}
    from bitsmith.checkpoint import save_quantized

    save_quantized(lm, tmp_path / "q", recipe.to_yaml())
    again = bitsmith.load_model(str(tmp_path / "q"))
    q = again.adapter.block_linears(again.adapter.blocks()[1])
    assert q["up"].act_static and q["up"].act_scale is not None and q["up"].act_zero is not None
    assert isinstance(q["q"].input_transform, OnlineShift)
    tokens = _tokens(seed=2)
    assert torch.equal(_logits(lm, tokens), _logits(again, tokens))
    # the static grid is what runs: a live-range (dynamic) grid gives other logits
    for lin in again.adapter.block_linears(again.adapter.blocks()[0]).values():
        lin.act_static = False
    assert not torch.equal(_logits(again, tokens), _logits(lm, tokens))


def test_static_scale_is_calibrated_from_the_smoothed_range(tiny_llama):
    folder, _ = tiny_llama
    lm = load_model(str(folder))
    recipe = run_steps(lm, [{"smoothquant": {"alpha": 0.5}}, {"act_quant": {"spec": "int8:tensor:sym", "static": True,
                                                                         "clip_search": False}}], _tokens(8, 32, seed=1))
    block = lm.adapter.blocks()[0]
    x = []
    h = block.self_attn.q_proj.register_forward_pre_hook(lambda m, a: x.append(a[0].reshape(-1, a[0].shape[-1])))
    # the q/k/v input of block 0 is the (smoothed) norm of the embeddings: its range sets the scale
    with torch.no_grad():
        lm.model(input_ids=_tokens(8, 32, seed=1))
    h.remove()
    absmax = torch.cat(x).abs().max()
    q = block.self_attn.q_proj
    assert q.act_scale.item() == pytest.approx(absmax.item() / 127, rel=1e-4)
    assert recipe.steps[1].ratios[0]["ratio"] == 1.0


def test_uncalibrated_static_linear_refuses_to_run():
    lin = QuantLinear(torch.randn(4, 8), act_spec=bitsmith.QuantSpec.parse("int8:tensor"), act_static=True)
    with pytest.raises(BitsmithError, match="not calibrated"):
        lin(torch.randn(2, 8))


def _shift_problem(x, aspec, static):
    from bitsmith.algorithms.smoothing import GroupProblem
    from bitsmith.spec import QuantSpec

    w = torch.randn(16, x.shape[1], generator=torch.Generator().manual_seed(3))
    return GroupProblem(x, torch.ones(x.shape[0], dtype=torch.float64), x.double().amin(0), x.double().amax(0), [w],
                        [None], QuantSpec.coerce(aspec), static)


@pytest.mark.parametrize("case", ["one-token outlier, per-token grid", "offset channel, static grid"])
def test_osplus_searches_the_shift(case):
    """``shift: search`` keeps the paper's midpoint shift where it lowers the quantized output error and drops it
    where it raises it, and its error is never above either forced choice (on the same problem)."""
    from bitsmith.algorithms.osplus import OSPlus
    from bitsmith.algorithms.smoothing import ChannelMap

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    if case.startswith("one-token"):  # the first token is massive in channel 0: its midpoint moves every other token
        x[0, 0] = 400.0
        aspec, static, want_shift = "int4:token:asym", False, False
    else:  # channel 0 sits far from zero in every token: centring it frees the shared static grid
        x[:, 0] += 50.0
        aspec, static, want_shift = "int4:tensor:sym", True, True
    problem = _shift_problem(x, aspec, static)
    cmap = ChannelMap(torch.arange(8), 8)

    def err(shift):
        z, s, label = OSPlus(shift=shift).choose(problem, cmap, None)
        return problem.error(s, z), z, label

    searched, z, label = err("search")
    assert (z is not None) == want_shift and label["shift"] == want_shift
    assert searched <= min(err(True)[0], err(False)[0])
    assert err(True)[1] is not None and err(False)[1] is None
    from torch import nn

    from bitsmith.models.adapter import PRODUCT, Sublayer

    mlp = Sublayer(nn.Identity(), nn.Identity(), ("gate", "up"), "down", False, "up", PRODUCT)
    assert OSPlus(shift="search").choose(problem, cmap, mlp)[0] is None  # down's input cannot take a shift


@pytest.mark.parametrize("steps, message", [
    ([{"smoothquant": {"alpha": 1.5}}], "alpha must be a number in"),
    ([{"smoothquant": {"alpha": 0}}], "alpha must be a number in"),
    ([{"smoothquant": {"alpha": "best"}}], "alpha must be a number in"),
    ([{"smoothquant": {"layers": "some"}}], "layers must be one of"),
    ([{"osplus": {"threshold": 2.0}}], "threshold must be"),
    ([{"osplus": {"shift": "yes"}}], "shift must be true, false or search"),
    ([{"act_quant": {"spec": "int8:token:asym", "static": True}}], "per-token scales are dynamic"),
    ([{"act_quant": {"spec": "int8:tensor:mse", "static": True}}], "drop ':mse'"),
])
def test_bad_arguments_fail_in_one_line(steps, message):
    with pytest.raises(SpecError, match=message) as e:
        load_recipe({"steps": steps})
    assert "\n" not in str(e.value)


def test_wrong_step_order_is_explained(tiny_llama):
    folder, _ = tiny_llama
    with pytest.raises(BitsmithError, match="put smoothquant before the weight step"):
        run_steps(load_model(str(folder)), [{"rtn": {"weights": "int8:channel"}}, {"smoothquant": {}}], _tokens(4, 16))
    with pytest.raises(BitsmithError, match="solved by a calibrated step"):  # one scale for all rows: no fold
        run_steps(load_model(str(folder)), [{"smoothquant": {}}, {"gptq": {"weights": "int8:tensor"}}], _tokens(4, 16))
    run_steps(load_model(str(folder)), [{"smoothquant": {"layers": "norms"}}, {"gptq": {"weights": "int4:channel"}}], _tokens(4, 16))
    with pytest.raises(BitsmithError, match="after smoothquant"):
        run_steps(load_model(str(folder)), [STATIC8, {"smoothquant": {}}], _tokens(4, 16))


def test_builtin_recipes_load():
    for name in ["smoothquant-w8a8", "osplus-w8a8", "smoothquant-w6a6", "osplus-w6a6", "smoothquant-w4a4", "osplus-w4a4"]:
        rec = load_recipe(name)
        smooth, act, weights = rec.steps
        solver = "gptq" if name == "osplus-w8a8" else "rtn"  # W8A8 static: OS+ searched against GPTQ's grid
        assert smooth.transforms_inputs and weights.name == solver and rec.calibration == {"samples": 128, "seq": 512}
        assert act.static == name.endswith("w8a8") and act.transforms_inputs == act.static


# -- real calibration inputs: the quantized layers' output error ---------------------------------------


@pytest.fixture(scope="module")
def three_blocks(default_lm):
    """The default model cut to its first three blocks, with calibration and held-out windows."""
    from bitsmith.data.text import builtin_text

    lm = copy.deepcopy(default_lm)
    lm.model.model.layers = lm.model.model.layers[:3]
    lm.model.config.num_hidden_layers = 3
    tok = default_lm.tokenizer
    calib = tok(builtin_text("calib").text[:60000], return_tensors="pt").input_ids[:, :16 * 128].reshape(16, 128)
    held = tok(builtin_text("eval").text[:20000], return_tensors="pt").input_ids[:, :2 * 256].reshape(2, 256)
    return lm, calib, held


def _block_output_error(three_blocks, steps):
    """Relative error of the last block's output (before the final norm) on held-out text."""
    lm0, calib, held = three_blocks

    def last_hidden(lm):
        with torch.no_grad():
            return lm.model(input_ids=held, output_hidden_states=True).hidden_states[-2].double()

    ref = last_hidden(lm0)
    lm = copy.deepcopy(lm0)
    run_steps(lm, steps, calib)
    return _rel(last_hidden(lm), ref)


@pytest.mark.parametrize("setting", ["w8a8-static", "w4a4"])
def test_smoothing_beats_rtn_on_real_inputs(three_blocks, setting, monkeypatch):
    """Searched on calibration rows, judged on held-out text: the blocks' output error is lower than RTN's
    at the setting each paper targets, on the same grids (the static RTN scales are calibrated and clip-searched the same way)."""
    from bitsmith.algorithms import smoothing

    monkeypatch.setattr(smoothing, "TAP_ROWS", 256)  # fewer kept rows: a faster search, same behaviour
    monkeypatch.setattr(smoothing, "TAP_HEAVY", 32)
    w, a = {"w8a8-static": ("int8:channel:sym", STATIC8["act_quant"]),
            "w4a4": ("int4:channel:sym:mse", {"spec": "int4:token:asym"})}[setting]
    rtn = _block_output_error(three_blocks, [{"act_quant": a}, {"rtn": {"weights": w}}])
    sq = _block_output_error(three_blocks, [{"smoothquant": {"alpha": "search"}}, {"act_quant": a}, {"rtn": {"weights": w}}])
    osp = _block_output_error(three_blocks, [{"osplus": {}}, {"act_quant": a}, {"rtn": {"weights": w}}])
    # Each paper's claim: SmoothQuant targets W8A8 (static per-tensor is its hard case); OS+ also wins at
    # W4A4, where SmoothQuant alone is known to fall short (as the OS+ paper reports), and is never worse there.
    assert osp < 0.8 * rtn, (rtn, sq, osp)
    if setting == "w8a8-static":
        assert sq < 0.8 * rtn, (rtn, sq, osp)
    else:
        assert osp <= sq, (rtn, sq, osp)


@pytest.mark.parametrize("spec", ["int8:channel:sym", "int4:g16:asym:mse", "fp8:channel"])
def test_scale_rows_keeps_codes_and_scales_each_row(spec):
    from bitsmith.runtime.qweight import PackedWeight
    from bitsmith.spec import QuantSpec

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(12, 64, generator=gen)
    f = torch.rand(12, generator=gen, dtype=torch.float64) * 4 + 0.25
    p = PackedWeight.quantize(w, QuantSpec.coerce(spec))
    q = p.scale_rows(f)
    assert all(torch.equal(q.data[k], p.data[k]) for k in p.data if k != "qscale")
    assert torch.allclose(q.dequantize(), p.dequantize() * f[:, None].float(), rtol=2e-3, atol=1e-6)
    for other in ("int8:tensor:sym", "int4:ic:sym"):
        with pytest.raises(ValueError, match="no per-row scales"):
            PackedWeight.quantize(w, QuantSpec.coerce(other)).scale_rows(f)


@pytest.mark.parametrize("step", [{"smoothquant": {"alpha": 0.5}}, {"osplus": {"threshold": 0.05}}])
def test_fold_into_a_gptq_solved_producer_keeps_its_solution(tiny_llama, step):
    """o's and down's input scales fold into v and up after GPTQ solved them: the rows' scales take 1/s, so
    the smoothed GPTQ model stays as close to float as the smoothed RTN one (a fold into the wrong place, or
    none, would leave o/down multiplied by s with nothing undoing it)."""
    folder, _ = tiny_llama
    tokens, calib = _tokens(), _tokens(8, 32, seed=1)
    ref = _logits(load_model(str(folder)), tokens)
    errs = {}
    for solver in ("gptq", "rtn"):
        lm = load_model(str(folder))
        run_steps(lm, [step, {solver: {"weights": "int8:channel:sym"}}], calib)
        errs[solver] = _rel(_logits(lm, tokens), ref)
        lin = lm.adapter.block_linears(lm.adapter.blocks()[0])
        assert lin["v"].packed is not None and lin["up"].packed is not None
    assert errs["gptq"] < 2 * errs["rtn"] and errs["gptq"] < 0.02, errs


def test_search_weighs_the_grid_of_a_solver_that_comes_later(tiny_llama):
    """A solver after the smoothing step (GPTQ) rounds onto its grid too: the search must count that grid's
    error, as it does for RTN's, instead of treating the weights as float (which picks scales that push the
    error into the weights). Block 0's first group sees the same inputs in every recipe, so its choice is
    the same with GPTQ as with RTN, and differs from the choice for float weights. (OS+'s threshold; the
    code is the smoothing base's, shared with SmoothQuant, whose alpha on this tiny model is 0.5 for all three.)"""
    folder, _ = tiny_llama
    calib = _tokens(8, 32, seed=1)
    step, weights = {"osplus": {}}, {"weights": "int4:channel:sym"}
    chosen = {}
    for tail in ("gptq", "rtn", None):
        steps = [step, STATIC8] + ([{tail: weights}] if tail else [])
        recipe = run_steps(load_model(str(folder)), steps, calib)
        chosen[tail] = recipe.steps[0].choices[0]
    assert chosen["gptq"] == chosen["rtn"], chosen
    assert chosen["rtn"] != chosen[None], chosen
