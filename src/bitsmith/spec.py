"""The quantization spec: how one tensor is quantized.

A spec is small, validated and serializable. Users type it as a string such as ``int4:g64:sym``,
``fp8:e4m3:token`` or ``mxfp4`` or give it as a dict (YAML). Every field is checked when the spec
is built, so a typo fails at parse time, naming the field, not hours later inside a solver.

String grammar (parts separated by ``:``, any order after the first)::

    <format><bits>              format and width: int2..int8, fp3..fp8, nf4, mxfp4|mxfp6|mxfp8,
                                mxint8, bitmod3|bitmod4, olive4, dg4
    e<X>m<Y>                    exponent/mantissa split of a float element (fp, mxfp; 1 + X + Y = bits)
    tensor|channel|token|head|ic  granularity (default: channel; MX: blocks of 32)
    g<N>                        groups of N along the reduced dimension (alone: per-group weights;
                                with ic: N output rows)
    sym|asym                    symmetric (default) or asymmetric with a zero point (int only)
    minmax|mse                  scale search: range of the data, or MSE-optimal clipping
    r<ratio>                    fixed clipping ratio in (0, 1], e.g. r0.9

Granularity meanings: ``tensor`` one scale; ``channel`` one per output channel (weight rows);
``group`` one per output channel and group of ``group_size`` input columns; ``token`` one per
token (activations, dynamic); ``head`` one per token and attention head (KV cache). ``token`` and
``head`` accept ``g<N>`` to split each token or head vector further. ``ic`` (per-IC, AdaDim,
arXiv 2309.15531): weights, one scale per *input* column and group of ``group_size`` output rows
(``ic`` alone: one per input column), so an input channel hit by activation outliers gets its own
grid; stored as the transposed weight grouped per row (:func:`bitsmith.formats.registry.oriented`).

Formats (the numerics live in :mod:`bitsmith.formats`; :mod:`bitsmith.formats.registry` maps each
name to them):

* ``int``: uniform integers, symmetric or with a zero point.
* ``fp``: minifloat ``ExMy`` times a scale per group (sign-magnitude, so no zero point). The split
  defaults per width: fp8 -> e4m3 (OCP E4M3FN), fp6 -> e3m2, fp4 -> e2m1, fp3 -> e2m0; fp5 and fp7
  must name one. ``fp8:e5m2`` is OCP E5M2 (IEEE-like); other splits have no inf/NaN codes.
* ``nf``: NormalFloat4 (QLoRA) levels times the group absmax (4 bits only).
* ``mxfp``/``mxint``: OCP Microscaling: blocks of 32 consecutive elements along the last dimension
  share a power-of-two E8M0 scale set by the OCP rule (no clipping search). Elements: mxfp4 (e2m1),
  mxfp6 (e3m2 default, e2m3), mxfp8 (e4m3 default, e5m2), mxint8. The block is fixed at 32 by the
  spec (``g32`` implied) and runs along the last dimension whatever the role (weight input
  columns, activation features, KV head dimension), so MX specs suit weights, activations and KV.
* ``bitmod``: BitMoD (3 or 4 bits): each group picks one of four datatypes (a float plus one
  special value) and stores its 2-bit id next to the scale. Weights only (tensor/channel/group).
* ``olive``: OliVe outlier-victim pairs (4 bits: one byte per element pair). Its scale is searched
  by MSE by default, as the paper does (``minmax`` gives plain absmax, i.e. no outlier pairs).
* ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q4_k``, ``q6_k``: GGUF (llama.cpp) block types, typed
  by their name alone (width, block, offset and scale rule are the type's); blocks of 32 (K-quants: 256)
  along the last dimension. Weights on these grids export to GGUF byte for byte (:mod:`bitsmith.export.gguf`).
* ``dg``: dual-grained INT4 (DGQ, arXiv 2310.04836): 4-bit codes in groups (``g<N>`` required) whose
  scales are an INT8 integer per group times one fp16 scale per output channel, so the weight
  dequantizes to INT8 for one int8 x int8 product. Weights only; asymmetric (zero points) and MSE
  clipping by default, as the paper's grid search (:mod:`bitsmith.formats.dual_grained`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from bitsmith.errors import SpecError

GRANULARITIES = ("tensor", "channel", "group", "token", "head", "ic")
CLIPS = ("minmax", "mse")
WEIGHT_GRANULARITIES = ("tensor", "channel", "group", "ic")
ACTIVATION_GRANULARITIES = ("tensor", "token")
KV_GRANULARITIES = ("head", "token")
MX_BLOCK = 32  # OCP MX v1.0: 32 elements share one scale


def _splits(bits: int) -> tuple[str, ...]:
    """Every ``eXmY`` with one sign bit and at least one exponent bit in ``bits`` bits."""
    return tuple(f"e{e}m{bits - 1 - e}" for e in range(bits - 1, 0, -1))


@dataclass(frozen=True)
class FormatRule:
    """What a format accepts: QuantSpec validates every spec against its format's rule."""

    bits: tuple[int, ...]
    granularities: tuple[str, ...] = GRANULARITIES
    elements: Mapping[int, tuple[str, ...]] | None = None  # allowed eXmY per width; None: no element part
    default_element: Mapping[int, str] | None = None
    block: int | None = None  # the only group size allowed (MX)
    clips: tuple[str, ...] = CLIPS
    default_clip: str = "minmax"
    zero_point: bool = False  # whether 'asym' means anything
    default_symmetric: bool = True
    example: str = ""
    named: bool = False  # the name carries the width and fixes everything else (GGUF types: q4_0)
    block_source: str = "OCP MX"  # who fixes the block (error messages)
    clip_note: str = "shared exponents follow the OCP rule (a power of two from the block absmax), so there is no scale to search"


FORMAT_RULES: dict[str, FormatRule] = {
    "int": FormatRule(bits=tuple(range(2, 9)), zero_point=True, example="int4:g64:sym"),
    "fp": FormatRule(bits=tuple(range(3, 9)), elements={b: _splits(b) for b in range(3, 9)},
                     default_element={3: "e2m0", 4: "e2m1", 6: "e3m2", 8: "e4m3"}, example="fp8:e4m3:channel"),
    "nf": FormatRule(bits=(4,), example="nf4:g64"),
    "mxfp": FormatRule(bits=(4, 6, 8), granularities=("group",), elements={4: ("e2m1",), 6: ("e3m2", "e2m3"), 8: ("e4m3", "e5m2")},
                       default_element={4: "e2m1", 6: "e3m2", 8: "e4m3"}, block=MX_BLOCK, clips=("minmax",), example="mxfp4"),
    "mxint": FormatRule(bits=(8,), granularities=("group",), block=MX_BLOCK, clips=("minmax",), example="mxint8"),
    "bitmod": FormatRule(bits=(3, 4), granularities=WEIGHT_GRANULARITIES, example="bitmod3:g64"),
    "olive": FormatRule(bits=(4,), default_clip="mse", example="olive4:g64"),
    "dg": FormatRule(bits=(4,), granularities=("group",), zero_point=True, default_symmetric=False, default_clip="mse",
                     example="dg4:g64"),
}
# GGUF (llama.cpp) block types, numerics in bitsmith.formats.gguf_blocks: fixed blocks along the last
# dimension (32 elements; K-quants 256-element super-blocks), the name fixes width, offset and scale rule.
_GGUF_LEGACY_CLIP = "scales follow llama.cpp's reference rule (block absmax or min-max), so there is nothing to choose"
_GGUF_K_CLIP = "sub-block scales are always searched for least squared error"
for _name, _bits, _block, _affine in (("q8_0", 8, 32, False), ("q4_0", 4, 32, False), ("q4_1", 4, 32, True),
                                      ("q5_0", 5, 32, False), ("q5_1", 5, 32, True), ("q4_k", 4, 256, True),
                                      ("q6_k", 6, 256, False)):
    _k = _name.endswith("_k")
    FORMAT_RULES[_name] = FormatRule(
        bits=(_bits,), granularities=("group",), block=_block, clips=("mse",) if _k else ("minmax",),
        default_clip="mse" if _k else "minmax", zero_point=_affine, default_symmetric=not _affine, example=_name,
        named=True, block_source="GGUF", clip_note=_GGUF_K_CLIP if _k else _GGUF_LEGACY_CLIP)
GGUF_TYPES = tuple(n for n, r in FORMAT_RULES.items() if r.named)
FORMATS = tuple(FORMAT_RULES)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor (see the module docstring for the string form).

    ``element``, ``granularity``, ``symmetric`` and ``clip`` default to the format's own defaults (None here),
    filled in at construction, so a spec always holds its full, explicit meaning.
    """

    format: str = "int"
    bits: int = 8
    granularity: str | None = None
    group_size: int | None = None
    symmetric: bool | None = None
    clip: str | None = None
    clip_ratio: float = 1.0
    element: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.format, str) or self.format not in FORMAT_RULES:
            raise SpecError(f"spec field 'format': unknown format {self.format!r}; supported: {', '.join(FORMATS)}")
        rule = FORMAT_RULES[self.format]
        name = self.format
        if not _is_int(self.bits) or self.bits not in rule.bits:
            raise SpecError(f"spec field 'bits': {self.bits!r} is not a width of {name}; use one of "
                            f"{', '.join(map(str, rule.bits))} (e.g. '{rule.example}')")
        self._check_element(rule)
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen: fill defaults once)
        grouped_only = rule.granularities == ("group",)  # MX blocks, dual-grained groups
        if self.granularity is None:
            set_("granularity", "group" if rule.block or grouped_only else "channel")
        if self.granularity not in GRANULARITIES:
            raise SpecError(
                f"spec field 'granularity': {self.granularity!r} is not one of {', '.join(GRANULARITIES)}"
            )
        if self.granularity not in rule.granularities:
            if rule.block:
                raise SpecError(f"spec field 'granularity': {name} shares one scale per block of {rule.block} consecutive "
                                f"elements along the last dimension ({rule.block_source}) for weights, activations and KV alike; "
                                f"drop {self.granularity!r}")
            if grouped_only:
                raise SpecError(f"spec field 'granularity': {name} quantizes in groups of input columns; "
                                f"use g<N> instead of {self.granularity!r} (e.g. '{rule.example}')")
            raise SpecError(f"spec field 'granularity': {self.granularity!r} does not apply: {name} is a weight format; "
                            f"use one of {', '.join(rule.granularities)}")
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size < 1):
            raise SpecError(f"spec field 'group_size': {self.group_size!r} is not a positive integer")
        if rule.block is not None:
            if self.group_size is None:
                set_("group_size", rule.block)
            elif self.group_size != rule.block:
                raise SpecError(f"spec field 'group_size': {name} blocks are {rule.block} elements by the {rule.block_source} spec; "
                                f"use g{rule.block} or drop g{self.group_size}")
        if self.granularity == "group" and self.group_size is None and grouped_only:
            raise SpecError(f"spec field 'group_size': {name} needs a group size (groups of input columns), "
                            f"e.g. '{rule.example}'")
        if self.granularity == "group" and self.group_size is None:
            raise SpecError("spec field 'group_size': granularity 'group' needs a group size, e.g. g64")
        if self.granularity in ("tensor", "channel") and self.group_size is not None:
            raise SpecError(f"spec field 'group_size': granularity {self.granularity!r} takes no group size")
        if name == "olive" and self.group_size is not None and self.group_size % 2:
            raise SpecError(f"spec field 'group_size': olive quantizes adjacent pairs, so g{self.group_size} "
                            f"must be even (e.g. g{self.group_size + 1})")
        if self.symmetric is None:
            set_("symmetric", rule.default_symmetric)
        if not isinstance(self.symmetric, bool):
            raise SpecError(f"spec field 'symmetric': {self.symmetric!r} is not true/false")
        if rule.named and self.symmetric != rule.default_symmetric:
            raise SpecError(f"spec field 'symmetric': {name} {'stores a minimum per block' if rule.zero_point else 'is symmetric'} "
                            f"by definition; drop '{'sym' if self.symmetric else 'asym'}'")
        if not self.symmetric and not rule.zero_point:
            raise SpecError(f"spec field 'symmetric': {name} levels are symmetric around 0 and store no zero point; drop 'asym'")
        if self.clip is None:
            set_("clip", rule.default_clip)
        if self.clip not in CLIPS:
            raise SpecError(f"spec field 'clip': {self.clip!r} is not one of {', '.join(CLIPS)}")
        if self.clip not in rule.clips:
            raise SpecError(f"spec field 'clip': {name} {rule.clip_note}; drop {self.clip!r}")
        if not isinstance(self.clip_ratio, (int, float)) or isinstance(self.clip_ratio, bool) \
                or not 0.0 < float(self.clip_ratio) <= 1.0:
            raise SpecError(f"spec field 'clip_ratio': {self.clip_ratio!r} is not in (0, 1]")
        if rule.block is not None and self.clip_ratio != 1.0:
            raise SpecError(f"spec field 'clip_ratio': {name} scales follow the {'GGUF type' if rule.named else 'OCP'} rule; "
                            f"drop r{self.clip_ratio:g}")

    def _check_element(self, rule: FormatRule) -> None:
        name, bits = self.format, self.bits
        if rule.elements is None:
            if self.element is not None:
                raise SpecError(f"spec field 'element': {name}{bits} has no exponent/mantissa split; drop {self.element!r}")
            return
        if self.element is None:
            default = (rule.default_element or {}).get(bits)
            if default is None:
                raise SpecError(f"spec field 'element': {name}{bits} has no default split; name one, "
                                f"e.g. '{name}{bits}:{rule.elements[bits][len(rule.elements[bits]) // 2]}'")
            object.__setattr__(self, "element", default)
            return
        if not isinstance(self.element, str) or not re.fullmatch(r"e\d+m\d+", self.element):
            raise SpecError(f"spec field 'element': {self.element!r} is not an exponent/mantissa split such as 'e4m3'")
        if self.element not in rule.elements[bits]:
            raise SpecError(f"spec field 'element': {self.element} does not fit {name}{bits}; "
                            f"use one of {', '.join(rule.elements[bits])}")

    # -- forms --------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        """Parse the typed string form, e.g. ``int4:g64:sym`` or ``fp8:e4m3:token``."""
        if not isinstance(text, str) or not text.strip():
            raise SpecError(f"spec {text!r}: expected a string such as 'int4:g64:sym'")
        parts = [p.strip().lower() for p in text.split(":")]
        m = re.fullmatch(r"([a-z]+)(\d+)", parts[0])
        if parts[0] in FORMAT_RULES and FORMAT_RULES[parts[0]].named:  # GGUF types: q4_0, q4_k, ...
            kw: dict[str, Any] = {"format": parts[0], "bits": FORMAT_RULES[parts[0]].bits[0]}
        elif not m:
            raise SpecError(f"spec {text!r}: first part {parts[0]!r} must be format and bits, e.g. 'int4' or 'fp8' "
                            f"(or a GGUF type: {', '.join(GGUF_TYPES)})")
        else:
            kw = {"format": m.group(1), "bits": int(m.group(2))}
        for part in parts[1:]:
            if part in GRANULARITIES:
                kw["granularity"] = part
            elif re.fullmatch(r"g\d+", part):
                kw["group_size"] = int(part[1:])
            elif part in ("sym", "asym"):
                kw["symmetric"] = part == "sym"
            elif part in CLIPS:
                kw["clip"] = part
            elif re.fullmatch(r"r(\d+(\.\d*)?|\.\d+)", part):
                kw["clip_ratio"] = float(part[1:])
            elif re.fullmatch(r"e\d+m\d+", part):
                kw["element"] = part
            else:
                raise SpecError(
                    f"spec {text!r}: unknown part {part!r}; expected one of "
                    f"{'|'.join(GRANULARITIES)}, g<N>, sym|asym, minmax|mse, r<ratio>, e<X>m<Y>"
                )
        if "group_size" in kw and "granularity" not in kw:
            kw["granularity"] = "group"
        return cls(**kw)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantSpec":
        """Build from the YAML/dict form; unknown keys are errors."""
        if not isinstance(data, Mapping):
            raise SpecError(f"spec {data!r}: expected a mapping or a string such as 'int4:g64:sym'")
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise SpecError(f"spec field {key!r} is unknown; fields are {', '.join(sorted(known))}")
        return cls(**dict(data))

    @classmethod
    def coerce(cls, value: "str | Mapping[str, Any] | QuantSpec") -> "QuantSpec":
        """Accept any of the three forms."""
        if isinstance(value, QuantSpec):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        return cls.from_dict(value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        rule = FORMAT_RULES[self.format]
        if rule.named:
            return self.format
        parts = [f"{self.format}{self.bits}"]
        if rule.elements is not None:
            parts.append(self.element)
        if self.granularity == "group":
            parts.append(f"g{self.group_size}")
        else:
            parts.append(self.granularity)
            if self.group_size is not None:
                parts.append(f"g{self.group_size}")
        if rule.zero_point:
            parts.append("sym" if self.symmetric else "asym")
        if self.clip != rule.default_clip:
            parts.append(self.clip)
        if self.clip_ratio != 1.0:
            parts.append(f"r{self.clip_ratio:g}")
        return ":".join(parts)

    # -- use-site checks ----------------------------------------------------------------------
    def require(self, allowed: tuple[str, ...], role: str) -> "QuantSpec":
        """Check the granularity suits a role (weights, activations, KV cache).

        MX blocks run along the last dimension whatever the role, so they suit every role.
        """
        if FORMAT_RULES[self.format].block is not None:
            return self
        if self.granularity not in allowed:
            raise SpecError(
                f"spec '{self}': granularity {self.granularity!r} does not apply to {role}; use one of {', '.join(allowed)}"
            )
        return self
