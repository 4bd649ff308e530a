"""FlexRound: learnable rounding by element-wise division (Lee et al., arXiv 2306.00317).

Additive learned rounding (AdaRound) can move a weight by at most one grid step, whatever its
size. FlexRound divides instead: ``W_hat = s1 * round(W / (s1 * S2 * s3 * s4))`` with a common grid
size ``s1`` (here per channel or group, as the spec says), a positive scale per weight ``S2`` and
per output row ``s3`` and input column ``s4``. By the reciprocal rule the gradient of a weight's
scale is proportional to the weight itself, so large weights, whose rounding matters most to the
outputs, move most. The scales are learned in log space (``exp(0) = 1`` at the start), which keeps
them positive and makes the first step exactly round-to-nearest on RTN's grid. The parameters are
trained by block reconstruction (:mod:`bitsmith.algorithms.reconstruction`), as the paper does for LLMs.

On GGUF's Q4_0 grid (``flexround-q4_0``) the start is the importance-weighted block scales and the
learning rates are a quarter of the integer recipes': with one scale per 32 weights the start is already
close, and at 0.02 six to eight of the default model's 30 blocks end worse than it (the guard keeps the start).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bitsmith.algorithms.reconstruction import LearnedQuantizer, Reconstruction
from bitsmith.registry import register_step
from bitsmith.spec import QuantSpec


class FlexRoundQuantizer(LearnedQuantizer):
    """``W / (s1 * exp(S2 + s3 + s4))`` rounded on the grid of ``s1``."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec) -> None:
        super().__init__(weight, spec)
        rows, cols = self.shape
        self.log_S2 = nn.Parameter(torch.zeros(rows, cols))
        self.log_s3 = nn.Parameter(torch.zeros(rows, 1))
        self.log_s4 = nn.Parameter(torch.zeros(1, cols))

    def divisor_exponent(self) -> torch.Tensor:
        return self.log_S2 + self.log_s3 + self.log_s4

    def unrounded(self, scale: torch.Tensor) -> torch.Tensor:
        return self.grouped(self.w) / (scale * self.grouped(torch.exp(self.divisor_exponent())))


@register_step("flexround")
@dataclass
class FlexRound(Reconstruction):
    """Recipe step: FlexRound weights, trained block by block (arguments: :class:`Reconstruction`)."""

    def make_quantizer(self, weight: torch.Tensor, gen: torch.Generator) -> LearnedQuantizer:
        return FlexRoundQuantizer(weight, self.spec)
