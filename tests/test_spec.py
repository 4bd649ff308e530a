import pytest

from bitsmith.errors import SpecError
from bitsmith.spec import QuantSpec


@pytest.mark.parametrize(
    "text, expected",
    [
        ("int4:g64:sym", QuantSpec(bits=4, granularity="group", group_size=64, symmetric=True)),
        ("int8", QuantSpec(bits=8)),
        ("int8:token:asym", QuantSpec(bits=8, granularity="token", symmetric=False)),
        ("int3:channel:mse", QuantSpec(bits=3, clip="mse")),
        ("int4:head:g32:asym", QuantSpec(bits=4, granularity="head", group_size=32, symmetric=False)),
        ("INT2:tensor:r0.9", QuantSpec(bits=2, granularity="tensor", clip_ratio=0.9)),
    ],
)
def test_parse_string_form(text, expected):
    spec = QuantSpec.parse(text)
    assert spec == expected
    assert QuantSpec.parse(str(spec)) == spec  # the printed form parses back
    assert QuantSpec.from_dict(spec.to_dict()) == spec


def test_dict_form_and_coerce():
    d = {"bits": 4, "granularity": "group", "group_size": 128, "symmetric": False, "clip": "mse"}
    spec = QuantSpec.coerce(d)
    assert spec == QuantSpec.parse("int4:g128:asym:mse")
    assert QuantSpec.coerce(spec) is spec


@pytest.mark.parametrize(
    "bad, field",
    [
        ("int9:g64", "bits"),
        ("int1", "bits"),
        ("float4:g32", "format"),  # fp4:g32 is a valid minifloat spec now (tests/test_format_specs.py)
        ("int4:g0", "group_size"),
        ("int4:group", "group_size"),
        ("int4:channel:g64", "group_size"),
        ("int4:r1.5", "clip_ratio"),
        ("int4:banana", "banana"),
        ("four", "first part"),
        ("", "expected a string"),
    ],
)
def test_invalid_string_names_the_field(bad, field):
    with pytest.raises(SpecError, match=field):
        QuantSpec.parse(bad)


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"bits": "4"}, "bits"),
        ({"bits": True}, "bits"),
        ({"bits": 4, "granularity": "row"}, "granularity"),
        ({"bits": 4, "symmetric": "yes"}, "symmetric"),
        ({"bits": 4, "clip": "percentile"}, "clip"),
        ({"bits": 4, "groupsize": 64}, "groupsize"),
    ],
)
def test_invalid_dict_names_the_field(bad, field):
    with pytest.raises(SpecError, match=field):
        QuantSpec.from_dict(bad)


def test_role_check():
    with pytest.raises(SpecError, match="activations"):
        QuantSpec.parse("int8:g64").require(("tensor", "token"), "activations")
    assert QuantSpec.parse("int8:token").require(("tensor", "token"), "activations").granularity == "token"
