"""Streamed quantization: weights read and written block by block, equal to the in-memory run, under a memory cap."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bitsmith
from bitsmith.errors import BitsmithError
from bitsmith.models import load_model

GPTQ_A8 = {"name": "gptq-a8", "calibration": {"samples": 4, "seq": 32}, "steps": [
    {"gptq": {"weights": "int4:g32:asym", "lm_head": True}},
    {"act_quant": {"spec": "int8:token:asym"}},
]}
SMOOTH = {"name": "smooth-a8", "calibration": {"samples": 4, "seq": 32}, "steps": [  # folds scales into v and up
    {"smoothquant": {"alpha": "search"}}, {"act_quant": {"spec": "int8:tensor:sym", "static": True}},
    {"rtn": {"weights": "int4:g32:asym"}},
]}


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "tiny.txt"
    path.write_text(" ".join(f"w{(i * 37) % 93}" for i in range(4000)))
    return str(path)


def _same_logits(a: Path, b: Path) -> bool:
    ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(load_model(str(a)).model(input_ids=ids).logits, load_model(str(b)).model(input_ids=ids).logits)


@pytest.mark.parametrize("which, recipe", [("tiny_llama", GPTQ_A8), ("tiny_llama", SMOOTH), ("tiny_llama", "w4a4kv4"),
                                           ("tiny_qwen2", "w4a16-g64")])
def test_streamed_equals_in_memory(which, recipe, request, tmp_path, calib_file):
    folder, _ = request.getfixturevalue(which)
    bitsmith.quantize(str(folder), recipe, out=str(tmp_path / "mem"), calib=calib_file, progress=False)
    out = bitsmith.quantize(str(folder), recipe, out=str(tmp_path / "str"), calib=calib_file, progress=False, stream=True)
    assert out == tmp_path / "str"
    assert sorted(p.name for p in out.glob("model-block*.safetensors")) == ["model-block00000.safetensors", "model-block00001.safetensors"]
    assert _same_logits(tmp_path / "mem", out)


def test_streamed_from_gguf_equals_in_memory(tmp_path, calib_file):
    from transformers import LlamaConfig, LlamaForCausalLM

    from test_models import _write_llama_gguf

    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5, max_position_embeddings=256,
                      tie_word_embeddings=True, initializer_range=0.1)
    gguf_path = tmp_path / "tiny.gguf"
    _write_llama_gguf(gguf_path, LlamaForCausalLM(cfg).eval(), with_output=False)
    # A GGUF without a tokenizer cannot be calibrated on text; stream a data-free recipe from it.
    from bitsmith.models import lazy
    from bitsmith.models.gguf_file import GGUFModelFile
    from bitsmith.models.load import build_model

    f = GGUFModelFile(gguf_path)
    skeleton = lazy.build_skeleton(f.config())
    source = lazy.GGUFSource(f)
    full = build_model(f.config(), f.iter_state_dict())
    lazy.materialize_outside_blocks(skeleton, list(skeleton.model.layers), source)
    for block in skeleton.model.layers:
        lazy.materialize(skeleton, block, source)
    ids = torch.randint(3, 96, (1, 16))
    with torch.no_grad():
        assert torch.equal(skeleton(input_ids=ids).logits, full(input_ids=ids).logits)


def test_released_block_frees_its_tensors(tiny_llama):
    from bitsmith.models import lazy
    from bitsmith.models.load import load_model_streamed

    folder, _ = tiny_llama
    lm = load_model_streamed(str(folder))
    block = lm.adapter.blocks()[0]
    assert all(p.is_meta for p in block.parameters())
    lazy.materialize(lm.model, block, lm.weights)
    assert not any(p.is_meta for p in block.parameters())
    lazy.release(block)
    assert all(t.is_meta for t in block.state_dict().values())


def test_parked_outside_parameters_come_back_as_read(tiny_llama):
    """While the blocks are processed a streamed model drops the embeddings (and whatever else outside
    the blocks no step changed); they are read again afterwards, tied as before."""
    from bitsmith.models import lazy
    from bitsmith.models.load import load_model_streamed

    folder, model = tiny_llama
    lm = load_model_streamed(str(folder))
    read = lazy.materialize_outside_blocks(lm.model, lm.adapter.blocks(), lm.weights)
    ad = lm.adapter
    with torch.no_grad():
        ad.final_norm().weight.mul_(2)  # changed in place by a step: must stay
    parked = lazy.park_unchanged(lm.model, read)
    assert sorted(parked) == ["model.embed_tokens.weight"]
    assert ad.embeddings().weight.is_meta and ad.tied_embeddings() and not ad.final_norm().weight.is_meta
    lazy.unpark(lm.model, parked, lm.weights)
    assert torch.equal(ad.embeddings().weight, model.model.embed_tokens.weight) and ad.tied_embeddings()
    parked = lazy.park_unchanged(lm.model, lazy.materialize_outside_blocks(lm.model, lm.adapter.blocks(), lm.weights))
    with torch.no_grad():
        ad.embeddings().weight.mul_(2)  # a step changing a dropped parameter cannot go unnoticed
    with pytest.raises(BitsmithError, match="changed while the blocks were processed"):
        lazy.unpark(lm.model, parked, lm.weights)


def test_stream_needs_an_output_and_a_float_source(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    with pytest.raises(BitsmithError, match="output folder"):
        bitsmith.quantize(str(folder), "w4a16-g64", stream=True, progress=False)
    q = tmp_path / "q"
    bitsmith.quantize(str(folder), "w4a16-g64", out=str(q), progress=False)
    with pytest.raises(BitsmithError, match="already quantized"):
        bitsmith.quantize(str(q), "w4a16-g64", out=str(tmp_path / "again"), stream=True, progress=False)


def test_failed_stream_leaves_no_output(tiny_llama, tmp_path, monkeypatch):
    from bitsmith.checkpoint import CheckpointWriter

    folder, _ = tiny_llama
    calls = {"n": 0}
    original = CheckpointWriter.write_block

    def failing(self, model, block):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        original(self, model, block)

    monkeypatch.setattr(CheckpointWriter, "write_block", failing)
    with pytest.raises(OSError):
        bitsmith.quantize(str(folder), "w4a16-g64", out=str(tmp_path / "out"), stream=True, progress=False)
    assert list(tmp_path.iterdir()) == []


CAPPED = textwrap.dedent("""
    import resource, sys
    import torch
    import bitsmith
    # Warm up every code path on a tiny model first: library buffers (BLAS, thread pools) are
    # allocated once per process and are not what the cap is about.
    bitsmith.quantize(sys.argv[1], sys.argv[3], out=sys.argv[5] + "-warm", calib=sys.argv[4], progress=False, stream=True)
    data = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmData:")][0]
    cap = int(sys.argv[6])
    if sys.argv[7] == "stream-hold":  # keep every inner activation, as the in-memory path does
        import bitsmith.pipeline
        bitsmith.pipeline.STREAMED_HOLD_BYTES = float("inf")
    resource.setrlimit(resource.RLIMIT_DATA, (data + cap, resource.RLIM_INFINITY))
    bitsmith.quantize(sys.argv[2], sys.argv[3], out=sys.argv[5], calib=sys.argv[4], progress=False,
                      stream=sys.argv[7].startswith("stream"))
    print("done")
""")


def test_quantizes_under_a_memory_cap_smaller_than_the_model(tiny_llama, tmp_path, calib_file):
    """A 24-block model of 240 MB (fp32) is GPTQ-quantized with at most 130 MB of new private memory;
    the in-memory path under the same cap fails, so the cap really binds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import save_tiny

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=512, intermediate_size=1024, num_hidden_layers=24, num_attention_heads=8,
                      num_key_value_heads=8, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    wide = save_tiny(tmp_path / "wide", LlamaForCausalLM(cfg))
    fp32_bytes = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters()) * 4
    cap = 130 * 2**20
    assert cap < 0.6 * fp32_bytes
    script = tmp_path / "capped.py"
    script.write_text(CAPPED)
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text("calibration: {samples: 4, seq: 64}\nsteps:\n  - gptq: {weights: 'int4:g64'}\n")
    tiny, _ = tiny_llama

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(tiny), str(wide), str(recipe), calib_file,
                               str(tmp_path / f"out-{mode}"), str(cap), mode], capture_output=True, text=True, timeout=900)  # generous: a shared CI machine can be slow

    streamed = run("stream")
    assert streamed.returncode == 0 and "done" in streamed.stdout, streamed.stderr[-2000:]
    assert len(list((tmp_path / "out-stream").glob("model-block*.safetensors"))) == 24
    in_memory = run("full")
    assert in_memory.returncode != 0 and "memory" in in_memory.stderr.lower()
    assert not (tmp_path / "out-full").exists()


def test_streamed_activations_stay_at_the_hidden_states(tiny_llama, tmp_path, calib_file):
    """With 32k calibration tokens and a wide MLP, the MLP's inner activation for all tokens is 134 MB
    and the hidden states 8 MB: a streamed run computes the inner activation again chunk by chunk
    and fits in 100 MB of new private memory; keeping it for all tokens (as the in-memory path does)
    does not, so the cap binds on exactly what the stream leaves out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import save_tiny

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = save_tiny(tmp_path / "wide-mlp", LlamaForCausalLM(cfg))
    samples, seq = 64, 512
    inner_bytes = samples * seq * cfg.intermediate_size * 4
    cap = 100 * 2**20
    assert cap < inner_bytes
    script = tmp_path / "capped.py"
    script.write_text(CAPPED)
    recipe = tmp_path / "gptq.yaml"
    recipe.write_text(f"calibration: {{samples: {samples}, seq: {seq}}}\nsteps:\n  - gptq: {{weights: 'int4:g64'}}\n")
    tiny, _ = tiny_llama

    def run(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(tiny), str(model), str(recipe), calib_file,
                               str(tmp_path / f"out-{mode}"), str(cap), mode], capture_output=True, text=True, timeout=900)

    streamed = run("stream")
    assert streamed.returncode == 0 and "done" in streamed.stdout, streamed.stderr[-2000:]
    held = run("stream-hold")
    assert held.returncode != 0 and "memory" in held.stderr.lower(), held.stderr[-2000:]


def test_cli_stream_flag(tiny_llama, tmp_path):
    from test_cli import invoke

    folder, _ = tiny_llama
    out = tmp_path / "s"
    result = invoke("quantize", "--model", folder, "--recipe", "w4a16-g64", "--out", out, "--stream")
    assert result.exit_code == 0, result.output
    assert f"saved {out}" in result.stdout and "recipe w4a16-g64" in result.stdout
    assert (out / "model-block00001.safetensors").is_file()
    missing = invoke("quantize", "--model", tmp_path / "nope", "--recipe", "w4a16-g64", "--out", tmp_path / "t", "--stream")
    assert missing.exit_code == 2 and "not found" in missing.stderr
