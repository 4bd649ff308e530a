"""Dual-grained INT4 weights (DGQ, Zhang et al., arXiv 2310.04836), spec ``dg4:g<N>``.

Fine-grained (group) scales give INT4 weights their accuracy, but a float scale per group breaks the
integer accumulation along the input dimension: an A8W4 product would need one partial sum per group.
DGQ keeps the groups and quantizes their scales instead: each group's fp scale ``S'_g`` becomes an
integer ``S2_g`` (stored INT8) times one fp16 scale ``s1`` per output channel, so

    W = s1 * S2_g * (q - z_g),   q, z_g in [0, 15] (uint4 codes, uint4 zero points)

and ``W_s8 = S2_g * (q - z_g)`` is an INT8 matrix: the layer runs as ONE int8 x int8 product with
int32 accumulation, rescaled by ``s1`` per output channel and the activation scale per token
(:mod:`bitsmith.runtime.int8_matmul`).

INT8-safe limits, exact: ``|q - z| <= max(z, 15 - z)`` for every code ``q``, so a group whose
(stored) zero point is ``z`` may use ``S2 <= floor(127 / max(z, 15 - z))``: 8 at the extreme zero
points 0 and 15, 15 at z = 7 or 8 (and always 15 for ``:sym``, whose zero point is 8). ``W_s8``
then lies in [-127, 127] for any code, by construction, not by checking the data.

Two-phase grid search (the paper's, searching one level at a time instead of jointly):

1. each group's best fp scale and zero point for INT4, by the integer MSE clipping search
   (:func:`bitsmith.formats.integer.choose_params`; ``minmax`` or ``r<ratio>`` fix the range);
2. with those group scales fixed, per output channel: candidates ``s1 = m * max_g(S'_g / limit_g)``
   for the multipliers of :data:`COARSE_GRID` (m = 1: the smallest ``s1`` at which no group saturates;
   m < 1 clips the largest groups for finer steps elsewhere, m > 1 moves the rounding of ``S2``),
   ``S2_g = clamp(round(S'_g / s1), 1, limit_g)``, codes re-rounded on the effective scale
   ``s1 * S2_g`` with the phase-1 zero points; the candidate of least squared weight error wins.

Storage (exact bits): codes packed 4-bit, zero points packed 4-bit (not for ``:sym``), one int8 per
group, one fp16 per output channel: 4 + 12/g + 16/in bits per weight with zero points.
Dequantization ``(q - z) * (S2 * s1)`` is exact in float32 (a 5-bit, a 4-bit and an fp16 factor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.errors import SpecError
from bitsmith.formats import integer, packing
from bitsmith.formats.registry import (
    NumberFormat, first_of_group, group_count, grouped_shape, register_format, store_scale,
)
from bitsmith.spec import QuantSpec

INT8_MAX = 127
# Phase 2: multipliers of each row's no-saturation channel scale max_g(S'_g / limit_g).
COARSE_GRID = tuple(round(0.5 + 0.05 * i, 2) for i in range(21))
_CHANNEL_SCALE_BITS = 16
_GROUP_SCALE_BITS = 8


@dataclass
class DGCodes:
    """Dual-grained codes of a grouped weight ``(rows, groups, g)``; every field leads with the rows."""

    codes: torch.Tensor  # uint8 (rows, groups, g), 0..2**bits - 1
    zero: torch.Tensor | None  # uint8 (rows, groups, 1); None for :sym (zero point 2**(bits-1))
    group_scale: torch.Tensor  # int8 (rows, groups, 1): S2, 1..limit of its zero point
    channel_scale: torch.Tensor  # float32, fp16-exact (rows, 1, 1): s1

    def zero_points(self, spec: QuantSpec) -> torch.Tensor:
        if self.zero is not None:
            return self.zero
        return torch.full_like(self.group_scale, 1 << (spec.bits - 1), dtype=torch.uint8)

    def int8_weight(self, spec: QuantSpec) -> torch.Tensor:
        """``W_s8 = S2 * (q - z)`` as int8 (grouped shape); in [-127, 127] by the limits."""
        w = self.group_scale.to(torch.int16) * (self.codes.to(torch.int16) - self.zero_points(spec).to(torch.int16))
        return w.to(torch.int8)

    def dequantize(self, spec: QuantSpec) -> torch.Tensor:
        """float32 ``s1 * S2 * (q - z)`` (exact), grouped shape."""
        step = self.group_scale.float() * self.channel_scale
        return (self.codes.float() - self.zero_points(spec).float()) * step


def int_spec(spec: QuantSpec) -> QuantSpec:
    """The integer spec of phase 1: same bits, groups, zero-point mode and clipping."""
    return QuantSpec(format="int", bits=spec.bits, granularity="group", group_size=spec.group_size,
                     symmetric=spec.symmetric, clip=spec.clip, clip_ratio=spec.clip_ratio)


def scale_limit(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Largest INT8-safe group scale per group: ``floor(127 / max(z, 2**bits - 1 - z))``."""
    z = zero.float()
    return torch.floor(INT8_MAX / torch.maximum(z, (1 << bits) - 1 - z)).clamp_min(1.0)


def fine_params(wg: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 1: fp32 scale ``S'`` and (float) zero point per group of ``wg`` ``(rows, groups, g)``."""
    return integer.choose_params(wg.float(), int_spec(spec), torch.float32)


def channel_candidates(fine_scale: torch.Tensor, limit: torch.Tensor) -> list[torch.Tensor]:
    """Phase-2 candidates of ``s1`` per row, ``(rows, 1, 1)`` each, fp16-exact (rounded up)."""
    base = (fine_scale / limit).amax(dim=(-2, -1), keepdim=True)
    return [store_scale(base * m, torch.float16) for m in COARSE_GRID]


def split_scales(fine_scale: torch.Tensor, s1: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """``S2 = clamp(round(S' / s1), 1, limit)`` (float)."""
    return torch.minimum(torch.round(fine_scale / s1).clamp_min(1.0), limit)


def round_codes(wg: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``wg`` on the grid ``(q - zero) * step`` (float)."""
    return torch.clamp(torch.round(wg / step) + zero, 0, (1 << bits) - 1)


def dual_grained_quantize(wg: torch.Tensor, spec: QuantSpec) -> DGCodes:
    """The two-phase search (module docstring) on a grouped weight ``(rows, groups, g)``."""
    if wg.dim() != 3:
        raise SpecError(f"spec '{spec}': dual-grained scales need a whole (out, in) weight in groups, "
                        f"got a grouped tensor of shape {tuple(wg.shape)}")
    wg = wg.float()
    fine, zero = fine_params(wg, spec)
    limit = scale_limit(zero, spec.bits)
    best_err, best = None, None
    for s1 in channel_candidates(fine, limit):
        s2 = split_scales(fine, s1, limit)
        step = s2 * s1
        q = round_codes(wg, step, zero, spec.bits)
        err = ((q - zero) * step - wg).pow_(2).sum(dim=(-2, -1), keepdim=True)  # (rows, 1, 1)
        if best is None:
            best_err, best = err, (q, s2, s1)
            continue
        better = err < best_err  # ties keep the earlier candidate
        best_err = torch.where(better, err, best_err)
        best = tuple(torch.where(better, new, old) for new, old in zip((q, s2, s1), best))
    q, s2, s1 = best
    return DGCodes(q.to(torch.uint8), None if spec.symmetric else zero.to(torch.uint8),
                   s2.to(torch.int8), s1.expand(-1, 1, 1).contiguous())


@register_format("dg")
class DualGrainedFormat(NumberFormat):
    """Dual-grained INT4 (module docstring): ``qcodes``, ``qzero`` (asym), ``qgscale`` (int8 S2), ``qscale`` (fp16 s1)."""

    grid_width = 4  # effective group step s1*S2, zero point, s1, S2
    gptq_note = "dual-grained scales are fixed per row before rounding; run gptq with act_order or static_groups"

    def fake_quantize(self, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        if x.dim() != 2:
            raise SpecError(f"spec '{spec}': dg is a weight format (2-D out x in), got a tensor of shape {tuple(x.shape)}")
        return self.dequantize(self.quantize(x, spec), spec).reshape(x.shape).to(x.dtype)

    def quantize(self, weight: torch.Tensor, spec: QuantSpec) -> DGCodes:
        return dual_grained_quantize(integer.group_view(weight.detach(), spec), spec)

    def dequantize(self, codes: DGCodes, spec: QuantSpec) -> torch.Tensor:
        return codes.dequantize(spec)

    def stored_names(self, spec: QuantSpec) -> tuple[str, ...]:
        names = ("qcodes", "qgscale", "qscale")
        return names if spec.symmetric else names + ("qzero",)

    def pack(self, codes: DGCodes, spec: QuantSpec, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        rows = shape[0]
        out = {"qcodes": packing.pack(codes.codes, spec.bits),
               "qgscale": codes.group_scale.reshape(rows, -1).to(torch.int8).contiguous(),
               "qscale": codes.channel_scale.reshape(rows, 1).to(torch.float16)}
        if codes.zero is not None:
            out["qzero"] = packing.pack(codes.zero, spec.bits)
        return out

    def unpack(self, t: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> DGCodes:
        gshape = grouped_shape(spec, shape)
        codes = packing.unpack(t["qcodes"], spec.bits, shape[0] * shape[1]).view(gshape)
        s2 = t["qgscale"].reshape(*gshape[:-1], 1)
        zero = None
        if not spec.symmetric:
            zero = packing.unpack(t["qzero"], spec.bits, s2.numel()).view(s2.shape)
        return DGCodes(codes, zero, s2, t["qscale"].float().reshape(shape[0], 1, 1))

    def stored_bits(self, spec: QuantSpec, shape: tuple[int, int]) -> int:
        groups = group_count(spec, shape)
        bits = (packing.packed_nbytes(shape[0] * shape[1], spec.bits) * 8 + groups * _GROUP_SCALE_BITS
                + shape[0] * _CHANNEL_SCALE_BITS)
        return bits if spec.symmetric else bits + packing.packed_nbytes(groups, spec.bits) * 8

    # GPTQ: both phases run on the whole weight up front (static groups), then every column rounds on
    # its group's effective step s1*S2 with the group's zero point.
    def grid(self, wg: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        if wg.dim() != 3:
            raise SpecError(f"gptq: spec '{spec}': {self.gptq_note}")
        c = dual_grained_quantize(wg, spec)
        s2 = c.group_scale.float()
        s1 = c.channel_scale.expand_as(s2)
        return torch.cat([s2 * s1, c.zero_points(spec).float(), s1, s2], dim=-1)

    def round(self, col: torch.Tensor, params: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        step, z = params[:, 0], params[:, 1]
        q = round_codes(col, step, z, spec.bits)
        return q, (q - z) * step

    def from_columns(self, codes: torch.Tensor, params: torch.Tensor, spec: QuantSpec) -> DGCodes:
        gcodes = integer.group_view(codes, spec)
        first = first_of_group(params, spec, tuple(gcodes.shape))[..., 0, :]  # (rows, groups, 4)
        zero = None if spec.symmetric else first[..., 1:2].to(torch.uint8).contiguous()
        return DGCodes(gcodes.to(torch.uint8), zero, first[..., 3:4].to(torch.int8).contiguous(),
                       first[:, :1, 2:3].contiguous())
