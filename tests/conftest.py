"""Shared fixtures: an isolated bitsmith cache, tiny random checkpoints, the real default model.

Session-scoped models are shared by many tests: never modify them in place (quantize a fresh
``load_model(folder)`` or a deepcopy instead).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_VOCAB = 96  # 3 special tokens + 93 words
TINY_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session", autouse=True)
def bitsmith_cache(tmp_path_factory) -> Path:
    """Point BITSMITH_CACHE at a session temp dir so no test touches ~/.cache (subprocesses inherit it)."""
    path = tmp_path_factory.mktemp("bitsmith-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("BITSMITH_CACHE", str(path))
    yield path
    mp.undo()


def make_tiny_tokenizer():
    """A word-level tokenizer with TINY_VOCAB entries ('<unk>', '<s>', '</s>', 'w0'...'w92')."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(TINY_VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    assert len(fast) == TINY_VOCAB
    return fast


def save_tiny(folder: Path, model, tokenizer=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    (tokenizer or make_tiny_tokenizer()).save_pretrained(str(folder))
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    return folder


def _tiny_model(config_cls, model_cls, seed: int, tied: bool):
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=TINY_VOCAB, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
                     initializer_range=0.1, **TINY_DIMS)
    return model_cls(cfg).eval()


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> str:
    """Calibration text in the tiny tokenizer's words (seeded random), for calibrated recipes."""
    gen = torch.Generator().manual_seed(11)
    words = " ".join(f"w{i}" for i in torch.randint(0, TINY_VOCAB - 3, (4000,), generator=gen).tolist())
    path = tmp_path_factory.mktemp("calib") / "tiny.txt"
    path.write_text(words)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(folder, float model): a seeded random 2-block Llama with tied embeddings, saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _tiny_model(LlamaConfig, LlamaForCausalLM, seed=0, tied=True)
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), model), model


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """(folder, float model): a seeded random 2-block Qwen2 (q/k/v biases, untied lm_head)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = _tiny_model(Qwen2Config, Qwen2ForCausalLM, seed=1, tied=False)
    with torch.no_grad():  # random init leaves biases at zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), model), model


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A complete tiny GPT-2 checkpoint folder: an architecture bitsmith has no adapter for."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    cfg = GPT2Config(vocab_size=TINY_VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    return save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), GPT2LMHeadModel(cfg).eval())


@pytest.fixture(scope="session")
def default_lm():
    """The real default model (SmolLM2-135M from the GGUF in its wheel), loaded once. Do not mutate."""
    import bitsmith

    return bitsmith.load_model("default")
