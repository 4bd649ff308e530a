"""Quantized drop-in replacement for ``nn.Conv2d``, the convolutional sibling of :class:`QuantLinear`.

The weight ``(out, in / groups, kh, kw)`` is stored as a :class:`PackedWeight` of its matrix view
``(out, in / groups * kh * kw)``: row ``o`` holds every weight of output channel ``o``, so
``int8:channel:sym`` is per output channel, ``int4:g<N>`` groups run along that row, and every
weight format and solver that works on ``(out, in)`` matrices works on convolutions unchanged
(depthwise and grouped convolutions included: their rows are just shorter). As in QuantLinear the
dequantized fp32 copy is a non-persistent ``weight`` buffer (here in the 4-D shape), and the
persistent buffers are the format's packed tensors.

The input may be fake-quantized first, with **per-tensor** specs only:

* dynamic (``act_spec``): one scale per *image* of the batch, from the live tensor, so an image's
  result does not depend on which other images share its batch;
* static (``act_static``): one calibrated scale (and zero point) for every input, as QuantLinear's.

Per-token scales (QuantLinear's usual choice) have no counterpart: an output pixel of a kxk
convolution sums over k*k input positions, so per-position input scales would not factor out of the
integer dot product the way one token's scale factors out of a linear's output row. MX and other
block formats are refused for the same reason (their blocks run along the width of the image).

Saving: :meth:`QuantConv2d.describe` gives the JSON-able metadata and ``state_dict()`` the tensors
(packed weight, bias, static input grid); :meth:`QuantConv2d.from_description` rebuilds the module from
the two bit for bit. These are what :mod:`bitsmith.checkpoint` calls per module of kind ``"conv2d"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bitsmith.errors import BitsmithError, SpecError
from bitsmith.formats.registry import fake_quantize
from bitsmith.runtime.modules import _install_packed, static_fake_quantize
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import QuantSpec

KIND = "conv2d"  # the module kind recorded in bitsmith.json


def _pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def check_act_spec(spec: QuantSpec | None) -> QuantSpec | None:
    """Refuse input specs a convolution cannot use (anything but one scale per tensor)."""
    if spec is not None and spec.granularity != "tensor":
        raise SpecError(f"spec '{spec}': convolution inputs are quantized per tensor (one scale per image, or one "
                        "calibrated static scale); per-token or block scales do not factor out of a kxk window: use "
                        f"'{spec.format}{spec.bits}:tensor'")
    return spec


class QuantConv2d(nn.Module):
    """2-D convolution with an optionally quantized weight and optionally quantized input."""

    def __init__(
        self,
        weight: torch.Tensor | PackedWeight,
        bias: torch.Tensor | None = None,
        *,
        kernel_shape: tuple[int, int, int, int] | None = None,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        act_spec: QuantSpec | None = None,
        act_static: bool = False,
    ) -> None:
        """``weight``: the 4-D float weight, or a PackedWeight of its matrix view plus ``kernel_shape``
        (the 4-D shape ``(out, in / groups, kh, kw)``)."""
        super().__init__()
        if isinstance(weight, PackedWeight):
            if kernel_shape is None:
                raise BitsmithError("a packed convolution weight needs kernel_shape=(out, in/groups, kh, kw)")
            self.kernel_shape = tuple(int(d) for d in kernel_shape)
        else:
            if weight.dim() != 4:
                raise BitsmithError(f"a convolution weight is 4-D (out, in/groups, kh, kw), got shape {tuple(weight.shape)}")
            self.kernel_shape = tuple(weight.shape)
        self.stride, self.dilation, self.groups = _pair(stride), _pair(dilation), int(groups)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.packed: PackedWeight | None = None
        self.act_spec = check_act_spec(act_spec)
        self.act_static = act_static
        if act_static and act_spec is None:
            raise BitsmithError("static input quantization needs an act_spec")
        self.register_buffer("act_scale", None)
        self.register_buffer("act_zero", None)
        if isinstance(weight, PackedWeight):
            self.set_packed(weight)
        else:
            self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, act_spec: QuantSpec | None = None, act_static: bool = False) -> "QuantConv2d":
        """A float QuantConv2d computing what ``conv`` computes (quantize its weight with :meth:`set_packed`)."""
        if isinstance(conv, QuantConv2d):
            conv.act_spec = check_act_spec(act_spec) if act_spec is not None else conv.act_spec
            return conv
        if conv.padding_mode != "zeros":
            raise BitsmithError(f"QuantConv2d pads with zeros only; this conv uses padding_mode={conv.padding_mode!r}")
        return cls(conv.weight, conv.bias, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                   groups=conv.groups, act_spec=act_spec, act_static=act_static)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """Shape of the weight as a matrix: ``(out, in / groups * kh * kw)``, what PackedWeight stores."""
        o, i, kh, kw = self.kernel_shape
        return o, i * kh * kw

    def weight_matrix(self) -> torch.Tensor:
        """The current (float or dequantized) weight as the ``(out, in / groups * kh * kw)`` matrix."""
        return self.weight.reshape(self.matrix_shape)

    def quantize_weight(self, spec: QuantSpec) -> None:
        """Round-to-nearest the weight matrix on ``spec``'s grid and install it."""
        self.set_packed(PackedWeight.quantize(self.weight_matrix(), spec))

    def set_packed(self, packed: PackedWeight) -> None:
        """Install a quantized weight matrix (shape :attr:`matrix_shape`), replacing whatever weight was there."""
        if tuple(packed.shape) != self.matrix_shape:
            raise BitsmithError(f"packed weight of shape {tuple(packed.shape)} does not fit a convolution "
                                f"{self.kernel_shape}: expected the matrix view {self.matrix_shape}")
        _install_packed(self, packed)
        self.register_buffer("weight", self.weight.reshape(self.kernel_shape), persistent=False)

    # -- geometry --------------------------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        return self.kernel_shape[0]

    @property
    def in_channels(self) -> int:
        return self.kernel_shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.kernel_shape[2], self.kernel_shape[3]

    # -- input quantization ------------------------------------------------------------------------
    def set_static_input(self, scale: torch.Tensor | None, zero: torch.Tensor | None = None) -> None:
        """Calibrated per-tensor input grid (``act_static``): scale and, asymmetric only, integer zero point."""
        self.act_scale = None if scale is None else scale.detach().float().reshape(()).clone()
        self.act_zero = None if zero is None else zero.detach().float().reshape(()).clone()

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize the input: one dynamic scale per image, or the calibrated static grid."""
        if self.act_static:
            if self.act_scale is None:
                raise BitsmithError("static activation scale not calibrated; static act_quant needs the calibration pipeline")
            return static_fake_quantize(x, self.act_spec, self.act_scale, self.act_zero)
        per_image = dataclasses.replace(self.act_spec, granularity="channel")  # rows of the (N, C*H*W) view
        return fake_quantize(x.reshape(x.shape[0], -1), per_image).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_spec is not None:
            x = self.quantize_input(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    # -- saving ------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """JSON-able metadata that, with ``state_dict()``, rebuilds this module (:meth:`from_description`)."""
        return {
            "kind": KIND,
            "weight": None if self.packed is None else self.packed.spec.to_dict(),
            "shape": list(self.kernel_shape),
            "bias": self.bias is not None,
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "input": None if self.act_spec is None else self.act_spec.to_dict(),
            "input_static": self.act_static,
        }

    @classmethod
    def from_description(cls, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "QuantConv2d":
        """Rebuild from :meth:`describe`'s metadata and the module's own state-dict tensors (names without
        the module prefix). Raises KeyError/ValueError/TypeError when they do not match (callers report it)."""
        shape = tuple(info["shape"])
        if info["weight"] is not None:
            o, i, kh, kw = shape
            weight = PackedWeight.from_tensors(QuantSpec.from_dict(info["weight"]), (o, i * kh * kw), tensors)
        else:
            weight = tensors["weight"]
        if info["bias"] and "bias" not in tensors:
            raise KeyError("bias")
        act = None if info["input"] is None else QuantSpec.from_dict(info["input"])
        padding = info["padding"] if isinstance(info["padding"], str) else tuple(info["padding"])
        module = cls(weight, tensors.get("bias") if info["bias"] else None, kernel_shape=shape,
                     stride=tuple(info["stride"]), padding=padding, dilation=tuple(info["dilation"]),
                     groups=info["groups"], act_spec=act, act_static=bool(info["input_static"]))
        if module.act_static:
            module.set_static_input(tensors["act_scale"], tensors.get("act_zero"))
        return module

    def extra_repr(self) -> str:
        w = str(self.packed.spec) if self.packed is not None else "float"
        a = str(self.act_spec) if self.act_spec is not None else "float"
        if self.act_static:
            a += " static"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, weight={w}, input={a}")
