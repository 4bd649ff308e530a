"""Block formats: OCP Microscaling (MX) and NormalFloat4, as pure tensor functions.

**MX** (OCP Microscaling Formats v1.0 spec; "Microscaling Data Formats for Deep Learning",
arXiv 2310.10537): each block of ``k = 32`` consecutive elements along the last dimension shares
one power-of-two scale ``X = 2**shared``, stored as an E8M0 byte ``shared + 127`` (0xFF is NaN).
As in the spec's conversion pseudocode, ``shared = floor(log2(absmax)) - emax_elem``, with
``emax_elem`` the exponent of the element format's largest normal, clamped to the E8M0 range
[-127, 127]; each element is ``V / X`` rounded to nearest (ties to even) in the element format,
saturating at its largest magnitude. ``|V / X| < 2**(emax_elem + 1)``, so saturation only touches
the top of that binade (e.g. (448, 512) for E4M3). Elements are FP8 E4M3/E5M2, FP6 E3M2/E2M3,
FP4 E2M1 (:mod:`bitsmith.formats.minifloat`) or INT8. MXINT8 elements are 8-bit two's complement
with an implicit scale of ``2**-6`` (values ``q / 64``, ``emax_elem = 0``). Quantization clamps
them symmetrically to the spec's max normal ``+-(1 + 63/64)``, i.e. ``q`` in [-127, 127] as the
OCP reference code does: emitting -128 (-2) would move the block absmax into the next binade and
change the shared exponent when re-quantized. Dequantization accepts -128.
An all-zero block gets the smallest scale (E8M0 code 0); a block holding NaN or inf gets the NaN
scale and dequantizes to NaN, as the spec prescribes.

**NF4** (QLoRA, arXiv 2305.14314): 16 levels at quantiles of N(0, 1) normalized to [-1, 1],
with an exact zero; each block (64 elements by default) is scaled by its absmax and every element
takes the nearest level (ties to the lower level).

Codes are unpacked uint8 (one per element, same shape as the input); pack them with
:mod:`bitsmith.formats.packing` (or :mod:`bitsmith.formats.fp6_split` for FP6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitsmith.errors import SpecError
from bitsmith.formats import minifloat as mf
from bitsmith.tensor_cache import tensor_cache

MX_BLOCK = 32
NF4_BLOCK = 64
E8M0_BIAS = 127
E8M0_NAN = 0xFF

# element name -> minifloat format, or None for INT8
MX_ELEMENTS: dict[str, mf.Minifloat | None] = {
    "fp8_e4m3": mf.FP8_E4M3,
    "fp8_e5m2": mf.FP8_E5M2,
    "fp6_e3m2": mf.FP6_E3M2,
    "fp6_e2m3": mf.FP6_E2M3,
    "fp4_e2m1": mf.FP4_E2M1,
    "int8": None,
}
_ALIASES = {name.split("_")[-1]: name for name in MX_ELEMENTS} | {"fp4": "fp4_e2m1"}


def mx_element(element: str) -> str:
    """Canonical element name: ``fp8_e4m3``, ``fp8_e5m2``, ``fp6_e3m2``, ``fp6_e2m3``, ``fp4_e2m1`` or ``int8``.

    Accepts the short forms ``e4m3``, ``e2m1``, ``fp4`` and an ``mx`` prefix (``mxfp8_e4m3``, ``mxint8``).
    """
    key = element.strip().lower() if isinstance(element, str) else ""
    key = key[2:] if key.startswith("mx") else key
    key = _ALIASES.get(key, key)
    if key not in MX_ELEMENTS:
        raise SpecError(f"MX element {element!r} is unknown; use one of {', '.join(MX_ELEMENTS)}")
    return key


def mx_emax(element: str) -> int:
    """``emax_elem``: exponent of the element format's largest normal (0 for INT8)."""
    fmt = MX_ELEMENTS[mx_element(element)]
    return 0 if fmt is None else fmt.emax


def mx_bits_per_element(element: str, block: int = MX_BLOCK) -> float:
    """Storage cost: element bits plus the 8-bit shared scale spread over the block."""
    fmt = MX_ELEMENTS[mx_element(element)]
    return (8 if fmt is None else fmt.bits) + 8 / block


@dataclass
class MXCodes:
    """MX-quantized tensor: element codes (input shape) and E8M0 scale bytes (one per block)."""

    codes: torch.Tensor  # uint8, shape (..., n): minifloat codes, or INT8 two's complement bytes
    exponents: torch.Tensor  # uint8 E8M0, shape (..., n // block): scale 2**(k - 127), 0xFF = NaN

    @property
    def block(self) -> int:
        return self.codes.shape[-1] // self.exponents.shape[-1]


def _blocked(x: torch.Tensor, block: int, what: str) -> torch.Tensor:
    """View ``x`` as ``(..., n // block, block)``, with a one-line error when it does not divide."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise SpecError(f"{what} block size {block!r} is not a positive integer")
    n = x.shape[-1] if x.dim() else 1
    if x.dim() == 0 or n % block:
        raise SpecError(f"{what}: block size {block} does not divide the last dimension {n}; pad or pick another block")
    return x.reshape(*x.shape[:-1], n // block, block)


@tensor_cache()
def _e8m0_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """2**(k - 127) and its inverse for every E8M0 byte (NaN at 0xFF); exact in float32."""
    scale = [2.0 ** (k - E8M0_BIAS) for k in range(255)] + [float("nan")]
    inv = [2.0 ** (E8M0_BIAS - k) for k in range(255)] + [float("nan")]
    return torch.tensor(scale, dtype=torch.float32), torch.tensor(inv, dtype=torch.float32)


def e8m0_to_scale(exponents: torch.Tensor) -> torch.Tensor:
    """float32 value of E8M0 bytes: ``2**(k - 127)``, NaN for 0xFF."""
    return _e8m0_tables()[0][exponents.to(torch.int64)]


def _mx_scaled(x: torch.Tensor, element: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked ``x / X`` (zero in non-finite blocks) and the E8M0 byte of each block (int64)."""
    xb = _blocked(x, block, f"MX {element}").to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    amax = xb.abs().amax(dim=-1)
    _, k = torch.frexp(amax)  # amax = f * 2**k with f in [0.5, 1): floor(log2 amax) = k - 1
    shared = (k.to(torch.int64) - 1 - mx_emax(element)).clamp_(-E8M0_BIAS, E8M0_BIAS)
    shared = torch.where(amax == 0, -E8M0_BIAS, shared)
    finite = torch.isfinite(amax)
    exponents = torch.where(finite, shared + E8M0_BIAS, E8M0_NAN)
    inv = _e8m0_tables()[1].to(xb.dtype)[exponents]
    y = xb * inv[..., None]  # exact: a power of two
    if not finite.all():
        y = torch.where(finite[..., None], y, 0.0)
    return y, exponents


def _int8_levels(y: torch.Tensor) -> torch.Tensor:
    """MXINT8 element integers ``q`` (value ``q / 64``), clamped to +-127."""
    return torch.round(y * 64).clamp_(-127, 127)


def mx_quantize(x: torch.Tensor, element: str, block: int = MX_BLOCK) -> MXCodes:
    """Quantize blocks of ``block`` elements along the last dimension to an MX format."""
    fmt = MX_ELEMENTS[mx_element(element)]
    y, exponents = _mx_scaled(x, element, block)
    codes = _int8_levels(y).to(torch.int8).view(torch.uint8) if fmt is None else fmt.encode(y)
    return MXCodes(codes.reshape(x.shape), exponents.to(torch.uint8))


def mx_dequantize(codes: MXCodes, element: str) -> torch.Tensor:
    """float32 values of an MX-quantized tensor."""
    fmt = MX_ELEMENTS[mx_element(element)]
    c, e = codes.codes, codes.exponents
    if c.shape[:-1] != e.shape[:-1] or e.shape[-1] == 0 or c.shape[-1] % e.shape[-1]:
        raise ValueError(f"MX codes of shape {tuple(c.shape)} do not match exponents of shape {tuple(e.shape)}")
    vals = c.view(torch.int8).float() / 64 if fmt is None else fmt.decode(c)
    vb = vals.reshape(*e.shape, codes.block) * e8m0_to_scale(e)[..., None]
    return vb.reshape(c.shape)


def mx_fake_quantize(x: torch.Tensor, element: str, block: int = MX_BLOCK) -> torch.Tensor:
    """MX quantize then dequantize, returned in ``x``'s dtype (rounds directly, without codes)."""
    fmt = MX_ELEMENTS[mx_element(element)]
    y, exponents = _mx_scaled(x, element, block)
    q = _int8_levels(y) / 64 if fmt is None else fmt.round(y)
    out = q * e8m0_to_scale(exponents).to(q.dtype)[..., None]
    return out.reshape(x.shape).to(x.dtype)


# -- NF4 --------------------------------------------------------------------------------------


def nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat4 levels (float32, ascending from -1 to 1, level 7 exactly 0)."""
    return _nf4_levels().clone()


@tensor_cache()
def _nf4_levels() -> torch.Tensor:
    # QLoRA: k-bit NormalFloat takes 2**(k-1) quantiles of N(0, 1) for the negative half and
    # 2**(k-1) + 1 for the positive half, both ending in an exact zero that is kept once, so the
    # 16 levels are asymmetric (7 negative, 8 positive) and zero is exact. The outermost
    # probability is p = 1 - delta, delta = (1/(2*15) + 1/(2*16)) / 2 (the mean half-step of 15
    # and 16 bins), so the extreme quantiles stay finite; the levels are then divided by their
    # absmax, putting them in [-1, 1].
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    p = 1 - (1 / 30 + 1 / 32) / 2
    positive = normal.icdf(torch.linspace(0.5, p, 9, dtype=torch.float64))  # 0 and 8 positive
    negative = normal.icdf(torch.linspace(1 - p, 0.5, 8, dtype=torch.float64))  # 7 negative and 0
    levels = torch.cat([negative[:-1], torch.zeros(1, dtype=torch.float64), positive[1:]])
    return (levels / levels.abs().max()).float()


def nf4_quantize(x: torch.Tensor, block: int = NF4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes (uint8 in [0, 15], ``x``'s shape) and float32 absmax per block of the last dimension."""
    xb = _blocked(x, block, "NF4").float()
    absmax = xb.abs().amax(dim=-1)
    safe = torch.where(absmax > 0, absmax, 1.0)  # all-zero blocks: every element is the 0 level
    return nf4_codes(xb / safe[..., None]).reshape(x.shape), absmax


def nf4_codes(y: torch.Tensor) -> torch.Tensor:
    """uint8 NF4 codes of values already divided by their block scale: nearest level, ties to the lower.

    Shared by :func:`nf4_quantize` and callers that choose the scale themselves (fp16 storage,
    clipping search, GPTQ's fixed grid).
    """
    levels = _nf4_levels().to(y.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(y.float(), midpoints, out_int32=True).to(torch.uint8)


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """float32 values: ``level[code] * absmax`` of the code's block."""
    if codes.shape[:-1] != absmax.shape[:-1] or absmax.shape[-1] == 0 or codes.shape[-1] % absmax.shape[-1]:
        raise ValueError(f"NF4 codes of shape {tuple(codes.shape)} do not match absmax of shape {tuple(absmax.shape)}")
    block = codes.shape[-1] // absmax.shape[-1]
    vals = _nf4_levels()[codes.to(torch.int64)].reshape(*absmax.shape, block)
    return (vals * absmax.float()[..., None]).reshape(codes.shape)


def nf4_fake_quantize(x: torch.Tensor, block: int = NF4_BLOCK) -> torch.Tensor:
    """NF4 quantize then dequantize, returned in ``x``'s dtype."""
    return nf4_dequantize(*nf4_quantize(x, block)).to(x.dtype)
