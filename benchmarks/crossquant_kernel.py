"""CrossQuant's quantization kernel on the default model's real activations.

    python benchmarks/crossquant_kernel.py [--windows 2] [--seq 512] [--bits 8,4] [--alpha 0.15]

CrossQuant (arXiv 2410.07505) calls the activation elements quantized to zero the *quantization kernel*
and reports its share for per-token quantization against CrossQuant (LLaMA: per-token INT8 leaves a few
percent in the kernel, CrossQuant under 0.1%). This script measures the same statistic on the inputs of
every block linear of the float default model over windows of the evaluation text (``boolq-eval``),
per input kind (q/k/v share one input, as do gate/up), and the relative error ``||Q(X) - X|| / ||X||``
of each quantizer, with per-token quantization (alpha = 1) as the baseline of the same run.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

import bitsmith
from bitsmith.data.text import builtin_text, eval_windows
from bitsmith.formats import crossquant
from bitsmith.spec import QuantSpec

INPUTS = {"q": "qkv in", "o": "o in", "gate": "gate/up in", "down": "down in"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--alpha", type=float, default=crossquant.ALPHA)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    lm = bitsmith.load_model("default")
    ids = eval_windows(lm.tokenizer, builtin_text("eval"), args.seq, args.windows)
    specs = [crossquant.check(QuantSpec.parse(f"int{b}:token:sym"), args.alpha) for b in args.bits.split(",")]
    # per (input kind, bits, quantizer): [kernel elements, elements, squared error, squared norm]
    acc: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])

    def tap(kind: str):
        def hook(_module, inputs):
            x = inputs[0].float()
            for spec in specs:
                for name, alpha in (("per-token", 1.0), ("crossquant", args.alpha)):
                    q, delta = crossquant.codes(x, spec, alpha)
                    a = acc[(kind, spec.bits, name)]
                    a[0] += float((q == 0).sum())
                    a[1] += q.numel()
                    a[2] += float(((q * delta - x) ** 2).sum())
                    a[3] += float((x ** 2).sum())
        return hook

    handles = []
    for block in lm.adapter.blocks():
        for role, linear in lm.adapter.block_linears(block).items():
            if role in INPUTS:
                handles.append(linear.register_forward_pre_hook(tap(INPUTS[role])))
    for row in ids:  # one window at a time: CrossQuant's column maxima span one sequence
        lm.model(row[None])
    for h in handles:
        h.remove()

    print(f"model=default  text=boolq-eval  {args.windows} x {args.seq} tokens  alpha={args.alpha:g}")
    print(f"{'input':12s} {'bits':>4s} {'kernel per-token':>17s} {'kernel CrossQuant':>18s} {'ratio':>6s} "
          f"{'rel err per-token':>18s} {'rel err CrossQuant':>19s} {'ratio':>6s}")
    for kind in list(INPUTS.values()) + ["all"]:
        for spec in specs:
            def total(name: str) -> list[float]:
                keys = [k for k in acc if k[1] == spec.bits and k[2] == name and (kind == "all" or k[0] == kind)]
                return [sum(acc[k][i] for k in keys) for i in range(4)]
            pt, cq = total("per-token"), total("crossquant")
            kp, kc = pt[0] / pt[1], cq[0] / cq[1]
            ep, ec = (pt[2] / pt[3]) ** 0.5, (cq[2] / cq[3]) ** 0.5
            print(f"{kind:12s} {spec.bits:4d} {kp:17.4%} {kc:18.4%} {kc / max(kp, 1e-12):6.3f} "
                  f"{ep:18.4f} {ec:19.4f} {ec / ep:6.3f}")


if __name__ == "__main__":
    main()
