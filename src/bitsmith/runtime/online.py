"""Online transforms applied to a linear layer's input at run time (before activation quantization).

Rotations that cannot be folded into weights (QuaRot/SpinQuant's R4 on the down projection input)
run inside :class:`bitsmith.runtime.modules.QuantLinear`. Each transform kind is registered by
name so a saved model records it in ``bitsmith.json`` and rebuilds it on load.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from bitsmith.errors import BitsmithError

_KINDS: dict[str, type["OnlineTransform"]] = {}


class OnlineTransform(nn.Module):
    """An orthogonal map of the last dimension; ``describe`` is its JSON form (tensors go in buffers)."""

    kind: ClassVar[str] = ""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def build(cls, info: dict[str, Any]) -> "OnlineTransform":
        return cls()


def register_transform(cls: type[OnlineTransform]) -> type[OnlineTransform]:
    _KINDS[cls.kind] = cls
    return cls


def build_transform(info: dict[str, Any]) -> OnlineTransform:
    """Rebuild a transform from its ``describe`` form (buffers are loaded by the caller)."""
    kind = info.get("kind") if isinstance(info, dict) else None
    if kind not in _KINDS:
        raise BitsmithError(f"unknown online transform {kind!r}; known: {', '.join(sorted(_KINDS))}")
    return _KINDS[kind].build(info)


@register_transform
class OnlineHadamard(OnlineTransform):
    """``x -> x H^T`` with the orthonormal Hadamard matrix of the input size (fast transform)."""

    kind = "hadamard"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from bitsmith.transforms.hadamard import hadamard_transform

        return hadamard_transform(x)
