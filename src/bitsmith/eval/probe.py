"""A linear probe: the task metric for backbones and encoders, whatever the task.

A multinomial logistic regression is fitted ONCE on the float model's features of the probe-train
half, then scored on each model's (float, quantized) features of the probe-test half. The classifier
stays fixed, so any accuracy drift is the quantized features' fault, not the probe's. Fitting is
full-batch L-BFGS in float64 from a zero start on a strictly convex loss, so a fit is deterministic
and does not depend on the seed; the seed only picks the cross-validation folds that choose the L2
strength when none is given.

Fitted probes are cached as safetensors under ``cache_dir()/"probes"`` by a key of model id, task
and seed; the file records a digest of the training features and is refitted when they change.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bitsmith.errors import BitsmithError

L2_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
"""L2 strengths tried by cross-validation (on standardised features; sentence probes pick 0.1 to 10)."""
_FOLDS = 4


@dataclass(frozen=True)
class Probe:
    """A fitted linear classifier over standardised features: ``((x - mean) / std) @ weight.T + bias``."""

    weight: torch.Tensor  # (classes, features), float64
    bias: torch.Tensor  # (classes,)
    mean: torch.Tensor  # (features,) train-feature mean
    std: torch.Tensor  # (features,) train-feature std (1 where a feature is constant)
    l2: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.to(torch.float64) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).argmax(1)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of rows whose predicted class is the label."""
        _check_xy(features, labels, self.weight.shape[1])
        return (self.predict(features) == labels).double().mean().item()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias, "mean": self.mean, "std": self.std}


def _check_xy(features: torch.Tensor, labels: torch.Tensor, dim: int | None = None) -> None:
    if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0] or not len(labels):
        raise BitsmithError(f"probe needs features (n, d) and labels (n,), n >= 1; got {tuple(features.shape)} and {tuple(labels.shape)}")
    if dim is not None and features.shape[1] != dim:
        raise BitsmithError(f"probe was fitted on {dim} features, got {features.shape[1]}")


def _standardiser(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return mean, torch.where(std > 1e-12, std, torch.ones_like(std))


def _lbfgs(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + l2/2 * ||W||^2 (bias unpenalised) over standardised ``x``."""
    w = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = probe_loss(x, y, w, b, l2)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def probe_loss(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, l2: float) -> torch.Tensor:
    """The probe's objective on standardised features: mean cross-entropy plus ``l2/2 * ||w||^2``."""
    return torch.nn.functional.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * w.pow(2).sum()


def _fit_fixed(features: torch.Tensor, labels: torch.Tensor, classes: int, l2: float, max_iter: int) -> Probe:
    x = features.to(torch.float64)
    mean, std = _standardiser(x)
    w, b = _lbfgs((x - mean) / std, labels, classes, l2, max_iter)
    return Probe(w, b, mean, std, l2)


def _choose_l2(features: torch.Tensor, labels: torch.Tensor, classes: int, seed: int, max_iter: int) -> float:
    """The grid value with the best k-fold accuracy (ties go to the stronger penalty)."""
    n = len(labels)
    folds = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % min(_FOLDS, n)
    best, best_acc = L2_GRID[-1], -1.0
    for l2 in reversed(L2_GRID):
        correct = 0
        for k in range(int(folds.max()) + 1):
            tr, te = folds != k, folds == k
            probe = _fit_fixed(features[tr], labels[tr], classes, l2, max_iter)
            correct += int((probe.predict(features[te]) == labels[te]).sum())
        if correct / n > best_acc:
            best, best_acc = l2, correct / n
    return best


def fit_probe(features: torch.Tensor, labels: torch.Tensor, seed: int = 0, l2: float | None = None,
              max_iter: int = 500) -> Probe:
    """Fit a multinomial logistic regression probe (standardised features, L2 penalty, full-batch L-BFGS).

    ``l2=None`` picks the penalty from :data:`L2_GRID` by 4-fold cross-validation on the training
    rows (folds drawn from ``seed``); the final probe is then fitted on all of them.
    """
    _check_xy(features, labels)
    labels = labels.long()
    if labels.min() < 0:
        raise BitsmithError("probe labels must be class indices >= 0")
    classes = max(int(labels.max()) + 1, 2)
    if l2 is None:
        l2 = _choose_l2(features, labels, classes, seed, max_iter)
    return _fit_fixed(features, labels, classes, float(l2), max_iter)


def pair_features(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Features of a sentence pair from its two embeddings: ``[u, v, |u - v|, u * v]`` (SentEval/InferSent)."""
    if u.shape != v.shape:
        raise BitsmithError(f"pair embeddings differ in shape: {tuple(u.shape)} and {tuple(v.shape)}")
    return torch.cat([u, v, (u - v).abs(), u * v], dim=1)


def item_features(embed: Callable[[list[str]], torch.Tensor], items: Sequence[str | tuple[str, str]]) -> torch.Tensor:
    """Probe features of ``items`` with any sentence encoder ``embed``: the embedding for single
    sentences, :func:`pair_features` for pairs (both sides embedded in one call)."""
    if all(isinstance(it, str) for it in items):
        return embed(list(items))
    if not all(isinstance(it, tuple) and len(it) == 2 for it in items):
        raise BitsmithError("items must be all sentences or all (sentence1, sentence2) pairs")
    both = embed([it[0] for it in items] + [it[1] for it in items])
    return pair_features(both[: len(items)], both[len(items) :])


def cosine_to_reference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the cosine similarity between ``a`` and the reference ``b`` (same shape)."""
    if a.shape != b.shape or a.ndim != 2:
        raise BitsmithError(f"cosine_to_reference needs two (n, d) tensors of one shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).mean().item()


def probe_key(model_id: str, task: str, seed: int) -> str:
    """A file-safe cache key: a readable prefix plus a digest of ``(model_id, task, seed)``."""
    digest = hashlib.sha256(f"{model_id}|{task}|{seed}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model_id).name or "model")[:40]
    return f"{stem}-{task}-s{seed}-{digest}"


def _digest(features: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(str(tuple(features.shape)).encode())
    h.update(features.detach().to(torch.float32).contiguous().numpy().tobytes())
    h.update(labels.detach().long().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _probe_file(key: str) -> Path:
    from bitsmith.models.load import cache_dir

    return cache_dir() / "probes" / f"{key}.safetensors"


def _load_cached(path: Path, digest: str) -> Probe | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("features_digest") != digest:
                return None
            t = {k: f.get_tensor(k) for k in ("weight", "bias", "mean", "std")}
        return Probe(t["weight"], t["bias"], t["mean"], t["std"], float(meta["l2"]))
    except (SafetensorError, OSError, KeyError, ValueError):
        return None  # unreadable or stale: refit


def _save(path: Path, probe: Probe, digest: str, seed: int) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    meta = {"features_digest": digest, "l2": repr(probe.l2), "seed": str(seed)}
    save_file({k: v.contiguous() for k, v in probe.tensors().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def cached_probe(key: str, features: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> Probe:
    """:func:`fit_probe` through the on-disk cache: reuse the probe saved under ``key`` if it was
    fitted on these very features and labels, otherwise fit and save it."""
    _check_xy(features, labels)
    path, digest = _probe_file(key), _digest(features, labels)
    if path.is_file() and (probe := _load_cached(path, digest)) is not None:
        return probe
    probe = fit_probe(features, labels, seed)
    _save(path, probe, digest, seed)
    return probe


def probe_accuracy_report(float_train_feats: torch.Tensor, train_labels: torch.Tensor,
                          test_feats_by_model: dict[str, torch.Tensor], test_labels: torch.Tensor,
                          seed: int = 0, cache_key: str | None = None) -> dict[str, float]:
    """Accuracy of ONE probe, fitted on the float model's train features, on each model's test features.

    Pass ``cache_key`` (see :func:`probe_key`) to reuse the fitted probe across evaluations.
    """
    if cache_key is None:
        probe = fit_probe(float_train_feats, train_labels, seed)
    else:
        probe = cached_probe(cache_key, float_train_feats, train_labels, seed)
    return {name: probe.accuracy(feats, test_labels) for name, feats in test_feats_by_model.items()}
