"""Lesion-level results: one prediction per lesion, the mean of the probabilities of its images.

A clinician judges a lesion from all of its images together; HAM10000 has up to six per lesion. The
lesion's label is its images' label (the most frequent one, should they ever disagree; ties: the lower
class index, as core/data/splits.py does). A dataset without lesion ids (every image its own group) has no
lesion level: it would repeat the image level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LesionPredictions:
    lesion_ids: np.ndarray    # str [L], sorted
    labels: np.ndarray        # int64 [L]
    probs: np.ndarray         # float [L, C], mean over the lesion's images
    n_images: np.ndarray      # int64 [L]


def has_lesion_ids(groups: np.ndarray, image_ids: np.ndarray) -> bool:
    """Whether any lesion holds more than one image (else the lesion level equals the image level)."""
    return len(np.unique(np.asarray(groups, dtype=str))) < len(np.asarray(image_ids))


def by_lesion(groups: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> LesionPredictions:
    """Average each lesion's image probabilities; its label is the majority label of its images."""
    names, lesion_of = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n_images = np.bincount(lesion_of, minlength=len(names))
    sums = np.zeros((len(names), probs.shape[1]))
    np.add.at(sums, lesion_of, probs)
    votes = np.zeros((len(names), probs.shape[1]), dtype=np.int64)
    np.add.at(votes, (lesion_of, np.asarray(labels, dtype=np.int64)), 1)
    return LesionPredictions(lesion_ids=names, labels=votes.argmax(1), probs=sums / n_images[:, None],
                             n_images=n_images)
