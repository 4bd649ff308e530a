"""The Python API: one call per CLI command.

    import bitsmith
    q = bitsmith.quantize("default", "w4a16-g64", out="out/w4")
    report = bitsmith.evaluate("out/w4", seq=512, windows=8)
    rows = bitsmith.compare("default", ["w8a8", "w4a16-g64"])
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Iterable

import torch

from bitsmith.data.text import eval_windows, get_text
from bitsmith.errors import BitsmithError
from bitsmith.eval.perplexity import FloatReference, Protocol, evaluate_lm
from bitsmith.eval.size import size_stats
from bitsmith.models import DEFAULT_MODEL, LoadedModel, adapter_for, load_model
from bitsmith.models.load import cache_dir, resolve
from bitsmith.pipeline import run_recipe
from bitsmith.recipes import load_recipe

BASELINE_RECIPES = ("w8a8", "w4a16-g64", "w4a4kv4")


def _as_loaded(model: str | LoadedModel) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)


def quantize(
    model: str | LoadedModel = DEFAULT_MODEL,
    recipe: str | Path | dict = "w4a16-g64",
    out: str | Path | None = None,
    calib: str | Path | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    stream: bool = False,
) -> LoadedModel | Path:
    """Quantize ``model`` with ``recipe`` (in place if a LoadedModel is given); save to ``out`` if set.

    ``stream=True`` reads the weights block by block from the model file and writes each quantized
    block to ``out`` as soon as it is done, so peak memory is about one block plus the calibration
    activations whatever the model's size; it returns the output folder (load it to use the model).
    """
    rec = load_recipe(recipe)  # validate before the (slow) model load
    if out is not None and Path(out).exists() and not force:
        raise BitsmithError(f"output folder {out} already exists; choose another --out or pass --force")
    text = get_text(calib, "calib")
    if stream:
        from bitsmith.checkpoint import CheckpointWriter
        from bitsmith.models.load import load_model_streamed

        if out is None:
            raise BitsmithError("streamed quantization writes blocks as it goes; give an output folder (--out)")
        if not isinstance(model, str):
            raise BitsmithError("streamed quantization reads the model file itself; pass its name or path, not a loaded model")
        lm = load_model_streamed(model)
        with CheckpointWriter(out, force) as writer:
            run_recipe(lm, rec, text, seed=seed, progress=progress, writer=writer)
            return writer.commit(lm, rec.to_yaml())
    lm = _as_loaded(model)
    if lm.is_quantized:
        raise BitsmithError("model is already quantized; start from its float source")
    run_recipe(lm, rec, text, seed=seed, progress=progress)
    if out is not None:
        from bitsmith.checkpoint import save_quantized

        save_quantized(lm, out, rec.to_yaml(), force=force)
    return lm


def _source_key(source: str) -> str:
    kind, path = resolve(source)
    st = path.stat()
    return f"{kind}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def float_reference(source: str, windows: torch.Tensor, protocol: Protocol, model=None, progress: bool = True) -> FloatReference:
    """The cached float log-probabilities for ``source`` (computed with ``model`` or a fresh load)."""
    try:
        key = _source_key(source)
    except BitsmithError as e:
        raise BitsmithError(f"the float source of this model is unavailable ({e}); KL and top-1 need it") from None
    path = FloatReference.cache_path(cache_dir(), key, protocol)
    return FloatReference.load_or_build(path, (lambda: model) if model is not None else (lambda: load_model(source).model), windows, progress)


def evaluate(
    model: str | LoadedModel = DEFAULT_MODEL,
    text: str | Path | None = None,
    seq: int = 512,
    windows: int = 8,
    tasks: Iterable[str] = (),
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """ppl, KL and top-1 against the float source, bits per weight, size, zero-shot accuracy."""
    lm = _as_loaded(model)
    txt = get_text(text, "eval")
    win = eval_windows(lm.tokenizer, txt, seq, windows)
    protocol = Protocol(txt.name, txt.digest, seq, windows)
    report: dict = {"model": lm.source if not lm.is_quantized else lm.quant.get("recipe", "?"), "source": lm.source,
                    "protocol": protocol.to_dict()}
    if lm.is_quantized:
        ref = float_reference(lm.source, win, protocol, progress=progress)
        report.update(evaluate_lm(lm.model, win, ref, progress=progress))
        report["float_ppl"] = ref.metrics["ppl"]
    else:  # the float model is its own reference: one run fills the cache and gives its ppl
        ref = float_reference(lm.source, win, protocol, model=lm.model, progress=progress)
        report.update(ppl=ref.metrics["ppl"], kl=0.0, top1=1.0, tokens_per_s=ref.metrics["tokens_per_s"],
                      float_ppl=ref.metrics["ppl"])
    report.update(size_stats(lm))
    if lm.is_quantized and "quantize_seconds" in lm.quant:
        report["quantize_seconds"] = lm.quant["quantize_seconds"]
    tasks = list(tasks)
    if tasks:
        from bitsmith.eval.zeroshot import average_accuracy, evaluate_tasks

        results = evaluate_tasks(lm.model, lm.tokenizer, tasks, limit=limit, progress=progress)
        report["tasks"] = results
        report["zeroshot_avg"] = average_accuracy(results)
        report["protocol"]["task_limit"] = limit
    return report


def compare(
    model: str = DEFAULT_MODEL,
    recipes: Iterable[str] = BASELINE_RECIPES,
    text: str | Path | None = None,
    calib: str | Path | None = None,
    seq: int = 512,
    windows: int = 8,
    tasks: Iterable[str] = (),
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Float model and each recipe, evaluated on the same protocol: one row each."""
    recs = [load_recipe(r) for r in recipes]  # fail fast on a bad recipe
    base = load_model(model)
    if base.is_quantized:
        raise BitsmithError("compare starts from a float model; pass its source, not a quantized folder")
    rows = [{"recipe": "float", **evaluate(base, text, seq, windows, tasks, limit, progress)}]
    for rec in recs:
        lm = LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.source, None)
        lm.adapter = adapter_for(lm.model)
        quantize(lm, rec.raw | {"name": rec.name}, calib=calib, seed=seed, progress=progress)
        rows.append({"recipe": rec.name, **evaluate(lm, text, seq, windows, tasks, limit, progress)})
        del lm
    return rows


def info(model: str) -> dict:
    """Architecture, parameter count, stored tensor types, and quantization metadata when present."""
    lm = load_model(model)
    cfg = lm.model.config
    weights = {id(t): t.numel() for n, t in lm.model.named_parameters()}
    weights.update({id(m.weight): m.weight.numel() for m in lm.model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)})
    out = {
        "source": lm.source,
        "architecture": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "heads": f"{cfg.num_attention_heads} (kv {getattr(cfg, 'num_key_value_heads', cfg.num_attention_heads)})",
        "vocab": cfg.vocab_size,
        "tied_embeddings": lm.adapter.tied_embeddings(),
        "parameters": sum(weights.values()),
        "tensor_types": _stored_types(model, lm),
        **size_stats(lm),
    }
    if lm.is_quantized:
        out["recipe"] = lm.quant.get("recipe")
    return out


def _stored_types(model: str, lm: LoadedModel) -> dict[str, int]:
    """How the source file stores its tensors: GGUF types, safetensors dtypes, or bitsmith specs."""
    from collections import Counter

    if lm.is_quantized:
        return dict(Counter(f"{m['kind']} weight={_spec_str(m['weight'])} input={_spec_str(m.get('input'))}"
                            for m in lm.quant["modules"].values()))
    kind, path = resolve(model)
    if kind == "gguf":
        from bitsmith.models.gguf_file import GGUFModelFile

        return dict(Counter(t.tensor_type.name for t in GGUFModelFile(path).tensors.values()))
    from safetensors import safe_open

    counts: Counter = Counter()
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            counts.update(str(st.get_slice(k).get_dtype()) for k in st.keys())
    return dict(counts)


def _spec_str(d) -> str:
    from bitsmith.spec import QuantSpec

    return "float" if d is None else str(QuantSpec.from_dict(d))
