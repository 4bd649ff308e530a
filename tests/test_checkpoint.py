"""Quantized checkpoints: save/load round trip, sizes on disk, metadata, atomic and safe writes."""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch

import bitsmith
from bitsmith.checkpoint import save_quantized
from bitsmith.errors import BitsmithError
from bitsmith.eval.size import size_stats
from bitsmith.recipes import load_recipe
from bitsmith.runtime.modules import QuantEmbedding, QuantLinear

CUSTOM = {
    "name": "w3-asym-g32-all",
    "description": "3-bit asymmetric groups of 32, lm_head and embeddings too",
    "steps": [{"rtn": {"weights": "int3:g32:asym", "lm_head": True, "embeddings": True}}],
}
# What each recipe stores, for the expected size: (bits, group size or None for per channel, asymmetric,
# embeddings quantized, lm_head quantized)
LAYOUT = {
    "w8a8": (8, None, False, False, False),
    "w4a16-g64": (4, 64, False, False, False),
    "w4a4kv4": (4, None, False, False, False),
    "custom": (3, 32, True, True, True),
}
RECIPES = {"w8a8": "w8a8", "w4a16-g64": "w4a16-g64", "w4a4kv4": "w4a4kv4", "custom": CUSTOM}


def _packed_weight_bytes(rows: int, cols: int, bits: int, group: int | None, asym: bool) -> dict[str, int]:
    """Bytes of codes, fp16 scales and zero points of one (rows, cols) weight: the bit count."""
    groups = rows * (cols // group if group else 1)
    out = {"qcodes": math.ceil(rows * cols * bits / 8), "qscale": 2 * groups}
    if asym:
        out["qzero"] = math.ceil(groups * bits / 8)
    return out


def _expected_data_bytes(cfg, layout) -> int:
    bits, group, asym, emb_q, head_q = layout
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]
    total = 0
    for _ in range(cfg.num_hidden_layers):
        total += sum(sum(_packed_weight_bytes(r, c, bits, group, asym).values()) for r, c in shapes)
        total += 2 * h * 4  # two RMSNorm weights, fp32
    total += h * 4  # final norm
    total += sum(_packed_weight_bytes(v, h, bits, group, asym).values()) if emb_q else v * h * 4
    if head_q:
        total += sum(_packed_weight_bytes(v, h, bits, group, asym).values())
    elif not layout_tied(layout):
        total += v * h * 4
    return total


def layout_tied(layout) -> bool:
    # the tiny Llama has tied embeddings; they stay tied (stored once) unless one of the pair is quantized
    return not (layout[3] or layout[4])


def _safetensors_header(path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


def _ids(seed=0):
    return torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _generate(model, ids):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                              do_sample=False)


@pytest.mark.parametrize("key", list(RECIPES))
def test_quantize_save_reload_round_trip(key, tiny_llama, tmp_path):
    folder, float_model = tiny_llama
    out = tmp_path / "q"
    q = bitsmith.quantize(str(folder), RECIPES[key], out=str(out), progress=False)
    loaded = bitsmith.load_model(str(out), kernels="off")  # the stored weights, computed as when saved
    assert loaded.is_quantized and q.is_quantized

    # bit-identical logits, and they are the quantized ones (not the float model's)
    ids = _ids()
    before, after = _logits(q.model, ids), _logits(loaded.model, ids)
    assert torch.equal(before, after)
    assert not torch.equal(after, _logits(float_model, ids))

    # the same modules are quantized the same way after reload
    def kinds(m):
        return {n: (type(x).__name__, str(x.packed.spec) if getattr(x, "packed", None) else None,
                    str(x.act_spec) if getattr(x, "act_spec", None) else None)
                for n, x in m.named_modules() if isinstance(x, (QuantLinear, QuantEmbedding))}
    assert kinds(loaded.model) == kinds(q.model)
    assert len(kinds(loaded.model)) == 14 + LAYOUT[key][3] + LAYOUT[key][4]
    assert loaded.adapter.tied_embeddings() == layout_tied(LAYOUT[key]) == q.adapter.tied_embeddings()

    # greedy generation works and is identical before and after the save
    prompt = ids[:1, :6]
    g_before, g_after = _generate(q.model, prompt), _generate(loaded.model, prompt)
    assert g_before.shape == (1, 11)
    assert torch.equal(g_before, g_after)

    # metadata files
    names = set(os.listdir(out))
    assert {"model.safetensors", "bitsmith.json", "recipe.yaml", "config.json"} <= names
    assert any(n.startswith("tokenizer") for n in names)
    meta = json.loads((out / "bitsmith.json").read_text())
    assert meta["source"] == str(folder.resolve()) == loaded.source
    expected_name = CUSTOM["name"] if key == "custom" else key
    assert meta["recipe"] == expected_name == loaded.quant["recipe"]
    assert meta["format_version"] == 1
    assert len(meta["modules"]) == len(kinds(q.model))
    assert bool(meta["kv"]) == (key == "w4a4kv4")
    rec = load_recipe(out / "recipe.yaml")
    assert rec.name == expected_name
    assert rec.raw["steps"] == (CUSTOM if key == "custom" else load_recipe(key).raw)["steps"]
    assert not [n for n in os.listdir(tmp_path) if n != "q"]  # no temp folder left next to it


@pytest.mark.parametrize("key", list(RECIPES))
def test_size_on_disk_is_the_bit_count(key, tiny_llama, tmp_path):
    folder, float_model = tiny_llama
    out = tmp_path / "q"
    q = bitsmith.quantize(str(folder), RECIPES[key], out=str(out), progress=False)
    bits, group, asym, _, _ = LAYOUT[key]
    path = out / "model.safetensors"
    header_len, header = _safetensors_header(path)
    header.pop("__metadata__", None)

    # every quantized linear stores numel*bits/8 bytes of codes plus its scales (and zero points)
    linears = [(n, m) for n, m in q.model.named_modules() if isinstance(m, QuantLinear) and m.packed is not None]
    assert len(linears) >= 14
    for name, m in linears:
        rows, cols = m.packed.shape
        want = _packed_weight_bytes(rows, cols, bits, group, asym)
        entries = {t: header[f"{name}.{t}"] for t in want}
        got = {t: e["data_offsets"][1] - e["data_offsets"][0] for t, e in entries.items()}
        assert got == want, name
        assert {t: e["dtype"] for t, e in entries.items()} == {t: "F16" if t == "qscale" else "U8" for t in want}
        assert f"{name}.weight" not in header  # the dequantized copy is not saved

    expected = _expected_data_bytes(float_model.config, LAYOUT[key])
    data = os.path.getsize(path) - 8 - header_len
    assert data == expected
    assert expected <= os.path.getsize(path) <= expected + 8 + 200 * len(header)  # header: names and shapes only
    assert size_stats(q)["size_mb"] * 2**20 == pytest.approx(expected)  # the reported size is what is on disk


def test_existing_output_is_refused_and_untouched(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(BitsmithError, match="already exists"):
        bitsmith.quantize(str(folder), "w8a8", out=str(out), progress=False)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"

    lm = bitsmith.quantize(str(folder), "w8a8", progress=False)  # in memory, then the lower-level save
    with pytest.raises(BitsmithError, match="already exists"):
        save_quantized(lm, out, load_recipe("w8a8").to_yaml())
    assert os.listdir(out) == ["keep.txt"]

    save_quantized(lm, out, load_recipe("w8a8").to_yaml(), force=True)  # force replaces it, leaving nothing else
    assert "keep.txt" not in os.listdir(out) and (out / "bitsmith.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert torch.equal(_logits(bitsmith.load_model(str(out), kernels="off").model, _ids()), _logits(lm.model, _ids()))


def _boom(*args, **kwargs):
    raise OSError("disk full")


def test_failed_save_leaves_nothing_behind(tiny_llama, tmp_path, monkeypatch):
    folder, _ = tiny_llama
    lm = bitsmith.load_model(str(folder))
    monkeypatch.setattr(lm.tokenizer, "save_pretrained", _boom)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        bitsmith.quantize(lm, "w4a16-g64", out=str(out), progress=False)
    assert os.listdir(tmp_path) == []


def test_failed_forced_save_keeps_the_old_folder(tiny_llama, tmp_path, monkeypatch):
    folder, _ = tiny_llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    lm = bitsmith.load_model(str(folder))
    monkeypatch.setattr(lm.tokenizer, "save_pretrained", _boom)
    with pytest.raises(OSError, match="disk full"):
        bitsmith.quantize(lm, "w8a8", out=str(out), force=True, progress=False)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["keep.txt"]


def test_quantizing_a_quantized_folder_is_refused(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    bitsmith.quantize(str(folder), "w4a16-g64", out=str(tmp_path / "q"), progress=False)
    with pytest.raises(BitsmithError, match="already quantized"):
        bitsmith.quantize(str(tmp_path / "q"), "w8a8", progress=False)


@pytest.mark.parametrize("content", ["[]", "\"text\"", "{not json", "{\"format_version\": 99}"])
def test_damaged_bitsmith_json_is_a_bitsmith_error(tiny_llama, tmp_path, content):
    folder, _ = tiny_llama
    out = tmp_path / "q"
    bitsmith.quantize(str(folder), "w4a16-g64", out=str(out), progress=False)
    (out / "bitsmith.json").write_text(content)
    with pytest.raises(BitsmithError, match="bitsmith.json is unreadable|incompatible bitsmith"):
        bitsmith.load_model(str(out))


def test_damaged_weights_are_a_bitsmith_error(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    out = tmp_path / "q"
    bitsmith.quantize(str(folder), "w4a16-g64", out=str(out), progress=False)
    (out / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(BitsmithError, match="damaged"):
        bitsmith.load_model(str(out))
