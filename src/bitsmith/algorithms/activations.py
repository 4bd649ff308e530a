"""Dynamic activation quantization of linear inputs (per token or per tensor, scales from the live tensor)."""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.registry import Step, register_step
from bitsmith.runtime.modules import QuantLinear
from bitsmith.spec import ACTIVATION_GRANULARITIES, QuantSpec


@register_step("act_quant")
@dataclass
class ActQuant(Step):
    spec: str | dict
    lm_head: bool = False

    def __post_init__(self) -> None:
        self.qspec = QuantSpec.coerce(self.spec).require(ACTIVATION_GRANULARITIES, "activations")

    def apply_block(self, ctx, block) -> None:
        ad = ctx.lm.adapter
        for role, linear in ad.block_linears(block).items():
            ad.set_block_linear(block, role, QuantLinear.from_linear(linear, self.qspec))

    def finish(self, ctx) -> None:
        ad = ctx.lm.adapter
        if self.lm_head:
            ad.set_lm_head(QuantLinear.from_linear(ad.lm_head(), self.qspec))
