"""core/model/tta.py through core/model/inference.py: the mean softmax over the 8 dihedral views."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from core.model.inference import predict_probs


def _images(n: int = 5, size: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def test_tta_of_an_invariant_model_changes_nothing() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))  # blind to flips and turns
    images = _images()
    np.testing.assert_allclose(predict_probs(model, images, tta=True), predict_probs(model, images), atol=1e-6)


def test_tta_of_a_model_that_is_not_invariant_gives_the_mean_of_the_views() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    images = _images()
    turns = [np.rot90(images, k, axes=(2, 3)) for k in range(4)]
    views = turns + [np.flip(t, axis=3) for t in turns]
    expected = np.mean([predict_probs(model, np.ascontiguousarray(v)) for v in views], axis=0)
    got = predict_probs(model, images, tta=True, batch_size=16)  # 2 images per batch of 16 views
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.abs(got - predict_probs(model, images)).max() > 1e-3  # the views do differ for this model
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)
