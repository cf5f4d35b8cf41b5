"""TrainConfig.sampling: class frequencies of the drawn images, and reproducibility from the seed."""

import numpy as np
import pytest
import torch

from core.training.sampling import class_draw_probabilities, epoch_order, image_draw_weights

COUNTS = torch.tensor([400, 100, 0, 16])
LABELS = torch.repeat_interleave(torch.arange(4), COUNTS)


def test_class_probabilities_follow_the_method():
    assert torch.allclose(class_draw_probabilities(COUNTS, "uniform"), COUNTS.double() / 516)
    assert torch.allclose(class_draw_probabilities(COUNTS, "sqrt"), torch.tensor([20.0, 10.0, 0.0, 4.0]).double() / 34)
    assert torch.allclose(class_draw_probabilities(COUNTS, "balanced"), torch.tensor([1, 1, 0, 1]).double() / 3)


@pytest.mark.parametrize("method, expected", [("sqrt", [20 / 34, 10 / 34, 0, 4 / 34]), ("balanced", [1 / 3, 1 / 3, 0, 1 / 3])])
def test_drawn_class_frequencies(method, expected):
    weights = image_draw_weights(LABELS, method)
    drawn = torch.cat([LABELS[epoch_order(len(LABELS), weights, torch.Generator().manual_seed(e))]
                       for e in range(40)])
    assert len(drawn) == 40 * len(LABELS)  # an epoch visits as many images as the split holds
    freq = torch.bincount(drawn, minlength=4).double() / len(drawn)
    assert np.allclose(freq.numpy(), expected, atol=0.01), freq


def test_uniform_is_a_permutation_and_every_method_is_seeded():
    order = epoch_order(len(LABELS), image_draw_weights(LABELS, "uniform"), torch.Generator().manual_seed(3))
    assert sorted(order.tolist()) == list(range(len(LABELS)))
    for method in ("uniform", "sqrt", "balanced"):
        weights = image_draw_weights(LABELS, method)
        a, b, c = (epoch_order(len(LABELS), weights, torch.Generator().manual_seed(s)) for s in (1, 1, 2))
        assert torch.equal(a, b) and not torch.equal(a, c), method


def test_within_a_class_every_image_can_be_drawn():
    weights = image_draw_weights(LABELS, "balanced")
    drawn = torch.cat([epoch_order(len(LABELS), weights, torch.Generator().manual_seed(e)) for e in range(20)])
    rare = torch.nonzero(LABELS == 3).flatten()
    assert set(rare.tolist()) <= set(drawn.tolist())
