"""Per-class loss weights against class imbalance.

All methods are normalised so that the weights average 1 over the classes (as in Cui et al. 2019,
"Class-Balanced Loss Based on Effective Number of Samples"), which keeps the loss scale, and so
the learning rate, comparable across methods.
"""

from __future__ import annotations

import numpy as np


def class_weights(counts: np.ndarray, method: str, beta: float = 0.999) -> np.ndarray | None:
    """Weights per class from the training counts; ``None`` for ``method='none'``.

    - ``inverse``: proportional to 1 / n_c
    - ``sqrt_inverse``: proportional to 1 / sqrt(n_c)
    - ``effective``: proportional to (1 - beta) / (1 - beta ** n_c)
    A class absent from training (n_c = 0) gets weight 0: it contributes no loss terms anyway.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if method == "none":
        return None
    present = counts > 0
    raw = np.zeros_like(counts)
    if method == "inverse":
        raw[present] = 1.0 / counts[present]
    elif method == "sqrt_inverse":
        raw[present] = 1.0 / np.sqrt(counts[present])
    elif method == "effective":
        raw[present] = (1.0 - beta) / (1.0 - np.power(beta, counts[present]))
    else:
        raise ValueError(f"unknown class weighting {method!r}")
    return raw * (present.sum() / raw.sum())
