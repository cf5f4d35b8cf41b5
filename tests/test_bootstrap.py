"""core/evaluation/bootstrap.py (intervals by resampling lesions) and core/evaluation/lesions.py (one prediction per lesion)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from core.evaluation.bootstrap import LesionBootstrap, weighted_auc
from core.evaluation.lesions import by_lesion, has_lesion_ids


def _predictions(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    probs = rng.dirichlet(np.ones(3), n)
    probs[np.arange(n), labels] += rng.uniform(0, 0.6, n)
    return labels, np.round(probs / probs.sum(1, keepdims=True), 2)  # rounded: ties in the scores


def test_weighted_auc_is_sklearns_with_sample_weights() -> None:
    labels, probs = _predictions(300)
    weights = np.random.default_rng(1).integers(0, 4, (5, 300)).astype(float)
    got = weighted_auc(labels == 1, probs[:, 1], weights)
    expected = [roc_auc_score(labels == 1, probs[:, 1], sample_weight=w) for w in weights]
    np.testing.assert_allclose(got, expected)


def test_a_resample_keeps_every_image_of_a_drawn_lesion_and_its_metrics_are_sklearns() -> None:
    labels, probs = _predictions(200)
    groups = np.array([f"L{i // 3}" for i in range(200)])  # lesions of 3 images (the last of 2)
    boot = LesionBootstrap.draw(groups, 50, seed=3)
    assert boot.n_lesions == 67 and boot.weights.shape == (50, 200)
    for row in boot.weights:
        assert all(len(set(row[groups == g])) == 1 for g in np.unique(groups))  # whole lesions only
        assert row[::3].sum() == 67                                              # 67 lesions drawn
    row = boot.weights[7].astype(int)
    samples = boot.metrics(labels, probs)
    expanded_labels, expanded_pred = np.repeat(labels, row), np.repeat(probs.argmax(1), row)
    assert samples["balanced_accuracy"][7] == pytest.approx(balanced_accuracy_score(expanded_labels, expanded_pred))
    assert samples["accuracy"][7] == pytest.approx((expanded_labels == expanded_pred).mean())


def test_the_bootstrap_is_reproducible_from_its_seed() -> None:
    groups = np.array([f"L{i // 2}" for i in range(100)])
    np.testing.assert_array_equal(LesionBootstrap.draw(groups, 100, 5).weights,
                                  LesionBootstrap.draw(groups, 100, 5).weights)
    assert not np.array_equal(LesionBootstrap.draw(groups, 100, 5).weights,
                              LesionBootstrap.draw(groups, 100, 6).weights)


def test_one_huge_lesion_widens_the_interval() -> None:
    # 100 images the model gets right and 100 it gets right half the time: accuracy 0.75 either way.
    labels = np.zeros(200, dtype=np.int64)
    probs = np.tile([0.8, 0.2], (200, 1))
    probs[100:][::2] = [0.2, 0.8]
    separate = np.array([f"L{i}" for i in range(200)])
    huge = separate.copy()
    huge[:100] = "one lesion"  # the 100 right images are one lesion seen 100 times
    widths = {}
    for name, groups in (("separate", separate), ("huge", huge)):
        boot = LesionBootstrap.draw(groups, 1000, seed=0)
        low, high = boot.interval(boot.metrics(labels, probs)["accuracy"])
        assert low < 0.75 < high
        widths[name] = high - low
    assert widths["huge"] > 2 * widths["separate"], widths


def test_lesion_level_averages_each_lesions_images() -> None:
    groups = np.array(["b", "a", "b", "c", "a"])
    labels = np.array([1, 0, 1, 2, 0])
    probs = np.array([[0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.4, 0.4, 0.2], [0.1, 0.1, 0.8], [0.8, 0.2, 0.0]])
    lesions = by_lesion(groups, labels, probs)
    assert list(lesions.lesion_ids) == ["a", "b", "c"] and list(lesions.labels) == [0, 1, 2]
    assert list(lesions.n_images) == [2, 2, 1]
    np.testing.assert_allclose(lesions.probs, [[0.7, 0.3, 0.0], [0.3, 0.6, 0.1], [0.1, 0.1, 0.8]])
    assert has_lesion_ids(groups, np.arange(5).astype(str))
    assert not has_lesion_ids(np.array(["x", "y"]), np.array(["x", "y"]))
