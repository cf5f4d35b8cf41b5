"""Seeded train/val/test assignment, stratified by class and grouped by lesion.

No lesion has images in two splits (an image without a lesion id is its own group), and each class is
divided on its own, so every split keeps the class mix of the whole. sklearn's StratifiedGroupKFold
only makes folds of equal size; here the fractions are free (say 70/15/15), so the assignment is a
short greedy pass instead:

1. every lesion gets one class, the most frequent label among its images (ties: the lower index);
2. per class, the lesions are shuffled with the seed; while the class has enough lesions, the first
   ones go one each to train, val and test (so a class with 3+ lesions appears in every split);
3. each further lesion goes to the split furthest below its target share of the class's images.

Same labels, groups and seed give the same assignment, whatever the row order.
"""

from __future__ import annotations

import numpy as np

from core.errors import UserError

SPLITS = ("train", "val", "test")


def assign_splits(labels: np.ndarray, groups: np.ndarray, *, val_fraction: float, test_fraction: float,
                  seed: int) -> np.ndarray:
    """Split name ("train" | "val" | "test") per image; fractions are shares of the images."""
    check_fractions(val_fraction, test_fraction, allow_zero_val=True)
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray(groups, dtype=str)
    names, group_of = np.unique(groups, return_inverse=True)  # sorted: independent of row order
    sizes = np.bincount(group_of, minlength=len(names))
    n_classes = int(labels.max()) + 1 if labels.size else 0
    votes = np.zeros((len(names), n_classes), dtype=np.int64)
    np.add.at(votes, (group_of, labels), 1)
    group_class = votes.argmax(axis=1)

    fractions = np.array([1.0 - val_fraction - test_fraction, val_fraction, test_fraction])
    wanted = [s for s in range(3) if fractions[s] > 0]  # splits that get one lesion first
    rng = np.random.default_rng(seed)
    group_split = np.zeros(len(names), dtype=np.int64)
    for cls in range(n_classes):
        members = rng.permutation(np.flatnonzero(group_class == cls))
        target = fractions * sizes[members].sum()
        filled = np.zeros(3)
        for position, group in enumerate(members):
            if position < len(wanted):
                split = wanted[position]
            else:
                split = int(np.argmax(np.where(fractions > 0, target - filled, -np.inf)))
            group_split[group] = split
            filled[split] += sizes[group]
    return np.array(SPLITS)[group_split[group_of]]


def check_fractions(val_fraction: float, test_fraction: float, allow_zero_val: bool = False) -> None:
    low = 0 <= val_fraction if allow_zero_val else 0 < val_fraction
    if not (low and val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"split fractions val={val_fraction}, test={test_fraction}: need 0 < val < 1, "
                        f"0 <= test < 1 and val + test < 1")
