"""Save and load quantized models as a folder of safetensors plus JSON/YAML.

Folder layout::

    model.safetensors   packed integer codes, fp16 scales, packed zero points, float tensors
    model-blockNNNNN.safetensors  one shard per block when the model was streamed (``--stream``)
    bitsmith.json       format version, float source, recipe name, per-module quantization specs
    recipe.yaml         the recipe that produced it
    config.json, tokenizer files  (Hugging Face), so the architecture can be rebuilt offline

The folder is written under a temporary name and renamed into place at the end, so a failure never
leaves a half-written output. Loading reads only safetensors, JSON and YAML (no pickle).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.models import LoadedModel, adapter_for
from bitsmith.models.lazy import module_prefix
from bitsmith.models.load import build_model
from bitsmith.runtime import kvcache
from bitsmith.runtime.kernels import accelerate
from bitsmith.runtime.modules import QuantEmbedding, QuantLinear
from bitsmith.runtime.online import build_transform
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import QuantSpec

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


def describe_modules(module: nn.Module, prefix: str = "") -> tuple[dict, dict]:
    """Per-module quantization metadata: (modules, kv) as stored in bitsmith.json."""
    modules, kv = {}, {}
    for name, m in module.named_modules(prefix=prefix):
        if isinstance(m, QuantLinear):
            modules[name] = {
                "kind": "linear",
                "weight": None if m.packed is None else m.packed.spec.to_dict(),
                "shape": list(m.weight.shape),
                "bias": m.bias is not None,
                "input": None if m.act_spec is None else m.act_spec.to_dict(),
                "input_static": m.act_static,  # calibrated per-tensor grid in buffers act_scale/act_zero
                "input_cross": m.act_cross,  # CrossQuant alpha, or None
                "transform": None if m.input_transform is None else m.input_transform.describe(),
            }
        elif isinstance(m, QuantEmbedding):
            modules[name] = {"kind": "embedding", "weight": m.packed.spec.to_dict(), "shape": list(m.weight.shape),
                             "padding_idx": m.padding_idx}
        hook = getattr(m, "bitsmith_kv", None)
        if hook is not None:
            kv[name] = hook.describe()
    return modules, kv


class CheckpointWriter:
    """Writes a quantized folder under a temporary name; ``commit`` renames it into place.

    Blocks may be written one at a time as the pipeline finishes them (``write_block``, one
    safetensors shard each), so a streamed model never has to be whole in memory; ``commit`` writes
    whatever was not written yet into ``model.safetensors``. Use as a context manager: leaving it
    with an error removes the temporary folder, so nothing half-written is ever left at ``out``.
    """

    def __init__(self, out: str | Path, force: bool = False) -> None:
        self.out = Path(out).expanduser()
        if self.out.exists() and not force:
            raise BitsmithError(f"output folder {self.out} already exists; choose another --out or pass --force")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.modules: dict = {}
        self.kv: dict = {}
        self.written: set[str] = set()
        self.shards = 0

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write_block(self, model: nn.Module, block: nn.Module) -> None:
        from safetensors.torch import save_file

        prefix = module_prefix(model, block)
        modules, kv = describe_modules(block, prefix)
        self.modules.update(modules)
        self.kv.update(kv)
        state = {f"{prefix}.{k}": v.contiguous() for k, v in block.state_dict().items()}
        save_file(state, str(self.tmp / f"model-block{self.shards:05d}.safetensors"), metadata={"format": "bitsmith"})
        self.shards += 1
        self.written.update(state)

    def commit(self, lm: LoadedModel, recipe_yaml: str) -> Path:
        from safetensors.torch import save_file

        model = lm.model
        modules, kv = describe_modules(model)  # blocks written earlier were described (and released) then
        self.modules = {**modules, **self.modules}
        self.kv = {**kv, **self.kv}
        state = {k: v for k, v in model.state_dict().items() if k not in self.written}
        if lm.adapter.tied_embeddings():
            state.pop("lm_head.weight", None)  # stored once, re-tied on load
        meta_tensors = [k for k, v in state.items() if v.is_meta]
        if meta_tensors:
            raise BitsmithError(f"internal error: {meta_tensors[0]} was released before it was written")
        save_file({k: v.contiguous() for k, v in state.items()}, str(self.tmp / WEIGHTS), metadata={"format": "bitsmith"})
        model.config.to_json_file(str(self.tmp / "config.json"))
        lm.tokenizer.save_pretrained(str(self.tmp))
        (self.tmp / "recipe.yaml").write_text(recipe_yaml)
        meta = {"format_version": FORMAT_VERSION, **lm.quant, "modules": self.modules, "kv": self.kv}
        (self.tmp / "bitsmith.json").write_text(json.dumps(meta, indent=1))
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old{os.getpid()}")
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        return self.out


def save_quantized(lm: LoadedModel, out: str | Path, recipe_yaml: str, force: bool = False) -> Path:
    """Write ``lm`` to ``out`` atomically; refuses to overwrite unless ``force``."""
    with CheckpointWriter(out, force) as writer:
        return writer.commit(lm, recipe_yaml)


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "bitsmith.json").read_text())
    except (OSError, ValueError) as e:
        raise BitsmithError(f"{path}/bitsmith.json is unreadable ({e}); re-run bitsmith quantize") from None
    if not isinstance(meta, dict):
        raise BitsmithError(f"{path}/bitsmith.json is unreadable (not a JSON object); re-run bitsmith quantize")
    if meta.get("format_version") != FORMAT_VERSION:
        raise BitsmithError(f"{path} was written by an incompatible bitsmith (format {meta.get('format_version')!r}); re-quantize it")
    return meta


def load_quantized(path: str | Path, kernels: str = "auto") -> LoadedModel:
    """Load a folder written by :func:`save_quantized`.

    With ``kernels="off"`` the logits are bit-identical to the saved model's; the default ``"auto"``
    runs layers on integer CPU kernels where they are faster (:mod:`bitsmith.runtime.kernels`), which
    compute the same function up to float rounding.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    meta = _read_meta(path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        tensors = {}
        for f in [path / WEIGHTS, *sorted(path.glob("model-block*.safetensors"))]:
            tensors.update(load_file(str(f)))
    except (OSError, ValueError, SafetensorError) as e:
        raise BitsmithError(f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0]}); re-run bitsmith quantize") from None

    def take(prefix: str) -> dict[str, torch.Tensor]:
        keys = [k for k in tensors if k.startswith(prefix + ".")]
        return {k[len(prefix) + 1 :]: tensors.pop(k) for k in keys}

    quantized = {}
    try:
        for name, info in meta["modules"].items():
            own = take(name)
            packed = None
            if info["weight"] is not None:
                packed = PackedWeight.from_tensors(QuantSpec.from_dict(info["weight"]), tuple(info["shape"]), own)
            if info["kind"] == "embedding":
                quantized[name] = QuantEmbedding(packed, info.get("padding_idx"))
            else:
                weight = packed if packed is not None else own["weight"]
                act = None if info["input"] is None else QuantSpec.from_dict(info["input"])
                transform = None
                if info.get("transform") is not None:
                    transform = build_transform(info["transform"])
                    transform.load_state_dict(
                        {k[len("input_transform."):]: v for k, v in own.items() if k.startswith("input_transform.")})
                static = bool(info.get("input_static", False))
                quantized[name] = QuantLinear(weight, own.get("bias"), act, transform, act_static=static,
                                              act_cross=info.get("input_cross"))
                if static:
                    quantized[name].set_static_input(own["act_scale"], own.get("act_zero"))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise BitsmithError(f"{path}: quantized tensors do not match bitsmith.json ({type(e).__name__}: {e}); re-run bitsmith quantize") from None

    model = build_model(config, tensors.items(), replaced=quantized)
    for name, module in quantized.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, module)
    adapter = adapter_for(model)
    for name, info in meta.get("kv", {}).items():
        kvcache.install(model, [model.get_submodule(name)], kvcache.KVQuantizer.from_description(info))
    model.eval()
    accelerate(model, kernels)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return LoadedModel(model, tokenizer, meta.get("source", "?"), adapter, quant=meta)

