"""Long checks on the real default model (run with -m slow; .ci/run runs them when time allows)."""

import pytest

import bitsmith

pytestmark = pytest.mark.slow


def test_baseline_recipes_order_on_default_model():
    rows = {r["recipe"]: r for r in bitsmith.compare("default", ["w8a8", "w4a16-g64", "w4a4kv4"], seq=256, windows=4, progress=False)}
    f = rows["float"]["ppl"]
    assert rows["w8a8"]["ppl"] < 1.02 * f and rows["w8a8"]["kl"] < 0.05
    assert 1.2 * f < rows["w4a16-g64"]["ppl"] < 2.5 * f
    assert rows["w4a4kv4"]["ppl"] > 10 * f  # the baseline the rotation methods must beat
    assert rows["w8a8"]["kl"] < rows["w4a16-g64"]["kl"] < rows["w4a4kv4"]["kl"]
    assert 4.0 < rows["w4a16-g64"]["bpw"] < 4.5 and 8.0 <= rows["w8a8"]["bpw"] < 8.2


def test_zero_shot_on_default_model_beats_chance():
    report = bitsmith.evaluate("default", seq=128, windows=1, tasks=["arc_easy", "piqa", "lambada"], limit=60, progress=False)
    t = report["tasks"]
    assert t["piqa"]["acc_norm"] > 0.55  # chance is 0.5
    assert t["arc_easy"]["acc_norm"] > 0.35  # chance is about 0.25
    assert t["lambada"]["acc"] > 0.1


def test_gptq_beats_rtn_on_default_model():
    """GPTQ (small calibration set to keep CI time down) against RTN on the same 3-bit grid."""
    spec = "int3:g64:asym:mse"
    calib = {"samples": 16, "seq": 256}
    rows = {}
    for name, step in [("rtn", {"rtn": {"weights": spec}}), ("gptq", {"gptq": {"weights": spec}})]:
        lm = bitsmith.quantize("default", {"name": name, "calibration": calib, "steps": [step]}, progress=False)
        rows[name] = bitsmith.evaluate(lm, seq=256, windows=4, progress=False)
    assert rows["gptq"]["ppl"] < 0.8 * rows["rtn"]["ppl"]
    assert rows["gptq"]["kl"] < 0.7 * rows["rtn"]["kl"]
    assert rows["gptq"]["bpw"] == rows["rtn"]["bpw"]
