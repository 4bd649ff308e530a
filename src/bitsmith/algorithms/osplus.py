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

``shift: search`` decides the shift per group by the same objective: the threshold search runs with
the paper's shift ``z`` and with none (``z = 0``, ``r_j = max|x_j|``), and the lower quantized output
error wins (ties keep the shift). The paper shifts everywhere (``shift: true``, the default), and a
shift can do harm: ``z`` comes from the channel's extremes over all tokens, so a channel whose range
is set by a few massive-activation tokens (a sequence's first token) moves every *other* token's
value in that channel by ``-z``, widening each ordinary token's own range. Under per-token (dynamic,
asymmetric) activation grids, which already absorb each token's offset, that can cost more than the
centring gains: on the default model at W6A6 the forced shift left the o_proj input's quantized
output error above that of no transform at all in 14 of the first 16 blocks, and above SmoothQuant's
in 15 (with the shift searched: in none), so the W6A6 and W4A4 recipes search it. Under a static
per-tensor grid the search dropped the o_proj shift in 23 of 30 blocks for a lower layer error, yet
perplexity rose (25.52 against 25.06 at W8A8, 32 x 512 calibration), so the W8A8 recipe keeps the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.algorithms.smoothing import ChannelMap, ChannelSmoothing, GroupProblem
from bitsmith.errors import SpecError
from bitsmith.models.adapter import HEADS
from bitsmith.registry import register_step


def osplus_scales(half_range: torch.Tensor, t: float) -> torch.Tensor:
    """``s_j = max(1, r_j / t)``: channels wider than ``t`` are shrunk to ``t``."""
    return (half_range / t).clamp_min(1.0)


@register_step("osplus")
@dataclass
class OSPlus(ChannelSmoothing):
    """Recipe step: ``layers`` (``all``: q/k/v, o, gate/up, down; ``norms``: only the RMSNorm-fed groups),
    ``shift`` (channel-wise shifting: ``true``, the default, as the paper; ``search``: per group whichever
    of shifted and unshifted has the smaller error; ``false`` never), ``grid`` (thresholds tried before refining,
    default 10), ``threshold`` (a fixed ``t`` as a fraction of the largest half-range, in (0, 1];
    default: searched)."""

    layers: str = "all"
    shift: bool | str = True
    grid: int = 10
    threshold: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.shift, bool) and self.shift != "search":
            raise SpecError(f"osplus: shift must be true, false or search, got {self.shift!r}")
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise SpecError(f"osplus: grid must be a positive integer, got {self.grid!r}")
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < float(t) <= 1.0):
            raise SpecError(f"osplus: threshold must be a fraction in (0, 1] of the largest channel half-range, got {t!r}")
        self._validate()

    def choose(self, problem: GroupProblem, cmap: ChannelMap, closing):
        lo, hi = cmap.reduce(problem.lo, "amin"), cmap.reduce(problem.hi, "amax")
        shifts = [False] if self.shift is False or (closing and closing.mixing != HEADS) else [True] if self.shift is True else [True, False]
        best = None
        for shifted in shifts:
            if shifted:
                z, r = (hi + lo) / 2, (hi - lo) / 2
            else:
                z, r = None, torch.maximum(lo.abs(), hi.abs())
            err, s, label = self._threshold(problem, cmap, z, r.clamp_min(1e-8), len(shifts) > 1)
            if best is None or err < best[0]:  # ties keep the paper's shift (tried first)
                best = (err, z, s, label if len(shifts) == 1 else {"t": label, "shift": shifted})
        return best[1], best[2], best[3]

    def _threshold(self, problem: GroupProblem, cmap: ChannelMap, z: torch.Tensor | None, r: torch.Tensor,
                   need_error: bool) -> tuple[float, torch.Tensor, float]:
        """``(error, s, t / max r)``: the threshold with the least output error for the shift ``z``."""
        zq = None if z is None else cmap.expand(z)
        top = float(r.max())
        if self.threshold is not None:
            s = osplus_scales(r, top * float(self.threshold))
            return (problem.error(cmap.expand(s), zq) if need_error else 0.0), s, float(self.threshold)
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
        return tried[t], osplus_scales(r, t), round(t / top, 6)
