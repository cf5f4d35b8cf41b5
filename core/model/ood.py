"""Is an image like the training images? Out-of-distribution scores of a model, fitted on the validation split.

A library, not a command. core.final_train fits the statistics on the validation split (never on training or
test images) and stores them in model.pt under ``ood``; core.evaluate ``--fit-ood`` fits them for an older
model file; core.predict, the server and the evaluation read them back (:func:`check`).

Three scores, each "higher = less like the training images":

- ``mahalanobis`` (Lee et al., NeurIPS 2018), the one that decides: the smallest Mahalanobis distance of the
  image's penultimate features (the classifier layer's input: the pooled backbone features, fused with the
  clinical-field MLP for a model with clinical fields) to a class mean, with one covariance shared by the classes,
  estimated with scikit-learn's Ledoit-Wolf shrinkage (a 512-d covariance from ~1,000 validation images needs it);
- ``max_softmax`` (Hendrycks and Gimpel, ICLR 2017): minus the top softmax probability of the raw logits;
- ``energy`` (Liu et al., NeurIPS 2020): minus the log-sum-exp of the logits.

Each score's threshold is the one at which ``PASS_RATE`` (95%) of the validation images pass (Mahalanobis:
scored out of fold, each image by statistics fitted on the other folds, so that new images pass at that rate
too). The features
come from the forward pass that already runs: :func:`capture` hooks the classifier layer for the duration of a
prediction (no second pass; ``model(x)`` still returns logits, so ONNX export and the rest are untouched).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from core.model.networks import HEADS, FusionNet, arch_of
from core.model.ensemble import EnsembleNet

if TYPE_CHECKING:
    import numpy.typing as npt

SCORES = ("mahalanobis", "max_softmax", "energy")
DECIDING = "mahalanobis"          # the score whose threshold decides "in_distribution"
PASS_RATE = 0.95                  # share of validation images that pass each stored threshold
NO_CHECK = "no out-of-distribution check in this model file"
FIT_ADVICE = ("core.final_train fits it on the validation split; for an older model file, "
              "core.evaluate --fit-ood writes a copy with it")


@dataclass
class Captured:
    """What :func:`capture` saw: each forward call's classifier input (features) and output (logits)."""

    views: int = 1                                      # TTA runs 8 views per image, view-major: keep the first
    _features: list = field(default_factory=list)
    _logits: list = field(default_factory=list)

    def add(self, features: torch.Tensor, logits: torch.Tensor) -> None:
        keep = len(features) // self.views   # view 0 of core/model/tta.py's dihedral_views is the image itself
        self._features.append(features[:keep].detach().float().cpu())
        self._logits.append(logits[:keep].detach().float().cpu())

    @property
    def features(self) -> np.ndarray:
        return torch.cat(self._features).numpy().astype(np.float64) if self._features else np.zeros((0, 0))

    @property
    def logits(self) -> np.ndarray:
        return torch.cat(self._logits).numpy().astype(np.float64) if self._logits else np.zeros((0, 0))


def classifier_layer(model: nn.Module) -> nn.Module:
    """The model's last linear layer: its input is the penultimate features, its output the logits (an ensemble:
    its first member's, the run the greedy selection started from)."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, EnsembleNet):   # an ensemble's check reads its first member (the sweep's best run)
        return classifier_layer(model.members[0])
    if isinstance(model, FusionNet):
        return model.head
    layer = model
    for step in HEADS[arch_of(model)]:
        layer = layer[step] if isinstance(step, int) else getattr(layer, step)
    return layer


@contextmanager
def capture(model: nn.Module, views: int = 1, into: Captured | None = None) -> Iterator[Captured]:
    """Record the classifier layer's input and output of every forward pass inside the block (``views``: 8
    under TTA, where only each image's own view is kept), into ``into`` (None: a new :class:`Captured`)."""
    seen = Captured(views=views) if into is None else into
    handle = classifier_layer(model).register_forward_hook(lambda _m, inputs, output: seen.add(inputs[0], output))
    try:
        yield seen
    finally:
        handle.remove()


def logit_scores(logits: np.ndarray) -> dict[str, np.ndarray]:
    """max_softmax and energy of raw logits [N, C] (higher = less like the training images)."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(1, keepdims=True)
    log_sum = top[:, 0] + np.log(np.exp(logits - top).sum(1))
    return {"max_softmax": -np.exp(top[:, 0] - log_sum), "energy": -log_sum}


def mahalanobis(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """The smallest squared Mahalanobis distance of each row of ``features`` [N, D] to a class mean [K, D]."""
    features, means = np.asarray(features, dtype=np.float64), np.asarray(means, dtype=np.float64)
    # (f - m) P (f - m) = f P f - 2 f P m + m P m: two matrix products for every class at once
    projected = features @ precision
    own = np.sum(projected * features, axis=1, keepdims=True)
    cross = projected @ means.T
    centre = np.sum((means @ precision) * means, axis=1)
    return np.maximum(own - 2 * cross + centre, 0).min(axis=1)


def all_scores(stored: Mapping[str, Any], features: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
    """Every score of images given their features and logits, with the statistics of a fitted ``stored``."""
    means, precision = _as_array(stored["means"]), _as_array(stored["precision"])
    return {"mahalanobis": mahalanobis(features, means, precision), **logit_scores(logits)}


def fit(features: np.ndarray, logits: np.ndarray, labels: np.ndarray, class_names: list[str] | tuple[str, ...],
        pass_rate: float = PASS_RATE) -> dict[str, Any]:
    """model.pt's ``ood``, fitted on validation images' features [N, D], raw logits [N, C] and labels [N]."""
    features, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
    present, means, precision = _gaussian(features, labels)
    stored: dict[str, Any] = {
        "method": DECIDING, "fitted_on": "val", "n_images": int(len(labels)), "pass_rate": float(pass_rate),
        "classes": [class_names[int(c)] for c in present], "feature_dim": int(features.shape[1]),
        "means": torch.from_numpy(means.astype(np.float32)),
        "precision": torch.from_numpy(precision.astype(np.float32)), "threshold_from": f"{FOLDS}-fold out-of-fold"}
    scores = {**logit_scores(logits), "mahalanobis": _out_of_fold(features, labels)}
    stored["thresholds"] = {name: float(np.quantile(scores[name], pass_rate)) for name in SCORES}
    return stored


FOLDS = 5   # the Mahalanobis threshold: each image scored by statistics fitted without it


def _gaussian(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The classes present, their means [K, D] and the Ledoit-Wolf precision [D, D] of the class-centred features."""
    from sklearn.covariance import LedoitWolf

    present = np.unique(labels)   # a class the split lacks has no mean: its images then count by the others
    means = np.stack([features[labels == c].mean(0) for c in present])
    centred = features - means[np.searchsorted(present, labels)]
    return present, means, LedoitWolf(assume_centered=True).fit(centred).precision_


def _out_of_fold(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each image's Mahalanobis score under statistics fitted on the other folds: scored in-sample, its own
    images sit closer to the means than new ones do, and a threshold from them would flag far more than 5% of
    new in-distribution images (a 512-d fit on a thousand images over-fits)."""
    folds = np.random.default_rng(0).permutation(len(labels)) % FOLDS
    scores = np.empty(len(labels))
    for k in range(FOLDS):
        held = folds == k
        if held.all() or not held.any():
            continue
        _, means, precision = _gaussian(features[~held], labels[~held])
        scores[held] = mahalanobis(features[held], means, precision)
    return scores


def is_fitted(stored: Mapping[str, Any] | None) -> bool:
    return isinstance(stored, Mapping) and "means" in stored and "thresholds" in stored


def check(stored: Mapping[str, Any] | None, features: np.ndarray, logits: np.ndarray) -> list[dict[str, Any]]:
    """Each image's ``{"score", "threshold", "in_distribution", "method"}`` by the deciding score; without
    fitted statistics ``{"score": None, ..., "in_distribution": None, "note": NO_CHECK}``."""
    if not is_fitted(stored):
        return [{"score": None, "threshold": None, "in_distribution": None, "method": None,
                 "note": f"{NO_CHECK} ({FIT_ADVICE})"} for _ in range(len(logits))]
    method = stored.get("method", DECIDING)
    threshold = float(stored["thresholds"][method])
    values = all_scores(stored, features, logits)[method]
    return [{"score": float(v), "threshold": threshold, "in_distribution": bool(v <= threshold), "method": method}
            for v in values]


def _as_array(value: torch.Tensor | npt.ArrayLike) -> np.ndarray:
    return value.numpy().astype(np.float64) if isinstance(value, torch.Tensor) else np.asarray(value, np.float64)
