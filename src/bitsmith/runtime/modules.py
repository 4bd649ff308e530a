"""Quantized drop-in replacements for ``nn.Linear`` and ``nn.Embedding``.

They hold a :class:`PackedWeight` (what is saved) plus its dequantized fp32 copy as a non-persistent
``weight`` buffer, so Hugging Face code that reads ``.weight`` keeps working and the forward pass
costs the same as the float one. Activation quantization of the linear input is dynamic (scales
from the live tensor) with the spec given; an optional online transform (a rotation that cannot be
folded into the previous layer) runs on the input first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitsmith.formats import integer
from bitsmith.runtime.online import OnlineTransform
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import QuantSpec


def _install_packed(module: nn.Module, packed: PackedWeight) -> None:
    """Store ``packed`` (persistent buffers) and its dequantized copy as the ``weight`` buffer."""
    if "weight" in module._parameters:
        del module._parameters["weight"]
    for stale in ("qcodes", "qscale", "qzero"):
        module._buffers.pop(stale, None)
    module.packed = packed
    for name, t in packed.tensors().items():
        module.register_buffer(name, t)
    module.register_buffer("weight", packed.dequantize(), persistent=False)


class QuantLinear(nn.Module):
    """Linear layer with an optionally quantized weight and optionally quantized input."""

    def __init__(
        self,
        weight: torch.Tensor | PackedWeight,
        bias: torch.Tensor | None = None,
        act_spec: QuantSpec | None = None,
        input_transform: OnlineTransform | None = None,
    ) -> None:
        super().__init__()
        self.packed: PackedWeight | None = None
        self.act_spec = act_spec
        self.input_transform = input_transform
        if isinstance(weight, PackedWeight):
            self.set_packed(weight)
        else:
            self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def set_packed(self, packed: PackedWeight) -> None:
        """Install a quantized weight, replacing whatever weight was there."""
        _install_packed(self, packed)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform_input(x)
        if self.act_spec is not None:
            x = integer.fake_quantize(x, self.act_spec)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        w = str(self.packed.spec) if self.packed is not None else "float"
        a = str(self.act_spec) if self.act_spec is not None else "float"
        t = "" if self.input_transform is None else f", online={self.input_transform.kind}"
        return f"in={self.in_features}, out={self.out_features}, weight={w}, input={a}{t}"


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
