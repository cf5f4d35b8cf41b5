import numpy as np
import pytest

from core.evaluation.metrics import classification_metrics, per_class_report


def test_metrics_by_hand():
    labels = np.array([0, 0, 0, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.6, .3, .1], [.2, .7, .1], [.1, .8, .1], [.1, .2, .7], [.5, .1, .4]])
    m = classification_metrics(labels, probs, "val_", loss=0.5)
    assert m["val_accuracy"] == pytest.approx(4 / 6)
    assert m["val_balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    assert m["val_loss"] == 0.5
    assert 0.5 < m["val_auc"] <= 1
    assert set(m) == {"val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_auc", "val_loss"}


def test_auc_skips_absent_classes_and_perfect_is_one():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[.9, .1, 0], [.8, .2, 0], [.1, .9, 0], [.3, .7, 0]])
    assert classification_metrics(labels, probs, "test_")["test_auc"] == 1.0


def test_per_class_report():
    labels = np.array([0, 1, 1])
    probs = np.array([[.9, .1], [.2, .8], [.6, .4]])
    report = per_class_report(labels, probs, ["a", "b"])
    assert report["a"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert report["b"]["recall"] == 0.5 and report["b"]["support"] == 2
