"""Number formats as pure tensor functions: quantize to codes and scales, dequantize, pack bits.

No ``nn.Module`` lives here; quantized modules in :mod:`bitsmith.runtime` call these functions.
"""
