"""Uniform integer quantization (symmetric and asymmetric), as pure tensor functions.

Every function works on a *grouped view*: a tensor whose last dimension holds the elements that
share one scale (see :func:`group_view`). Codes are unsigned bytes in ``[0, 2**bits - 1]``;
dequantization is ``(code - zero) * scale`` for both modes, with ``zero = 2**(bits-1)`` fixed in the
symmetric case so it need not be stored.

Symmetric scales map the largest magnitude onto ``2**(bits-1) - 1`` (so +-absmax are exact and the
extra negative code is left for clipped groups); asymmetric scales map ``[min(x, 0), max(x, 0)]``
onto the full code range. ``mse`` search shrinks that range by a grid of ratios and keeps, per
group, the one with the least squared error (the clipping search of GPTQ/AWQ-style toolkits). The
grid is searched coarse to fine (every fourth ratio, then the neighbours of each group's best),
which finds the same optimum as the full 36-point scan wherever the error is unimodal along the
grid, at 15 instead of 36 evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.errors import SpecError
from bitsmith.spec import QuantSpec

MSE_GRID = torch.linspace(1.0, 0.3, 36).tolist()
_COARSE = 4  # coarse search step along MSE_GRID; the fine pass tries the neighbours within it
_MIN_SCALE = {torch.float16: float(torch.finfo(torch.float16).tiny), torch.float32: 1e-10}


@dataclass
class IntCodes:
    """Integer codes of a grouped tensor with their scales (and zero points when asymmetric)."""

    codes: torch.Tensor  # uint8, grouped shape (..., n)
    scale: torch.Tensor  # float32 values (exactly representable in the storage dtype), shape (..., 1)
    zero: torch.Tensor | None  # uint8 zero points (..., 1), None when symmetric

    def dequantize(self, spec: QuantSpec) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, spec)


def group_view(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``x`` so the last dimension holds the elements sharing one scale.

    Weights are ``(out, in)``; activations ``(..., features)``; KV tensors are passed already
    arranged with the head dimension last.
    """
    g = spec.granularity
    if g == "ic":
        raise SpecError(f"spec '{spec}': per-IC weights are grouped on the transposed weight; "
                        "go through bitsmith.formats.registry.oriented")
    if g == "tensor":
        return x.reshape(1, -1)
    if g == "channel":
        return x.reshape(x.shape[0], -1)
    size = spec.group_size
    if size is None:  # token / head without sub-groups
        return x
    if x.shape[-1] % size:
        raise SpecError(
            f"spec '{spec}': group size {size} does not divide the dimension {x.shape[-1]}; "
            f"pick a divisor of {x.shape[-1]} (e.g. g{_divisor_hint(x.shape[-1], size)})"
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _divisor_hint(n: int, size: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - size), d))


def qrange(spec: QuantSpec) -> tuple[int, int]:
    """Lowest and highest signed integer level of the grid (before adding the zero point)."""
    if spec.symmetric:
        return -(1 << (spec.bits - 1)), (1 << (spec.bits - 1)) - 1
    return 0, (1 << spec.bits) - 1


def _store_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round scales to their storage dtype, upwards, so the rounded grid still covers the range."""
    scale = scale.clamp_min(_MIN_SCALE[dtype])
    if dtype == torch.float32:
        return scale
    stored = scale.to(dtype)
    up = torch.nextafter(stored, torch.tensor(float("inf"), dtype=dtype))
    return torch.where(stored.float() < scale, up, stored).float()


def _params_for_ratio(
    xg: torch.Tensor, spec: QuantSpec, ratio: float, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (float) zero point per group for a range shrunk by ``ratio``."""
    bits = spec.bits
    if spec.symmetric:
        amax = xg.abs().amax(dim=-1, keepdim=True) * ratio
        scale = amax / ((1 << (bits - 1)) - 1)
        scale = _store_scale(scale, scale_dtype)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
        return scale, zero
    lo = xg.amin(dim=-1, keepdim=True).clamp_max(0) * ratio
    hi = xg.amax(dim=-1, keepdim=True).clamp_min(0) * ratio
    scale = _store_scale((hi - lo) / ((1 << bits) - 1), scale_dtype)
    zero = torch.round(-lo / scale).clamp(0, (1 << bits) - 1)
    return scale, zero


def _codes(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(xg / scale) + zero, 0, (1 << bits) - 1)


def choose_params(
    xg: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per group, by min-max or by MSE-optimal clipping."""
    xg = xg.float()
    if spec.clip == "minmax":
        return _params_for_ratio(xg, spec, spec.clip_ratio, scale_dtype)
    grid = torch.tensor(MSE_GRID) * spec.clip_ratio
    best = None
    for i in range(0, len(MSE_GRID), _COARSE):
        best = _keep_better(best, _evaluate(xg, spec, grid[i].item(), scale_dtype), i)
    centre = best[3]
    for offset in range(-_COARSE + 1, _COARSE):
        if offset == 0:
            continue
        idx = (centre + offset).clamp(0, len(MSE_GRID) - 1)
        best = _keep_better(best, _evaluate(xg, spec, grid[idx], scale_dtype), idx)
    return best[1], best[2]


def _evaluate(xg: torch.Tensor, spec: QuantSpec, ratio, scale_dtype: torch.dtype):
    scale, zero = _params_for_ratio(xg, spec, ratio, scale_dtype)
    q = _codes(xg, scale, zero, spec.bits)
    err = ((q - zero) * scale - xg).pow_(2).sum(dim=-1, keepdim=True)
    return err, scale, zero


def _keep_better(best, new, index):
    """Per group, the (err, scale, zero, grid index) with the lower error; ties keep the earlier one."""
    err, scale, zero = new
    index = torch.as_tensor(index).expand_as(err) if not torch.is_tensor(index) or index.dim() == 0 else index
    if best is None:
        return err, scale, zero, index.clone()
    better = err < best[0]
    return (torch.where(better, err, best[0]), torch.where(better, scale, best[1]),
            torch.where(better, zero, best[2]), torch.where(better, index, best[3]))


def quantize(xg: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.float16) -> IntCodes:
    """Quantize a grouped tensor to codes; scales are rounded to ``scale_dtype`` first."""
    scale, zero = choose_params(xg, spec, scale_dtype)
    q = _codes(xg.float(), scale, zero, spec.bits).to(torch.uint8)
    return IntCodes(q, scale, None if spec.symmetric else zero.to(torch.uint8))


def quantize_with(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Codes of ``xg`` on a given grid (used by solvers that fix scales first)."""
    z = _zero_tensor(scale, zero, spec)
    return _codes(xg.float(), scale, z, spec.bits).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    return (codes.float() - _zero_tensor(scale, zero, spec)) * scale


def _zero_tensor(scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    if spec.symmetric:
        return torch.full_like(scale, float(1 << (spec.bits - 1)))
    if zero is None:
        raise ValueError("asymmetric dequantization needs zero points")
    return zero.float()


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize ``x`` in one go (dynamic activations, KV cache); fp32 scales."""
    xg = group_view(x, spec).float()
    scale, zero = choose_params(xg, spec, torch.float32)
    out = (_codes(xg, scale, zero, spec.bits) - zero) * scale
    return out.reshape(x.shape).to(x.dtype)
