"""Which training images an epoch visits, in which order (``TrainConfig.sampling``).

- ``uniform``: every training image once, shuffled (a permutation).
- ``sqrt``: each draw picks a class with probability proportional to the square root of its image count,
  then an image of that class uniformly (with replacement).
- ``balanced``: each class equally often, then an image of it uniformly (with replacement).

Every epoch visits as many images as the training split holds, so epochs, learning-rate schedules and
early-stopping rungs mean the same under every method. The draw comes from the epoch's generator
(seeded from the run's seed and the epoch), so a resumed run draws exactly what the uninterrupted one
would. Independent of ``class_weighting``, which weights the loss instead.
"""

from __future__ import annotations

import torch


def class_draw_probabilities(counts: torch.Tensor, method: str) -> torch.Tensor:
    """The probability of drawing each class; classes absent from training get 0."""
    counts = counts.double()
    present = (counts > 0).double()
    if method == "uniform":
        weights = counts
    elif method == "sqrt":
        weights = counts.sqrt()
    elif method == "balanced":
        weights = present
    else:
        raise ValueError(f"unknown sampling {method!r}")
    return weights / weights.sum()


def image_draw_weights(train_labels: torch.Tensor, method: str) -> torch.Tensor | None:
    """Per training image, the probability of drawing it (None for ``uniform``: a plain permutation)."""
    if method == "uniform":
        return None
    counts = torch.bincount(train_labels)
    return (class_draw_probabilities(counts, method)[train_labels] / counts[train_labels].double()).float()


def epoch_order(n: int, weights: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Positions into the training split (int64 [n]) for one epoch, on the generator's device."""
    if weights is None:
        return torch.randperm(n, generator=generator, device=generator.device)
    return torch.multinomial(weights, n, replacement=True, generator=generator)
