"""Baseline recipes on the default model: ppl, KL, top-1, bpw, quantization time, eval speed.

    python benchmarks/baseline.py [--seq 512] [--windows 8] [--tasks all --limit 200]

Ratios are against the float model measured in the same run.
"""

from __future__ import annotations

import argparse
import json

import torch

import bitsmith
from bitsmith.api import BASELINE_RECIPES
from bitsmith.eval.report import format_table, protocol_line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--recipes", default=",".join(BASELINE_RECIPES))
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--tasks", default="")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    tasks = [] if not args.tasks else (["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "lambada"]
                                       if args.tasks == "all" else args.tasks.split(","))
    rows = bitsmith.compare(args.model, args.recipes.split(","), seq=args.seq, windows=args.windows, tasks=tasks,
                            limit=args.limit)
    f = rows[0]
    for r in rows:
        r["ppl_ratio"] = r["ppl"] / f["ppl"]
        r["speed_ratio"] = r["tokens_per_s"] / f["tokens_per_s"]
    print(f"model={args.model}  threads={torch.get_num_threads()}  " + protocol_line(f))
    print(format_table(rows))
    print()
    print("ratios vs float:  " + "  ".join(f"{r['recipe']}: ppl x{r['ppl_ratio']:.3f}, eval speed x{r['speed_ratio']:.2f}" for r in rows[1:]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
