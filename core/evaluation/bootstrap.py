"""95% confidence intervals by a seeded bootstrap over lesions, vectorised over the resamples.

Images of one lesion are not independent (HAM10000 holds up to six of the same lesion), so each
resample draws lesions with replacement, as many as there are, and keeps all images of every drawn
lesion (a cluster bootstrap); a dataset without lesion ids resamples images. scipy.stats.bootstrap
cannot resample groups, so the draws are made here: resample b gives each image the weight "times its
lesion was drawn", and every metric is then a weighted one, computed for all resamples at once with
matrix products (1,000 resamples of a few thousand images take well under a second). Intervals are
percentile intervals (2.5th and 97.5th percentiles of the resampled metric).

    boot = LesionBootstrap.draw(groups, n_resamples=1000, seed=0)
    samples = boot.metrics(labels, probs)          # balanced_accuracy, accuracy, auc [B], recall [B, C]
    boot.interval(samples["balanced_accuracy"])    # (low, high)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 1000
LEVEL = 0.95


@dataclass(frozen=True)
class LesionBootstrap:
    """The resamples of one evaluated set: ``weights[b, i]`` = how often image i's lesion was drawn in resample b."""

    weights: np.ndarray     # float64 [B, N]
    n_lesions: int
    seed: int

    @classmethod
    def draw(cls, groups: np.ndarray, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> "LesionBootstrap":
        """Resample the lesions named by ``groups`` (one id per image) with replacement, seeded."""
        names, lesion_of = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
        n = len(names)
        # Drawing n lesions uniformly with replacement = a multinomial count per lesion.
        draws = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_resamples)
        return cls(weights=draws[:, lesion_of].astype(np.float64), n_lesions=n, seed=seed)

    @property
    def n_resamples(self) -> int:
        return int(self.weights.shape[0])

    def rate(self, hits: np.ndarray, among: np.ndarray) -> np.ndarray:
        """Per resample, the weighted share of ``among`` images that are ``hits`` (NaN where none is among) [B]."""
        among = np.asarray(among, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.weights @ (among * np.asarray(hits, dtype=np.float64))) / (self.weights @ among)

    def auc(self, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
        """Per resample, the weighted ROC AUC of ``score`` for ``positive`` (ties count half; NaN without both) [B]."""
        return weighted_auc(positive, score, self.weights)

    def metrics(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
        """balanced_accuracy, accuracy and macro auc [B] and every class's recall [B, C], per resample.

        As in core/evaluation/metrics.py: balanced accuracy and macro AUC average the classes present (in the resample).
        """
        labels = np.asarray(labels, dtype=np.int64)
        onehot = np.eye(probs.shape[1])[labels]
        correct = (probs.argmax(1) == labels).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = (self.weights @ (onehot * correct[:, None])) / (self.weights @ onehot)
        aucs = np.stack([self.auc(labels == c, probs[:, c]) for c in range(probs.shape[1])], axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample in which no class has an AUC
            macro_auc = np.nanmean(aucs, axis=1)
        return {"balanced_accuracy": np.nanmean(recall, axis=1), "accuracy": self.rate(correct, np.ones_like(correct)),
                "auc": macro_auc, "recall": recall}

    @staticmethod
    def interval(samples: np.ndarray, level: float = LEVEL) -> list[float] | None:
        """The percentile interval of one metric's resampled values; None when no resample defines it."""
        samples = np.asarray(samples, dtype=np.float64)
        samples = samples[~np.isnan(samples)]
        if samples.size == 0:
            return None
        tail = 100 * (1 - level) / 2
        low, high = np.percentile(samples, [tail, 100 - tail])
        return [float(low), float(high)]


def weighted_auc(positive: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC for each row of image weights [B, N] (sklearn's ``roc_auc_score(..., sample_weight=row)``).

    AUC = P(score of a positive > score of a negative) + half the ties: images are sorted by score once, the
    weights summed per run of equal scores, and each positive run counts the negative weight below it.
    """
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(score, kind="stable")
    sorted_score = np.asarray(score)[order]
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
    w = np.atleast_2d(weights)[:, order]
    pos = np.add.reduceat(w * positive[order], starts, axis=1)
    neg = np.add.reduceat(w * ~positive[order], starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))
