"""Dense bit packing of small unsigned integer codes.

Codes of b bits (1 <= b <= 8) are packed little-endian into a byte stream: eight codes fill exactly
b bytes, so any width packs without waste and the size on disk is the bit count (plus at most
b - 1 bytes of padding at the end).
"""

from __future__ import annotations

import torch


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed to pack ``numel`` codes of ``bits`` bits."""
    return (numel + 7) // 8 * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (any shape, values < 2**bits) into a flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise ValueError(f"codes out of range for {bits} bits")
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # Eight b-bit codes make one 8b-bit word (at most 64 bits), split into b bytes.
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (flat.view(-1, 8) << shifts).sum(dim=1)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    return ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as uint8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"expected {packed_nbytes(numel, bits)} packed bytes for {numel} codes, got {packed.numel()}")
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    words = (packed.to(torch.int64).view(-1, bits) << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    codes = (words[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)
