"""llama.cpp's tensor names and conventions per architecture: the one table the GGUF reader
(:mod:`bitsmith.models.gguf_file`) and the GGUF exporter (:mod:`bitsmith.export.gguf`) share.

A layout maps each GGUF tensor name (``blk.N.<name>.weight`` inside blocks, ``<name>.weight``
outside) to the Hugging Face module that holds it, and records what llama.cpp's converter changed
on the way: q/k rows interleaved for its rotary kernel (Llama), ``1`` added to every norm weight
(Gemma's norms scale by ``1 + w``; llama.cpp stores the gain itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from bitsmith.errors import BitsmithError

_LLAMA_ATTN_MLP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class GGUFLayout:
    """How one llama.cpp architecture names and stores a Hugging Face model's tensors."""

    arch: str  # GGUF general.architecture
    model_type: str  # Hugging Face model_type it loads as
    block: dict[str, str]  # GGUF name inside a block -> module path inside the Hugging Face block
    rotary_permuted: bool = False  # q/k rows interleaved per head by llama.cpp's converter
    norm_offset: float = 0.0  # what llama.cpp's converter added to every norm weight
    top: dict[str, str] = field(default_factory=lambda: dict(_TOP))
    # Hugging Face config fields the GGUF metadata does not hold, from a metadata getter ``get(key, default)``
    extra_config: Callable[[Callable], dict] = lambda get: {}

    def hf_name(self, gguf_name: str) -> str | None:
        """The Hugging Face parameter name of a GGUF tensor (None if the layout has no such tensor)."""
        base, _, kind = gguf_name.rpartition(".")
        if base in self.top:
            return f"{self.top[base]}.{kind}"
        parts = base.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in self.block:
            return f"model.layers.{parts[1]}.{self.block[parts[2]]}.{kind}"
        return None

    @staticmethod
    def is_norm(gguf_name: str) -> bool:
        return gguf_name.rpartition(".")[0].rpartition(".")[2].endswith("norm")

    def permuted_heads(self, gguf_name: str, heads: int, kv_heads: int) -> int | None:
        """Heads whose rotary halves llama.cpp interleaved in this tensor's rows, or None."""
        if not self.rotary_permuted:
            return None
        base = gguf_name.rpartition(".")[0].rpartition(".")[2]
        return {"attn_q": heads, "attn_k": kv_heads}.get(base)


def _gemma3_config(get: Callable) -> dict:
    head_dim = int(get("gemma3.attention.key_length", 256))
    return {
        "sliding_window": int(get("gemma3.attention.sliding_window", 512)),
        "query_pre_attn_scalar": head_dim,  # llama.cpp scales queries by 1/sqrt(head_dim) below 27B
        "rope_local_base_freq": 10000.0,  # llama.cpp's fixed base for the sliding-window layers
        "pad_token_id": get("tokenizer.ggml.padding_token_id", 0),
    }


LAYOUTS: dict[str, GGUFLayout] = {
    layout.arch: layout
    for layout in (
        GGUFLayout("llama", "llama", {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                                      **_LLAMA_ATTN_MLP}, rotary_permuted=True),
        GGUFLayout("mistral", "mistral", {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                                          **_LLAMA_ATTN_MLP}, rotary_permuted=True),
        GGUFLayout("qwen2", "qwen2", {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                                      **_LLAMA_ATTN_MLP}),
        GGUFLayout("gemma3", "gemma3_text", {
            "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
            "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", **_LLAMA_ATTN_MLP,
        }, norm_offset=1.0, extra_config=_gemma3_config),
    )
}


def layout_for_arch(arch: str) -> GGUFLayout:
    try:
        return LAYOUTS[arch]
    except KeyError:
        raise BitsmithError(f"GGUF architecture {arch!r} has no tensor mapping yet; supported: {', '.join(LAYOUTS)}") from None


def layout_for_model_type(model_type: str) -> GGUFLayout:
    for layout in LAYOUTS.values():
        if layout.model_type == model_type:
            return layout
    raise BitsmithError(f"GGUF export has no tensor mapping for {model_type!r}; supported: "
                        f"{', '.join(sorted(l.model_type for l in LAYOUTS.values()))}")
