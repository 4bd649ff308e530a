"""Rotations (QuaRot): the rotated float model computes the same function; quantization composes."""

from __future__ import annotations

import copy

import pytest
import torch

import bitsmith
import bitsmith.transforms.hadamard
from bitsmith.errors import BitsmithError
from bitsmith.models import load_model
from bitsmith.runtime.modules import QuantLinear
from helpers import lm_logits as _logits, rel as _rel, tokens as _tokens

QUAROT_ONLY = {"name": "quarot-float", "steps": [{"quarot": {}}]}


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2"])
def test_quarot_float_model_is_unchanged(which, request):
    folder, _ = request.getfixturevalue(which)
    lm = load_model(str(folder))
    tokens = _tokens()
    ref = _logits(lm, tokens)
    bitsmith.quantize(lm, QUAROT_ONLY, progress=False)
    ad = lm.adapter
    assert not ad.tied_embeddings() and not lm.model.config.tie_word_embeddings
    block = ad.blocks()[0]
    down = ad.block_linears(block)["down"]
    assert isinstance(down, QuantLinear) and down.input_transform is not None  # R4 online
    assert ad.attention(block).bitsmith_kv.rotate  # R3 online
    assert torch.allclose(block.input_layernorm.weight, torch.ones_like(block.input_layernorm.weight))
    assert _rel(_logits(lm, tokens), ref) < 1e-5
    # the rotation really acts: the embedding table and weights changed
    fresh = load_model(str(folder))
    assert not torch.allclose(fresh.adapter.embeddings().weight, ad.embeddings().weight, atol=1e-3)


def test_quarot_each_rotation_alone_keeps_the_function(tiny_llama):
    folder, _ = tiny_llama
    tokens = _tokens(seed=1)
    ref = _logits(load_model(str(folder)), tokens)
    for args in ({"r2": False, "r3": False, "r4": False}, {"r3": False, "r4": False}, {"r2": False, "r4": False},
                 {"r2": False, "r3": False}):
        lm = load_model(str(folder))
        bitsmith.quantize(lm, {"steps": [{"quarot": args}]}, progress=False)
        assert _rel(_logits(lm, tokens), ref) < 1e-5, args


def test_quarot_on_the_default_model_real_text(default_lm):
    """The issue's check: the rotated fp32 model's logits equal the original's on real text (rel. error < 1e-4)."""
    from bitsmith.data.text import builtin_text

    ids = default_lm.tokenizer(builtin_text("eval").text[:4000], return_tensors="pt").input_ids[:, :256]
    ref = _logits(default_lm, ids)
    lm = copy.deepcopy(default_lm)
    bitsmith.quantize(lm, QUAROT_ONLY, progress=False)
    assert _rel(_logits(lm, ids), ref) < 1e-4


def test_quarot_quantized_model_saves_and_reloads(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    recipe = {"name": "q", "steps": [{"quarot": {}}, {"rtn": {"weights": "int4:g16"}},
                                     {"act_quant": {"spec": "int8:token:asym"}},
                                     {"kv_quant": {"key": "int4:head:asym", "value": "int4:head:asym"}}]}
    lm = bitsmith.quantize(str(folder), recipe, out=tmp_path / "q", progress=False)
    tokens = _tokens(seed=2)
    again = bitsmith.load_model(str(tmp_path / "q"))
    assert torch.equal(_logits(lm, tokens), _logits(again, tokens))
    attn = again.adapter.attention(again.adapter.blocks()[1])
    assert attn.bitsmith_kv.rotate and attn.bitsmith_kv.key is not None
    assert again.adapter.block_linears(again.adapter.blocks()[1])["down"].input_transform is not None


def test_rotation_after_quantization_is_refused(tiny_llama):
    folder, _ = tiny_llama
    with pytest.raises(BitsmithError, match="rotation step first"):
        bitsmith.quantize(str(folder), {"steps": [{"rtn": {"weights": "int4:g16"}}, {"quarot": {}}]}, progress=False)


def test_quarot_streamed_equals_in_memory(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    recipe = {"name": "q", "steps": [{"quarot": {}}, {"rtn": {"weights": "int4:g16"}}]}
    mem = bitsmith.quantize(str(folder), recipe, out=tmp_path / "mem", progress=False)
    out = bitsmith.quantize(str(folder), recipe, out=tmp_path / "str", progress=False, stream=True)
    tokens = _tokens(seed=3)
    assert torch.equal(_logits(mem, tokens), _logits(bitsmith.load_model(str(out)), tokens))


def _spin(iterations, lr=0.5, **kw):
    return {"name": "spin", "calibration": {"samples": 8, "seq": 32},
            "steps": [{"spinquant": {"iterations": iterations, "lr": lr, "batch": 2, **kw}}]}


def test_cayley_step_keeps_orthogonality():
    from bitsmith.algorithms.spinquant import cayley_step
    from bitsmith.transforms.hadamard import random_hadamard_matrix

    r = random_hadamard_matrix(64, seed=0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        r = cayley_step(r, torch.randn(64, 64, generator=gen, dtype=torch.float64), lr=0.3)
    assert (r @ r.T - torch.eye(64, dtype=torch.float64)).abs().max() < 1e-10
    # a descent step: for the loss <G, R>, one small step lowers it
    g = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    assert (g * cayley_step(r, g, lr=1e-3)).sum() < (g * r).sum()


def test_cayley_step_is_bounded_by_the_inverse_norm_of_the_skew_gradient():
    """Li et al. (arXiv 2002.01113): the step is min(lr, 1 / ||A||_1), so a large gradient cannot throw
    the rotation far; a small one takes the full learning rate."""
    from bitsmith.algorithms.spinquant import cayley_step
    from bitsmith.transforms.hadamard import random_hadamard_matrix

    r = random_hadamard_matrix(64, seed=1, dtype=torch.float64)
    g = torch.randn(64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eye = torch.eye(64, dtype=torch.float64)

    def plain(grad, t):  # the unbounded Cayley update
        a = grad @ r.T - r @ grad.T
        return torch.linalg.solve(eye + t / 2 * a, (eye - t / 2 * a) @ r)

    big = 100 * g
    bound = 1 / float((big @ r.T - r @ big.T).abs().sum(0).max())
    assert bound < 1.5
    torch.testing.assert_close(cayley_step(r, big, lr=1.5), plain(big, bound))
    assert (cayley_step(r, big, lr=1.5) - plain(big, 1.5)).abs().max() > 0.1
    small = 1e-6 * g
    torch.testing.assert_close(cayley_step(r, small, lr=1.5), plain(small, 1.5))


def test_spinquant_without_training_is_quarot(tiny_llama, calib_file):
    folder, _ = tiny_llama
    tokens = _tokens(seed=4)
    quarot = bitsmith.quantize(str(folder), QUAROT_ONLY, progress=False)
    spin = bitsmith.quantize(str(folder), _spin(0), calib=calib_file, progress=False)
    torch.testing.assert_close(_logits(spin, tokens), _logits(quarot, tokens), rtol=1e-6, atol=1e-6)


def test_spinquant_learns_orthogonal_rotations_that_lower_the_quantized_loss(tiny_llama, calib_file):
    from bitsmith.algorithms.spinquant import SpinQuant
    from bitsmith.recipes import load_recipe

    folder, _ = tiny_llama
    tokens = _tokens(seed=5)
    ref = _logits(load_model(str(folder)), tokens)
    recipe = load_recipe(_spin(30, lr=1.0, weights="int3:channel:sym", activations="int3:token:asym", kv="int3:head:asym"))
    lm = load_model(str(folder))
    bitsmith.quantize(lm, recipe, calib=calib_file, progress=False)
    step = recipe.steps[0]
    assert isinstance(step, SpinQuant) and len(step.losses) == 30
    eye = torch.eye(step.r1.shape[0], dtype=torch.float64)
    assert (step.r1 @ step.r1.T - eye).abs().max() < 1e-5
    for p in step.r2:
        assert (p @ p.T - torch.eye(p.shape[0], dtype=torch.float64)).abs().max() < 1e-5
    assert step.r1.sub(bitsmith.transforms.hadamard.random_hadamard_matrix(64, 0, torch.float64)).abs().max() > 1e-3
    first, last = sum(step.losses[:5]) / 5, sum(step.losses[-5:]) / 5
    assert last < first  # the fake-quantized loss went down
    assert _rel(_logits(lm, tokens), ref) < 1e-5  # learned rotations fold exactly: float function unchanged


def test_spinquant_refuses_streaming(tiny_llama, tmp_path, calib_file):
    folder, _ = tiny_llama
    with pytest.raises(BitsmithError, match="without --stream"):
        bitsmith.quantize(str(folder), _spin(1), out=tmp_path / "s", calib=calib_file, progress=False, stream=True)


def test_spinquant_training_forward_matches_the_folded_model(tiny_llama):
    """The differentiable training model (both forms: rotated weights, rotated activations) computes
    what the folded model computes, for random orthogonal R1/R2 in float."""
    from bitsmith.algorithms.spinquant import _Trainer
    from bitsmith.transforms import fold
    from bitsmith.transforms.hadamard import random_orthogonal_matrix

    folder, _ = tiny_llama
    tokens = _tokens(seed=6)
    r1 = random_orthogonal_matrix(64, seed=1, dtype=torch.float64)
    r2 = [random_orthogonal_matrix(16, seed=2 + i, dtype=torch.float64) for i in range(2)]
    ref = _logits(load_model(str(folder)), tokens)
    for weights in (None, "int8:channel:sym"):
        from bitsmith.spec import QuantSpec

        lm = load_model(str(folder))
        ad = lm.adapter
        fold.fuse_norms_outside(ad)
        for b in ad.blocks():
            fold.fuse_norms_block(ad, b)
        wspec = None if weights is None else QuantSpec.parse(weights)
        with _Trainer(lm, r1, r2, wspec, None, None):
            got = _logits(lm, tokens)
        tol = 1e-4 if weights is None else 5e-2  # int8 weights: close, not equal
        assert _rel(got, ref) < tol, weights
        assert _rel(_logits(lm, tokens), ref) < 1e-5  # the originals are back after training
