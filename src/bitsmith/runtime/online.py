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


@register_transform
class OnlineShift(OnlineTransform):
    """``x -> x - shift``, one value per channel (buffer ``shift``): OS+'s channel-wise shifting
    (arXiv 2304.09145) where no earlier layer can absorb it (after an RMSNorm, which has no bias).
    The linear's bias carries the compensation ``W shift``; a kernel fuses the subtraction into the
    activation quantizer."""

    kind = "shift"

    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("shift", shift.detach().float().reshape(-1).contiguous())

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.shift.numel()}

    @classmethod
    def build(cls, info: dict[str, Any]) -> "OnlineShift":
        try:
            dim = int(info["dim"])
        except (KeyError, TypeError, ValueError):
            raise BitsmithError(f"shift: bad description {info!r}") from None
        return cls(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.shift.to(x.dtype)


@register_transform
class OnlineBlockRotation(OnlineTransform):
    """DuQuant's online transform (arXiv 2406.01721): ``x -> ((x * scale) R1) P R2``.

    ``R1`` and ``R2`` are block-diagonal (``blocks`` orthogonal ``b x b`` matrices, buffers ``r1``
    and ``r2`` of shape ``(dim // b, b, b)``), ``P`` a permutation of the channels (buffer ``perm``:
    output channel ``j`` takes channel ``perm[j]``), and the optional per-channel ``scale`` a
    smoothing factor that could not be folded upstream (then the map is diagonal times orthogonal).
    Cost per token: two batched ``b x b`` matmuls and a gather, against ``dim^2`` for a dense rotation.
    """

    kind = "block_rotation"

    def __init__(self, r1: torch.Tensor, perm: torch.Tensor, r2: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        blocks, b, b2 = r1.shape
        dim = blocks * b
        if b != b2 or r2.shape != r1.shape or perm.shape != (dim,) or (scale is not None and scale.shape != (dim,)):
            raise BitsmithError(f"block_rotation: inconsistent shapes r1 {tuple(r1.shape)}, r2 {tuple(r2.shape)}, "
                                f"perm {tuple(perm.shape)}, scale {None if scale is None else tuple(scale.shape)}")
        # own copies: linears sharing an input get one transform each, and safetensors refuses shared storage
        self.register_buffer("r1", r1.detach().to(torch.float32, copy=True).contiguous())
        self.register_buffer("perm", perm.detach().to(torch.long, copy=True).contiguous())
        self.register_buffer("r2", r2.detach().to(torch.float32, copy=True).contiguous())
        self.register_buffer("scale", None if scale is None else scale.detach().to(torch.float32, copy=True).contiguous())

    @property
    def dim(self) -> int:
        return self.r1.shape[0] * self.r1.shape[1]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "dim": self.dim, "block_size": self.r1.shape[1], "scaled": self.scale is not None}

    @classmethod
    def build(cls, info: dict[str, Any]) -> "OnlineBlockRotation":
        try:
            dim, b, scaled = int(info["dim"]), int(info["block_size"]), bool(info["scaled"])
        except (KeyError, TypeError, ValueError):
            raise BitsmithError(f"block_rotation: bad description {info!r}") from None
        if b < 1 or dim < 1 or dim % b:
            raise BitsmithError(f"block_rotation: block size {b} does not divide the dimension {dim}")
        r = torch.zeros(dim // b, b, b)
        return cls(r, torch.arange(dim), r.clone(), torch.ones(dim) if scaled else None)

    @staticmethod
    def _blocks(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        k, b, _ = r.shape
        y = x.reshape(-1, k, b).transpose(0, 1)  # (blocks, rows, b)
        return torch.bmm(y, r.to(x.dtype)).transpose(0, 1).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = x.to(work)
        if self.scale is not None:
            y = y * self.scale.to(work)
        y = self._blocks(y, self.r1)
        y = y.index_select(-1, self.perm)
        return self._blocks(y, self.r2).to(x.dtype)
