"""bitsmith's GGUF exports against llama.cpp's own quantizer, perplexity computed by llama.cpp.

    python benchmarks/gguf_export.py [--samples 64] [--windows 8] [--work /tmp/gguf-bench]
    python benchmarks/gguf_export.py --load benchmarks/results/gguf-export.json   # the table again

For each type (Q8_0, Q4_0, Q4_K):

* bitsmith: GPTQ on the exact GGUF grid (the ``gptq-q4_0`` / ``gptq-q4_k`` recipes; ``q8_0`` the same step),
  exported with ``bitsmith export --format gguf --type q8_0`` (the tied embedding/output in Q8_0, which is what
  llama.cpp picks for a 576-wide output matrix); for Q4_0 also FlexRound on the exact grid, started from the
  importance-weighted grid (the ``flexround-q4_0`` recipe, same calibration windows);
* llama.cpp: bitsmith's F32 export of the same float model, quantized by ``llama_cpp.llama_model_quantize``
  with every tensor forced (``tt_overrides``, one exact pattern per tensor) to the type it has in bitsmith's
  file, so both files hold the same types and have the same size (checked); without and with an importance
  matrix (``imatrix``: mean squared input of each linear's columns on the same calibration windows GPTQ uses,
  passed through ``llama_model_quantize_params.imatrix``). Q8_0 has no importance-weighted quantizer in
  llama.cpp, so its imatrix row is skipped.

Perplexity is computed in llama.cpp (llama-cpp-python, 1 thread, default F16 KV cache): logits of each of the
first ``windows`` non-overlapping 512-token windows of the built-in evaluation text (``boolq-eval``, no BOS), the
same windows ``bitsmith eval`` uses; bitsmith's own perplexity of its quantized model on those windows is shown
next to it. KL and top-1 are also computed in llama.cpp, against the F32 file's next-token distributions on the
same positions (perplexity alone can rank two quantizations the other way round from their distance to the
float model), and the mean entropy of each file's next-token distributions (in nats; perplexity is
``exp`` of the mean negative log-likelihood, which a flatter distribution lowers where the float model is
overconfident). Calibration: ``samples`` x 512 tokens of ``boolq-calib`` (disjoint from the evaluation text).
Writes ``benchmarks/results/gguf-export.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results" / "gguf-export.json"
LEARNED = {"q4_0": "flexround-q4_0"}  # types with a learned-rounding recipe: one more bitsmith row
FTYPE = {"q8_0": 7, "q4_0": 2, "q4_k": 15}  # llama_ftype: MOSTLY_Q8_0, MOSTLY_Q4_0, MOSTLY_Q4_K_M (a default only)


def llama_eval(path: Path, windows: torch.Tensor, ref: list[torch.Tensor] | None = None) -> tuple[dict, list[torch.Tensor]]:
    """Perplexity and the mean entropy of the next-token distributions computed by llama.cpp on ``windows``,
    and with ``ref`` (the F32 file's next-token log-probabilities) the mean KL(float || this file) and top-1
    agreement. Without ``ref`` this file is the reference: its log-probabilities (about 100 MB per window) are
    returned too; with one, none are kept."""
    from bitsmith.export.llama_cpp_runner import open_gguf

    llm = open_gguf(str(path), n_ctx=windows.shape[1], n_batch=windows.shape[1], n_threads=1,
                          logits_all=True, verbose=False)
    nll = kl = top = entropy = 0.0
    n, logps = 0, []
    for i, w in enumerate(windows.tolist()):
        llm.reset()
        llm.eval(w)
        logits = torch.tensor(np.array(llm.scores[: len(w) - 1]), dtype=torch.float64)
        logp = torch.log_softmax(logits, dim=-1).float()
        nll -= logp.gather(-1, torch.tensor(w[1:])[:, None]).double().sum().item()
        entropy -= (logp.exp() * logp).sum(-1).double().sum().item()
        if ref is not None:
            kl += (ref[i].exp() * (ref[i] - logp)).sum(-1).double().sum().item()
            top += (ref[i].argmax(-1) == logp.argmax(-1)).sum().item()
        else:
            logps.append(logp)
        n += len(w) - 1
    del llm
    out = {"llama_ppl": float(np.exp(nll / n)), "llama_nll": nll / n, "llama_entropy": entropy / n}
    if ref is not None:
        out.update(llama_kl=kl / n, llama_top1=top / n)
    return out, logps


def temperature_scan(logps: list[torch.Tensor], windows: torch.Tensor) -> dict[str, float]:
    """Perplexity of the float model with its next-token distributions sharpened or flattened by a temperature:
    below the T = 1 value where the model is overconfident on this text."""
    out = {}
    for t in (0.9, 1.0, 1.05, 1.1, 1.2):
        nll = sum(-torch.log_softmax(lp.double() / t, -1).gather(-1, w[1:, None]).sum().item() for lp, w in zip(logps, windows))
        out[f"{t:g}"] = float(np.exp(nll / (windows.shape[0] * (windows.shape[1] - 1))))
    return out


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def importance(lm, calib: torch.Tensor) -> dict[str, np.ndarray]:
    """llama.cpp-style importance matrix: per GGUF weight, the mean of x**2 over calibration tokens per input column."""
    from bitsmith.export.gguf import _ROLE_NAMES

    sums, hooks = {}, []
    for i, block in enumerate(lm.adapter.blocks()):
        for role, lin in lm.adapter.block_linears(block).items():
            name = f"blk.{i}.{_ROLE_NAMES[role]}.weight"

            def hook(_m, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                s, n = sums.get(name, (0.0, 0))
                sums[name] = (s + x.pow(2).sum(0), n + x.shape[0])
            hooks.append(lin.register_forward_pre_hook(hook))
    with torch.inference_mode():
        for w in calib:
            lm.model(input_ids=w[None])
    for h in hooks:
        h.remove()
    return {k: (s / n).float().numpy() for k, (s, n) in sums.items()}


def llama_quantize(src: Path, dst: Path, types: dict[str, str], ftype: int, imatrix: dict[str, np.ndarray] | None) -> None:
    """llama.cpp's quantizer on ``src`` with every tensor forced to ``types`` (GGUF type names)."""
    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 1
    params.ftype = ftype
    keep = []
    over = [(f"^{name.replace('.', '[.]')}$".encode(), int(gguf.GGMLQuantizationType[t]))
            for name, t in types.items() if t not in ("F32",)]
    arr = (llama_cpp.llama_model_tensor_override * (len(over) + 1))()
    for i, (pattern, t) in enumerate(over):
        arr[i].pattern, arr[i].type = pattern, t
        keep.append(pattern)
    arr[len(over)].pattern = None
    params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    params.token_embedding_type = int(gguf.GGMLQuantizationType[types["token_embd.weight"]])
    if imatrix is not None:
        im = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(imatrix.items()):
            buf = np.ascontiguousarray(v, dtype=np.float32)
            keep.append(buf)
            im[i].name = name.encode()
            im[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            im[i].size = buf.size
        im[len(imatrix)].name = None
        params.imatrix = ctypes.cast(im, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {dst.name}")
    del keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="q4_0,q4_k,q8_0")
    ap.add_argument("--samples", type=int, default=64, help="calibration windows of 512 tokens (GPTQ and imatrix)")
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens")
    ap.add_argument("--work", default="/tmp/gguf-bench", help="folder for the GGUF files (kept: reruns reuse them)")
    ap.add_argument("--load", help="print the table of a results JSON instead of running")
    args = ap.parse_args()
    if args.load:
        print_table(json.loads(Path(args.load).read_text()))
        return
    torch.set_num_threads(1)

    import copy

    import bitsmith
    from bitsmith.data.text import builtin_text, calibration_batch, eval_windows
    from bitsmith.eval.perplexity import evaluate_lm
    from bitsmith.export import export
    from bitsmith.recipes import load_recipe

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = bitsmith.load_model("default")
    windows = eval_windows(base.tokenizer, builtin_text("eval"), 512, args.windows)
    calib = calibration_batch(base.tokenizer, builtin_text("calib"), args.samples, 512, 0)
    rows = []
    f32 = work / "float-f32.gguf"
    if not f32.exists():
        export(base, "gguf", f32, qtype="f32")
    measured, ref = llama_eval(f32, windows)
    measured["temperature_scan"] = temperature_scan(ref, windows)
    rows.append({"type": "float", "method": "F32 (bitsmith export)", "MB": f32.stat().st_size / 1e6, **measured,
                 "bitsmith_ppl": evaluate_lm(base.model, windows, progress=False)["ppl"]})
    print(rows[-1], flush=True)
    imatrix = None
    for qt in args.types.split(","):
        steps = [{"gptq": {"weights": qt, **({"fallback": "q5_0"} if qt == "q4_k" else {}), "act_order": True}}]
        ours = [("gptq", "bitsmith GPTQ (exact GGUF grid)", steps)]
        if qt in LEARNED:
            ours.append(("flexround", "bitsmith FlexRound (exact GGUF grid)", load_recipe(LEARNED[qt]).raw["steps"]))
        for tag, method, steps in ours:
            path = work / f"bitsmith-{tag}-{qt}.gguf"
            t0 = time.time()
            lm = bitsmith.quantize(copy.deepcopy(base), {"name": f"{tag}-{qt}", "steps": steps,
                                                         "calibration": {"samples": args.samples, "seq": 512}}, progress=False)
            quant_s = time.time() - t0
            export(lm, "gguf", path, qtype="q8_0", force=True)
            types = tensor_types(path)
            rows.append({"type": qt, "method": method, "MB": path.stat().st_size / 1e6, **llama_eval(path, windows, ref)[0],
                         "bitsmith_ppl": evaluate_lm(lm.model, windows, progress=False)["ppl"],
                         "quant_s": quant_s, "types": sorted(set(types.values()))})
            print(rows[-1], flush=True)
            del lm
        variants = [("llama.cpp quantize", None)]
        if qt != "q8_0":
            if imatrix is None:
                imatrix = importance(base, calib)
            variants.append(("llama.cpp quantize + imatrix", imatrix))
        for method, im in variants:
            theirs = work / f"llama-{qt}{'-imatrix' if im is not None else ''}.gguf"
            t0 = time.time()
            llama_quantize(f32, theirs, types, FTYPE[qt], im)
            quant_s = time.time() - t0
            got = tensor_types(theirs)
            mismatched = sorted(n for n in types if got.get(n) != types[n])
            rows.append({"type": qt, "method": method, "MB": theirs.stat().st_size / 1e6, **llama_eval(theirs, windows, ref)[0],
                         "bitsmith_ppl": None, "quant_s": quant_s, "types_match": not mismatched,
                         "mismatched": mismatched[:5]})
            print(rows[-1], flush=True)
    out = {"protocol": {"model": "default (SmolLM2-135M-Instruct)", "text": "boolq-eval", "seq": 512, "windows": args.windows,
                        "calibration": f"{args.samples}x512 boolq-calib", "threads": 1, "llama_cpp_python": _version()},
           "rows": rows}
    if RESULTS.exists():  # a run of some --types keeps the other types' rows of the last run
        old = json.loads(RESULTS.read_text())
        if old.get("protocol", {}).get("windows") == args.windows:
            done = set(args.types.split(","))
            keep = [r for r in old["rows"] if r["type"] not in done and r["type"] != "float"]
            out["rows"] = rows[:1] + sorted(keep + rows[1:], key=lambda r: ["q4_0", "q4_k", "q8_0"].index(r["type"])
                                            if r["type"] in ("q4_0", "q4_k", "q8_0") else 9)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))
    print_table(out)


def _version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def print_table(out: dict) -> None:
    p = out["protocol"]
    print(f"\nmodel={p['model']}  text={p['text']} {p['windows']}x{p['seq']} tokens  calibration={p['calibration']}  "
          f"llama-cpp-python {p['llama_cpp_python']}")
    print(f"{'type':6} {'method':38} {'MB':>7} {'llama.cpp ppl':>13} {'KL':>7} {'top-1':>6} {'entropy':>7} {'bitsmith ppl':>12} "
          f"{'same types':>10} {'quant s':>7}")
    scan = out["rows"][0].get("temperature_scan") if out["rows"] else None
    if scan:
        print("float model's perplexity in llama.cpp at temperature T: " + ", ".join(f"T={t} {v:.3f}" for t, v in scan.items()))
    for r in out["rows"]:
        bp = "-" if r["bitsmith_ppl"] is None else f"{r['bitsmith_ppl']:.3f}"
        same = {True: "yes", False: "NO"}.get(r.get("types_match"), "-")
        qs = "-" if r.get("quant_s") is None else f"{r['quant_s']:.0f}"
        kl = "-" if r.get("llama_kl") is None else f"{r['llama_kl']:.4f}"
        top = "-" if r.get("llama_top1") is None else f"{r['llama_top1']:.3f}"
        ent = "-" if r.get("llama_entropy") is None else f"{r['llama_entropy']:.3f}"
        print(f"{r['type']:6} {r['method']:38} {r['MB']:7.2f} {r['llama_ppl']:13.3f} {kl:>7} {top:>6} {ent:>7} {bp:>12} {same:>10} "
              f"{qs:>7}")


if __name__ == "__main__":
    main()
