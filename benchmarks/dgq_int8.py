"""DGQ's int8 x int8 layer product against an fp32 linear of the same shape, on this machine's CPU.

    python benchmarks/dgq_int8.py [--threads N] [--seconds 0.3] [--spec dg4:g64]

Shapes are the default model's (SmolLM2-135M) linears as (out, in): q/o 576x576, gate/up 1536x576,
down 576x1536; prefill of 512 tokens and decode of 1 token. Weights are random, quantized to the spec.
Columns (median milliseconds per call; ratio = time / fp32 time in the same run, below 1 is faster):

* ``fp32``: ``torch.nn.functional.linear`` on float32 input and weight (the baseline);
* ``int8 layer``: :class:`bitsmith.runtime.int8_matmul.Int8Linear`, all of it: per-token int8
  quantization of the input, the int8 x int8 -> int32 product, the per-channel x per-token rescale;
* ``int8 mm``: the integer product alone (the kernel named in the last column);
* ``fake quant``: what a ``QuantLinear`` runs in bitsmith (fake-quantized input times the dequantized fp32 weight).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import median_ms

from bitsmith.formats.registry import fake_quantize
from bitsmith.runtime.int8_matmul import TOKEN_INT8, Int8Linear, int8_mm, quantize_tokens
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import QuantSpec

SHAPES = [("q/o", 576, 576), ("gate/up", 1536, 576), ("down", 576, 1536)]
TOKENS = [("prefill", 512), ("decode", 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seconds", type=float, default=0.3, help="time budget per measurement")
    ap.add_argument("--spec", default="dg4:g64")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    spec = QuantSpec.parse(args.spec)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, weights {spec}, activations {TOKEN_INT8}")
    header = "| layer (out x in) | tokens | fp32 ms | int8 layer ms | ratio | int8 mm ms | ratio | fake quant ms | ratio | kernel |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, out, inp in SHAPES:
        w = torch.randn(out, inp, generator=gen) * 0.05
        packed = PackedWeight.quantize(w, spec)
        lin = Int8Linear.from_packed(packed)
        wq = packed.dequantize()
        wt = lin.weight_s8.t()
        for phase, n in TOKENS:
            x = torch.randn(n, inp, generator=gen)
            xq, _ = quantize_tokens(x)
            fp32 = median_ms(lambda: F.linear(x, w), args.seconds)
            layer = median_ms(lambda: lin(x), args.seconds)
            mm = median_ms(lambda: int8_mm(xq, wt), args.seconds)
            fake = median_ms(lambda: F.linear(fake_quantize(x, TOKEN_INT8), wq), args.seconds)
            print(f"| {name} {out}x{inp} | {phase} {n} | {fp32:.3f} | {layer:.3f} | {layer / fp32:.2f} | "
                  f"{mm:.3f} | {mm / fp32:.2f} | {fake:.3f} | {fake / fp32:.2f} | {lin.kernel} |")


if __name__ == "__main__":
    main()
