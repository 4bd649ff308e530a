"""compressed-tensors export: the checkpoint format vLLM (and transformers) load for quantized models.

A Hugging Face folder (``config.json`` with a ``quantization_config``, safetensors, tokenizer) whose
quantized linears store, per the compressed-tensors conventions (library ``compressed-tensors``, the
format of llm-compressor):

* ``pack-quantized`` (integer weights of 1-8 bits, per channel or per group, symmetric or asymmetric):
  ``weight_packed`` int32, the codes ``q + 2**(b-1)`` of each row as one little-endian bit stream (code
  ``i`` at bit ``i*b``; every row padded to a multiple of 32 codes, then cut to ``ceil(in*b/32)`` words);
  ``weight_scale`` ``(out, groups)``; ``weight_shape``; asymmetric: ``weight_zero_point`` (signed, packed
  the same way along the *output* dimension). Dequantization is ``(q - zp) * scale``.
* ``int-quantized`` (8-bit weights, e.g. W8A8): ``weight`` int8, ``weight_scale``, the input activations'
  scheme (dynamic per token, symmetric or asymmetric) in the config.

Our unsigned codes ``u`` with zero point ``z`` (:mod:`bitsmith.formats.integer`) are exactly the stored
``q + 2**(b-1)``, and ``(u - z) = (q - zp)``, so bitsmith's weights are stored as chosen: the
compressed-tensors library decompresses them to bitsmith's dequantized weights, bit for bit (tested).
Scales are written in float32 (their values are fp16-exact) so that holds in any runtime dtype.
What the format cannot express (non-integer weight formats, per-IC groups, online transforms, static or
CrossQuant activations, KV-cache quantization, quantized embeddings) is refused, naming the modules.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from bitsmith.errors import BitsmithError
from bitsmith.export import atomic_path, register_exporter
from bitsmith.formats import packing
from bitsmith.formats.registry import number_format
from bitsmith.models import LoadedModel
from bitsmith.runtime.modules import QuantEmbedding, QuantLinear
from bitsmith.spec import QuantSpec

CT_VERSION = "0.20.0"  # the compressed-tensors release whose conventions this writes


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``(rows, ceil(cols*bits/32))``: each row of unsigned ``codes`` as a little-endian bit stream."""
    rows, cols = codes.shape
    padded = -(-cols // 32) * 32
    full = torch.zeros(rows, padded, dtype=torch.uint8)
    full[:, :cols] = codes
    stream = packing.pack(full, bits)  # whole rows: padded * bits bits, a multiple of 32
    words = stream.view(torch.int32) if _little_endian() else stream.view(-1, 4).flip(-1).contiguous().view(torch.int32)
    return words.reshape(rows, padded * bits // 32)[:, : math.ceil(cols * bits / 32)].contiguous()


def _little_endian() -> bool:
    import sys

    return sys.byteorder == "little"


def _weight_args(spec: QuantSpec) -> dict:
    strategy = "group" if spec.granularity == "group" else "channel"
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, "strategy": strategy,
            "group_size": spec.group_size if strategy == "group" else None, "dynamic": False,
            "actorder": None, "observer": "minmax"}


def _input_args(spec: QuantSpec) -> dict:
    return {"num_bits": 8, "type": "int", "symmetric": spec.symmetric, "strategy": "token", "group_size": None,
            "dynamic": True, "actorder": None, "observer": None}


def _problems(name: str, m: QuantLinear) -> list[str]:
    """Why ``m`` cannot be written as compressed-tensors (empty when it can)."""
    out = []
    w, a = (m.packed.spec if m.packed is not None else None), m.act_spec
    if w is not None and (w.format != "int" or w.granularity not in ("channel", "group")):
        out.append(f"{name}: weight spec {w} (integer weights per channel or per group only)")
    if m.input_transform is not None:
        out.append(f"{name}: online {m.input_transform.kind} transform of the input")
    if a is not None:
        if m.act_static or m.act_cross is not None:
            out.append(f"{name}: {'static' if m.act_static else 'CrossQuant'} input quantization")
        elif not (a.format == "int" and a.bits == 8 and a.granularity == "token" and a.group_size is None):
            out.append(f"{name}: input spec {a} (dynamic int8 per token only)")
        elif w is None:
            out.append(f"{name}: quantized input with a float weight")
    return out


def _tensors(name: str, m: QuantLinear, fmt_name: str) -> dict[str, torch.Tensor]:
    spec, shape = m.packed.spec, m.packed.shape
    codes = number_format(spec).unpack(m.packed.data, spec, shape)
    u = codes.codes.reshape(shape[0], -1).to(torch.int16)  # unsigned codes, (out, in)
    scale = codes.scale.reshape(shape[0], -1).float()
    half = 1 << (spec.bits - 1)
    t = {f"{name}.weight_scale": scale}
    if fmt_name == "int-quantized":
        t[f"{name}.weight"] = (u - half).to(torch.int8)
    else:
        t[f"{name}.weight_packed"] = pack_rows(u.to(torch.uint8), spec.bits)
        t[f"{name}.weight_shape"] = torch.tensor(shape, dtype=torch.int64)
    if not spec.symmetric:
        z = codes.zero.reshape(shape[0], -1)
        t[f"{name}.weight_zero_point"] = (
            (z.to(torch.int16) - half).to(torch.int8) if fmt_name == "int-quantized"
            else pack_rows(z.T.contiguous(), spec.bits).T.contiguous())  # packed along the output dimension
    if m.bias is not None:
        t[f"{name}.bias"] = m.bias.detach().float()
    return t


def _format_name(weights: dict) -> str:
    return "int-quantized" if weights["num_bits"] == 8 else "pack-quantized"


def quantization_config(groups: dict[str, tuple[dict, dict | None, list[str]]], ignore: list[str]) -> dict:
    """The ``quantization_config`` of ``config.json``: one config group per (weight args, input args)."""
    config_groups, formats = {}, set()
    for i, (w, a, names) in enumerate(sorted(groups.values(), key=lambda g: g[2][0])):
        formats.add(_format_name(w))
        config_groups[f"group_{i}"] = {"targets": sorted(names), "weights": w, "input_activations": a,
                                       "output_activations": None, "format": _format_name(w)}
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": sorted(ignore),
            "kv_cache_scheme": None, "global_compression_ratio": None, "version": CT_VERSION}


@register_exporter("compressed-tensors")
def export_compressed_tensors(lm: LoadedModel, out: Path, qtype: str | None = None) -> Path:
    """Write ``lm`` (quantized by bitsmith) as a compressed-tensors folder at ``out``."""
    from safetensors.torch import save_file

    if qtype is not None:
        raise BitsmithError("--type is for gguf; compressed-tensors stores the model's own specs (quantize with a recipe first)")
    if not lm.is_quantized:
        raise BitsmithError("compressed-tensors export needs a quantized model: run 'bitsmith quantize' and export its folder")
    if lm.quant.get("kv"):
        raise BitsmithError(f"compressed-tensors export: KV-cache quantization ({len(lm.quant['kv'])} attention modules) "
                            "is not expressible; use a recipe without kv_quant")
    model = lm.model
    problems, groups, ignore, tensors = [], {}, [], {}
    for name, m in model.named_modules():
        if isinstance(m, QuantEmbedding):
            problems.append(f"{name}: quantized embedding table")
        elif isinstance(m, QuantLinear) and m.packed is not None:
            issues = _problems(name, m)
            problems += issues
            if not issues:
                w, a = _weight_args(m.packed.spec), None if m.act_spec is None else _input_args(m.act_spec)
                groups.setdefault(json.dumps([w, a]), (w, a, []))[2].append(name)
        elif isinstance(m, (QuantLinear, torch.nn.Linear)):
            problems += _problems(name, m) if isinstance(m, QuantLinear) else []
            ignore.append(name)
    if problems:
        raise BitsmithError("compressed-tensors cannot express: " + "; ".join(problems[:6])
                            + (f"; and {len(problems) - 6} more" if len(problems) > 6 else ""))
    if not groups:
        raise BitsmithError("compressed-tensors export: no linear of this model has a quantized weight")
    done = set()
    for w, _, names in groups.values():
        for name in names:
            tensors.update(_tensors(name, model.get_submodule(name), _format_name(w)))
            done.add(name)
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in done or (key == "lm_head.weight" and lm.adapter.tied_embeddings()):
            continue
        if any(key.endswith(s) for s in ("act_scale", "act_zero")):
            continue
        tensors[key] = value.detach().float().contiguous()
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(groups, ignore)
    config["torch_dtype"] = config["dtype"] = "float32"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        lm.tokenizer.save_pretrained(str(tmp))
    return out
