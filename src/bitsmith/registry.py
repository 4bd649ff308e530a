"""Recipe steps by name: a recipe is data, a method is one file plus one ``@register_step``."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from bitsmith.errors import SpecError

_STEPS: dict[str, type["Step"]] = {}


class Step:
    """One recipe step. Subclasses are dataclasses whose fields are the step's YAML arguments.

    A step works block by block so the pipeline can stream a model through it: ``prepare`` runs
    first on what lies outside the blocks (before any calibration data flows), ``apply_block``
    rewrites one decoder block without data, ``finish`` handles the outside parts at the end
    (embeddings, lm_head). A *calibrated* step (``calibrated = True``) instead gets ``solve`` calls
    from the pipeline with a group of linears that share an input and that input's Hessian. A step
    with ``transforms_inputs = True`` (smoothing, data-fitted rotations) gets ``transform_inputs``
    calls first, with the input's statistics, and reports how it changed that input so the
    solvers after it see the transformed statistics. A *reconstructing* step (``reconstructs = True``:
    FlexRound, LRQ, CBQ) learns the weights of whole blocks instead: the pipeline calls
    ``reconstruct`` with a window of ``window`` blocks, their calibration inputs and the float
    window's outputs as targets (:func:`bitsmith.pipeline.run_reconstruction`).
    ``ctx`` is a :class:`bitsmith.pipeline.Context`.
    """

    name: ClassVar[str] = ""
    calibrated: ClassVar[bool] = False
    transforms_inputs: ClassVar[bool] = False
    reconstructs: ClassVar[bool] = False

    def prepare(self, ctx) -> None:
        """Model-level work before the blocks (rotations fold into the embeddings here)."""

    def apply_block(self, ctx, block) -> None:
        """Rewrite one decoder block (data-free steps)."""

    def finish(self, ctx) -> None:
        """Model-level work after the blocks."""

    def solve(self, linears: dict[str, Any], hessian) -> dict[str, Any]:
        """Calibrated steps: quantized replacements for ``linears`` (roles -> modules) given ``2XX^T/n``."""
        raise NotImplementedError

    def transform_inputs(self, ctx, block, roles: tuple[str, ...], stats) -> Any:
        """Input-transforming steps: rewrite the linears ``roles`` of ``block`` (and what feeds them)
        given their input's :class:`bitsmith.calibration.InputStats`; return the
        :class:`bitsmith.calibration.InputChange` made, or None."""
        return None

    def wants_lm_head(self) -> bool:
        """Calibrated steps: whether the pipeline should also ``solve`` the lm_head."""
        return False

    def weight_grid(self, in_features: int) -> Any:
        """Calibrated steps: the :class:`~bitsmith.spec.QuantSpec` their solution for a block linear with
        ``in_features`` inputs lands on (None: not known), so a smoothing step before them can weigh its
        choices against that grid's rounding error."""
        return None


def register_step(name: str):
    def deco(cls: type[Step]) -> type[Step]:
        if name in _STEPS:
            raise RuntimeError(f"recipe step {name!r} registered twice")
        cls.name = name
        _STEPS[name] = cls
        return cls

    return deco


def step_names() -> list[str]:
    _load_builtin_steps()
    return sorted(_STEPS)


def make_step(name: str, args: dict[str, Any] | None) -> Step:
    """Build a step from its recipe entry; unknown names and arguments fail here, naming them."""
    _load_builtin_steps()
    cls = _STEPS.get(name)
    if cls is None:
        raise SpecError(f"unknown recipe step {name!r}; known steps: {', '.join(sorted(_STEPS))}")
    args = dict(args or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in args:
        if key not in fields:
            raise SpecError(f"recipe step {name!r}: unknown argument {key!r}; arguments: {', '.join(fields) or 'none'}")
    missing = [f for f, spec in fields.items() if f not in args and spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING]
    if missing:
        raise SpecError(f"recipe step {name!r}: missing argument {missing[0]!r}")
    return cls(**args)


def _load_builtin_steps() -> None:
    # Importing the modules runs their @register_step decorators.
    from bitsmith.algorithms import activations, adadim, dgq, duquant, gptq, kv_cache, osplus, quarot, rtn, smoothquant, spinquant  # noqa: F401
    from bitsmith.algorithms import cbq, flexround, lrq  # noqa: F401
