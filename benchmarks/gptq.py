"""RTN vs GPTQ on the default model: ppl, KL, top-1, bpw, quantization wall time and peak memory.

    python benchmarks/gptq.py [--settings w4a16-g64,w4a16,w3a16-g64,w2a16-g32] [--samples 128] [--seq 512]
    python benchmarks/gptq.py --settings w4a16-g64 --only-stream   # the streamed row alone

Each row runs in its own process, so "peak MB" is that run's own peak resident memory (model load,
quantization and evaluation included). The GPTQ rows use the built-in ``gptq-*`` recipes; the RTN
row of each setting quantizes to exactly the same spec. The last row repeats the first GPTQ setting
with ``--stream`` (weights read and written block by block) and reports its peak during quantization
only (model load included, evaluation not). Ratios are against the float model and the RTN row measured
in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# Peak memory is the row process's own VmHWM (peak resident set of its address space, new at exec),
# not getrusage's ru_maxrss: Linux carries the parent's resident size at fork into the child's
# ru_maxrss, so after this script has evaluated the float model every row would read at least that.
ROW = r"""
import json, sys, time, tempfile
import torch
import bitsmith
from bitsmith.recipes import load_recipe
torch.set_grad_enabled(False)
def peak_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
kind, setting, samples, seq, ewin, eseq = sys.argv[1:7]
rec = load_recipe(f"gptq-{setting}").raw
rec = {**rec, "calibration": {"samples": int(samples), "seq": int(seq)}}
if kind == "rtn":
    rec = {"name": f"rtn-{setting}", "steps": [{"rtn": {"weights": rec["steps"][0]["gptq"]["weights"]}}]}
if kind == "stream":
    out = tempfile.mkdtemp() + "/q"
    t0 = time.perf_counter()
    bitsmith.quantize("default", rec, out=out, progress=False, stream=True)
    seconds = time.perf_counter() - t0
    peak = peak_mb()
    report = bitsmith.evaluate(out, seq=int(eseq), windows=int(ewin), progress=False)
    report["quantize_seconds"] = seconds
else:
    lm = bitsmith.quantize("default", rec, progress=False)
    report = bitsmith.evaluate(lm, seq=int(eseq), windows=int(ewin), progress=False)
    peak = peak_mb()
report["peak_mb"] = peak
report["recipe"] = (rec["name"] + (" --stream" if kind == "stream" else ""))
print("ROW " + json.dumps(report))
"""


def run_row(kind: str, setting: str, args) -> dict:
    proc = subprocess.run([sys.executable, "-c", ROW, kind, setting, str(args.samples), str(args.calib_seq),
                           str(args.windows), str(args.seq)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    raise SystemExit(f"{kind} {setting} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="w4a16-g64,w4a16,w3a16-g64,w2a16-g32")
    ap.add_argument("--samples", type=int, default=128, help="calibration sequences")
    ap.add_argument("--calib-seq", type=int, default=512, help="calibration sequence length")
    ap.add_argument("--seq", type=int, default=512, help="evaluation window")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows")
    ap.add_argument("--no-stream", action="store_true", help="skip the streamed row")
    ap.add_argument("--only-stream", action="store_true", help="only the streamed row (of the first setting)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.only_stream and args.no_stream:
        ap.error("--only-stream and --no-stream exclude each other")

    import bitsmith
    from bitsmith.eval.report import format_table, protocol_line

    float_row = {"recipe": "float", **bitsmith.evaluate("default", seq=args.seq, windows=args.windows, progress=False)}
    rows = [float_row]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for setting in [] if args.only_stream else settings:
        rtn = run_row("rtn", setting, args)
        gptq = run_row("gptq", setting, args)
        gptq["ppl_vs_rtn"] = gptq["ppl"] / rtn["ppl"]
        gptq["kl_vs_rtn"] = gptq["kl"] / rtn["kl"]
        rows += [rtn, gptq]
        print(f"{setting}: rtn ppl {rtn['ppl']:.2f} kl {rtn['kl']:.4f} | gptq ppl {gptq['ppl']:.2f} kl {gptq['kl']:.4f} "
              f"in {gptq['quantize_seconds']:.0f} s", file=sys.stderr, flush=True)
    if not args.no_stream and settings:
        rows.append(run_row("stream", settings[0], args))

    print(f"model=default  calibration={args.samples}x{args.calib_seq} tokens (boolq-calib)  " + protocol_line(float_row))
    print(format_table(rows))
    print()
    fp32_mb = float_row["size_mb"]  # the float model's tensors, fp32
    print(f"{'recipe':24s} {'ppl/float':>9s} {'ppl/RTN':>8s} {'KL/RTN':>7s} {'peak MB':>8s} {'peak/fp32 model':>15s}")
    for r in rows[1:]:
        vs = f"{r['ppl_vs_rtn']:8.3f} {r['kl_vs_rtn']:7.3f}" if "ppl_vs_rtn" in r else f"{'-':>8s} {'-':>7s}"
        print(f"{r['recipe']:24s} {r['ppl'] / float_row['ppl']:9.3f} {vs} {r['peak_mb']:8.0f} {r['peak_mb'] / fp32_mb:15.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
