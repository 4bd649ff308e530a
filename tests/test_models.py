"""Model loading: Hugging Face folders (Llama, Qwen2), GGUF files, unsupported architectures, the default model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import bitsmith
from bitsmith.errors import BitsmithError

ROLES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _random_ids(vocab: int, shape=(2, 24), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- Hugging Face folders -------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2"])
def test_hf_folder_loads_with_exact_logits(which, request):
    folder, ref = request.getfixturevalue(which)
    lm = bitsmith.load_model(str(folder))
    assert lm.model.config.model_type == ref.config.model_type
    assert lm.source == str(folder.resolve()) and not lm.is_quantized
    assert lm.tokenizer is not None
    if which == "tiny_llama":  # (transformers swaps in its own Qwen2Tokenizer class for a qwen2 config)
        assert lm.tokenizer("w0 w5 w92", add_special_tokens=False)["input_ids"] == [3, 8, 95]
    assert lm.adapter.tied_embeddings() == ref.config.tie_word_embeddings
    ids = _random_ids(ref.config.vocab_size)
    out = _logits(lm.model, ids)
    assert out.dtype == torch.float32
    assert torch.equal(out, _logits(ref, ids))
    if which == "tiny_qwen2":  # the q/k/v biases were loaded, not left at zero
        assert lm.model.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2"])
def test_adapter_names_seven_linears_per_block(which, request):
    folder, ref = request.getfixturevalue(which)
    lm = bitsmith.load_model(str(folder))
    ad = lm.adapter
    blocks = ad.blocks()
    assert len(blocks) == ref.config.num_hidden_layers == 2
    for i, block in enumerate(blocks):
        linears = ad.block_linears(block)
        assert set(linears) == set(ROLES)
        for role, module in linears.items():
            assert isinstance(module, nn.Linear)
            assert module is block.get_submodule(ROLES[role])
    named = ad.named_block_linears()
    assert [n for n, _ in named] == [f"model.layers.{i}.{p}" for i in range(2) for p in ROLES.values()]
    assert ad.embeddings() is lm.model.model.embed_tokens and ad.final_norm() is lm.model.model.norm
    assert (ad.hidden_size, ad.num_heads, ad.num_kv_heads, ad.head_dim) == (64, 4, 2, 16)


def test_unsupported_architecture_is_named(tiny_gpt2_dir):
    with pytest.raises(BitsmithError) as e:
        bitsmith.load_model(str(tiny_gpt2_dir))
    msg = str(e.value)
    assert "'gpt2'" in msg and "not supported" in msg
    assert "llama" in msg.split("supported:", 1)[1]
    assert "\n" not in msg


def test_missing_and_non_model_paths(tmp_path):
    with pytest.raises(BitsmithError, match="not found"):
        bitsmith.load_model(str(tmp_path / "nope.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(BitsmithError, match="is not a model"):
        bitsmith.load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(BitsmithError, match="neither config.json nor bitsmith.json"):
        bitsmith.load_model(str(tmp_path))


# -- GGUF ---------------------------------------------------------------------------------------
_GGUF_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to the q/k rows of Llama models."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _write_llama_gguf(path, model, with_output: bool) -> None:
    import gguf

    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(5000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if with_output:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for g, h in _GGUF_BLOCK.items():
            t = sd[f"model.layers.{i}.{h}.weight"]
            if g == "attn_q":
                t = _llama_cpp_permute(t, cfg.num_attention_heads)
            elif g == "attn_k":
                t = _llama_cpp_permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [False, True], ids=["output", "tied"])
def test_gguf_llama_reads_back_exactly(tmp_path, tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitsmith.models.gguf_file import GGUFModelFile
    from bitsmith.models.load import build_model

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5, max_position_embeddings=256,
                      tie_word_embeddings=tied, initializer_range=0.1)
    ref = LlamaForCausalLM(cfg).eval()
    path = tmp_path / "tiny.gguf"
    _write_llama_gguf(path, ref, with_output=not tied)

    f = GGUFModelFile(path)
    got = f.config()
    assert got.model_type == "llama"
    assert (got.vocab_size, got.hidden_size, got.intermediate_size, got.num_hidden_layers) == (96, 64, 128, 2)
    assert (got.num_attention_heads, got.num_key_value_heads, got.max_position_embeddings) == (4, 2, 256)
    assert got.tie_word_embeddings is tied
    assert got.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)
    theta = got.rope_parameters["rope_theta"] if getattr(got, "rope_parameters", None) else got.rope_theta
    assert theta == 5000.0

    # the un-permuted q/k rows are the Hugging Face ones (k has fewer heads than q)
    q = f.tensor("blk.1.attn_q.weight")
    k = f.tensor("blk.1.attn_k.weight")
    assert torch.equal(q, ref.model.layers[1].self_attn.q_proj.weight)
    assert torch.equal(k, ref.model.layers[1].self_attn.k_proj.weight)

    model = build_model(got, f.iter_state_dict())
    ids = _random_ids(96)
    assert torch.equal(_logits(model, ids), _logits(ref, ids))


def test_gguf_corrupt_file_is_a_bitsmith_error(tmp_path):
    from bitsmith.models.gguf_file import GGUFModelFile

    path = tmp_path / "x.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(BitsmithError, match="not a readable GGUF"):
        GGUFModelFile(path)
    with pytest.raises(BitsmithError, match="not a readable GGUF"):
        bitsmith.load_model(str(path))


# -- the real default model -----------------------------------------------------------------------
def test_default_model_shape_and_perplexity(default_lm):
    from bitsmith.data.text import builtin_text, eval_windows
    from bitsmith.eval.perplexity import evaluate_lm

    cfg = default_lm.model.config
    assert default_lm.source == "default" and not default_lm.is_quantized
    assert cfg.model_type == "llama"
    assert len(default_lm.adapter.blocks()) == cfg.num_hidden_layers == 30
    assert cfg.hidden_size == 576 and default_lm.adapter.hidden_size == 576
    assert cfg.tie_word_embeddings and default_lm.adapter.tied_embeddings()
    assert cfg.vocab_size == 49152 == default_lm.model.model.embed_tokens.weight.shape[0]
    assert next(default_lm.model.parameters()).dtype == torch.float32

    windows = eval_windows(default_lm.tokenizer, builtin_text("eval"), 128, 2)
    assert windows.shape == (2, 128) and int(windows.max()) < 49152
    ppl = evaluate_lm(default_lm.model, windows, progress=False)["ppl"]
    assert 5.0 < ppl < 60.0, ppl
