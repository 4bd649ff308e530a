"""AdaDim: per-layer choice between per-OC and per-IC weight groups (Heo et al., arXiv 2309.15531).

Activation outliers sit in a few input channels, so they make a few *columns* of ``W`` matter most.
Per-OC groups (``int4:g64``: a scale per output row and group of input columns) make such a column
share its grid with ordinary ones; per-IC groups (``int4:ic:g64``: a scale per input column and group
of output rows, :mod:`bitsmith.spec`) give it grids of its own. Neither dimension wins everywhere
(weights have sensitivities of their own), so AdaDim picks, per linear layer, the one whose quantized
layer reproduces the calibration outputs best: the least ``||W X - Q X||^2``, here in its Hessian form
``tr((W - Q) H (W - Q)^T)`` with ``H = 2 X X^T / n``, which the pipeline already accumulates. Each
candidate is solved by the chosen weight solver (``rtn`` or ``gptq``, :data:`SOLVERS`), so AdaDim
augments either, as the paper does. A candidate whose groups do not divide the layer (per-IC g64 on a
32-row layer) is skipped. Choices are kept in ``choices`` (role, chosen spec, both errors).

The authors' code (github.com/johnheo/adadim-llm) measures the output of the attention or MLP
sub-block for q/k/v and gate/up, and of the layer for o and down. On the default model (W3 g64,
MSE-clipped grids, 8 calibration sequences) that criterion also picks per-IC for v in 29 of 30 blocks,
and the model it gives has the same perplexity and KL within about 1%. Leaving out position 0, or
weighting each token by ``1/rms^2`` of its residual stream, changes at most two of the 210 choices
(both down_proj) and none for v. So the Hessian form stays.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from bitsmith.algorithms.gptq import GPTQ, gptq_quantize
from bitsmith.errors import SpecError
from bitsmith.formats.registry import group_count, oriented
from bitsmith.registry import Step, register_step
from bitsmith.runtime.modules import QuantLinear
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import WEIGHT_GRANULARITIES, QuantSpec

log = logging.getLogger(__name__)


def dimension_pair(spec: QuantSpec) -> tuple[QuantSpec, QuantSpec]:
    """(per-OC, per-IC) specs of the same group size: ``int4:g64`` <-> ``int4:ic:g64``, ``int4:channel`` <-> ``int4:ic``."""
    if spec.granularity == "tensor":
        raise SpecError(f"adadim: '{spec}' has one scale per tensor, so there is no dimension to choose; "
                        "use a channel or group spec such as int4:g64")
    oc = dataclasses.replace(spec, granularity="group" if spec.group_size is not None else "channel")
    return oc, dataclasses.replace(spec, granularity="ic")


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the layer's squared output error on the calibration inputs of ``H``."""
    d = (w.double() - q.double())
    return float(((d @ h.double()) * d).sum())


def _fits(spec: QuantSpec, shape: tuple[int, int]) -> bool:
    try:
        group_count(*oriented(spec, shape)[:2])
    except SpecError:
        return False
    return True


# Weight solvers by name: (step, weight, Hessian, spec) -> the packed weight.
SOLVERS: dict[str, Callable[["AdaDim", torch.Tensor, torch.Tensor, QuantSpec], PackedWeight]] = {
    "rtn": lambda step, w, h, spec: PackedWeight.quantize(w, spec),
    "gptq": lambda step, w, h, spec: PackedWeight.from_codes(
        gptq_quantize(w, h, spec, step.block_size, step.damp, step.act_order, step.static_groups), spec, tuple(w.shape)),
}


@register_step("adadim")
@dataclass
class AdaDim(Step):
    """Recipe step: ``weights`` (either dimension's spec; both are tried), ``solver`` (``gptq``, or ``rtn``),
    GPTQ's ``block_size``, ``damp``, ``act_order``, ``static_groups``, and ``lm_head``."""

    weights: str | dict
    solver: str = "gptq"
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    static_groups: bool = False
    lm_head: bool = False

    calibrated: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise SpecError(f"adadim: solver {self.solver!r} is unknown; use one of {', '.join(SOLVERS)}")
        self.spec = QuantSpec.coerce(self.weights).require(WEIGHT_GRANULARITIES, "weights")
        self.candidates = dimension_pair(self.spec)
        if self.solver == "gptq":  # GPTQ checks its own arguments and the formats it supports
            for spec in self.candidates:
                GPTQ(spec, self.block_size, self.damp, self.act_order, self.static_groups)
        self.choices: list[dict] = []

    def solve(self, linears: dict[str, nn.Module], hessian: torch.Tensor) -> dict[str, nn.Module]:
        out = {}
        for role, linear in linears.items():
            if role == "lm_head" and not self.lm_head:
                continue
            w = linear.weight.detach().float()
            fitting = [s for s in self.candidates if _fits(s, tuple(w.shape))] or [self.candidates[0]]
            best, errors = None, {}
            for spec in fitting:  # the per-OC spec alone when nothing fits: it raises the clear error
                packed = SOLVERS[self.solver](self, w, hessian, spec)
                errors[str(spec)] = output_error(w, packed.dequantize(), hessian)
                if best is None or errors[str(spec)] < errors[str(best.spec)]:
                    best = packed
            q = QuantLinear.from_linear(linear)
            q.set_packed(best)
            out[role] = q
            self.choices.append({"role": role, "spec": str(best.spec), "errors": errors})
            log.info("adadim %s: %s (%s)", role, best.spec, ", ".join(f"{k} {v:.4g}" for k, v in errors.items()))
        return out

    def wants_lm_head(self) -> bool:
        return self.lm_head
