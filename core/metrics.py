"""Classification metrics from labels and predicted probabilities, via scikit-learn.

Balanced accuracy (mean per-class recall) is ISIC 2018 Task 3's score and the default sweep metric.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score,
                             precision_recall_fscore_support, roc_auc_score)


def classification_metrics(labels: np.ndarray, probs: np.ndarray, prefix: str,
                           loss: float | None = None) -> dict[str, float]:
    """``{prefix}accuracy``, ``balanced_accuracy``, ``macro_f1``, ``auc`` (and ``loss`` if given)."""
    labels = np.asarray(labels)
    pred = probs.argmax(1)
    num_classes = probs.shape[1]
    present = np.unique(labels)
    with warnings.catch_warnings():
        # A class seen in predictions but not in labels makes sklearn warn; the figures stay right.
        warnings.simplefilter("ignore")
        out = {
            f"{prefix}accuracy": float(accuracy_score(labels, pred)),
            f"{prefix}balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
            f"{prefix}macro_f1": float(f1_score(labels, pred, labels=present, average="macro", zero_division=0)),
            f"{prefix}auc": macro_auc(labels, probs, num_classes),
        }
    if loss is not None:
        out[f"{prefix}loss"] = float(loss)
    return out


def macro_auc(labels: np.ndarray, probs: np.ndarray, num_classes: int) -> float:
    """One-vs-rest ROC AUC averaged over the classes present (NaN with fewer than two)."""
    aucs = [roc_auc_score(labels == c, probs[:, c]) for c in range(num_classes)
            if 0 < (labels == c).sum() < len(labels)]
    return float(np.mean(aucs)) if aucs else float("nan")


def per_class_report(labels: np.ndarray, probs: np.ndarray,
                     class_names: tuple[str, ...] | list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support for every class, by class name."""
    pred = probs.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, pred, labels=np.arange(len(class_names)), zero_division=0)
    return {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)}
