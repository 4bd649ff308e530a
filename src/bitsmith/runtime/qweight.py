"""A quantized weight matrix as it is stored: packed codes, fp16 scales, packed zero points."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.formats import integer, packing
from bitsmith.spec import QuantSpec


@dataclass
class PackedWeight:
    """Integer codes of an ``(out, in)`` weight with their per-group parameters.

    ``scale`` is stored in fp16 and ``zero`` packed to the code width, so the size on disk is the
    bit count; the in-memory dequantization uses exactly the stored values, which is what makes a
    saved and reloaded model give bit-identical logits.
    """

    spec: QuantSpec
    shape: tuple[int, int]
    qcodes: torch.Tensor  # packed uint8
    scale: torch.Tensor  # fp16, grouped shape (..., 1)
    qzero: torch.Tensor | None  # packed uint8 zero points, asymmetric only

    @classmethod
    def from_codes(cls, codes: integer.IntCodes, spec: QuantSpec, shape: tuple[int, int]) -> "PackedWeight":
        zero = None if codes.zero is None else packing.pack(codes.zero, spec.bits)
        return cls(spec, tuple(shape), packing.pack(codes.codes, spec.bits), codes.scale.to(torch.float16), zero)

    @classmethod
    def quantize(cls, weight: torch.Tensor, spec: QuantSpec) -> "PackedWeight":
        """Round-to-nearest on the spec's grid."""
        codes = integer.quantize(integer.group_view(weight.detach(), spec), spec, torch.float16)
        return cls.from_codes(codes, spec, tuple(weight.shape))

    def _grouped_shape(self) -> tuple[int, ...]:
        return tuple(integer.group_view(torch.empty(self.shape, device="meta"), self.spec).shape)

    def dequantize(self) -> torch.Tensor:
        gshape = self._grouped_shape()
        numel = self.shape[0] * self.shape[1]
        codes = packing.unpack(self.qcodes, self.spec.bits, numel).view(gshape)
        scale = self.scale.float()
        zero = None
        if self.qzero is not None:
            zero = packing.unpack(self.qzero, self.spec.bits, scale.numel()).view(scale.shape)
        return integer.dequantize(codes, scale, zero, self.spec).reshape(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qcodes": self.qcodes, "qscale": self.scale}
        if self.qzero is not None:
            out["qzero"] = self.qzero
        return out

    @classmethod
    def from_tensors(cls, spec: QuantSpec, shape: tuple[int, int], t: dict[str, torch.Tensor]) -> "PackedWeight":
        return cls(spec, tuple(shape), t["qcodes"], t["qscale"], t.get("qzero"))

    def nbits(self) -> int:
        """Bits this weight takes on disk: codes, scales and zero points."""
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors().values())
