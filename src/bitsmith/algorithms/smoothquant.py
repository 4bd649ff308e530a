"""SmoothQuant: move activation outliers into the weights with a per-channel scale (Xiao et al., arXiv 2211.10438).

A few input channels of an LLM's activations are 10-100x larger than the rest, so a per-tensor
(or per-token) activation grid spends its levels on them and crushes everything else, while
weights are easy to quantize. SmoothQuant divides input channel ``j`` by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(``max|X_j|`` over all calibration tokens, ``max|W_j|`` over column ``j`` of every linear reading
that input) and multiplies the weights' column ``j`` by it: ``X W^T = (X / s)(W diag(s))^T``, so
the float model is unchanged. ``alpha`` sets how much of the difficulty moves to the weights; the
paper uses 0.5 for most models. The division is folded into the layer before (branch RMSNorm,
``v_proj`` for o, ``up_proj`` for down; see :mod:`bitsmith.algorithms.smoothing`).

``alpha: search`` picks, per input group, among 0.3, 0.4, ..., 0.9 and "no smoothing" the one with
the least quantized output error ``sum_i ||X W_i^T - Q_a(X/s) Q_w(W_i diag(s))^T||^2`` on real
calibration rows, with the grids the recipe's ``act_quant`` (per token, or static per tensor) and
``rtn`` install. Real rows rather than a Gram-matrix proxy, because the activation error depends on
per-token ranges and on clipping, which aggregate statistics do not determine. ``alpha: 0.5`` (the
default) is the paper's fixed value. Recipe order: ``smoothquant``, then ``act_quant`` and ``rtn``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.algorithms.smoothing import ChannelMap, ChannelSmoothing, GroupProblem
from bitsmith.errors import SpecError
from bitsmith.registry import register_step

ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s = max|X|^alpha / max|W|^(1 - alpha)`` (both clamped at 1e-5, as the reference code does)."""
    return (act_absmax.clamp_min(1e-5).pow(alpha) / weight_absmax.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)


@register_step("smoothquant")
@dataclass
class SmoothQuant(ChannelSmoothing):
    """Recipe step: ``alpha`` (number in (0, 1) or ``search``), ``layers`` (``all``: q/k/v, o, gate/up,
    down; ``norms``: only the RMSNorm-fed groups, as the paper does)."""

    alpha: float | str = 0.5
    layers: str = "all"

    def __post_init__(self) -> None:
        a = self.alpha
        if a != "search" and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 < float(a) < 1.0):
            raise SpecError(f"smoothquant: alpha must be a number in (0, 1) or 'search', got {a!r}")
        self._validate()

    def choose(self, problem: GroupProblem, cmap: ChannelMap, closing):
        act = cmap.reduce(torch.maximum(problem.lo.abs(), problem.hi.abs()), "amax")
        wmax = torch.stack([w.abs().amax(0) for w in problem.weights]).amax(0).double()
        wmax = cmap.reduce(wmax, "amax")
        if self.alpha != "search":
            return None, smoothing_scales(act, wmax, float(self.alpha)), float(self.alpha)
        best_s = torch.ones(cmap.size, dtype=torch.float64)
        best = (problem.error(cmap.expand(best_s)), None)
        for alpha in ALPHA_GRID:
            s = smoothing_scales(act, wmax, alpha)
            err = problem.error(cmap.expand(s))
            if err < best[0]:
                best, best_s = (err, alpha), s
        return None, best_s, best[1]
