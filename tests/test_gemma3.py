"""Gemma 3 (``gemma3_text``): post-branch norms, ``(1 + w)`` norms, sliding-window layers; and the real
Gemma3-270M against llama.cpp (slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitsmith.errors import BitsmithError
from bitsmith.models import load_model
from bitsmith.models.adapter import norm_gain
from bitsmith.models.gguf_layouts import LAYOUTS
from bitsmith.pipeline import capture_block_inputs, run_block
from conftest import TINY_VOCAB, save_tiny
from helpers import lm_logits, rel, run_steps, tokens

SEQ = 24  # longer than the sliding window, so sliding and global layers see different masks


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(3)
    cfg = Gemma3TextConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           initializer_range=0.1)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # Gemma's norms start at zero (gain one); make their gains matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return save_tiny(tmp_path_factory.mktemp("tiny-gemma3"), model), model


def test_loads_with_its_adapter(tiny_gemma3):
    folder, model = tiny_gemma3
    lm = load_model(str(folder))
    assert type(lm.adapter).__name__ == "Gemma3Adapter"
    assert [lm.adapter.block_kind(b) for b in lm.adapter.blocks()] == ["sliding", "global", "sliding"]
    ids = tokens(2, SEQ)
    assert rel(lm_logits(lm, ids), model(input_ids=ids).logits.double().detach()) < 1e-6


def test_pipeline_runs_every_block_with_its_own_mask(tiny_gemma3):
    """Branch by branch, with the post-branch norms, each block as the model runs it (sliding or global)."""
    folder, _ = tiny_gemma3
    lm = load_model(str(folder))
    ids = tokens(4, SEQ)
    with torch.no_grad():
        want = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        hidden, kwargs = capture_block_inputs(lm.model, lm.adapter, ids, chunk_tokens=2 * SEQ)
        assert len(hidden) == 2 and set(kwargs[0].by_kind) == {"sliding", "global"}
        for i, block in enumerate(lm.adapter.blocks()):
            run_block(lm.adapter, block, hidden, kwargs, [])
            if i + 1 < len(want) - 1:  # the last entry of hidden_states is after the final norm
                assert rel(torch.cat(hidden).double(), want[i + 1].double()) < 1e-5, f"block {i}"
        # a global layer given the sliding mask computes something else: the kinds matter here
        assert kwargs[0].by_kind["sliding"]["attention_mask"] is not kwargs[0].by_kind["global"]["attention_mask"]


@pytest.mark.parametrize("step", [{"smoothquant": {"alpha": 0.5}}, {"osplus": {"threshold": 0.05}}])
def test_smoothing_keeps_the_float_function(tiny_gemma3, step):
    """Folds into ``(1 + w)`` norms and into v/up rows leave the function as it was."""
    folder, _ = tiny_gemma3
    ids = tokens(3, SEQ)
    ref = lm_logits(load_model(str(folder)), ids)
    lm = load_model(str(folder))
    before = norm_gain(lm.adapter.blocks()[0].input_layernorm).clone()
    run_steps(lm, [step], tokens(8, SEQ, seed=1))
    assert rel(lm_logits(lm, ids), ref) < 1e-5
    assert not torch.allclose(norm_gain(lm.adapter.blocks()[0].input_layernorm), before, rtol=1e-3)  # it acted


@pytest.mark.parametrize("recipe", ["quarot-w4a16-g64", "spinquant-w4a4kv4-rtn"])
def test_rotations_refuse_post_branch_norms(tiny_gemma3, recipe, tmp_path):
    import bitsmith

    folder, _ = tiny_gemma3
    with pytest.raises(BitsmithError, match="rotatable"):
        bitsmith.quantize(str(folder), recipe, out=str(tmp_path / "q"), progress=False)
    assert not (tmp_path / "q").exists()


def test_gptq_beats_rtn_and_round_trips(tiny_gemma3, tmp_path):
    import bitsmith

    folder, _ = tiny_gemma3
    ids = tokens(8, SEQ, seed=5)
    ref = lm_logits(load_model(str(folder)), ids)
    errs = {}
    for name, step in [("rtn", {"rtn": {"weights": "int3:channel"}}), ("gptq", {"gptq": {"weights": "int3:channel"}})]:
        lm = load_model(str(folder))
        run_steps(lm, [step], tokens(32, SEQ, seed=6))
        errs[name] = rel(lm_logits(lm, ids), ref)
    assert errs["gptq"] < errs["rtn"]
    lm = bitsmith.quantize(str(folder), "w8a8", out=str(tmp_path / "w8"), progress=False)
    back = load_model(str(tmp_path / "w8"), kernels="off")
    assert torch.equal(lm_logits(back, ids), lm_logits(lm, ids))


def test_gguf_layout_names_both_ways():
    layout = LAYOUTS["gemma3"]
    names = {"blk.3.attn_q_norm.weight": "model.layers.3.self_attn.q_norm.weight",
             "blk.0.ffn_norm.weight": "model.layers.0.pre_feedforward_layernorm.weight",
             "blk.17.post_ffw_norm.weight": "model.layers.17.post_feedforward_layernorm.weight",
             "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    for g, hf in names.items():
        assert layout.hf_name(g) == hf
    assert layout.is_norm("blk.3.attn_k_norm.weight") and not layout.is_norm("blk.3.attn_k.weight")
    assert layout.permuted_heads("blk.0.attn_q.weight", 4, 1) is None  # no rotary interleave for Gemma
    assert LAYOUTS["llama"].permuted_heads("blk.0.attn_k.weight", 9, 3) == 3
    assert layout.hf_name("blk.x.attn_q.weight") is None and layout.hf_name("rope_freqs.weight") is None


@pytest.mark.slow
def test_real_gemma3_matches_llama_cpp_and_exports(tmp_path):
    """Gemma3-270M as bitsmith loads it against llama.cpp on the source file, then bitsmith's own
    Q8_0 export (norms written back as ``1 + w``) in llama.cpp against bitsmith."""
    pytest.importorskip("llama_cpp")
    from bitsmith import export
    from bitsmith.export.llama_cpp_runner import open_gguf
    from bitsmith.models.load import gemma3_270m_path

    lm = load_model("gemma3-270m")
    text = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France."
    ids = lm.tokenizer(text)["input_ids"]
    assert ids[0] == lm.tokenizer.bos_token_id

    def llama(path):
        llm = open_gguf(path, n_ctx=64, n_batch=64, n_threads=1, logits_all=True, verbose=False, type_k=0, type_v=0)
        assert llm.tokenize(text.encode(), add_bos=True) == ids
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[: len(ids)])).double()

    ours = lm_logits(lm, torch.tensor([ids]))[0]
    src = llama(gemma3_270m_path())
    assert rel(ours, src) < 0.08 and (ours.argmax(-1) == src.argmax(-1)).float().mean() >= 0.9
    path = export(lm, "gguf", tmp_path / "g.gguf", qtype="q8_0")
    mine = llama(path)
    assert rel(mine, ours) < 0.08 and (mine.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
