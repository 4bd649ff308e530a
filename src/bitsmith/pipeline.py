"""The recipe runner: applies a recipe's steps, in order, to a loaded model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from bitsmith.data.text import Text, calibration_batch
from bitsmith.models import LoadedModel
from bitsmith.recipes import Recipe

DEFAULT_CALIBRATION = {"samples": 128, "seq": 512}


@dataclass
class Context:
    """What a step may use: the model, calibration data (built on first use), the seed."""

    lm: LoadedModel
    calib_text: Text
    seed: int = 0
    progress: bool = True
    calibration_settings: dict = field(default_factory=lambda: dict(DEFAULT_CALIBRATION))
    _calib: torch.Tensor | None = None

    def calibration(self) -> torch.Tensor:
        """Calibration token windows, shape (samples, seq), deterministic for the seed."""
        if self._calib is None:
            s = self.calibration_settings
            self._calib = calibration_batch(self.lm.tokenizer, self.calib_text, s["samples"], s["seq"], self.seed)
        return self._calib

    def untie_if_needed(self) -> None:
        """Keep config.tie_word_embeddings honest once the embedding and lm_head differ."""
        ad = self.lm.adapter
        if getattr(ad.config, "tie_word_embeddings", False) and ad.lm_head().weight is not ad.embeddings().weight:
            ad.config.tie_word_embeddings = False


def run_recipe(lm: LoadedModel, recipe: Recipe, calib_text: Text, seed: int = 0, progress: bool = True) -> float:
    """Apply ``recipe`` to ``lm`` in place; returns the seconds it took."""
    torch.manual_seed(seed)
    ctx = Context(lm, calib_text, seed, progress, {**DEFAULT_CALIBRATION, **recipe.calibration})
    t0 = time.perf_counter()
    for step in recipe.steps:
        step.apply(ctx)
    seconds = time.perf_counter() - t0
    lm.quant = {"recipe": recipe.name, "source": lm.source, "seed": seed, "calib_text": calib_text.name,
                "quantize_seconds": seconds}
    return seconds
