"""Round-to-nearest: the baseline every other weight solver must beat.

Each weight is rounded to the nearest level of its group's grid, in any number format of the spec
(integers, minifloats, NF4, MX, BitMoD, OliVe: :mod:`bitsmith.formats.registry`); scales come from
min-max, a fixed clipping ratio or an MSE clipping search, as the format defines. The lm_head and the embedding table are left
in float unless asked for, as is usual in the PTQ literature; quantizing one of a tied pair unties it.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.registry import Step, register_step
from bitsmith.runtime.modules import QuantEmbedding, QuantLinear
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import WEIGHT_GRANULARITIES, QuantSpec


def quantize_linear(linear, spec: QuantSpec) -> QuantLinear:
    """A :class:`QuantLinear` holding the RTN-quantized weight of ``linear`` (input spec kept)."""
    q = QuantLinear.from_linear(linear)
    q.set_packed(PackedWeight.quantize(linear.weight, spec))
    return q


@register_step("rtn")
@dataclass
class RTN(Step):
    weights: str | dict
    lm_head: bool = False
    embeddings: bool = False

    def __post_init__(self) -> None:
        self.spec = QuantSpec.coerce(self.weights).require(WEIGHT_GRANULARITIES, "weights")

    def apply_block(self, ctx, block) -> None:
        ad = ctx.lm.adapter
        for role, linear in ad.block_linears(block).items():
            ad.set_block_linear(block, role, quantize_linear(linear, self.spec))

    def finish(self, ctx) -> None:
        ad = ctx.lm.adapter
        if self.embeddings:
            emb = ad.embeddings()
            ad.set_embeddings(QuantEmbedding(PackedWeight.quantize(emb.weight, self.spec), emb.padding_idx))
        if self.lm_head:
            ad.set_lm_head(quantize_linear(ad.lm_head(), self.spec))
        ctx.untie_if_needed()
