"""LRQ: low-rank weight-scaling matrices for reconstruction (Lee et al., arXiv 2407.11534).

FlexRound learns one scale per weight, as many parameters as the model has weights, from a few
hundred calibration sequences: it overfits them and generalises worse than it reconstructs. LRQ
keeps FlexRound's division (``W_hat = s1 * round(W / (s1 * exp(L U + r + c)))``) but replaces the full
scale matrix by a rank-``r`` product ``L U`` plus a row vector ``r`` and a column vector ``c``, so
weights still get individual scales from far fewer parameters. As in the paper ``L`` starts at zero
and ``U`` random (entries of variance ``1/rank``, so that Adam's first steps on ``L`` already move
``L U`` by about the learning rate), so the product is zero and the first step is round-to-nearest exactly.
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

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, rank: int, gen: torch.Generator) -> None:
        super().__init__(weight, spec)
        rows, cols = self.shape
        self.L, self.U = low_rank_pair(self.shape, rank, gen, "lrq")
        self.r = nn.Parameter(torch.zeros(rows, 1))
        self.c = nn.Parameter(torch.zeros(1, cols))

    def divisor_exponent(self) -> torch.Tensor:
        return self.L @ self.U + self.r + self.c

    def unrounded(self, scale: torch.Tensor) -> torch.Tensor:
        return self.grouped(self.w) / (scale * self.grouped(torch.exp(self.divisor_exponent())))


@register_step("lrq")
@dataclass
class LRQ(Reconstruction):
    """Recipe step: LRQ weights of rank ``rank``, trained block by block (other arguments:
    :class:`~bitsmith.algorithms.reconstruction.Reconstruction`)."""

    rank: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise BitsmithError(f"lrq: rank {self.rank!r} must be a positive integer")

    def make_quantizer(self, weight: torch.Tensor, gen: torch.Generator) -> LearnedQuantizer:
        return LRQQuantizer(weight, self.spec, self.rank, gen)
