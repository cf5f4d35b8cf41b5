"""Classification metrics from labels and predicted probabilities, via scikit-learn.

Balanced accuracy (mean per-class recall) is ISIC 2018 Task 3's score and the default sweep metric.
:func:`score_predictions` gives an evaluation's headline metrics, per-class figures and confusion matrix.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support, roc_auc_score)

from core.errors import UserError


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


@dataclass(frozen=True)
class PredictionScores:
    """Predictions of a model on labelled images and the metrics they give (classes: the model's)."""

    class_names: tuple[str, ...]
    labels: np.ndarray            # int64 [N], index into class_names
    probs: np.ndarray             # float [N, C]
    metrics: dict[str, float]     # test_accuracy, test_balanced_accuracy, test_macro_f1, test_auc, test_loss
    per_class: dict[str, dict[str, float]]
    confusion: np.ndarray         # int64 [C, C], rows true, columns predicted


def score_predictions(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> PredictionScores:
    """Metrics of predicted probabilities against labels; the loss is the plain cross-entropy."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise UserError("nothing to evaluate: the chosen split holds no images")
    picked = probs[np.arange(len(labels)), labels]
    loss = float(-np.mean(np.log(np.clip(picked, 1e-12, None))))
    return PredictionScores(class_names=tuple(class_names), labels=labels, probs=probs,
                            metrics=classification_metrics(labels, probs, "test_", loss),
                            per_class=per_class_report(labels, probs, class_names),
                            confusion=confusion_matrix(labels, probs.argmax(1), labels=np.arange(len(class_names))))


def map_labels(data_classes: Sequence[str], model_classes: Sequence[str], labels: np.ndarray,
               source: str) -> np.ndarray:
    """Labels indexing ``data_classes`` -> the same classes' indices in ``model_classes``, by name."""
    index = {name: i for i, name in enumerate(model_classes)}
    used = sorted({data_classes[i] for i in np.unique(labels)})
    unknown = [name for name in used if name not in index]
    if unknown:
        raise UserError(f"{source}: classes the model does not know: {', '.join(unknown)} "
                        f"(the model's classes: {', '.join(model_classes)})")
    lookup = np.array([index.get(name, -1) for name in data_classes], dtype=np.int64)
    return lookup[np.asarray(labels, dtype=np.int64)]


def headline(metrics: Mapping[str, float | None]) -> str:
    """One console line of the main metrics."""
    keys = ("test_balanced_accuracy", "test_accuracy", "test_macro_f1", "test_auc", "test_loss")
    return ", ".join(f"{k.removeprefix('test_')}={_fmt(metrics.get(k))}" for k in keys)


def finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)  # JSON has no NaN (an AUC with one class present)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"
