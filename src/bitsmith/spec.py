"""The quantization spec: how one tensor is quantized.

A spec is small, validated and serializable. Users type it as a string such as ``int4:g64:sym``
or ``int8:token:asym`` or give it as a dict (YAML). Every field is checked when the spec is
built, so a typo fails at parse time, naming the field, not hours later inside a solver.

String grammar (parts separated by ``:``, any order after the first)::

    int<bits>                   format and width, e.g. int4
    tensor|channel|token|head   granularity (default: channel)
    g<N>                        groups of N along the reduced dimension (alone: per-group weights)
    sym|asym                    symmetric (default) or asymmetric with a zero point
    minmax|mse                  scale search: range of the data, or MSE-optimal clipping
    r<ratio>                    fixed clipping ratio in (0, 1], e.g. r0.9

Granularity meanings: ``tensor`` one scale; ``channel`` one per output channel (weight rows);
``group`` one per output channel and group of ``group_size`` input columns; ``token`` one per
token (activations, dynamic); ``head`` one per token and attention head (KV cache). ``token`` and
``head`` accept ``g<N>`` to split each token or head vector further.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from bitsmith.errors import SpecError

FORMATS = ("int",)
GRANULARITIES = ("tensor", "channel", "group", "token", "head")
CLIPS = ("minmax", "mse")
WEIGHT_GRANULARITIES = ("tensor", "channel", "group")
ACTIVATION_GRANULARITIES = ("tensor", "token")
KV_GRANULARITIES = ("head", "token")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor (see the module docstring for the string form)."""

    format: str = "int"
    bits: int = 8
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    clip: str = "minmax"
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise SpecError(f"spec field 'format': unknown format {self.format!r}; supported: {', '.join(FORMATS)}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise SpecError(f"spec field 'bits': {self.bits!r} is not an integer width in 2..8")
        if self.granularity not in GRANULARITIES:
            raise SpecError(
                f"spec field 'granularity': {self.granularity!r} is not one of {', '.join(GRANULARITIES)}"
            )
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise SpecError(f"spec field 'group_size': {self.group_size!r} is not a positive integer")
        if self.granularity == "group" and self.group_size is None:
            raise SpecError("spec field 'group_size': granularity 'group' needs a group size, e.g. g64")
        if self.granularity in ("tensor", "channel") and self.group_size is not None:
            raise SpecError(f"spec field 'group_size': granularity {self.granularity!r} takes no group size")
        if not isinstance(self.symmetric, bool):
            raise SpecError(f"spec field 'symmetric': {self.symmetric!r} is not true/false")
        if self.clip not in CLIPS:
            raise SpecError(f"spec field 'clip': {self.clip!r} is not one of {', '.join(CLIPS)}")
        if not isinstance(self.clip_ratio, (int, float)) or not 0.0 < float(self.clip_ratio) <= 1.0:
            raise SpecError(f"spec field 'clip_ratio': {self.clip_ratio!r} is not in (0, 1]")

    # -- forms --------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        """Parse the typed string form, e.g. ``int4:g64:sym``."""
        if not isinstance(text, str) or not text.strip():
            raise SpecError(f"spec {text!r}: expected a string such as 'int4:g64:sym'")
        parts = [p.strip().lower() for p in text.split(":")]
        m = re.fullmatch(r"([a-z]+)(\d+)", parts[0])
        if not m:
            raise SpecError(f"spec {text!r}: first part {parts[0]!r} must be format and bits, e.g. 'int4'")
        kw: dict[str, Any] = {"format": m.group(1), "bits": int(m.group(2))}
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
            else:
                raise SpecError(
                    f"spec {text!r}: unknown part {part!r}; expected one of "
                    f"{'|'.join(GRANULARITIES)}, g<N>, sym|asym, minmax|mse, r<ratio>"
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
        parts = [f"{self.format}{self.bits}"]
        if self.granularity == "group":
            parts.append(f"g{self.group_size}")
        else:
            parts.append(self.granularity)
            if self.group_size is not None:
                parts.append(f"g{self.group_size}")
        parts.append("sym" if self.symmetric else "asym")
        if self.clip != "minmax":
            parts.append(self.clip)
        if self.clip_ratio != 1.0:
            parts.append(f"r{self.clip_ratio:g}")
        return ":".join(parts)

    # -- use-site checks ----------------------------------------------------------------------
    def require(self, allowed: tuple[str, ...], role: str) -> "QuantSpec":
        """Check the granularity suits a role (weights, activations, KV cache)."""
        if self.granularity not in allowed:
            raise SpecError(
                f"spec '{self}': granularity {self.granularity!r} does not apply to {role}; use one of {', '.join(allowed)}"
            )
        return self
