"""Adapter for the Llama layout, shared by Llama, Mistral and Qwen2 (bias on q/k/v)."""

from __future__ import annotations

from torch import nn

from bitsmith.models.adapter import HEADS, PRODUCT, Adapter, Sublayer, register_adapter


@register_adapter
class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2")
    provides = frozenset({"rotatable", "gguf"})
    linear_paths = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }

    def embeddings(self) -> nn.Module:
        return self.model.model.embed_tokens

    def set_embeddings(self, module: nn.Module) -> None:
        self.model.model.embed_tokens = module

    def blocks(self) -> list[nn.Module]:
        return list(self.model.model.layers)

    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def attention(self, block: nn.Module) -> nn.Module:
        return block.self_attn

    def sublayers(self, block: nn.Module) -> list[Sublayer]:
        return [
            Sublayer(block.input_layernorm, block.self_attn, ("q", "k", "v"), "o", True, "v", HEADS),
            Sublayer(block.post_attention_layernorm, block.mlp, ("gate", "up"), "down", False, "up", PRODUCT),
        ]
