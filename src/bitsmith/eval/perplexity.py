"""Perplexity, KL divergence and top-1 agreement against the float model.

Windows are non-overlapping slices of one token stream (see :func:`bitsmith.data.text.eval_windows`).
The float model's log-probabilities are cached on disk (fp16, one file per model/text/window
setting), so the float model runs once however many quantized variants are compared. KL is
KL(float || quantized) per position, averaged over all positions; top-1 is the share of positions
where both models' most likely next token agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Protocol:
    """What a perplexity figure was measured on; goes into every report."""

    text: str
    text_digest: str
    seq: int
    windows: int

    def to_dict(self) -> dict:
        return {"text": self.text, "seq": self.seq, "windows": self.windows}


def _logprobs(model, window: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=window[None]).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


class FloatReference:
    """The float model's log-probabilities on the evaluation windows, cached on disk."""

    def __init__(self, path: Path, metrics: dict) -> None:
        self.path = path
        self.metrics = metrics  # float ppl and timing, measured when the cache was made
        self._logp = np.load(path, mmap_mode="r", allow_pickle=False)
        self._argmax = np.load(_argmax_path(path), allow_pickle=False)

    def window(self, i: int) -> torch.Tensor:
        """Float log-probabilities of window ``i`` (stored in fp16), shape (seq, vocab)."""
        return torch.from_numpy(np.asarray(self._logp[i], dtype=np.float32))

    def argmax(self, i: int) -> torch.Tensor:
        """The float model's top token at each position, taken before fp16 storage (exact)."""
        return torch.from_numpy(self._argmax[i].astype(np.int64))

    @staticmethod
    def cache_path(cache: Path, source_key: str, protocol: Protocol) -> Path:
        key = hashlib.sha256(f"{source_key}|{protocol.text_digest}|{protocol.seq}|{protocol.windows}".encode()).hexdigest()[:20]
        return cache / "float_logits" / f"{key}.npy"

    @classmethod
    def load_or_build(cls, path: Path, build_model, windows: torch.Tensor, progress: bool = True) -> "FloatReference":
        """Open the cache at ``path``; if absent, run ``build_model()`` once and write it atomically."""
        meta_path = path.with_suffix(".json")
        if path.is_file() and meta_path.is_file() and _argmax_path(path).is_file():
            try:
                return cls(path, json.loads(meta_path.read_text()))
            except (ValueError, OSError):
                pass  # damaged cache: rebuild below
        model = build_model()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
        n, seq = windows.shape
        vocab = None
        arr = None
        top = np.zeros((n, seq), dtype=np.int32)
        nll, t0 = 0.0, time.perf_counter()
        with torch.inference_mode():
            for i in tqdm(range(n), desc="float reference", disable=not progress, leave=False):
                logp = _logprobs(model, windows[i])
                if arr is None:
                    vocab = logp.shape[-1]
                    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, seq, vocab))
                arr[i] = logp.to(torch.float16).numpy()
                top[i] = logp.argmax(-1).numpy()
                nll += -logp[:-1].gather(-1, windows[i, 1:, None]).sum().item()
        arr.flush()
        del arr
        seconds = time.perf_counter() - t0
        metrics = {"ppl": float(np.exp(nll / (n * (seq - 1)))), "seconds": seconds, "tokens_per_s": n * seq / seconds}
        os.replace(tmp, path)
        tmp_top = path.with_name(f"{path.stem}.tmp{os.getpid()}.argmax.npy")
        np.save(tmp_top, top)
        os.replace(tmp_top, _argmax_path(path))
        tmp_meta = meta_path.with_name(meta_path.name + f".tmp{os.getpid()}")
        tmp_meta.write_text(json.dumps(metrics))
        os.replace(tmp_meta, meta_path)
        return cls(path, metrics)


def _argmax_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.argmax.npy")


def evaluate_lm(model, windows: torch.Tensor, reference: FloatReference | None = None, progress: bool = True) -> dict:
    """ppl (and kl, top1 when a reference is given) of ``model`` on ``windows`` (n, seq)."""
    n, seq = windows.shape
    nll = kl = agree = 0.0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in tqdm(range(n), desc="evaluate", disable=not progress, leave=False):
            logp = _logprobs(model, windows[i])
            nll += -logp[:-1].gather(-1, windows[i, 1:, None]).sum().item()
            if reference is not None:
                ref = reference.window(i)
                kl += (ref.exp() * (ref - logp)).sum().item()
                agree += (reference.argmax(i) == logp.argmax(-1)).sum().item()
    seconds = time.perf_counter() - t0
    out = {"ppl": float(np.exp(nll / (n * (seq - 1)))), "tokens_per_s": n * seq / seconds, "eval_seconds": seconds}
    if reference is not None:
        out["kl"] = kl / (n * seq)
        out["top1"] = agree / (n * seq)
    return out
