"""Architecture adapters: the one place that knows where a model keeps its parts.

Everything above this layer asks the adapter for "the blocks", "the residual branches of block i",
"the final norm", never ``model.model.layers[i].self_attn`` directly, and never by a role name:
an adapter declares its architecture as data (:class:`Sublayer`: which linears read a branch's
input, which closes it, which produces the closing linear's input channels and how, the norms
around it; the norm kind; the task), and methods ask for those properties. A method that needs a
property an adapter does not declare refuses in one line (:meth:`Adapter.require`). Adding an
architecture is one small subclass registered by the Hugging Face ``model_type`` values it covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from bitsmith.errors import BitsmithError

_ADAPTERS: dict[str, type["Adapter"]] = {}


# How a branch's producing linear (``Sublayer.feeder``) reaches its closing linear, channel by channel.
HEADS = "heads"  # attention: per head, a convex combination over tokens (softmax rows sum to one)
PRODUCT = "product"  # gated MLP: multiplied elementwise by another linear's activated output


@dataclass(frozen=True)
class Sublayer:
    """One residual branch of a pre-norm block: ``h = h + post_norm(body(norm(h)))``.

    ``inputs`` are the roles of the linears that read ``norm(h)``; ``output`` is the role of the
    linear that closes the branch (its input is the body's inner activation). ``feeder`` is the
    linear whose output channels become ``output``'s input channels one to one, through ``mixing``
    (:data:`HEADS`: a per-channel scale and shift pass through; :data:`PRODUCT`: a scale passes, a
    shift does not). ``post_norm`` (Gemma) normalises the branch output before the residual add, so
    a rotation of the residual stream cannot pass through it. The calibration pipeline runs a block
    branch by branch so every linear is solved on inputs produced by the already-quantized linears
    before it, with each matrix product computed once.
    """

    norm: nn.Module
    body: nn.Module
    inputs: tuple[str, ...]
    output: str
    takes_block_kwargs: bool  # attention needs position embeddings and the mask; the MLP does not
    feeder: str | None = None
    mixing: str | None = None  # HEADS or PRODUCT, with feeder
    post_norm: nn.Module | None = None


# Norm classes whose gain is ``1 + weight`` (registered by the adapters that use them).
_OFFSET_NORMS: set[type] = set()


def register_offset_norm(cls: type) -> type:
    """Declare that ``cls`` scales by ``1 + weight`` (Gemma's RMSNorm), so folds see its true gain."""
    _OFFSET_NORMS.add(cls)
    return cls


def norm_gain(norm: nn.Module) -> torch.Tensor:
    """The per-channel factor a norm multiplies its normalised input by."""
    w = norm.weight.detach()
    return w + 1.0 if type(norm) in _OFFSET_NORMS else w


def set_norm_gain(norm: nn.Module, gain: torch.Tensor) -> None:
    """Give ``norm`` the per-channel factor ``gain`` (stored as ``gain - 1`` for offset norms)."""
    old = norm.weight
    value = (gain - 1.0 if type(norm) in _OFFSET_NORMS else gain).to(old.dtype)
    norm.weight = nn.Parameter(value, requires_grad=False) if isinstance(old, nn.Parameter) else value


class Adapter:
    """Names the parts of a transformer and declares the properties methods may rely on."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # Linear layers of a block, by role; values are attribute paths inside the block.
    linear_paths: ClassVar[dict[str, str]] = {}
    task: ClassVar[str] = "causal-lm"
    auto_class: ClassVar[str] = "AutoModelForCausalLM"  # the transformers class that builds it from a config
    # Properties a method may require (see :meth:`require`): "rotatable" (the residual stream can be
    # rotated: no norm between a closing linear and the residual add), "gguf" (llama.cpp runs it).
    provides: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # -- parts ----------------------------------------------------------------------------------
    def embeddings(self) -> nn.Module:
        raise NotImplementedError

    def set_embeddings(self, module: nn.Module) -> None:
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def set_lm_head(self, module: nn.Module) -> None:
        self.model.lm_head = module

    def attention(self, block: nn.Module) -> nn.Module:
        raise NotImplementedError

    def block_linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """The block's linear layers by role (q, k, v, o, gate, up, down)."""
        return {role: _get(block, path) for role, path in self.linear_paths.items()}

    def sublayers(self, block: nn.Module) -> list[Sublayer]:
        """The block's residual branches in order; together they equal ``block(h)`` exactly."""
        raise NotImplementedError

    def set_block_linear(self, block: nn.Module, role: str, module: nn.Module) -> None:
        parent_path, _, attr = self.linear_paths[role].rpartition(".")
        setattr(_get(block, parent_path) if parent_path else block, attr, module)

    def named_block_linears(self) -> list[tuple[str, nn.Module]]:
        """All block linears with their full module names (as in ``model.named_modules()``)."""
        names = {id(m): n for n, m in self.model.named_modules()}
        return [(names[id(m)], m) for b in self.blocks() for m in self.block_linears(b).values()]

    def tied_embeddings(self) -> bool:
        return self.lm_head().weight is self.embeddings().weight

    def block_kind(self, block: nn.Module) -> str:
        """Blocks of one kind take the same keyword arguments from the model (mask, rotary table)."""
        return ""

    def embed_batch(self, batch: torch.Tensor) -> None:
        """Run the model on a calibration batch (how a batch enters block 0); the pipeline stops it there."""
        self.model(input_ids=batch, use_cache=False)

    def branch_of(self, block: nn.Module, roles: tuple[str, ...]) -> tuple[Sublayer, bool] | None:
        """The branch whose input group (``True``) or closing linear (``False``) is ``roles``."""
        for sub in self.sublayers(block):
            if tuple(roles) == tuple(sub.inputs):
                return sub, True
            if tuple(roles) == (sub.output,):
                return sub, False
        return None

    def branch(self, block: nn.Module, mixing: str) -> Sublayer | None:
        """The block's first branch whose feeder reaches its closing linear through ``mixing``."""
        return next((s for s in self.sublayers(block) if s.mixing == mixing), None)

    def require(self, prop: str, who: str) -> None:
        """Refuse in one line when ``who`` needs a property this architecture does not declare."""
        if prop not in self.provides:
            raise BitsmithError(f"{who} needs a model that is {_PROPERTY_TEXT.get(prop, prop)}; "
                                f"{type(self).__name__} ({', '.join(self.model_types)}) does not declare it")

    # -- facts ----------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads


_PROPERTY_TEXT = {
    "rotatable": "'rotatable' (no norm between a branch's closing linear and the residual add)",
    "gguf": "'gguf' (an architecture llama.cpp runs, with a tensor-name table)",
}


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split(".") if path else []:
        root = getattr(root, part)
    return root


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    for t in cls.model_types:
        _ADAPTERS[t] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def check_supported(model_type: str) -> type[Adapter]:
    """The adapter class for ``model_type``, or a clear error listing what is supported."""
    try:
        return _ADAPTERS[model_type]
    except KeyError:
        raise BitsmithError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(supported_model_types())} "
            "(adding one is a small adapter in bitsmith/models/)"
        ) from None


def model_from_config(config, device: str | None = None) -> nn.Module:
    """An fp32 model of the architecture ``config`` names, built by its adapter's transformers auto class."""
    import transformers

    auto = getattr(transformers, check_supported(getattr(config, "model_type", "?")).auto_class)
    if device is None:
        return auto.from_config(config, dtype=torch.float32)
    with torch.device(device):
        return auto.from_config(config, dtype=torch.float32)


def adapter_for(model: nn.Module) -> Adapter:
    return check_supported(getattr(model.config, "model_type", "?"))(model)
