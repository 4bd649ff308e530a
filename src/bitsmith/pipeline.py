"""The recipe runner: applies a recipe's steps to a loaded model, block by block.

Data-free recipes (RTN, activation and KV quantizers) rewrite each block in turn. A recipe with a
calibrated step (GPTQ and later solvers) runs the calibration pipeline:

1. the calibration windows go through the embeddings once; the inputs of block 0 are kept (in
   chunks) together with the keyword arguments the model passes to its blocks (rotary tables, mask);
2. for each block: the data-free steps rewrite it first (so solvers see the block as it will run),
   then each residual branch ``h + body(norm(h))`` runs in two stages over all chunks: ``norm(h)``
   feeds the Hessian of the linears that read it (q/k/v; gate/up), which are solved; then the body
   runs with those *quantized* linears, with its closing linear (o; down) passed through, so its
   inner activation feeds that linear's Hessian; it is solved and the branch output added to ``h``
   (in place), from the inner activation kept from that pass or, past a byte budget, computed again
   chunk by chunk by the same layers (same values);
3. the outputs of block ``i`` (computed by the quantized block) are the inputs of block ``i + 1``.

A reconstructing step (FlexRound, LRQ, CBQ) runs :func:`run_reconstruction` instead: whole blocks
(or windows of blocks) are trained against the float block's outputs on their calibration inputs.

In memory, every matrix product of the block runs once ("true sequential" GPTQ without a second
propagation pass), and the activations held are the hidden states plus one branch's inner activation,
for all calibration tokens (on the default model, 151 + 403 MB for the MLP at 128 x 512 tokens). A
streamed run keeps no inner activation: it computes the branch bodies (not their closing linears)
a second time, so its activations are the hidden states plus one chunk's scratch; the result is
the same to the bit. The streamed run also drops the embeddings while the blocks run
(:func:`bitsmith.models.lazy.park_unchanged`).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from bitsmith.algorithms.reconstruction import (
    BlockKwargs,
    FloatActivations,
    block_kwargs,
    run_blocks,
    slice_kwargs,
)
from bitsmith.calibration import InputStats
from bitsmith.checkpoint import CheckpointWriter
from bitsmith.data.text import Text, calibration_batch
from bitsmith.errors import BitsmithError
from bitsmith.models import LoadedModel, lazy
from bitsmith.models.adapter import Adapter, Sublayer
from bitsmith.recipes import Recipe
from bitsmith.registry import Step

DEFAULT_CALIBRATION = {"samples": 128, "seq": 512}
CHUNK_TOKENS = 4096  # calibration tokens per forward call: bounds attention and MLP scratch memory
# A streamed run keeps no branch inner activation between its two uses (see run_block): it computes
# them again, which bounds its activations at the hidden states plus one chunk's scratch.
STREAMED_HOLD_BYTES = 0


@dataclass
class Context:
    """What a step may use: the model, calibration data (built on first use), the seed."""

    lm: LoadedModel
    calib_text: Text
    seed: int = 0
    progress: bool = True
    calibration_settings: dict = field(default_factory=lambda: dict(DEFAULT_CALIBRATION))
    _calib: torch.Tensor | None = None
    _read_outside: dict = field(default_factory=dict)  # streamed: parameters outside the blocks, as read
    solvers: list = field(default_factory=list)  # the calibrated weight solvers of the running recipe

    def calibration(self) -> torch.Tensor:
        """Calibration token windows, shape (samples, seq), deterministic for the seed."""
        if self._calib is None:
            s = self.calibration_settings
            self._calib = calibration_batch(self.lm.tokenizer, self.calib_text, s["samples"], s["seq"], self.seed)
        return self._calib

    def untie_if_needed(self) -> None:
        """Keep config.tie_word_embeddings honest once the embedding and lm_head differ."""
        ad = self.lm.adapter
        if getattr(ad.config, "tie_word_embeddings", False) and ad.lm_head().weight is not ad.embeddings().weight:
            ad.config.tie_word_embeddings = False


def run_recipe(lm: LoadedModel, recipe: Recipe, calib_text: Text, seed: int = 0, progress: bool = True,
               writer: CheckpointWriter | None = None) -> float:
    """Apply ``recipe`` to ``lm`` in place; returns the seconds it took.

    A streamed model (``lm.weights`` set) needs a ``writer``: each block's weights are read just
    before the block is processed and dropped once the writer has it.
    """
    if lm.weights is not None and writer is None:
        raise BitsmithError("a streamed model needs an output folder: its blocks are written as they are done")
    torch.manual_seed(seed)
    ctx = Context(lm, calib_text, seed, progress, {**DEFAULT_CALIBRATION, **recipe.calibration})
    t0 = time.perf_counter()
    with torch.no_grad():
        if lm.weights is not None:
            lazy.bound_heap_growth()
            ctx._read_outside = lazy.materialize_outside_blocks(lm.model, lm.adapter.blocks(), lm.weights)
            lazy.trim_heap()
        for step in recipe.steps:
            step.prepare(ctx)
        calibrated = any(step.calibrated or step.transforms_inputs for step in recipe.steps)
        blocks = _blocks(ctx, writer, "calibrated blocks" if calibrated else recipe.name)
        if calibrated:
            run_calibrated(ctx, recipe.steps, blocks)
        else:
            for block in blocks:
                for step in recipe.steps:
                    step.apply_block(ctx, block)
        for step in recipe.steps:
            step.finish(ctx)
    ctx.untie_if_needed()
    seconds = time.perf_counter() - t0
    lm.quant = {"recipe": recipe.name, "source": lm.source, "seed": seed, "calib_text": calib_text.name,
                "calibration": dict(ctx.calibration_settings) if ctx._calib is not None else None,
                "quantize_seconds": seconds}
    return seconds


def _blocks(ctx: Context, writer: CheckpointWriter | None, desc: str) -> Iterator[nn.Module]:
    """The decoder blocks in order; a streamed model's block is read before and written and freed after."""
    lm = ctx.lm
    for block in tqdm(lm.adapter.blocks(), desc=desc, disable=not ctx.progress, leave=False):
        if lm.weights is not None:
            lazy.materialize(lm.model, block, lm.weights)
        yield block
        if lm.weights is not None:
            writer.write_block(lm.model, block)
            lazy.release(block)
            lazy.trim_heap()


class _StopForward(Exception):
    pass


def capture_block_inputs(model: nn.Module, adapter: Adapter, tokens: torch.Tensor,
                         chunk_tokens: int = CHUNK_TOKENS) -> tuple[list[torch.Tensor], list[BlockKwargs]]:
    """Hidden states entering block 0 and the keyword arguments the model gives its blocks, per chunk.

    The model runs its embeddings, rotary tables and masks only: each block is replaced for the
    pass by a recorder of its arguments that returns its input (the recorded keyword arguments do
    not depend on the hidden states), and the pass stops at the first block of the last new kind.
    """
    per_chunk = max(1, chunk_tokens // tokens.shape[1])
    blocks = adapter.blocks()
    kinds = [adapter.block_kind(b) for b in blocks]
    last = max(kinds.index(k) for k in set(kinds))
    hidden, kwargs = [], []
    seen: dict = {}  # kind -> keyword arguments, for the chunk being captured

    def recorder(i: int):
        def record(*args, **kw):
            x = args[0] if args else kw.pop("hidden_states")
            if i == 0:
                hidden.append(x.detach().float().clone())
            seen.setdefault(kinds[i], kw)  # hidden_states, if passed by name, was popped above
            if i == last:
                raise _StopForward
            return x
        return record

    for i, block in enumerate(blocks[: last + 1]):
        block.forward = recorder(i)
    try:
        for start in range(0, tokens.shape[0], per_chunk):
            seen = {}
            try:
                adapter.embed_batch(tokens[start : start + per_chunk])
            except _StopForward:
                pass
            kwargs.append(BlockKwargs(seen[kinds[0]], seen, adapter.block_kind))
    finally:
        for block in blocks[: last + 1]:
            del block.forward
    return hidden, kwargs


class _PassThrough(nn.Module):
    """Stands in for a branch's closing linear so the body returns that linear's input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _weight_input(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``linear``'s weight multiplies: ``x`` after the linear's online transform, if it has one."""
    transform = getattr(linear, "transform_input", None)
    return x if transform is None else transform(x)


def _solve(steps: list[Step], linears: dict[str, nn.Module], stats: InputStats) -> dict[str, nn.Module]:
    h = stats.value()
    for step in steps:
        linears = {**linears, **step.solve(linears, h)}
    return linears


def _transform(ctx: Context | None, steps: list[Step], block: nn.Module, roles: tuple[str, ...],
               stats: InputStats, inner: list[torch.Tensor] | None = None, online: bool = False) -> InputStats:
    """Let input-transforming steps rewrite ``roles``; returns the statistics of the new input.

    A change folded upstream makes activations already computed out of date: ``inner`` is emptied
    (the pipeline computes them again with the changed layers). It cannot be made across an online
    transform of the linear's input (``online``).
    """
    for step in steps:
        change = step.transform_inputs(ctx, block, roles, stats)
        if change is None:
            continue
        stats = stats.changed(change)
        if change.upstream and online:
            raise BitsmithError(f"step {step.name!r} folded a change into the layer before {roles[0]}, whose input has an "
                                "online transform in between; put that step before the rotation step in the recipe")
        if change.upstream and inner is not None:
            inner.clear()
    return stats


@contextmanager
def _closing_passed_through(adapter: Adapter, block: nn.Module, role: str) -> Iterator[nn.Module]:
    """The branch's closing linear ``role`` swapped for a pass-through (yielded) while in the block."""
    closing = adapter.block_linears(block)[role]
    adapter.set_block_linear(block, role, _PassThrough())
    try:
        yield closing
    finally:
        adapter.set_block_linear(block, role, closing)


def _inner(sub: Sublayer, h: torch.Tensor, kw: dict) -> torch.Tensor:
    """The branch body's inner activation for the chunk ``h`` (its closing linear passed through)."""
    x = sub.norm(h)
    return _first(sub.body(x, **kw) if sub.takes_block_kwargs else sub.body(x))


def _branch_output(sub: Sublayer, closing: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """What the branch adds to the residual stream, from its inner activation ``a``."""
    y = closing(a)
    return y if sub.post_norm is None else sub.post_norm(y)


def run_block(adapter: Adapter, block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict],
              solvers: list[Step], transformers: list[Step] = (), ctx: Context | None = None,
              hold_bytes: float = math.inf) -> None:
    """Solve one block's linears branch by branch and advance ``hidden`` (in place) through it.

    A branch's inner activation is computed once to gather its closing linear's statistics and is
    needed again, once that linear is solved, to add the branch output to ``hidden``: the chunks
    that fit in ``hold_bytes`` are kept from the first pass, the others computed again by the same
    (quantized) layers, which gives the same values. Chunks are also computed again after a step
    folded a change of that input into the layers producing it.
    """
    gather = bool(solvers or transformers)
    kwargs = [block_kwargs(kw, block) for kw in kwargs]
    for sub in adapter.sublayers(block):
        held: list[torch.Tensor | None] = []  # inner activations of the first chunks, kept within hold_bytes
        if gather:
            first = adapter.block_linears(block)[sub.inputs[0]]
            stats = InputStats(hidden[0].shape[-1], ranges=bool(transformers))
            for h in hidden:
                stats.add(_weight_input(first, sub.norm(h)))
            stats = _transform(ctx, transformers, block, sub.inputs, stats)
            if solvers:
                linears = adapter.block_linears(block)
                for role, module in _solve(solvers, {r: linears[r] for r in sub.inputs}, stats).items():
                    adapter.set_block_linear(block, role, module)
            stats, room = None, hold_bytes
            with _closing_passed_through(adapter, block, sub.output) as closing:
                for i, (h, kw) in enumerate(zip(hidden, kwargs)):
                    a = _inner(sub, h, kw)
                    a_in = _weight_input(closing, a)
                    if stats is None:
                        stats = InputStats(a_in.shape[-1], ranges=bool(transformers))
                    stats.add(a_in)
                    del a_in
                    if len(held) == i and a.nbytes <= room:
                        held.append(a)
                        room -= a.nbytes
                    del a
            online = getattr(closing, "input_transform", None) is not None
            stats = _transform(ctx, transformers, block, (sub.output,), stats, held, online)
            if solvers:
                closing = adapter.block_linears(block)[sub.output]
                adapter.set_block_linear(block, sub.output, _solve(solvers, {sub.output: closing}, stats)[sub.output])
        with _closing_passed_through(adapter, block, sub.output) as closing:
            for i, (h, kw) in enumerate(zip(hidden, kwargs)):
                if i < len(held):
                    a, held[i] = held[i], None
                else:
                    a = _inner(sub, h, kw)
                h.add_(_branch_output(sub, closing, a))
                del a
        del held


def run_calibrated(ctx: Context, steps: list[Step], blocks: Iterable[nn.Module] | None = None) -> None:
    """The calibration pipeline (see the module docstring); ``finish`` of the steps is left to the caller."""
    ad = ctx.lm.adapter
    recon = [s for s in steps if s.reconstructs]
    solvers = [s for s in steps if s.calibrated and not s.transforms_inputs and s not in recon]
    transformers = [s for s in steps if s.transforms_inputs]
    ctx.solvers = solvers
    if recon:
        if len(recon) > 1 or solvers:
            others = [s.name for s in recon[1:] + solvers]
            raise BitsmithError(f"step {recon[0].name!r} learns the weights of whole blocks; it cannot share a recipe "
                                f"with the weight solver(s) {', '.join(others)}")
        run_reconstruction(ctx, steps, recon[0], transformers, blocks)
        return
    streamed = ctx.lm.weights is not None
    tokens = ctx.calibration()
    if streamed:
        lazy.trim_heap()  # what tokenizing the calibration text left
    hidden, kwargs = capture_block_inputs(ctx.lm.model, ad, tokens)
    read, ctx._read_outside = ctx._read_outside, {}
    parked = lazy.park_unchanged(ctx.lm.model, read) if streamed else {}  # the embeddings, mostly
    del read
    hold = STREAMED_HOLD_BYTES if streamed else math.inf
    for block in ad.blocks() if blocks is None else blocks:
        for step in steps:
            step.apply_block(ctx, block)
        run_block(ad, block, hidden, kwargs, solvers, transformers, ctx, hold)
    head_solvers = [s for s in solvers if s.wants_lm_head()]
    if head_solvers:
        lazy.unpark(ctx.lm.model, parked, ctx.lm.weights)
        parked = {}
        hess = InputStats(hidden[0].shape[-1], ranges=False)
        for h in hidden:
            hess.add(ad.final_norm()(h))
        ad.set_lm_head(_solve(head_solvers, {"lm_head": ad.lm_head()}, hess)["lm_head"])
    del hidden, kwargs
    lazy.unpark(ctx.lm.model, parked, ctx.lm.weights)


def _forward(blocks: list[nn.Module], hidden: torch.Tensor, kwargs: dict, batch: int) -> torch.Tensor:
    """``blocks`` applied in order to ``hidden`` (sequences, seq, dim), ``batch`` sequences at a time."""
    out = torch.empty_like(hidden)
    for i in range(0, hidden.shape[0], batch):
        x = hidden[i : i + batch]
        out[i : i + batch] = run_blocks(blocks, x, slice_kwargs(kwargs, batch, x.shape[0]))
    return out


def run_reconstruction(ctx: Context, steps: list[Step], step: Step, transformers: list[Step],
                       blocks: Iterable[nn.Module] | None = None) -> None:
    """Block reconstruction (FlexRound, LRQ, CBQ): ``step.reconstruct`` trains a window of
    ``step.window`` blocks at a time to reproduce the float model's activations after each of them.

    Two streams of activations run through the blocks: the float model's (the targets) and the
    quantized model's (what block ``i`` is fed; the float stream with ``step.float_inputs``). A
    block trained on quantized inputs against the float model's outputs learns to undo the error of
    the blocks before it, as the papers' objective ``||W X - W_hat X_q||`` asks (FlexRound, LRQ,
    CBQ); against the float block's outputs on the quantized inputs it would only copy the float
    block and leave that error to grow.

    For the window starting at block ``i``: each block entering the window gets the data-free steps
    and the input-transforming steps (smoothing), on the inputs it will see; the float window (its
    activations unquantized) maps the float stream to the targets; the step learns and freezes
    block ``i`` (the whole window when it reaches the last block); both streams then move past
    block ``i``. Activations held: both streams and the float output of each window block, for all
    calibration sequences.
    """
    ad = ctx.lm.adapter
    window = max(1, int(getattr(step, "window", 1)))
    if window > 1 and ctx.lm.weights is not None:
        raise BitsmithError(f"step {step.name!r} trains {window} blocks together, which a streamed model cannot hold "
                            "one block at a time; quantize without --stream or use window: 1")
    chunks, kwargs_list = capture_block_inputs(ctx.lm.model, ad, ctx.calibration())
    kw, batch = kwargs_list[0], chunks[0].shape[0]
    hidden = torch.cat(chunks)
    del chunks
    reference = hidden  # the float model's activations (the stream the targets come from)
    source = iter(ad.blocks() if blocks is None else blocks)
    pending: list[nn.Module] = []
    ready: set[int] = set()
    total = len(ad.blocks())
    for first in range(max(1, total - window + 1)):  # the last window freezes all its blocks
        while len(pending) < min(window, total - first):
            pending.append(next(source))
        win = pending[:window]
        x, targets = reference, []
        for j, b in enumerate(win):
            if id(b) not in ready:  # a window's later blocks are prepared on the float stream
                _prepare_block(ctx, steps, transformers, b, hidden if j == 0 else x, kw, batch)
                ready.add(id(b))
            with FloatActivations([b]):
                x = _forward([b], x, kw, batch)
            targets.append(x)
        step.reconstruct(ctx, win, first, hidden, kw, batch, targets, last=first + len(win) >= total)
        reference = targets[0]
        hidden = reference if step.float_inputs else _forward(win[:1], hidden, kw, batch)
        del x, targets
        pending.pop(0)
    for _ in source:  # a streamed model writes its last block when the generator is resumed
        pass
    del hidden, reference


def _prepare_block(ctx: Context, steps: list[Step], transformers: list[Step], block: nn.Module,
                   hidden: torch.Tensor, kwargs: dict, batch: int) -> None:
    """A block as it will run before its weights are learned: data-free steps, then the
    input-transforming ones on its calibration inputs (the block's outputs are not kept)."""
    for s in steps:
        s.apply_block(ctx, block)
    if transformers:
        chunks = [hidden[i : i + batch].clone() for i in range(0, hidden.shape[0], batch)]
        kws = [slice_kwargs(kwargs, batch, c.shape[0]) for c in chunks]
        run_block(ctx.lm.adapter, block, chunks, kws, [], transformers, ctx)
