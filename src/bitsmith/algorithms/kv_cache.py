"""KV-cache quantization: keys (after RoPE) and values per token and head, optionally in groups,
in any dynamic number format (``int4:head:asym``, ``fp8:e4m3:head``, ``mxfp4`` blocks along the head dimension)."""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.registry import Step, register_step
from bitsmith.runtime import kvcache
from bitsmith.spec import QuantSpec


@register_step("kv_quant")
@dataclass
class KVQuant(Step):
    key: str | dict | None = None
    value: str | dict | None = None

    def __post_init__(self) -> None:
        self.quantizer = kvcache.KVQuantizer(  # validates the specs now, at recipe load
            None if self.key is None else QuantSpec.coerce(self.key),
            None if self.value is None else QuantSpec.coerce(self.value),
        )

    def apply_block(self, ctx, block) -> None:
        kvcache.configure(ctx.lm.model, ctx.lm.adapter.attention(block), key=self.quantizer.key,
                          value=self.quantizer.value)
