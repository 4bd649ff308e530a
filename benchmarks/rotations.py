"""Rotations on the default model: no rotation vs QuaRot vs SpinQuant vs DuQuant, with RTN and GPTQ weights.

    python benchmarks/rotations.py [--settings w4a4kv4,w4a8kv8,w4a16] [--methods none,quarot,spinquant,duquant]
                                   [--weights rtn,gptq] [--samples 128] [--tasks piqa,arc_easy --limit 100]

Weights are 4-bit per output channel, symmetric, MSE-clipped (RTN) or GPTQ with act-order on the
same grid. Activations are per token, asymmetric (4-bit clipped at 0.9 of the range, as QuaRot
does; 8-bit unclipped); the KV cache per token and head, asymmetric (4-bit clipped at 0.95). Each
row runs in its own process. The last table times evaluation (prefill, tokens/s) of the float model
with and without QuaRot's online Hadamards (R3 on queries/keys, R4 on the down projection input),
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SETTINGS = {
    "w4a4kv4": ("int4:token:asym:r0.9", "int4:head:asym:r0.95"),
    "w4a8kv8": ("int8:token:asym", "int8:head:asym"),
    "w4a16": (None, None),
}
WEIGHTS = "int4:channel:sym:mse"


def recipe(setting: str, method: str, weights: str, samples: int, seq: int, iterations: int) -> dict:
    act, kv = SETTINGS[setting]
    steps: list[dict] = []
    if method == "quarot":
        steps.append({"quarot": {"r3": kv is not None}})
    elif method == "duquant":  # fitted to calibration statistics (same samples as GPTQ)
        steps.append({"duquant": {"r3": kv is not None}})
    elif method == "spinquant":
        # With GPTQ weights the rotations are learned with float weights (as the paper does), unless
        # nothing else is quantized (W4A16), where the loss would not depend on the rotation at all.
        train_w = None if weights == "gptq" and act else WEIGHTS.replace(":mse", "")
        steps.append({"spinquant": {"weights": train_w,
                                    "activations": act, "kv": kv, "iterations": iterations}})
    if act:
        steps.append({"act_quant": {"spec": act}})
    if kv:
        steps.append({"kv_quant": {"key": kv, "value": kv}})
    steps.append({weights: {"weights": WEIGHTS}} if weights == "rtn" else {"gptq": {"weights": WEIGHTS, "act_order": True}})
    return {"name": f"{method}-{weights}-{setting}", "calibration": {"samples": samples, "seq": seq}, "steps": steps}


ROW = r"""
import json, sys
import torch
import bitsmith
torch.set_grad_enabled(False)
rec, ewin, eseq, tasks, limit = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
lm = bitsmith.quantize("default", rec, progress=False)
report = bitsmith.evaluate(lm, seq=eseq, windows=ewin, progress=False,
                           tasks=[t for t in tasks.split(",") if t], limit=int(limit) if limit else None)
report["recipe"] = rec["name"]
print("ROW " + json.dumps(report))
"""

SPEED = r"""
import json, sys, time
import torch
import bitsmith
from bitsmith.data.text import builtin_text
torch.set_grad_enabled(False)
seq, reps = int(sys.argv[1]), int(sys.argv[2])
lm = bitsmith.load_model("default")
ids = lm.tokenizer(builtin_text("eval").text[:20000], return_tensors="pt").input_ids[:, :seq]
def speed():
    lm.model(input_ids=ids)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter(); lm.model(input_ids=ids); best = min(best, time.perf_counter() - t)
    return ids.shape[1] / best
plain = speed()
bitsmith.quantize(lm, {"name": "quarot", "steps": [{"quarot": {}}]}, progress=False)
rotated = speed()
print("ROW " + json.dumps({"plain": plain, "rotated": rotated}))
"""


def _run(code: str, *argv: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    raise SystemExit(f"run failed ({argv[0][:80]}):\n{proc.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="w4a4kv4,w4a8kv8,w4a16")
    ap.add_argument("--methods", default="none,quarot,spinquant,duquant")
    ap.add_argument("--weights", default="rtn,gptq")
    ap.add_argument("--samples", type=int, default=128, help="calibration sequences (GPTQ, SpinQuant, DuQuant)")
    ap.add_argument("--calib-seq", type=int, default=512)
    ap.add_argument("--iterations", type=int, default=20, help="SpinQuant Cayley SGD steps")
    ap.add_argument("--seq", type=int, default=512, help="evaluation window")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows")
    ap.add_argument("--tasks", default="", help="zero-shot tasks, comma-separated (empty: none)")
    ap.add_argument("--limit", type=int, default=100, help="items per zero-shot task")
    ap.add_argument("--speed-reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --json (same options), run the rest")
    ap.add_argument("--no-speed", action="store_true", help="skip the online-Hadamard throughput table")
    args = ap.parse_args()

    import bitsmith
    from bitsmith.eval.report import format_table, protocol_line

    tasks = [t for t in args.tasks.split(",") if t]
    done = {}
    if args.resume:
        if not args.json or not Path(args.json).exists():
            raise SystemExit("error: --resume needs the --json file of an earlier run of the same command")
        done = {r["recipe"]: r for r in json.loads(Path(args.json).read_text())["rows"]}
    float_row = done.get("float") or {
        "recipe": "float", **bitsmith.evaluate("default", seq=args.seq, windows=args.windows, progress=False,
                                               tasks=tasks, limit=args.limit if tasks else None)}
    rows = [float_row]
    for setting in args.settings.split(","):
        for weights in args.weights.split(","):
            for method in args.methods.split(","):
                rec = recipe(setting, method, weights, args.samples, args.calib_seq, args.iterations)
                if rec["name"] in done:
                    rows.append(done[rec["name"]])
                    continue
                row = _run(ROW, json.dumps(rec), str(args.windows), str(args.seq), ",".join(tasks),
                           str(args.limit) if tasks else "")
                rows.append(row)
                if args.json:  # partial results survive a failure later in the run
                    Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
                print(f"{row['recipe']}: ppl {row['ppl']:.2f} kl {row['kl']:.4f} in {row['quantize_seconds']:.0f} s",
                      file=sys.stderr, flush=True)
    speed = None if args.no_speed else _run(SPEED, str(args.seq), str(args.speed_reps))

    print(f"model=default  calibration={args.samples}x{args.calib_seq} tokens  spinquant iterations={args.iterations}  "
          + protocol_line(float_row))
    print(format_table(rows))
    if speed is not None:
        print()
        print(f"{'prefill tokens/s (seq ' + str(args.seq) + ')':28s} {'float':>8s} {'QuaRot R3+R4':>12s} {'ratio':>6s}")
        print(f"{'':28s} {speed['plain']:8.0f} {speed['rotated']:12.0f} {speed['rotated'] / speed['plain']:6.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "speed": speed}, indent=1))


if __name__ == "__main__":
    main()
