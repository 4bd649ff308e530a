"""Fold inference-mode BatchNorm into the convolution that feeds it.

In eval mode ``BN(conv(x)) = s * (W x + b - mean) + beta`` with ``s = gamma / sqrt(var + eps)``, which
is the convolution with weight ``s * W`` (per output channel) and bias ``s * (b - mean) + beta``.
Folding first is what lets a quantizer see the weights the network really multiplies by: a
per-channel BN scale would otherwise be applied after quantization, outside the weight's grid.

Which conv feeds which BN is read from the data flow, not from module order: :func:`conv_bn_pairs`
traces the model with ``torch.fx``, treating every module without children as an opaque leaf (so
leaf modules with data-dependent Python, e.g. a padding computed from the input size, never get
traced into), and keeps each BatchNorm2d whose input is the output of a Conv2d that nothing else
reads. Module order alone would be wrong in general (a BN registered after a conv need not read it;
a conv output may also feed a residual branch), and is not even available for nets whose blocks are
plain attributes rather than ``nn.Sequential`` (the ``efficientnet_pytorch`` layout). Models that
fx cannot trace pass their pairs to :func:`fold_batchnorms` explicitly.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import fx, nn

from bitsmith.errors import BitsmithError


class _LeafTracer(fx.Tracer):
    """Traces containers only: every module without children is recorded as one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return len(m._modules) == 0 or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return _LeafTracer().trace(model)
    except Exception as e:  # noqa: BLE001  (any tracing failure means: declare the pairs)
        raise BitsmithError(f"cannot trace {type(model).__name__} to find conv/BatchNorm pairs "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            "pass pairs=[(conv_name, bn_name), ...] to fold_batchnorms") from None


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, bn name)`` for every BatchNorm2d reading a Conv2d's output that nothing else reads.

    A module called more than once (shared weights) is never paired: folding would change its other uses.
    """
    graph = _trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                and isinstance(model.get_submodule(src.target), nn.Conv2d)
                and calls[src.target] == 1 and calls[node.target] == 1):
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Rewrite ``conv`` in place to compute ``bn(conv(x))`` (eval-mode BN), in float64."""
    if not bn.track_running_stats or bn.running_mean is None:
        raise BitsmithError("cannot fold a BatchNorm2d without running statistics (it normalizes by batch statistics)")
    if getattr(conv, "packed", None) is not None:
        raise BitsmithError("cannot fold BatchNorm into a convolution that is already quantized; fold first")
    w = conv.weight.double()
    s = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.double()
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(s)
    b = (b - bn.running_mean.double()) * s
    if bn.bias is not None:
        b = b + bn.bias.double()
    conv.weight.copy_((w * s.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    bias = b.to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(bias)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def fold_batchnorms(model: nn.Module, pairs: Iterable[tuple[str, str]] | None = None) -> int:
    """Fold each BatchNorm2d into the Conv2d feeding it and replace it by ``nn.Identity``; returns how many.

    ``pairs`` defaults to :func:`conv_bn_pairs`. The model must be in eval mode: folding uses the running
    statistics, which is what the model computes only when not training.
    """
    if model.training:
        raise BitsmithError("fold_batchnorms needs model.eval(): in training mode BatchNorm uses batch statistics")
    pairs = conv_bn_pairs(model) if pairs is None else list(pairs)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise BitsmithError(f"({conv_name}, {bn_name}) is not a (Conv2d, BatchNorm2d) pair "
                                f"but ({type(conv).__name__}, {type(bn).__name__})")
        if bn.num_features != conv.out_channels:
            raise BitsmithError(f"{bn_name} normalizes {bn.num_features} channels but {conv_name} has {conv.out_channels}")
        fold_into_conv(conv, bn)
        _replace(model, bn_name, nn.Identity())
    return len(pairs)
