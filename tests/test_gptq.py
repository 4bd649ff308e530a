"""GPTQ against a plain reference, its Hessian, its robustness, and its error against RTN on real inputs."""

from __future__ import annotations

import logging

import pytest
import torch

from bitsmith.algorithms.gptq import GPTQ, Hessian, gptq_quantize, gptq_reference
from bitsmith.errors import BitsmithError
from bitsmith.formats import integer
from bitsmith.spec import QuantSpec


def _layer(rows=24, cols=96, n=400, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    # correlated inputs with a few loud channels, like a transformer's
    x = torch.randn(n, cols, generator=gen) @ (torch.randn(cols, cols, generator=gen) * 0.3)
    x[:, :3] *= 8
    return w, x, 2 * x.T @ x / n


def _out_err(w, q, x):
    return ((w - q) @ x.T).pow(2).sum().item()


SPECS = ["int4:channel", "int3:g16:asym", "int4:g32:sym:mse", "int2:tensor:asym", "int8:channel:asym", "int3:g32:r0.8"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("block_size", [7, 32, 128])
def test_blocked_gptq_matches_column_by_column_reference(spec, block_size):
    spec = QuantSpec.parse(spec)
    w, x, h = _layer(seed=block_size)
    fast = gptq_quantize(w, h, spec, block_size=block_size, act_order=False)
    ref = gptq_reference(w, h, spec)
    codes = fast.codes.reshape(w.shape).float()
    assert (codes == ref).float().mean() >= 0.995  # float32 vs float64: at most a rare tie flips
    deq = fast.dequantize(spec).reshape(w.shape)
    rtn = integer.quantize(integer.group_view(w, spec), spec).dequantize(spec).reshape(w.shape)
    assert _out_err(w, deq, x) < 0.8 * _out_err(w, rtn, x)


@pytest.mark.parametrize("spec", ["int4:channel:asym", "int3:g16"])
def test_act_order_is_the_reference_on_permuted_columns(spec):
    """act-order = GPTQ on columns sorted by Hessian diagonal, with groups fixed from the original weights."""
    spec = QuantSpec.parse(spec)
    w, x, h = _layer(seed=3)
    fast = gptq_quantize(w, h, spec, block_size=16, act_order=True)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    if spec.granularity == "group":  # static groups: the grid comes from the unpermuted weight
        grid = integer.quantize(integer.group_view(w, spec), spec)
        assert torch.equal(fast.scale, grid.scale)
    else:
        ref = gptq_reference(w[:, perm], h[perm][:, perm], spec)
        assert (fast.codes.reshape(w.shape)[:, perm].float() == ref).float().mean() >= 0.995
    deq = fast.dequantize(spec).reshape(w.shape)
    plain = gptq_quantize(w, h, spec, act_order=False).dequantize(spec).reshape(w.shape)
    rtn = integer.quantize(integer.group_view(w, spec), spec).dequantize(spec).reshape(w.shape)
    assert _out_err(w, deq, x) < _out_err(w, rtn, x)
    assert _out_err(w, plain, x) < _out_err(w, rtn, x)


def test_hessian_accumulates_in_chunks():
    x = torch.randn(3, 50, 40)
    acc = Hessian(40)
    for chunk in x:
        acc.add(chunk)
    flat = x.reshape(-1, 40).double()
    expected = 2 * flat.T @ flat / flat.shape[0]
    assert torch.allclose(acc.value().double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(acc.value(), acc.value().T)
    with pytest.raises(BitsmithError, match="no calibration inputs"):
        Hessian(4).value()


def test_singular_hessian_raises_dampening_and_logs(caplog):
    spec = QuantSpec.parse("int4:channel")
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(8, 32, generator=gen)
    x = torch.randn(10, 4, generator=gen) @ torch.randn(4, 32, generator=gen)  # rank 4 of 32
    h = 2 * x.T @ x / 10
    h[5, 5] = 0.0  # a dead input too
    with caplog.at_level(logging.WARNING, logger="bitsmith.algorithms.gptq"):
        codes = gptq_quantize(w, h, spec, damp=0.0)
    assert "used damp" in caplog.text
    assert torch.isfinite(codes.dequantize(spec)).all()
    assert (codes.dequantize(spec).reshape(w.shape)[:, 5] == 0).all()  # dead column zeroed


def test_nan_hessian_is_a_clear_error():
    h = torch.eye(16)
    h[2, 3] = float("nan")
    with pytest.raises(BitsmithError, match="NaN"):
        gptq_quantize(torch.randn(4, 16), h, QuantSpec.parse("int4:channel"))


@pytest.mark.parametrize("bad", [{"block_size": 0}, {"damp": -1}, {"weights": "int4:token"}, {"weights": "int9"}])
def test_bad_gptq_arguments_fail_at_parse_time(bad):
    from bitsmith.errors import SpecError

    with pytest.raises((BitsmithError, SpecError)):
        GPTQ(**{"weights": "int4:channel", **bad})


def test_shared_input_linears_are_solved_as_one_and_split_back():
    """q/k/v in one GPTQ pass give the same codes as each alone (rows are independent)."""
    from torch import nn

    w, x, h = _layer(rows=20, cols=64)
    parts = {"q": nn.Linear(64, 12, bias=False), "k": nn.Linear(64, 8, bias=False)}
    with torch.no_grad():
        parts["q"].weight.copy_(w[:12])
        parts["k"].weight.copy_(w[12:])
    step = GPTQ(weights="int4:g16:asym")
    together = step.solve(parts, h)
    for role, lin in parts.items():
        alone = gptq_quantize(lin.weight, h, step.spec, act_order=True)
        assert torch.equal(together[role].weight, alone.dequantize(step.spec).reshape(lin.weight.shape))


def test_gptq_beats_rtn_on_real_calibration_inputs(default_lm):
    """‖WX − ŴX‖ on the inputs the default model really feeds block 0's q/k/v and down projections."""
    from bitsmith.data.text import builtin_text, calibration_batch
    from bitsmith.pipeline import capture_block_inputs

    ad = default_lm.adapter
    block = ad.blocks()[0]
    tokens = calibration_batch(default_lm.tokenizer, builtin_text("calib"), 8, 128, seed=0)
    with torch.no_grad():
        hidden, _ = capture_block_inputs(default_lm.model, ad, tokens)
        x_attn = torch.cat([ad.sublayers(block)[0].norm(h) for h in hidden]).reshape(-1, ad.hidden_size)
        x_mlp = torch.cat([ad.sublayers(block)[1].norm(h) for h in hidden]).reshape(-1, ad.hidden_size)
        x_down = torch.nn.functional.silu(block.mlp.gate_proj(x_mlp)) * block.mlp.up_proj(x_mlp)
    for spec in ["int4:g64:sym", "int3:channel:asym"]:
        spec = QuantSpec.parse(spec)
        for linear, x in [(block.self_attn.q_proj, x_attn), (block.mlp.down_proj, x_down)]:
            w = linear.weight.detach()
            acc = Hessian(x.shape[1])
            acc.add(x)
            gq = gptq_quantize(w, acc.value(), spec).dequantize(spec).reshape(w.shape)
            rtn = integer.quantize(integer.group_view(w, spec), spec).dequantize(spec).reshape(w.shape)
            assert _out_err(w, gq, x) < 0.85 * _out_err(w, rtn, x), (str(spec), linear)
