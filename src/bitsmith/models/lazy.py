"""Streamed models: the architecture without its weights, and weights read one block at a time.

This is what lets the pipeline quantize a model larger than RAM: the skeleton's parameters live on
PyTorch's ``meta`` device (no memory); before block ``i`` is processed its tensors are read from the
checkpoint (safetensors byte ranges, or a memory-mapped GGUF file), and once it is written out they are dropped.
"""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path

import torch
from torch import nn

from bitsmith.errors import BitsmithError


class WeightSource:
    """Random access to a checkpoint's float tensors by Hugging Face name."""

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class SafetensorsSource(WeightSource):
    """Reads one tensor at a time with plain file reads.

    The safetensors layout is an 8-byte header length, a JSON header (dtype, shape and byte range of
    each tensor), then the data. Reading a tensor's byte range directly, instead of memory-mapping
    the whole file, keeps the process's private memory at the size of what it actually holds.
    """

    def __init__(self, files: list[Path]) -> None:
        self._where: dict[str, tuple[Path, int, dict]] = {}
        for f in files:
            try:
                with open(f, "rb") as fh:
                    (size,) = struct.unpack("<Q", fh.read(8))
                    if size > 100 * 2**20:
                        raise ValueError("header larger than 100 MB")
                    header = json.loads(fh.read(size))
                for name, info in header.items():
                    if name != "__metadata__":
                        self._where[name] = (f, 8 + size, info)
            except (OSError, ValueError, struct.error) as e:
                raise BitsmithError(f"{f} is not a readable safetensors file ({e}); re-download or re-save it") from None

    def get(self, name: str) -> torch.Tensor:
        path, base, info = self._where[name]
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise BitsmithError(f"{path}: tensor {name} has dtype {info.get('dtype')}; bitsmith reads float tensors only")
        start, end = info["data_offsets"]
        with open(path, "rb") as fh:
            fh.seek(base + start)
            data = bytearray(fh.read(end - start))
        if len(data) != end - start:
            raise BitsmithError(f"{path} is truncated (tensor {name}); re-download or re-save it")
        return torch.frombuffer(data, dtype=dtype).reshape(info["shape"]).float()


class GGUFSource(WeightSource):
    def __init__(self, gguf_file) -> None:
        self.file = gguf_file
        self._gguf_name = {}
        for name in gguf_file.tensors:
            hf = gguf_file.hf_name(name)
            if hf is not None:
                self._gguf_name[hf] = name

    def get(self, name: str) -> torch.Tensor:
        return self.file.tensor(self._gguf_name[name])


def build_skeleton(config) -> nn.Module:
    """The model for ``config`` with every parameter on the meta device (nothing allocated).

    Buffers computed at construction (the rotary frequency table) cannot live on meta: the modules
    holding them are built again on the CPU, from the config.
    """
    from bitsmith.models.adapter import model_from_config

    model = model_from_config(config, "meta")
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            try:
                rebuilt = type(module)(config=config)
            except TypeError:
                raise BitsmithError(f"{config.model_type}: cannot stream {name} ({type(module).__name__}); quantize without --stream") from None
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, rebuilt)
    model.requires_grad_(False)
    model.eval()
    return model


def module_prefix(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("module is not part of the model")


def _read_parameter(root: nn.Module, name: str, full_name: str, source: WeightSource) -> None:
    """Replace the meta parameter ``name`` of ``root`` by the tensor ``full_name`` of ``source``."""
    owner_path, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    expected = tuple(getattr(owner, attr).shape)
    try:
        t = source.get(full_name)
    except KeyError:
        raise BitsmithError(f"checkpoint has no tensor {full_name!r}; it does not match its config") from None
    if tuple(t.shape) != expected:
        raise BitsmithError(f"checkpoint tensor {full_name!r} has shape {tuple(t.shape)}, the config expects {expected}")
    setattr(owner, attr, nn.Parameter(t, requires_grad=False))


def materialize(model: nn.Module, module: nn.Module, source: WeightSource) -> None:
    """Read ``module``'s parameters from ``source`` (replacing meta tensors)."""
    prefix = module_prefix(model, module)
    for name, param in list(module.named_parameters()):
        if param.is_meta:
            _read_parameter(module, name, f"{prefix}.{name}" if prefix else name, source)


def materialize_outside_blocks(model: nn.Module, blocks: list[nn.Module], source: WeightSource) -> dict[str, tuple[nn.Parameter, int]]:
    """Read every parameter that is not inside a block (embeddings, final norm, lm_head).

    Returns what was read: name -> (parameter, its version counter then), for :func:`park_unchanged`.
    """
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:  # share one meta parameter first, so the loop reads it once, under the embedding's name
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    inside = {id(p) for b in blocks for p in b.parameters()}
    for name, param in list(model.named_parameters()):
        if param.is_meta and id(param) not in inside:
            _read_parameter(model, name, name, source)
    if tied:  # reading replaced the embedding's parameter: tie the head to the real one
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return {name: (p, p._version) for name, p in model.named_parameters() if id(p) not in inside and not p.is_meta}


def _replace_everywhere(model: nn.Module, old: nn.Parameter, new: nn.Parameter) -> int:
    """Put ``new`` wherever ``old`` is a parameter of a module (tied weights have several owners)."""
    n = 0
    for module in model.modules():
        for attr, p in list(module._parameters.items()):
            if p is old:
                module._parameters[attr] = new
                n += 1
    return n


def park_unchanged(model: nn.Module, read: dict[str, tuple[nn.Parameter, int]]) -> dict[str, tuple[nn.Parameter, int]]:
    """Drop the parameters outside the blocks that nothing has changed since they were read.

    The calibration pipeline needs the embeddings only to build block 0's inputs; while the blocks
    are processed, the parameters ``read`` (by :func:`materialize_outside_blocks`) that are still
    in the model as read (same object, no in-place change) go back to the meta device.
    :func:`unpark` reads them again. Returns name -> (the meta parameter standing in, its version).
    """
    parked = {}
    current = dict(model.named_parameters())
    for name, (param, version) in read.items():
        if current.get(name) is param and param._version == version:
            meta = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False)
            _replace_everywhere(model, param, meta)
            parked[name] = (meta, meta._version)
    return parked


def unpark(model: nn.Module, parked: dict[str, tuple[nn.Parameter, int]], source: WeightSource) -> None:
    """Read the parameters :func:`park_unchanged` dropped again, wherever they are used."""
    for name, (meta, version) in parked.items():
        t = source.get(name)
        if meta._version != version or not _replace_everywhere(model, meta, nn.Parameter(t, requires_grad=False)):
            raise BitsmithError(f"internal error: {name} was changed while the blocks were processed, after it was dropped")


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library, loaded once (``trim_heap`` runs after every block); None where it cannot be loaded."""
    try:
        import ctypes
        import ctypes.util

        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def bound_heap_growth() -> None:
    """Stop glibc's heap from growing block after block while streaming.

    glibc serves large allocations with mmap, but after one is freed it raises that threshold, so
    the next ones of that size come from the brk heap, which fragmentation keeps from shrinking:
    the process then grows by a Hessian or a weight copy per block although nothing stays alive.
    A fixed threshold (128 KiB) returns every large buffer to the system when it is freed.
    """
    libc = _libc()
    try:
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except AttributeError:
        pass  # not glibc: its allocator has its own policy


def trim_heap() -> None:
    """Hand the free pages inside glibc's heaps back to the system.

    Small allocations freed in bulk (the GGUF parser's objects, the tokenizer's output for the
    calibration text, a block's Python objects) leave free pages between live ones that glibc
    keeps otherwise; ``malloc_trim`` releases them (tens of MB after loading).
    """
    libc = _libc()
    try:
        libc.malloc_trim(0)
    except AttributeError:
        pass


def release(module: nn.Module) -> None:
    """Drop ``module``'s tensors (parameters, buffers, packed weights) once it is written out."""
    module.to("meta")
    for m in module.modules():
        if getattr(m, "packed", None) is not None:
            m.packed = None
