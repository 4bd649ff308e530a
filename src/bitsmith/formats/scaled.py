"""Formats whose group is an element grid times one scale: integers, minifloats (fp), NormalFloat (nf).

They share the shape of the work: pick a scale per group (min-max, a fixed clipping ratio, or an
MSE search over ratios), round ``x / scale`` to the element grid, store the codes packed to their
width and the scale in fp16. The integer path delegates to :mod:`bitsmith.formats.integer`
unchanged, so integer results are bit-identical to what they were before formats had a registry.

Scale search for fp and nf: ``scale = ratio * absmax / top`` (``top`` the largest element
magnitude, rounded up to fp16 for weights); ``mse`` searches the same 36 ratios as the integer
search (1.0 down to 0.3), coarse to fine as it does.
"""

from __future__ import annotations

from typing import Callable

import torch

from bitsmith.formats import blocks, fp6_split, integer, minifloat, packing
from bitsmith.formats.registry import (
    NumberFormat, ScaledCodes, first_of_group, group_count, grouped_shape, register_format, store_scale,
)
from bitsmith.spec import QuantSpec
from bitsmith.tensor_cache import tensor_cache

_SCALE_BITS = 16  # scales are stored as fp16


@register_format("int")
class IntFormat(NumberFormat):
    """Uniform integers (:mod:`bitsmith.formats.integer`): codes, fp16 scales, packed zero points."""

    grid_width = 2  # scale, zero point

    def fake_quantize(self, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return integer.fake_quantize(x, spec)

    def quantize(self, weight: torch.Tensor, spec: QuantSpec) -> integer.IntCodes:
        return integer.quantize(integer.group_view(weight.detach(), spec), spec, torch.float16)

    def dequantize(self, codes: integer.IntCodes, spec: QuantSpec) -> torch.Tensor:
        return codes.dequantize(spec)

    def stored_names(self, spec: QuantSpec) -> tuple[str, ...]:
        return ("qcodes", "qscale") if spec.symmetric else ("qcodes", "qscale", "qzero")

    def pack(self, codes: integer.IntCodes, spec: QuantSpec, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        out = {"qcodes": packing.pack(codes.codes, spec.bits), "qscale": codes.scale.to(torch.float16)}
        if codes.zero is not None:
            out["qzero"] = packing.pack(codes.zero, spec.bits)
        return out

    def unpack(self, t: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> integer.IntCodes:
        gshape = grouped_shape(spec, shape)
        codes = packing.unpack(t["qcodes"], spec.bits, shape[0] * shape[1]).view(gshape)
        scale = t["qscale"].float()
        zero = None
        if not spec.symmetric:
            zero = packing.unpack(t["qzero"], spec.bits, scale.numel()).view(scale.shape)
        return integer.IntCodes(codes, scale, zero)

    def stored_bits(self, spec: QuantSpec, shape: tuple[int, int]) -> int:
        groups = group_count(spec, shape)
        bits = packing.packed_nbytes(shape[0] * shape[1], spec.bits) * 8 + groups * _SCALE_BITS
        return bits if spec.symmetric else bits + packing.packed_nbytes(groups, spec.bits) * 8

    def grid(self, wg: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        scale, zero = integer.choose_params(wg, spec, torch.float16)
        return torch.cat([scale, zero], dim=-1)

    def round(self, col: torch.Tensor, params: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = params[:, 0], params[:, 1]
        q = torch.round(col / s).add_(z).clamp_(0, (1 << spec.bits) - 1)
        return q, (q - z) * s

    def from_columns(self, codes: torch.Tensor, params: torch.Tensor, spec: QuantSpec) -> integer.IntCodes:
        gcodes = integer.group_view(codes, spec)
        first = first_of_group(params, spec, tuple(gcodes.shape))
        scale, zero = first[..., 0].contiguous(), first[..., 1]
        return integer.IntCodes(gcodes.to(torch.uint8), scale, None if spec.symmetric else zero.to(torch.uint8).contiguous())


def search_scale(
    xg: torch.Tensor, spec: QuantSpec, top: float, qdq: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """Scale per group (``(..., 1)``, exact in ``dtype``): ``ratio * absmax / top``, the ratio fixed
    (``minmax``, ``r<ratio>``) or the one of least squared error of ``qdq(x / s) * s`` (``mse``).

    The MSE search is the integer one's: the 36 ratios of :data:`~bitsmith.formats.integer.MSE_GRID`
    coarse to fine (every fourth, then the neighbours of each group's best), 15 evaluations.
    """
    xg = xg.float()
    amax = xg.abs().amax(dim=-1, keepdim=True)
    if spec.clip == "minmax":
        return store_scale(amax * spec.clip_ratio / top, dtype)
    grid = torch.tensor(integer.MSE_GRID) * spec.clip_ratio

    def evaluate(ratio):
        s = store_scale(amax * ratio / top, dtype)
        return (qdq(xg / s) * s - xg).pow_(2).sum(dim=-1, keepdim=True), s

    best = None
    for i in range(0, len(grid), _COARSE):
        best = _keep_better(best, *evaluate(grid[i].item()), torch.tensor(i))
    centre = best[2]
    for offset in range(1 - _COARSE, _COARSE):
        if offset:
            idx = (centre + offset).clamp(0, len(grid) - 1)
            best = _keep_better(best, *evaluate(grid[idx]), idx)
    return best[1]


_COARSE = 4  # as integer.choose_params: within 0.03% of the full scan's error on minifloat grids


def _keep_better(best, err, scale, index):
    """Per group, the (err, scale, grid index) of lower error; ties keep the earlier."""
    index = index.expand_as(err)
    if best is None:
        return err, scale, index
    better = err < best[0]
    return torch.where(better, err, best[0]), torch.where(better, scale, best[1]), torch.where(better, index, best[2])


class _ElementGrid(NumberFormat):
    """A fixed element grid times an fp16 scale per group; subclasses give the grid."""

    def top(self, spec: QuantSpec) -> float:
        raise NotImplementedError

    def encode(self, y: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """uint8 codes of values in scale units."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """float32 values (scale units) of codes."""
        raise NotImplementedError

    def qdq(self, y: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return self.decode(self.encode(y, spec), spec)

    def _scale(self, xg: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
        return search_scale(xg, spec, self.top(spec), lambda y: self.qdq(y, spec), dtype)

    def fake_quantize(self, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        xg = integer.group_view(x, spec).float()
        s = self._scale(xg, spec, torch.float32)
        return (self.qdq(xg / s, spec) * s).reshape(x.shape).to(x.dtype)

    def quantize(self, weight: torch.Tensor, spec: QuantSpec) -> ScaledCodes:
        xg = integer.group_view(weight.detach(), spec).float()
        s = self._scale(xg, spec, torch.float16)
        return ScaledCodes(self.encode(xg / s, spec), s)

    def dequantize(self, codes: ScaledCodes, spec: QuantSpec) -> torch.Tensor:
        return self.decode(codes.codes, spec) * codes.scale.float()

    def stored_names(self, spec: QuantSpec) -> tuple[str, ...]:
        return ("qhigh", "qlow", "qscale") if spec.bits == 6 else ("qcodes", "qscale")

    def pack(self, codes: ScaledCodes, spec: QuantSpec, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {**pack_codes(codes.codes, spec.bits, shape), "qscale": codes.scale.to(torch.float16)}

    def unpack(self, t: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> ScaledCodes:
        codes = unpack_codes(t, spec.bits, shape).view(grouped_shape(spec, shape))
        return ScaledCodes(codes, t["qscale"].float())

    def stored_bits(self, spec: QuantSpec, shape: tuple[int, int]) -> int:
        return code_bits(shape, spec.bits) + group_count(spec, shape) * _SCALE_BITS

    def grid(self, wg: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return self._scale(wg, spec, torch.float16)

    def round(self, col: torch.Tensor, params: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        s = params[:, 0]
        codes = self.encode(col / s, spec)
        return codes, self.decode(codes, spec) * s

    def from_columns(self, codes: torch.Tensor, params: torch.Tensor, spec: QuantSpec) -> ScaledCodes:
        gcodes = integer.group_view(codes, spec)
        scale = first_of_group(params, spec, tuple(gcodes.shape))[..., 0].contiguous()
        return ScaledCodes(gcodes.to(torch.uint8), scale)


@register_format("fp")
class FloatFormat(_ElementGrid):
    """Minifloat ExMy elements (:mod:`bitsmith.formats.minifloat`) times a scale per group.

    The scale maps the group's absmax (times the clipping ratio) onto the element's largest
    finite value; rounding is to nearest, ties to even, saturating. FP6 codes are stored in the
    4+2 bit planes of :mod:`bitsmith.formats.fp6_split`.
    """

    def top(self, spec: QuantSpec) -> float:
        return minifloat.minifloat(spec.element).max_value

    def encode(self, y: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return minifloat_encode(minifloat.minifloat(spec.element), y)

    def decode(self, codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return minifloat.minifloat(spec.element).decode(codes)

    def qdq(self, y: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """``decode(encode(y))`` bit for bit, without codes."""
        return minifloat_round(minifloat.minifloat(spec.element), y)


# Fast paths for float32 input, equal bit for bit to Minifloat.round/encode (the reference, which
# tests/test_format_registry.py compares them against). An MSE scale search rounds a weight 36
# times and dynamic activations are rounded on every forward, so the speed matters.
# * FP8 E4M3/E5M2: PyTorch's float8 casts round to nearest-even like Minifloat.round within range
#   (tests/test_minifloat.py checks it); saturating first makes them equal.
# * Other formats: the nearest of the sorted magnitudes by bucketize on the midpoints (exact in
#   float32), a tie moved to the even magnitude code.
_NATIVE_FP8 = {minifloat.FP8_E4M3: torch.float8_e4m3fn, minifloat.FP8_E5M2: torch.float8_e5m2}


@tensor_cache()
def _magnitude_tables(fmt: minifloat.Minifloat) -> tuple[torch.Tensor, torch.Tensor]:
    mags = fmt.magnitudes()
    mids = torch.cat([(mags[1:] + mags[:-1]) / 2, torch.tensor([float("inf")], dtype=torch.float64)])
    return mags.float(), mids.float()


def _magnitude_codes(fmt: minifloat.Minifloat, y: torch.Tensor) -> torch.Tensor:
    """int64 magnitude code of the nearest value to ``|y|`` (ties to the even code), saturating."""
    mags, mids = _magnitude_tables(fmt)
    a = y.abs().clamp_max_(fmt.max_value)
    idx = torch.bucketize(a, mids[:-1])  # a tie (a == mids[i]) lands on the lower code i
    return idx.add_((a == mids[idx]).logical_and_(idx.bitwise_and(1).bool()).long())


def minifloat_round(fmt: minifloat.Minifloat, y: torch.Tensor) -> torch.Tensor:
    """``fmt.round(y)``, faster for float32 ``y``."""
    if y.dtype != torch.float32:
        return fmt.round(y)
    native = _NATIVE_FP8.get(fmt)
    if native is not None:
        return y.clamp(-fmt.max_value, fmt.max_value).to(native).float()
    v = _magnitude_tables(fmt)[0][_magnitude_codes(fmt, y)].copysign_(y)
    return torch.where(torch.isnan(y), y, v)


def minifloat_encode(fmt: minifloat.Minifloat, y: torch.Tensor) -> torch.Tensor:
    """``fmt.encode(y)``, faster for finite float32 ``y``."""
    if y.dtype != torch.float32 or bool(torch.isnan(y).any()):
        return fmt.encode(y)
    native = _NATIVE_FP8.get(fmt)
    if native is not None:  # same codes: the OCP layout
        return y.clamp(-fmt.max_value, fmt.max_value).to(native).view(torch.uint8)
    codes = _magnitude_codes(fmt, y).bitwise_or_(torch.signbit(y).long() << (fmt.bits - 1))
    return codes.to(torch.uint8)


@register_format("nf")
class NormalFloatFormat(_ElementGrid):
    """NormalFloat4 levels (QLoRA, :mod:`bitsmith.formats.blocks`) times a scale per group.

    The scale is the group absmax as QLoRA does (times the clipping ratio, or MSE-searched), kept in
    fp16 (QLoRA's double quantization of the absmax is not implemented).
    """

    def top(self, spec: QuantSpec) -> float:
        return 1.0

    def encode(self, y: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return blocks.nf4_codes(y)

    def decode(self, codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return blocks.nf4_levels().to(codes.device)[codes.long()]


# -- code storage shared with the MX formats -------------------------------------------------------


def pack_codes(codes: torch.Tensor, bits: int, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Element codes as stored: 6-bit codes in the 4+2 planes (row by row), others packed densely."""
    if bits == 6:
        high, low = fp6_split.split_pack(codes.reshape(shape))
        return {"qhigh": high, "qlow": low}
    return {"qcodes": packing.pack(codes, bits)}


def unpack_codes(t: dict[str, torch.Tensor], bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes of ``shape``."""
    if bits == 6:
        return fp6_split.split_unpack(t["qhigh"], t["qlow"], shape)
    return packing.unpack(t["qcodes"], bits, shape[0] * shape[1]).view(shape)


def code_bits(shape: tuple[int, int], bits: int) -> int:
    """Bits :func:`pack_codes` stores for ``shape``."""
    numel = shape[0] * shape[1]
    return numel * 6 if bits == 6 else packing.packed_nbytes(numel, bits) * 8
