"""CPU kernels for saved quantized models: integer products where they beat the fp32 one.

A :class:`~bitsmith.runtime.modules.QuantLinear` computes ``fake_quant(x) @ dequant(W)^T`` in fp32: exact
reference semantics, fp32 speed. :func:`accelerate` attaches a kernel to the layers whose specs a kernel
serves; the layer then calls it instead. Each kernel computes the same function up to float rounding of
the rescale (the integer accumulation is exact), which the tests check against the fake-quant path.

**W8A8** (weights ``int8:channel:sym``; inputs ``int8:token``, symmetric or asymmetric, min-max, dynamic):
fbgemm's u8 x s8 GEMM with int32 accumulation and fp32 output, through the quantized linear operator
that takes the input's per-tensor scale and zero point as arguments
(``quantized::linear_with_input_q_dq_qweight_dq_output_fp32``). We hand it our per-token integer codes
with scale 1, so its quantization is the identity on them. Symmetric inputs share one zero point, 128,
which the operator adds and takes out of the product itself: ``y = s_t * acc * s_w``. Asymmetric inputs
have one zero point per token: we hand it codes already shifted into ``[0, 255]`` with zero point 0 and
remove the zero points afterwards, ``y = s_t * (acc - z_t * rowsum(W_q)) * s_w``. The dynamic operator
(``quantized::linear_dynamic``), used before, measures the input's range itself, so it needed a
pinning row of 0 and 255 and an extra pass over the input: at 512 tokens on 2 threads its GEMM ran
1.2x (192x576) to 2.3x the fp32 product, this one 2.7x to 3.2x.
CPUs without VNNI multiply u8 x s8 pairs into saturating int16 sums (``vpmaddubsw``); the kernel is
only installed after a worst-case self-check (all codes 255 against weights of 127) comes out exact.
Layers that read the same tensor (q/k/v, gate/up: the adapter's residual branches) share one kernel
over their stacked weights (:class:`SharedInputKernel`): the input is quantized once and multiplied in
one GEMM, which took the default model's prefill from 1.40x to 1.50x fp32 and its decode from 0.88x to
1.03x. Very wide layers (the lm_head) run in column blocks (see :class:`Int8Kernel`).

**int4 weight-only** (``int4:g{32,64,128,256}``, symmetric or asymmetric): ATen's packed int4 product
(``_weight_int4pack_mm_for_cpu``), which keeps a quarter of the fp32 weight memory. On this CPU it is
far *slower* than fp32 (decode about 0.07x), so ``"auto"`` never picks it; ``"int4"`` asks for it when
memory matters more than speed. A layer on a kernel drops its dequantized fp32 weight copy. llama.cpp's Q4 kernels
are the fast 4-bit path on CPU: export to GGUF (README, "Export").
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bitsmith.errors import BitsmithError
from bitsmith.formats import integer
from bitsmith.formats.registry import number_format
from bitsmith.runtime.modules import QuantLinear

MODES = ("auto", "int4", "off")
_BLOCK = 4096  # output columns per GEMM of a very wide W8A8 layer (Int8Kernel)


def _quantized_tensor(make: Callable[[], torch.Tensor]) -> torch.Tensor:
    with warnings.catch_warnings():  # torch warns that quantized tensor factories are deprecated
        warnings.simplefilter("ignore")
        return make()


def _prepack(w_s8: torch.Tensor, scale: torch.Tensor):
    """fbgemm's packed form of int8 ``(out, in)`` codes with per-row float scales."""
    zeros = torch.zeros(w_s8.shape[0], dtype=torch.long)
    qw = _quantized_tensor(lambda: torch._make_per_channel_quantized_tensor(w_s8, scale.double(), zeros, 0))
    return torch.ops.quantized.linear_prepack(qw, None)


def _u8_gemm(codes: torch.Tensor, packed, zero: int = 0) -> torch.Tensor:
    """``s_w * (codes @ W_q^T)`` for integer-valued float ``codes`` ``(m, k)`` with ``codes + zero`` in
    [0, 255]: the operator quantizes with scale 1 and zero point ``zero`` (the identity on such codes) and
    takes the zero point out of the integer product itself."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(codes.contiguous(), 1.0, zero, packed)


@functools.lru_cache(maxsize=1)
def int8_gemm_exact() -> bool:
    """Whether fbgemm's u8 x s8 product accumulates without saturation on this CPU (worst case)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines and "x86" not in torch.backends.quantized.supported_engines:
        return False
    k = 256
    try:
        packed = _prepack(torch.full((8, k), 127, dtype=torch.int8), torch.ones(8))
        got = _u8_gemm(torch.full((4, k), 255.0), packed)
    except (RuntimeError, AttributeError):  # no such operator in this build
        return False
    return bool((got == 255.0 * 127 * k).all())


class Int8Kernel:
    """W8A8 through fbgemm (see the module docstring); built once per layer from its packed weight."""

    name = "int8-fbgemm"

    def __init__(self, *layers: QuantLinear) -> None:
        """One kernel for ``layers`` stacked along the output (layers that read the same input, same spec)."""
        w_s8, scales, biases = [], [], []
        for layer in layers:
            spec = layer.packed.spec
            codes = number_format(spec).unpack(layer.packed.data, spec, layer.packed.shape)
            w_s8.append((codes.codes.reshape(layer.packed.shape).to(torch.int16) - 128).to(torch.int8))
            scales.append(codes.scale.reshape(-1).float())
            biases.append(layer.bias if layer.bias is not None else torch.zeros(layer.packed.shape[0]))
        w_s8, w_scale = torch.cat(w_s8), torch.cat(scales)
        self.act = layers[0].act_spec
        self.out_features = w_s8.shape[0]
        # s_w * sum_k W_q, to take out per-token zero points (symmetric inputs leave theirs to the operator)
        rowsum = None if self.act.symmetric else w_s8.sum(dim=1, dtype=torch.int32).float() * w_scale
        bias = None if all(layer.bias is None for layer in layers) else torch.cat(biases).detach().float()
        # Very wide layers (the lm_head: 49152 outputs) run in column blocks: one GEMM writing 512 x 49152
        # floats at once ran at half the speed of the same work in blocks of 4096 outputs, each rescaled
        # while in cache and copied into the result.
        width = _BLOCK if self.out_features > 2 * _BLOCK else self.out_features
        self.blocks = []
        for start in range(0, self.out_features, width):
            cols = slice(start, min(start + width, self.out_features))
            self.blocks.append((cols, _prepack(w_s8[cols].contiguous(), w_scale[cols]),
                                None if rowsum is None else rowsum[cols], None if bias is None else bias[cols]))

    @staticmethod
    def serves(layer: QuantLinear) -> bool:
        w, a = layer.packed.spec if layer.packed is not None else None, layer.act_spec
        return (w is not None and a is not None and w.format == "int" and w.bits == 8 and w.granularity == "channel"
                and w.symmetric and a.format == "int" and a.bits == 8 and a.granularity == "token"
                and a.group_size is None and a.clip == "minmax" and not layer.act_static and layer.act_cross is None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        scale, zero = integer.choose_params(x2, self.act, torch.float32)  # the fake-quant grid, per token
        codes = torch.div(x2, scale).round_()  # the same float ops as fake quant
        if self.act.symmetric:
            zero = None  # one zero point, 128, for every token: the operator adds it and takes it out
        else:
            codes.add_(zero)
        if len(self.blocks) == 1:
            y = self._block(codes, scale, zero, self.blocks[0])
        else:
            y = torch.empty(x2.shape[0], self.out_features)
            for block in self.blocks:
                y[:, block[0]] = self._block(codes, scale, zero, block)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)

    @staticmethod
    def _block(codes, scale, zero, block) -> torch.Tensor:
        # the operator's own quantization (scale 1) clamps to [0, 255], as fake quant clamps the codes
        _, packed, rowsum, bias = block
        if zero is None:  # symmetric: the operator adds the zero point 128 and takes it out of the product
            y = _u8_gemm(codes, packed, 128).mul_(scale)
        else:
            y = _u8_gemm(codes, packed)
            y.addr_(zero.view(-1), rowsum, alpha=-1).mul_(scale)
        return y if bias is None else y.add_(bias)


class SharedInputKernel:
    """The kernel of one of several layers that read the same tensor (q/k/v, gate/up): the first call
    quantizes the input once and runs one GEMM over the stacked weights; the others take their slice.

    A slice is handed out only for the very tensor it was computed from: same object (held until every
    member has taken its slice), unchanged since (its version counter; inference tensors have none and
    are compared against a copy instead). Anything else recomputes, so the result never depends on
    the order or number of calls.
    """

    name = Int8Kernel.name

    def __init__(self, group: _SharedGroup, index: int) -> None:
        self.group, self.index = group, index

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.output(x, self.index)


class _SharedGroup:
    def __init__(self, layers: list[QuantLinear]) -> None:
        self.kernel = Int8Kernel(*layers)
        self.sizes = [layer.packed.shape[0] for layer in layers]
        self._clear()

    def _clear(self) -> None:
        self.x, self.stamp, self.outs, self.left = None, None, None, set()

    @staticmethod
    def _stamp(x: torch.Tensor):
        return x.detach().clone() if x.is_inference() else x._version

    def _holds(self, x: torch.Tensor) -> bool:
        if self.x is not x:
            return False
        return torch.equal(self.stamp, x) if x.is_inference() else self.stamp == x._version

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if index not in self.left or not self._holds(x):
            self.outs = self.kernel(x).split(self.sizes, dim=-1)
            self.x, self.stamp, self.left = x, self._stamp(x), set(range(len(self.sizes)))
        out = self.outs[index]
        self.left.discard(index)
        if not self.left:
            self._clear()
        return out


def _shared_input_groups(model: nn.Module) -> list[list[QuantLinear]]:
    """Linears that read the same tensor, per residual branch (from the model's adapter; none if it has none)."""
    from bitsmith.models.adapter import adapter_for

    if getattr(model, "config", None) is None:
        return []
    try:
        adapter = adapter_for(model)
    except BitsmithError:  # an architecture without an adapter: every layer keeps its own kernel
        return []
    groups = []
    for block in adapter.blocks():
        linears = adapter.block_linears(block)
        for sub in adapter.sublayers(block):
            groups.append([linears[role] for role in sub.inputs])
    return groups


class Int4Kernel:
    """Packed int4 weight-only product (ATen ``_weight_int4pack_mm_for_cpu``): float inputs, a quarter of
    the fp32 weight memory. Its dequantization is ``(q - 8) * scale + offset`` per group, so our
    ``(q - z) * scale`` maps to ``offset = (8 - z) * scale`` (0 when symmetric)."""

    name = "int4-weight"

    def __init__(self, layer: QuantLinear) -> None:
        spec = layer.packed.spec
        out, k = layer.packed.shape
        codes = number_format(spec).unpack(layer.packed.data, spec, layer.packed.shape)
        q = codes.codes.reshape(out, k).to(torch.int32)
        scale = codes.scale.reshape(out, -1).float()
        zero = torch.full_like(scale, 8.0) if codes.zero is None else codes.zero.reshape(out, -1).float()
        self.group = spec.group_size
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.scales_zeros = torch.stack([scale, (8.0 - zero) * scale], dim=-1).transpose(0, 1).contiguous()
        self.bias = layer.bias

    @staticmethod
    def serves(layer: QuantLinear) -> bool:
        w = layer.packed.spec if layer.packed is not None else None
        return (w is not None and layer.act_spec is None and w.format == "int" and w.bits == 4
                and w.granularity == "group" and w.group_size in (32, 64, 128, 256)
                and layer.packed.shape[1] % w.group_size == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


def accelerate(model: nn.Module, mode: str = "auto") -> dict[str, int]:
    """Attach kernels to the quantized linears of ``model`` that one serves; returns a count per kernel.

    ``auto``: only kernels measured faster than fp32 here (W8A8, when :func:`int8_gemm_exact`);
    ``int4``: also the packed int4 weight-only product (less memory, slower); ``off``: remove all kernels.
    """
    if mode not in MODES:
        raise BitsmithError(f"unknown kernel mode {mode!r}; use one of {', '.join(MODES)}")
    kinds = [] if mode == "off" else [Int8Kernel] if mode == "auto" else [Int8Kernel, Int4Kernel]
    if Int8Kernel in kinds and not int8_gemm_exact():
        kinds.remove(Int8Kernel)
    shared: dict[int, SharedInputKernel] = {}  # id(layer) -> its slice of a group's kernel
    if Int8Kernel in kinds:
        for group in _shared_input_groups(model):
            if _fusable(group):
                kernel = _SharedGroup(group)
                shared.update((id(layer), SharedInputKernel(kernel, i)) for i, layer in enumerate(group))
    counts: dict[str, int] = {}
    for module in model.modules():
        if not isinstance(module, QuantLinear):
            continue
        kernel = shared.get(id(module)) or next((k(module) for k in kinds if k.serves(module)), None)
        module.set_kernel(kernel)
        if kernel is not None:
            counts[kernel.name] = counts.get(kernel.name, 0) + 1
            module.drop_float_weight()  # a kernel reads its own copy of the weight
    return counts


def _fusable(group: list) -> bool:
    """Whether one quantization and one GEMM can serve the whole group: all W8A8 on the int8 kernel, same input."""
    return (len(group) > 1 and all(isinstance(m, QuantLinear) and Int8Kernel.serves(m) for m in group)
            and len({m.act_spec for m in group}) == 1 and all(m.input_transform is None for m in group)
            and len({m.packed.shape[1] for m in group}) == 1)


def reference_output(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """The fake-quant result of ``layer`` on ``x`` (what every kernel must match)."""
    w = layer.packed.dequantize()
    xi = layer.transform_input(x)
    if layer.act_spec is not None:
        xi = layer.quantize_input(xi)
    return F.linear(xi, w, layer.bias)
