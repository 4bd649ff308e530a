"""GGUF block types as number formats (specs ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q4_k``, ``q6_k``).

Adapters from :class:`~bitsmith.spec.QuantSpec` to :mod:`bitsmith.formats.gguf_blocks`. A weight is
stored as its ggml records (``qblocks``: one row of ``in / block`` records per output row), so the
GGUF exporter copies the bytes unchanged and ``stored_bits`` is the file's size exactly. GPTQ sees
the type's stored grid per element (:func:`~bitsmith.formats.gguf_blocks.grid_params`): fp16 block
scales (and mins), and for K-quants the 6-bit / int8 sub-block scales already quantized against the
super-block scales, all fixed from the weights before the columns are rounded, so every code GPTQ
picks is representable bit for bit.
"""

from __future__ import annotations

import torch

from bitsmith.errors import SpecError
from bitsmith.formats import gguf_blocks as gb
from bitsmith.formats.registry import NumberFormat, register_format
from bitsmith.spec import GGUF_TYPES, QuantSpec


def block_type(spec: QuantSpec | str) -> gb.BlockType:
    return gb.TYPES[spec.format if isinstance(spec, QuantSpec) else spec]


def check_width(spec: QuantSpec, width: int, what: str = "a row") -> None:
    """A clear error when the type's block does not divide ``width`` (the reduced dimension)."""
    t = block_type(spec)
    if width % t.block:
        hint = " (llama.cpp falls back to q5_0 for q4_k, q8_0 for q6_k; the gptq step's 'fallback' does the same)" \
            if t.sub else ""
        raise SpecError(f"spec '{spec}': GGUF {t.name} blocks are {t.block} elements and {what} of {width} is not a "
                        f"multiple{hint}")


class GGUFFormat(NumberFormat):
    """One GGUF block type; the subclasses below differ only by name."""

    def _blocks(self, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        check_width(spec, x.shape[-1])
        t = block_type(spec)
        return x.reshape(*x.shape[:-1], x.shape[-1] // t.block, t.block).float()

    def fake_quantize(self, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        t = block_type(spec)
        return gb.dequantize(gb.quantize(self._blocks(x, spec), t), t).reshape(x.shape).to(x.dtype)

    def quantize(self, weight: torch.Tensor, spec: QuantSpec) -> gb.GGUFCodes:
        return gb.quantize(self._blocks(weight.detach(), spec), block_type(spec))

    def dequantize(self, codes: gb.GGUFCodes, spec: QuantSpec) -> torch.Tensor:
        return gb.dequantize(codes, block_type(spec))

    def stored_names(self, spec: QuantSpec) -> tuple[str, ...]:
        return ("qblocks",)

    def pack(self, codes: gb.GGUFCodes, spec: QuantSpec, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {"qblocks": gb.pack(codes, block_type(spec)).reshape(shape[0], -1).contiguous()}

    def unpack(self, t: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> gb.GGUFCodes:
        return gb.unpack(t["qblocks"].reshape(shape[0], -1), block_type(spec))

    def stored_bits(self, spec: QuantSpec, shape: tuple[int, int]) -> int:
        check_width(spec, shape[1])
        t = block_type(spec)
        return shape[0] * (shape[1] // t.block) * t.type_size * 8

    # GPTQ: the stored grid of each element, fixed from the weights up front.
    def grid(self, wg: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        t = block_type(spec)
        if t.sub is not None:  # per-element grids differ inside a super-block: only column_grid applies
            raise SpecError(f"spec '{spec}': K-quant grids vary per sub-block; use column_grid")
        return gb.grid_params(wg, t)[..., 0, :]

    def column_grid(self, wg: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> torch.Tensor:
        w = None if importance is None else (importance.float() + 1e-8 * importance.float().mean()).expand_as(wg)
        return gb.grid_params(wg, block_type(spec), w, search=True)

    def round(self, col: torch.Tensor, params: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return gb.round_to_grid(col, params, block_type(spec))

    def from_columns(self, codes: torch.Tensor, params: torch.Tensor, spec: QuantSpec) -> gb.GGUFCodes:
        t = block_type(spec)
        rows, cols = codes.shape
        return gb.from_grid(codes.reshape(rows, cols // t.block, t.block),
                            params.reshape(rows, cols // t.block, t.block, params.shape[-1]), t)


for _name in GGUF_TYPES:
    register_format(_name)(type(f"GGUF_{_name.upper()}", (GGUFFormat,),
                                {"__doc__": f"GGUF {_name.upper()}.", "grid_width": gb.grid_width(gb.TYPES[_name])}))
