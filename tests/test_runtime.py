"""Quantized modules against plain reference computations on fresh random inputs."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bitsmith.runtime import kvcache
from bitsmith.runtime.modules import QuantEmbedding, QuantLinear
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import QuantSpec


def _ref_token_quant(x: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Per-row min-max fake quantization written as a plain loop."""
    x = x.contiguous()
    out = torch.empty_like(x)
    rows = x.reshape(-1, x.shape[-1])
    flat = out.view(-1, x.shape[-1])
    for i, r in enumerate(rows):
        if symmetric:
            s = max(r.abs().max().item() / (2 ** (bits - 1) - 1), 1e-10)
            flat[i] = torch.clamp(torch.round(r / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s
        else:
            lo, hi = min(r.min().item(), 0.0), max(r.max().item(), 0.0)
            s = max((hi - lo) / (2**bits - 1), 1e-10)
            z = min(max(round(-lo / s), 0), 2**bits - 1)
            flat[i] = (torch.clamp(torch.round(r / s) + z, 0, 2**bits - 1) - z) * s
    return out


@pytest.mark.parametrize("wspec, aspec", [("int4:g16:sym", "int8:token:sym"), ("int3:channel:asym", "int4:token:asym"), ("int8:channel", None)])
def test_quant_linear_matches_reference(wspec, aspec):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 24)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 64, generator=g))
        lin.bias.copy_(torch.randn(24, generator=g))
    x = torch.randn(3, 7, 64, generator=g)
    ws = QuantSpec.parse(wspec)
    packed = PackedWeight.quantize(lin.weight, ws)
    q = QuantLinear(packed, lin.bias, None if aspec is None else QuantSpec.parse(aspec))
    w_deq = packed.dequantize()
    xin = x if aspec is None else _ref_token_quant(x, QuantSpec.parse(aspec).bits, QuantSpec.parse(aspec).symmetric)
    ref = xin @ w_deq.T + lin.bias
    assert torch.allclose(q(x), ref, atol=1e-5)
    # the weight really is on the grid: at most half a step from the float weight, and not equal to it
    assert not torch.equal(w_deq, lin.weight)
    step = packed.scale.float().max().item()
    assert (w_deq - lin.weight).abs().max().item() <= step / 2 + 1e-6


def test_packed_weight_bits_and_roundtrip():
    w = torch.randn(32, 128)
    p = PackedWeight.quantize(w, QuantSpec.parse("int4:g64:asym"))
    # 4 bits per code + one fp16 scale and one 4-bit zero per group of 64
    assert p.nbits() == 32 * 128 * 4 + 32 * 2 * 16 + 32 * 2 * 4
    again = PackedWeight.from_tensors(p.spec, p.shape, {k: v.clone() for k, v in p.tensors().items()})
    assert torch.equal(again.dequantize(), p.dequantize())


def test_quant_embedding():
    w = torch.randn(50, 32)
    p = PackedWeight.quantize(w, QuantSpec.parse("int8:channel"))
    emb = QuantEmbedding(p)
    ids = torch.tensor([[1, 4, 49]])
    assert torch.equal(emb(ids), p.dequantize()[ids])


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _ref_attention(attn, x: torch.Tensor, cos, sin, kspec, vspec) -> torch.Tensor:
    """Plain attention with per-(token, head) quantized K/V, written out by hand."""
    b, s, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(b, s, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(b, s, -1, hd).transpose(1, 2)

    def rot(t):
        t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
        return t * cos[:, None] + torch.cat([-t2, t1], dim=-1) * sin[:, None]

    q, k = rot(q), rot(k)
    k = _ref_token_quant(k, kspec.bits, kspec.symmetric)
    v = _ref_token_quant(v, vspec.bits, vspec.symmetric)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, -1)
    return attn.o_proj(out)


def test_kv_quantization_matches_reference_attention():
    model = _tiny_llama()
    attn = model.model.layers[0].self_attn
    kspec, vspec = QuantSpec.parse("int4:head:asym"), QuantSpec.parse("int3:head:sym")
    kvcache.install(model, [attn], kvcache.KVQuantizer(kspec, vspec))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 64, generator=g)
    pos = torch.arange(9)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        got, _ = attn(x, position_embeddings=(cos, sin), attention_mask=None)
        ref = _ref_attention(attn, x, cos, sin, kspec, vspec)
    assert torch.allclose(got, ref, atol=1e-5)
    with torch.no_grad():
        attn.bitsmith_kv = None  # without the hook the result differs: the quantization really acts
        plain, _ = attn(x, position_embeddings=(cos, sin), attention_mask=None)
    assert not torch.allclose(plain, ref, atol=1e-4)


def test_generate_with_quantized_kv_and_activations_matches_forward():
    """Greedy generate with a cache picks the same tokens as re-running the full forward each step."""
    model = _tiny_llama()
    for layer in model.model.layers:
        layer.mlp.down_proj = QuantLinear.from_linear(layer.mlp.down_proj, QuantSpec.parse("int4:token:asym"))
    kvcache.install(model, [l.self_attn for l in model.model.layers],
                    kvcache.KVQuantizer(QuantSpec.parse("int4:head:asym"), QuantSpec.parse("int4:head:asym")))
    ids = torch.tensor([[5, 17, 3, 88, 42]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(6):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_kv_rejects_mse_and_weight_granularity():
    from bitsmith.errors import SpecError

    with pytest.raises(SpecError, match="min-max"):
        kvcache.KVQuantizer(QuantSpec.parse("int4:head:mse"), None)
    with pytest.raises(SpecError, match="KV cache"):
        kvcache.KVQuantizer(QuantSpec.parse("int4:g64"), None)
