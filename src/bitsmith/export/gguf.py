"""GGUF export for llama.cpp (and everything built on it: ollama, llama-cpp-python, LM Studio).

What is written (GGUF v3 through gguf-py's ``GGUFWriter``, spec: github.com/ggml-org/ggml docs/gguf.md):

* the architecture's metadata (``<arch>.*``) and every ``tokenizer.*`` key copied from the GGUF file
  the float model came from (the default model's or any ``.gguf`` source): llama.cpp reads the same
  settings and tokenizes with exactly the vocabulary bitsmith used. Sources without a GGUF tokenizer
  are refused. Tensor names come from the architecture's layout (:mod:`bitsmith.models.gguf_layouts`),
  with its conventions (Gemma's norms stored as ``1 + w``).
* Linear weights that bitsmith quantized on a GGUF grid (``q4_0``, ``q4_k``, ... e.g. by the
  ``gptq-q4_0`` / ``gptq-q4_k`` recipes) are copied as their stored ggml records: not re-quantized,
  so llama.cpp multiplies by exactly the weights bitsmith evaluated. Rotations folded into the weights
  (QuaRot/SpinQuant R1 and R2) need nothing more.
* Float tensors are written by ``qtype`` (``--type``): ``f32``, ``f16`` (default), ``bf16``, a GGUF type
  (quantized here with bitsmith's own quantizer: llama.cpp's reference rule for the legacy types) or a
  llama.cpp-style mixture (:data:`MIXTURES`: ``q4_k_m`` keeps Q6_K for the output and for the attention
  values and FFN down projections of the layers llama.cpp favours). Norms are always F32. A quantized
  model's float tensors (embeddings, lm_head) follow the same choice.
* Rows of q/k (and their biases) are permuted into llama.cpp's interleaved-rotary order (the inverse
  of what :mod:`bitsmith.models.gguf_file` undoes on reading). A permutation of rows moves whole
  blocks, so quantized records stay intact. Tied embeddings write ``token_embd`` only.

Refused, with every offending module named: weights in a non-GGUF format (``int4:g64`` ...), online
transforms (QuaRot/SpinQuant R3/R4 Hadamards, DuQuant rotations, OS+ shifts), activation quantization
and KV-cache quantization: llama.cpp has no such step, so the file would not compute what bitsmith
evaluated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bitsmith.errors import BitsmithError
from bitsmith.export import atomic_path, register_exporter
from bitsmith.formats import gguf_blocks as gb
from bitsmith.formats.registry import number_format
from bitsmith.models.gguf_layouts import layout_for_model_type
from bitsmith.runtime.modules import QuantEmbedding, QuantLinear
from bitsmith.spec import GGUF_TYPES, QuantSpec

FLOAT_TYPES = ("f32", "f16", "bf16")
# llama.cpp's fallback when a K-quant's 256-element super-block does not divide a row (llama-quant.cpp)
K_FALLBACK = {"q4_k": "q5_0", "q6_k": "q8_0"}


@dataclass(frozen=True)
class TensorInfo:
    """What a type chooser sees of one 2-D tensor: GGUF name, block index (or None), block count."""

    name: str
    layer: int | None
    n_layers: int


def _favoured(layer: int, n: int) -> bool:
    """Layers llama.cpp's K_M mixtures give more bits (its ``use_more_bits``): the first and last
    eighth, and every third layer in between."""
    return layer < n // 8 or layer >= 7 * n // 8 or (layer - n // 8) % 3 == 2


def _uniform(base: str) -> Callable[[TensorInfo], str]:
    def choose(t: TensorInfo) -> str:
        if t.name in ("output.weight", "token_embd.weight@tied") and base not in FLOAT_TYPES + ("q8_0", "q6_k"):
            return "q6_k"  # llama.cpp keeps the output matrix at Q6_K in every 2-8 bit mixture
        return base
    return choose


def _q4_k_m(t: TensorInfo) -> str:
    if t.name in ("output.weight", "token_embd.weight@tied"):
        return "q6_k"
    if t.layer is not None and t.name.endswith(("attn_v.weight", "ffn_down.weight")) and _favoured(t.layer, t.n_layers):
        return "q6_k"
    return "q4_k"


# --type values: float types, each GGUF type (uniform, output at Q6_K), and llama.cpp-like mixtures
MIXTURES: dict[str, Callable[[TensorInfo], str]] = {
    **{name: _uniform(name) for name in FLOAT_TYPES + GGUF_TYPES},
    "q4_k_m": _q4_k_m,
}


def _ggml_type(name: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16}.get(name) or gguf.GGMLQuantizationType(gb.TYPES[name].ggml_id)


def _fit(qtype: str, width: int) -> str:
    """``qtype``, or llama.cpp's fallback when its block does not divide ``width``."""
    if qtype in FLOAT_TYPES:
        return qtype
    while width % gb.TYPES[qtype].block:
        if qtype not in K_FALLBACK:
            raise BitsmithError(f"GGUF {qtype} blocks of {gb.TYPES[qtype].block} do not divide a row of {width}; choose --type f16")
        qtype = K_FALLBACK[qtype]
    return qtype


def _float_tensor(w: torch.Tensor, qtype: str) -> tuple[np.ndarray, str]:
    """(array for GGUFWriter, type written) of a float 2-D weight."""
    w = w.detach().float().contiguous()
    qtype = _fit(qtype, w.shape[-1])
    if qtype == "f32":
        return w.numpy(), qtype
    if qtype == "f16":
        return w.to(torch.float16).numpy(), qtype
    if qtype == "bf16":
        return w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(w.shape[0], -1), qtype
    spec = QuantSpec.parse(qtype)
    codes = number_format(spec).quantize(w, spec)
    return number_format(spec).pack(codes, spec, tuple(w.shape))["qblocks"].numpy(), qtype


def _permute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face q/k row order -> llama.cpp's (rotary halves interleaved per head)."""
    rows = a.shape[0]
    return a.reshape(n_head, 2, rows // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _offending(model: torch.nn.Module) -> list[str]:
    """One line per module that computes something llama.cpp cannot: online transforms, activation and KV quantization."""
    lines = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            if m.input_transform is not None:
                lines.append(f"{name}: online {m.input_transform.kind} transform")
            if m.act_spec is not None:
                lines.append(f"{name}: activation quantization ({m.act_spec}{' static' if m.act_static else ''})")
        hook = getattr(m, "bitsmith_kv", None)
        if hook is not None:
            if getattr(hook, "rotate", False):
                lines.append(f"{name}: online Hadamard on queries/keys (R3)")
            if hook.key is not None or hook.value is not None:
                lines.append(f"{name}: KV-cache quantization (key {hook.key}, value {hook.value})")
    return lines


def source_gguf(lm) -> Path:
    """The GGUF file the model's float weights (and tokenizer) came from."""
    from bitsmith.models.load import BUILTIN_GGUF

    src = str(lm.source)
    if src in BUILTIN_GGUF:
        return BUILTIN_GGUF[src]()
    path = Path(src).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return path
    raise BitsmithError(f"GGUF export copies the tokenizer from the source GGUF file, but this model comes from {src!r}; "
                        f"quantize a model loaded from a .gguf file (e.g. 'default')")


@functools.lru_cache(maxsize=2)
def _source_fields(path: str, stamp: tuple[int, int]) -> tuple[tuple, ...]:
    """(key, value, type, element type) of the ``tokenizer.*`` fields and the architecture's own fields
    (``<arch>.*``: sizes, rotary, sliding window) of a GGUF file, parsed once (a 50k-token vocabulary
    takes seconds to read); ``stamp`` (size, mtime) keys the cache."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    out = []
    for key, field in reader.fields.items():
        if key.startswith(("tokenizer.", f"{arch}.")):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            out.append((key, field.contents(), vtype, sub))
    return tuple(out)


def _copy_source_fields(writer, src: Path) -> None:
    """The source's tokenizer and architecture settings: the quantized model has the float model's
    vocabulary and shapes, and llama.cpp reads its settings (head sizes, rotary bases, sliding window)
    exactly as it did from the source."""
    st = src.stat()
    for key, value, vtype, sub in _source_fields(str(src.resolve()), (st.st_size, st.st_mtime_ns)):
        writer.add_key_value(key, value, vtype, sub_type=sub)


def _rope(cfg) -> dict:
    """The rotary settings (transformers keeps them in ``rope_parameters`` or ``rope_scaling``)."""
    return dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})


def _rope_per_layer_type(cfg) -> list[dict]:
    """The rotary settings of each kind of layer (Gemma keeps one dict per layer type, Llama one dict)."""
    rope = _rope(cfg)
    nested = [v for v in rope.values() if isinstance(v, dict)]
    return nested or [rope]


def plan(lm, qtype: str = "f16") -> list[tuple[str, np.ndarray, str]]:
    """Every tensor to write: (GGUF name, array as GGUFWriter takes it, GGUF type name). Raises on what GGUF cannot hold."""
    model, ad = lm.model, lm.adapter
    cfg = model.config
    ad.require("gguf", "GGUF export")
    layout = layout_for_model_type(cfg.model_type)
    if any(r.get("rope_type", "default") != "default" for r in _rope_per_layer_type(cfg)):
        raise BitsmithError(f"GGUF export: rope scaling {_rope(cfg)} is not written yet; export a model without it")
    if getattr(lm, "weights", None) is not None:
        raise BitsmithError("GGUF export needs the whole model in memory; load it without --stream")
    choose = MIXTURES.get(qtype)
    if choose is None:
        raise BitsmithError(f"unknown GGUF --type {qtype!r}; choose one of {', '.join(MIXTURES)}")
    bad = _offending(model)
    if bad:
        raise BitsmithError("llama.cpp cannot run these steps (online transforms, activation or KV quantization), "
                            "so the GGUF file would not compute what bitsmith evaluated: " + "; ".join(bad))
    for name, m in model.named_modules():
        packed = getattr(m, "packed", None)
        if isinstance(m, (QuantLinear, QuantEmbedding)) and packed is not None and packed.spec.format not in GGUF_TYPES:
            raise BitsmithError(f"{name} holds {packed.spec} weights, which GGUF cannot store; quantize on a GGUF grid "
                                f"instead (e.g. --recipe gptq-q4_0 or gptq-q4_k)")
    blocks = ad.blocks()
    heads, kv_heads = ad.num_heads, ad.num_kv_heads
    out: list[tuple[str, np.ndarray, str]] = []

    def weight(module, gname: str, layer: int | None, tied: bool = False) -> None:
        permute = layout.permuted_heads(gname, heads, kv_heads)
        packed = getattr(module, "packed", None)
        if packed is not None:  # quantized by bitsmith on a GGUF grid: the stored records, unchanged
            arr, t = packed.data["qblocks"].numpy(), packed.spec.format
        else:
            key = gname + ("@tied" if tied else "")
            arr, t = _float_tensor(module.weight, choose(TensorInfo(key, layer, len(blocks))))
        if permute is not None:
            arr = _permute_rows(arr, permute)
        out.append((gname, np.ascontiguousarray(arr), t))
        if getattr(module, "bias", None) is not None:
            vector(module.bias, gname.rpartition(".")[0] + ".bias", permute)

    def vector(t: torch.Tensor, gname: str, permute: int | None = None) -> None:
        arr = t.detach().float().numpy()
        if layout.is_norm(gname):
            arr = arr + np.float32(layout.norm_offset)
        out.append((gname, np.ascontiguousarray(_permute_rows(arr, permute) if permute else arr), "f32"))

    def tensor(root: torch.nn.Module, path: str, gname: str, layer: int | None) -> None:
        module = root.get_submodule(path)
        if layout.is_norm(gname):
            vector(module.weight, gname)
        else:
            weight(module, gname, layer)

    tied = ad.tied_embeddings()
    weight(ad.embeddings(), "token_embd.weight", None, tied=tied)
    for i, block in enumerate(blocks):
        for name, path in layout.block.items():
            tensor(block, path, f"blk.{i}.{name}.weight", i)
    vector(ad.final_norm().weight, "output_norm.weight")
    if not tied:
        weight(ad.lm_head(), "output.weight", None)
    return out


@register_exporter("gguf")
def export_gguf(lm, out: Path, qtype: str | None = None, **_ignored) -> Path:
    """Write ``lm`` to ``out`` as a GGUF file llama.cpp loads (see the module docstring)."""
    import gguf

    return write(lm, out, plan(lm, qtype or "f16"))


def write(lm, out: Path, tensors: list[tuple[str, np.ndarray, str]]) -> Path:
    """Write the tensors of :func:`plan` with ``lm``'s metadata and its source's tokenizer to ``out``, atomically."""
    import gguf

    src = source_gguf(lm)
    with atomic_path(Path(out)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), layout_for_model_type(lm.model.config.model_type).arch)
        writer.add_name(src.stem)
        writer.add_quantization_version(2)
        _copy_source_fields(writer, src)
        for name, arr, t in tensors:
            if t in ("f32", "f16"):
                writer.add_tensor(name, arr)
            else:
                writer.add_tensor(name, arr, raw_dtype=_ggml_type(t))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(out)
