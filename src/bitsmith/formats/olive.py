"""OliVe outlier-victim pair quantization (arXiv 2304.07493), as pure tensor functions.

Outliers matter, the ordinary values next to them much less. OliVe quantizes adjacent pairs
``(x[2k], x[2k+1])`` into exactly one byte: a pair holding an outlier sacrifices its partner (the
*victim*, pruned to 0) and spends the victim's nibble on a marker, so the outlier's nibble can use a
wide-range float. Decoding a byte needs only that byte and the group scale: no index lists, no
global coordination, and every pair stays byte-aligned.

Encoding implemented (values in units of the group scale ``s``; low nibble = first element, as in
:mod:`bitsmith.formats.packing`):

* normal nibble: int4, two's complement, values -7..7. The code ``0b1000`` (-8) is not a value: it
  is the *identifier* that marks the victim of an outlier-victim pair.
* outlier nibble: *abfloat* (adaptive-biased float) E2M1, sign-magnitude ``s eem``; magnitude
  ``(1 + m/2) * 2**(e + bias)``. The bias is adapted to the normal type so the outlier range starts
  just past it: ``bias = 3`` (``2**3 = 8`` is the first power of two above the int4 maximum 7).
  ``e = m = 0`` (magnitude 8) is not used, so the outlier nibble is never the identifier and the
  set stays sign-symmetric: outlier values are +-{12, 16, 24, 32, 48, 64, 96}. (This is the
  authors' released ``outlier_value`` table, there expressed on a grid 4x finer.)
* byte decoding: a nibble equal to the identifier decodes to 0 and makes the *other* nibble an
  abfloat outlier; otherwise both nibbles are int4 normals. The three bytes no encoder produces
  (``0x08``, ``0x80``, ``0x88``: an abfloat nibble with ``e = m = 0``) decode to ``(0, 0)``.

Quantization of one pair: each element rounds to the nearest value of the combined set (int4
normals and abfloat outliers); an element landing beyond 7 is an outlier, its partner becomes the
victim. When both elements are outliers the one with the larger magnitude is kept and the other is
pruned, as the paper does. The normal-range scale is chosen per group by an MSE search over a grid
of candidate normal maxima (as the paper searches its scale; the authors' code searches multiples
of a 3-sigma bound): ``7 * s = r * absmax`` for a geometric grid of ``r`` from 1 (no outliers:
exactly plain int4 absmax RTN, so the search is never worse than it) down to 7/96 (the absmax sits at
the top of the abfloat range), 32 points. When the scale makes no pair an outlier pair, the result
is plain int4 with -8 unused. The outlier bias needs no storage: it is fixed by the normal type.
Normals are int4 only; the paper's alternative flint4 normals (with their own abfloat bias) are not
implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from bitsmith.errors import SpecError
from bitsmith.formats.integer import _store_scale

NORMAL_MAX = 7
IDENTIFIER = 0b1000
ABFLOAT_BIAS = 3
# abfloat magnitude by its low three bits ``eem``; index 0 (e = m = 0) is reserved and decodes to 0
ABFLOAT_MAGNITUDES = tuple(0 if c == 0 else (2 + (c & 1)) * 2 ** ((c >> 1) + ABFLOAT_BIAS - 1) for c in range(8))
OUTLIER_VALUES = ABFLOAT_MAGNITUDES[1:]  # (12, 16, 24, 32, 48, 64, 96)
# ratios r (normal maximum 7 * s = r * absmax): geometric from 1 (plain int4) to 7/96, 32 steps of ~9%
SCALE_GRID = [(NORMAL_MAX / OUTLIER_VALUES[-1]) ** (i / 31) for i in range(32)]


@dataclass
class OliVeCodes:
    """One byte per element pair, and one scale per group (the outlier bias is fixed, see module)."""

    codes: torch.Tensor  # uint8, shape (..., n // 2): pair k of a group is byte k
    scale: torch.Tensor  # float32 values (exactly representable in the storage dtype), shape (..., 1)

    def dequantize(self) -> torch.Tensor:
        return olive_dequantize(self)


def _check_pairs(n: int, what: str) -> None:
    if n % 2:
        raise SpecError(
            f"OliVe {what} {n} is odd; OliVe quantizes adjacent pairs, so use an even group size "
            f"(e.g. {n + 1})"
        )


def _decode_table() -> torch.Tensor:
    """(256, 2) float32: the two values (in scale units) of every byte."""
    out = torch.empty(256, 2)
    for byte in range(256):
        nib = (byte & 0xF, byte >> 4)
        for i in range(2):
            own, other = nib[i], nib[1 - i]
            if own == IDENTIFIER:
                out[byte, i] = 0.0
            elif other == IDENTIFIER:
                out[byte, i] = (-1.0 if own & 0b1000 else 1.0) * ABFLOAT_MAGNITUDES[own & 0b111]
            else:
                out[byte, i] = own - 16 if own & 0b1000 else own
    return out


_DECODE = _decode_table()


def decode_pairs(codes: torch.Tensor) -> torch.Tensor:
    """Bytes ``(..., m)`` to values in scale units ``(..., 2m)`` float32; each byte on its own."""
    return _DECODE.to(codes.device)[codes.long()].reshape(*codes.shape[:-1], 2 * codes.shape[-1])


def _abfloat_nibble(v: torch.Tensor) -> torch.Tensor:
    mags = torch.tensor(ABFLOAT_MAGNITUDES, dtype=v.dtype, device=v.device)
    code = torch.bucketize(v.abs(), mags).clamp_(max=7)
    return code | (v < 0).long() << 3


def encode_pairs(q: torch.Tensor) -> torch.Tensor:
    """Values in scale units ``(..., 2m)`` to bytes ``(..., m)``: the inverse of :func:`decode_pairs`.

    Each pair must be representable: two int4 normals in -7..7, or one abfloat outlier
    (+-12 ... +-96) next to a 0 victim. Raises ``ValueError`` otherwise.
    """
    _check_pairs(q.shape[-1], "pair dimension")
    pairs = q.reshape(*q.shape[:-1], q.shape[-1] // 2, 2)
    v0, v1 = pairs[..., 0], pairs[..., 1]
    out0, out1 = v0.abs() > NORMAL_MAX, v1.abs() > NORMAL_MAX
    outliers = torch.tensor(OUTLIER_VALUES, dtype=q.dtype, device=q.device)
    normal_ok = (q == torch.round(q)) & (q.abs() <= NORMAL_MAX)
    outlier_ok = torch.isin(q.abs(), outliers)
    ok0 = torch.where(out0, outlier_ok[..., 0::2] & (v1 == 0), normal_ok[..., 0::2])
    ok1 = torch.where(out1, outlier_ok[..., 1::2] & (v0 == 0), normal_ok[..., 1::2])
    if not bool((ok0 & ok1).all()):
        raise ValueError("encode_pairs: a pair is neither two int4 values in -7..7 nor one abfloat outlier and a 0")
    lo = torch.where(out0, _abfloat_nibble(v0), torch.where(out1, IDENTIFIER, v0.long() & 0xF))
    hi = torch.where(out1, _abfloat_nibble(v1), torch.where(out0, IDENTIFIER, v1.long() & 0xF))
    return (lo | hi << 4).to(torch.uint8)


def _combined_grid(device: torch.device) -> torch.Tensor:
    mags = list(range(1, NORMAL_MAX + 1)) + list(OUTLIER_VALUES)
    return torch.tensor(sorted([0.0] + [s * m for m in mags for s in (1.0, -1.0)]), device=device)


def ovp_round(q: torch.Tensor) -> torch.Tensor:
    """Round values in scale units to the nearest representable outlier-victim pairs (paper's rule)."""
    _check_pairs(q.shape[-1], "pair dimension")
    grid = _combined_grid(q.device)
    v = grid[torch.bucketize(q, (grid[1:] + grid[:-1]) / 2)]
    pairs = v.reshape(*v.shape[:-1], v.shape[-1] // 2, 2)
    mag = q.abs().reshape(pairs.shape)
    out = pairs.abs() > NORMAL_MAX
    first_wins = mag[..., 0] >= mag[..., 1]
    keep0 = out[..., 0] & (~out[..., 1] | first_wins)
    keep1 = out[..., 1] & ~keep0
    pairs = torch.stack(
        (torch.where(keep1, 0.0, pairs[..., 0]), torch.where(keep0, 0.0, pairs[..., 1])), dim=-1
    )
    return pairs.reshape(v.shape)


def olive_quantize(
    xg: torch.Tensor, scale_dtype: torch.dtype = torch.float16, grid: Sequence[float] | None = None
) -> OliVeCodes:
    """Quantize a grouped tensor (last dimension even) into one byte per pair and a scale per group.

    ``grid`` lists candidate ratios ``r`` (normal maximum ``7 * s = r * absmax``); the least squared
    error per group wins, ties keeping the earlier ratio.
    """
    best_q, best_scale = olive_search(xg, scale_dtype, grid)
    return OliVeCodes(encode_pairs(best_q), best_scale)


def olive_search(
    xg: torch.Tensor, scale_dtype: torch.dtype = torch.float16, grid: Sequence[float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale search of :func:`olive_quantize` without the byte encoding: (values in scale units, scale).

    ``q * scale`` is exactly the dequantized result (encoding is lossless), which is all dynamic
    activation quantization needs. The whole grid is scanned: the error is not unimodal along it
    (an outlier's error oscillates as it snaps from one abfloat level to the next), so a
    coarse-to-fine search misses the optimum of many groups.
    """
    _check_pairs(xg.shape[-1], "group size")
    x = xg.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    best_err = best_q = best_scale = None
    for r in SCALE_GRID if grid is None else grid:
        scale = _store_scale(amax * r / NORMAL_MAX, scale_dtype)
        q = ovp_round(x / scale)
        err = (q * scale - x).pow_(2).sum(dim=-1, keepdim=True)
        if best_err is None:
            best_err, best_q, best_scale = err, q, scale
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q = torch.where(better, q, best_q)
        best_scale = torch.where(better, scale, best_scale)
    return best_q, best_scale


def olive_dequantize(codes: OliVeCodes) -> torch.Tensor:
    """Float32 values of the grouped tensor: decoded pairs times the group scale."""
    return decode_pairs(codes.codes) * codes.scale.float()


def olive_fake_quantize(
    x: torch.Tensor, group_size: int | None = None, scale_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Quantize and dequantize ``x`` with groups of ``group_size`` along the last dimension (None: all of it)."""
    n = x.shape[-1]
    size = n if group_size is None else group_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or n % size:
        raise SpecError(f"OliVe group size {group_size!r} does not divide the last dimension {n}")
    _check_pairs(size, "group size")
    xg = x.reshape(*x.shape[:-1], n // size, size)
    return olive_dequantize(olive_quantize(xg, scale_dtype)).reshape(x.shape).to(x.dtype)


def olive_bits_per_element(group_size: int, scale_bits: int = 16) -> float:
    """Storage per element: 8 bits per pair plus the group scale."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise SpecError(f"OliVe group size {group_size!r} is not an even integer >= 2")
    _check_pairs(group_size, "group size")
    return 4 + scale_bits / group_size
