"""Bits per weight and model size, counted from what is actually stored."""

from __future__ import annotations

from bitsmith.models import LoadedModel
from bitsmith.runtime.modules import QuantLinear


def weight_bits(module) -> tuple[int, int]:
    """(stored bits, element count) of a linear layer's weight."""
    numel = module.weight.numel()
    packed = getattr(module, "packed", None)
    if isinstance(module, QuantLinear) and packed is not None:
        return packed.nbits(), numel
    return numel * module.weight.element_size() * 8, numel


def size_stats(lm: LoadedModel) -> dict:
    """``bpw``: bits per weight over the decoder blocks' linear layers (everything stored: codes, scales,
    zero points, MX shared exponents, BitMoD datatype ids; float weights count 32), the usual basis of
    PTQ papers. ``size_mb``: all persistent
    tensors of the model, tied weights once: what ``model.safetensors`` holds."""
    bits = numel = 0
    for _, linear in lm.adapter.named_block_linears():
        b, n = weight_bits(linear)
        bits, numel = bits + b, numel + n
    seen, nbytes = set(), 0
    for t in lm.model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            nbytes += t.numel() * t.element_size()
    return {"bpw": bits / numel, "size_mb": nbytes / 2**20}
