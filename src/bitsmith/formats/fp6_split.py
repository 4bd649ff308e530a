"""FP6 codes stored as a 4-bit and a 2-bit plane (the 4+2 layout of ZeroQuant(4+2), arXiv 2312.08583).

A 6-bit code (FP6 E3M2, :data:`bitsmith.formats.minifloat.FP6_E3M2`) does not divide a byte, so
a dense stream puts codes across byte boundaries and a kernel must shift across them. Splitting
each code into its high 4 bits and its low 2 bits gives two planes whose entries never straddle a
byte: the high plane holds two codes per byte, the low plane four, 6 bits per code in all. Within
a byte the first code takes the lowest bits (little-endian, as :mod:`bitsmith.formats.packing`).

Planes keep the leading dimensions, so each row (output channel) is its own byte-aligned run:
``high`` is ``(..., n // 2)`` and ``low`` is ``(..., n // 4)`` for codes of shape ``(..., n)``.
This is the storage split only; GPU kernels (FP6-LLM) additionally reorder codes to match their
tensor-core fragments, which is a runtime concern.
"""

from __future__ import annotations

import math

import torch

from bitsmith.errors import SpecError


def split_pack(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split 6-bit codes ``(..., n)`` (n divisible by 4) into the uint8 planes ``(high, low)``."""
    if codes.dim() == 0 or codes.shape[-1] % 4:
        n = codes.shape[-1] if codes.dim() else 1
        raise SpecError(f"FP6 4+2 packing needs a last dimension divisible by 4, got {n}; pad it to {-(-n // 4) * 4}")
    c = codes.to(torch.int32)
    if c.numel() and (c.min() < 0 or c.max() >= 64):
        raise ValueError("codes out of range for 6 bits")
    lead = codes.shape[:-1]
    high = (c >> 2).reshape(*lead, -1, 2)
    low = (c & 3).reshape(*lead, -1, 4)
    high = high[..., 0] | (high[..., 1] << 4)
    low = low[..., 0] | (low[..., 1] << 2) | (low[..., 2] << 4) | (low[..., 3] << 6)
    return high.to(torch.uint8), low.to(torch.uint8)


def split_unpack(high: torch.Tensor, low: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`split_pack`: uint8 6-bit codes of ``shape``."""
    shape = tuple(shape)
    numel = math.prod(shape)
    if not shape or shape[-1] % 4 or high.numel() * 2 != numel or low.numel() * 4 != numel:
        raise ValueError(
            f"planes of {high.numel()} and {low.numel()} bytes do not hold FP6 codes of shape {shape} "
            "(last dimension divisible by 4, 2 codes per high byte, 4 per low byte)"
        )
    h = high.to(torch.int32).reshape(-1, 1)
    lo = low.to(torch.int32).reshape(-1, 1)
    h = (h >> torch.tensor([0, 4], dtype=torch.int32)) & 0xF
    lo = (lo >> torch.tensor([0, 2, 4, 6], dtype=torch.int32)) & 3
    return ((h.reshape(-1) << 2) | lo.reshape(-1)).to(torch.uint8).reshape(shape)
