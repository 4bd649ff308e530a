"""bitsmith: post-training quantization of neural networks, language models first."""

from bitsmith.api import compare, evaluate, info, quantize
from bitsmith.errors import BitsmithError, SpecError
from bitsmith.export import export
from bitsmith.models import load_model
from bitsmith.spec import QuantSpec

__all__ = ["BitsmithError", "QuantSpec", "SpecError", "compare", "evaluate", "export", "info", "load_model", "quantize"]

