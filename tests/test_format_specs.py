"""Quantization specs for the number formats beyond integers: grammar, defaults, validation, round trips."""

from __future__ import annotations

import pytest

from bitsmith.errors import SpecError
from bitsmith.spec import ACTIVATION_GRANULARITIES, KV_GRANULARITIES, WEIGHT_GRANULARITIES, QuantSpec


@pytest.mark.parametrize(
    "text, expected, printed",
    [
        ("fp8:e4m3:tensor", dict(format="fp", bits=8, element="e4m3", granularity="tensor"), "fp8:e4m3:tensor"),
        ("fp8:channel", dict(format="fp", bits=8, element="e4m3"), "fp8:e4m3:channel"),
        ("fp8:e5m2:token", dict(format="fp", bits=8, element="e5m2", granularity="token"), "fp8:e5m2:token"),
        ("fp6:e3m2:channel", dict(format="fp", bits=6, element="e3m2"), "fp6:e3m2:channel"),
        ("fp6:e2m3:g64", dict(format="fp", bits=6, element="e2m3", granularity="group", group_size=64), "fp6:e2m3:g64"),
        ("fp4:e2m1:g32:mse", dict(format="fp", bits=4, element="e2m1", granularity="group", group_size=32, clip="mse"),
         "fp4:e2m1:g32:mse"),
        ("fp3:g64", dict(format="fp", bits=3, element="e2m0", granularity="group", group_size=64), "fp3:e2m0:g64"),
        ("fp5:e2m2:head:r0.9", dict(format="fp", bits=5, element="e2m2", granularity="head", clip_ratio=0.9),
         "fp5:e2m2:head:r0.9"),
        ("nf4:g64", dict(format="nf", bits=4, granularity="group", group_size=64), "nf4:g64"),
        ("mxfp4", dict(format="mxfp", bits=4, element="e2m1", granularity="group", group_size=32), "mxfp4:e2m1:g32"),
        ("mxfp6:e3m2", dict(format="mxfp", bits=6, element="e3m2", granularity="group", group_size=32), "mxfp6:e3m2:g32"),
        ("mxfp6:e2m3:g32", dict(format="mxfp", bits=6, element="e2m3", granularity="group", group_size=32), "mxfp6:e2m3:g32"),
        ("MXFP8:E4M3", dict(format="mxfp", bits=8, element="e4m3", granularity="group", group_size=32), "mxfp8:e4m3:g32"),
        ("mxint8", dict(format="mxint", bits=8, granularity="group", group_size=32), "mxint8:g32"),
        ("bitmod4:g128", dict(format="bitmod", bits=4, granularity="group", group_size=128), "bitmod4:g128"),
        ("bitmod3:g64:mse", dict(format="bitmod", bits=3, granularity="group", group_size=64, clip="mse"), "bitmod3:g64:mse"),
        ("olive4:g128", dict(format="olive", bits=4, granularity="group", group_size=128, clip="mse"), "olive4:g128"),
        ("olive4:token:minmax", dict(format="olive", bits=4, granularity="token", clip="minmax"), "olive4:token:minmax"),
    ],
)
def test_parse_defaults_and_round_trips(text, expected, printed):
    spec = QuantSpec.parse(text)
    assert spec == QuantSpec(**expected)
    assert str(spec) == printed
    assert QuantSpec.parse(str(spec)) == spec
    d = spec.to_dict()
    assert QuantSpec.from_dict(d) == spec
    assert d["element"] == expected.get("element")
    assert spec.symmetric is True  # every non-integer format is sign-magnitude / symmetric


def test_integer_specs_are_unchanged():
    """The integer grammar, defaults and printed forms are exactly what they were."""
    spec = QuantSpec.parse("int4:g64:asym:mse")
    assert (spec.format, spec.granularity, spec.clip, spec.element) == ("int", "group", "mse", None)
    assert str(spec) == "int4:g64:asym:mse"
    assert str(QuantSpec(bits=8)) == "int8:channel:sym"
    # old checkpoints' dicts have no 'element' key
    old = {"format": "int", "bits": 4, "granularity": "group", "group_size": 64, "symmetric": True,
           "clip": "minmax", "clip_ratio": 1.0}
    assert QuantSpec.from_dict(old) == QuantSpec.parse("int4:g64")


def test_dict_form():
    spec = QuantSpec.coerce({"format": "fp", "bits": 8, "element": "e5m2", "granularity": "token"})
    assert spec == QuantSpec.parse("fp8:e5m2:token")
    assert QuantSpec.coerce({"format": "mxfp", "bits": 4}) == QuantSpec.parse("mxfp4")


@pytest.mark.parametrize(
    "bad, field",
    [
        ("fp5:e4m3", "element"),  # widths disagree
        ("fp5:g32", "element"),  # fp5 has no default split
        ("fp8:e9m9", "element"),
        ("int4:e2m1", "element"),
        ("nf4:e2m1", "element"),
        ("fp9", "bits"),
        ("fp2", "bits"),
        ("nf3:g64", "bits"),
        ("mxfp5", "bits"),
        ("mxint4", "bits"),
        ("bitmod2:g64", "bits"),
        ("olive8", "bits"),
        ("mxfp4:g64", "group_size"),
        ("mxfp4:token", "granularity"),
        ("mxfp4:channel", "granularity"),
        ("mxfp4:mse", "clip"),
        ("mxfp8:r0.9", "clip_ratio"),
        ("fp8:e4m3:asym", "symmetric"),
        ("nf4:g64:asym", "symmetric"),
        ("bitmod4:g64:asym", "symmetric"),
        ("olive4:asym", "symmetric"),
        ("bitmod4:token", "granularity"),
        ("olive4:g63", "group_size"),
        ("fp4:g0", "group_size"),
        ("mx4", "format"),
        ("fp8:e4m3x", "unknown part"),
    ],
)
def test_invalid_specs_fail_at_parse_time_naming_the_field(bad, field):
    with pytest.raises(SpecError, match=field) as info:
        QuantSpec.parse(bad)
    assert "\n" not in str(info.value)


def test_error_messages_say_the_fix():
    cases = {
        "fp5:e4m3": "e4m0, e3m1, e2m2, e1m3",
        "fp5:g32": "fp5:e2m2",
        "mxfp4:g64": "use g32",
        "fp8:asym": "drop 'asym'",
        "mxfp4:mse": "drop 'mse'",
        "mxfp4:token": "drop 'token'",
        "nf3": "use one of 4",
    }
    for bad, fix in cases.items():
        with pytest.raises(SpecError, match=fix):
            QuantSpec.parse(bad)


def test_roles():
    # MX blocks run along the last dimension, so one spec serves weights, activations and KV
    mx = QuantSpec.parse("mxfp4")
    for allowed, role in ((WEIGHT_GRANULARITIES, "weights"), (ACTIVATION_GRANULARITIES, "activations"),
                          (KV_GRANULARITIES, "the KV cache")):
        assert mx.require(allowed, role) is mx
    assert QuantSpec.parse("fp8:e4m3:token").require(ACTIVATION_GRANULARITIES, "activations")
    assert QuantSpec.parse("olive4:token").require(ACTIVATION_GRANULARITIES, "activations")
    with pytest.raises(SpecError, match="activations"):
        QuantSpec.parse("fp8:e4m3:channel").require(ACTIVATION_GRANULARITIES, "activations")
    with pytest.raises(SpecError, match="weights"):
        QuantSpec.parse("fp8:e4m3:token").require(WEIGHT_GRANULARITIES, "weights")


def test_step_arguments_validate_new_formats():
    from bitsmith.algorithms.activations import ActQuant
    from bitsmith.algorithms.gptq import GPTQ
    from bitsmith.algorithms.kv_cache import KVQuant
    from bitsmith.algorithms.rtn import RTN

    assert RTN(weights="bitmod3:g64").spec.format == "bitmod"
    assert ActQuant(spec="mxfp4").qspec.group_size == 32
    assert KVQuant(key="fp8:e4m3:head", value="mxfp4").quantizer.value.format == "mxfp"
    assert GPTQ(weights="fp4:g32").spec.element == "e2m1"
    assert GPTQ(weights="bitmod3:g64").spec.bits == 3
    with pytest.raises(SpecError, match="olive.*rtn"):
        GPTQ(weights="olive4:g64")
    with pytest.raises(SpecError, match="min-max"):
        KVQuant(key="olive4:head")  # OliVe's scale search is not idempotent on re-quantized cache entries
    with pytest.raises(SpecError, match="activations"):
        ActQuant(spec="bitmod4:g64")
