"""DGQ: dual-grained A8W4 quantization (Zhang et al., arXiv 2310.04836).

Why: group-wise INT4 weights are accurate but a float scale per group breaks the int8 x int8
accumulation that 8-bit activations would allow; per-channel INT4 runs as one integer product but
loses accuracy. DGQ keeps groups and quantizes their scales to INT8 integers under one fp16 scale per
output channel (:mod:`bitsmith.formats.dual_grained`, spec ``dg4:g64``), found by a two-phase grid
search (group scales first, then the channel scale), so each layer runs as one int8 x int8 product
(:mod:`bitsmith.runtime.int8_matmul`). Its INT8 per-token activations are the recipe's ``act_quant``.

Activation outliers: the paper's *percentile clipping smoothing*. Per input channel ``j`` with
calibration absmax ``a_j``, channels above the ``p``-th percentile ``P_p`` of all channels' absmaxes
are scaled down to it, ``s_j = max(1, a_j / P_p)``, and ``W -> W diag(s)`` takes the scale (so
outlier columns land in their own weight groups, which the fine grain absorbs). It is a smoothing
without a search or a weight term, folded exactly like SmoothQuant's scales by the shared machinery of
:mod:`bitsmith.algorithms.smoothing` (branch RMSNorm for q/k/v and gate/up, ``v_proj`` rows for o,
``up_proj`` rows for down), so the float model is unchanged. ``percentile: null`` turns it off (the
step is then data-free); ``weights: null`` keeps only the smoothing (e.g. for ``gptq: {weights:
dg4:g64}`` after it, with ``layers: norms``).

Weights are rounded when the block is reached (before its calibration, so the calibration passes run
the block as it will be) and re-rounded after each group's smoothing from the kept float weights, on
the same ``dg`` spec (RTN after smoothing, as with ``rtn`` after ``smoothquant``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.algorithms.rtn import quantize_linear
from bitsmith.algorithms.smoothing import ChannelMap, ChannelSmoothing, GroupProblem
from bitsmith.errors import SpecError
from bitsmith.formats.registry import grouped_shape
from bitsmith.registry import register_step
from bitsmith.spec import WEIGHT_GRANULARITIES, QuantSpec


def percentile_scales(act_absmax: torch.Tensor, percentile: float) -> torch.Tensor:
    """``s_j = max(1, a_j / P_p(a))``: channels above the ``percentile``-th percentile (0-100, linear
    interpolation) of the channel absmaxes are scaled down to it; all ones when that percentile is 0."""
    a = act_absmax.double()
    threshold = torch.quantile(a, percentile / 100.0)
    if not threshold > 0:
        return torch.ones_like(a)
    return (a / threshold).clamp_min(1.0)


@register_step("dgq")
@dataclass
class DGQ(ChannelSmoothing):
    """Recipe step: ``weights`` (a ``dg`` spec such as ``dg4:g64``, or null: smoothing only), ``percentile``
    (the clipping percentile in (0, 100], default 99; null: no smoothing), ``layers`` (``all``: q/k/v, o,
    gate/up, down; ``norms``: only the RMSNorm-fed groups), ``lm_head`` (also quantize it, default false)."""

    weights: str | dict | None
    percentile: float | None = 99.0
    layers: str = "all"
    lm_head: bool = False

    def __post_init__(self) -> None:
        self.spec = None
        if self.weights is not None:
            self.spec = QuantSpec.coerce(self.weights).require(WEIGHT_GRANULARITIES, "weights")
            if self.spec.format != "dg":
                raise SpecError(f"dgq: weights '{self.spec}' are not dual-grained; use a dg spec such as dg4:g64 "
                                "(other formats: rtn or gptq after dgq with weights: null)")
        p = self.percentile
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < float(p) <= 100.0):
            raise SpecError(f"dgq: percentile must be a number in (0, 100] or null, got {p!r}")
        if not isinstance(self.lm_head, bool):
            raise SpecError(f"dgq: lm_head must be true or false, got {self.lm_head!r}")
        if self.spec is None and p is None:
            raise SpecError("dgq: weights and percentile are both null, so the step does nothing; give one")
        if self.spec is None and self.lm_head:
            raise SpecError("dgq: lm_head: true needs a weights spec")
        self._validate()
        self.transforms_inputs = p is not None  # no smoothing: a data-free weight quantizer

    def prepare(self, ctx) -> None:
        """Fail before any calibration when the group size does not divide a layer's input width."""
        if self.spec is None:
            return
        ad = ctx.lm.adapter
        linears = [item for block in ad.blocks() for item in ad.block_linears(block).items()]
        for role, linear in linears + ([("lm_head", ad.lm_head())] if self.lm_head else []):
            try:
                grouped_shape(self.spec, tuple(linear.weight.shape))
            except SpecError as e:
                raise SpecError(f"dgq: {role}: {e}") from None

    def apply_block(self, ctx, block) -> None:
        if self.transforms_inputs:
            super().apply_block(ctx, block)  # keeps the float weights, installs the row tap
        if self.spec is not None:
            ad = ctx.lm.adapter
            for role, linear in ad.block_linears(block).items():
                ad.set_block_linear(block, role, quantize_linear(linear, self.spec))

    def finish(self, ctx) -> None:
        if self.transforms_inputs:
            super().finish(ctx)
        if self.lm_head:
            ad = ctx.lm.adapter
            ad.set_lm_head(quantize_linear(ad.lm_head(), self.spec))
            ctx.untie_if_needed()

    def choose(self, problem: GroupProblem, cmap: ChannelMap, closing):
        act = cmap.reduce(torch.maximum(problem.lo.abs(), problem.hi.abs()), "amax")
        return None, percentile_scales(act, float(self.percentile)), float(self.percentile)
