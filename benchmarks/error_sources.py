"""Where the W4A4KV4 error comes from on the default model: each tensor class, each activation role and
each block quantized alone, after the same rotation.

    python benchmarks/error_sources.py [--rotation quarot|spinquant|duquant|none] [--seq 512] [--windows 4]

All weight quantization here is RTN (4-bit per channel, MSE-clipped), activations per token 4-bit
(clip 0.9), KV cache per head 4-bit (clip 0.95): the specs of the ``*-w4a4kv4`` recipes. Three tables:

1. *tensor class*: the rotated model with only the weights, only the activations, only the keys, only
   the values, or everything quantized;
2. *activation role*: from the activation-only model, only the inputs of one kind of linear quantized
   (q/k/v, o, gate/up, down), the others left float;
3. *block*: the fully quantized model's block ``i`` put into the rotated float model, one at a time.

KL is against the float model (a rotation alone leaves it unchanged); a share near 1 in table 3 means
the blocks' errors add up rather than compound.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import bitsmith
from bitsmith.runtime.modules import QuantLinear

W = "int4:channel:sym:mse"
A = "int4:token:asym:r0.9"
KV = "int4:head:asym:r0.95"
ROLES = {"q/k/v": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate/up": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}


def rotation_step(name: str, kv: bool) -> list[dict]:
    if name == "none":
        return []
    if name == "spinquant":
        return [{"spinquant": {"weights": W.replace(":mse", ""), "activations": A, "kv": KV}}]
    return [{name: {"r3": kv}}]


def recipe(rotation: str, weights: bool, acts: bool, key: bool, value: bool, samples: int) -> dict:
    steps = rotation_step(rotation, key or value)
    if acts:
        steps.append({"act_quant": {"spec": A}})
    if key or value:
        steps.append({"kv_quant": {"key": KV if key else None, "value": KV if value else None}})
    if weights:
        steps.append({"rtn": {"weights": W}})
    return {"name": "ablation", "calibration": {"samples": samples, "seq": 512}, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rotation", default="quarot", choices=["none", "quarot", "spinquant", "duquant"])
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences (DuQuant, SpinQuant)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    def measure(lm) -> dict:
        return bitsmith.evaluate(lm, seq=args.seq, windows=args.windows, progress=False)

    def build(**parts) -> "bitsmith.models.LoadedModel":
        return bitsmith.quantize("default", recipe(args.rotation, samples=args.samples, **parts), progress=False)

    start = time.time()
    float_ppl = bitsmith.evaluate("default", seq=args.seq, windows=args.windows, progress=False)["ppl"]
    print(f"model=default rotation={args.rotation} eval={args.windows}x{args.seq} float ppl {float_ppl:.2f}\n")

    print(f"{'quantized (tensor class)':28s} {'ppl':>9s} {'KL':>7s} {'top1':>6s}")
    classes = {"weights only (W4)": dict(weights=True, acts=False, key=False, value=False),
               "activations only (A4)": dict(weights=False, acts=True, key=False, value=False),
               "keys only (K4)": dict(weights=False, acts=False, key=True, value=False),
               "values only (V4)": dict(weights=False, acts=False, key=False, value=True),
               "all (W4A4KV4)": dict(weights=True, acts=True, key=True, value=True)}
    for label, parts in classes.items():
        r = measure(build(**parts))
        print(f"{label:28s} {r['ppl']:9.2f} {r['kl']:7.4f} {r['top1']:6.3f}", flush=True)

    print(f"\n{'activations of (role)':28s} {'ppl':>9s} {'KL':>7s} {'top1':>6s}")
    lm = build(weights=False, acts=True, key=False, value=False)
    linears = [(name.rsplit(".", 1)[-1], m) for name, m in lm.model.named_modules() if isinstance(m, QuantLinear)]
    specs = {id(m): m.act_spec for _, m in linears}
    for label, roles in ROLES.items():
        for leaf, m in linears:
            m.act_spec = specs[id(m)] if leaf in roles else None
        r = measure(lm)
        print(f"{label:28s} {r['ppl']:9.2f} {r['kl']:7.4f} {r['top1']:6.3f}", flush=True)

    print(f"\n{'block alone (all W4A4KV4)':28s} {'ppl':>9s} {'KL':>7s} {'top1':>6s}")
    full = build(weights=True, acts=True, key=True, value=True)
    full_kl = measure(full)["kl"]
    # The rotated float model (no rotation: a no-op step, so it counts as quantized and KL is computed).
    ref_steps = rotation_step(args.rotation, True) or [{"kv_quant": {}}]
    ref = bitsmith.quantize("default", {"name": "rotated float", "calibration": {"samples": args.samples, "seq": 512},
                                        "steps": ref_steps}, progress=False)
    layers_ref, layers_q = ref.adapter.blocks(), full.adapter.blocks()
    container = ref.model.model.layers
    total = 0.0
    for i, block in enumerate(layers_q):
        keep = layers_ref[i]
        container[i] = block
        r = measure(ref)
        container[i] = keep
        total += r["kl"]
        print(f"{'block ' + str(i):28s} {r['ppl']:9.2f} {r['kl']:7.4f} {r['top1']:6.3f}", flush=True)
    print(f"{'sum of block KLs':28s} {'':9s} {total:7.4f}   (all blocks together: {full_kl:.4f})")
    print(f"\n{time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
