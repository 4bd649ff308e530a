"""GGUF (llama.cpp / ggml) block quantization types as pure tensor functions.

Each type quantizes the last dimension in fixed blocks and stores every block as a little-endian
byte record; a row of a weight ``(out, in)`` is ``in / block`` such records, so blocks never cross
output rows and a permutation of rows moves whole blocks. Layouts follow the GGUF spec
(github.com/ggml-org/ggml, docs/gguf.md) and llama.cpp's ``ggml-common.h`` / ``ggml-quants.c``
block structs; they were read there and in gguf-py's ``gguf/quants.py``, and are written here anew:

========  =====  =====  ==========================================================================
type      block  bytes  record and value of element ``i``
========  =====  =====  ==========================================================================
Q8_0      32     34     ``d`` fp16, 32 int8 ``q``; ``d * q``
Q4_0      32     18     ``d`` fp16, 16 bytes of nibbles (byte ``j``: element ``j`` low, ``j+16``
                        high); ``d * (q - 8)``
Q4_1      32     20     ``d``, ``m`` fp16, nibbles as Q4_0; ``d * q + m``
Q5_0      32     22     ``d``, 32-bit word of fifth bits (bit ``j``: element ``j``), nibbles;
                        ``d * (q - 16)``
Q5_1      32     24     ``d``, ``m``, fifth bits, nibbles; ``d * q + m``
Q4_K      256    144    ``d``, ``dmin`` fp16, 12 bytes of eight 6-bit scales and mins, 128 bytes
                        of nibbles (per 64 elements: element ``l`` low, ``l+32`` high);
                        sub-block ``j`` of 32: ``d*sc_j * q - dmin*m_j``
Q6_K      256    210    128 bytes of low nibbles, 64 bytes of high 2-bit pairs, sixteen int8
                        scales, ``d`` fp16; sub-block ``j`` of 16: ``d*sc_j * (q - 32)``
========  =====  =====  ==========================================================================

Codes are kept *as stored*: unsigned ``q`` (``Q8_0`` as ``q + 128``, so every type's code is a
uint8 and its value is ``d * (code - offset)``, or affine for the ``_1`` and K types).

Quantizers. The legacy types (Q8_0, Q4_x, Q5_x) follow llama.cpp's reference rule (``*_ref``: one
scale from the block's absmax, or min-max for the ``_1`` types, truncation of ``x/d + offset + 0.5``)
with the same float32 operations, so they give the same bytes as ``gguf.quants.quantize`` and
llama.cpp without an importance matrix (tested). The K-quants are bitsmith's own search (llama.cpp's
is a different weighted iterative search): per 32-element (Q4_K) or 16-element (Q6_K) sub-block a
scale (and min) of least squared error, found by rounding at a few candidate step counts and
refitting scale and min by least squares to the codes; then the sub-block scales and mins are
themselves quantized to 6 bits (Q4_K) or int8 (Q6_K) against fp16 super-block scales, and every
element is rounded to nearest on that exact stored grid. :func:`grid_params` exposes those stored
grids per element, so GPTQ rounds onto exactly the values the file will hold; for GPTQ the legacy
types' block scales (and mins) are searched too, for least squared error weighted by the Hessian
diagonal (the same statistic as llama.cpp's importance matrix), instead of the reference absmax rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QK = 32  # legacy block
QK_K = 256  # K-quant super-block


@dataclass(frozen=True)
class BlockType:
    """One GGUF type: block length, record bytes, code bits, and the stored grid's shape."""

    name: str
    block: int
    type_size: int
    bits: int
    offset: int | None  # symmetric types: value = d * (code - offset); None: affine
    sub: int | None = None  # K-quants: elements per sub-block
    ggml_id: int = 0  # GGMLQuantizationType value

    @property
    def levels(self) -> int:
        return 1 << self.bits


TYPES: dict[str, BlockType] = {
    "q8_0": BlockType("q8_0", QK, 34, 8, 128, ggml_id=8),
    "q4_0": BlockType("q4_0", QK, 18, 4, 8, ggml_id=2),
    "q4_1": BlockType("q4_1", QK, 20, 4, None, ggml_id=3),
    "q5_0": BlockType("q5_0", QK, 22, 5, 16, ggml_id=6),
    "q5_1": BlockType("q5_1", QK, 24, 5, None, ggml_id=7),
    "q4_k": BlockType("q4_k", QK_K, 144, 4, None, sub=32, ggml_id=12),
    "q6_k": BlockType("q6_k", QK_K, 210, 6, 32, sub=16, ggml_id=14),
}


@dataclass
class GGUFCodes:
    """Unpacked blocks: leading dimension = weight rows (so rows can be sliced).

    ``codes`` uint8 ``(..., nblocks, block)``; ``d`` (and ``m``: the ``_1`` types' min, Q4_K's
    ``dmin``) fp16-exact float32 ``(..., nblocks, 1)``; K-quants: ``sc`` (and ``mn``, Q4_K) the
    integer sub-block scales (and mins) as float32 ``(..., nblocks, nsub)``.
    """

    codes: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    mn: torch.Tensor | None = None


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 (nearest even, as ggml's fp32->fp16) and back to float32."""
    return x.to(torch.float16).float()


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _round_away(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: nearest, halves away from zero (exact for float32 input)."""
    a = v.abs()
    f = torch.floor(a)
    return torch.copysign(f + torch.floor(2 * (a - f)), v)


# -- quantize -------------------------------------------------------------------------------------


def _signed_absmax(xb: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude per block (sign kept; the first one on ties)."""
    return xb.gather(-1, xb.abs().argmax(dim=-1, keepdim=True))


def _quantize_legacy(xb: torch.Tensor, t: BlockType) -> GGUFCodes:
    if t.name == "q8_0":
        d = xb.abs().amax(dim=-1, keepdim=True) / 127
        q = _round_away(xb * _inv(d))
        return GGUFCodes((q + 128).to(torch.uint8), _fp16(d))
    top = t.levels - 1
    if t.offset is not None:  # q4_0, q5_0: the absmax element maps to code 0 (value -offset * d)
        d = _signed_absmax(xb) / -t.offset
        q = torch.trunc(xb * _inv(d) + (t.offset + 0.5)).clamp(0, top)
        return GGUFCodes(q.to(torch.uint8), _fp16(d))
    lo = xb.amin(dim=-1, keepdim=True)
    hi = xb.amax(dim=-1, keepdim=True)
    d = (hi - lo) / top
    q = torch.trunc((xb - lo) * _inv(d) + 0.5).clamp(0, top)
    return GGUFCodes(q.to(torch.uint8), _fp16(d), _fp16(lo))


def _fit_affine(x: torch.Tensor, nsteps: torch.Tensor, top: int, w: torch.Tensor | None = None,
                min_le_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block (last dim) scale ``s >= 0`` and offset ``o`` (value ``s*q + o``, ``q`` in ``[0, top]``;
    ``o <= 0`` when ``min_le_zero``, as Q4_K stores a minimum to subtract) of least (``w``-weighted)
    squared error over a few candidate step counts, each refitted by weighted least squares to its codes."""
    w = torch.ones_like(x) if w is None else w
    lo = x.amin(dim=-1, keepdim=True)
    lo = lo.clamp_max(0) if min_le_zero else lo
    hi = x.amax(dim=-1, keepdim=True)
    span = (hi - lo).clamp_min(1e-30)
    sw = w.sum(-1, keepdim=True)
    best_err = best_s = best_o = None
    for k in nsteps.tolist():
        s0 = span / k
        q = torch.round((x - lo) / s0).clamp_(0, top)
        wq = w * q
        swq, swqq, swx, swqx = wq.sum(-1, keepdim=True), (wq * q).sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True), (wq * x).sum(-1, keepdim=True)
        det = sw * swqq - swq * swq
        ok = det > 0
        s = torch.where(ok, (sw * swqx - swq * swx) / torch.where(ok, det, torch.ones_like(det)), s0)
        o = torch.where(ok, (swx - s * swq) / sw.clamp_min(1e-30), lo)
        if min_le_zero:  # the stored min cannot be negative: refit the scale alone with o = 0
            clip = o > 0
            s = torch.where(clip, swqx / swqq.clamp_min(1e-30), s)
            o = torch.where(clip, torch.zeros_like(o), o)
        bad = s <= 0
        s, o = torch.where(bad, s0, s), torch.where(bad, lo, o)
        q = torch.round((x - o) / s).clamp_(0, top)
        err = (w * (s * q + o - x).pow_(2)).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_s, best_o = err, s, o
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_o = torch.where(better, s, best_s), torch.where(better, o, best_o)
    return best_s, best_o


def _fit_symmetric(x: torch.Tensor, targets: torch.Tensor, offset: int, w: torch.Tensor | None = None) -> torch.Tensor:
    """Per sub-block signed scale ``s`` (value ``s*(q - offset)``, ``q`` in ``[0, 2*offset - 1]``) of least
    (``w``-weighted) squared error: the largest-magnitude element mapped near level ``-target`` for a few
    targets (one level more on the negative side), each refitted by weighted least squares."""
    w = torch.ones_like(x) if w is None else w
    xm = _signed_absmax(x)
    best_err = best_s = None
    for lv in targets.tolist():
        s0 = torch.where(xm == 0, torch.ones_like(xm), -xm / lv)
        l = (torch.round(x / s0) + offset).clamp_(0, 2 * offset - 1) - offset
        wll = (w * l * l).sum(-1, keepdim=True)
        s = torch.where(wll > 0, (w * l * x).sum(-1, keepdim=True) / wll.clamp_min(1e-30), s0)
        l = (torch.round(x / s) + offset).clamp_(0, 2 * offset - 1) - offset
        err = (w * (s * l - x).pow_(2)).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_s = err, s
        else:
            better = err < best_err
            best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
    return torch.where(xm == 0, torch.zeros_like(best_s), best_s)


_Q4K_STEPS = torch.tensor([15.0 + 0.25 * i for i in range(-4, 9)])  # 14 .. 17 steps over the range
_Q6K_LEVELS = torch.tensor([32.0 - 0.5 * i for i in range(0, 9)])  # absmax element at level -32 .. -28


def k_grid(xb: torch.Tensor, t: BlockType, w: torch.Tensor | None = None) -> GGUFCodes:
    """The stored grid of K-quant super-blocks ``(..., nblocks, 256)`` (codes left empty); ``w``: optional
    per-element importance weights of the same shape."""
    nsub = t.block // t.sub
    xs = xb.reshape(*xb.shape[:-1], nsub, t.sub).float()
    ws = None if w is None else w.expand_as(xb).reshape(xs.shape)
    if t.name == "q4_k":
        s, o = _fit_affine(xs, _Q4K_STEPS, 15, ws)
        s, m = s[..., 0], -o[..., 0]  # (..., nblocks, 8), both >= 0
        d = _fp16(s.amax(-1, keepdim=True) / 63)
        dmin = _fp16(m.amax(-1, keepdim=True) / 63)
        sc = torch.round(s * _inv(d)).clamp_(0, 63)
        mn = torch.round(m * _inv(dmin)).clamp_(0, 63)
        return GGUFCodes(torch.empty(0, dtype=torch.uint8), d, dmin, sc, mn)
    s = _fit_symmetric(xs, _Q6K_LEVELS, 32, ws)[..., 0]  # (..., nblocks, 16), signed
    d = _fp16(s.abs().amax(-1, keepdim=True) / 127)
    sc = torch.round(s * _inv(d)).clamp_(-128, 127)
    return GGUFCodes(torch.empty(0, dtype=torch.uint8), d, None, sc)


def _searched_legacy(xb: torch.Tensor, t: BlockType, w: torch.Tensor | None) -> GGUFCodes:
    """A legacy block grid chosen for least (weighted) squared error instead of llama.cpp's reference
    rule: still one fp16 scale (and min) per block, so any such grid is a valid record of the type."""
    top = t.levels - 1
    w = None if w is None else w.expand_as(xb)
    if t.offset is not None:
        targets = torch.tensor([t.offset - 0.25 * i * t.offset / 8 for i in range(17)] + [-(t.offset - 1.0)])
        return GGUFCodes(torch.empty(0, dtype=torch.uint8), _fp16(_fit_symmetric(xb, targets, t.offset, w)))
    s, o = _fit_affine(xb, torch.tensor([top + 0.25 * i for i in range(-4, 9)]), top, w, min_le_zero=False)
    return GGUFCodes(torch.empty(0, dtype=torch.uint8), _fp16(s), _fp16(o))


def grid_params(xb: torch.Tensor, t: BlockType, w: torch.Tensor | None = None, search: bool = False) -> torch.Tensor:
    """Per-element stored grid ``(..., nblocks, block, k)`` for GPTQ (see :func:`round_to_grid`):

    symmetric legacy ``[d]``, affine legacy ``[d, m]``, Q4_K ``[d*sc, dmin*mn, d, dmin, sc, mn]``,
    Q6_K ``[d*sc, d, sc]`` (the first one or two are the element's effective scale and min). Legacy
    grids follow llama.cpp's reference rule, or with ``search`` the least-squared-error scale (and min);
    ``w`` (importance per element, e.g. the Hessian diagonal) weights the searches.
    """
    xb = xb.float()
    if t.sub is None:
        c = _searched_legacy(xb, t, w) if search else _quantize_legacy(xb, t)
        p = c.d if c.m is None else torch.cat([c.d, c.m], dim=-1)
        return p.unsqueeze(-2).expand(*xb.shape, p.shape[-1])
    g = k_grid(xb, t, w)
    rep = lambda v: v.repeat_interleave(t.sub, dim=-1)  # noqa: E731  (per sub-block -> per element)
    full = lambda v: v.expand(*xb.shape)  # noqa: E731
    if t.name == "q4_k":
        cols = [rep(g.d * g.sc), rep(g.m * g.mn), full(g.d), full(g.m), rep(g.sc), rep(g.mn)]
    else:
        cols = [rep(g.d * g.sc), full(g.d), rep(g.sc)]
    return torch.stack(cols, dim=-1)


def grid_width(t: BlockType) -> int:
    if t.sub is None:
        return 1 if t.offset is not None else 2
    return 6 if t.name == "q4_k" else 3


def round_to_grid(x: torch.Tensor, p: torch.Tensor, t: BlockType) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, values) of ``x`` rounded to nearest on the stored grid ``p`` (``(..., k)`` per element)."""
    top = t.levels - 1
    s = p[..., 0]
    if t.name == "q4_k" or (t.sub is None and t.offset is None):
        off = p[..., 1]
        sign = -1.0 if t.name == "q4_k" else 1.0  # q4_k stores the min to subtract
        base = sign * off
        q = torch.where(s > 0, torch.round((x - base) / torch.where(s > 0, s, torch.ones_like(s))), torch.zeros_like(x))
        q = q.clamp_(0, top)
        return q, (s * q - off) if t.name == "q4_k" else (s * q + off)
    q = torch.where(s != 0, torch.round(x / torch.where(s != 0, s, torch.ones_like(s))), torch.zeros_like(x))
    q = (q + t.offset).clamp_(0, top)
    return q, s * (q - t.offset)


def quantize(xb: torch.Tensor, t: BlockType) -> GGUFCodes:
    """Codes of ``xb`` ``(..., nblocks, block)`` (float32): reference rule (legacy) or own search (K)."""
    xb = xb.float()
    if t.sub is None:
        return _quantize_legacy(xb, t)
    g = k_grid(xb, t)
    nsub = t.block // t.sub
    xs = xb.reshape(*xb.shape[:-1], nsub, t.sub)
    if t.name == "q4_k":
        s, mn = (g.d * g.sc).unsqueeze(-1), (g.m * g.mn).unsqueeze(-1)
        q = torch.where(s > 0, torch.round((xs + mn) / torch.where(s > 0, s, torch.ones_like(s))), torch.zeros_like(xs))
        q = q.clamp_(0, 15)
    else:
        s = (g.d * g.sc).unsqueeze(-1)
        q = torch.where(s != 0, torch.round(xs / torch.where(s != 0, s, torch.ones_like(s))), torch.zeros_like(xs))
        q = (q + 32).clamp_(0, 63)
    g.codes = q.reshape(xb.shape).to(torch.uint8)
    return g


def from_grid(codes: torch.Tensor, p: torch.Tensor, t: BlockType) -> GGUFCodes:
    """Codes object from per-element codes ``(..., nblocks, block)`` and grid ``(..., nblocks, block, k)``."""
    codes = codes.to(torch.uint8).contiguous()
    first = p[..., 0, :]  # (..., nblocks, k)
    if t.sub is None:
        if t.offset is not None:
            return GGUFCodes(codes, first[..., 0:1].contiguous())
        return GGUFCodes(codes, first[..., 0:1].contiguous(), first[..., 1:2].contiguous())
    per_sub = p[..., :: t.sub, :]  # (..., nblocks, nsub, k)
    if t.name == "q4_k":
        return GGUFCodes(codes, first[..., 2:3].contiguous(), first[..., 3:4].contiguous(),
                         per_sub[..., 4].contiguous(), per_sub[..., 5].contiguous())
    return GGUFCodes(codes, first[..., 1:2].contiguous(), None, per_sub[..., 2].contiguous())


# -- dequantize -----------------------------------------------------------------------------------


def dequantize(c: GGUFCodes, t: BlockType) -> torch.Tensor:
    """float32 values ``(..., nblocks, block)``, computed in the order ggml's dequantization uses."""
    q = c.codes.float()
    if t.sub is None:
        if t.offset is not None:
            return (q - t.offset) * c.d
        return c.d * q + c.m
    nsub = t.block // t.sub
    qs = q.reshape(*q.shape[:-1], nsub, t.sub)
    if t.name == "q4_k":
        out = (c.d * c.sc).unsqueeze(-1) * qs - (c.m * c.mn).unsqueeze(-1)
    else:
        out = (c.d * c.sc).unsqueeze(-1) * (qs - 32)
    return out.reshape(q.shape)


# -- bytes ----------------------------------------------------------------------------------------


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """(..., 1) fp16-exact floats -> (..., 2) little-endian bytes."""
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(*v.shape[:-1], 2)


def _bytes_f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _nibbles(q: torch.Tensor, half: int) -> torch.Tensor:
    """Pairs element ``l`` (low nibble) with ``l + half`` (high) along the last dim, per chunk of ``2*half``."""
    c = q.reshape(*q.shape[:-1], -1, 2, half)
    return ((c[..., 0, :] & 0xF) | ((c[..., 1, :] & 0xF) << 4)).reshape(*q.shape[:-1], -1)


def _unnibble(b: torch.Tensor, half: int) -> torch.Tensor:
    c = b.reshape(*b.shape[:-1], -1, 1, half)
    return torch.cat([c & 0xF, c >> 4], dim=-2).reshape(*b.shape[:-1], -1)


def _fifth_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of 32 codes as a little-endian 32-bit word: (..., 32) -> (..., 4) bytes."""
    bits = ((q >> 4) & 1).reshape(*q.shape[:-1], 4, 8).to(torch.int32)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)
    return (bits * weights).sum(-1).to(torch.uint8)


def _unfifth(b: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((b.unsqueeze(-1) >> shifts) & 1).reshape(*b.shape[:-1], 32)


def _pack_k4_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins -> 12 bytes: bytes 0-3 scales 0-3 (bits 6-7: high bits of scales
    4-7), 4-7 mins 0-3 (bits 6-7: high bits of mins 4-7), 8-11 low nibbles of scales 4-7 | mins 4-7 << 4."""
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    a = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    b = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    c = (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)
    return torch.cat([a, b, c], dim=-1)


def _unpack_k4_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([a & 0x3F, (c & 0xF) | ((a >> 6) << 4)], dim=-1)
    mn = torch.cat([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], dim=-1)
    return sc, mn


def pack(c: GGUFCodes, t: BlockType) -> torch.Tensor:
    """The ggml records: uint8 ``(..., nblocks * type_size)`` for codes ``(..., nblocks, block)``."""
    q = c.codes.to(torch.uint8)
    lead = q.shape[:-2]
    if t.name == "q8_0":
        parts = [_f16_bytes(c.d), q ^ 0x80]  # code - 128 as two's complement
    elif t.name in ("q4_0", "q4_1"):
        parts = [_f16_bytes(c.d)] + ([_f16_bytes(c.m)] if c.m is not None else []) + [_nibbles(q, 16)]
    elif t.name in ("q5_0", "q5_1"):
        parts = [_f16_bytes(c.d)] + ([_f16_bytes(c.m)] if c.m is not None else []) + [_fifth_bits(q), _nibbles(q, 16)]
    elif t.name == "q4_k":
        parts = [_f16_bytes(c.d), _f16_bytes(c.m), _pack_k4_scales(c.sc, c.mn), _nibbles(q, 32)]
    else:  # q6_k
        h = q.reshape(*q.shape[:-1], 2, 4, 32)  # halves of 128: four runs of 32
        low = torch.cat([h[..., 0, :] & 0xF | (h[..., 2, :] & 0xF) << 4,
                         h[..., 1, :] & 0xF | (h[..., 3, :] & 0xF) << 4], dim=-1)  # (..., 2, 64)
        high = (h[..., 0, :] >> 4) | (h[..., 1, :] >> 4) << 2 | (h[..., 2, :] >> 4) << 4 | (h[..., 3, :] >> 4) << 6
        scales = c.sc.to(torch.int8).view(torch.uint8)
        parts = [low.reshape(*q.shape[:-1], 128), high.reshape(*q.shape[:-1], 64), scales, _f16_bytes(c.d)]
    rec = torch.cat([p.to(torch.uint8) for p in parts], dim=-1)
    assert rec.shape[-1] == t.type_size
    return rec.reshape(*lead, -1)


def unpack(data: torch.Tensor, t: BlockType) -> GGUFCodes:
    """Inverse of :func:`pack`: ``(..., nblocks * type_size)`` bytes -> codes ``(..., nblocks, block)``."""
    rec = data.reshape(*data.shape[:-1], -1, t.type_size)
    if t.name == "q8_0":
        return GGUFCodes(rec[..., 2:] ^ 0x80, _bytes_f16(rec[..., 0:2]))
    if t.name in ("q4_0", "q4_1", "q5_0", "q5_1"):
        d = _bytes_f16(rec[..., 0:2])
        m, pos = (None, 2) if t.offset is not None else (_bytes_f16(rec[..., 2:4]), 4)
        high = None
        if t.bits == 5:
            high, pos = _unfifth(rec[..., pos:pos + 4]), pos + 4
        q = _unnibble(rec[..., pos:pos + 16], 16)
        if high is not None:
            q = q | (high << 4)
        return GGUFCodes(q, d, m)
    if t.name == "q4_k":
        sc, mn = _unpack_k4_scales(rec[..., 4:16])
        return GGUFCodes(_unnibble(rec[..., 16:], 32), _bytes_f16(rec[..., 0:2]), _bytes_f16(rec[..., 2:4]),
                         sc.float(), mn.float())
    low = rec[..., 0:128].reshape(*rec.shape[:-1], 2, 64)  # per half of 128 elements
    high = rec[..., 128:192].reshape(*rec.shape[:-1], 2, 32)
    lo = torch.stack([low[..., :32] & 0xF, low[..., 32:] & 0xF, low[..., :32] >> 4, low[..., 32:] >> 4], dim=-2)
    hi = torch.stack([(high >> s) & 3 for s in (0, 2, 4, 6)], dim=-2)
    q = (lo | (hi << 4)).reshape(*rec.shape[:-1], 256)
    sc = rec[..., 192:208].contiguous().view(torch.int8).float()
    return GGUFCodes(q, _bytes_f16(rec[..., 208:210]), None, sc)
