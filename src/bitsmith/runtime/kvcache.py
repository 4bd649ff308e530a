"""KV-cache quantization through a registered Hugging Face attention function.

Keys are quantized after RoPE (what the cache stores) and values as projected, then attention runs
on the dequantized tensors, in the same forward that fills the cache. Hooking the attention
function rather than the cache class means the plain ``forward`` (perplexity) and ``generate``
(with a cache) see the same quantization. Cached entries are re-quantized on later steps, which is
harmless: min-max quantization of an already-quantized vector lands on the same grid, up to float
rounding of the scale (MSE clipping may not, so the KV specs reject it). Any number format works
(e.g. ``fp8:e4m3:head``, ``mxfp4`` with blocks of 32 along the head dimension); OliVe's MSE
scale search counts as clipping, so an OliVe KV spec must say ``minmax``.

With ``rotate`` (QuaRot/SpinQuant's R3), queries and keys go through a Hadamard transform of the head
dimension after RoPE: ``(q H^T)(k H^T)^T = q k^T``, so attention is unchanged in float while the
cached keys are quantized in a basis without outlier channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from bitsmith.errors import SpecError
from bitsmith.formats.registry import fake_quantize
from bitsmith.spec import KV_GRANULARITIES, QuantSpec

ATTN_NAME = "bitsmith_sdpa"


@dataclass
class KVQuantizer:
    """Fake-quantizes keys and values of one attention module, shaped ``(batch, heads, seq, dim)``."""

    key: QuantSpec | None = None
    value: QuantSpec | None = None
    rotate: bool = False

    def __post_init__(self) -> None:
        for spec in (self.key, self.value):
            if spec is None:
                continue
            spec.require(KV_GRANULARITIES, "the KV cache")
            if spec.clip != "minmax":
                raise SpecError(f"spec '{spec}': the KV cache supports min-max scales only (use a fixed r<ratio> to clip)")

    @staticmethod
    def _apply(x: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
        if spec is None:
            return x
        if spec.granularity in ("head", "group"):  # per head, or MX blocks along the head dimension
            return fake_quantize(x, spec)
        b, h, s, d = x.shape  # per token across all heads
        flat = x.transpose(1, 2).reshape(b, s, h * d)
        return fake_quantize(flat, spec).view(b, s, h, d).transpose(1, 2)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.rotate:
            from bitsmith.transforms.hadamard import hadamard_transform

            query, key = hadamard_transform(query), hadamard_transform(key)
        return query, self._apply(key, self.key), self._apply(value, self.value)

    def describe(self) -> dict[str, Any]:
        return {"key": self.key and self.key.to_dict(), "value": self.value and self.value.to_dict(),
                "rotate": self.rotate}

    @classmethod
    def from_description(cls, info: dict[str, Any]) -> "KVQuantizer":
        return cls(info["key"] and QuantSpec.from_dict(info["key"]),
                   info["value"] and QuantSpec.from_dict(info["value"]), bool(info.get("rotate", False)))


def _attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    hook = getattr(module, "bitsmith_kv", None)
    if hook is not None:
        query, key, value = hook(query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_NAME, _attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def install(model: nn.Module, attentions: list[nn.Module], quantizer: KVQuantizer) -> None:
    """Attach ``quantizer`` to each attention module and route the model through the hook."""
    for attn in attentions:
        attn.bitsmith_kv = quantizer
    use_hooked_attention(model)


def configure(model: nn.Module, attention: nn.Module, **changes: Any) -> None:
    """Change some fields of an attention module's hook, keeping the others (steps compose)."""
    old = getattr(attention, "bitsmith_kv", None) or KVQuantizer()
    fields = {"key": old.key, "value": old.value, "rotate": old.rotate, **changes}
    install(model, [attention], KVQuantizer(**fields))


def use_hooked_attention(model: nn.Module) -> None:
    model.config._attn_implementation = ATTN_NAME
    for sub in model.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = ATTN_NAME
