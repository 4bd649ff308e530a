"""Zero-shot log-likelihood evaluation of a causal LM, following lm-evaluation-harness (lm-eval).

Scoring mirrors lm-eval's ``HFLM.loglikelihood``:

* Trailing whitespace of a context is moved onto its continuation; the context and
  ``context + continuation`` are tokenized separately (no special tokens) and the continuation
  tokens are the tail of the joint encoding after the context's token count. The context is fed
  with its own tokens, so a context token never merges with the continuation.
* BOS rule (one rule for every model): if the tokenizer has a ``bos_token_id`` *and* its default
  encoding (``add_special_tokens=True``) starts with it, BOS is prepended to every context
  (Llama/Mistral-style tokenizers); otherwise nothing is prepended (GPT-2/OLMo/Qwen-style).
  This matches how each model saw text in training. An empty context falls back to BOS, else EOS,
  like lm-eval's ``prefix_token_id``. (lm-eval itself never adds BOS unless
  ``add_bos_token=True``; pass that to lm-eval to compare with BOS-adding tokenizers.)
* Sequences longer than the model's context keep their last ``max_length + 1`` tokens
  (left truncation of the context).
* ``acc``: argmax of summed continuation log-likelihoods. ``acc_norm``: argmax of the
  log-likelihood divided by the length of the choice text, as lm-eval computes it
  (``len(choice)`` of the answer without its ``" "`` target delimiter; equal to its UTF-8 byte
  length for ASCII answers). It is reported only where lm-eval reports it: tasks whose choices
  are different continuations (not WinoGrande, whose choices are contexts, nor LAMBADA).
* LAMBADA ``acc``: every target token is the greedy (argmax) prediction.

Requests are sorted by length (longest first, so memory problems show up at once), scored in
right-padded batches with an attention mask, and put back in order; results are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from bitsmith.data.tasks import LAST_WORD_TASKS, TASKS, Item, load_task
from bitsmith.errors import BitsmithError

Request = tuple[str, str]
"""A ``(context, continuation)`` pair."""
Score = tuple[float, bool]
"""Summed continuation log-likelihood and whether the continuation is the greedy prediction."""


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` if the tokenizer prepends BOS by default, else ``[]`` (see module doc)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer.encode("a", add_special_tokens=True)
    without = tokenizer.encode("a", add_special_tokens=False)
    return [bos] if with_special[:1] == [bos] and without[:1] != [bos] else []


def encode_request(
    tokenizer: Any, context: str, continuation: str, prefix: Sequence[int] = ()
) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-eval's ``_encode_pair`` does."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = tokenizer.encode(context, add_special_tokens=False) if context else []
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    continuation_ids = whole[len(context_ids) :] or tokenizer.encode(continuation, add_special_tokens=False)
    context_ids = list(prefix) + context_ids
    if not context_ids:
        fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if fallback is None:
            raise BitsmithError("empty context and the tokenizer has no BOS/EOS token; give it one")
        context_ids = [fallback]
    if not continuation_ids:
        raise BitsmithError(f"continuation {continuation!r} encodes to no tokens; check the tokenizer")
    return context_ids, continuation_ids


def model_max_length(model: Any, tokenizer: Any) -> int:
    """The model's context size: config positions, else the tokenizer's limit, else 2048."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 1_000_000 else 2048


def _device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


@torch.inference_mode()
def loglikelihoods(
    model: Any,
    tokenizer: Any,
    requests: Sequence[Request],
    batch_size: int = 8,
    progress: bool = True,
    desc: str | None = None,
) -> list[Score]:
    """Score each request; identical requests are computed once."""
    if batch_size < 1:
        raise BitsmithError(f"batch_size must be at least 1, got {batch_size}")
    max_len, prefix = model_max_length(model, tokenizer), bos_prefix(tokenizer)
    unique = list(dict.fromkeys(requests))
    # (model input, number of continuation targets at its end, target ids)
    encoded: list[tuple[list[int], list[int]]] = []
    for context, continuation in unique:
        context_ids, continuation_ids = encode_request(tokenizer, context, continuation, prefix)
        tokens = (context_ids + continuation_ids)[-(max_len + 1) :]
        n_targets = min(len(continuation_ids), len(tokens) - 1)
        encoded.append((tokens[:-1], tokens[len(tokens) - n_targets :]))
    order = sorted(range(len(unique)), key=lambda i: (-len(encoded[i][0]), i))
    device, pad_id = _device(model), tokenizer.pad_token_id or 0
    scores: list[Score | None] = [None] * len(unique)
    with tqdm(total=len(unique), desc=desc, disable=not progress, unit="req") as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = len(encoded[batch[0]][0])
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                inputs = encoded[i][0]
                input_ids[row, : len(inputs)] = torch.tensor(inputs)
                attention_mask[row, : len(inputs)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            for row, i in enumerate(batch):
                inputs, targets = encoded[i]
                end = len(inputs)
                logprobs = logits[row, end - len(targets) : end].float().log_softmax(-1)
                target = torch.tensor(targets, device=logprobs.device)
                ll = logprobs.gather(-1, target[:, None]).sum().item()
                scores[i] = (ll, bool((logprobs.argmax(-1) == target).all()))
            bar.update(len(batch))
    by_request = dict(zip(unique, scores))
    return [by_request[r] for r in requests]  # type: ignore[misc]


def _choice_length(continuation: str) -> float:
    """lm-eval's ``len(choice)``: the answer text without the ``" "`` target delimiter."""
    return float(max(1, len(continuation.removeprefix(" "))))


def compute_metrics(items: Sequence[Item], scores: Sequence[Sequence[Score]], last_word: bool = False) -> dict[str, Any]:
    """Task metrics from per-item, per-choice scores (``scores[k][i]`` for item k, choice i)."""
    if len(items) != len(scores) or not items:
        raise ValueError(f"need one score list per item, got {len(scores)} for {len(items)} items")
    if last_word:
        acc = sum(all(greedy for _, greedy in s) for s in scores) / len(items)
        return {"acc": acc, "acc_norm": None, "n": len(items)}
    normed = all(len(item.continuations) > 1 for item in items)
    hits = hits_norm = 0
    for item, item_scores in zip(items, scores):
        lls = [ll for ll, _ in item_scores]
        hits += max(range(len(lls)), key=lls.__getitem__) == item.gold
        if normed:
            norm = [ll / _choice_length(cont) for ll, (_, cont) in zip(lls, item.requests())]
            hits_norm += max(range(len(norm)), key=norm.__getitem__) == item.gold
    return {"acc": hits / len(items), "acc_norm": hits_norm / len(items) if normed else None, "n": len(items)}


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict]:
    """Zero-shot ``{"acc", "acc_norm", "n"}`` per task (``acc_norm`` None where undefined)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise BitsmithError(f"unknown task(s) {', '.join(unknown)}; supported tasks: {', '.join(TASKS)}")
    data = {name: load_task(name, limit) for name in tasks}  # fail on missing data before scoring
    was_training = model.training
    model.eval()
    try:
        results: dict[str, dict] = {}
        for name, items in data.items():
            requests = [r for item in items for r in item.requests()]
            flat = loglikelihoods(model, tokenizer, requests, batch_size, progress, desc=name)
            per_item, pos = [], 0
            for item in items:
                per_item.append(flat[pos : pos + item.n_choices])
                pos += item.n_choices
            results[name] = compute_metrics(items, per_item, last_word=name in LAST_WORD_TASKS)
        return results
    finally:
        model.train(was_training)


def average_accuracy(results: dict[str, dict]) -> float:
    """Unweighted mean over tasks of ``acc_norm`` where defined, else ``acc``."""
    values = [r["acc_norm"] if r.get("acc_norm") is not None else r["acc"] for r in results.values()]
    if not values:
        raise BitsmithError("no task results to average; evaluate at least one task")
    return math.fsum(values) / len(values)
