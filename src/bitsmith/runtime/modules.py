"""Quantized drop-in replacements for ``nn.Linear`` and ``nn.Embedding``.

They hold a :class:`PackedWeight` (what is saved) plus its dequantized fp32 copy as a non-persistent
``weight`` buffer, so Hugging Face code that reads ``.weight`` keeps working and the forward pass
costs the same as the float one. Activation quantization of the linear input is dynamic (scales
from the live tensor) with the spec given, in any number format of :mod:`bitsmith.formats.registry`; an optional online transform (a rotation that cannot be
folded into the previous layer) runs on the input first. A linear may instead quantize its input
*statically* (``act_static``): integer, one scale (and zero point) for the whole tensor, calibrated
once (:mod:`bitsmith.algorithms.activations`) and saved with the model, not taken from the live tensor.
Or with CrossQuant steps (``act_cross``: its alpha; :mod:`bitsmith.formats.crossquant`), dynamic too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.formats import crossquant
from bitsmith.formats.registry import fake_quantize
from bitsmith.runtime.online import OnlineTransform
from bitsmith.runtime.qweight import STORED_NAMES, PackedWeight
from bitsmith.spec import QuantSpec


class _LastInput:
    """The last dynamically quantized linear input and its result.

    q/k/v (and gate/up) are called on the very same tensor; quantizing it once instead of three
    (two) times matters for formats whose dynamic quantization searches scales (OliVe). A hit needs
    the same object (kept alive here, so its id cannot be reused by another tensor), the same spec,
    and unchanged contents (compared against a copy: inference tensors have no version counter).
    """

    x: torch.Tensor | None = None
    copy: torch.Tensor | None = None
    key: tuple | None = None
    out: torch.Tensor | None = None


def _dynamic_quantize(x: torch.Tensor, spec: QuantSpec, cross: float | None = None) -> torch.Tensor:
    last = _LastInput
    if last.x is x and last.key == (spec, cross) and torch.equal(last.copy, x):
        return last.out
    out = fake_quantize(x, spec) if cross is None else crossquant.fake_quantize(x, spec, cross)
    last.x, last.copy, last.key, last.out = x, x.detach().clone(), (spec, cross), out
    return out


def _install_packed(module: nn.Module, packed: PackedWeight) -> None:
    """Store ``packed`` (persistent buffers) and its dequantized copy as the ``weight`` buffer."""
    if "weight" in module._parameters:
        del module._parameters["weight"]
    for stale in STORED_NAMES:
        module._buffers.pop(stale, None)
    module.packed = packed
    for name, t in packed.tensors().items():
        module.register_buffer(name, t)
    module.register_buffer("weight", packed.dequantize(), persistent=False)


def static_input_params(lo: float, hi: float, spec: QuantSpec, ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integer grid for a tensor whose values span ``[lo, hi]``, range shrunk by ``ratio`` (static activations).

    Same conventions as dynamic integer quantization: symmetric maps ``ratio * max|x|`` onto
    ``2**(bits-1) - 1``; asymmetric maps ``ratio * [min(lo, 0), max(hi, 0)]`` onto ``[0, 2**bits - 1]``
    with an integer zero point.
    """
    if spec.symmetric:
        scale = torch.tensor(max(abs(lo), abs(hi)) * ratio / ((1 << (spec.bits - 1)) - 1))
        return scale.clamp_min(1e-10), None
    lo_, hi_ = min(lo, 0.0) * ratio, max(hi, 0.0) * ratio
    scale = torch.tensor((hi_ - lo_) / ((1 << spec.bits) - 1)).clamp_min(1e-10)
    return scale, torch.round(-lo_ / scale).clamp(0, (1 << spec.bits) - 1)


def static_fake_quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Quantize and dequantize ``x`` on a fixed integer grid (one scale for the whole tensor)."""
    s = scale.to(x.dtype)
    if zero is None:
        half = 1 << (spec.bits - 1)
        return torch.clamp(torch.round(x / s), -half, half - 1) * s
    z = zero.to(x.dtype)
    return (torch.clamp(torch.round(x / s) + z, 0, (1 << spec.bits) - 1) - z) * s


class QuantLinear(nn.Module):
    """Linear layer with an optionally quantized weight and optionally quantized input."""

    def __init__(
        self,
        weight: torch.Tensor | PackedWeight,
        bias: torch.Tensor | None = None,
        act_spec: QuantSpec | None = None,
        input_transform: OnlineTransform | None = None,
        act_static: bool = False,
        act_cross: float | None = None,
    ) -> None:
        super().__init__()
        self.packed: PackedWeight | None = None
        self.act_spec = act_spec
        self.input_transform = input_transform
        # Static input quantization: one calibrated scale (and zero point) for the whole input,
        # persistent buffers set by set_static_input; until then the layer refuses to run.
        self.act_static = act_static
        self.act_cross = act_cross  # CrossQuant alpha (dynamic row x column steps), or None
        self.register_buffer("act_scale", None)
        self.register_buffer("act_zero", None)
        self.kernel = None  # a CPU kernel computing the same function (bitsmith.runtime.kernels), or None
        if isinstance(weight, PackedWeight):
            self.set_packed(weight)
        else:
            self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def set_packed(self, packed: PackedWeight) -> None:
        """Install a quantized weight, replacing whatever weight was there."""
        _install_packed(self, packed)
        self.kernel = None

    def set_kernel(self, kernel) -> None:
        """Run ``kernel(transformed input)`` instead of the fake-quant product (None: back to fake quant)."""
        self.kernel = kernel
        if kernel is None and self.packed is not None and self.weight.is_meta:
            self.register_buffer("weight", self.packed.dequantize(), persistent=False)

    def drop_float_weight(self) -> None:
        """Free the dequantized fp32 copy (a kernel reads the packed weight); ``weight`` keeps its shape on
        the meta device, so code that would compute with it fails loudly instead of silently."""
        if self.kernel is None or self.packed is None:
            raise BitsmithError("only a layer running a kernel on its packed weight can drop the float copy")
        self.register_buffer("weight", torch.empty(self.packed.shape, device="meta"), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_spec: QuantSpec | None = None) -> "QuantLinear":
        if isinstance(linear, QuantLinear):
            linear.act_spec = act_spec if act_spec is not None else linear.act_spec
            return linear
        return cls(linear.weight, linear.bias, act_spec)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input the weight multiplies, before activation quantization (what solvers calibrate on)."""
        return x if self.input_transform is None else self.input_transform(x)

    def set_static_input(self, scale: torch.Tensor | None, zero: torch.Tensor | None = None) -> None:
        """Calibrated per-tensor input grid (``act_static``): scale and, asymmetric only, integer zero point."""
        self.act_scale = None if scale is None else scale.detach().float().reshape(()).clone()
        self.act_zero = None if zero is None else zero.detach().float().reshape(()).clone()

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Activation quantization of the (transformed) input: dynamic, or on the calibrated static grid."""
        if not self.act_static:
            return _dynamic_quantize(x, self.act_spec, self.act_cross)
        if self.act_scale is None:
            raise BitsmithError("static activation scale not calibrated; static act_quant needs the calibration pipeline")
        return static_fake_quantize(x, self.act_spec, self.act_scale, self.act_zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform_input(x)
        if self.kernel is not None:
            return self.kernel(x)
        if self.act_spec is not None:
            x = self.quantize_input(x)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        w = str(self.packed.spec) if self.packed is not None else "float"
        a = str(self.act_spec) if self.act_spec is not None else "float"
        if self.act_static:
            a += " static"
        if self.act_cross is not None:
            a += f" crossquant(alpha={self.act_cross:g})"
        t = "" if self.input_transform is None else f", online={self.input_transform.kind}"
        k = "" if self.kernel is None else f", kernel={self.kernel.name}"
        return f"in={self.in_features}, out={self.out_features}, weight={w}, input={a}{t}{k}"


class QuantEmbedding(nn.Module):
    """Embedding table stored quantized per row (token) or per group of a row."""

    def __init__(self, packed: PackedWeight, padding_idx: int | None = None) -> None:
        super().__init__()
        self.padding_idx = padding_idx
        _install_packed(self, packed)

    @property
    def num_embeddings(self) -> int:
        return self.weight.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.weight.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight={self.packed.spec}"
