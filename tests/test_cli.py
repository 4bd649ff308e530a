"""The command line, end to end on the real default model (short windows), and its handling of bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bitsmith.cli import main

BUILTINS = ("w8a8", "w4a16-g64", "w4a4kv4")


def invoke(*args: str):
    """Run the CLI in-process with stderr kept apart; restore the grad mode its group callback switches off."""
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        runner = CliRunner()  # click >= 8.2 keeps stderr apart already
    prev = torch.is_grad_enabled()
    try:
        return runner.invoke(main, [str(a) for a in args])
    finally:
        torch.set_grad_enabled(prev)


def shown_lines(text: str) -> list[str]:
    """Non-blank lines as a terminal shows them: a carriage return (progress bar redraw) overwrites the line."""
    lines = [seg.rsplit("\r", 1)[-1] for seg in text.split("\n")]
    return [line for line in lines if line.strip()]


def _ok(result) -> None:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)


# -- a quantized model, shared by the end-to-end tests ---------------------------------------------
@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "w4"
    result = invoke("quantize", "--model", "default", "--recipe", "w4a16-g64", "--out", out)
    _ok(result)
    assert f"saved {out}" in result.stdout and "w4a16-g64" in result.stdout
    return out


def test_quantize_writes_a_complete_folder(quantized_dir):
    meta = json.loads((quantized_dir / "bitsmith.json").read_text())
    assert meta["source"] == "default" and meta["recipe"] == "w4a16-g64"
    assert len(meta["modules"]) == 30 * 7
    assert all(m["weight"]["bits"] == 4 and m["weight"]["group_size"] == 64 for m in meta["modules"].values())
    assert (quantized_dir / "recipe.yaml").is_file() and (quantized_dir / "config.json").is_file()
    assert (quantized_dir / "model.safetensors").stat().st_size < 200 * 2**20  # 4-bit blocks, float embeddings
    assert [p.name for p in quantized_dir.parent.iterdir()] == ["w4"]  # no temp folder left beside it


def test_eval_json_report(quantized_dir, tmp_path):
    report_path = tmp_path / "r.json"
    result = invoke("eval", "--model", quantized_dir, "--seq", "64", "--windows", "2", "--json", report_path)
    _ok(result)
    assert "seq=64 windows=2" in result.stdout
    report = json.loads(report_path.read_text())
    assert {"ppl", "kl", "top1", "bpw", "protocol"} <= set(report)
    assert report["protocol"] == {"text": "boolq-eval", "seq": 64, "windows": 2}
    assert math.isfinite(report["ppl"]) and 1.0 < report["ppl"] < 1000.0
    assert 0.0 < report["kl"] < 5.0
    assert 0.0 < report["top1"] <= 1.0
    assert 4.0 < report["bpw"] < 4.5
    assert report["float_ppl"] != report["ppl"]


def test_eval_json_into_a_missing_folder_is_a_clean_error(quantized_dir, tmp_path):
    target = tmp_path / "no" / "such" / "r.json"
    result = invoke("eval", "--model", quantized_dir, "--seq", "64", "--windows", "2", "--json", target)
    _assert_one_error_line(result, [str(target)])
    assert not (tmp_path / "no").exists()


def test_info_on_quantized_and_default(quantized_dir):
    q = invoke("info", quantized_dir)
    _ok(q)
    lines = q.stdout.splitlines()
    assert "architecture: llama" in lines and "layers: 30" in lines and "recipe: w4a16-g64" in lines
    d = invoke("info", "default")
    _ok(d)
    lines = d.stdout.splitlines()
    assert "architecture: llama" in lines and "hidden: 576" in lines and "source: default" in lines
    assert "bpw: 32.000" in lines and "tied_embeddings: True" in lines


def test_recipes_lists_the_builtins():
    result = invoke("recipes")
    _ok(result)
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert set(BUILTINS) <= set(names)


def test_help_of_every_command():
    result = invoke("--help")
    _ok(result)
    assert {"quantize", "eval", "compare", "info", "recipes"} <= set(main.commands)
    for name in main.commands:
        assert name in result.stdout
        sub = invoke(name, "--help")
        _ok(sub)
        assert sub.stdout.startswith(f"Usage: main {name}") or f" {name} " in sub.stdout.splitlines()[0]


def test_console_script_entry_point():
    exe = Path(sys.executable).parent / "bitsmith"
    exe = str(exe) if exe.is_file() else shutil.which("bitsmith")
    assert exe, "the bitsmith console script is not installed"
    proc = subprocess.run([exe, "recipes"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in BUILTINS:
        assert any(line.startswith(name + " ") for line in proc.stdout.splitlines()), proc.stdout
    assert "Traceback" not in proc.stderr


# -- bad input ------------------------------------------------------------------------------------
def _recipe_file(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(body)
    return p


def _recipe_file_bytes(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_bytes(data)
    return p


def _corrupt_gguf(tmp_path: Path) -> Path:
    p = tmp_path / "x.gguf"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return p


def _corrupt_safetensors_dir(tmp_path: Path) -> Path:
    from transformers import LlamaConfig

    d = tmp_path / "broken"
    LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(str(d))
    (d / "model.safetensors").write_bytes(b"\x07garbage, not a safetensors file" * 8)
    return d


# case -> (builder(tmp_path, request) -> (model, recipe), substrings the one error line must contain)
BAD_INPUTS = {
    "missing_model_file": (lambda t, r: (t / "missing.gguf", "w4a16-g64"), ["missing.gguf", "not found"]),
    "corrupt_gguf": (lambda t, r: (_corrupt_gguf(t), "w4a16-g64"), ["x.gguf", "not a readable GGUF"]),
    "corrupt_safetensors": (lambda t, r: (_corrupt_safetensors_dir(t), "w4a16-g64"),
                            ["model.safetensors", "not a readable safetensors"]),
    "unknown_model_name": (lambda t, r: ("no-such-model", "w4a16-g64"), ["no-such-model", "not found"]),
    "unsupported_architecture": (lambda t, r: (r.getfixturevalue("tiny_gpt2_dir"), "w4a16-g64"),
                                 ["'gpt2'", "not supported", "llama"]),
    "bad_spec": (lambda t, r: ("default", _recipe_file(t, "steps:\n  - rtn:\n      weights: int9:g64\n")),
                 ["'bits'", "9", "2, 3, 4, 5, 6, 7, 8"]),
    "unknown_step": (lambda t, r: ("default", _recipe_file(t, "steps:\n  - frobnicate:\n      weights: int4:g64\n")),
                     ["unknown recipe step 'frobnicate'", "rtn"]),
    "unknown_step_argument": (lambda t, r: ("default", _recipe_file(t, "steps:\n  - rtn:\n      weights: int4:g64\n      lm_heads: true\n")),
                              ["'rtn'", "unknown argument 'lm_heads'"]),
    "recipe_file_not_utf8": (lambda t, r: ("default", _recipe_file_bytes(t, b"\xff\xfe\x00steps")), ["bad.yaml"]),
    "unknown_recipe_name": (lambda t, r: ("default", "w5a5-nope"), ["w5a5-nope", "w4a16-g64"]),
    "group_size_does_not_divide": (lambda t, r: ("default", _recipe_file(t, "steps:\n  - rtn:\n      weights: int4:g100\n")),
                                   ["group size 100", "does not divide", "576"]),
}


def _assert_one_error_line(result, expected: list[str]) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # a BitsmithError turned into exit 2, nothing else escaped
    err = result.stderr
    assert "Traceback" not in err and "Traceback" not in result.stdout
    lines = shown_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for s in expected:
        assert s in lines[0], (s, lines[0])
    return lines[0]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_quantize_bad_input(case, tmp_path, request):
    build, expected = BAD_INPUTS[case]
    model, recipe = build(tmp_path, request)
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / "out"
    result = invoke("quantize", "--model", model, "--recipe", recipe, "--out", out)
    _assert_one_error_line(result, expected)
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == before  # no temp folder either


def test_quantize_refuses_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = invoke("quantize", "--model", "default", "--recipe", "w8a8", "--out", out)
    _assert_one_error_line(result, [str(out), "already exists", "--force"])
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("command", ["eval", "info"])
def test_eval_and_info_bad_model(command, tmp_path):
    bad = _corrupt_gguf(tmp_path)
    args = ["eval", "--model", bad, "--seq", "16", "--windows", "1"] if command == "eval" else ["info", bad]
    _assert_one_error_line(invoke(*args), ["not a readable GGUF"])
    _assert_one_error_line(invoke(*(a if a != bad else tmp_path / "missing.gguf" for a in args)), ["not found"])
