"""Outlier Suppression+: channel-wise shifting and scaling (Wei et al., arXiv 2304.09145).

OS+ observes that activation outliers sit in a few channels (concentration) and that those
channels are asymmetric (their range is not centred on zero). It treats both, per input channel:

* **shifting** by ``z_j = (max_j + min_j) / 2`` centres every channel's range on zero;
* **scaling** by ``s_j = max(1, r_j / t)``, ``r_j = (max_j - min_j) / 2``: channels whose half-range
  exceeds a threshold ``t`` are shrunk to ``t``, the others are left alone;

so the weight input becomes ``(x - z) / s`` and the linear ``W' = W diag(s)``, ``b' = b + W z``:
the float model is unchanged. ``t`` is the paper's one-parameter search: it minimises the quantized
output error ``sum_i ||(X - z) W_i^T - Q_a((X - z)/s) Q_w(W_i diag(s))^T||^2`` on real
calibration rows, over ``grid + 1`` thresholds log-spaced from the largest half-range (no scaling)
down to the smallest (every channel equalised), then refined between the best one's neighbours.

Where the shift goes (see :mod:`bitsmith.algorithms.smoothing`): into the ``v_proj`` bias for the
o_proj input (attention rows sum to one, so a constant shift of the values shifts the output);
online inside each reading linear after an RMSNorm (which has no bias); and nowhere for the
down_proj input, ``act(gate) * up``, where it could only run online in ``down_proj`` in front of a
scale already folded into ``up_proj`` (one input change cannot say both), so down gets the scale
only. ``shift: false`` turns shifting off everywhere (scaling alone, on ``max|x|``). Recipe order:
``osplus``, then ``act_quant`` and ``rtn`` (whose grids the search uses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.algorithms.smoothing import ChannelMap, ChannelSmoothing, GroupProblem
from bitsmith.errors import SpecError
from bitsmith.registry import register_step


def osplus_scales(half_range: torch.Tensor, t: float) -> torch.Tensor:
    """``s_j = max(1, r_j / t)``: channels wider than ``t`` are shrunk to ``t``."""
    return (half_range / t).clamp_min(1.0)


@register_step("osplus")
@dataclass
class OSPlus(ChannelSmoothing):
    """Recipe step: ``layers`` (``all``: q/k/v, o, gate/up, down; ``norms``: only the RMSNorm-fed groups),
    ``shift`` (channel-wise shifting, default true), ``grid`` (thresholds tried before refining, default 10),
    ``threshold`` (a fixed ``t`` as a fraction of the largest half-range, in (0, 1]; default: searched)."""

    layers: str = "all"
    shift: bool = True
    grid: int = 10
    threshold: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.shift, bool):
            raise SpecError(f"osplus: shift must be true or false, got {self.shift!r}")
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise SpecError(f"osplus: grid must be a positive integer, got {self.grid!r}")
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < float(t) <= 1.0):
            raise SpecError(f"osplus: threshold must be a fraction in (0, 1] of the largest channel half-range, got {t!r}")
        self._validate()

    def choose(self, problem: GroupProblem, cmap: ChannelMap, closing):
        lo, hi = cmap.reduce(problem.lo, "amin"), cmap.reduce(problem.hi, "amax")
        if self.shift and closing != "down":
            z = (hi + lo) / 2
            r = (hi - lo) / 2
        else:
            z, r = None, torch.maximum(lo.abs(), hi.abs())
        r = r.clamp_min(1e-8)
        zq = None if z is None else cmap.expand(z)
        top = float(r.max())
        if self.threshold is not None:
            return z, osplus_scales(r, top * float(self.threshold)), float(self.threshold)
        bottom = max(float(r.min()), top * 1e-6)
        ts = torch.logspace(0.0, 1.0, self.grid + 1, base=bottom / top, dtype=torch.float64) * top
        tried: dict[float, float] = {}

        def err(t: float) -> float:
            if t not in tried:
                tried[t] = problem.error(cmap.expand(osplus_scales(r, t)), zq)
            return tried[t]

        errs = [err(float(t)) for t in ts]
        i = min(range(len(errs)), key=errs.__getitem__)
        lo_t, hi_t = float(ts[min(i + 1, len(ts) - 1)]), float(ts[max(i - 1, 0)])
        if hi_t > lo_t:  # refine between the neighbours
            for t in torch.logspace(0.0, 1.0, 7, base=lo_t / hi_t, dtype=torch.float64)[1:-1] * hi_t:
                err(float(t))
        t = min(tried, key=tried.__getitem__)
        return z, osplus_scales(r, t), round(t / top, 6)
