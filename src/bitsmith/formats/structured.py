"""Formats with structure beyond "one scale per group": MX block exponents, BitMoD datatype mixtures,
OliVe outlier-victim pairs. Adapters from specs to :mod:`bitsmith.formats.blocks`,
:mod:`bitsmith.formats.bitmod` and :mod:`bitsmith.formats.olive`.

Storage:

* MX (``mxfp4``, ``mxfp6``, ``mxfp8``, ``mxint8``): element codes (FP4 packed two per byte, FP6 in
  the 4+2 planes, 8-bit elements one byte) and one E8M0 exponent byte per block of 32: ``bits + 8/32``
  bits per weight. The exponent is set by the OCP rule from the block absmax; there is no scale to
  search.
* BitMoD (``bitmod3``, ``bitmod4``): codes packed to 3 or 4 bits, an fp16 scale and a 2-bit datatype id
  (packed) per group. ``minmax`` is the paper's absmax rule; ``mse`` (or ``r<ratio>``) additionally
  searches a clipping ratio jointly with the datatype, like the integer baselines' MSE clipping.
* OliVe (``olive4``): one byte per element pair and an fp16 scale per group; the scale is the
  paper's MSE search by default (``minmax``: ratio 1, i.e. plain int4 levels without outliers).
  GPTQ is not supported: a pair's victim depends on its neighbour column, so rounding is not
  column by column. Quantized on the fly (activations), the full 32-ratio search runs per token:
  the error is not unimodal along the ratio grid, so a coarse-to-fine search would miss optima.
"""

from __future__ import annotations

import torch

from bitsmith.formats import bitmod, blocks, integer, minifloat, olive, packing
from bitsmith.formats.registry import NumberFormat, first_of_group, group_count, grouped_shape, register_format
from bitsmith.formats.scaled import code_bits, minifloat_encode, minifloat_round, pack_codes, unpack_codes
from bitsmith.spec import QuantSpec

_SCALE_BITS = 16
_MX_EXP_BITS = 8


def _mx_element(spec: QuantSpec) -> str:
    return "int8" if spec.format == "mxint" else f"fp{spec.bits}_{spec.element}"


class _MX(NumberFormat):
    """OCP MX: blocks of 32 along the last dimension share a power-of-two E8M0 scale."""

    def fake_quantize(self, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        integer.group_view(x, spec)  # a clear error when 32 does not divide the last dimension
        if spec.format == "mxint" or x.dtype != torch.float32:
            return blocks.mx_fake_quantize(x, _mx_element(spec), spec.group_size)
        # = blocks.mx_fake_quantize, with the fast element rounding
        y, exps = blocks._mx_scaled(x, _mx_element(spec), spec.group_size)
        q = minifloat_round(minifloat.minifloat(spec.element), y)
        return (q * blocks.e8m0_to_scale(exps)[..., None]).reshape(x.shape)

    def quantize(self, weight: torch.Tensor, spec: QuantSpec) -> blocks.MXCodes:
        integer.group_view(weight, spec)
        return blocks.mx_quantize(weight.detach().float(), _mx_element(spec), spec.group_size)

    def dequantize(self, codes: blocks.MXCodes, spec: QuantSpec) -> torch.Tensor:
        return blocks.mx_dequantize(codes, _mx_element(spec))

    def stored_names(self, spec: QuantSpec) -> tuple[str, ...]:
        return ("qhigh", "qlow", "qexp") if spec.bits == 6 else ("qcodes", "qexp")

    def pack(self, codes: blocks.MXCodes, spec: QuantSpec, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {**pack_codes(codes.codes, spec.bits, shape), "qexp": codes.exponents.contiguous()}

    def unpack(self, t: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> blocks.MXCodes:
        exps = t["qexp"].view(shape[0], shape[1] // spec.group_size)
        return blocks.MXCodes(unpack_codes(t, spec.bits, shape), exps)

    def stored_bits(self, spec: QuantSpec, shape: tuple[int, int]) -> int:
        return code_bits(shape, spec.bits) + group_count(spec, shape) * _MX_EXP_BITS

    # GPTQ: the block exponent is a per-group scale 2**shared, fixed before the block's columns are rounded.
    def grid(self, wg: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        _, exps = blocks._mx_scaled(wg.float(), _mx_element(spec), wg.shape[-1])
        return blocks.e8m0_to_scale(exps)  # (..., 1): one block per group

    def round(self, col: torch.Tensor, params: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        s = params[:, 0]
        y = col / s  # exact: a power of two
        if spec.format == "mxint":
            q = blocks._int8_levels(y)
            return q.to(torch.int8).view(torch.uint8), q / 64 * s
        fmt = minifloat.minifloat(spec.element)
        codes = minifloat_encode(fmt, y)
        return codes, fmt.decode(codes) * s

    def from_columns(self, codes: torch.Tensor, params: torch.Tensor, spec: QuantSpec) -> blocks.MXCodes:
        gshape = grouped_shape(spec, tuple(codes.shape))
        scale = first_of_group(params, spec, gshape)[..., 0, 0]  # (rows, blocks)
        exps = torch.frexp(scale)[1] - 1 + blocks.E8M0_BIAS  # scale = 2**(e - 1) exactly
        return blocks.MXCodes(codes.to(torch.uint8).contiguous(), exps.to(torch.uint8))


@register_format("mxfp")
class MXFloatFormat(_MX):
    """MX with FP4/FP6/FP8 elements."""


@register_format("mxint")
class MXIntFormat(_MX):
    """MX with INT8 elements (value ``q / 64``)."""


def _bitmod_ratios(spec: QuantSpec) -> list[float]:
    if spec.clip == "minmax":
        return [spec.clip_ratio]
    return [r * spec.clip_ratio for r in integer.MSE_GRID[::2]]


@register_format("bitmod")
class BitMoDFormat(NumberFormat):
    """BitMoD: per group, the best of four datatypes; its id is stored next to the scale.

    The MSE search uses every second ratio of the integer grid (18 ratios x 4 datatypes).
    """

    grid_width = 2  # scale, datatype id

    def fake_quantize(self, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        xg = integer.group_view(x, spec)
        codes = bitmod.bitmod_quantize(xg, spec.bits, torch.float32, _bitmod_ratios(spec))
        return bitmod.bitmod_dequantize(codes, spec.bits).reshape(x.shape).to(x.dtype)

    def quantize(self, weight: torch.Tensor, spec: QuantSpec) -> bitmod.BitMoDCodes:
        xg = integer.group_view(weight.detach(), spec)
        return bitmod.bitmod_quantize(xg, spec.bits, torch.float16, _bitmod_ratios(spec))

    def dequantize(self, codes: bitmod.BitMoDCodes, spec: QuantSpec) -> torch.Tensor:
        return bitmod.bitmod_dequantize(codes, spec.bits)

    def stored_names(self, spec: QuantSpec) -> tuple[str, ...]:
        return ("qcodes", "qscale", "qdtype")

    def pack(self, codes: bitmod.BitMoDCodes, spec: QuantSpec, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {"qcodes": packing.pack(codes.codes, spec.bits), "qscale": codes.scale.to(torch.float16),
                "qdtype": packing.pack(codes.dtype_id, bitmod.ID_BITS)}

    def unpack(self, t: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> bitmod.BitMoDCodes:
        gshape = grouped_shape(spec, shape)
        scale = t["qscale"].float()
        codes = packing.unpack(t["qcodes"], spec.bits, shape[0] * shape[1]).view(gshape)
        ids = packing.unpack(t["qdtype"], bitmod.ID_BITS, scale.numel()).view(scale.shape)
        return bitmod.BitMoDCodes(codes, scale, ids)

    def stored_bits(self, spec: QuantSpec, shape: tuple[int, int]) -> int:
        groups = group_count(spec, shape)
        return (packing.packed_nbytes(shape[0] * shape[1], spec.bits) * 8 + groups * _SCALE_BITS
                + packing.packed_nbytes(groups, bitmod.ID_BITS) * 8)

    # GPTQ: datatype and scale per group chosen up front (from the weights when the grid is made),
    # then each column rounds to its row's chosen datatype.
    def grid(self, wg: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        codes = bitmod.bitmod_quantize(wg, spec.bits, torch.float16, _bitmod_ratios(spec))
        return torch.cat([codes.scale, codes.dtype_id.float()], dim=-1)

    def round(self, col: torch.Tensor, params: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        s = params[:, 0]
        values = bitmod._table(spec.bits, col.device)[params[:, 1].long()]  # (rows, 2**bits), sorted
        mids = (values[:, 1:] + values[:, :-1]) / 2
        codes = ((col / s)[:, None] > mids).sum(dim=1)  # = bucketize: nearest, ties to the lower value
        return codes, values.gather(1, codes[:, None])[:, 0] * s

    def from_columns(self, codes: torch.Tensor, params: torch.Tensor, spec: QuantSpec) -> bitmod.BitMoDCodes:
        gcodes = integer.group_view(codes, spec)
        first = first_of_group(params, spec, tuple(gcodes.shape))
        return bitmod.BitMoDCodes(gcodes.to(torch.uint8), first[..., 0].contiguous(), first[..., 1].to(torch.uint8))


def _olive_grid(spec: QuantSpec) -> list[float] | None:
    if spec.clip == "minmax":
        return [spec.clip_ratio]
    return None if spec.clip_ratio == 1.0 else [r * spec.clip_ratio for r in olive.SCALE_GRID]


@register_format("olive")
class OliVeFormat(NumberFormat):
    """OliVe outlier-victim pairs: one byte per pair, a scale per group."""

    supports_gptq = False
    gptq_note = ("olive rounds element pairs together (an outlier prunes its neighbour), not column by column; "
                 "use the rtn step")

    def fake_quantize(self, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        xg = integer.group_view(x, spec)
        q, scale = olive.olive_search(xg, torch.float32, _olive_grid(spec))
        return (q * scale).reshape(x.shape).to(x.dtype)

    def quantize(self, weight: torch.Tensor, spec: QuantSpec) -> olive.OliVeCodes:
        return olive.olive_quantize(integer.group_view(weight.detach(), spec), torch.float16, _olive_grid(spec))

    def dequantize(self, codes: olive.OliVeCodes, spec: QuantSpec) -> torch.Tensor:
        return olive.olive_dequantize(codes)

    def stored_names(self, spec: QuantSpec) -> tuple[str, ...]:
        return ("qcodes", "qscale")

    def pack(self, codes: olive.OliVeCodes, spec: QuantSpec, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {"qcodes": codes.codes.reshape(-1).contiguous(), "qscale": codes.scale.to(torch.float16)}

    def unpack(self, t: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> olive.OliVeCodes:
        gshape = grouped_shape(spec, shape)
        return olive.OliVeCodes(t["qcodes"].view(*gshape[:-1], gshape[-1] // 2), t["qscale"].float())

    def stored_bits(self, spec: QuantSpec, shape: tuple[int, int]) -> int:
        return shape[0] * shape[1] // 2 * 8 + group_count(spec, shape) * _SCALE_BITS
