"""CPU kernels: each computes its layer's fake-quant function up to float rounding, and saved models use them."""

from __future__ import annotations

import pytest
import torch

import bitsmith
from bitsmith.errors import BitsmithError
from bitsmith.runtime import kernels
from bitsmith.runtime.modules import QuantLinear
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import QuantSpec

needs_exact_int8 = pytest.mark.skipif(not kernels.int8_gemm_exact(),
                                      reason="this CPU's u8 x s8 product saturates (no VNNI): the W8A8 kernel is not used")


def _layer(wspec: str, aspec: str | None, seed: int = 0, out: int = 96, k: int = 128) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g) * 0.05
    w[3, 7] = 1.5  # an outlier weight: its row's scale is large, the rest of the row uses few codes
    bias = torch.randn(out, generator=g)
    return QuantLinear(PackedWeight.quantize(w, QuantSpec.parse(wspec)), bias,
                       None if aspec is None else QuantSpec.parse(aspec))


def _inputs(seed: int = 1, k: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 11, k, generator=g)
    x[..., 5] *= 40  # an outlier channel, as LLM activations have
    x[1, 2] = 0.0  # an all-zero token: the minimum scale
    return x


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@needs_exact_int8
@pytest.mark.parametrize("aspec", ["int8:token:asym", "int8:token:sym"])
def test_int8_kernel_matches_fake_quant(aspec):
    layer = _layer("int8:channel:sym", aspec)
    x = _inputs()
    ref = kernels.reference_output(layer, x)
    assert kernels.accelerate(layer) == {"int8-fbgemm": 1}
    got = layer(x)
    assert got.shape == ref.shape
    assert _rel(got, ref) < 1e-5


@needs_exact_int8
def test_int8_gemm_is_the_exact_integer_product():
    # random codes with unit scales: every sum is an integer below 2**24, so the float32 output is exact
    g = torch.Generator().manual_seed(2)
    w = torch.randint(-128, 128, (64, 128), generator=g, dtype=torch.int8)
    codes = torch.randint(0, 256, (9, 128), generator=g).float()
    got = kernels._u8_gemm(codes, kernels._prepack(w, torch.ones(64)))
    assert torch.equal(got, (codes.double() @ w.double().T).float())


@needs_exact_int8
def test_int8_kernel_worst_case_accumulation_is_exact():
    # every product at its largest: u8 255 against s8 127 over 1536 inputs (the default model's MLP width)
    packed = kernels._prepack(torch.full((4, 1536), 127, dtype=torch.int8), torch.ones(4))
    got = kernels._u8_gemm(torch.full((2, 1536), 255.0), packed)
    assert torch.equal(got, torch.full((2, 4), 255.0 * 127 * 1536))


@needs_exact_int8
@pytest.mark.parametrize("aspec", ["int8:token:asym", "int8:token:sym"])
def test_very_wide_int8_layer_runs_in_column_blocks_with_the_same_result(aspec):
    out = 2 * kernels._BLOCK + 37  # more than two blocks: the last one partial
    layer = _layer("int8:channel:sym", aspec, out=out, k=64)
    x = _inputs(k=64)
    ref = kernels.reference_output(layer, x)
    kernels.accelerate(layer)
    assert [b[0].stop - b[0].start for b in layer.kernel.blocks] == [kernels._BLOCK, kernels._BLOCK, 37]
    assert _rel(layer(x), ref) < 1e-5


@needs_exact_int8
@pytest.mark.parametrize("inference", [False, True])
def test_layers_sharing_an_input_run_one_gemm_whatever_the_call_order(inference):
    qkv = [_layer("int8:channel:sym", "int8:token:asym", seed=s, out=o) for s, o in ((0, 96), (1, 32), (2, 32))]
    group = kernels._SharedGroup(qkv)
    for i, layer in enumerate(qkv):
        layer.set_kernel(kernels.SharedInputKernel(group, i))
    x = _inputs()
    with torch.inference_mode(inference):
        refs = [kernels.reference_output(layer, x) for layer in qkv]
        calls = []
        real = group.kernel.__call__
        group.kernel = lambda t: calls.append(1) or real(t)
        for i in (1, 0, 2):  # any order: one GEMM for the three
            assert _rel(qkv[i](x), refs[i]) < 1e-5
        assert len(calls) == 1 and group.x is None  # all three served: the input is let go
        assert _rel(qkv[0](x), refs[0]) < 1e-5 and len(calls) == 2  # a new round recomputes
        x.mul_(2)  # changed in place before k and v ran: they must not get the stale slices
        for i in (1, 2):
            assert _rel(qkv[i](x), kernels.reference_output(qkv[i], x)) < 1e-5
        assert len(calls) == 3


@needs_exact_int8
def test_accelerate_fuses_qkv_and_gate_up_of_a_model(tiny_qwen2):
    folder, _ = tiny_qwen2
    lm = bitsmith.quantize(str(folder), "w8a8", progress=False)
    ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits
        assert kernels.accelerate(lm.model) == {"int8-fbgemm": 14}
        attn, mlp = lm.model.model.layers[0].self_attn, lm.model.model.layers[0].mlp
        kinds = {name: type(m.kernel).__name__ for name, m in (("q", attn.q_proj), ("v", attn.v_proj),
                                                                ("o", attn.o_proj), ("up", mlp.up_proj), ("down", mlp.down_proj))}
        assert kinds == {"q": "SharedInputKernel", "v": "SharedInputKernel", "o": "Int8Kernel",
                         "up": "SharedInputKernel", "down": "Int8Kernel"}
        assert attn.q_proj.kernel.group is attn.k_proj.kernel.group is not mlp.up_proj.kernel.group
        got = lm.model(input_ids=ids).logits
    assert _rel(got, ref) < 1e-4  # q/k/v biases included


@pytest.mark.parametrize("wspec", ["int4:g64:sym", "int4:g32:asym", "int4:g128:asym"])
def test_int4_kernel_matches_fake_quant_and_drops_the_float_copy(wspec):
    layer = _layer(wspec, None, k=256)
    x = _inputs(k=256)
    ref = layer(x)
    assert kernels.accelerate(layer, "int4") == {"int4-weight": 1}
    assert layer.weight.is_meta and tuple(layer.weight.shape) == (96, 256)  # no fp32 copy held
    assert _rel(layer(x), ref) < 1e-5
    kernels.accelerate(layer, "off")  # back to the fake-quant path, fp32 copy restored
    assert layer.kernel is None and not layer.weight.is_meta
    assert torch.equal(layer(x), ref)


def test_auto_picks_only_kernels_faster_than_fp32(monkeypatch):
    int4 = _layer("int4:g64:sym", None)
    w8a8 = _layer("int8:channel:sym", "int8:token:asym")
    w8a8_static = _layer("int8:channel:sym", "int8:tensor:sym")  # per-tensor inputs: no kernel serves it
    model = torch.nn.ModuleList([int4, w8a8, w8a8_static])
    expected = {"int8-fbgemm": 1} if kernels.int8_gemm_exact() else {}
    assert kernels.accelerate(model, "auto") == expected
    assert int4.kernel is None and w8a8_static.kernel is None
    monkeypatch.setattr(kernels, "int8_gemm_exact", lambda: False)  # a CPU whose int8 product saturates
    assert kernels.accelerate(model, "auto") == {}
    assert w8a8.kernel is None
    with pytest.raises(BitsmithError, match="unknown kernel mode"):
        kernels.accelerate(model, "fast")


@needs_exact_int8
def test_saved_w8a8_model_runs_on_the_kernel(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    out = tmp_path / "q"
    bitsmith.quantize(str(folder), "w8a8", out=str(out), progress=False)
    fast, exact = bitsmith.load_model(str(out)), bitsmith.load_model(str(out), kernels="off")
    used = [m for m in fast.model.modules() if isinstance(m, QuantLinear) and m.kernel is not None]
    assert len(used) == 14  # every block linear of the 2-block model
    ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fast.model(input_ids=ids).logits, exact.model(input_ids=ids).logits
    assert _rel(a, b) < 1e-4
    assert torch.equal(a.argmax(-1), b.argmax(-1))
