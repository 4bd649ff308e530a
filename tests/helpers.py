"""Small helpers shared by the equivalence tests (rotations, smoothing, DuQuant)."""

from __future__ import annotations

import torch


def tokens(n: int = 3, seq: int = 20, seed: int = 0) -> torch.Tensor:
    """Random token windows inside the tiny test vocabularies."""
    return torch.randint(3, 96, (n, seq), generator=torch.Generator().manual_seed(seed))


def lm_logits(lm, ids: torch.Tensor) -> torch.Tensor:
    """A loaded model's logits in float64, without autograd."""
    with torch.no_grad():
        return lm.model(input_ids=ids).logits.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against ``b`` (Frobenius norm)."""
    return ((a - b).norm() / b.norm()).item()
