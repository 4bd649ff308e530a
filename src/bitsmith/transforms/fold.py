"""Computational invariance: rewriting a float model so that it computes the same function in a rotated basis.

Used by QuaRot (arXiv 2404.00456) and SpinQuant (arXiv 2405.16406). With row vectors, rotating the
residual stream by an orthogonal ``Q`` (``h -> h Q``) leaves the network unchanged when

* RMSNorm scales are first folded into the linears that read the norm (then ``rms(hQ) = rms(h)``),
* every linear reading the stream gets ``W -> W Q`` and every linear writing to it ``W -> Q^T W``
  (bias ``b -> b Q``), and the embedding table ``E -> E Q``;
* a per-head rotation ``P`` of the values (``W_v -> P^T W_v`` per head) is undone by ``o_proj``
  (``W_o -> W_o P`` per head): attention mixes values across tokens, never across head dimensions;
* an online rotation of a linear's input ``x -> x H^T`` is undone by ``W -> W H^T``.

All products are taken in float64 so the rotated float model matches the original to ~1e-6.
"""

from __future__ import annotations

import torch
from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.models.adapter import HEADS, Adapter, norm_gain, set_norm_gain


def _weight(linear: nn.Module, what: str) -> torch.Tensor:
    if getattr(linear, "packed", None) is not None:
        raise BitsmithError(f"cannot {what} a weight that is already quantized; put the rotation step first in the recipe")
    return linear.weight


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    new = value.to(old.dtype)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=False))
    else:
        setattr(module, name, new)


def fuse_norm(norm: nn.Module, linears: list[nn.Module]) -> None:
    """Fold an RMSNorm's gain into the linears reading it; the norm's gain becomes ones."""
    if getattr(norm, "bias", None) is not None:
        raise BitsmithError(f"{type(norm).__name__} has a bias; rotation folding supports RMSNorm-style norms only")
    g = norm_gain(norm).double()
    for linear in linears:
        _assign(linear, "weight", _weight(linear, "fold a norm into").double() * g)
    set_norm_gain(norm, torch.ones_like(g))


# How a rotation of the residual stream reaches each block linear (see :func:`rotation_kinds`).
READS = "reads"  # reads the stream: W -> W Q
FEEDS_HEADS = "feeds-heads"  # reads the stream, writes per-head values: also rotated per head by P
CLOSES_HEADS = "closes-heads"  # writes the stream from per-head values: per head by P, then Q
CLOSES = "closes"  # writes the stream from a branch's inner activation (the online R4 goes here)


def rotation_kinds(adapter: Adapter, block: nn.Module) -> dict[str, str]:
    """Each block linear's place with respect to the residual stream, from the adapter's branches."""
    adapter.require("rotatable", "rotating the residual stream")
    kinds = {}
    for sub in adapter.sublayers(block):
        kinds.update({r: READS for r in sub.inputs})
        kinds[sub.output] = CLOSES_HEADS if sub.mixing == HEADS else CLOSES
        if sub.mixing == HEADS:
            kinds[sub.feeder] = FEEDS_HEADS
    return kinds


def rotate_input(linear: nn.Module, q: torch.Tensor) -> None:
    """The linear reads ``x Q`` instead of ``x``: ``W -> W Q``."""
    _assign(linear, "weight", _weight(linear, "rotate").double() @ q.double())


def rotate_output(linear: nn.Module, q: torch.Tensor) -> None:
    """The linear writes ``y Q`` instead of ``y``: ``W -> Q^T W``, ``b -> b Q``."""
    _assign(linear, "weight", q.double().T @ _weight(linear, "rotate").double())
    if getattr(linear, "bias", None) is not None:
        _assign(linear, "bias", linear.bias.double() @ q.double())


def rotate_head_outputs(linear: nn.Module, p: torch.Tensor, head_dim: int) -> None:
    """Each head's slice of the output is rotated by ``P``: per head ``W_h -> P^T W_h``, ``b_h -> b_h P``."""
    w = _weight(linear, "rotate").double()
    heads = w.shape[0] // head_dim
    w = torch.einsum("dk,hdi->hki", p.double(), w.reshape(heads, head_dim, -1)).reshape(w.shape)
    _assign(linear, "weight", w)
    if getattr(linear, "bias", None) is not None:
        _assign(linear, "bias", (linear.bias.double().reshape(heads, head_dim) @ p.double()).reshape(-1))


def rotate_head_inputs(linear: nn.Module, p: torch.Tensor, head_dim: int) -> None:
    """Each head's slice of the input arrives rotated by ``P``: per head ``W_h -> W_h P``."""
    w = _weight(linear, "rotate").double()
    heads = w.shape[1] // head_dim
    w = torch.einsum("ohd,dk->ohk", w.reshape(w.shape[0], heads, head_dim), p.double()).reshape(w.shape)
    _assign(linear, "weight", w)


def untie(adapter: Adapter) -> None:
    """Give the lm_head its own copy of a tied embedding table (the two get different rotations)."""
    if adapter.tied_embeddings():
        head = adapter.lm_head()
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        adapter.config.tie_word_embeddings = False


def fuse_norms_outside(adapter: Adapter) -> None:
    """Untie the lm_head and fold the final norm's scale into it."""
    untie(adapter)
    fuse_norm(adapter.final_norm(), [adapter.lm_head()])


def fuse_norms_block(adapter: Adapter, block: nn.Module) -> None:
    """Fold each branch norm's scale into the linears reading it (idempotent: the scales become ones)."""
    linears = adapter.block_linears(block)
    for sub in adapter.sublayers(block):
        fuse_norm(sub.norm, [linears[r] for r in sub.inputs])


def rotate_outside_blocks(adapter: Adapter, q: torch.Tensor) -> None:
    """Embeddings and lm_head for a residual stream rotated by ``Q`` (norms fused first)."""
    adapter.require("rotatable", "rotating the residual stream")
    fuse_norms_outside(adapter)
    rotate_input(adapter.lm_head(), q)
    emb = adapter.embeddings()
    if getattr(emb, "packed", None) is not None:
        raise BitsmithError("cannot rotate a quantized embedding table; put the rotation step first in the recipe")
    _assign(emb, "weight", emb.weight.detach().double() @ q.double())


def rotate_block(adapter: Adapter, block: nn.Module, q: torch.Tensor, p: torch.Tensor | None = None) -> None:
    """One block for a residual stream rotated by ``Q``; values/o_proj per head by ``P`` when given."""
    adapter.require("rotatable", "rotating the residual stream")
    fuse_norms_block(adapter, block)
    linears = adapter.block_linears(block)
    for sub in adapter.sublayers(block):
        for role in sub.inputs:
            rotate_input(linears[role], q)
        rotate_output(linears[sub.output], q)
    if p is not None:
        heads = adapter.branch(block, HEADS)
        if heads is None:
            raise BitsmithError("a per-head rotation needs an attention branch; this architecture declares none")
        rotate_head_outputs(linears[heads.feeder], p, adapter.head_dim)
        rotate_head_inputs(linears[heads.output], p, adapter.head_dim)
