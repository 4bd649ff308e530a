"""Number formats by spec name: one object per :class:`~bitsmith.spec.QuantSpec` format.

Callers never branch on ``spec.format``: activation and KV fake quantization, weight storage
(:class:`bitsmith.runtime.qweight.PackedWeight`), exact storage cost (eval's bits per weight) and
GPTQ's column-by-column rounding all ask the format object for ``spec``. Adding a format is one
:class:`NumberFormat` subclass with ``@register_format(name)`` plus a rule in
:data:`bitsmith.spec.FORMAT_RULES`; the numerics stay pure tensor functions in their own modules
(:mod:`~bitsmith.formats.integer`, :mod:`~bitsmith.formats.minifloat`, :mod:`~bitsmith.formats.blocks`,
:mod:`~bitsmith.formats.bitmod`, :mod:`~bitsmith.formats.olive`), which the adapters in
:mod:`~bitsmith.formats.scaled` and :mod:`~bitsmith.formats.structured` call.

Conventions shared by every format:

* A weight is ``(out, in)``; its *grouped view* (:func:`bitsmith.formats.integer.group_view`) puts
  the elements that share one scale in the last dimension.
* ``quantize`` gives *codes*: a small dataclass of unpacked tensors whose leading dimension is the
  weight's rows (so GPTQ can split the rows of q/k/v solved together, see :func:`slice_rows`), with
  scales already rounded to their fp16 storage. ``pack`` turns codes into the stored tensors (codes
  packed to their bit width, fp16 scales, ...) and ``unpack`` reverses it exactly, so a saved and
  reloaded weight dequantizes to the same bits.
* ``fake_quantize`` is dynamic (activations, KV cache): scales from the live tensor, in float32.
* GPTQ sees a format as a grid fixed up front: ``grid`` gives ``k = grid_width`` float parameters
  per group (scale, zero point, datatype id, ...), ``round`` rounds one weight column given the
  ``(rows, k)`` parameters of its groups, and ``from_columns`` assembles the codes afterwards.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

from bitsmith.errors import SpecError
from bitsmith.formats import integer
from bitsmith.spec import QuantSpec

_FORMATS: dict[str, "NumberFormat"] = {}


class NumberFormat:
    """The operations every spec format provides (see the module docstring for the conventions)."""

    name: ClassVar[str] = ""
    grid_width: ClassVar[int] = 1  # GPTQ parameters per group
    supports_gptq: ClassVar[bool] = True
    gptq_note: ClassVar[str] = ""  # why not, when it does not

    # (a) dynamic fake quantization
    def fake_quantize(self, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        raise NotImplementedError

    # (b) weights: codes, exact dequantization, storage
    def quantize(self, weight: torch.Tensor, spec: QuantSpec) -> Any:
        raise NotImplementedError

    def dequantize(self, codes: Any, spec: QuantSpec) -> torch.Tensor:
        """float32 values, in the weight's element order (reshape to its shape)."""
        raise NotImplementedError

    def pack(self, codes: Any, spec: QuantSpec, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def unpack(self, tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> Any:
        raise NotImplementedError

    def stored_names(self, spec: QuantSpec) -> tuple[str, ...]:
        """Names of the tensors ``pack`` stores for ``spec`` (buffers of the quantized module)."""
        raise NotImplementedError

    # (c) storage cost
    def stored_bits(self, spec: QuantSpec, shape: tuple[int, int]) -> int:
        """Exact bits ``pack`` stores for a weight of ``shape``: codes and every per-group tensor."""
        raise NotImplementedError

    # (d) GPTQ
    def grid(self, wg: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """``(..., grid_width)`` parameters for each group (last dimension) of ``wg``."""
        raise NotImplementedError

    def round(self, col: torch.Tensor, params: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, dequantized values) of one weight column ``(rows,)`` on the grid ``params`` ``(rows, k)``."""
        raise NotImplementedError

    def from_columns(self, codes: torch.Tensor, params: torch.Tensor, spec: QuantSpec) -> Any:
        """Codes object from per-column codes ``(rows, cols)`` and per-column parameters ``(rows, cols, k)``."""
        raise NotImplementedError

    def column_grid(self, wg: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> torch.Tensor:
        """``(..., n, grid_width)`` parameters for each element of the groups ``wg`` ``(..., n)``.

        The same for every column of a group, except for formats whose grid varies inside a group
        (GGUF K-quants: sub-block scales inside a super-block). ``importance`` (GPTQ's Hessian diagonal,
        broadcastable to ``wg``) may weight a format's own grid search; most formats ignore it."""
        p = self.grid(wg, spec)
        return p.unsqueeze(-2).expand(*wg.shape, p.shape[-1])


def register_format(name: str):
    def deco(cls: type[NumberFormat]) -> type[NumberFormat]:
        if name in _FORMATS:
            raise RuntimeError(f"number format {name!r} registered twice")
        cls.name = name
        _FORMATS[name] = cls()
        return cls

    return deco


def number_format(spec: QuantSpec | str) -> NumberFormat:
    """The format object for a spec (or a format name)."""
    _load_builtin_formats()
    name = spec.format if isinstance(spec, QuantSpec) else spec
    if name not in _FORMATS:
        raise SpecError(f"spec field 'format': no numerics registered for {name!r}; known: {', '.join(sorted(_FORMATS))}")
    return _FORMATS[name]


def _load_builtin_formats() -> None:
    # Importing the adapter modules runs their @register_format decorators.
    from bitsmith.formats import dual_grained, gguf, scaled, structured  # noqa: F401


# -- dispatch helpers used across the package ----------------------------------------------------


def oriented(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[QuantSpec, tuple[int, ...], bool]:
    """(spec, shape, transposed) as the format objects see a weight.

    Per-IC specs (``ic``, AdaDim) group along the output dimension: the weight is handled as its
    transpose ``(in, out)`` with the per-row equivalent spec (``group`` of N rows, or ``channel``), so
    every format's numerics and storage serve per-IC unchanged. Other specs pass through.
    """
    if spec.granularity != "ic":
        return spec, tuple(shape), False
    if len(shape) != 2:
        raise SpecError(f"spec '{spec}': per-IC scales need a 2-D (out, in) weight, got shape {tuple(shape)}")
    rows = dataclasses.replace(spec, granularity="group" if spec.group_size is not None else "channel")
    return rows, (shape[1], shape[0]), True


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize and dequantize ``x`` dynamically (activations, KV cache) in ``spec``'s format."""
    spec, _, transposed = oriented(spec, tuple(x.shape))
    if transposed:  # a per-IC weight (SpinQuant's straight-through weight quantizer)
        return number_format(spec).fake_quantize(x.T, spec).T
    return number_format(spec).fake_quantize(x, spec)


def stored_bits(spec: QuantSpec, shape: tuple[int, int]) -> int:
    """Exact bits a weight of ``shape`` takes on disk in ``spec``'s format."""
    spec, shape, _ = oriented(spec, shape)
    return number_format(spec).stored_bits(spec, tuple(shape))


def grouped_shape(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the grouped view of a tensor of ``shape`` (raises a clear error when groups do not divide)."""
    return tuple(integer.group_view(torch.empty(shape, device="meta"), spec).shape)


def group_count(spec: QuantSpec, shape: tuple[int, ...]) -> int:
    """Number of groups (scales) of a weight of ``shape``."""
    return math.prod(grouped_shape(spec, shape)[:-1])


def first_of_group(params: torch.Tensor, spec: QuantSpec, gshape: tuple[int, ...]) -> torch.Tensor:
    """Per-group parameters ``(..., 1, k)`` from per-column ones ``(rows, cols, k)`` (all columns of a group agree)."""
    k = params.shape[-1]
    if spec.granularity == "tensor":
        return params[:1, :1]
    return params.reshape(*gshape[:-1], gshape[-1], k)[..., :1, :]


def slice_rows(codes: Any, start: int, stop: int) -> Any:
    """The codes of output rows ``start:stop``: every tensor field sliced along its leading dimension."""
    changes = {f.name: getattr(codes, f.name)[start:stop] for f in dataclasses.fields(codes)
               if isinstance(getattr(codes, f.name), torch.Tensor)}
    return dataclasses.replace(codes, **changes)


_FP16_SUBNORMAL = 2.0**-24


def store_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales as stored: float32 values exactly representable in ``dtype``, rounded *up* (so the grid still
    covers the range). fp16 subnormals are kept: float formats with a wide element range (E4M3's 448,
    E5M2's 57344) need scales below fp16's smallest normal for small weights."""
    if dtype == torch.float32:
        return scale.float().clamp_min(torch.finfo(torch.float32).tiny)
    scale = scale.float().clamp_min(_FP16_SUBNORMAL)
    stored = scale.to(dtype)
    up = torch.nextafter(stored, torch.tensor(float("inf"), dtype=dtype))
    return torch.where(stored.float() < scale, up, stored).float()


@dataclasses.dataclass
class ScaledCodes:
    """Codes of a grouped tensor on an element grid times one scale per group (fp, nf)."""

    codes: torch.Tensor  # uint8, grouped shape (..., n)
    scale: torch.Tensor  # float32 (exactly representable in fp16 for weights), shape (..., 1)
