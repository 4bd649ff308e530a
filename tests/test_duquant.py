"""DuQuant (arXiv 2406.01721): the float function is kept, the rotations are orthogonal, the greedy
rotation and the zigzag permutation do what the paper says, quantized models save and reload exactly."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import bitsmith
from bitsmith.algorithms.duquant import (
    choose_block_size,
    fit_duquant,
    greedy_rotation,
    zigzag_permutation,
)
from bitsmith.calibration import InputStats
from bitsmith.errors import BitsmithError
from bitsmith.models import load_model
from bitsmith.recipes import load_recipe
from bitsmith.runtime.modules import QuantLinear
from bitsmith.runtime.online import OnlineBlockRotation, build_transform
from bitsmith.transforms.hadamard import hadamard_matrix
from helpers import lm_logits as _logits, rel as _rel, tokens as _tokens

CALIB = {"samples": 4, "seq": 32}


@pytest.fixture(scope="module")
def tiny_calib(tmp_path_factory):
    gen = torch.Generator().manual_seed(5)
    words = " ".join(f"w{i}" for i in torch.randint(0, 93, (3000,), generator=gen).tolist())
    path = tmp_path_factory.mktemp("calib") / "tiny.txt"
    path.write_text(words)
    return str(path)


@pytest.fixture
def random_calibration(monkeypatch):
    """Calibration windows of random token ids (the tiny Qwen2 tokenizer reloads as BPE without merges)."""
    monkeypatch.setattr("bitsmith.pipeline.calibration_batch", lambda tok, text, n, seq, seed: _tokens(n, seq, seed + 7))


def _recipe(*steps, **args):
    return load_recipe({"name": "dq", "calibration": CALIB, "steps": [{"duquant": args}, *steps]})


def _outlier_activations(n=2048, d=256, seed=0):
    """Gaussian tokens with planted normal outliers (channels large in every token) and massive ones."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * (0.5 + torch.rand(d, generator=gen))
    normal = torch.tensor([3, 70, 71, 200])
    x[:, normal] *= 25
    x[torch.randint(0, n, (6,), generator=gen), 130] = 400.0  # massive outliers in a few tokens
    x[torch.randint(0, n, (4,), generator=gen), 9] = -300.0
    return x


def _stats(x):
    st = InputStats(x.shape[1])
    st.add(x)
    return st


def _max_to_mean(x):
    m = x.abs().amax(0)
    return (m.max() / m.mean()).item()


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("block", [None, 16])
def test_duquant_float_model_is_unchanged(which, block, request, tiny_calib, random_calibration):
    folder, _ = request.getfixturevalue(which)
    tokens = _tokens()
    ref = _logits(load_model(str(folder)), tokens)
    lm = load_model(str(folder))
    fresh_norm = lm.adapter.blocks()[0].input_layernorm.weight.detach().clone()
    recipe = _recipe(block_size=block)
    bitsmith.quantize(lm, recipe, calib=tiny_calib, progress=False)
    assert _rel(_logits(lm, tokens), ref) < 1e-5
    ad = lm.adapter
    block0 = ad.blocks()[0]
    for role, linear in ad.block_linears(block0).items():
        assert isinstance(linear, QuantLinear) and isinstance(linear.input_transform, OnlineBlockRotation), role
        # smoothing folded into the norms for q/k/v and gate/up, kept online for o and down
        assert (linear.input_transform.scale is not None) == (role in ("o", "down")), role
    assert not torch.allclose(block0.input_layernorm.weight, fresh_norm)  # the smoothing really folded
    assert ad.attention(block0).bitsmith_kv.rotate  # R3 kept
    fits = recipe.steps[0].fits
    assert [f["roles"] for f in fits[:4]] == [("q", "k", "v"), ("o",), ("gate", "up"), ("down",)]
    assert all(f["block_size"] == (block or f["dim"]) for f in fits)  # tiny sizes 64/128 are their own block


def test_duquant_rotations_are_orthogonal_and_permutations_permute(tiny_llama, tiny_calib):
    folder, _ = tiny_llama
    lm = bitsmith.quantize(str(folder), _recipe(block_size=16), calib=tiny_calib, progress=False)
    seen = 0
    for block in lm.adapter.blocks():
        for role, linear in lm.adapter.block_linears(block).items():
            t = linear.input_transform
            for r in (t.r1.double(), t.r2.double()):
                eye = torch.eye(r.shape[1], dtype=torch.float64).expand_as(r)
                assert (r @ r.transpose(1, 2) - eye).abs().max() < 1e-6, role
            assert torch.equal(torch.sort(t.perm).values, torch.arange(t.dim)), role
            seen += not torch.equal(t.perm, torch.arange(t.dim))
    assert seen  # the zigzag really moves channels across blocks


def test_online_block_rotation_matches_dense_reference_and_round_trips():
    gen = torch.Generator().manual_seed(0)
    r1 = torch.linalg.qr(torch.randn(3, 8, 8, generator=gen))[0]
    r2 = torch.linalg.qr(torch.randn(3, 8, 8, generator=gen))[0]
    perm, scale = torch.randperm(24, generator=gen), torch.rand(24, generator=gen) + 0.5
    t = OnlineBlockRotation(r1, perm, r2, scale)
    x = torch.randn(2, 5, 24, generator=gen)
    dense = torch.block_diag(*r1) @ torch.eye(24)[:, perm] @ torch.block_diag(*r2)
    torch.testing.assert_close(t(x), (x * scale) @ dense, rtol=1e-5, atol=1e-5)
    assert t(x.double()).dtype == torch.float64 and t(x.half()).dtype == torch.float16
    again = build_transform(t.describe())
    again.load_state_dict(t.state_dict())
    assert torch.equal(again(x), t(x))
    plain = OnlineBlockRotation(r1, perm, r2)
    assert "scale" not in plain.state_dict() and not plain.describe()["scaled"]
    with pytest.raises(BitsmithError, match="does not divide"):
        build_transform({"kind": "block_rotation", "dim": 24, "block_size": 5, "scaled": False})


def test_greedy_rotation_spreads_planted_outliers():
    """(c) the fitted R1 P R2 lowers the max-to-mean ratio of channel magnitudes on real samples of a
    synthetic input with planted outliers, and each greedy stage helps."""
    x = _outlier_activations()
    st = _stats(x)
    fit = fit_duquant(st.absmax(), st.gram() / st.rows, st.rows, torch.ones(x.shape[1]), alpha=None, block_size=64)
    y = fit.rotate(x.double())
    before, after = _max_to_mean(x), _max_to_mean(y)
    assert after < before / 4, (before, after)
    assert after < 2.5  # close to the flat ratio of Gaussian channels
    k, b = fit.r1.shape[:2]
    y1 = torch.einsum("nkb,kbc->nkc", x.double().reshape(-1, k, b), fit.r1).reshape(x.shape)
    assert _max_to_mean(y1) < before / 2  # R1 alone already spreads the outlier channels
    assert x.abs().max() / 4 > y.abs().max()  # massive outliers: the largest value shrinks too
    assert fit.after < fit.before  # the statistics-based estimate agrees
    assert fit.steps[0] >= 1


def test_greedy_rotation_picks_the_largest_channel_and_never_worsens_the_estimate():
    b, k = 16, 3
    gen = torch.Generator().manual_seed(1)
    peaks = torch.rand(k, b, generator=gen, dtype=torch.float64) + 0.5
    peaks[1, 11] = 50.0
    second = torch.diag_embed(peaks**2 / 20)
    base = hadamard_matrix(b, torch.float64)
    kappa = math.sqrt(2 * math.log(1000))
    events = torch.diag_embed(peaks)
    r, est, used = greedy_rotation(events, second, base, 1, kappa)
    # one step on block 1: channel 11 (its largest) is swapped to the front and spread by the Hadamard rows
    assert used[1] == 1
    assert torch.allclose(r[1][11].abs(), torch.full((b,), b**-0.5, dtype=torch.float64))
    assert est[1].max() < 50.0 / 3
    r0, est0, used0 = greedy_rotation(events, second, base, 0, kappa)
    assert torch.equal(used0, torch.zeros(k, dtype=torch.long))
    assert torch.allclose(r0, torch.eye(b, dtype=torch.float64).expand(k, b, b), atol=1e-12)
    _, est_many, _ = greedy_rotation(events, second, base, 64, kappa)
    assert (est_many.amax(1) <= est0.amax(1) + 1e-12).all() and (est_many.amax(1) <= est.amax(1) + 1e-12).all()


def _zigzag_reference(magnitude: list[float], blocks: int) -> list[int]:
    """Plain transcription of the paper's zigzag: deal channels, largest first, bouncing over the blocks."""
    order = sorted(range(len(magnitude)), key=lambda i: (-magnitude[i], i))
    groups: list[list[int]] = [[] for _ in range(blocks)]
    cur, step = 0, 1
    for ch in order:
        groups[cur].append(ch)
        nxt = cur + step
        if nxt in (blocks, -1):
            step = -step  # stay on the end block once more, then turn
        else:
            cur = nxt
    return [ch for g in groups for ch in g]


@pytest.mark.parametrize("dim,blocks", [(24, 3), (64, 4), (96, 1), (576, 6), (1536, 12), (15, 5)])
def test_zigzag_permutation_matches_the_plain_reference(dim, blocks):
    gen = torch.Generator().manual_seed(dim + blocks)
    for _ in range(5):
        mag = torch.rand(dim, generator=gen, dtype=torch.float64) * torch.rand(dim, generator=gen) ** 4 * 100
        assert zigzag_permutation(mag, blocks).tolist() == _zigzag_reference(mag.tolist(), blocks)


def test_zigzag_permutation_balances_block_maxima():
    gen = torch.Generator().manual_seed(3)
    dim, blocks = 256, 8
    spread = {"zigzag": [], "identity": [], "random": []}
    for _ in range(20):
        mag = torch.rand(dim, generator=gen) + 10 * (torch.rand(dim, generator=gen) > 0.97)  # a few large channels
        mag[:16] += 20  # clustered in the first blocks
        for name, perm in (("zigzag", zigzag_permutation(mag, blocks)), ("identity", torch.arange(dim)),
                           ("random", torch.randperm(dim, generator=gen))):
            top = mag[perm].reshape(blocks, -1)
            spread[name].append((top.amax(1).std() + top.mean(1).std()).item())
    mean = {k: sum(v) / len(v) for k, v in spread.items()}
    assert mean["zigzag"] < mean["random"] / 2 and mean["zigzag"] < mean["identity"] / 4, mean


def test_block_size_choice_and_errors(tiny_llama, tiny_calib):
    assert choose_block_size(576) == 96 and choose_block_size(1536) == 128 and choose_block_size(64) == 64
    assert choose_block_size(576, 64) == 64
    with pytest.raises(BitsmithError, match="block_size 128 does not divide the size 576"):
        choose_block_size(576, 128)
    folder, _ = tiny_llama
    with pytest.raises(BitsmithError, match="does not divide"):
        bitsmith.quantize(str(folder), _recipe(block_size=48), calib=tiny_calib, progress=False)
    for bad in ({"block_size": 7}, {"block_size": 0}, {"alpha": 1.5}, {"steps": -1}):
        with pytest.raises(BitsmithError, match="duquant"):
            load_recipe({"steps": [{"duquant": bad}]})
    with pytest.raises(BitsmithError, match="duquant first"):
        bitsmith.quantize(str(folder), {"calibration": CALIB, "steps": [{"rtn": {"weights": "int4:channel"}}, {"duquant": {}}]},
                          calib=tiny_calib, progress=False)
    with pytest.raises(BitsmithError, match="already has an online transform"):
        bitsmith.quantize(str(folder), {"calibration": CALIB, "steps": [{"quarot": {}}, {"duquant": {}}]},
                          calib=tiny_calib, progress=False)


def test_duquant_then_rtn_equals_rtn_of_the_transformed_weights(tiny_llama, tiny_calib):
    """A data-free quantizer after duquant rounds before the statistics exist; the step re-rounds the
    transformed float weights on the same spec, which is what RTN after DuQuant gives."""
    from bitsmith.runtime.qweight import PackedWeight
    from bitsmith.spec import QuantSpec

    folder, _ = tiny_llama
    spec = "int4:channel:sym"
    fl = bitsmith.quantize(str(folder), _recipe(block_size=16), calib=tiny_calib, progress=False)
    q = bitsmith.quantize(str(folder), _recipe({"rtn": {"weights": spec}}, block_size=16), calib=tiny_calib, progress=False)
    # block 0 sees the same statistics in both runs (its input comes from the embeddings)
    float0 = fl.adapter.block_linears(fl.adapter.blocks()[0])
    quant0 = q.adapter.block_linears(q.adapter.blocks()[0])
    for role in ("q", "k", "v"):  # the first input of block 0: the same statistics in both runs
        want = PackedWeight.quantize(float0[role].weight, QuantSpec.coerce(spec))
        assert torch.equal(quant0[role].packed.dequantize(), want.dequantize()), role
        assert torch.equal(quant0[role].input_transform.r1, float0[role].input_transform.r1), role


def test_duquant_quantized_model_saves_and_reloads(tiny_qwen2, tmp_path, tiny_calib, random_calibration):
    folder, _ = tiny_qwen2
    recipe = {"name": "dq4", "calibration": CALIB,
              "steps": [{"duquant": {"block_size": 16}}, {"act_quant": {"spec": "int4:token:asym:r0.9"}},
                        {"kv_quant": {"key": "int4:head:asym", "value": "int4:head:asym"}},
                        {"gptq": {"weights": "int4:channel:sym"}}]}
    lm = bitsmith.quantize(str(folder), recipe, out=tmp_path / "q", calib=tiny_calib, progress=False)
    again = bitsmith.load_model(str(tmp_path / "q"))
    tokens = _tokens(seed=2)
    assert torch.equal(_logits(lm, tokens), _logits(again, tokens))
    block = again.adapter.blocks()[1]
    down = again.adapter.block_linears(block)["down"]
    assert isinstance(down.input_transform, OnlineBlockRotation) and down.input_transform.scale is not None
    assert down.packed is not None and down.act_spec is not None
    assert again.adapter.attention(block).bitsmith_kv.rotate


def _real_text_ids(lm):
    from bitsmith.data.text import builtin_text

    return lm.tokenizer(builtin_text("eval").text[:4000], return_tensors="pt").input_ids[:, :256]


def _check_fits(fits, blocks):
    assert len(fits) == 4 * blocks
    assert {(f["dim"], f["block_size"]) for f in fits} == {(576, 96), (1536, 128)}
    assert all(f["after"] < f["before"] for f in fits)


def test_duquant_on_the_default_model_real_text(default_lm):
    """(a) on SmolLM2, with real calibration statistics, DuQuant on the first 6 blocks leaves the fp32
    logits on real text unchanged (rel. error < 1e-4); the whole model is checked by the slow test below."""
    from bitsmith.data.text import builtin_text
    from bitsmith.pipeline import Context, run_calibrated

    ids = _real_text_ids(default_lm)
    ref = _logits(default_lm, ids)
    lm = copy.deepcopy(default_lm)
    recipe = load_recipe({"name": "dq", "steps": [{"duquant": {"steps": 8}}]})
    ctx = Context(lm, builtin_text("calib"), progress=False, calibration_settings={"samples": 2, "seq": 128})
    with torch.no_grad():
        run_calibrated(ctx, recipe.steps, lm.adapter.blocks()[:6])
    assert _rel(_logits(lm, ids), ref) < 1e-4
    _check_fits(recipe.steps[0].fits, 6)
    down = lm.adapter.block_linears(lm.adapter.blocks()[5])["down"]
    assert isinstance(down.input_transform, OnlineBlockRotation)


@pytest.mark.slow
def test_duquant_whole_default_model_real_text(default_lm):
    ids = _real_text_ids(default_lm)
    ref = _logits(default_lm, ids)
    lm = copy.deepcopy(default_lm)
    recipe = load_recipe({"name": "dq", "calibration": {"samples": 4, "seq": 128}, "steps": [{"duquant": {}}]})
    bitsmith.quantize(lm, recipe, progress=False)
    assert _rel(_logits(lm, ids), ref) < 1e-4
    _check_fits(recipe.steps[0].fits, len(lm.adapter.blocks()))


def test_duquant_streamed_equals_in_memory(tiny_llama, tmp_path, tiny_calib):
    folder, _ = tiny_llama
    recipe = {"name": "dq", "calibration": CALIB, "steps": [{"duquant": {"block_size": 16}}, {"rtn": {"weights": "int4:g16"}}]}
    mem = bitsmith.quantize(str(folder), recipe, out=tmp_path / "mem", calib=tiny_calib, progress=False)
    out = bitsmith.quantize(str(folder), recipe, out=tmp_path / "str", calib=tiny_calib, progress=False, stream=True)
    tokens = _tokens(seed=3)
    assert torch.equal(_logits(mem, tokens), _logits(bitsmith.load_model(str(out)), tokens))
