"""A memo for functions that build constant tensors (Hadamard factors, format code tables).

A tensor first built under ``torch.inference_mode()`` (during an evaluation, say) is an inference
tensor, and autograd refuses to save one for backward: a later training step that reads the cached
table (SpinQuant through the fast Hadamard, FlexRound through a format's quantizer) would fail with
"Inference tensors cannot be saved for backward". So the builder always runs outside inference mode.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def tensor_cache(maxsize: int | None = None) -> Callable[[F], F]:
    """``functools.lru_cache`` whose entries are ordinary tensors even when first built in inference mode."""

    def wrap(build: F) -> F:
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(build)
        def cached(*args, **kwargs):
            with torch.inference_mode(False):
                return build(*args, **kwargs)

        return cached  # type: ignore[return-value]

    return wrap
