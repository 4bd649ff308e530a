"""Model loading and architecture adapters (importing this registers the built-in adapters)."""

from bitsmith.models import gemma3 as _gemma3  # noqa: F401  (registers the Gemma 3 adapter)
from bitsmith.models import llama as _llama  # noqa: F401  (registers the Llama-family adapter)
from bitsmith.models.adapter import Adapter, adapter_for, check_supported, supported_model_types
from bitsmith.models.load import DEFAULT_MODEL, LoadedModel, load_model

__all__ = ["Adapter", "LoadedModel", "DEFAULT_MODEL", "adapter_for", "check_supported", "load_model", "supported_model_types"]
