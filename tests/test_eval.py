import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bitsmith.eval.perplexity import FloatReference, Protocol, evaluate_lm


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def test_perplexity_matches_manual_and_reference_is_cached(tiny, tmp_path):
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 61, (3, 16), generator=g)
    with torch.no_grad():
        logp = torch.log_softmax(tiny(windows).logits, -1)
    nll = -logp[:, :-1].gather(-1, windows[:, 1:, None]).mean()
    calls = []

    def build():
        calls.append(1)
        return tiny

    path = FloatReference.cache_path(tmp_path, "tiny", Protocol("t", "d", 16, 3))
    ref = FloatReference.load_or_build(path, build, windows, progress=False)
    assert abs(ref.metrics["ppl"] - nll.exp().item()) < 1e-3
    again = FloatReference.load_or_build(path, build, windows, progress=False)
    assert len(calls) == 1  # the float model ran once
    assert np.allclose(again.window(1).numpy(), logp[1].numpy(), atol=2e-2)

    same = evaluate_lm(tiny, windows, again, progress=False)
    assert abs(same["ppl"] - nll.exp().item()) < 1e-3
    assert abs(same["kl"]) < 1e-3 and same["top1"] == 1.0

    with torch.no_grad():  # a perturbed model drifts away from the reference
        tiny.lm_head.weight.mul_(3.0)
    other = evaluate_lm(tiny, windows, again, progress=False)
    assert other["kl"] > 1e-3
    manual_kl = 0.0
    with torch.no_grad():
        q = torch.log_softmax(tiny(windows).logits, -1)
    for i in range(3):
        p = again.window(i)
        manual_kl += (p.exp() * (p - q[i])).sum().item()
    assert abs(other["kl"] - manual_kl / 48) < 1e-4
