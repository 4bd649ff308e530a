"""What the channel-smoothing steps share: SmoothQuant (arXiv 2211.10438), OS+ (arXiv 2304.09145).

Both rewrite one *input group* (the linears reading one activation: a branch's input group such
as q/k/v or gate/up, or its closing linear such as o or down) as ``x -> (x - z) / s`` per input
channel, folded into the layer that produces ``x``, and compensate in the weights
(``W -> W diag(s)``) and, for a shift, in the bias (``b -> b + W z``); the float model computes
the same function. Where each piece goes (``upstream`` is the producer of ``x``), by what the
adapter declares of the branch (:class:`bitsmith.models.adapter.Sublayer`):

==========================  ===================================  ========================================
group                       ``1/s`` folded into                  shift ``z`` (OS+)
==========================  ===================================  ========================================
branch inputs (q/k/v ...)   the branch norm's gain               online in each linear (:class:`OnlineShift`)
closing, ``HEADS`` mixing   the feeder's rows (per kv head)      the feeder's bias: softmax rows sum to one
closing, ``PRODUCT``        the feeder's rows (act(gate)*up)     none: act(gate)*up - z is not linear in up
==========================  ===================================  ========================================

An RMSNorm has no bias, so a shift after it runs as a per-channel subtraction inside the linear
(a kernel fuses it into the activation quantizer's zero point). Through ``HEADS`` mixing with GQA,
a kv channel feeds the same channel of every query head of its group, so ``s`` and ``z`` are shared
by those heads.

The searches (SmoothQuant's alpha, OS+'s outlier threshold, the clipping of static activation
scales) minimise the quantized layer's *output* error, which depends on how the rows are
distributed, not only on the aggregate statistics the pipeline hands a step
(:class:`bitsmith.calibration.InputStats`). :class:`InputTap` therefore keeps real rows of each
group's input (the 128 of largest magnitude plus 1024 drawn at random, seeded, weighted to stand
for all calibration rows), caught by forward hooks in the pipeline's own passes (no extra
forward): the branch norm's output while the pipeline gathers the statistics of q/k/v or
gate/up, the branch body's output (its closing linear is a pass-through then) for o and down.
Steps that change an input update the rows exactly, and every reader checks them against the
statistics it is handed (per-channel ranges must agree), so a step that changed an input without
telling the tap is caught instead of searched on stale rows.

Weights: a data-free ``rtn`` step after the smoothing step rounds each block before its
calibration; the smoothing step keeps the float weights, searches with each linear's grid and
re-rounds the smoothed weights on it (see :class:`ChannelSmoothing`). A calibrated solver (``gptq``)
after the smoothing step solves each group after its input was smoothed, and the search counts the
rounding error of the grid the solver will use (round-to-nearest on it stands in for the solver's
result). Searching as if those weights stayed float chose scales that moved the error into them: on
the default model at W8A8 with static activations, GPTQ after OS+ then gave 25.71 against RTN's
25.12; counting the grid, 25.05 (float 24.56). ``v_proj`` and ``up_proj``
are solved before o's and down's scales reach them, and take those scales in their per-row
quantization scales with their codes unchanged (GPTQ is equivariant to scaling a row, so it would
have chosen the same codes); weights with one scale across rows (per tensor, per IC, GGUF blocks)
cannot, and are refused with ``layers: norms`` as the way out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from bitsmith.calibration import InputChange, InputStats
from bitsmith.errors import BitsmithError, SpecError
from bitsmith.formats.registry import fake_quantize
from bitsmith.models.adapter import HEADS, Sublayer, norm_gain, set_norm_gain
from bitsmith.registry import Step
from bitsmith.runtime.modules import QuantLinear, static_fake_quantize, static_input_params
from bitsmith.runtime.online import OnlineShift
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import QuantSpec
from bitsmith.transforms.fold import _assign

TAP_ROWS = 1024  # uniformly drawn rows per group
TAP_HEAVY = 128  # plus the rows with the largest magnitudes (outlier tokens), each standing for itself
LAYERS = ("all", "norms")


# ---------------------------------------------------------------------------------------------
# calibration samples


@dataclass
class _Rows:
    parts: list[torch.Tensor] = field(default_factory=list)
    parts_at: list[torch.Tensor] = field(default_factory=list)
    heavy: torch.Tensor | None = None  # the heaviest rows so far, their magnitudes and row numbers
    heavy_mag: torch.Tensor | None = None
    heavy_at: torch.Tensor | None = None
    seen: int = 0
    x: torch.Tensor | None = None  # (N, d) weight-input rows once consumed
    weight: torch.Tensor | None = None  # (N,) how many calibration rows each stands for
    lo: torch.Tensor | None = None  # exact per-channel range over all rows (None: unknown)
    hi: torch.Tensor | None = None


class InputTap:
    """A stratified sample of each input group's rows for one block (see the module docstring).

    Outlier tokens (a sequence's first token, delimiters) are rare but set static ranges and
    dominate the error of a clipped grid, so a uniform sample would often miss them: the tap keeps
    the ``TAP_HEAVY`` rows of largest magnitude exactly (weight 1) plus ``TAP_ROWS`` drawn uniformly
    from the rest, weighted to stand for all of it. Weighted sums over the kept rows are unbiased
    estimates of sums over every calibration row.
    """

    def __init__(self, adapter, block: nn.Module, total_rows: int, rows: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.keep = torch.randperm(total_rows, generator=gen)[:rows].sort().values
        self.total = total_rows
        self.block = block
        self.groups: dict[tuple[str, ...], _Rows] = {}
        self.handles = []
        for sub in adapter.sublayers(block):
            self._hook(sub.norm, tuple(sub.inputs))
            self._hook(sub.body, (sub.output,))

    @classmethod
    def for_block(cls, ctx, block: nn.Module) -> "InputTap":
        """The tap of ``block`` (installed by the first step asking; the previous block's is dropped)."""
        tap = getattr(ctx, "_input_tap", None)
        if tap is not None and tap.block is block:
            return tap
        cls.close(ctx)
        tap = cls(ctx.lm.adapter, block, ctx.calibration().numel(), TAP_ROWS, ctx.seed)
        ctx._input_tap = tap
        return tap

    @staticmethod
    def close(ctx) -> None:
        tap = getattr(ctx, "_input_tap", None)
        if tap is not None:
            for h in tap.handles:
                h.remove()
            ctx._input_tap = None

    def _hook(self, module: nn.Module, roles: tuple[str, ...]) -> None:
        rows = self.groups[roles] = _Rows()

        def catch(_module, _args, out) -> None:
            if rows.seen >= self.total:  # the pipeline's later passes through the same module
                return
            y = (out[0] if isinstance(out, tuple) else out).detach()
            y = y.reshape(-1, y.shape[-1]).float()
            start, rows.seen = rows.seen, rows.seen + y.shape[0]
            at = torch.arange(start, rows.seen)
            a, b = torch.searchsorted(self.keep, torch.tensor([start, rows.seen])).tolist()
            rows.parts.append(y[self.keep[a:b] - start].clone())
            rows.parts_at.append(self.keep[a:b])
            mag = y.abs().amax(1)
            if rows.heavy is not None:
                y, mag, at = torch.cat([rows.heavy, y]), torch.cat([rows.heavy_mag, mag]), torch.cat([rows.heavy_at, at])
            top = torch.topk(mag, min(TAP_HEAVY, mag.numel())).indices
            rows.heavy, rows.heavy_mag, rows.heavy_at = y[top].clone(), mag[top], at[top]
            lo, hi = y.amin(0).double(), y.amax(0).double()
            rows.lo = lo if rows.lo is None else torch.minimum(rows.lo, lo)
            rows.hi = hi if rows.hi is None else torch.maximum(rows.hi, hi)

        self.handles.append(module.register_forward_hook(catch))

    def samples(self, roles: tuple[str, ...], stats: InputStats, linear: nn.Module,
                who: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, weight)``: rows of what the weights of ``roles`` multiply (after ``linear``'s online
        transform) and the number of calibration rows each stands for."""
        rows = self.groups.get(tuple(roles))
        if rows is None or rows.seen != self.total:
            raise BitsmithError(f"{who}: the calibration rows of the {'/'.join(roles)} input were not captured "
                                f"({0 if rows is None else rows.seen} of {self.total}); this step needs the calibration pipeline")
        if rows.x is None:
            uniform, at = torch.cat(rows.parts), torch.cat(rows.parts_at)
            fresh = ~torch.isin(at, rows.heavy_at)
            uniform = uniform[fresh]
            rest = self.total - rows.heavy.shape[0]
            w = rest / max(uniform.shape[0], 1)
            x = torch.cat([rows.heavy, uniform])
            rows.weight = torch.cat([torch.ones(rows.heavy.shape[0]), torch.full((uniform.shape[0],), w)]).double()
            rows.parts = rows.parts_at = []
            rows.heavy = rows.heavy_mag = rows.heavy_at = None
            transform = getattr(linear, "input_transform", None)
            if transform is not None:
                x = transform(x)
                rows.lo = rows.hi = None
            rows.x = x
        if rows.lo is not None:
            for mine, theirs in ((rows.lo, stats.min), (rows.hi, stats.max)):
                ok = torch.isfinite(theirs)
                tol = 1e-4 * mine[ok].abs().max().clamp_min(1e-12)
                if not torch.allclose(mine[ok], theirs[ok].double(), rtol=1e-4, atol=float(tol)):
                    raise BitsmithError(
                        f"{who}: the calibration rows of the {'/'.join(roles)} input are out of date: a step before it "
                        "changed that input without updating them; put smoothquant/osplus/static act_quant before that step")
        return rows.x, rows.weight

    def update(self, roles: tuple[str, ...], change: InputChange) -> None:
        """Apply an input change to the kept rows and the tracked ranges (as InputStats.changed does)."""
        rows = self.groups[tuple(roles)]
        rows.x = change.apply(rows.x)
        if rows.lo is None:
            return
        if change.matrix is not None:
            rows.lo = rows.hi = None
            return
        lo, hi = rows.lo, rows.hi
        if change.shift is not None:
            lo, hi = lo - change.shift.double(), hi - change.shift.double()
        if change.scale is not None:
            c = change.scale.double()
            lo, hi = torch.minimum(lo * c, hi * c), torch.maximum(lo * c, hi * c)
        rows.lo, rows.hi = lo, hi


# ---------------------------------------------------------------------------------------------
# the quantized output error


def quantize_weight(w: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """RTN on ``spec``'s grid, dequantized (exactly what the runtime will multiply)."""
    return w if spec is None else PackedWeight.quantize(w.float(), spec).dequantize()


STATIC_GRID = torch.linspace(1.0, 0.3, 36).tolist()  # clipping ratios of a static range


def grid_argmin(n: int, err: Callable[[int], float], coarse: int = 4) -> int:
    """Index in ``range(n)`` of the least ``err``, coarse to fine: every ``coarse``-th index, then the
    neighbours of the best (the full scan's optimum wherever the error is unimodal along the grid)."""
    errs: dict[int, float] = {}

    def e(i: int) -> float:
        if i not in errs:
            errs[i] = err(i)
        return errs[i]

    best = min(range(0, n, coarse), key=e)
    for i in range(max(0, best - coarse + 1), min(n, best + coarse)):
        e(i)
    return min(errs, key=lambda i: (errs[i], i))


def static_grid(x: torch.Tensor, lo: float, hi: float, spec: QuantSpec, ratio: float) -> torch.Tensor:
    """``x`` on the static grid of the range ``[lo, hi]`` shrunk by ``ratio``."""
    scale, zero = static_input_params(lo, hi, spec, ratio)
    return static_fake_quantize(x, spec, scale, zero)


@dataclass
class GroupProblem:
    """One input group: kept rows, full-data ranges, weights and the quantizers that will run."""

    x: torch.Tensor  # (N, d) float32 rows of the weight input
    row_weight: torch.Tensor  # (N,) float64 calibration rows each kept row stands for
    lo: torch.Tensor  # (d,) float64 per-channel minimum over all calibration rows
    hi: torch.Tensor
    weights: list[torch.Tensor]  # (out_i, d) float32, current float weights of the group
    wspecs: list[QuantSpec | None]  # the grid each is (or a later solver's result will be) rounded to; None: float
    aspec: QuantSpec | None
    static: bool
    _ref: tuple[Any, torch.Tensor] | None = None

    def _reference(self, xs: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        if self._ref is None or self._ref[0] is not z:
            self._ref = (z, xs @ torch.cat(self.weights).T)
        return self._ref[1]

    def quantize_input(self, xt: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
        """The activation quantizer on ``xt``; a static range gets the clipping the static step would
        pick, found here with the cheap per-channel proxy ``sum_tj (Q(x) - x)_tj^2 ||Wq_:j||^2``."""
        if self.aspec is None:
            return xt
        if not self.static:
            return fake_quantize(xt, self.aspec)
        lo_, hi_ = float(lo.min()), float(hi.max())
        col, rw = wq.pow(2).sum(0), self.row_weight.float()
        ratios = [self.aspec.clip_ratio * g for g in STATIC_GRID]

        def proxy(i: int) -> float:
            return float(((static_grid(xt, lo_, hi_, self.aspec, ratios[i]) - xt).pow_(2) @ col) @ rw)

        return static_grid(xt, lo_, hi_, self.aspec, ratios[grid_argmin(len(ratios), proxy)])

    def error(self, s: torch.Tensor, z: torch.Tensor | None = None) -> float:
        """``sum_i ||(X - z) W_i^T - Q_a((X - z)/s) Q_w(W_i diag(s))^T||^2``, weighted over the kept rows."""
        xs = self.x if z is None else self.x - z.float()
        ref = self._reference(xs, z)
        zz = 0.0 if z is None else z
        wq = torch.cat([quantize_weight(w * s.float(), spec) for w, spec in zip(self.weights, self.wspecs)])
        xq = self.quantize_input(xs / s.float(), (self.lo - zz) / s, (self.hi - zz) / s, wq)
        return float(((ref - xq @ wq.T).double().pow(2).sum(1) * self.row_weight).sum())


@dataclass
class ChannelMap:
    """Weight-input channels -> the channels a fold acts on (kv channels for o under GQA)."""

    index: torch.Tensor  # (d,) source channel of each input channel
    size: int

    @classmethod
    def for_group(cls, adapter, closing: Sublayer | None, d: int) -> "ChannelMap":
        heads, kv = adapter.num_heads, adapter.num_kv_heads
        if closing is not None and closing.mixing == HEADS and kv != heads:
            hd = adapter.head_dim
            if d != heads * hd or heads % kv:
                raise BitsmithError(f"{closing.output} input of {d} channels does not match {heads} heads of {hd}")
            index = ((torch.arange(heads) // (heads // kv))[:, None] * hd + torch.arange(hd)).reshape(-1)
            return cls(index, kv * hd)
        return cls(torch.arange(d), d)

    def expand(self, v: torch.Tensor) -> torch.Tensor:
        return v[self.index]

    def reduce(self, v: torch.Tensor, how: str) -> torch.Tensor:
        """``amax``/``amin`` over the input channels sharing a source channel."""
        return torch.zeros(self.size, dtype=v.dtype).scatter_reduce(0, self.index, v, how, include_self=False)


# ---------------------------------------------------------------------------------------------
# the step skeleton


def _as_quant_linear(adapter, block: nn.Module, role: str) -> QuantLinear:
    linear = adapter.block_linears(block)[role]
    if not isinstance(linear, QuantLinear):
        linear = QuantLinear.from_linear(linear)
        adapter.set_block_linear(block, role, linear)
    return linear


def _set_bias(linear: nn.Module, value: torch.Tensor) -> None:
    if getattr(linear, "bias", None) is None:
        linear.bias = nn.Parameter(value.float(), requires_grad=False)
    else:
        _assign(linear, "bias", value)


class ChannelSmoothing(Step):
    """Recipe-step skeleton: subclasses choose ``(z, s)`` per group in :meth:`choose`.

    A data-free weight quantizer in the recipe (``rtn``) rounds each block before its calibration,
    i.e. before the smoothing scales exist; the step keeps the block's float weights (so it must
    come before ``rtn`` in the recipe), searches with the grid each linear was rounded to, and
    re-rounds the smoothed float weights on that grid (so the result is RTN after smoothing, and
    the calibration passes run the block as it will be). A linear rounded by a calibrated solver
    (``gptq``) after the first group of its block cannot be folded into any more.
    """

    transforms_inputs: ClassVar[bool] = True

    def _validate(self) -> None:
        if self.layers not in LAYERS:
            raise SpecError(f"{self.name}: layers must be one of {', '.join(LAYERS)}, got {self.layers!r}")
        self.choices: list[dict] = []
        self._float: dict[str, torch.Tensor] = {}
        self._rounded_first: set[str] | None = None

    def choose(self, problem: GroupProblem, cmap: ChannelMap,
               closing: Sublayer | None) -> tuple[torch.Tensor | None, torch.Tensor, Any]:
        """``(z, s, label)`` in ``cmap``'s source channels (float64); ``z`` None for no shift. ``closing``:
        the branch whose closing linear the group is (None for a branch's input group)."""
        raise NotImplementedError

    def apply_block(self, ctx, block) -> None:
        InputTap.for_block(ctx, block)
        linears = ctx.lm.adapter.block_linears(block).items()
        self._float = {r: lin.weight.detach() for r, lin in linears if getattr(lin, "packed", None) is None}
        self._rounded_first = None

    def finish(self, ctx) -> None:
        InputTap.close(ctx)
        self._float = {}

    def _weight(self, linear: nn.Module, role: str, why: str, producer: bool = False) -> torch.Tensor | None:
        """The float weight of ``role`` (kept from before a data-free quantizer rounded it); None for a
        ``producer`` (v, up) that a calibrated step already solved with per-row scales, whose rows take
        the fold in their scales (:meth:`PackedWeight.scale_rows`)."""
        if getattr(linear, "packed", None) is None:
            return linear.weight.detach()
        if role not in self._float:
            raise BitsmithError(f"{self.name}: {role} was quantized before {self.name} could keep its float weights; "
                                f"put {self.name} before the weight step (rtn) in the recipe")
        if role not in self._rounded_first:
            if producer and linear.packed.rows_rescalable():
                return None
            raise BitsmithError(f"{self.name}: {role} was solved by a calibrated step (e.g. gptq) with '{linear.packed.spec}' "
                                f"weights before {why}; use per-channel or per-group weights, or layers: norms")
        return self._float[role]

    @staticmethod
    def _grid(ctx, linear: nn.Module) -> QuantSpec | None:
        """The grid ``linear``'s weight is (or will be) rounded to: its own, or the one a solver later in the
        recipe lands on (searching as if the weights stayed float picks scales the solver then pays for)."""
        if getattr(linear, "packed", None) is not None:
            return linear.packed.spec
        grids = [s.weight_grid(linear.weight.shape[1]) for s in getattr(ctx, "solvers", ())]
        return next((g for g in grids if g is not None), None)

    def _set_weight(self, linear: nn.Module, role: str, w: torch.Tensor) -> None:
        """Store the new float weight, re-rounded on its grid if a data-free quantizer rounded it."""
        if getattr(linear, "packed", None) is None:
            _assign(linear, "weight", w)
        else:
            self._float[role] = w.float()
            linear.set_packed(PackedWeight.quantize(w.float(), linear.packed.spec))

    def _check(self, adapter, block, roles: tuple[str, ...]) -> None:
        for role in roles:
            lin = adapter.block_linears(block)[role]
            if getattr(lin, "input_transform", None) is not None:
                raise BitsmithError(f"{self.name}: {role} has an online input transform ({lin.input_transform.kind}); "
                                    "a scale folded into the layer before it cannot pass through it")
            if getattr(lin, "act_static", False) and lin.act_scale is not None:
                raise BitsmithError(f"{self.name}: the static activation scale of {role} was calibrated before "
                                    f"smoothing; put act_quant (static) after {self.name} in the recipe")

    def transform_inputs(self, ctx, block, roles, stats):
        ad = ctx.lm.adapter
        roles = tuple(roles)
        linears = ad.block_linears(block)
        if self._rounded_first is None:  # data-free quantizers ran before the block's first group
            self._rounded_first = {r for r, lin in linears.items() if getattr(lin, "packed", None) is not None}
        found = ad.branch_of(block, roles)
        if found is None:
            raise BitsmithError(f"{self.name}: {'/'.join(roles)} is neither a branch's input group nor its closing linear")
        sub, is_input = found
        closing = None if is_input else sub
        if closing and (self.layers == "norms" or closing.feeder is None):
            return None
        feeder = closing.feeder if closing else None
        self._check(ad, block, roles)
        why = "its input was smoothed" if not closing else f"the {closing.output} input's scale could be folded into it"
        weights = {r: self._weight(linears[r], r, why) for r in roles}
        if feeder:
            weights[feeder] = self._weight(linears[feeder], feeder, why, producer=True)
        first = linears[roles[0]]
        x, row_weight = InputTap.for_block(ctx, block).samples(roles, stats, first, self.name)
        specs = [self._grid(ctx, linears[r]) for r in roles]
        problem = GroupProblem(x, row_weight, stats.min.double(), stats.max.double(), [weights[r].float() for r in roles],
                               specs, getattr(first, "act_spec", None), bool(getattr(first, "act_static", False)))
        cmap = ChannelMap.for_group(ad, closing, x.shape[1])
        z_src, s_src, label = self.choose(problem, cmap, closing)
        if closing and closing.mixing != HEADS and z_src is not None:
            raise BitsmithError(f"internal error: {self.name} chose a shift for the {closing.output} input, which cannot be folded")
        s, z = cmap.expand(s_src), None if z_src is None else cmap.expand(z_src)

        for role in roles:  # the readers: W -> W diag(s), b -> b + W z
            lin = linears[role] if z is None else _as_quant_linear(ad, block, role)
            w = weights[role].double()
            if z is not None:
                _set_bias(lin, w @ z if lin.bias is None else lin.bias.detach().double() + w @ z)
            self._set_weight(lin, role, w * s)
        if closing:  # the producer: rows of v / up divided by s, shifted by z (v only)
            prod = linears[feeder] if z_src is None else _as_quant_linear(ad, block, feeder)
            if weights[feeder] is None:  # solved already: same codes, row scales divided by s
                prod.set_packed(prod.packed.scale_rows(1.0 / s_src))
            else:
                self._set_weight(prod, feeder, weights[feeder].double() / s_src[:, None])
            bias = getattr(prod, "bias", None)
            if z_src is not None:
                _set_bias(prod, ((0.0 if bias is None else bias.detach().double()) - z_src) / s_src)
            elif bias is not None:
                _assign(prod, "bias", bias.detach().double() / s_src)
        else:  # the branch norm's gain absorbs 1/s; the shift runs online in each reader
            norm = sub.norm
            if getattr(norm, "bias", None) is not None:
                raise BitsmithError(f"{self.name}: {type(norm).__name__} has a bias; only RMSNorm-style norms are supported")
            set_norm_gain(norm, norm_gain(norm).double() / s)
            if z is not None:
                for role in roles:
                    ad.block_linears(block)[role].input_transform = OnlineShift(z / s)

        change = InputChange(shift=z, scale=1.0 / s, upstream=True)
        InputTap.for_block(ctx, block).update(roles, change)
        self.choices.append({"block": ad.blocks().index(block), "roles": "/".join(roles), "choice": label})
        return change
