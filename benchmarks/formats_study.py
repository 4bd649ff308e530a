"""INT vs minifloat design-space study on the default model: accuracy against MAC hardware cost, Pareto fronts.

    python benchmarks/formats_study.py [--bits 3,4,5,6,7,8] [--methods rtn,gptq,smoothquant] [--sweeps w,wa]
                                       [--group 0] [--splits best] [--samples 32] [--windows 4]
                                       [--metric kl] [--json out.json] [--png formats_study.png]
    python benchmarks/formats_study.py --load out.json --png formats_study.png   # table and plot again, no runs

After "Post-Training Quantization with Low-precision Minifloats and Integers on FPGAs" (arXiv
2311.12359): integer and minifloat (ExMy) formats of 3 to 8 bits, with the PTQ methods RTN, GPTQ and
SmoothQuant-style equalization, each point's accuracy (perplexity and KL divergence to the float
model) set against the area of its multiply-accumulate unit (:mod:`bitsmith.eval.hwcost`, full-adder
cells, with its int8 x int8 multiple). Two sweeps:

* ``w`` (weight-only, widths 3..8 of ``--bits``): weights ``int<b>:channel:sym:mse`` vs
  ``fp<b>:<split>:channel:mse`` (``--group N``: ``g<N>`` instead of per channel), activations left in
  float; the MAC is a weight x fp16 MAC. Methods ``rtn`` and ``gptq`` (act-order); SmoothQuant has
  nothing to equalize against without an activation grid and is skipped here.
* ``wa`` (W = A, widths 4..8 of ``--bits``): weights per channel as above, activations dynamic per
  token: ``int<b>:token:asym`` vs ``fp<b>:<split>:token`` (no clipping for either). Methods ``rtn``,
  ``gptq`` (on the quantized-activation model) and ``smoothquant`` (alpha 0.5, then RTN).

The minifloat split per width (``--splits best``) is the one of least relative quantization MSE,
chosen before any run and printed: for weights over every block linear (every 8th output row, same
granularity and MSE clipping as the runs), for activations over the inputs of the block linears
(q/k/v, o, gate/up, down) on one calibration window, per token. ``--splits all`` runs every split
instead (in ``wa`` the same split for weights and activations). Both sweeps' integer grids are
symmetric for weights (2^b levels) and asymmetric for activations; minifloats are sign-magnitude
(2^b - 1 distinct values).

Each row runs in its own process; the JSON (``--json``) is rewritten after every row, so partial
results survive. The table marks with ``*`` the points on the Pareto front of their sweep (no other
point of the sweep, the float model included, has both lower-or-equal cost and lower-or-equal
``--metric`` with one strictly lower). The plot (``--png``) draws metric vs cost per sweep with the
front; it needs matplotlib: ``.venv/bin/pip install -r requirements-bench.txt`` (without it the
table and JSON are still written, and one error line says so).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

W_BITS = range(3, 9)
WA_BITS = range(4, 9)
METHODS = ("rtn", "gptq", "smoothquant")
SWEEPS = {"w": "weight-only", "wa": "W=A"}
METHOD_LABELS = {"rtn": "rtn", "gptq": "gptq", "smoothquant": "smoothquant+rtn", "-": "-"}
MPL_HINT = ".venv/bin/pip install -r requirements-bench.txt"


def splits_of(bits: int) -> list[str]:
    """Every minifloat split of ``bits`` bits (one sign bit, at least one exponent bit), most exponent first."""
    return [f"e{e}m{bits - 1 - e}" for e in range(bits - 1, 0, -1)]


def weight_spec(fmt: str, bits: int, split: str | None, group: int) -> str:
    gran = f"g{group}" if group else "channel"
    if fmt == "int":
        return f"int{bits}:{gran}:sym:mse"
    return f"fp{bits}:{split}:{gran}:mse"


def act_spec(fmt: str, bits: int, split: str | None) -> str:
    return f"int{bits}:token:asym" if fmt == "int" else f"fp{bits}:{split}:token"


def recipe(name: str, method: str, wspec: str, aspec: str | None, samples: int, seq: int) -> dict:
    steps: list[dict] = []
    if method == "smoothquant":
        steps.append({"smoothquant": {"alpha": 0.5}})
    if aspec:
        steps.append({"act_quant": {"spec": aspec}})
    if method == "gptq":
        steps.append({"gptq": {"weights": wspec, "act_order": True}})
    else:
        steps.append({"rtn": {"weights": wspec}})
    return {"name": name, "calibration": {"samples": samples, "seq": seq}, "steps": steps}


def plan(args: argparse.Namespace, splits: dict) -> list[dict]:
    """The rows to run: sweep, method, format, width, specs and recipe."""
    bits = [int(b) for b in args.bits.split(",") if b]
    methods = [m for m in args.methods.split(",") if m]
    points = []
    for sweep in [s for s in args.sweeps.split(",") if s]:
        widths = [b for b in bits if b in (W_BITS if sweep == "w" else WA_BITS)]
        for method in methods:
            if sweep == "w" and method == "smoothquant":
                continue
            for b in widths:
                for fmt in ("int", "fp"):
                    if fmt == "int":
                        pairs = [(None, None)]
                    elif args.splits == "all":
                        pairs = [(s, s) for s in splits_of(b)]
                    else:
                        pairs = [(splits["weights"][sweep][str(b)]["best"],
                                  splits["activations"][str(b)]["best"] if sweep == "wa" else None)]
                    for ws, as_ in pairs:
                        w = weight_spec(fmt, b, ws, args.group if sweep == "w" else 0)
                        a = act_spec(fmt, b, as_) if sweep == "wa" else None
                        name = f"{sweep}-{method}-{w}" + (f"-{a}" if a else "")
                        points.append({"sweep": sweep, "method": method, "format": fmt, "bits": b, "weights": w,
                                       "activations": a, "recipe": recipe(name, method, w, a, args.samples, args.calib_seq)})
    return points


def check_args(args: argparse.Namespace) -> None:
    bad = [m for m in args.methods.split(",") if m and m not in METHODS]
    if bad:
        raise SystemExit(f"error: unknown method {bad[0]!r}; use {','.join(METHODS)}")
    bad = [s for s in args.sweeps.split(",") if s and s not in SWEEPS]
    if bad:
        raise SystemExit(f"error: unknown sweep {bad[0]!r}; use {','.join(SWEEPS)}")
    try:
        bits = [int(b) for b in args.bits.split(",") if b]
    except ValueError:
        raise SystemExit(f"error: --bits {args.bits!r} is not a comma-separated list of widths, e.g. 3,4,8") from None
    if not bits or any(b not in W_BITS for b in bits):
        raise SystemExit(f"error: --bits {args.bits!r}: widths must lie in 3..8 (W=A rows use 4..8)")
    if args.group and (576 % args.group or 1536 % args.group):
        raise SystemExit(f"error: --group {args.group} must divide 576 and 1536 (e.g. 32 or 64)")


# -- subprocess bodies --------------------------------------------------------------------------------

SPLITS = r"""
import json, sys
import torch
import bitsmith
from bitsmith.data.text import builtin_text, calibration_batch
from bitsmith.formats.registry import fake_quantize, number_format
from bitsmith.spec import QuantSpec
torch.set_grad_enabled(False)
cfg = json.loads(sys.argv[1])
lm = bitsmith.load_model("default")
ad = lm.adapter
def splits_of(b):
    return [f"e{e}m{b - 1 - e}" for e in range(b - 1, 0, -1)]
weights = [m.weight.detach()[::cfg["row_stride"]].float() for _, m in ad.named_block_linears()]
out = {"weights": {}, "activations": {}}
done = {}
for sweep, job in cfg["weights"].items():
    gran = f"g{job['group']}" if job["group"] else "channel"
    out["weights"][sweep] = {}
    for b in job["bits"]:
        if (b, gran) not in done:
            errs = {}
            for split in splits_of(b):
                spec = QuantSpec.parse(f"fp{b}:{split}:{gran}:mse")
                fmt = number_format(spec)
                rel = [((fmt.dequantize(fmt.quantize(w, spec), spec).reshape(w.shape) - w).pow(2).sum()
                        / w.pow(2).sum()).item() for w in weights]
                errs[split] = sum(rel) / len(rel)
            done[(b, gran)] = {"best": min(errs, key=errs.get), "granularity": gran, "rel_mse": errs}
        out["weights"][sweep][str(b)] = done[(b, gran)]
if cfg["act_bits"]:
    specs = {b: {s: QuantSpec.parse(f"fp{b}:{s}:token") for s in splits_of(b)} for b in cfg["act_bits"]}
    sums = {b: {s: 0.0 for s in specs[b]} for b in specs}
    count = [0]
    def hook(module, inputs):
        x = inputs[0].float().reshape(-1, inputs[0].shape[-1])
        energy = x.pow(2).sum().item()
        for b in specs:
            for s, spec in specs[b].items():
                sums[b][s] += (fake_quantize(x, spec) - x).pow(2).sum().item() / energy
        count[0] += 1
    handles = [ad.block_linears(blk)[role].register_forward_pre_hook(hook)
               for blk in ad.blocks() for role in ("q", "o", "gate", "down")]
    ids = calibration_batch(lm.tokenizer, builtin_text("calib"), 1, cfg["seq"], 0)
    lm.model(input_ids=ids)
    for h in handles:
        h.remove()
    for b in specs:
        errs = {s: v / count[0] for s, v in sums[b].items()}
        out["activations"][str(b)] = {"best": min(errs, key=errs.get), "rel_mse": errs}
print("ROW " + json.dumps(out))
"""

ROW = r"""
import json, sys
import torch
import bitsmith
torch.set_grad_enabled(False)
rec, ewin, eseq = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
lm = bitsmith.quantize("default", rec, progress=False) if rec else "default"
report = bitsmith.evaluate(lm, seq=eseq, windows=ewin, progress=False)
print("ROW " + json.dumps(report))
"""


def _run(code: str, *argv: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    raise SystemExit(f"run failed ({argv[0][:100]}):\n{proc.stderr[-3000:]}")


# -- analysis and output ------------------------------------------------------------------------------


def add_costs(rows: list[dict]) -> None:
    from bitsmith.eval.hwcost import mac_cost, relative_cost

    for r in rows:
        r["mac_cost"] = mac_cost(r["weights"], r["activations"])
        r["mac_vs_int8"] = relative_cost(r["weights"], r["activations"])


def mark_pareto(rows: list[dict], metric: str) -> None:
    """``pareto[sweep]`` on every row: no other row of that sweep is at least as good on both axes and better on one.

    The float row belongs to every sweep (as a reference point at fp16 x fp16 cost).
    """
    sweeps = sorted({r["sweep"] for r in rows if r["sweep"] != "float"})
    for r in rows:
        r["pareto"] = {}
    for sweep in sweeps:
        pts = [r for r in rows if r["sweep"] in (sweep, "float") and r.get(metric) is not None]
        for r in pts:
            dominated = any(o is not r and o["mac_cost"] <= r["mac_cost"] and o[metric] <= r[metric]
                            and (o["mac_cost"] < r["mac_cost"] or o[metric] < r[metric]) for o in pts)
            r["pareto"][sweep] = not dominated


def table(rows: list[dict], metric: str) -> str:
    """Markdown table, by sweep then MAC cost; ``*`` marks the Pareto front of the row's sweep."""
    head = ["sweep", "method", "weights", "activations", "MAC FA", "x int8", "ppl", "KL", "top-1", "bpw", "quant s",
            f"front ({metric})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    order = {"float": 0, "w": 1, "wa": 2}
    for r in sorted(rows, key=lambda r: (order.get(r["sweep"], 9), r["mac_cost"], r.get(metric, 0))):
        front = ",".join(SWEEPS[s] for s, on in r.get("pareto", {}).items() if on)
        q = r.get("quantize_seconds")
        lines.append("| " + " | ".join([
            "float" if r["sweep"] == "float" else SWEEPS[r["sweep"]], METHOD_LABELS[r["method"]], f"`{r['weights']}`" if r['weights'] else "float",
            f"`{r['activations']}`" if r["activations"] else "float", f"{r['mac_cost']:.1f}", f"{r['mac_vs_int8']:.2f}",
            f"{r['ppl']:.2f}", f"{r['kl']:.4f}", f"{r['top1']:.3f}", f"{r['bpw']:.2f}", f"{q:.0f}" if q is not None else "-",
            f"* {front}" if front else "",
        ]) + " |")
    return "\n".join(lines)


def splits_table(splits: dict) -> str:
    """The minifloat split chosen per width and role, with every candidate's relative MSE."""
    lines = []
    entries = [(f"weights ({SWEEPS[sw]})", b, info) for sw, per in splits.get("weights", {}).items() for b, info in per.items()]
    entries += [("activations (per token)", b, info) for b, info in splits.get("activations", {}).items()]
    for role, b, info in entries:
        errs = "  ".join(f"{s} {v:.3g}" for s, v in info["rel_mse"].items())
        gran = f" {info['granularity']}" if "granularity" in info else ""
        lines.append(f"fp{b} {role}{gran}: best {info['best']}   relative MSE: {errs}")
    return "\n".join(lines)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(rows: list[dict], metric: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [s for s in SWEEPS if any(r["sweep"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(sweeps), figsize=(6.5 * len(sweeps), 5), squeeze=False)
    colors = {"rtn": "tab:blue", "gptq": "tab:orange", "smoothquant": "tab:green"}
    markers = {"int": "o", "fp": "^"}
    positive = [r[metric] for r in rows if r[metric] > 0]
    floor = min(positive) / 3 if positive else 1e-4  # log axis: the float model's KL is 0, drawn at the floor
    for ax, sweep in zip(axes[0], sweeps):
        pts = [r for r in rows if r["sweep"] in (sweep, "float")]
        for r in pts:
            y = max(r[metric], floor)
            if r["sweep"] == "float":
                ax.scatter(r["mac_cost"], y, marker="*", s=140, color="black", zorder=3,
                           label="float (fp16 MAC" + ("; KL 0, drawn at the bottom)" if metric == "kl" else ")"))
                continue
            ax.scatter(r["mac_cost"], y, marker=markers[r["format"]], color=colors[r["method"]], s=40, zorder=3,
                       label=f"{r['format']} {METHOD_LABELS[r['method']]}")
            label = f"{r['bits']}"
            if r["format"] == "fp":
                label += " " + r["weights"].split(":")[1] + (f"/{r['activations'].split(':')[1]}" if r["activations"] else "")
            ax.annotate(label,
                        (r["mac_cost"], y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        front = sorted((r["mac_cost"], max(r[metric], floor)) for r in pts if r["pareto"].get(sweep))
        if front:
            ax.step([x for x, _ in front], [y for _, y in front], where="post", color="gray", ls="--", lw=1,
                    label="Pareto front", zorder=2)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("MAC area, full-adder cells (bitsmith.eval.hwcost)")
        ax.set_ylabel("KL(float || quantized)" if metric == "kl" else "perplexity")
        ax.set_title(f"{SWEEPS[sweep]}: {'KL' if metric == 'kl' else 'perplexity'} vs MAC cost")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def report(rows: list[dict], splits: dict, meta: dict, args: argparse.Namespace) -> int:
    mark_pareto(rows, args.metric)
    print(meta.get("protocol", ""))
    if splits:
        print(splits_table(splits))
    print()
    print(table(rows, args.metric))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "splits": splits, "rows": rows}, indent=1))
    if args.png:
        if not have_matplotlib():
            print(f"error: no plot written: matplotlib is not installed; run `{MPL_HINT}`, then "
                  f"`python benchmarks/formats_study.py --load {args.json or 'RESULTS.json'} --png {args.png}`",
                  file=sys.stderr)
            return 1
        plot(rows, args.metric, args.png)
        print(f"\nplot: {args.png}")
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="3,4,5,6,7,8", help="widths (weight-only 3..8, W=A 4..8)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sweeps", default="w,wa", help="w: weight-only, wa: weights and activations at the same width")
    ap.add_argument("--group", type=int, default=0, help="weight-only rows: groups of N input columns (0: per channel)")
    ap.add_argument("--splits", choices=("best", "all"), default="best", help="minifloat splits: least-MSE one, or every one")
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences (GPTQ, SmoothQuant)")
    ap.add_argument("--calib-seq", type=int, default=512)
    ap.add_argument("--seq", type=int, default=512, help="evaluation window")
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows")
    ap.add_argument("--metric", choices=("kl", "ppl"), default="kl", help="accuracy axis of the Pareto front")
    ap.add_argument("--json", default=None, help="write rows here (after every row)")
    ap.add_argument("--png", default="formats_study.png", help="plot file ('' for none)")
    ap.add_argument("--load", default=None, help="print table and plot from an earlier --json file; run nothing")
    ap.add_argument("--resume", action="store_true",
                    help="keep the splits and every row already in --json, run only this plan's missing points")
    args = ap.parse_args()

    if args.load:
        data = json.loads(Path(args.load).read_text())
        rows = data["rows"]
        add_costs(rows)
        raise SystemExit(report(rows, data.get("splits", {}), data.get("meta", {}), args))

    check_args(args)
    done: dict = {}
    if args.resume:
        if not (args.json and Path(args.json).exists()):
            raise SystemExit("error: --resume needs --json pointing at the results of an earlier run")
        done = json.loads(Path(args.json).read_text())
    if args.png and not have_matplotlib():
        print(f"note: matplotlib is not installed, so no plot will be drawn ({MPL_HINT}); the table is printed anyway",
              file=sys.stderr)
    bits = [int(b) for b in args.bits.split(",") if b]
    sweeps = args.sweeps.split(",")
    splits: dict = done.get("splits", {})
    if args.splits == "best" and not splits:
        wa_bits = [b for b in bits if b in WA_BITS] if "wa" in sweeps else []
        cfg = {"weights": {"w": {"bits": bits if "w" in sweeps else [], "group": args.group},
                           "wa": {"bits": wa_bits, "group": 0}},
               "act_bits": wa_bits, "row_stride": 8, "seq": args.calib_seq}
        t = time.time()
        splits = _run(SPLITS, json.dumps(cfg))
        print(f"minifloat splits chosen in {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    points = plan(args, splits)

    from bitsmith.eval.hwcost import mac_cost, relative_cost

    meta: dict = {"args": vars(args)}
    rows: list[dict] = []

    def record(row: dict) -> None:
        row["mac_cost"] = mac_cost(row["weights"], row["activations"])
        row["mac_vs_int8"] = relative_cost(row["weights"], row["activations"])
        rows.append(row)
        if args.json:  # partial results survive a failure later in the run
            Path(args.json).write_text(json.dumps({"meta": meta, "splits": splits, "rows": rows}, indent=1))

    kept = {r["recipe"] for r in done.get("rows", []) if r["sweep"] != "float"}
    if done.get("rows"):  # every earlier row stays, this run's plan or not, so runs can split the grid
        meta["protocol"] = done["meta"]["protocol"]
        rows.extend(done["rows"])
    else:
        float_report = _run(ROW, json.dumps(None), str(args.windows), str(args.seq))
        meta["protocol"] = (f"model=default  calibration={args.samples}x{args.calib_seq} tokens of boolq-calib  "
                            f"text={float_report['protocol']['text']} seq={args.seq} windows={args.windows}  "
                            f"MAC cost in full-adder cells (bitsmith.eval.hwcost; float row: fp16 x fp16)")
        record({"sweep": "float", "method": "-", "format": "float", "bits": 16, "weights": None, "activations": None,
                **{k: float_report.get(k) for k in ("ppl", "kl", "top1", "bpw")}})
    for i, p in enumerate(points, 1):
        if p["recipe"]["name"] in kept:
            continue
        rep = _run(ROW, json.dumps(p["recipe"]), str(args.windows), str(args.seq))
        record({k: v for k, v in p.items() if k != "recipe"} | {"recipe": p["recipe"]["name"]}
               | {k: rep.get(k) for k in ("ppl", "kl", "top1", "bpw", "size_mb", "quantize_seconds")})
        r = rows[-1]
        print(f"[{i}/{len(points)}] {r['recipe']}: ppl {r['ppl']:.2f} kl {r['kl']:.4f} cost {r['mac_cost']:.1f} "
              f"in {r['quantize_seconds']:.0f} s", file=sys.stderr, flush=True)
    raise SystemExit(report(rows, splits, meta, args))


if __name__ == "__main__":
    main()
