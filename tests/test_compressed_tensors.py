"""compressed-tensors export: the library decompresses exactly bitsmith's weights, transformers loads the folder."""

from __future__ import annotations

import json

import pytest
import torch

import bitsmith
from bitsmith.errors import BitsmithError
from bitsmith.export.compressed_tensors import pack_rows
from bitsmith.runtime.modules import QuantLinear

ct = pytest.importorskip("compressed_tensors")

ASYM3 = {"name": "w3-asym-g32", "steps": [{"rtn": {"weights": "int3:g32:asym"}}]}
ASYM4_CHANNEL = {"name": "w4-asym-channel", "steps": [{"rtn": {"weights": "int4:channel:asym"}}]}


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("cols", [32, 45, 96])
def test_pack_rows_is_the_libraries_layout(bits, cols):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    g = torch.Generator().manual_seed(bits * 100 + cols)
    codes = torch.randint(0, 1 << bits, (5, cols), generator=g, dtype=torch.uint8)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-cols * bits // 32))
    signed = unpack_from_int32(packed, bits, torch.Size((5, cols)))
    assert torch.equal(signed.to(torch.int16) + (1 << (bits - 1)), codes.to(torch.int16))


def _export(folder, recipe, tmp_path):
    q = tmp_path / "q"
    bitsmith.quantize(str(folder), recipe, out=str(q), progress=False)
    out = bitsmith.export(str(q), "compressed-tensors", tmp_path / "ct")
    return bitsmith.load_model(str(q), kernels="off"), out


def _decompressed(out, config):
    """Each quantized linear's weight as the compressed-tensors library decompresses it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    tensors = load_file(str(out / "model.safetensors"))
    weights = {}
    for group in config["config_groups"].values():
        scheme = QuantizationScheme.model_validate(group)
        compressor = BaseCompressor.get_value_from_registry(group["format"])
        for name in group["targets"]:
            local = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            weights[name] = compressor.decompress(local, scheme)["weight"]
    return weights


@pytest.mark.parametrize("recipe", ["w4a16-g64", "w8a8", ASYM3, ASYM4_CHANNEL], ids=["w4-sym-g64", "w8a8", "w3-asym-g32", "w4-asym-ch"])
def test_library_decompresses_bitsmiths_weights_exactly(recipe, tiny_llama, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig

    folder, _ = tiny_llama
    ref, out = _export(folder, recipe, tmp_path)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(config)  # a config the library accepts
    weights = _decompressed(out, config)
    linears = {n: m for n, m in ref.model.named_modules() if isinstance(m, QuantLinear) and m.packed is not None}
    assert set(weights) == set(linears) and len(weights) == 14
    for name, m in linears.items():
        assert torch.equal(weights[name].float(), m.weight), name
    expected = "int-quantized" if recipe == "w8a8" else "pack-quantized"
    assert config["format"] == expected and config["ignore"] == ["lm_head"]


@pytest.mark.parametrize("recipe", ["w4a16-g64", "w8a8"])
def test_transformers_loads_the_export_with_bitsmiths_logits(recipe, tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, float_model = tiny_llama
    ref, out = _export(folder, recipe, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # compressed, as vLLM would see it
    ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref.model(input_ids=ids).logits
        float_logits = float_model(input_ids=ids).logits
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    assert not torch.allclose(got, float_logits, atol=1e-4)  # the quantized function, not the float one


@pytest.mark.parametrize("recipe, needle", [
    ("w4a4kv4", "KV-cache quantization"),
    ({"name": "fp8", "steps": [{"rtn": {"weights": "fp8:e4m3:channel"}}]}, "weight spec fp8"),
    ({"name": "emb", "steps": [{"rtn": {"weights": "int4:g32:sym", "embeddings": True}}]}, "quantized embedding"),
    ({"name": "ic", "steps": [{"rtn": {"weights": "int4:ic:g32:sym"}}]}, "per channel or per group"),
])
def test_inexpressible_models_are_refused_and_nothing_is_written(recipe, needle, tiny_llama, tmp_path):
    folder, _ = tiny_llama
    q = tmp_path / "q"
    bitsmith.quantize(str(folder), recipe, out=str(q), progress=False)
    with pytest.raises(BitsmithError, match=needle):
        bitsmith.export(str(q), "compressed-tensors", tmp_path / "ct")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_float_models_and_existing_outputs_are_refused(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    with pytest.raises(BitsmithError, match="needs a quantized model"):
        bitsmith.export(str(folder), "compressed-tensors", tmp_path / "ct")
    (tmp_path / "ct").mkdir()
    with pytest.raises(BitsmithError, match="already exists"):
        bitsmith.export(str(folder), "compressed-tensors", tmp_path / "ct")
    with pytest.raises(BitsmithError, match="unknown export format 'onnx'"):
        bitsmith.export(str(folder), "onnx", tmp_path / "x")
