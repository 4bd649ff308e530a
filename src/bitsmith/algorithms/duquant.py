"""DuQuant: smoothing, block rotations and a zigzag permutation against outliers (Lin et al., arXiv 2406.01721).

Why: 4-bit per-token activations fail on channels that carry outliers, both *normal* ones (a few
channels large in every token) and *massive* ones (values hundreds of times the rest, in a few
tokens). DuQuant removes them with a "dual transformation" fitted to calibration statistics, applied
to every linear's input, in this order (row vectors, ``W`` of shape ``(out, in)``, ``y = x W^T``):

1. **smoothing** (SmoothQuant): ``s_j = max|x_j|^α / max_i |W_ij|^(1-α)`` (α = 0.6, the value of the
   authors' scripts), ``x -> x Λ^-1`` with ``Λ = diag(s)``;
2. **R1**, a block-diagonal rotation built greedily per block of ``b`` channels: find the channel ``d``
   with the largest magnitude, swap it to the block's first position (``E_d``) and apply ``R~``, an
   orthogonal matrix whose first row is uniform (here the orthonormal Hadamard matrix of order ``b``:
   every row has entries ``±1/sqrt(b)``, so channel ``d`` is spread evenly over the block); repeat on
   the rotated statistics, ``R1_k = E_d1 R~ E_d2 R~ ...``, and keep the prefix with the smallest
   largest magnitude (as the authors' code does; the paper's extra random ``Q`` is left out, as there);
3. **P**, a zigzag permutation: channels sorted by magnitude are dealt to blocks 0, 1, ..., K-1,
   K-1, ..., 0, 0, 1, ... so every block gets a similar share of the large ones;
4. **R2**, a second greedy block rotation fitted on the permuted statistics.

Activations become ``x Λ^-1 R1 P R2`` and weights ``W Λ R1 P R2``; since ``M = R1 P R2`` is orthogonal,
``(x Λ^-1 M)(W Λ M)^T = x Λ^-1 M M^T Λ W^T = x W^T``: the float function is unchanged.

**Statistics, not samples.** The pipeline gives each step the input's per-channel range and ``X^T X``
(:class:`bitsmith.calibration.InputStats`), not the activations. The greedy needs the largest magnitude
of every channel *after* a candidate rotation ``R``; it is estimated as the larger of

* a peak-event model: each channel's extreme ``m_i`` (the smoothed absmax) is taken to occur in its own
  token, so channel ``j`` of the rotated input peaks at ``max_i m_i |(R1 P R2)_ij|`` (this is what
  massive outliers look like, and the authors' greedy applied to these ``d`` synthetic tokens);
* a Gaussian-bulk model: ``sqrt(2 ln n) * rms_j``, with the exact ``rms_j^2 = (R^T Σ R)_jj`` from the
  second moment ``Σ = X^T X / n`` (the typical extreme of ``n`` Gaussian values), which sees
  correlated channels that a rotation can concentrate or spread.

Both models are carried exactly through ``R1`` and ``P`` into the second stage. The greedy stops after
``steps`` swaps, when every block reached a bound no rotation can beat, or when no block improved its
estimate by 1% in the last 32 (on SmolLM2 the first swap gives most of the gain, a factor 3 to 11;
later ones up to 30% more in some blocks).

**Folded or online.** The smoothing folds into the RMSNorm before q/k/v and before gate/up (norm
weight ``g -> g / s``). A per-layer rotation of a norm output cannot be absorbed anywhere (the next
block reads the residual stream un-rotated), so ``R1 P R2`` runs online inside each linear
(:class:`bitsmith.runtime.online.OnlineBlockRotation`: two batched ``b x b`` matmuls and a gather;
q, k and v, which read the same input, each carry a copy, and a kernel would compute it once). For o
and down nothing upstream can take the permutation (it moves channels across heads, and
``act(gate) * up`` is not linear), so the whole map, smoothing included, runs online there: ``Λ^-1``
could fold into ``up_proj`` rows (and, with the same factor for the query heads sharing a KV head,
into ``v_proj`` rows), but the pipeline updates the activations it holds only for a change folded
entirely upstream, so a change split between ``up_proj`` and the online map would leave them stale;
a kernel merges the scale into the first block matrices at no cost. Every group reports one
:class:`bitsmith.calibration.InputChange` ``(scale=1/s, matrix=R1 P R2, upstream=False)``: for q/k/v
and gate/up the norm output is recomputed from the residual stream for every later use, so the
upstream half needs no update of held activations.

KV cache: the paper transforms linear inputs only; R3 (QuaRot's online Hadamard on queries and keys
after RoPE, which leaves ``q k^T`` unchanged) is kept by default so a 4-bit key cache is quantized
without its outlier channels (``r3: false`` drops it). Block size ``b``: the paper uses 128, which does not divide 576 (SmolLM2's hidden
size); unless ``block_size`` is given, each input takes the largest ``b <= 128`` that divides its size
and has a Hadamard matrix: 96 for 576 (6 blocks), 128 for 1536 (12 blocks).

Weight quantizers: GPTQ (a solver) runs after the transform on the transformed Hessian. A data-free
quantizer placed after ``duquant`` (``rtn``) runs, in the calibration pipeline, before the block's
statistics exist; DuQuant keeps the float weights of the block and re-rounds the transformed weights
with RTN on the same spec, so the result is RTN after DuQuant.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bitsmith.calibration import InputChange, InputStats
from bitsmith.errors import BitsmithError
from bitsmith.models.adapter import norm_gain, set_norm_gain
from bitsmith.registry import Step, register_step
from bitsmith.runtime import kvcache
from bitsmith.runtime.modules import QuantLinear
from bitsmith.runtime.online import OnlineBlockRotation
from bitsmith.transforms import fold
from bitsmith.transforms.hadamard import hadamard_matrix, hadamard_supported

MAX_BLOCK = 128  # the paper's block size; the automatic choice stays at or below it
PATIENCE = 32  # greedy steps without a 1% improvement in any block before giving up
IMPROVEMENT = 0.01
EPS = 1e-5  # floor of activation and weight ranges in the smoothing factor (as the authors' code)


def choose_block_size(dim: int, block_size: int | None = None, what: str = "input") -> int:
    """``block_size`` checked against ``dim``, or the largest ``b <= 128`` dividing ``dim`` with a Hadamard matrix."""
    if block_size is None:
        return next(b for b in range(min(MAX_BLOCK, dim), 0, -1) if dim % b == 0 and hadamard_supported(b))
    if dim % block_size:
        divisors = [b for b in range(2, min(MAX_BLOCK, dim) + 1) if dim % b == 0 and hadamard_supported(b)]
        raise BitsmithError(f"duquant: block_size {block_size} does not divide the size {dim} of the {what}; "
                            f"use one of {divisors[-4:]} or leave block_size unset to choose per input")
    return block_size


def smoothing_factor(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """SmoothQuant's ``s = max|x|^α / max|W|^(1-α)`` per input channel (ones when ``alpha`` is None), float64."""
    if alpha is None:
        return torch.ones_like(act_absmax, dtype=torch.float64)
    a, w = act_absmax.double().clamp(min=EPS), weight_absmax.double().clamp(min=EPS)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=EPS)


def estimate_magnitudes(r: torch.Tensor, events: torch.Tensor, second: torch.Tensor, kappa: float) -> torch.Tensor:
    """Estimated largest magnitude per channel of ``x R``, for each block: ``max(peak, kappa * rms)``, (K, b).

    ``r``: (K, b, b) rotations; ``events``: (K, n, b) the peak-event tokens of each block (rows of
    zeros allowed); ``second``: (K, b, b) second moments ``E[x^T x]`` of each block.
    """
    peak = torch.bmm(events, r).abs().amax(1)
    rms = (torch.bmm(second, r) * r).sum(1).clamp(min=0).sqrt()
    return torch.maximum(peak, kappa * rms)


def lower_bound(events: torch.Tensor, second: torch.Tensor, kappa: float) -> torch.Tensor:
    """Per block, a floor under the largest estimate that no rotation can beat, (K,): the largest event
    row of norm ``ρ`` peaks at ``>= ρ / sqrt(b)``, and the mean of ``rms^2`` over channels is ``trace / b``."""
    b = second.shape[-1]
    return torch.maximum(events.norm(dim=2).amax(1) / math.sqrt(b),
                         kappa * (second.diagonal(dim1=1, dim2=2).sum(1).clamp(min=0) / b).sqrt())


def block_events(events: torch.Tensor, second: torch.Tensor, kappa: float) -> torch.Tensor:
    """Split peak-event tokens (n, d) into the K blocks of ``second`` (K, b, b), (K, n', b), keeping per
    block only the rows that can set its maximum (what the greedy minimises and where it acts). Under
    any rotation the block's largest estimate is at least ``ρ_max / sqrt(b)`` (``ρ_max`` its largest
    row norm) and ``kappa * sqrt(trace / b)`` (the mean square over channels is fixed), while a row of
    norm ``ρ`` never exceeds ``ρ``: rows below both bounds are dropped."""
    k, b, _ = second.shape
    parts = events.reshape(-1, k, b).transpose(0, 1)  # (K, n, b)
    norms = parts.norm(dim=2)
    keep = norms > lower_bound(parts, second, kappa)[:, None]
    count = max(int(keep.sum(1).max()), 1)
    out = torch.zeros(k, count, b, dtype=events.dtype)
    for i in range(k):
        rows = parts[i][keep[i]]
        out[i, : rows.shape[0]] = rows
    return out


def greedy_rotation(events: torch.Tensor, second: torch.Tensor, base: torch.Tensor, steps: int,
                    kappa: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DuQuant's greedy block rotation, for K blocks at once.

    Each step takes, per block, the channel ``d`` with the largest estimated magnitude under the
    rotation so far and appends ``E_d base`` (``E_d`` swaps channels 0 and ``d``; ``base`` has a uniform
    first row). The search runs in float32 and stops after ``steps`` steps, once every block reached
    :func:`lower_bound`, or once no block has improved its estimate by 1% for ``PATIENCE`` steps; the
    best prefix of each block is projected on the nearest orthogonal matrix in float64. ``events``,
    ``second``: see :func:`estimate_magnitudes`.
    Returns rotations (K, b, b), estimated magnitudes (K, b) and the prefix lengths (K,).
    """
    k, _, b = events.shape
    ev, sec, base32 = events.float(), second.float(), base.float().expand(k, b, b)
    r = torch.eye(b).expand(k, b, b).clone()
    est = estimate_magnitudes(r, ev, sec, kappa)
    best_r, best = r.clone(), est.amax(1)
    ref, floor = best.clone(), lower_bound(ev, sec, kappa) * (1 + 1e-5)
    used = torch.zeros(k, dtype=torch.long)
    cols, rows = torch.arange(b).expand(k, b), torch.arange(k)
    stale = 0
    for step in range(1, steps + 1):
        d = est.argmax(1)
        idx = cols.clone()
        idx[rows, d] = 0
        idx[:, 0] = d
        r = torch.bmm(r.gather(2, idx[:, None, :].expand(k, b, b)), base32)
        est = estimate_magnitudes(r, ev, sec, kappa)
        top = est.amax(1)
        better = top < best * (1 - 1e-6)  # not float noise
        best_r[better], best[better], used[better] = r[better], top[better], step
        progress = top < ref * (1 - IMPROVEMENT)
        ref = torch.where(progress, top, ref)
        stale = 0 if progress.any() else stale + 1
        if stale >= PATIENCE or bool((best <= floor).all()):
            break
    u, _, vh = torch.linalg.svd(best_r.double())
    best_r = u @ vh
    return best_r, estimate_magnitudes(best_r, events.double(), second.double(), kappa), used


def zigzag_permutation(magnitude: torch.Tensor, blocks: int) -> torch.Tensor:
    """DuQuant's zigzag permutation: ``perm`` with ``x[..., perm]`` dealing channels, largest first, to
    blocks 0, 1, ..., K-1, K-1, ..., 0, 0, 1, ...; within a block, channels stay largest first."""
    dim = magnitude.shape[0]
    if dim % blocks:
        raise BitsmithError(f"duquant: {blocks} blocks do not divide {dim} channels")
    order = torch.sort(magnitude, descending=True, stable=True).indices
    pattern = torch.cat([torch.arange(blocks), torch.arange(blocks - 1, -1, -1)])
    block_of = pattern[torch.arange(dim) % (2 * blocks)]
    return order[torch.sort(block_of, stable=True).indices]


@contextmanager
def _one_thread():
    """The greedy multiplies many small ``b x b`` matrices, where thread hand-offs cost more than they save."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _blockwise(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``x @ block_diag(*r)`` for rows ``x`` (n, K b) and blocks ``r`` (K, b, b)."""
    k, b, _ = r.shape
    return torch.bmm(x.reshape(-1, k, b).transpose(0, 1), r).transpose(0, 1).reshape(x.shape)


def _diagonal_blocks(m: torch.Tensor, k: int, b: int) -> torch.Tensor:
    """The K diagonal ``b x b`` blocks of a (K b, K b) matrix, shape (K, b, b)."""
    return m.reshape(k, b, k, b).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


@dataclass
class DuQuantFit:
    """One input's transform: smoothing ``s`` (d,), rotations ``r1``/``r2`` (K, b, b) and ``perm`` (d,), float64."""

    s: torch.Tensor
    r1: torch.Tensor
    perm: torch.Tensor
    r2: torch.Tensor
    before: float = 0.0  # largest estimated magnitude of the smoothed input, before the rotations
    after: float = 0.0  # ... and after ``R1 P R2``
    steps: tuple[int, int] = (0, 0)  # greedy steps kept (largest over blocks) for R1 and R2

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x R1 P R2`` for rows ``x`` (float64)."""
        return _blockwise(_blockwise(x.double(), self.r1)[:, self.perm], self.r2)

    def matrix(self) -> torch.Tensor:
        """The dense ``R1 P R2`` (d, d)."""
        return _blockwise(torch.block_diag(*self.r1)[:, self.perm], self.r2)

    def online(self, with_scale: bool) -> OnlineBlockRotation:
        """The online transform (``x / s`` included when the smoothing is not folded upstream)."""
        return OnlineBlockRotation(self.r1, self.perm, self.r2, (1 / self.s) if with_scale else None)


def fit_duquant(absmax: torch.Tensor, second: torch.Tensor, rows: int, weight_absmax: torch.Tensor,
                alpha: float | None = 0.6, block_size: int | None = None, steps: int = 256) -> DuQuantFit:
    """Fit DuQuant's transform to one input's statistics.

    ``absmax``: per-channel largest magnitude of the input, ``second``: its second moment
    ``X^T X / rows`` (d, d), ``weight_absmax``: per input channel, the largest weight magnitude of the
    linears reading it.
    """
    d = absmax.shape[0]
    b = choose_block_size(d, block_size)
    k = d // b
    s = smoothing_factor(absmax, weight_absmax, alpha)
    m = absmax.double() / s
    sigma = second.double() / torch.outer(s, s)
    kappa = math.sqrt(2 * math.log(max(rows, 2)))
    base = hadamard_matrix(b, torch.float64)
    events = torch.diag(m)  # token i carries channel i's extreme and nothing else
    with _one_thread():
        r1, est1, used1 = greedy_rotation(_diagonal_blocks(events, k, b), _diagonal_blocks(sigma, k, b), base, steps, kappa)
    perm = zigzag_permutation(est1.reshape(-1), k)
    events = torch.block_diag(*(m.reshape(k, b, 1) * r1))[:, perm]  # the same tokens after R1 P
    sig1 = _blockwise(_blockwise(sigma, r1).T.contiguous(), r1)[perm][:, perm]  # (R1 P)^T Σ (R1 P), Σ symmetric
    with _one_thread():
        sig1 = _diagonal_blocks(sig1, k, b)
        r2, est2, used2 = greedy_rotation(block_events(events, sig1, kappa), sig1, base, steps, kappa)
    before = torch.maximum(m, kappa * sigma.diagonal().clamp(min=0).sqrt()).max().item()
    return DuQuantFit(s, r1, perm, r2, before, est2.max().item(), (int(used1.max()), int(used2.max())))


@register_step("duquant")
@dataclass
class DuQuant(Step):
    """Recipe step: DuQuant's smoothing, block rotations and zigzag permutation on every linear input.

    ``alpha``: smoothing strength (null: no smoothing); ``block_size``: rotation block (null: per input,
    the largest divisor <= 128 with a Hadamard matrix); ``steps``: greedy steps per block (the authors'
    256); ``r3``: online Hadamard on queries/keys for the KV cache.
    """

    alpha: float | None = 0.6
    block_size: int | None = None
    steps: int = 256
    r3: bool = True

    transforms_inputs: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                                       or not 0 <= self.alpha <= 1):
            raise BitsmithError(f"duquant: alpha {self.alpha!r} must be a number in [0, 1] (or null for no smoothing)")
        if self.block_size is not None and (isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
                                            or self.block_size < 1 or not hadamard_supported(self.block_size)):
            raise BitsmithError(f"duquant: block_size {self.block_size!r} must be a positive integer with a Hadamard "
                                "matrix (2^k or 2^k times 12, 20, 28, ...), e.g. 64 or 96")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise BitsmithError(f"duquant: steps {self.steps!r} must be a non-negative integer")
        if not isinstance(self.r3, bool):
            raise BitsmithError(f"duquant: r3 {self.r3!r} must be true or false")
        self.fits: list[dict] = []  # per transformed input: roles, size, block, largest magnitude before/after
        self._float: dict[str, nn.Module] = {}

    def apply_block(self, ctx, block) -> None:
        ad = ctx.lm.adapter
        self._float = dict(ad.block_linears(block))  # float weights, in case a data-free quantizer rounds them next
        if self.r3:
            kvcache.configure(ctx.lm.model, ad.attention(block), rotate=True)

    def finish(self, ctx) -> None:
        self._float = {}

    def _float_weight(self, role: str, linear: nn.Module) -> torch.Tensor:
        if getattr(linear, "packed", None) is None:
            return linear.weight.detach()
        original = self._float.get(role)
        if original is None or getattr(original, "packed", None) is not None or original is linear:
            raise BitsmithError(f"duquant: the weight of {role} was quantized before duquant transformed it; "
                                "put duquant first in the recipe")
        return original.weight.detach()

    def transform_inputs(self, ctx, block, roles: tuple[str, ...], stats: InputStats) -> InputChange:
        ad = ctx.lm.adapter
        found = ad.branch_of(block, roles)
        if found is None:
            raise BitsmithError(f"duquant: no branch of the block has inputs {roles}")
        sub, fold_norm = found
        linears = ad.block_linears(block)
        for r in roles:
            if getattr(linears[r], "input_transform", None) is not None:
                raise BitsmithError(f"duquant: the input of {r} already has an online transform "
                                    f"({linears[r].input_transform.kind}); use duquant without other rotation steps")
        absmax = stats.absmax()
        if not torch.isfinite(absmax).all():
            raise BitsmithError("duquant needs the per-channel ranges of its input; put it before other input-transforming steps")
        weights = {r: self._float_weight(r, linears[r]) for r in roles}
        wmax = torch.stack([w.abs().amax(0) for w in weights.values()]).amax(0)
        what = "input of " + "/".join(roles)
        b = choose_block_size(absmax.shape[0], self.block_size, what)
        fit = fit_duquant(absmax, stats.gram() / stats.rows, stats.rows, wmax, self.alpha, b, self.steps)
        if fold_norm:
            norm = sub.norm
            set_norm_gain(norm, norm_gain(norm).double() / fit.s)
            if getattr(norm, "bias", None) is not None:
                fold._assign(norm, "bias", norm.bias.detach().double() / fit.s)
        for r in roles:
            self._install(ad, block, r, linears[r], fit.rotate(weights[r].double() * fit.s), fit.online(not fold_norm))
        self.fits.append({"roles": tuple(roles), "dim": absmax.shape[0], "block_size": b,
                          "before": fit.before, "after": fit.after, "steps": fit.steps})
        return InputChange(scale=1 / fit.s, matrix=fit.matrix(), upstream=False)

    @staticmethod
    def _install(ad, block, role: str, linear: nn.Module, weight: torch.Tensor, transform: OnlineBlockRotation) -> None:
        """Give ``role`` the transformed weight (re-rounded on its spec if it was already quantized) and the online map."""
        if getattr(linear, "packed", None) is not None:
            from bitsmith.algorithms.rtn import quantize_linear

            linear.set_packed(quantize_linear(QuantLinear(weight.float()), linear.packed.spec).packed)
        elif isinstance(linear, QuantLinear):
            fold._assign(linear, "weight", weight)
        else:
            bias = None if getattr(linear, "bias", None) is None else linear.bias
            linear = QuantLinear(weight.to(linear.weight.dtype), bias)
        linear.input_transform = transform
        ad.set_block_linear(block, role, linear)
