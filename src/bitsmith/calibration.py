"""Statistics of a linear layer's input over the calibration tokens, gathered chunk by chunk.

Solvers need the second moment ``2 X X^T / n`` (GPTQ's Hessian); input transforms (smoothing,
shifting, rotations fitted to the data) need per-channel ranges. Transforms applied to the input
are linear or affine, so the statistics of the transformed input follow exactly from these ones
(:meth:`InputStats.changed`) without another pass over the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.errors import BitsmithError


@dataclass
class InputChange:
    """A step changed what a linear's weight multiplies: ``x -> ((x - shift) * scale) @ matrix``.

    ``upstream`` says the change was folded into the layers producing ``x`` (so activations already
    computed must be changed too); otherwise it runs online inside the linear.
    """

    shift: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    matrix: torch.Tensor | None = None
    upstream: bool = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift is not None:
            x = x - self.shift.to(x.dtype)
        if self.scale is not None:
            x = x * self.scale.to(x.dtype)
        if self.matrix is not None:
            x = x @ self.matrix.to(x.dtype)
        return x


class InputStats:
    """Running ``X^T X``, per-channel sum, min and max of a layer input.

    On the default model the ``X^T X`` products cost as much as the calibration forward pass
    itself, so only the upper triangle is formed, in four row strips (about 3/8 less work than the
    full product); ``value`` mirrors it. Per-channel ranges cost a pass each over the inputs; only
    input transforms read them, so ``ranges=False`` (weight solvers alone) skips them.
    """

    STRIPS = 4

    def __init__(self, dim: int, ranges: bool = True) -> None:
        self.sum = torch.zeros(dim, dim, dtype=torch.float32)  # upper triangle of X^T X
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.max = torch.full((dim,), -float("inf"))
        self.min = torch.full((dim,), float("inf"))
        self.ranges = ranges
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        dim = x.shape[1]
        step = -(-dim // self.STRIPS)
        for i in range(0, dim, step):
            self.sum[i : i + step, i:].addmm_(x[:, i : i + step].T, x[:, i:])
        self.total += x.sum(0).double()  # float32 within a chunk (cascade sum; float64 reductions are 14x slower here)
        if self.ranges:
            torch.maximum(self.max, x.amax(0), out=self.max)
            torch.minimum(self.min, x.amin(0), out=self.min)
        self.rows += x.shape[0]

    def _check(self, ranges: bool = False) -> None:
        if self.rows == 0:
            raise BitsmithError("calibrated step got no calibration inputs; give the recipe a calibration set with samples >= 1")
        if ranges and not self.ranges:
            raise BitsmithError("internal error: per-channel ranges were not gathered for this input (InputStats(ranges=False))")

    def gram(self) -> torch.Tensor:
        """``X^T X`` (full, float64)."""
        self._check()
        upper = self.sum.double().triu()
        return upper + upper.triu(1).T

    def value(self) -> torch.Tensor:
        """GPTQ's Hessian ``2 X^T X / n`` (float32)."""
        return (self.gram() * (2.0 / self.rows)).float()

    def absmax(self) -> torch.Tensor:
        """Per-channel largest magnitude (SmoothQuant's activation statistic)."""
        self._check(ranges=True)
        return torch.maximum(self.max.abs(), self.min.abs())

    def mean(self) -> torch.Tensor:
        self._check()
        return (self.total / self.rows).float()

    def changed(self, change: InputChange) -> "InputStats":
        """The statistics of ``change.apply(x)``, exactly (ranges only while no matrix mixes channels)."""
        self._check(ranges=True)
        g, s, n = self.gram(), self.total.clone(), self.rows
        lo, hi = self.min.double(), self.max.double()
        if change.shift is not None:
            z = change.shift.double()
            g = g - torch.outer(z, s) - torch.outer(s, z) + n * torch.outer(z, z)
            s = s - n * z
            lo, hi = lo - z, hi - z
        if change.scale is not None:
            c = change.scale.double()
            g = g * torch.outer(c, c)
            s = s * c
            lo, hi = torch.minimum(lo * c, hi * c), torch.maximum(lo * c, hi * c)
        out = InputStats(g.shape[0] if change.matrix is None else change.matrix.shape[1])
        if change.matrix is not None:
            m = change.matrix.double()
            g = m.T @ g @ m
            s = s @ m
            lo = hi = torch.full((m.shape[1],), float("nan"), dtype=torch.float64)  # unknown after mixing
        out.sum = g.float().triu()
        out.total, out.rows = s, n
        out.min, out.max = lo.float(), hi.float()
        return out
