"""Activation quantization of linear inputs: dynamic (per token or per tensor, scales from the live
tensor) or static (one integer scale per linear input, calibrated once and saved with the model).

Static per-tensor scales are the hard case of W8A8 (SmoothQuant, arXiv 2211.10438, calls it O3):
no range is computed at run time, so one outlier channel sets the grid for every token. With
``static: true`` the step runs in the calibration pipeline as an input-transforming step that
changes nothing but records the scale: the range is the input's exact min/max over all calibration
tokens *after* the transforms before it in the recipe (put it after smoothquant/osplus), shrunk by
a clipping ratio searched on a 36-point grid from 1.0 down to 0.3 (times the spec's ``r<ratio>``),
coarse to fine, for the least output error ``sum_i ||(Q(X) - X) W_i^T||^2`` of the group's linears
on real calibration rows (:class:`bitsmith.algorithms.smoothing.InputTap`): the percentile-like
clipping of the SmoothQuant/OS+ calibrators, judged by what the layer outputs rather than by the
activation's own error. ``clip_search: false`` keeps the spec's ratio (min/max by default).

``cross: <alpha>`` (or ``true``: the paper's 0.15) quantizes with CrossQuant (arXiv 2410.07505,
:mod:`bitsmith.formats.crossquant`) instead of per token: dynamic steps ``t_i^alpha c_j^(1-alpha)``
from the token's and the channel's absolute maxima, on a symmetric per-token integer spec.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.algorithms.smoothing import STATIC_GRID, InputTap, grid_argmin, static_grid
from bitsmith.errors import BitsmithError, SpecError
from bitsmith.formats import crossquant
from bitsmith.registry import Step, register_step
from bitsmith.runtime.modules import QuantLinear, static_input_params
from bitsmith.spec import ACTIVATION_GRANULARITIES, QuantSpec


def search_static_ratio(x: torch.Tensor, row_weight: torch.Tensor, lo: float, hi: float, weights: list[torch.Tensor],
                        spec: QuantSpec) -> float:
    """Clipping ratio of the static range ``[lo, hi]`` with the least ``sum_i ||(Q(X) - X) W_i^T||^2``
    over rows ``x`` (each standing for ``row_weight`` calibration rows)."""
    w = torch.cat([t.detach().float() for t in weights])
    gram = w.T @ w if w.shape[0] > w.shape[1] else None  # the cheaper of (dX W^T) and (dX W^T W) dX
    rw = row_weight.float()
    grid = [spec.clip_ratio * g for g in STATIC_GRID]

    def err(i: int) -> float:
        dx = static_grid(x, lo, hi, spec, grid[i]) - x
        per_row = ((dx @ gram) * dx).sum(1) if gram is not None else (dx @ w.T).pow(2).sum(1)
        return float((per_row * rw).sum())

    return grid[grid_argmin(len(grid), err)]


@register_step("act_quant")
@dataclass
class ActQuant(Step):
    """Recipe step: ``spec``, ``lm_head``; ``static`` (per-tensor integer scales calibrated once) with
    ``clip_search`` (search the static range's clipping, default true); ``cross`` (CrossQuant alpha)."""

    spec: str | dict
    lm_head: bool = False
    static: bool = False
    clip_search: bool = True
    cross: float | bool | None = None

    def __post_init__(self) -> None:
        self.qspec = QuantSpec.coerce(self.spec).require(ACTIVATION_GRANULARITIES, "activations")
        self.alpha = crossquant.ALPHA if self.cross is True else (None if self.cross is False else self.cross)
        if self.alpha is not None:
            if self.static:
                raise SpecError("act_quant: CrossQuant steps are dynamic (row and column maxima of the live input); "
                                "drop static: true or cross")
            crossquant.check(self.qspec, self.alpha)
        for key in ("static", "clip_search"):
            if not isinstance(getattr(self, key), bool):
                raise SpecError(f"act_quant: {key} must be true or false, got {getattr(self, key)!r}")
        self.ratios: list[dict] = []
        if self.static:
            q = self.qspec
            if q.granularity != "tensor":
                raise SpecError(f"act_quant: static scales are one per tensor, but '{q}' is per {q.granularity} "
                                "(per-token scales are dynamic by nature); use e.g. int8:tensor:sym")
            if q.format != "int":
                raise SpecError(f"act_quant: static scales are integer grids; '{q}' is {q.format}")
            if q.clip == "mse":
                raise SpecError(f"act_quant: a static scale's clipping is searched at calibration (clip_search); "
                                f"drop ':mse' from '{q}'")
            if self.lm_head:
                raise SpecError("act_quant: static scales cover the block linears only; use lm_head: false")
            self.transforms_inputs = True  # calibrated: gets transform_inputs calls, changes nothing

    def apply_block(self, ctx, block) -> None:
        ad = ctx.lm.adapter
        for role, linear in ad.block_linears(block).items():
            q = QuantLinear.from_linear(linear, self.qspec)
            q.act_static = self.static
            q.act_cross = self.alpha
            q.set_static_input(None)
            ad.set_block_linear(block, role, q)
        if self.static and self.clip_search:
            InputTap.for_block(ctx, block)

    def transform_inputs(self, ctx, block, roles, stats):
        """Static scales: calibrate the grid of the linears ``roles`` from their input's statistics."""
        if not self.static:
            return None
        ad = ctx.lm.adapter
        linears = [ad.block_linears(block)[r] for r in roles]
        lo, hi = float(stats.min.min()), float(stats.max.max())
        if not (torch.isfinite(stats.min).all() and torch.isfinite(stats.max).all()):
            raise BitsmithError(f"act_quant: static scales need the per-channel range of the {'/'.join(roles)} input, "
                                "unknown after a step that mixes channels; put act_quant (static) before it")
        ratio = self.qspec.clip_ratio
        if self.clip_search:
            x, row_weight = InputTap.for_block(ctx, block).samples(tuple(roles), stats, linears[0], "act_quant")
            ratio = search_static_ratio(x, row_weight, lo, hi, [lin.weight for lin in linears], self.qspec)
        scale, zero = static_input_params(lo, hi, self.qspec, ratio)
        for lin in linears:
            lin.set_static_input(scale, zero)
        self.ratios.append({"block": ad.blocks().index(block), "roles": "/".join(roles), "ratio": round(ratio, 4),
                            "range": (lo, hi)})
        return None

    def finish(self, ctx) -> None:
        if self.static:
            InputTap.close(ctx)
        ad = ctx.lm.adapter
        if self.lm_head:
            head = QuantLinear.from_linear(ad.lm_head(), self.qspec)
            head.act_cross = self.alpha
            ad.set_lm_head(head)
