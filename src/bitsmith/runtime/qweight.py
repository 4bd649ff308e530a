"""A quantized weight matrix as it is stored: whatever tensors its number format packs.

Integers store packed codes, fp16 scales and packed zero points (``qcodes``, ``qscale``, ``qzero``);
minifloats and NF4 packed codes and fp16 scales (FP6 as 4+2 bit planes ``qhigh``/``qlow``); MX
element codes and E8M0 exponent bytes (``qexp``); BitMoD codes, scales and packed datatype ids
(``qdtype``); OliVe one byte per pair and scales; GGUF types their ggml block records (``qblocks``). The format objects of
:mod:`bitsmith.formats.registry` decide; this class only holds the tensors and asks them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bitsmith.formats.registry import number_format, oriented
from bitsmith.spec import QuantSpec

# Every buffer name a format may store (quantized modules drop stale ones when the format changes).
STORED_NAMES = ("qcodes", "qhigh", "qlow", "qscale", "qzero", "qexp", "qdtype", "qgscale", "qblocks")


@dataclass
class PackedWeight:
    """The stored tensors of an ``(out, in)`` weight in ``spec``'s format.

    Sizes on disk are the bit count; the in-memory dequantization uses exactly the stored values,
    which is what makes a saved and reloaded model give bit-identical logits. Per-IC specs store the
    transposed weight's codes (:func:`~bitsmith.formats.registry.oriented`); codes handed to
    ``from_codes`` are in that layout.
    """

    spec: QuantSpec
    shape: tuple[int, int]
    data: dict[str, torch.Tensor]

    @classmethod
    def from_codes(cls, codes: Any, spec: QuantSpec, shape: tuple[int, int]) -> "PackedWeight":
        """Pack unpacked codes (as a format's ``quantize`` or GPTQ returns them)."""
        shape = tuple(shape)
        ospec, oshape, _ = oriented(spec, shape)
        return cls(spec, shape, number_format(ospec).pack(codes, ospec, oshape))

    @classmethod
    def quantize(cls, weight: torch.Tensor, spec: QuantSpec) -> "PackedWeight":
        """Round-to-nearest on the spec's grid."""
        ospec, _, transposed = oriented(spec, tuple(weight.shape))
        w = weight.detach().T.contiguous() if transposed else weight.detach()
        return cls.from_codes(number_format(ospec).quantize(w, ospec), spec, tuple(weight.shape))

    def dequantize(self) -> torch.Tensor:
        ospec, oshape, transposed = oriented(self.spec, self.shape)
        fmt = number_format(ospec)
        w = fmt.dequantize(fmt.unpack(self.data, ospec, oshape), ospec).reshape(oshape)
        return w.T.contiguous() if transposed else w

    @property
    def scale(self) -> torch.Tensor | None:
        """The fp16 scales, for formats that store them."""
        return self.data.get("qscale")

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.data)

    def rows_rescalable(self) -> bool:
        """Whether each output row has scales of its own (per channel or per group, not per IC)."""
        q = self.data.get("qscale")
        transposed = oriented(self.spec, self.shape)[2]
        return (q is not None and not transposed and self.spec.granularity in ("channel", "group")
                and q.shape[0] == self.shape[0])

    def scale_rows(self, factor: torch.Tensor) -> "PackedWeight":
        """The same codes with row ``i``'s scales times ``factor[i]``: ``diag(factor) W`` up to the fp16 scales.

        A per-row factor folded into a weight that a calibrated solver (GPTQ) already chose keeps its
        solution: the solver is equivariant to row scaling, so it would have picked the same codes."""
        if not self.rows_rescalable():
            raise ValueError(f"'{self.spec}' weights have no per-row scales to rescale")
        q = self.data["qscale"]
        f = factor.to(torch.float64).reshape(-1, *([1] * (q.dim() - 1)))
        return PackedWeight(self.spec, self.shape, {**self.data, "qscale": (q.double() * f).to(q.dtype)})

    @classmethod
    def from_tensors(cls, spec: QuantSpec, shape: tuple[int, int], t: dict[str, torch.Tensor]) -> "PackedWeight":
        """Rebuild from stored tensors (extra entries such as ``bias`` are ignored; missing ones raise KeyError)."""
        ospec = oriented(spec, tuple(shape))[0]
        return cls(spec, tuple(shape), {name: t[name] for name in number_format(ospec).stored_names(ospec)})

    def nbits(self) -> int:
        """Bits this weight takes on disk: every stored tensor (codes, scales, zero points, exponents, ids)."""
        return sum(t.numel() * t.element_size() * 8 for t in self.data.values())
