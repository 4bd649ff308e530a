"""The A8W4 product of DGQ (arXiv 2310.04836) as it runs on integer hardware: one int8 x int8 matmul.

A dual-grained weight (:mod:`bitsmith.formats.dual_grained`) dequantizes to INT8 exactly,
``W_s8 = S2 * (q - z)``, leaving one fp scale ``s1`` per output channel. With the input quantized per
token to INT8 (symmetric, the grid of the ``int8:token:sym`` activation spec), the layer is

    y[t, o] = sx[t] * s1[o] * sum_k x_s8[t, k] * W_s8[o, k]   (+ bias)

with the sum accumulated exactly in int32 (|x_s8 * W_s8| <= 128 * 127, so any input width below
2**31 / 16256, about 132k, fits). The integer product is ``torch._int_mm`` (oneDNN on CPU, which
takes any shape in torch 2.13; CUDA wants m > 16 and k, n multiples of 8); where it refuses, an exact
float64 product of the same integers stands in (every partial sum is an integer below 2**53), and
:attr:`Int8Linear.kernel` says which ran. The result equals the fake-quantized float layer
(quantized input times dequantized weight) up to float rounding of the rescale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.errors import SpecError
from bitsmith.formats import integer
from bitsmith.formats.registry import number_format
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import QuantSpec

TOKEN_INT8 = QuantSpec.parse("int8:token:sym")
_MIN_SCALE = integer._MIN_SCALE[torch.float32]  # choose_params' floor for float32 scales


def quantize_tokens(x: torch.Tensor, spec: QuantSpec = TOKEN_INT8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_s8, sx)``: int8 ``(n, k)`` and float32 ``(n, 1)`` scales of ``x`` ``(..., k)``, per token.

    The grid is exactly the one :func:`bitsmith.formats.integer.fake_quantize` uses for ``spec``
    (symmetric 8-bit per token or per tensor), so ``x_s8 * sx`` is the fake-quantized input.
    """
    if spec.format != "int" or spec.bits != 8 or not spec.symmetric or spec.granularity not in ("token", "tensor") \
            or spec.group_size is not None:
        raise SpecError(f"int8 matmul: input spec '{spec}' is not 8-bit symmetric per token or tensor; use int8:token:sym")
    x2 = x.reshape(-1, x.shape[-1]).float()
    xg = integer.group_view(x2, spec)
    if spec.clip == "minmax":  # the same float ops as integer.choose_params and its rounding, fused
        scale = (xg.abs().amax(dim=-1, keepdim=True) * spec.clip_ratio / 127).clamp_min(_MIN_SCALE)
        codes = torch.round(xg / scale).clamp_(-128, 127)
    else:
        scale, _ = integer.choose_params(xg, spec, torch.float32)
        codes = integer.quantize_with(xg, scale, None, spec).to(torch.int16) - 128
    sx = scale.expand(x2.shape[0], 1) if spec.granularity == "tensor" else scale
    return codes.reshape(x2.shape).to(torch.int8), sx


def int8_weight(packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_s8, s1)`` of a dual-grained weight: int8 ``(out, in)`` and float32 ``(out,)``."""
    if packed.spec.format != "dg":
        raise SpecError(f"int8 matmul: weight spec '{packed.spec}' is not dual-grained; quantize it with e.g. dg4:g64")
    fmt = number_format(packed.spec)
    codes = fmt.unpack(packed.data, packed.spec, packed.shape)
    return codes.int8_weight(packed.spec).reshape(packed.shape).contiguous(), codes.channel_scale.reshape(-1)


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, str]:
    """int32 ``a @ b`` of int8 ``a`` ``(m, k)`` and ``b`` ``(k, n)``, and the kernel that ran."""
    if hasattr(torch, "_int_mm"):
        try:
            return torch._int_mm(a, b), "torch._int_mm"
        except RuntimeError:
            pass
    return (a.double() @ b.double()).to(torch.int32), "float64 (exact)"


@dataclass
class Int8Linear:
    """A dual-grained linear prepared for integer inference: ``W_s8`` and ``s1`` unpacked once."""

    weight_s8: torch.Tensor  # int8 (out, in)
    channel_scale: torch.Tensor  # float32 (out,)
    bias: torch.Tensor | None = None
    act_spec: QuantSpec = TOKEN_INT8
    kernel: str = ""  # the integer kernel of the last call

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: torch.Tensor | None = None,
                    act_spec: QuantSpec = TOKEN_INT8) -> "Int8Linear":
        w, s1 = int8_weight(packed)
        return cls(w, s1, None if bias is None else bias.detach().float(), act_spec)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight_s8.shape[1]:
            raise SpecError(f"int8 matmul: input has {x.shape[-1]} features, the weight {self.weight_s8.shape[1]}")
        xq, sx = quantize_tokens(x, self.act_spec)
        acc, self.kernel = int8_mm(xq, self.weight_s8.t())
        y = acc.float() * sx * self.channel_scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def int8_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None,
                act_spec: QuantSpec = TOKEN_INT8) -> torch.Tensor:
    """``x`` times a dual-grained weight through the int8 path (unpacks the weight on every call)."""
    return Int8Linear.from_packed(packed, bias, act_spec)(x)
