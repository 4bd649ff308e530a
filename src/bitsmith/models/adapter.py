"""Architecture adapters: the one place that knows where a model keeps its parts.

Everything above this layer asks the adapter for "the blocks", "the q/k/v projections of block i",
"the final norm", never ``model.model.layers[i].self_attn`` directly. Adding an architecture is one
small subclass registered by the Hugging Face ``model_type`` values it covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from bitsmith.errors import BitsmithError

_ADAPTERS: dict[str, type["Adapter"]] = {}


@dataclass(frozen=True)
class Sublayer:
    """One residual branch of a pre-norm block: ``h = h + body(norm(h))``.

    ``inputs`` are the roles of the linears that read ``norm(h)``; ``output`` is the role of the
    linear that closes the branch (its input is the body's inner activation). The calibration
    pipeline runs a block branch by branch so every linear is solved on inputs produced by the
    already-quantized linears before it, with each matrix product computed once.
    """

    norm: nn.Module
    body: nn.Module
    inputs: tuple[str, ...]
    output: str
    takes_block_kwargs: bool  # attention needs position embeddings and the mask; the MLP does not


class Adapter:
    """Names the parts of a decoder-only transformer."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # Linear layers of a block, by role; values are attribute paths inside the block.
    linear_paths: ClassVar[dict[str, str]] = {}

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


def adapter_for(model: nn.Module) -> Adapter:
    return check_supported(getattr(model.config, "model_type", "?"))(model)
