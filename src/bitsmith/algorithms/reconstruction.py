"""Block reconstruction: the engine FlexRound, LRQ and CBQ share.

Rounding each weight to its nearest level is optimal for the weight, not for what the block
computes; GPTQ corrects this with a quadratic model of one linear at a time. Reconstruction instead
trains the quantization parameters of a whole block (or a window of blocks) by gradient descent so
that the quantized block reproduces the float model's activations on calibration data, which also sees
the attention softmax, the SiLU gate and the interactions between linears that a per-linear
Hessian misses. Rounding is made differentiable with the straight-through estimator; the learned
parameters are then frozen into ordinary integer codes and fp16 scales (a :class:`PackedWeight`),
so nothing downstream knows how they were found.

Every learned quantizer here starts at the round-to-nearest solution (all learned factors are
``exp(0) = 1`` or zero offsets), so iteration 0 reproduces RTN bit for bit and training can only
start from the baseline. After training the learned weights are kept only if they reconstruct the
calibration outputs better than RTN did (they almost always do; the guard makes the method safe).

The pipeline (:func:`bitsmith.pipeline.run_calibrated`) hands a step with ``reconstructs = True`` the
inputs of block ``i`` (from the already quantized blocks, or the float ones with ``float_inputs``)
and, as targets, the float model's activations after it: the papers' ``||W X - W_hat X_q||``, so
each block also corrects the error it is fed; see :class:`Reconstruction`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bitsmith.errors import BitsmithError, SpecError
from bitsmith.formats import gguf_blocks as gb
from bitsmith.formats import integer
from bitsmith.formats.registry import number_format
from bitsmith.registry import Step
from bitsmith.runtime.modules import QuantLinear
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import QuantSpec

log = logging.getLogger(__name__)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def gguf_type(spec: QuantSpec) -> gb.BlockType | None:
    """The GGUF block type of a spec whose grid learned rounding can train: one fp16 scale per block of
    32 and a fixed code offset (Q4_0, Q5_0, Q8_0); None for integer specs."""
    t = gb.TYPES.get(spec.format)
    return t if t is not None and t.sub is None and t.offset is not None else None


def _block_scales(grid: torch.Tensor) -> torch.Tensor:
    """The per-block scale ``(..., nblocks, 1)`` of a symmetric GGUF grid from
    :func:`~bitsmith.formats.gguf_blocks.grid_params`; an all-zero block's 0 becomes 1 (it codes as zero
    with any scale, and the learned grid must not divide by 0)."""
    s0 = grid[..., 0, :]
    return torch.where(s0 == 0, torch.ones_like(s0), s0)


def check_spec(spec: QuantSpec, method: str) -> QuantSpec:
    """Learned rounding needs an integer grid whose groups lie along a weight row: an integer spec or a
    GGUF type with one scale per block and no minimum."""
    if gguf_type(spec) is not None:
        return spec
    if spec.format != "int":
        raise SpecError(f"{method}: learned rounding works on integer grids and on GGUF q4_0, q5_0, q8_0; '{spec}' is "
                        f"{spec.format} (use e.g. int4:channel:asym or q4_0)")
    if spec.granularity not in ("tensor", "channel", "group"):
        raise SpecError(f"{method}: spec '{spec}' is per {spec.granularity}; use tensor, channel or g<N> weights")
    return spec


def low_rank_pair(shape: tuple[int, int], rank: int, gen: torch.Generator, method: str,
                  init: str = "normal") -> tuple[nn.Parameter, nn.Parameter]:
    """Factors ``(left, right)`` of a rank-``rank`` learned ``(rows, cols)`` matrix that starts at zero:
    ``left`` is zero and ``right`` random, so gradients reach both from step one.

    ``init``: ``"normal"``, ``right`` of variance ``1/rank`` (Adam's first steps on ``left`` move the
    product by about the learning rate, but inside the fixed random row space of ``right``);
    ``"lora"``, ``right`` uniform in ``(-1/sqrt(cols), 1/sqrt(cols))`` as LoRA initialises its
    down-projection (PyTorch's default for a linear layer): small, so Adam reshapes ``right`` within
    the first steps and the pair learns its own row space."""
    rows, cols = shape
    if rank > min(rows, cols):
        raise BitsmithError(f"{method}: rank {rank} is larger than the {rows}x{cols} weight allows "
                            f"(at most {min(rows, cols)}); give the step a lower rank")
    if init == "lora":
        right = (torch.rand(rank, cols, generator=gen) * 2 - 1) / cols**0.5
    elif init == "normal":
        right = torch.randn(rank, cols, generator=gen) / rank**0.5
    else:
        raise BitsmithError(f"{method}: init {init!r} must be 'normal' or 'lora'")
    return nn.Parameter(torch.zeros(rows, rank)), nn.Parameter(right)


class LearnedQuantizer(nn.Module):
    """One linear's weight on a learnable integer grid; subclasses say how rounding is learned.

    The weight is kept in its grouped view (:func:`bitsmith.formats.integer.group_view`); the grid
    starts from :func:`bitsmith.formats.integer.choose_params` (fp16 scales) exactly as RTN's, and
    its scale is learned as ``s0 * exp(t)`` so Adam's steps are relative to each group's scale and
    the grid can grow back past a clipped range. Zero points stay fixed (they are stored as bytes).

    On a GGUF type (:func:`gguf_type`) the grid starts from llama.cpp's reference block scale (signed:
    the block's largest-magnitude weight sits on the lowest code), or after :meth:`search_grid` from
    the importance-weighted one GPTQ uses; the zero point is the type's code offset, and the frozen
    weight is the type's records, so it exports to GGUF byte for byte. The first step is
    round-to-nearest on that stored fp16 grid, which can differ from llama.cpp's own bytes where a
    weight lies within fp16 rounding of a half step.
    """

    def __init__(self, weight: torch.Tensor, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.shape = tuple(weight.shape)
        w = weight.detach().float()
        self.register_buffer("w", w.clone())
        wg = integer.group_view(w, spec)
        self.block_type = gguf_type(spec)
        if self.block_type is None:
            s0, z = integer.choose_params(wg, spec, torch.float16)
            self.qmax = (1 << spec.bits) - 1
        else:
            s0 = _block_scales(gb.grid_params(wg, self.block_type))
            z = torch.full_like(s0, float(self.block_type.offset))
            self.qmax = self.block_type.levels - 1
        self.register_buffer("s0", s0)
        self.register_buffer("zero", z)
        self.log_s = nn.Parameter(torch.zeros_like(s0))

    @torch.no_grad()
    def search_grid(self, importance: torch.Tensor) -> None:
        """GGUF types: start from the block scales of least squared error weighted by ``importance`` (the
        mean squared input of each weight column, as llama.cpp's importance matrix and GPTQ's grid use),
        instead of the reference absmax rule; call before training."""
        if self.block_type is None:
            raise BitsmithError(f"search_grid: '{self.spec}' is not a GGUF type")
        wg = self.grouped(self.w)
        grid = number_format(self.spec).column_grid(wg, self.spec, self.grouped(importance.float()[None, :]))
        self.s0.copy_(_block_scales(grid))

    def grouped(self, t: torch.Tensor) -> torch.Tensor:
        """An ``(out, in)`` tensor in the weight's grouped view."""
        return integer.group_view(t, self.spec)

    def scale(self, storage: bool = False) -> torch.Tensor:
        """The grid step per group; ``storage``: rounded to fp16 as it will be stored."""
        s = self.s0 * torch.exp(self.log_s)
        if storage and self.block_type is None:
            s = integer._store_scale(s.detach(), torch.float16)
        elif storage:  # GGUF scales are signed; keep them off fp16's zero
            s = s.detach()
            s = gb._fp16(torch.copysign(s.abs().clamp_min(2.0**-24), s))
        return s

    def unrounded(self, scale: torch.Tensor) -> torch.Tensor:
        """The grouped weight in units of the grid step, before rounding (subclasses modify it)."""
        return self.grouped(self.w) / scale

    def fake_weight(self, storage: bool = False) -> torch.Tensor:
        """The quantized-dequantized weight ``(out, in)``, differentiable in the learned parameters.

        With ``storage`` the scale is the stored fp16 one and rounding is exact: this is what the
        frozen :class:`PackedWeight` dequantizes to, bit for bit.
        """
        s = self.scale(storage)
        x = self.unrounded(s)
        q = torch.round(x) if storage else round_ste(x)
        q = torch.clamp(q + self.zero, 0, self.qmax)
        return ((q - self.zero) * s).reshape(self.shape)

    @torch.no_grad()
    def freeze(self) -> PackedWeight:
        """Integer codes and fp16 scales of the learned weight, packed like RTN's."""
        s = self.scale(storage=True)
        codes = torch.clamp(torch.round(self.unrounded(s)) + self.zero, 0, self.qmax).to(torch.uint8)
        if self.block_type is not None:
            return PackedWeight.from_codes(gb.GGUFCodes(codes, s), self.spec, self.shape)
        zero = None if self.spec.symmetric else self.zero.to(torch.uint8)
        return PackedWeight.from_codes(integer.IntCodes(codes, s, zero), self.spec, self.shape)

    def learned_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self, lr: float, scale_lr: float) -> list[dict]:
        """Adam parameter groups: the grid scale and the method's rounding parameters."""
        rest = [p for n, p in self.named_parameters() if n != "log_s"]
        return [{"params": [self.log_s], "lr": scale_lr}, {"params": rest, "lr": lr}]


class _Learning(nn.Module):
    """Stands in for a linear during training: its input path (online transform, activation
    quantization with a straight-through gradient), then the quantizer's fake weight."""

    def __init__(self, linear: nn.Module, quantizer: LearnedQuantizer) -> None:
        super().__init__()
        self.linear = linear
        self.quantizer = quantizer
        self._weight: torch.Tensor | None = None  # cached within one forward pass of the block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.linear
        if isinstance(lin, QuantLinear):
            x = lin.transform_input(x)
            if lin.act_spec is not None:
                x = x + (lin.quantize_input(x.detach()) - x).detach()
        w = self._weight if self._weight is not None else self.quantizer.fake_weight()
        return F.linear(x, w, lin.bias)


@dataclass
class TrainResult:
    loss_init: float  # before training: RTN's, or (in a later window) the carried-over parameters
    loss: float
    iters: int
    kept: bool  # False: the learned weights reconstructed worse than RTN and were dropped
    seconds: float


def _first(out):
    return out[0] if isinstance(out, tuple) else out


class BlockKwargs(dict):
    """The keyword arguments a model gives its blocks for one chunk: block 0's, plus those of each other
    kind of block (Gemma's sliding-window layers get another mask and rotary table than its global
    ones); :meth:`for_block` picks a block's by its kind (``kind_of``, from the adapter)."""

    def __init__(self, first: dict, by_kind: dict | None = None, kind_of: Callable | None = None) -> None:
        super().__init__(first)
        self.by_kind, self.kind_of = by_kind or {}, kind_of

    def for_block(self, block: nn.Module) -> dict:
        return self.by_kind.get(self.kind_of(block), self) if self.kind_of is not None else self


def block_kwargs(kw: dict, block: nn.Module) -> dict:
    """``kw`` as ``block`` takes it (a plain dict serves every block)."""
    return kw.for_block(block) if isinstance(kw, BlockKwargs) else kw


def slice_kwargs(kw: Any, batch: int, n: int) -> Any:
    """Block keyword arguments for ``n`` sequences, given those captured for ``batch`` sequences.

    Calibration windows are full length with no padding, so masks and rotary tables are the same
    for every sequence: a tensor with a batch dimension is cut to its first ``n`` rows.
    """
    if torch.is_tensor(kw):
        return kw[:n] if kw.dim() > 0 and kw.shape[0] == batch and batch > 1 else kw
    if isinstance(kw, (tuple, list)):
        return type(kw)(slice_kwargs(k, batch, n) for k in kw)
    if isinstance(kw, BlockKwargs):
        return BlockKwargs(slice_kwargs(dict(kw), batch, n),
                           {k: slice_kwargs(v, batch, n) for k, v in kw.by_kind.items()}, kw.kind_of)
    if isinstance(kw, dict):
        return {k: slice_kwargs(v, batch, n) for k, v in kw.items()}
    return kw


class FloatActivations:
    """Context: the block's QuantLinears run with float inputs (for the float targets)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        self.mods = [m for b in blocks for m in b.modules() if isinstance(m, QuantLinear)]

    def __enter__(self):
        self.saved = [m.act_spec for m in self.mods]
        for m in self.mods:
            m.act_spec = None

    def __exit__(self, *exc):
        for m, a in zip(self.mods, self.saved):
            m.act_spec = a


def run_blocks(blocks: list[nn.Module], x: torch.Tensor, kw: dict) -> torch.Tensor:
    for b in blocks:
        x = _first(b(x, **block_kwargs(kw, b)))
    return x


@torch.no_grad()
def observe_linear_inputs(blocks: list[nn.Module], linears: dict[Any, nn.Module], inputs: torch.Tensor, kwargs: dict,
                          kw_batch: int, observe) -> None:
    """Run ``blocks`` over the calibration ``inputs`` (batches of ``kw_batch`` sequences) and call
    ``observe(key, x)`` with what each of ``linears`` (key -> module inside ``blocks``) multiplies its
    weight by: its input after a QuantLinear's online transform (activation quantization aside)."""
    def hook(m, args, key):
        x = args[0].detach()
        observe(key, m.transform_input(x) if isinstance(m, QuantLinear) else x)

    hooks = [m.register_forward_pre_hook(lambda m, args, key=key: hook(m, args, key)) for key, m in linears.items()]
    try:
        for i in range(0, inputs.shape[0], kw_batch):
            x = inputs[i : i + kw_batch]
            run_blocks(blocks, x, slice_kwargs(kwargs, kw_batch, x.shape[0]))
    finally:
        for h in hooks:
            h.remove()


LOSSES = ("mse", "normalized")


def check_loss(loss: str, who: str) -> str:
    """``loss`` if it names a reconstruction loss, else a clear error naming ``who`` asked for it."""
    if loss not in LOSSES:
        raise BitsmithError(f"{who}: loss {loss!r} must be one of {', '.join(LOSSES)}")
    return loss


@dataclass
class TrainConfig:
    iters: int
    batch: int  # sequences per Adam step
    lr: float
    scale_lr: float
    patience: int  # stop after this many steps without a better (smoothed) loss; 0: never
    seed: int
    loss: str = "mse"  # or "normalized": each token's squared error over its target's mean square


def train_blocks(adapter, blocks: list[nn.Module], quantizers: list[dict[str, LearnedQuantizer]], inputs: torch.Tensor,
                 kwargs: dict, kw_batch: int, targets: torch.Tensor | list[torch.Tensor], cfg: TrainConfig,
                 progress: bool = True, desc: str = "reconstruct") -> TrainResult:
    """Train ``quantizers`` (one dict role -> quantizer per block) so ``blocks`` applied in order to
    ``inputs`` (sequences, seq, hidden) reproduce ``targets``; Adam, cosine-decayed learning rate,
    mini-batches of ``cfg.batch`` sequences drawn with a generator seeded by ``cfg.seed``.

    ``targets`` is the last block's target output, or a list of one target per block: then the loss
    is the sum of the blocks' mean squared errors (each block's output is held to its own target).

    The quantizers are left at the learned parameters, or back at RTN (``kept=False``) if those
    reconstruct the whole calibration set worse than RTN does.
    """
    t0 = time.perf_counter()
    n = inputs.shape[0]
    batch = min(cfg.batch, n)
    per_block = isinstance(targets, (list, tuple))
    if per_block and len(targets) != len(blocks):
        raise BitsmithError(f"{desc}: {len(targets)} targets for {len(blocks)} blocks")
    per_target = targets[-1].numel() if per_block else targets.numel()
    normalized = check_loss(cfg.loss, desc) == "normalized"

    def window_loss(x: torch.Tensor, rows, kw: dict, reduction: str) -> torch.Tensor:
        """Squared error of the window on ``x`` against the targets' ``rows`` (a slice or an index)."""
        def err(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = t[rows]
            e = (out - t).pow(2)
            if normalized:
                e = e / t.pow(2).mean(-1, keepdim=True).clamp_min(1e-12)
            return e.sum() if reduction == "sum" else e.mean()

        if not per_block:
            return err(run_blocks(blocks, x, kw), targets)
        loss = 0.0
        for b, t in zip(blocks, targets):
            x = _first(b(x, **block_kwargs(kw, b)))
            loss = loss + err(x, t)
        return loss
    originals = []
    for b, qs in zip(blocks, quantizers):
        lins = adapter.block_linears(b)
        originals.append({r: lins[r] for r in qs})
        for r, q in qs.items():
            adapter.set_block_linear(b, r, _Learning(lins[r], q))
    wrappers = [adapter.block_linears(b)[r] for b, qs in zip(blocks, quantizers) for r in qs]
    params = [q for qs in quantizers for q in qs.values()]
    init_state = [{k: v.detach().clone() for k, v in q.state_dict().items()} for q in params]

    def full_loss() -> float:
        with torch.no_grad():
            for m in wrappers:
                m._weight = m.quantizer.fake_weight(storage=True)
            total = 0.0
            for i in range(0, n, kw_batch):
                x = inputs[i : i + kw_batch]
                total += float(window_loss(x, slice(i, i + kw_batch), slice_kwargs(kwargs, kw_batch, x.shape[0]), "sum"))
            for m in wrappers:
                m._weight = None
        return total / per_target

    try:
        loss_init = full_loss()
        groups = [g for q in params for g in q.param_groups(cfg.lr, cfg.scale_lr)]
        groups = [g for g in groups if g["params"]]
        opt = torch.optim.Adam(groups)
        base = [g["lr"] for g in opt.param_groups]
        gen = torch.Generator().manual_seed(cfg.seed)
        kw = slice_kwargs(kwargs, kw_batch, batch)
        best, since, ema, done = math.inf, 0, None, 0
        bar = tqdm(range(cfg.iters), desc=desc, disable=not progress, leave=False)
        with torch.enable_grad():
            for it in bar:
                for g, lr in zip(opt.param_groups, base):
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * it / cfg.iters))
                idx = torch.randperm(n, generator=gen)[:batch]
                loss = window_loss(inputs[idx], idx, kw, "mean")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done = it + 1
                value = loss.item()
                ema = value if ema is None else 0.9 * ema + 0.1 * value
                bar.set_postfix(loss=f"{value:.3g}", init=f"{loss_init:.3g}")
                if ema < best * (1 - 1e-3):
                    best, since = ema, 0
                else:
                    since += 1
                    if cfg.patience and since >= cfg.patience:
                        break
        loss = full_loss()
        kept = loss <= loss_init
        if not kept:
            log.warning("%s: learned rounding reconstructs worse than RTN (%.4g > %.4g); RTN kept", desc, loss, loss_init)
            for q, st in zip(params, init_state):
                q.load_state_dict(st)
            loss = loss_init
    finally:
        for b, orig in zip(blocks, originals):
            for r, lin in orig.items():
                adapter.set_block_linear(b, r, lin)
    return TrainResult(loss_init, loss, done, kept, time.perf_counter() - t0)


def install(adapter, block: nn.Module, quantizers: dict[str, LearnedQuantizer]) -> None:
    """Replace the block's linears by QuantLinears holding the frozen learned weights (input
    quantization, static scales and online transforms of a QuantLinear are kept)."""
    lins = adapter.block_linears(block)
    for role, q in quantizers.items():
        module = QuantLinear.from_linear(lins[role])
        module.set_packed(q.freeze())
        adapter.set_block_linear(block, role, module)


@dataclass
class Reconstruction(Step):
    """Recipe-step base: block reconstruction of every block linear's weights on ``weights``' grid.

    Arguments shared by the methods: ``iters`` Adam steps per block (window) with ``batch``
    calibration sequences each; ``lr`` for the rounding parameters and ``scale_lr`` for the grid
    scales, both cosine-decayed to zero; ``patience`` early exit; ``float_inputs`` trains block ``i``
    on the float model's inputs instead of the quantized blocks' outputs.

    ``loss``: ``"mse"``, the papers' squared error of the block outputs; ``"normalized"``, each token's
    squared error divided by its target's mean square. The residual stream is read through RMSNorm, so
    what the next block sees of an error is its size relative to the token's. The default model's
    first token carries an attention-sink activation of about 26,000 in one channel from block 11 on,
    and under plain MSE that token is 89% of block 11's error at W3 g64 while the norm makes it harmless.
    At W3 g64 the normalized loss lowers perplexity for every method (same budget, ``lr`` 0.02: FlexRound
    34.36 to 33.88, LRQ 38.52 to 35.39, CBQ 45.68 to 44.29, CBQ with windows of one 42.97 to 40.70). The
    LLM recipes use it with ``lr`` 0.01 (per-channel W4 against plain MSE at 0.02: FlexRound 32.11 to 28.19,
    CBQ 32.06 to 31.30); ``flexround-q4_0`` keeps ``mse`` (not re-measured with it).
    """

    weights: str | dict
    iters: int = 100
    batch: int = 2
    lr: float = 2e-2
    scale_lr: float = 5e-3
    patience: int = 0
    float_inputs: bool = False
    loss: str = "mse"

    calibrated: ClassVar[bool] = True
    reconstructs: ClassVar[bool] = True
    window: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.spec = check_spec(QuantSpec.coerce(self.weights), self.name)
        for key in ("iters", "batch", "patience"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "batch" else 0):
                raise BitsmithError(f"{self.name}: {key} {v!r} must be a {'positive' if key == 'batch' else 'non-negative'} integer")
        check_loss(self.loss, self.name)
        for key in ("lr", "scale_lr"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise BitsmithError(f"{self.name}: {key} {v!r} must be a non-negative number")
        self.report: list[dict] = []
        self._pending: dict[int, dict[str, LearnedQuantizer]] = {}

    def make_quantizer(self, weight: torch.Tensor, gen: torch.Generator) -> LearnedQuantizer:
        raise NotImplementedError

    def preprocess(self, ctx, block: nn.Module, inputs: torch.Tensor, kwargs: dict) -> None:
        """Method-specific, function-preserving rewrite of a block before its quantizers are made."""

    def quantizers(self, ctx, block: nn.Module, index: int, importance: dict[str, torch.Tensor] | None = None
                   ) -> dict[str, LearnedQuantizer]:
        """The block's learned quantizers, made on first use (a window's later blocks keep theirs);
        ``importance`` (role -> mean squared input per column): GGUF grids start from the weighted search."""
        if id(block) not in self._pending:
            gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + index)
            qs = {r: self.make_quantizer(lin.weight, gen) for r, lin in ctx.lm.adapter.block_linears(block).items()}
            for r, imp in (importance or {}).items():
                qs[r].search_grid(imp)
            self._pending[id(block)] = qs
        return self._pending[id(block)]

    def input_importance(self, ctx, blocks: list[nn.Module], inputs: torch.Tensor, kwargs: dict, kw_batch: int
                         ) -> dict[int, dict[str, torch.Tensor]]:
        """Mean squared input of every column of the linears of the window's blocks that have no
        quantizers yet (id(block) -> role -> vector), on the window's calibration inputs."""
        ad = ctx.lm.adapter
        todo = [b for b in blocks if id(b) not in self._pending]
        sums: dict[int, dict[str, torch.Tensor]] = {id(b): {} for b in todo}

        def add(key, x):
            acc, role = sums[key[0]], key[1]
            sq = x.float().pow(2).reshape(-1, x.shape[-1]).sum(0)
            acc[role] = acc[role] + sq if role in acc else sq

        if todo:
            lins = {(id(b), r): lin for b in todo for r, lin in ad.block_linears(b).items()}
            observe_linear_inputs(blocks[: max(blocks.index(b) for b in todo) + 1], lins, inputs, kwargs, kw_batch, add)
        tokens = inputs.shape[0] * inputs.shape[1]
        return {k: {r: v / tokens for r, v in acc.items()} for k, acc in sums.items()}

    def window_targets(self, targets: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """What the window is trained to reproduce, given the float model's activations after each of its blocks:
        the last block's (the window's output)."""
        return targets[-1]

    def reconstruct(self, ctx, blocks: list[nn.Module], first: int, inputs: torch.Tensor, kwargs: dict, kw_batch: int,
                    targets: list[torch.Tensor], last: bool) -> None:
        """Train the window ``blocks`` (block indices from ``first``) on ``inputs`` to reproduce
        :meth:`window_targets` of ``targets`` (the float model's activations after each window block); freeze its
        first block (all of them when ``last``)."""
        ad = ctx.lm.adapter
        imp = self.input_importance(ctx, blocks, inputs, kwargs, kw_batch) if gguf_type(self.spec) else {}
        qs = [self.quantizers(ctx, b, first + j, imp.get(id(b))) for j, b in enumerate(blocks)]
        cfg = TrainConfig(self.iters, self.batch, self.lr, self.scale_lr, self.patience, ctx.seed * 7919 + first,
                          self.loss)
        res = train_blocks(ad, blocks, qs, inputs, kwargs, kw_batch, self.window_targets(targets), cfg, ctx.progress,
                           f"{self.name} block {first}" + (f"-{first + len(blocks) - 1}" if len(blocks) > 1 else ""))
        params = sum(q.learned_parameters() for q in qs[0].values())
        self.report.append({"block": first, "window": len(blocks), "params": params, "loss_init": res.loss_init,
                            "loss": res.loss, "iters": res.iters, "kept": res.kept, "seconds": round(res.seconds, 2)})
        log.info("%s block %d: %d learned parameters, loss %.4g (RTN %.4g) after %d steps", self.name, first, params,
                 res.loss, res.loss_init, res.iters)
        for b in blocks if last else blocks[:1]:
            install(ad, b, self._pending.pop(id(b)))
