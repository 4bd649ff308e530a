"""LRQ: low-rank weight-scaling matrices for reconstruction (Lee et al., arXiv 2407.11534).

FlexRound learns one scale per weight, as many parameters as the model has weights, from a few
hundred calibration sequences: it overfits them and generalises worse than it reconstructs. LRQ
keeps FlexRound's division (``W_hat = s1 * round(W / (s1 * exp(L U + r + c)))``) but replaces the full
scale matrix by a rank-``r`` product ``L U`` plus a row vector ``r`` and a column vector ``c``, so
weights still get individual scales from far fewer parameters. As in the paper ``L`` starts at zero
and ``U`` random, so the product is zero and the first step is round-to-nearest exactly.

``U`` starts small, as LoRA initialises its down-projection (``init: lora``, uniform in
``+-1/sqrt(cols)``): Adam then reshapes ``U`` within the first steps, so ``L U`` learns which columns
to scale. With ``U`` of variance ``1/rank`` instead (``init: normal``, the earlier default) ``U`` stays
close to a fixed random projection, and when a block's error sits in a few columns (the default model's
blocks 11 and 28, where a few huge activations dominate the output error) every step on ``L`` drags
all other weights of the row the same way: on those blocks rank-16 LRQ learned nothing at 60 steps
(block output error 0.96-0.99 of RTN's on held-out calibration windows; 0.85-0.95 with ``U`` of
LoRA's size).

With that start the rank pays off: on the default model at W3 g64, ranks 16 / 64 / 144 / 192 give
perplexity 41.90 / 39.18 / 37.77 / 37.68 (FlexRound: 37.41, with 2.4x the parameters of rank 144), so
the W3 recipe uses 144, a quarter of the hidden size. At per-channel W4 rank 144 lowers KL (0.367 against
0.379) but not perplexity (32.68 against 32.44), and the W4 recipes keep 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bitsmith.algorithms.reconstruction import (
    LearnedQuantizer,
    Reconstruction,
    low_rank_pair,
)
from bitsmith.errors import BitsmithError
from bitsmith.registry import register_step
from bitsmith.spec import QuantSpec


class LRQQuantizer(LearnedQuantizer):
    """``W / (s1 * exp(L U + r + c))`` rounded on the grid of ``s1``."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, rank: int, gen: torch.Generator,
                 init: str = "lora") -> None:
        super().__init__(weight, spec)
        rows, cols = self.shape
        self.L, self.U = low_rank_pair(self.shape, rank, gen, "lrq", init)
        self.r = nn.Parameter(torch.zeros(rows, 1))
        self.c = nn.Parameter(torch.zeros(1, cols))

    def divisor_exponent(self) -> torch.Tensor:
        return self.L @ self.U + self.r + self.c

    def unrounded(self, scale: torch.Tensor) -> torch.Tensor:
        return self.grouped(self.w) / (scale * self.grouped(torch.exp(self.divisor_exponent())))


@register_step("lrq")
@dataclass
class LRQ(Reconstruction):
    """Recipe step: LRQ weights of rank ``rank``, ``U`` initialised as ``init`` ('lora' or 'normal'), trained
    block by block (other arguments:
    :class:`~bitsmith.algorithms.reconstruction.Reconstruction`)."""

    rank: int = 8
    init: str = "lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise BitsmithError(f"lrq: rank {self.rank!r} must be a positive integer")
        if self.init not in ("lora", "normal"):
            raise BitsmithError(f"lrq: init {self.init!r} must be 'lora' or 'normal'")

    def make_quantizer(self, weight: torch.Tensor, gen: torch.Generator) -> LearnedQuantizer:
        return LRQQuantizer(weight, self.spec, self.rank, gen, self.init)
