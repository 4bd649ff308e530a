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


def run_steps(lm, steps: list, calib: torch.Tensor):
    """Run recipe ``steps`` through the calibration pipeline on the token windows ``calib`` (no tokenizer
    needed); returns the loaded recipe, whose steps keep what they chose."""
    from bitsmith.pipeline import Context, run_calibrated
    from bitsmith.recipes import load_recipe

    recipe = load_recipe({"name": "t", "steps": steps})
    ctx = Context(lm, None, progress=False)
    ctx._calib = calib
    with torch.no_grad():
        for step in recipe.steps:
            step.prepare(ctx)
        run_calibrated(ctx, recipe.steps)
        for step in recipe.steps:
            step.finish(ctx)
    return recipe
