"""Diagnostic: GPTQ on GGUF's Q4_0 grid with its Hessian changed, to see where its error feedback wins and loses.

    python benchmarks/gptq_hessian_variants.py [--variants full,diag,down-diag,drop-first] [--samples 32] [--threads 1]

Variants (every one runs the ``gptq`` step with ``weights: q4_0, act_order: true`` on the default model):

* ``full``: GPTQ as shipped (the ``gptq-q4_0`` recipe, with ``--samples`` calibration windows);
* ``diag``: the Hessian's off-diagonal terms dropped, so no error feedback at all: round-to-nearest on the grid
  that GPTQ searches with the Hessian diagonal as weights (what llama.cpp's importance matrix does);
* ``down-diag``: ``diag`` for the ``down_proj`` layers only (whose inputs hold the first token's massive
  activations, up to about 3000 on the default model), full GPTQ elsewhere;
* ``drop-first``: position 0 of every calibration window left out of every Hessian.

The variants swap ``bitsmith.algorithms.gptq.gptq_quantize`` (and, for ``drop-first``, the calibration
statistics' ``add``) inside their own process: a diagnostic, not a recipe option. Each row runs in its own process and is evaluated as ``bitsmith eval`` does (boolq-eval, 8 windows of 512):
perplexity, KL to the float model, top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

VARIANTS = ("full", "diag", "down-diag", "drop-first")


def run(variant: str, samples: int, threads: int) -> dict:
    import torch

    import bitsmith
    from bitsmith import calibration
    from bitsmith.algorithms import gptq

    torch.set_num_threads(threads)
    model = bitsmith.load_model("default")
    inner = model.adapter.config.intermediate_size  # in_features of down_proj, and of no other linear
    add, solve = calibration.InputStats.add, gptq.gptq_quantize

    def add_without_first(self, x):
        return add(self, x[:, 1:] if x.dim() == 3 and x.shape[1] > 1 else x)

    def diagonal_solve(weight, h, *args, **kwargs):
        if variant == "diag" or (variant == "down-diag" and weight.shape[1] == inner):
            h = torch.diag(torch.diag(h))
        return solve(weight, h, *args, **kwargs)

    if variant == "drop-first":
        calibration.InputStats.add = add_without_first
    gptq.gptq_quantize = diagonal_solve
    recipe = {"name": f"gptq-q4_0-{variant}", "calibration": {"samples": samples, "seq": 512},
              "steps": [{"gptq": {"weights": "q4_0", "act_order": True}}]}
    lm = bitsmith.quantize(model, recipe, progress=False)
    r = bitsmith.evaluate(lm, seq=512, windows=8, progress=False)
    return {"variant": variant, "ppl": r["ppl"], "kl": r["kl"], "top1": r["top1"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--samples", type=int, default=32, help="calibration windows of 512 tokens")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant in this process, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run(args.one, args.samples, args.threads)))
        return
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    print("| Hessian | ppl | KL | top-1 |\n|---|---|---|---|")
    for v in variants:
        out = subprocess.run([sys.executable, __file__, "--one", v, "--samples", str(args.samples), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {v} | {r['ppl']:.2f} | {r['kl']:.3f} | {r['top1']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
