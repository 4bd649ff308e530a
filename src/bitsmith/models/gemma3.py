"""Adapter for Gemma 3 text decoders (``gemma3_text``): norms after each branch as well as before,
``(1 + w)`` RMSNorms, q/k norms inside attention, and sliding-window layers (every sixth layer global).

The post-branch norms are why rotations refuse this family (it does not declare ``rotatable``): a
norm between a branch's closing linear and the residual add does not commute with rotating the
residual stream. Smoothing works: its folds sit before the closing linear or in the pre-norm.
"""

from __future__ import annotations

from torch import nn

from bitsmith.models.adapter import HEADS, PRODUCT, Adapter, Sublayer, register_adapter, register_offset_norm


@register_adapter
class Gemma3Adapter(Adapter):
    model_types = ("gemma3_text",)
    provides = frozenset({"gguf"})
    linear_paths = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        register_offset_norm(type(self.final_norm()))

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

    def block_kind(self, block: nn.Module) -> str:
        return "sliding" if block.self_attn.is_sliding else "global"

    def sublayers(self, block: nn.Module) -> list[Sublayer]:
        return [
            Sublayer(block.input_layernorm, block.self_attn, ("q", "k", "v"), "o", True, "v", HEADS,
                     block.post_attention_layernorm),
            Sublayer(block.pre_feedforward_layernorm, block.mlp, ("gate", "up"), "down", False, "up", PRODUCT,
                     block.post_feedforward_layernorm),
        ]
