"""CrossQuant: activation steps from both the token's and the channel's absolute maximum (Liu et al.,
arXiv 2410.07505), as pure tensor functions.

Per-token quantization of ``X`` (tokens x channels) gives element ``x_ij`` the step ``t_i / q``, with
``t_i = max_j |x_ij|`` and ``q = 2**(bits-1) - 1``. In a token that holds an outlier channel ``t_i`` is
huge, so most of its ordinary elements round to zero: the paper calls the elements quantized to zero
the *quantization kernel* and finds that accuracy falls as it grows. CrossQuant gives each element
the step

    Delta_ij = t_i^alpha * c_j^(1 - alpha) / q,        c_j = max_i |x_ij|

so ordinary channels (small ``c_j``) keep fine steps even in outlier tokens; ``x_ij`` becomes
``clamp(round(x_ij / Delta_ij)) * Delta_ij``, symmetric, as in the paper. Nothing is clipped, since
``|x_ij| <= min(t_i, c_j) <= Delta_ij * q``. ``alpha = 1`` is per-token quantization bit for bit,
``alpha = 0`` dynamic per-channel; :data:`ALPHA` is the paper's setting. As the paper's ``X``, the column
maxima span the tokens of one sequence (dim -2 of the input; for a 2-D input, all its rows), so a
token's grid depends on the other tokens of its window, later ones included (the paper's arithmetic,
not a causal decoder's). A spec's ``r<ratio>`` scales every step (and codes are then clamped).
"""

from __future__ import annotations

import torch

from bitsmith.errors import SpecError
from bitsmith.spec import QuantSpec

ALPHA = 0.15  # the paper's alpha


def check(spec: QuantSpec, alpha: float) -> QuantSpec:
    """Raise a one-line SpecError unless ``spec``/``alpha`` describe CrossQuant's grid."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise SpecError(f"crossquant: alpha {alpha!r} must be a number in [0, 1] (the paper uses {ALPHA})")
    if spec.format != "int" or spec.granularity != "token" or spec.group_size is not None:
        raise SpecError(f"crossquant: '{spec}' is not a per-token integer spec; CrossQuant refines per-token "
                        "scales, use e.g. int8:token:sym")
    if not spec.symmetric:
        raise SpecError(f"crossquant: steps come from absolute maxima (symmetric, no zero point); use '{spec}' with :sym")
    if spec.clip != "minmax":
        raise SpecError(f"crossquant: steps are fixed by the row and column maxima; drop ':{spec.clip}' from '{spec}'")
    return spec


def steps(x: torch.Tensor, spec: QuantSpec, alpha: float) -> torch.Tensor:
    """``Delta_ij`` (float32, broadcast to ``x``'s shape) for the last two dimensions of ``x``."""
    a = x.float().abs()
    t = a.amax(dim=-1, keepdim=True)
    c = a.amax(dim=-2, keepdim=True) if a.dim() > 1 else a
    cross = t.pow(float(alpha)) * c.pow(1.0 - float(alpha))
    return (cross * spec.clip_ratio / ((1 << (spec.bits - 1)) - 1)).clamp_min(1e-10)


def codes(x: torch.Tensor, spec: QuantSpec, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed integer levels (float32) and steps of ``x``."""
    delta = steps(x, spec, alpha)
    half = 1 << (spec.bits - 1)
    return torch.clamp(torch.round(x.float() / delta), -half, half - 1), delta


def fake_quantize(x: torch.Tensor, spec: QuantSpec, alpha: float = ALPHA) -> torch.Tensor:
    """CrossQuant-quantize and dequantize ``x`` (``(..., tokens, channels)``)."""
    q, delta = codes(x, spec, alpha)
    return (q * delta).to(x.dtype)


def kernel_share(x: torch.Tensor, spec: QuantSpec, alpha: float) -> float:
    """Share of the elements of ``x`` quantized to zero (the quantization kernel); ``alpha=1``: per token."""
    return float((codes(x, spec, alpha)[0] == 0).float().mean())


def quantization_kernel(x: torch.Tensor, spec: QuantSpec | str = "int8:token:sym", alpha: float = ALPHA) -> dict[str, float]:
    """The paper's statistic on activations ``x``: kernel shares of per-token quantization and of CrossQuant."""
    spec = check(QuantSpec.coerce(spec), alpha)
    return {"per_token": kernel_share(x, spec, 1.0), "crossquant": kernel_share(x, spec, alpha)}
