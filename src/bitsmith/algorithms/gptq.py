"""GPTQ: second-order weight rounding, one column at a time (Frantar et al., arXiv 2210.17323).

Each linear layer minimises ``||W X - Q X||^2`` over its calibration inputs ``X``. The Hessian of that
loss is ``H = 2 X X^T / n``. Columns are rounded in order; the rounding error of a column is spread
over the columns not yet rounded through the inverse Hessian (the Optimal Brain Surgeon update), so
later columns absorb what earlier ones lost. As in the paper, the inverse Hessian is taken once by
Cholesky (its upper factor gives every step's update row), updates are applied lazily in blocks of
columns, dead inputs (zero diagonal) are dropped, and a dampening of ``damp * mean(diag H)`` keeps
the factorisation stable; when it is not enough the dampening is raised and logged.

Practices kept from "Gradient-Based Post-Training Quantization: Challenging the Status Quo"
(GPTQ is robust to calibration choices; the quantization grid and its
degrees of freedom matter most): act-order (columns with the largest Hessian diagonal first), group
scales computed on the already-updated weights when a group starts, static groups (scales fixed
from the original weights) when act-order would otherwise scatter groups, and MSE-searched scales
for any integer spec of :mod:`bitsmith.spec`.

Other number formats use the same loop: the format registry (:mod:`bitsmith.formats.registry`) gives
each format's grid parameters and per-column rounding, so GPTQ runs on minifloat grids (fp, scale
per channel or group), NF4, MX (the shared block exponent fixed from the weights before its columns
are rounded: from the original weights under act-order or static groups, the default) and BitMoD
(scale and datatype per group fixed the same way) and the GGUF block types (the stored grid of each
element, K-quant sub-block scales included, fixed the same way: :mod:`bitsmith.formats.gguf`).
OliVe is not supported (pairs, not columns).

Per-IC specs (``ic``, AdaDim, arXiv 2309.15531) suit the column order: each input column has its own
grid (one per group of output rows), set from that column as updated by the columns before it, just
before it is rounded (``static_groups``: from the original weights up front).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from bitsmith.calibration import InputStats
from bitsmith.errors import BitsmithError, SpecError
from bitsmith.formats import integer
from bitsmith.formats.registry import NumberFormat, number_format, oriented, slice_rows
from bitsmith.registry import Step, register_step
from bitsmith.runtime.modules import QuantLinear
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import WEIGHT_GRANULARITIES, QuantSpec

log = logging.getLogger(__name__)


Hessian = InputStats  # GPTQ's name for it: ``value()`` is ``2 X X^T / n``


def _grid(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (float, fp16-exact scales) for the columns of ``w`` sharing one grid."""
    if spec.granularity == "tensor":
        s, z = integer.choose_params(w.reshape(1, -1), spec, torch.float16)
        return s.expand(w.shape[0], 1), z.expand(w.shape[0], 1)
    return integer.choose_params(w, spec, torch.float16)


def _round(col: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(col / scale) + zero, 0, (1 << bits) - 1)


def _format_grid(w: torch.Tensor, spec: QuantSpec, fmt: NumberFormat) -> torch.Tensor:
    """Grid parameters ``(rows, k)`` of ``spec``'s format for the columns of ``w`` sharing one grid."""
    if spec.granularity == "tensor":
        return fmt.grid(w.reshape(1, -1), spec).expand(w.shape[0], -1)
    return fmt.grid(w, spec)


def _ic_grid(wt: torch.Tensor, ospec: QuantSpec, fmt: NumberFormat) -> torch.Tensor:
    """Per-IC grid parameters ``(cols, rows, k)`` for columns ``wt`` ``(cols, rows)`` of W, each its own grid.

    ``ospec`` is the per-row spec of the transposed weight (:func:`~bitsmith.formats.registry.oriented`).
    """
    cols, rows = wt.shape
    gp = fmt.grid(integer.group_view(wt, ospec), ospec)
    if ospec.granularity == "channel":  # one grid per column: (cols, k)
        return gp.unsqueeze(1).expand(cols, rows, gp.shape[-1])
    return gp.repeat_interleave(ospec.group_size, dim=1)  # (cols, rows // g, k) -> (cols, rows, k)


def _inverse_hessian_factor(flipped: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper triangular ``U`` with ``U^T U = (H + damp*mean(diag H)*I)^-1``, given ``flipped = J H J``
    (``H`` with its rows and columns reversed), which it overwrites.

    Factor the reversed matrix, ``J H J = L L^T``; then ``H = R R^T`` with ``R = J L J`` upper
    triangular, and ``U = R^-1``: one Cholesky and one triangular inverse. Raises the dampening
    (and logs it) until the factorisation succeeds. (The caller builds ``J H J`` in one gather and
    hands it over, so no other copy of the float64 Hessian is alive meanwhile.)
    """
    mean_diag = torch.diag(flipped).flip(0).mean().item()  # in H's order, as the sum's rounding depends on it
    d, added = damp, 0.0
    for _ in range(8):
        flipped.diagonal().add_(d * mean_diag - added)
        added = d * mean_diag
        l, info = torch.linalg.cholesky_ex(flipped)
        if info.item() == 0:
            r = l.flip(0, 1)
            del l
            u = torch.linalg.solve_triangular(r, torch.eye(r.shape[0], dtype=r.dtype), upper=True)
            del r
            if torch.isfinite(u).all():
                if d != damp:
                    log.warning("GPTQ: Hessian not positive definite at damp=%g; used damp=%g", damp, d)
                return u
            del u
        d = d * 10 if d > 0 else 1e-4
    raise BitsmithError("GPTQ: the Hessian stays singular even with heavy dampening; the calibration inputs are degenerate (check for NaNs or constant inputs)")


def gptq_quantize(
    weight: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    static_groups: bool = False,
) -> Any:
    """GPTQ codes of ``weight`` (out, in) for the Hessian ``h`` (in, in), on ``spec``'s grid.

    Any format whose registry entry supports GPTQ works: its grid parameters (scale and zero point,
    minifloat or NF4 scale, MX block exponent, BitMoD scale and datatype) are fixed per channel, per
    static group up front, or per group when the group starts, and each column is rounded by the
    format's ``round``. Returns the format's codes (for integers :class:`~bitsmith.formats.integer.IntCodes`
    in the grouped layout of :func:`~bitsmith.formats.integer.group_view`) with fp16-exact scales,
    ready for :meth:`PackedWeight.from_codes`.
    """
    spec.require(WEIGHT_GRANULARITIES, "weights")
    fmt = number_format(spec)
    if not fmt.supports_gptq:
        raise SpecError(f"gptq: spec '{spec}' is not supported: {fmt.gptq_note}")
    if not torch.isfinite(h).all():
        raise BitsmithError("GPTQ: the calibration Hessian holds NaN or inf; the model produced non-finite activations")
    w = weight.detach().float().clone()
    rows, cols = w.shape
    spec, _, per_ic = oriented(spec, (rows, cols))  # per-IC: grids of the transposed weight's rows
    group = spec.group_size if spec.granularity == "group" and not per_ic else None
    integer.group_view(w.T if per_ic else w, spec)  # raises a clear error when the group size does not divide
    h = h.to(torch.float64, copy=True)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    hdiag = torch.diag(h).float()  # column importance: formats may weight their grid search by it (GGUF)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(cols)
    static = group is not None and (static_groups or act_order)
    fixed = static_groups if per_ic else (group is None or static)
    # Grids fixed up front (per tensor/channel always; per group when static; per-IC with
    # static_groups): for each column, the (rows, k) grid parameters of the format (integers: scale
    # and zero point).
    k = fmt.grid_width
    if per_ic:
        col_params = _ic_grid(w.T, spec, fmt) if fixed else torch.empty(cols, rows, k)
    elif group is None:
        col_params = _format_grid(w, spec, fmt).unsqueeze(0).expand(cols, rows, k)
    elif static:
        gp = fmt.column_grid(w.view(rows, cols // group, group), spec, hdiag.view(cols // group, group))  # (rows, groups, group, k)
        col_params = gp.reshape(rows, cols, k).transpose(0, 1)
    else:
        col_params = torch.empty(cols, rows, k)
    if fixed:
        col_params = col_params[perm].contiguous()

    # Work on W^T so that a column of W is a contiguous row.
    wt = w.T[perm].contiguous()
    rev = perm.flip(0)
    flipped = h[rev][:, rev]  # the permuted Hessian reversed: J P^T H P J
    del h
    u = _inverse_hessian_factor(flipped, damp).float()
    del flipped
    if group is not None and not static:  # groups must not straddle blocks so each is fully updated
        block_size = max(group, block_size // group * group)
    codes = torch.empty(cols, rows)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = wt[i1:i2]  # a view: updates land in wt
        err1 = torch.empty(i2 - i1, rows)
        u1 = u[i1:i2, i1:i2]
        diag = torch.diagonal(u1).tolist()
        for j in range(i2 - i1):
            c = i1 + j
            if group is not None and not static and c % group == 0:
                col_params[c : c + group] = fmt.column_grid(w1[j : j + group].T, spec, hdiag[perm[c : c + group]]).transpose(0, 1)
            elif per_ic and not fixed:
                col_params[c] = _ic_grid(w1[j : j + 1], spec, fmt)[0]
            col = w1[j]
            q, value = fmt.round(col, col_params[c], spec)
            codes[c] = q
            err = (col - value).div_(diag[j])
            w1[j + 1 :].addr_(u1[j, j + 1 :], err, alpha=-1.0)
            err1[j] = err
        wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1.0)

    inv = torch.argsort(perm)
    if per_ic:  # codes (cols, rows) are already the transposed weight's layout
        return fmt.from_columns(codes[inv], col_params[inv], spec)
    return fmt.from_columns(codes[inv].T, col_params[inv].transpose(0, 1), spec)


def gptq_reference(weight: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float = 0.01) -> torch.Tensor:
    """Plain column-by-column GPTQ without act-order, blocks or Cholesky, in float64: the test oracle.

    After rounding column ``j`` it applies the OBS update with the explicit inverse Hessian of the
    remaining columns and then removes ``j`` from that inverse (Gaussian elimination). Returns codes
    (out, in) as floats; grids as :func:`gptq_quantize` with ``act_order=False`` computes them.
    """
    w = weight.double().clone()
    rows, cols = w.shape
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    spec, _, per_ic = oriented(spec, (rows, cols))
    group = spec.group_size if spec.granularity == "group" and not per_ic else None
    if group is None and not per_ic:
        s, z = _grid(w.float(), spec)
    codes = torch.empty(rows, cols, dtype=torch.float64)
    for j in range(cols):
        if per_ic:  # the column's own grid, from its updated values, per group of rows
            size = spec.group_size or rows
            s, z = integer.choose_params(w[:, j].float().reshape(-1, size), spec, torch.float16)
            s, z = s.repeat_interleave(size, 0), z.repeat_interleave(size, 0)
        elif group is not None and j % group == 0:
            s, z = integer.choose_params(w[:, j : j + group].float(), spec, torch.float16)
        scale, zero = s[:, 0].double(), z[:, 0].double()
        q = _round(w[:, j], scale, zero, spec.bits)
        codes[:, j] = q
        err = (w[:, j] - (q - zero) * scale) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
        hinv = hinv - hinv[:, j : j + 1] @ hinv[j : j + 1, :] / hinv[j, j]
    return codes


@register_step("gptq")
@dataclass
class GPTQ(Step):
    """Recipe step: GPTQ weights for every block linear (and the lm_head when asked)."""

    weights: str | dict
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    static_groups: bool = False
    lm_head: bool = False
    fallback: str | dict | None = None  # spec for linears whose input width the weights' group does not divide

    calibrated: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.spec = QuantSpec.coerce(self.weights).require(WEIGHT_GRANULARITIES, "weights")
        self.fallback_spec = None
        if self.fallback is not None:
            self.fallback_spec = QuantSpec.coerce(self.fallback).require(WEIGHT_GRANULARITIES, "weights")
        for spec in (self.spec, self.fallback_spec):
            fmt = number_format(spec) if spec is not None else None
            if fmt is not None and not fmt.supports_gptq:
                raise SpecError(f"gptq: spec '{spec}' is not supported: {fmt.gptq_note}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise BitsmithError(f"gptq: block_size {self.block_size!r} must be a positive integer")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise BitsmithError(f"gptq: damp {self.damp!r} must be a number in [0, 1), e.g. 0.01")

    def solve(self, linears: dict[str, nn.Module], hessian: torch.Tensor) -> dict[str, nn.Module]:
        linears = {r: m for r, m in linears.items() if r != "lm_head" or self.lm_head}
        if not linears:
            return {}
        spec = self.spec_for(next(iter(linears.values())).weight.shape[1])
        # Rows are solved independently under one Hessian, so linears sharing an input (q/k/v,
        # gate/up) go through one GPTQ pass; only a per-tensor grid couples rows.
        # A per-IC group of rows must not straddle two roles either.
        batches = [[r] for r in linears] if spec.granularity in ("tensor", "ic") else [list(linears)]
        out = {}
        for roles in batches:
            weight = torch.cat([linears[r].weight for r in roles])
            codes = gptq_quantize(weight, hessian, spec, self.block_size, self.damp,
                                  self.act_order, self.static_groups)
            start = 0
            for r in roles:
                rows = linears[r].weight.shape[0]
                part = codes if len(roles) == 1 else slice_rows(codes, start, start + rows)
                q = QuantLinear.from_linear(linears[r])
                q.set_packed(PackedWeight.from_codes(part, spec, tuple(linears[r].weight.shape)))
                out[r] = q
                start += rows
        return out

    def spec_for(self, in_features: int) -> QuantSpec:
        """The weights spec, or the fallback where its group does not divide the input width (as llama.cpp
        stores a row of 576 in Q5_0 when Q4_K's 256-element super-blocks do not fit)."""
        group = self.spec.group_size if self.spec.granularity == "group" else None
        if group is None or in_features % group == 0 or self.fallback_spec is None:
            return self.spec
        return self.fallback_spec

    def wants_lm_head(self) -> bool:
        return self.lm_head

    def weight_grid(self, in_features: int) -> QuantSpec:
        return self.spec_for(in_features)
