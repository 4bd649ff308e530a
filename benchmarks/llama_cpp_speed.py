"""Prefill and decode speed of bitsmith's GGUF exports in llama.cpp, against the float export, same run.

    python benchmarks/llama_cpp_speed.py [--work /tmp/gguf-bench] [--threads 2] [--decode 64] [--reps 3]

The fast 4-bit CPU path for bitsmith's weights is llama.cpp (no int4 kernel reachable from PyTorch decodes
as fast as fp32 on this CPU: ``benchmarks/kernels.py``). This times the files ``benchmarks/gguf_export.py``
writes (run it first; it keeps them in ``--work``): the F32 export of the float model, and bitsmith's
GPTQ exports in Q8_0, Q4_K and Q4_0. Prefill: one 512-token window of the evaluation text; decode: ``--decode``
single-token steps after it (KV cache in llama.cpp's default F16). Best of ``--reps``; ratios against F32.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

FILES = [("F32 (float)", "float-f32.gguf"), ("Q8_0 bitsmith GPTQ", "bitsmith-gptq-q8_0.gguf"),
         ("Q4_K bitsmith GPTQ", "bitsmith-gptq-q4_k.gguf"), ("Q4_0 bitsmith GPTQ", "bitsmith-gptq-q4_0.gguf")]


def speed(path: Path, prompt: list[int], decode: int, reps: int, threads: int) -> tuple[float, float]:
    from bitsmith.export.llama_cpp_runner import open_gguf

    llm = open_gguf(str(path), n_ctx=len(prompt) + decode + 8, n_batch=len(prompt),
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    best_p = best_d = float("inf")
    for rep in range(reps + 1):  # round 0 warms up
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        p = time.perf_counter() - t
        t = time.perf_counter()
        for tok in prompt[:decode]:  # fixed tokens: the same work in every file
            llm.eval([tok])
        d = time.perf_counter() - t
        if rep:
            best_p, best_d = min(best_p, p), min(best_d, d)
    del llm
    return len(prompt) / best_p, decode / best_d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/gguf-bench", help="the folder benchmarks/gguf_export.py wrote")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=64, help="single-token decode steps")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.work)
    missing = [name for _, name in FILES if not (work / name).exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)} in {work}: run `python benchmarks/gguf_export.py --work {work}` first")

    import bitsmith
    from bitsmith.data.text import builtin_text, eval_windows

    lm = bitsmith.load_model("default")
    prompt = eval_windows(lm.tokenizer, builtin_text("eval"), 512, 1)[0].tolist()
    del lm
    rows = []
    for label, name in FILES:
        p, d = speed(work / name, prompt, args.decode, args.reps, args.threads)
        rows.append((label, (work / name).stat().st_size / 1e6, p, d))
        print(f"{label}: prefill {p:.0f} tok/s, decode {d:.1f} tok/s", flush=True)
    base_p, base_d = rows[0][2], rows[0][3]
    print(f"\nllama.cpp, {args.threads} threads, prefill 512 tokens, decode {args.decode} steps (best of {args.reps})")
    print("| file | MB | prefill tok/s | x F32 | decode tok/s | x F32 |\n|---|---|---|---|---|---|")
    for label, mb, p, d in rows:
        print(f"| {label} | {mb:.1f} | {p:.0f} | {p / base_p:.2f} | {d:.1f} | {d / base_d:.2f} |")


if __name__ == "__main__":
    main()
