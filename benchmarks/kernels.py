"""bitsmith's CPU kernels against fp32, per layer and on the whole default model.

    python benchmarks/kernels.py [--threads N] [--seconds 0.3] [--decode 32] [--json benchmarks/results/kernels.json]

Part 1, layers of the default model's shapes (out x in), random weights, prefill of 512 tokens and decode
of 1: median ms per call of ``F.linear`` in fp32 (the baseline), the fake-quant ``QuantLinear`` (what
bitsmith runs without kernels), and the layer on its kernel (:mod:`bitsmith.runtime.kernels`: W8A8 on
fbgemm's int8 GEMM; int4 weight-only on ATen's packed int4 product); ratio = fp32 time / time (above 1
is faster than fp32).

Part 2, the default model (SmolLM2-135M) quantized with the ``w8a8`` and ``w4a16-g64`` recipes (RTN), and
W8A8 with the lm_head quantized too (the built-in recipes keep it in fp32):
prefill tokens/s on one 512-token window (with every position's logits, as perplexity needs, and with the
last position's only, as generation needs), decode tokens/s over ``--decode`` greedy steps with the KV
cache, the bytes the block linears hold (fp32 weight copies, packed codes and scales, kernel buffers),
and perplexity on ``--windows`` windows of 512 tokens of the eval text, so the kernel model's quality can
be checked against the fake-quant one (the two differ by float rounding, which in a quantized network
flips a few activation codes downstream: same quality, not the same bits).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import median_ms

from bitsmith.runtime import kernels
from bitsmith.runtime.modules import QuantLinear
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import QuantSpec

SHAPES = [("q/o", 576, 576), ("gate/up", 1536, 576), ("down", 576, 1536)]
TOKENS = [("prefill", 512), ("decode", 1)]
LAYER_CASES = [("W8A8", "int8:channel:sym", "int8:token:asym", "auto"), ("int4 g64", "int4:g64:sym", None, "int4")]
# The built-in ``w8a8`` leaves the lm_head in fp32 (about a fifth of the model's multiply-adds at prefill);
# the second W8A8 case also quantizes it (int8 per channel, int8 per-token inputs) so it runs on the kernel.
W8A8_LM_HEAD = {"name": "w8a8-lm-head", "steps": [{"rtn": {"weights": "int8:channel:sym", "lm_head": True}},
                                                  {"act_quant": {"spec": "int8:token:asym", "lm_head": True}}]}
MODEL_CASES = [("W8A8", "w8a8", "auto"), ("W8A8 + lm_head", W8A8_LM_HEAD, "auto"), ("int4 g64", "w4a16-g64", "int4")]


def layers(seconds: float) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for case, wspec, aspec, mode in LAYER_CASES:
        for shape_name, out, k in SHAPES:
            w = torch.randn(out, k, generator=gen) * 0.02
            layer = QuantLinear(PackedWeight.quantize(w, QuantSpec.parse(wspec)), None,
                                None if aspec is None else QuantSpec.parse(aspec))
            fast = copy.deepcopy(layer)
            kernels.accelerate(fast, mode)
            for phase, m in TOKENS:
                x = torch.randn(m, k, generator=gen)
                t32 = median_ms(lambda: F.linear(x, w), seconds)
                tfq = median_ms(lambda: layer(x), seconds)
                tk = median_ms(lambda: fast(x), seconds)
                rows.append({"case": case, "layer": f"{shape_name} {out}x{k}", "phase": phase, "fp32_ms": t32,
                             "fake_quant_ms": tfq, "kernel_ms": tk, "kernel": fast.kernel.name if fast.kernel else "none"})
    return rows


def linear_bytes(model, head: bool = False) -> int:
    """Bytes of every tensor the quantized block linears (``head``: the quantized lm_head) hold (fp32
    copies, packed data, kernel buffers)."""
    total = 0
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear) or name.endswith("lm_head") != head:
            continue
        for t in list(m.buffers()) + list(m.parameters()):
            total += 0 if t.is_meta else t.numel() * t.element_size()
        k = m.kernel
        if isinstance(k, kernels.Int4Kernel):
            total += k.weight.numel() * k.weight.element_size() + k.scales_zeros.numel() * 4
        elif isinstance(k, (kernels.Int8Kernel, kernels.SharedInputKernel)):
            total += m.packed.shape[0] * m.packed.shape[1] + 8 * m.packed.shape[0]  # int8 prepacked + scales
    return total


def head_mb(lm) -> float:
    """MB the lm_head holds: its packed weight and kernel buffers when quantized, else its fp32 weight."""
    head = lm.adapter.lm_head()
    if isinstance(head, QuantLinear):
        return linear_bytes(lm.model, head=True) / 2**20
    return head.weight.numel() * head.weight.element_size() / 2**20


def perplexity(model, windows: torch.Tensor) -> float:
    nll = 0.0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0, :-1]
            nll += F.cross_entropy(logits.float(), w[1:], reduction="sum").item()
    return float(torch.exp(torch.tensor(nll / (windows.shape[0] * (windows.shape[1] - 1)))))


def speed(model, ids: torch.Tensor, decode: int, repeats: int = 5) -> tuple[float, float, float, torch.Tensor]:
    """(prefill tokens/s, generation prefill tokens/s, decode tokens/s, prefill logits): medians over
    ``repeats`` prefills and three decodes. A generation prefill computes the logits of the last position
    only (``logits_to_keep=1``, as ``generate`` does), so the lm_head's share of it is negligible.

    One timed pass is not enough here: the first passes after a model is built run slower (the fp32 baseline,
    measured first, would look slower than it is), and the 2-core machine's timings wander by about 5%.
    """
    import statistics

    def prefill_rate(**kwargs):  # (tokens/s of the median of ``repeats`` prefills, the last one's output)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, **kwargs)
            times.append(time.perf_counter() - t0)
        return ids.shape[1] / statistics.median(times), out

    with torch.no_grad():
        model(input_ids=ids[:, :32])  # warm-up
        prefill, out = prefill_rate()
        gen_prefill, _ = prefill_rate(logits_to_keep=1)
        steps = []
        for _ in range(3):
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            extra = past.get_seq_length() - ids.shape[1]
            if extra:
                past.crop(-extra)  # drop the previous decode's entries
            t0 = time.perf_counter()
            for _ in range(decode):
                step = model(input_ids=tok, past_key_values=past, use_cache=True)
                past, tok = step.past_key_values, step.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - t0)
        return prefill, gen_prefill, decode / statistics.median(steps), out.logits


def whole_model(decode: int, n_windows: int) -> list[dict]:
    import bitsmith
    from bitsmith.data.text import eval_windows, get_text
    from bitsmith.recipes import load_recipe

    base = bitsmith.load_model("default")
    windows = eval_windows(base.tokenizer, get_text(None, "eval"), 512, n_windows)
    ids = windows[:1]
    p, g, d, _ = speed(base.model, ids, decode)
    fp32_bytes = sum(m.weight.numel() * 4 for _, m in base.adapter.named_block_linears())
    rows = [{"model": "float (fp32)", "kernel": "none", "prefill_tok_s": p, "gen_prefill_tok_s": g, "decode_tok_s": d,
             "linear_mb": fp32_bytes / 2**20, "head_mb": head_mb(base),
             "ppl": perplexity(base.model, windows)}]
    for case, recipe, mode in MODEL_CASES:
        lm = bitsmith.quantize(bitsmith.load_model("default"), load_recipe(recipe), progress=False)
        p, g, d, ref = speed(lm.model, ids, decode)
        rows.append({"model": f"{case} fake quant", "kernel": "none", "prefill_tok_s": p, "gen_prefill_tok_s": g, "decode_tok_s": d,
                     "linear_mb": linear_bytes(lm.model) / 2**20, "head_mb": head_mb(lm),
                     "ppl": perplexity(lm.model, windows)})
        counts = kernels.accelerate(lm.model, mode)
        p, g, d, got = speed(lm.model, ids, decode)
        top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
        rows.append({"model": f"{case} kernel", "kernel": ", ".join(f"{k} x{n}" for k, n in counts.items()) or "none",
                     "prefill_tok_s": p, "gen_prefill_tok_s": g, "decode_tok_s": d, "linear_mb": linear_bytes(lm.model) / 2**20,
                     "head_mb": head_mb(lm), "ppl": perplexity(lm.model, windows), "top1_agreement": top1})
        del lm
    return rows


def profile_prefill() -> None:
    """Where a prefill's time goes: torch.profiler's self time per operator, fp32 against the int8 kernel."""
    from torch.profiler import profile

    import bitsmith
    from bitsmith.data.text import eval_windows, get_text
    from bitsmith.recipes import load_recipe

    base = bitsmith.load_model("default")
    ids = eval_windows(base.tokenizer, get_text(None, "eval"), 512, 1)
    lm = bitsmith.quantize(bitsmith.load_model("default"), load_recipe(W8A8_LM_HEAD), progress=False)
    kernels.accelerate(lm.model, "auto")
    for name, model in (("fp32", base.model), ("W8A8 + lm_head on the int8 kernel", lm.model)):
        model(input_ids=ids)  # warm-up
        with profile() as prof:
            model(input_ids=ids)
        print(f"\n{name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def _write(path: Path | None, data: dict) -> None:
    if path is not None:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seconds", type=float, default=0.3, help="time budget per layer measurement")
    ap.add_argument("--decode", type=int, default=32, help="greedy decode steps timed on the whole model")
    ap.add_argument("--windows", type=int, default=4, help="512-token eval windows for perplexity")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    ap.add_argument("--profile", action="store_true",
                    help="only profile one prefill of the fp32 model and of W8A8 + lm_head on the kernel (time per operator)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if args.profile:
        profile_prefill()
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, int8 GEMM exact here: {kernels.int8_gemm_exact()}")
    mrows = whole_model(args.decode, args.windows)  # first: the int4 layer runs below can leave the thread pool slow
    _write(args.json, {"threads": torch.get_num_threads(), "model": mrows})
    lrows = layers(args.seconds)
    _write(args.json, {"threads": torch.get_num_threads(), "layers": lrows, "model": mrows})
    print("\n| case | layer | tokens | fp32 ms | fake quant ms | x fp32 | kernel ms | x fp32 | kernel |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in lrows:
        print(f"| {r['case']} | {r['layer']} | {r['phase']} | {r['fp32_ms']:.3f} | {r['fake_quant_ms']:.3f} | "
              f"{r['fp32_ms'] / r['fake_quant_ms']:.2f} | {r['kernel_ms']:.3f} | {r['fp32_ms'] / r['kernel_ms']:.2f} | {r['kernel']} |")
    base = mrows[0]
    print(f"\nDefault model, one 512-token window of the built-in eval text; decode {args.decode} greedy steps")
    print("| model | kernel | prefill tok/s | x fp32 | prefill, last logits only | x fp32 | decode tok/s | x fp32 | block linears MB | lm_head MB | ppl | top-1 = fake quant |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in mrows:
        top = f"{r['top1_agreement']:.4f}" if "top1_agreement" in r else ""
        print(f"| {r['model']} | {r['kernel']} | {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / base['prefill_tok_s']:.2f} | "
              f"{r['gen_prefill_tok_s']:.0f} | {r['gen_prefill_tok_s'] / base['gen_prefill_tok_s']:.2f} | "
              f"{r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f} | {r['linear_mb']:.1f} | {r['head_mb']:.1f} | "
              f"{r['ppl']:.2f} | {top} |")


if __name__ == "__main__":
    main()
