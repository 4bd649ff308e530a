"""Number formats as pure tensor functions: quantize to codes and scales, dequantize, pack bits.

No ``nn.Module`` lives here; quantized modules in :mod:`bitsmith.runtime` call these functions.
The numerics modules (``integer``, ``minifloat``, ``blocks`` for MX and NF4, ``bitmod``, ``olive``,
``packing``, ``fp6_split``) know nothing of specs; :mod:`bitsmith.formats.registry` maps each
:class:`~bitsmith.spec.QuantSpec` format to them (adapters in ``scaled`` and ``structured``).
"""
