"""Outlier handling without rotation on the default model: RTN vs SmoothQuant, OS+, CrossQuant, DGQ, AdaDim.

    python benchmarks/outliers.py [--settings w8a8,w8a8d,w6a6,w4a8,w4a4,w4a16-g64,w3a16-g64]
                                  [--methods rtn,smoothquant,osplus,crossquant,dgq,gptq,adadim,adadim-gptq]
                                  [--samples 128] [--calib-seq 512] [--tasks piqa,arc_easy --limit 100]

Settings (weights per output channel, symmetric, unless stated; activations of every block linear;
KV cache and lm_head float):

* ``w8a8``: int8 weights; int8 activations with *static* per-tensor symmetric scales, calibrated once
  (clipping searched), the hard case of SmoothQuant's W8A8;
* ``w8a8d``: int8 weights; int8 activations per token, dynamic (CrossQuant's W8A8);
* ``w6a6``, ``w4a8``, ``w4a4``: int6/int4 weights (MSE clipping); int6/int8/int4 activations per token,
  asymmetric, dynamic (the protocol under which OmniQuant and OS+ report LLaMA W6A6 and W4A4);
* ``w4a16-g64``, ``w3a16-g64``: weight-only, int4 symmetric / int3 asymmetric in groups of 64, MSE
  clipping (AdaDim's setting).

Methods apply where their paper does (a method/setting pair that does not is skipped): ``smoothquant``,
``osplus`` on the weight-activation settings; ``crossquant`` (dynamic steps from row and column maxima,
symmetric, so not the static ``w8a8``) on the dynamic ones; ``dgq`` (A8W4: INT4 weights in groups of 64
whose scales are INT8 multiples of a per-channel scale, so the product runs in INT8) at ``w4a8``;
``gptq``, ``adadim`` (per layer per-OC or per-IC groups, RTN) and ``adadim-gptq`` on the weight-only
settings. SmoothQuant, OS+ and DGQ rows use the built-in recipes ``<method>-<setting>`` where they exist;
the RTN row of a setting quantizes to exactly the same grids with nothing else (its static scales are
calibrated and clip-searched the same way). Each row runs in its own process; ratios are against the RTN
row of the same setting measured in this run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import run_row

SETTINGS = {
    "w8a8": ("int8:channel:sym", {"spec": "int8:tensor:sym", "static": True}),
    "w8a8d": ("int8:channel:sym", {"spec": "int8:token:sym"}),
    "w6a6": ("int6:channel:sym:mse", {"spec": "int6:token:asym"}),
    "w4a8": ("int4:channel:sym:mse", {"spec": "int8:token:asym"}),
    "w4a4": ("int4:channel:sym:mse", {"spec": "int4:token:asym"}),
    "w4a16-g64": ("int4:g64:sym:mse", None),
    "w3a16-g64": ("int3:g64:asym:mse", None),
}
WEIGHT_ONLY = ("gptq", "adadim", "adadim-gptq")


def applies(setting: str, method: str) -> bool:
    act = SETTINGS[setting][1]
    if method == "rtn":
        return True
    if act is None:
        return method in WEIGHT_ONLY
    if method == "crossquant":
        return not act.get("static", False)
    if method == "dgq":
        return setting == "w4a8"
    return method in ("smoothquant", "osplus")


def _weight_specs(raw: dict) -> set[str]:
    return {args["weights"] for step in raw["steps"] for args in step.values()
            if isinstance(args, dict) and "weights" in args}


def recipe(setting: str, method: str, samples: int, seq: int) -> dict:
    from bitsmith.recipes import builtin_names, load_recipe

    weights, act = SETTINGS[setting]
    acts = [] if act is None else [{"act_quant": act}]
    builtin = f"{method}-{setting}"
    if method == "dgq":  # its own dual-grained grid (dg4:g64) is the method: always the built-in recipe
        rec = dict(load_recipe(builtin).raw)
    elif method != "rtn" and builtin in builtin_names() and _weight_specs(load_recipe(builtin).raw) == {weights}:
        rec = dict(load_recipe(builtin).raw)  # a built-in recipe only where it uses the setting's exact grid
    elif method == "rtn":
        rec = {"steps": acts + [{"rtn": {"weights": weights}}]}
    elif method == "crossquant":  # symmetric by construction (steps from absolute maxima)
        cross = {"spec": act["spec"].replace(":asym", ":sym"), "cross": True}
        rec = {"steps": [{"act_quant": cross}, {"rtn": {"weights": weights}}]}
    elif method == "gptq":
        rec = {"steps": [{"gptq": {"weights": weights}}]}
    elif method.startswith("adadim"):
        solver = "gptq" if method.endswith("gptq") else "rtn"
        rec = {"steps": [{"adadim": {"weights": weights, "solver": solver}}]}
    else:
        args = {"alpha": "search"} if method == "smoothquant" else {}
        rec = {"steps": [{method: args}] + acts + [{"rtn": {"weights": weights}}]}
    rec["name"] = f"{method}-{setting}"
    rec["calibration"] = {"samples": samples, "seq": seq}
    return rec


EXTRAS = """
report["choices"] = [c for s in recipe.steps for c in getattr(s, "choices", [])]
report["clips"] = [c for s in recipe.steps for c in getattr(s, "ratios", [])]
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--methods", default="rtn,smoothquant,osplus,crossquant,dgq,gptq,adadim,adadim-gptq")
    ap.add_argument("--samples", type=int, default=128, help="calibration sequences")
    ap.add_argument("--calib-seq", type=int, default=512, help="calibration sequence length")
    ap.add_argument("--seq", type=int, default=512, help="evaluation window")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows")
    ap.add_argument("--tasks", default="", help="zero-shot tasks, comma-separated (empty: none), e.g. all")
    ap.add_argument("--limit", type=int, default=100, help="items per zero-shot task")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per row (0: torch's default); 1 is faster on a busy machine")
    ap.add_argument("--json", default=None, help="write all rows (with per-group choices) here")
    args = ap.parse_args()

    import bitsmith
    from bitsmith.eval.report import format_table, protocol_line

    tasks = [t for t in args.tasks.split(",") if t]
    float_row = {"recipe": "float", **bitsmith.evaluate("default", seq=args.seq, windows=args.windows, progress=False,
                                                        tasks=tasks, limit=args.limit if tasks else None)}
    rows = [float_row]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
        base = None
        for method in [m for m in methods if applies(setting, m)]:
            row = run_row(recipe(setting, method, args.samples, args.calib_seq), args, tasks, EXTRAS)
            if method == "rtn":
                base = row
            elif base is not None:
                row["ppl_vs_rtn"], row["kl_vs_rtn"] = row["ppl"] / base["ppl"], row["kl"] / base["kl"]
            rows.append(row)
            if args.json:  # after every row, so partial results survive
                Path(args.json).write_text(json.dumps(rows, indent=1))
            print(f"{row['recipe']}: ppl {row['ppl']:.2f} kl {row['kl']:.4f} top-1 {row['top1']:.3f} "
                  f"in {row['quantize_seconds']:.0f} s", file=sys.stderr, flush=True)

    print(f"model=default  calibration={args.samples}x{args.calib_seq} tokens (boolq-calib)  " + protocol_line(float_row))
    print(format_table(rows))
    print()
    print(f"{'recipe':20s} {'ppl/float':>9s} {'ppl/RTN':>8s} {'KL/RTN':>7s}")
    for r in rows[1:]:
        vs = f"{r['ppl_vs_rtn']:8.3f} {r['kl_vs_rtn']:7.3f}" if "ppl_vs_rtn" in r else f"{'-':>8s} {'-':>7s}"
        print(f"{r['recipe']:20s} {r['ppl'] / float_row['ppl']:9.3f} {vs}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
