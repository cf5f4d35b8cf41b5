"""core/evaluation/operating_points.py: thresholds chosen on val, applied unchanged to test; the positive class."""

from __future__ import annotations

import numpy as np
import pytest

from core.evaluation.bootstrap import LesionBootstrap
from core.errors import UserError
from core.evaluation.operating_points import apply_thresholds, choose_thresholds, positive_index


def _scores(n: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    positive = rng.random(n) < 0.3
    return positive, 1 / (1 + np.exp(-(rng.normal(0, 1, n) + shift * positive)))


def test_thresholds_are_chosen_on_val_and_meet_their_targets_there() -> None:
    positive, score = _scores(400, 2.0, 0)
    rows = choose_thresholds(positive, score)
    assert [(r["kind"], r["target"]) for r in rows] == [
        ("sensitivity_at_specificity", 0.8), ("sensitivity_at_specificity", 0.9), ("sensitivity_at_specificity", 0.95),
        ("specificity_at_sensitivity", 0.8), ("specificity_at_sensitivity", 0.9), ("specificity_at_sensitivity", 0.95)]
    for row in rows:
        called = score >= row["threshold"]
        assert row["sensitivity"] == pytest.approx(called[positive].mean())
        assert row["specificity"] == pytest.approx((~called[~positive]).mean())
        met = row["specificity"] if row["kind"] == "sensitivity_at_specificity" else row["sensitivity"]
        assert met >= row["target"]
        assert row["threshold"] in score  # one of the val scores, nothing from elsewhere
    # Sensitivity falls as the wanted specificity rises.
    assert rows[0]["sensitivity"] >= rows[1]["sensitivity"] >= rows[2]["sensitivity"]


def test_thresholds_are_applied_to_test_unchanged() -> None:
    val_positive, val_score = _scores(400, 2.0, 0)
    test_positive, test_score = _scores(300, 1.0, 1)  # a harder test set: the val targets are not met there
    rows = choose_thresholds(val_positive, val_score)
    applied = apply_thresholds(rows, test_positive, test_score, LesionBootstrap.draw(np.arange(300), 200, 0))
    for row, test in zip(rows, applied):
        called = test_score >= row["threshold"]
        assert test["sensitivity"] == pytest.approx(called[test_positive].mean())
        assert test["specificity"] == pytest.approx((~called[~test_positive]).mean())
        low, high = test["sensitivity_ci"]
        assert low <= test["sensitivity"] <= high
    # Choosing on test instead would give other thresholds.
    assert [r["threshold"] for r in choose_thresholds(test_positive, test_score)] != [r["threshold"] for r in rows]


def test_positive_class_default_and_bad_name() -> None:
    classes = ("akiec", "bcc", "mel", "nv")
    assert positive_index(classes, None) == 2 and positive_index(classes, "bcc") == 1
    assert positive_index(("cat", "dog"), None) is None
    with pytest.raises(UserError, match="--positive-class melanoma: not a class of the model .*akiec, bcc, mel, nv"):
        positive_index(classes, "melanoma")
