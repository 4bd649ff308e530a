"""SpinQuant: learned rotations for W4A4KV4 (Liu et al., arXiv 2405.16406).

QuaRot's random Hadamard rotations remove outliers on average, but which rotation is best for a
quantized network varies a lot from one draw to the next. SpinQuant learns the residual-stream
rotation R1 and the per-head value rotation R2 (one per layer) by minimising the next-token loss of
the *fake-quantized* network on calibration text. Rotations stay orthogonal by Cayley SGD on the
Stiefel manifold: with Euclidean gradient ``G`` of ``R``, ``A = G R^T - R G^T`` is skew-symmetric and
``R <- (I + lr/2 A)^-1 (I - lr/2 A) R`` is orthogonal again. Rounding passes gradients straight
through (STE). R1 starts from a random-sign Hadamard matrix and R2 from a Hadamard matrix, as in
the paper; R3 (queries/keys) and R4 (down projection input) stay online Hadamards. After training
the rotations are folded like QuaRot's (:mod:`bitsmith.transforms.fold`).

Training needs the whole model in memory (every layer shares R1), so it cannot be streamed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bitsmith.algorithms.quarot import install_online_rotations
from bitsmith.errors import BitsmithError
from bitsmith.formats.registry import fake_quantize
from bitsmith.registry import Step, register_step
from bitsmith.spec import ACTIVATION_GRANULARITIES, KV_GRANULARITIES, WEIGHT_GRANULARITIES, QuantSpec
from bitsmith.transforms import fold
from bitsmith.transforms.hadamard import hadamard_matrix, hadamard_transform, random_hadamard_matrix

log = logging.getLogger(__name__)


def cayley_step(r: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """One Cayley SGD step on the orthogonal group; the result is orthogonal to float precision.

    The step is ``min(lr, 1 / ||A||_1)`` (Li et al., arXiv 2002.01113, the optimizer SpinQuant uses):
    SpinQuant's learning rate of 1.5 is an upper bound, and a raw step of 1.5 along a large ``A``
    throws the rotation far from where the gradient was measured (the loss rose from 3.0 to 4.1
    in 20 steps on the default model before this bound).
    """
    a = grad @ r.T - r @ grad.T
    step = min(lr, 1.0 / (float(a.abs().sum(0).max()) + 1e-8))
    eye = torch.eye(r.shape[0], dtype=r.dtype)
    return torch.linalg.solve(eye + (step / 2) * a, (eye - (step / 2) * a) @ r)


def _ste(x: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """Fake quantization whose gradient is the identity (straight-through estimator)."""
    if spec is None:
        return x
    return x + (fake_quantize(x.detach(), spec) - x).detach()


def _ste_weight(w: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """Weights fake-quantized in any number format (float32 scales), identity gradient."""
    if spec is None:
        return w
    wd = w.detach()
    return w + (fake_quantize(wd, spec) - wd).detach()


class _Rotated(nn.Module):
    """A block linear during training: weight = f(W, R1, R2), fake-quantized input and weight."""

    def __init__(self, linear: nn.Module, kind: str, owner: "_Trainer", layer: int) -> None:
        super().__init__()
        self.weight = linear.weight.detach().float()
        self.bias = None if getattr(linear, "bias", None) is None else linear.bias.detach().float()
        self.kind, self.owner, self.layer = kind, owner, layer
        if kind == fold.CLOSES:
            self.weight = hadamard_transform(self.weight)  # W H^T for the online R4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.owner
        r1 = o.r1.float()
        if self.kind == fold.CLOSES:
            x = hadamard_transform(x)
        x = _ste(x, o.activations)
        if o.weights is None:
            return self._rotate_activations(x, r1)
        w, b, d = self.weight, self.bias, o.head_dim
        if self.kind == fold.READS:
            w = w @ r1
        elif self.kind == fold.FEEDS_HEADS:
            p = o.r2[self.layer].float()
            w = torch.einsum("dk,hdi->hki", p, (w @ r1).reshape(-1, d, w.shape[1])).reshape(w.shape)
            if b is not None:
                b = (b.reshape(-1, d) @ p).reshape(-1)
        elif self.kind == fold.CLOSES_HEADS:
            p = o.r2[self.layer].float()
            w = torch.einsum("ohd,dk->ohk", w.reshape(w.shape[0], -1, d), p).reshape(w.shape)
            w = r1.T @ w
        else:  # fold.CLOSES
            w = r1.T @ w
        return F.linear(x, _ste_weight(w, o.weights), b)


    def _rotate_activations(self, x: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
        """Float weights: the same function with the rotations applied to the (fewer) activations."""
        o, d = self.owner, self.owner.head_dim
        if self.kind == fold.READS:
            return F.linear(x @ r1.T, self.weight, self.bias)
        if self.kind == fold.FEEDS_HEADS:
            v = F.linear(x @ r1.T, self.weight, self.bias)
            return (v.unflatten(-1, (-1, d)) @ o.r2[self.layer].float()).flatten(-2)
        if self.kind == fold.CLOSES_HEADS:
            x = (x.unflatten(-1, (-1, d)) @ o.r2[self.layer].float().T).flatten(-2)
        return F.linear(x, self.weight, self.bias) @ r1  # o and down write the rotated stream


class _Embedding(nn.Module):
    def __init__(self, emb: nn.Module, owner: "_Trainer") -> None:
        super().__init__()
        self.weight, self.owner = emb.weight.detach(), owner

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight) @ self.owner.r1.float()


class _Head(nn.Module):
    """lm_head (float, not quantized) reading the rotated stream: ``(x R1^T) W^T``."""

    def __init__(self, head: nn.Module, owner: "_Trainer") -> None:
        super().__init__()
        self.weight, self.owner = head.weight.detach(), owner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x @ self.owner.r1.float().T, self.weight)


class _KV:
    """R3 and fake-quantized keys/values with STE, in the attention hook's place."""

    def __init__(self, owner: "_Trainer") -> None:
        self.owner = owner

    def __call__(self, query, key, value):
        query, key = hadamard_transform(query), hadamard_transform(key)
        o = self.owner
        return query, _ste(key, o.kv), _ste(value, o.kv)


class _Trainer:
    """Swaps the model's parts for differentiable rotated ones, trains, and puts the originals back."""

    def __init__(self, lm, r1, r2, weights, activations, kv) -> None:
        self.lm, self.r1, self.r2 = lm, r1, r2
        self.weights, self.activations, self.kv = weights, activations, kv
        self.head_dim = lm.adapter.head_dim

    def __enter__(self) -> "_Trainer":
        from bitsmith.runtime import kvcache

        ad = self.lm.adapter
        self.saved = {"emb": ad.embeddings(), "head": ad.lm_head(),
                      "blocks": [dict(ad.block_linears(b)) for b in ad.blocks()],
                      "kv": [getattr(ad.attention(b), "bitsmith_kv", None) for b in ad.blocks()],
                      "attn": self.lm.model.config._attn_implementation}
        ad.set_embeddings(_Embedding(self.saved["emb"], self))
        ad.set_lm_head(_Head(self.saved["head"], self))
        for i, (block, linears) in enumerate(zip(ad.blocks(), self.saved["blocks"])):
            kinds = fold.rotation_kinds(ad, block)
            for role, linear in linears.items():
                ad.set_block_linear(block, role, _Rotated(linear, kinds[role], self, i))
            ad.attention(block).bitsmith_kv = _KV(self)
        kvcache.use_hooked_attention(self.lm.model)
        return self

    def __exit__(self, *exc) -> None:
        ad = self.lm.adapter
        ad.set_embeddings(self.saved["emb"])
        ad.set_lm_head(self.saved["head"])
        for block, linears, kv in zip(ad.blocks(), self.saved["blocks"], self.saved["kv"]):
            for role, linear in linears.items():
                ad.set_block_linear(block, role, linear)
            ad.attention(block).bitsmith_kv = kv
        if all(kv is None for kv in self.saved["kv"]):
            self.lm.model.config._attn_implementation = self.saved["attn"]
            for sub in self.lm.model.modules():
                cfg = getattr(sub, "config", None)
                if cfg is not None and hasattr(cfg, "_attn_implementation"):
                    cfg._attn_implementation = self.saved["attn"]


@register_step("spinquant")
@dataclass
class SpinQuant(Step):
    """Recipe step: learn R1/R2 on the fake-quantized model, fold them, install online R3/R4.

    ``weights``/``activations``/``kv`` describe the quantization the rotations are trained for
    (min-max RTN during training; use null for what stays float, e.g. weights when GPTQ follows, as
    the paper does). The quantization itself is done by the steps that follow.
    """

    weights: str | dict | None = "int4:channel:sym"
    activations: str | dict | None = "int4:token:asym"
    kv: str | dict | None = "int4:head:asym"
    iterations: int = 20
    batch: int = 1  # calibration windows per step (of the recipe's calibration length)
    lr: float = 1.5
    seed: int | None = None

    def __post_init__(self) -> None:
        self.wspec = None if self.weights is None else QuantSpec.coerce(self.weights).require(WEIGHT_GRANULARITIES, "weights")
        self.aspec = None if self.activations is None else QuantSpec.coerce(self.activations).require(ACTIVATION_GRANULARITIES, "activations")
        self.kvspec = None if self.kv is None else QuantSpec.coerce(self.kv).require(KV_GRANULARITIES, "the KV cache")
        for name in ("iterations", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "iterations" else 1):
                raise BitsmithError(f"spinquant: {name} {v!r} must be a {'non-negative' if name == 'iterations' else 'positive'} integer")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise BitsmithError(f"spinquant: lr {self.lr!r} must be a positive number")
        self.losses: list[float] = []

    def prepare(self, ctx) -> None:
        lm = ctx.lm
        if lm.weights is not None:
            raise BitsmithError("spinquant learns one rotation shared by all layers, so it needs the whole model in memory; run without --stream")
        ad = lm.adapter
        ad.require("rotatable", "spinquant")
        seed = ctx.seed if self.seed is None else self.seed
        fold.fuse_norms_outside(ad)
        for block in ad.blocks():
            fold.fuse_norms_block(ad, block)
        r1 = random_hadamard_matrix(ad.hidden_size, seed, dtype=torch.float64)
        r2 = [hadamard_matrix(ad.head_dim, dtype=torch.float64) for _ in ad.blocks()]
        if self.iterations:
            r1, r2 = self._train(ctx, r1, r2, seed)
        self.r1, self.r2 = r1, r2
        self.blocks = {id(b): i for i, b in enumerate(ad.blocks())}
        fold.rotate_outside_blocks(ad, r1)

    def _train(self, ctx, r1, r2, seed):
        tokens = ctx.calibration()
        gen = torch.Generator().manual_seed(seed)
        params = [r1.clone().requires_grad_(True)] + [p.clone().requires_grad_(True) for p in r2]
        trainer = _Trainer(ctx.lm, params[0], params[1:], self.wspec, self.aspec, self.kvspec)
        bar = tqdm(range(self.iterations), desc="spinquant", disable=not ctx.progress, leave=False)
        with trainer, torch.enable_grad():
            for it in bar:
                lr = self.lr * (1 - it / self.iterations)  # linear decay, as the paper trains
                idx = torch.randint(0, tokens.shape[0], (self.batch,), generator=gen)
                batch = tokens[idx]
                loss = ctx.lm.model(input_ids=batch, labels=batch, use_cache=False).loss
                if not torch.isfinite(loss):
                    raise BitsmithError("spinquant: the training loss became non-finite; lower lr (e.g. lr: 0.5)")
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.copy_(cayley_step(p, g, lr))
                self.losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}")
        log.info("spinquant: loss %.4f -> %.4f over %d steps", self.losses[0], self.losses[-1], len(self.losses))
        return params[0].detach(), [p.detach() for p in params[1:]]

    def apply_block(self, ctx, block) -> None:
        fold.rotate_block(ctx.lm.adapter, block, self.r1, self.r2[self.blocks[id(block)]])
        install_online_rotations(ctx, block, r3=True, r4=True)
