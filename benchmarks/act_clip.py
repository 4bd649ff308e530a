"""Linear search of the activation and KV-cache clipping ratios of the W4A4KV4 recipes.

    python benchmarks/act_clip.py [--rotation quarot] [--acts 1.0,0.95,0.9,0.85,0.8] [--kvs 1.0,0.95,0.9,0.85]

QuaRot (arXiv 2404.00456) fixes its clipping ratios (0.9 for per-token activations, 0.95 for the KV
cache) by a linear search; this script repeats that search on the default model. Each point is judged
on the *calibration* half of the built-in text (``boolq-calib``), never on the evaluation half the
README's tables use, so the chosen ratios are not fitted to the reported figures. First the activation
ratio is swept with the KV ratio at its recipe value, then the KV ratio at the best activation ratio.
Weights are RTN W4 per channel (MSE-clipped), as in the ``*-w4a4kv4-rtn`` recipes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import bitsmith
from bitsmith.data.text import builtin_text


def recipe(rotation: str, act: float, kv: float) -> dict:
    steps = [] if rotation == "none" else [{rotation: {}}]
    spec_kv = f"int4:head:asym:r{kv:g}"
    steps += [{"act_quant": {"spec": f"int4:token:asym:r{act:g}"}}, {"kv_quant": {"key": spec_kv, "value": spec_kv}},
              {"rtn": {"weights": "int4:channel:sym:mse"}}]
    return {"name": f"{rotation}-a{act:g}-kv{kv:g}", "calibration": {"samples": 32, "seq": 512}, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rotation", default="quarot", choices=["none", "quarot", "duquant"])
    ap.add_argument("--acts", default="1.0,0.95,0.9,0.85,0.8")
    ap.add_argument("--kvs", default="1.0,0.95,0.9,0.85")
    ap.add_argument("--kv-start", type=float, default=0.95)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "boolq-calib.txt"
        calib.write_text(builtin_text("calib").text)

        def point(act: float, kv: float) -> dict:
            lm = bitsmith.quantize("default", recipe(args.rotation, act, kv), progress=False)
            r = bitsmith.evaluate(lm, text=calib, seq=args.seq, windows=args.windows, progress=False)
            print(f"{act:8.2f} {kv:6.2f} {r['ppl']:9.2f} {r['kl']:7.4f} {r['top1']:6.3f}", flush=True)
            return r

        print(f"rotation={args.rotation}, judged on boolq-calib, {args.windows} x {args.seq} tokens")
        print(f"{'A ratio':>8s} {'KV':>6s} {'ppl':>9s} {'KL':>7s} {'top1':>6s}")
        acts = [float(a) for a in args.acts.split(",")]
        best_act = min(acts, key=lambda a: point(a, args.kv_start)["kl"])
        kvs = [float(k) for k in args.kvs.split(",")]
        best_kv = min(kvs, key=lambda k: point(best_act, k)["kl"])
        print(f"best (least KL on calibration text): activations r{best_act:g}, KV r{best_kv:g}")


if __name__ == "__main__":
    main()
