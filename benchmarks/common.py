"""What the benchmark scripts share: timing one call, and running one recipe row in its own process."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

# One benchmark row in a fresh process (so each row's time and memory are its own): quantize the default
# model with a recipe, evaluate it, add the script's EXTRAS (which may read `recipe` and `report`), print it.
_ROW = r"""
import json, sys
import torch
import bitsmith
from bitsmith.recipes import load_recipe
torch.set_grad_enabled(False)
rec, ewin, eseq, tasks, limit = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
if int(sys.argv[6]) > 0:
    torch.set_num_threads(int(sys.argv[6]))
recipe = load_recipe(rec)
lm = bitsmith.quantize("default", recipe, progress=False)
report = bitsmith.evaluate(lm, seq=eseq, windows=ewin, progress=False,
                           tasks=[t for t in tasks.split(",") if t], limit=int(limit) if limit else None)
report["recipe"] = rec["name"]
"""


def median_ms(fn, seconds: float) -> float:
    """Median wall time of ``fn`` in ms over about ``seconds`` of calls (after a warm-up)."""
    for _ in range(3):
        fn()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_row(rec: dict, args, tasks: list[str], extras: str = "") -> dict:
    """The evaluation report of recipe ``rec`` (``args``: windows, seq, limit, threads), run in its own process."""
    script = _ROW + extras + '\nprint("ROW " + json.dumps(report))\n'
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(rec), str(args.windows), str(args.seq), ",".join(tasks),
                           str(args.limit) if tasks else "", str(args.threads)], capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    raise SystemExit(f"{rec['name']} failed:\n{proc.stderr[-3000:]}")
