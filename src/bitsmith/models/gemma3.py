"""Adapter for Gemma 3 text decoders (``gemma3_text``): norms after each branch as well as before,
``(1 + w)`` RMSNorms, q/k norms inside attention, and sliding-window layers (every sixth layer global).

The post-branch norms are why rotations refuse this family (it does not declare ``rotatable``): a
norm between a branch's closing linear and the residual add does not commute with rotating the
residual stream. Smoothing works: its folds sit before the closing linear or in the pre-norm.
"""

from __future__ import annotations

from torch import nn

from bitsmith.models.adapter import HEADS, PRODUCT, Sublayer, register_adapter, register_offset_norm
from bitsmith.models.llama import LlamaAdapter


@register_adapter
class Gemma3Adapter(LlamaAdapter):
    """The Llama layout (same module paths), with Gemma's branches, norms and block kinds."""

    model_types = ("gemma3_text",)
    provides = frozenset({"gguf"})

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        register_offset_norm(type(self.final_norm()))

    def block_kind(self, block: nn.Module) -> str:
        return "sliding" if block.self_attn.is_sliding else "global"

    def sublayers(self, block: nn.Module) -> list[Sublayer]:
        return [
            Sublayer(block.input_layernorm, block.self_attn, ("q", "k", "v"), "o", True, "v", HEADS,
                     block.post_attention_layernorm),
            Sublayer(block.pre_feedforward_layernorm, block.mlp, ("gate", "up"), "down", False, "up", PRODUCT,
                     block.post_feedforward_layernorm),
        ]
