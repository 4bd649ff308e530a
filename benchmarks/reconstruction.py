"""Learned rounding by block reconstruction on the default model: RTN vs GPTQ vs FlexRound, LRQ, CBQ.

    python benchmarks/reconstruction.py [--settings w4a16,w3a16-g64,w4a8] [--methods rtn,gptq,flexround,lrq,cbq,cbq-single]
                                        [--threads 1] [--tasks piqa,arc_easy --limit 100] [--fresh]

Settings (every block linear; lm_head, embeddings and KV cache float):

* ``w4a16``: int4 weights, one asymmetric min-max grid per output channel;
* ``w3a16-g64``: int3 weights, asymmetric min-max grids per group of 64 inputs;
* ``w4a8``: as ``w4a16`` plus int8 activations per token, asymmetric, dynamic (LRQ's W4A8).

Grids are min-max, not MSE-clipped: MSE clipping cuts the default model's "super weights" and
doubles RTN's perplexity at 4 bits, and the learned methods start from RTN's grid. The learned rows use
the built-in recipes ``<method>-<setting>`` (their budgets are in the recipes); RTN and GPTQ quantize to
exactly the same grids, GPTQ with the same calibration windows (act-order). ``cbq-single`` is the
ablation of CBQ's cross-block window: the ``cbq-<setting>`` recipe with ``window: 1`` and its
``iters`` multiplied by the window (equal steps per block and equal compute; see :func:`single_block`). Each row runs in its own
process; rows are written to ``benchmarks/results/reconstruction.json`` as they finish and a rerun
skips the rows already there (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import run_row

SETTINGS = {
    "w4a16": ("int4:channel:asym", None),
    "w3a16-g64": ("int3:g64:asym", None),
    "w4a8": ("int4:channel:asym", {"spec": "int8:token:asym"}),
}
RESULTS = Path(__file__).parent / "results" / "reconstruction.json"
CALIB = {"samples": 32, "seq": 512}  # the learned recipes' calibration, also given to GPTQ


def recipe(setting: str, method: str) -> dict | None:
    from bitsmith.recipes import builtin_names, load_recipe

    weights, act = SETTINGS[setting]
    acts = [] if act is None else [{"act_quant": act}]
    if method in ("rtn", "gptq"):
        rec = {"steps": acts + [{method: {"weights": weights}}], "calibration": dict(CALIB)}
    elif method == "cbq-single" and f"cbq-{setting}" in builtin_names():
        # the ablation: CBQ's own machinery with windows of one block, at the same compute
        rec = single_block(load_recipe(f"cbq-{setting}").raw)
    elif f"{method}-{setting}" in builtin_names():
        rec = dict(load_recipe(f"{method}-{setting}").raw)
    else:
        return None
    rec["name"] = f"{method}-{setting}"
    return rec


def single_block(raw: dict) -> dict:
    """A CBQ recipe with ``window: 1`` and ``iters`` multiplied by the window, so every block gets the
    same number of Adam steps and the run the same number of block forward/backward passes (within
    one window's worth: 30 windows of 1 block x 2k steps against 29 windows of 2 blocks x k steps)."""
    from bitsmith.recipes import load_recipe

    rec = {**raw, "steps": []}
    for step, built in zip(raw["steps"], load_recipe(raw).steps):
        (name, args), = step.items()
        if name == "cbq":  # the built step holds the values, defaults included
            args = {**args, "iters": built.iters * built.window, "window": 1}
            rec["description"] = f"ablation of {raw['name']}: windows of one block, {args['iters']} Adam steps per block"
        rec["steps"].append({name: args})
    return rec


EXTRAS = """
blocks = [b for s in recipe.steps for b in getattr(s, "report", [])]
if blocks:
    report["params_per_block"] = blocks[0]["params"]
    report["recon_loss_init"] = sum(b["loss_init"] for b in blocks)
    report["recon_loss"] = sum(b["loss"] for b in blocks)
    report["blocks_kept"] = sum(b["kept"] for b in blocks)
    report["blocks"] = blocks
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--methods", default="rtn,gptq,flexround,lrq,cbq")
    ap.add_argument("--seq", type=int, default=512, help="evaluation window")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows")
    ap.add_argument("--tasks", default="", help="zero-shot tasks, comma-separated (empty: none)")
    ap.add_argument("--limit", type=int, default=100, help="items per zero-shot task")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per row (0: torch's default)")
    ap.add_argument("--json", default=str(RESULTS))
    ap.add_argument("--fresh", action="store_true", help="ignore rows already in the JSON file")
    args = ap.parse_args()

    import bitsmith
    from bitsmith.eval.report import format_table, protocol_line

    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in args.tasks.split(",") if t]
    done = {} if args.fresh or not path.exists() else {r["recipe"]: r for r in json.loads(path.read_text())}
    float_row = done.get("float") or {"recipe": "float", **bitsmith.evaluate(
        "default", seq=args.seq, windows=args.windows, progress=False, tasks=tasks, limit=args.limit if tasks else None)}
    rows = [float_row]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
        base = None
        for method in methods:
            rec = recipe(setting, method)
            if rec is None:
                continue
            row = done.get(rec["name"]) or run_row(rec, args, tasks, EXTRAS)
            if method == "rtn":
                base = row
            elif base is not None:
                row["ppl_vs_rtn"], row["kl_vs_rtn"] = row["ppl"] / base["ppl"], row["kl"] / base["kl"]
            rows.append(row)
            keep = {r["recipe"]: r for r in [*done.values(), *rows]}
            path.write_text(json.dumps(list(keep.values()), indent=1))
            print(f"{row['recipe']}: ppl {row['ppl']:.2f} kl {row['kl']:.4f} top-1 {row['top1']:.3f} "
                  f"in {row['quantize_seconds']:.0f} s", file=sys.stderr, flush=True)

    print(f"model=default  calibration={CALIB['samples']}x{CALIB['seq']} tokens (boolq-calib)  threads={args.threads}  "
          + protocol_line(float_row))
    print(format_table(rows))
    print()
    print(f"{'recipe':22s} {'ppl/float':>9s} {'ppl/RTN':>8s} {'KL/RTN':>7s} {'params/block':>12s} {'recon loss/RTN':>14s}")
    for r in rows[1:]:
        vs = f"{r['ppl_vs_rtn']:8.3f} {r['kl_vs_rtn']:7.3f}" if "ppl_vs_rtn" in r else f"{'-':>8s} {'-':>7s}"
        p = f"{r['params_per_block']:12d}" if "params_per_block" in r else f"{'-':>12s}"
        lr = f"{r['recon_loss'] / r['recon_loss_init']:14.3f}" if "recon_loss" in r else f"{'-':>14s}"
        print(f"{r['recipe']:22s} {r['ppl'] / float_row['ppl']:9.3f} {vs} {p} {lr}")


if __name__ == "__main__":
    main()
