"""core/model/calibration.py: temperature scaling, ECE, Brier score, on generated probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.calibration import calibration_curve

from core.model.calibration import apply_temperature, brier_score, expected_calibration_error, fit_temperature, reliability_bins


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (20000, 5))
    labels = np.array([rng.choice(5, p=p) for p in softmax(logits, axis=1)])  # calibrated by construction
    overconfident = softmax(2.5 * logits, axis=1)                              # the same logits times 2.5
    assert fit_temperature(labels, overconfident) == pytest.approx(2.5, rel=0.05)
    assert fit_temperature(labels, softmax(logits, axis=1)) == pytest.approx(1.0, rel=0.05)


def test_apply_temperature_divides_the_logits() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.4, 3.0]])
    np.testing.assert_allclose(apply_temperature(softmax(logits, axis=1), 2.0), softmax(logits / 2.0, axis=1))
    scaled = apply_temperature(softmax(logits, axis=1), 3.0)
    assert (scaled.argmax(1) == logits.argmax(1)).all()  # never changes the predicted class


def test_ece_of_hand_made_cases() -> None:
    # One bin: confidence 0.9 each, 3 of 4 right -> |0.75 - 0.9| = 0.15.
    probs = np.array([[0.9, 0.1]] * 4)
    assert expected_calibration_error(np.array([0, 0, 0, 1]), probs) == pytest.approx(0.15)
    # Two bins, each half of the images: confidence 0.95 with 1 of 2 right, 0.55 with 2 of 2 right.
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    assert expected_calibration_error(np.array([0, 1, 0, 1]), probs) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    # Confidence 0.75, right 3 times in 4: calibrated.
    assert expected_calibration_error(np.array([0, 0, 0, 1]), np.array([[0.75, 0.25]] * 4)) == pytest.approx(0)


def test_reliability_bins_agree_with_sklearn() -> None:
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4) * 0.5, 500)
    labels = rng.integers(0, 4, 500)
    count, accuracy, confidence = reliability_bins(labels, probs, 15)
    correct = probs.argmax(1) == labels
    prob_true, prob_pred = calibration_curve(correct, probs.max(1), n_bins=15, strategy="uniform")
    np.testing.assert_allclose(accuracy[count > 0], prob_true)
    np.testing.assert_allclose(confidence[count > 0], prob_pred)
    assert count.sum() == 500


def test_brier_score_is_multi_class() -> None:
    assert brier_score(np.array([0, 2]), np.array([[1.0, 0, 0], [0, 0, 1.0]])) == 0.0
    assert brier_score(np.array([0]), np.array([[0.5, 0.5, 0.0]])) == pytest.approx(0.5)  # 0.25 + 0.25
    assert brier_score(np.array([1]), np.array([[1.0, 0.0, 0.0]])) == pytest.approx(2.0)
